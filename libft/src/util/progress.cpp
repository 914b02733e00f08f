#include "ft/util/progress.h"

#include <unistd.h>

#include <cmath>
#include <sstream>

namespace ft {

Progress::Progress(std::string label, double total, std::string unit, std::FILE* out, double interval_s)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      out_(out),
      interval_s_(interval_s),
      tty_(out != nullptr && ::isatty(::fileno(out))),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto total = static_cast<int64_t>(std::llround(s));
  char buf[32];
  if (total >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(total / 3600), (long long)(total % 3600 / 60));
  else if (total >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(total / 60), (long long)(total % 60));
  else std::snprintf(buf, sizeof buf, "%llds", (long long)total);
  return buf;
}

std::string Progress::line(double done, const std::string& extra) const {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = elapsed > 0 ? (done - base_) / elapsed : 0;
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(1);
  os << label_ << " ";
  if (total_ > 0) {
    const double frac = std::min(done / total_, 1.0);
    const int width = 20, filled = static_cast<int>(frac * width);
    os << "[" << std::string(filled, '#') << std::string(width - filled, '.') << "] " << 100 * frac << "% ";
    os << done << "/" << total_ << " " << unit_;
    os << ", " << rate << " " << unit_ << "/s, ETA " << format_duration(rate > 0 ? (total_ - done) / rate : NAN);
  } else {
    os << done << " " << unit_ << ", " << rate << " " << unit_ << "/s";
  }
  os << ", elapsed " << format_duration(elapsed);
  if (!extra.empty()) os << ", " << extra;
  return os.str();
}

void Progress::update(double done, const std::string& extra) {
  last_done_ = done;
  if (out_ == nullptr) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && std::chrono::duration<double>(now - last_draw_).count() < interval_s_) return;
  last_draw_ = now;
  drawn_ = true;
  const std::string text = line(done, extra);
  if (tty_) std::fprintf(out_, "\r\033[K%s", text.c_str());
  else std::fprintf(out_, "%s\n", text.c_str());
  std::fflush(out_);
}

void Progress::finish(const std::string& extra) {
  if (out_ == nullptr) return;
  const std::string text = line(last_done_, extra);
  if (tty_) std::fprintf(out_, "\r\033[K%s\n", text.c_str());
  else std::fprintf(out_, "%s\n", text.c_str());
  std::fflush(out_);
}

std::string Progress::format_count(int64_t n) {
  const std::string digits = std::to_string(n < 0 ? -n : n);
  std::string out = n < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

}  // namespace ft
