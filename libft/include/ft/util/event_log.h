#pragma once
// TensorBoard event files, written directly: a run's scalars (loss, lr, grad norm, tokens/s,
// evaluation losses) as `tensorboard --logdir OUTPUT_DIR` shows them, without TensorFlow or
// protobuf as a dependency.
//
// Format. A file events.out.tfevents.<unix seconds>.<host>.<nanoseconds>.<pid>.libft is a sequence of TFRecords:
//   uint64 length, uint32 masked CRC-32C of those 8 bytes, `length` bytes of data, uint32 masked
//   CRC-32C of the data (little-endian; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8),
// each holding one serialized tensorflow.Event protocol buffer: the first {wall_time, file_version
// "brain.Event:2"}, then {wall_time, step, summary {value {tag, simple_value}}} per scalar. Only
// these few protobuf fields are written, by hand (tests/python/check_event_log.py reads the files
// back with TensorBoard's own reader).
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace ft {

/// CRC-32C (Castagnoli), as TFRecord framing uses it.
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

class EventLog {
 public:
  /// Creates a new event file in `dir` (which must exist). Throws ft::Error naming the path.
  explicit EventLog(const std::string& dir);
  ~EventLog();
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;

  /// One scalar at `step`; written through to the file (flushed) so a crashed run keeps it.
  void scalar(std::string_view tag, double value, int64_t step);
  /// A SessionLog START at `step`: TensorBoard then drops the events of this directory's earlier
  /// files at steps >= `step` (a resumed run's replay of steps an interrupted process had logged).
  void session_start(int64_t step);
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace ft
