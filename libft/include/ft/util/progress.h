#pragma once
// A one-line progress display for long work (tokenizing a corpus, training): done/total, rate,
// ETA and any extra fields, redrawn in place on a terminal and printed every `interval` seconds
// as plain lines when the output is a file or a pipe (CI logs stay readable).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace ft {

class Progress {
 public:
  /// `unit` names what is counted ("docs", "MB", "steps"); total 0 = unknown.
  Progress(std::string label, double total, std::string unit, std::FILE* out = stderr, double interval_s = 1.0);
  /// Work already done before this process started (a resumed run): rates and the ETA count only
  /// what is done from here on.
  void set_start(double done) { base_ = done; }
  /// Sets the amount done so far and an optional extra text (e.g. "loss 2.31"); draws if due.
  void update(double done, const std::string& extra = "");
  /// Draws the final state (the last amount given to update(), or the total) and ends the line.
  void finish(const std::string& extra = "");
  /// "1h02m", "3m20s", "12s": for ETAs and elapsed times.
  static std::string format_duration(double seconds);
  /// 3950848 → "3,950,848": for parameter and token counts.
  static std::string format_count(int64_t n);
  /// The line that would be drawn now (for tests).
  std::string line(double done, const std::string& extra) const;

 private:
  std::string label_, unit_;
  double total_;
  std::FILE* out_;
  double interval_s_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  bool drawn_ = false;
  double last_done_ = 0;
  double base_ = 0;
};

}  // namespace ft
