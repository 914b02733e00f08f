#include "ft/util/event_log.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "ft/util/error.h"

namespace ft {

namespace {

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kTable = make_table();

uint32_t masked_crc(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

// Protocol buffer wire format: field key = (number << 3) | wire type.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
template <typename T>
void fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(b, sizeof(T));
}
void bytes_field(std::string& out, int field, std::string_view bytes) {
  varint(out, (static_cast<uint64_t>(field) << 3) | 2);
  varint(out, bytes.size());
  out.append(bytes);
}

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = kTable[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

EventLog::EventLog(const std::string& dir) {
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  // TensorBoard reads a directory's files in name order: seconds, then nanoseconds (zero-padded),
  // so that a resumed run's file sorts after the interrupted one's even within the same second.
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const long long ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now).count();
  char stamp[64];
  std::snprintf(stamp, sizeof stamp, "%lld.%s.%09lld.%d.libft", ns / 1000000000LL, host, ns % 1000000000LL,
                static_cast<int>(::getpid()));
  path_ = (std::filesystem::path(dir) / (std::string("events.out.tfevents.") + stamp)).string();
  file_ = std::fopen(path_.c_str(), "wb");
  FT_CHECK(file_ != nullptr, "[events] cannot create ", path_, ": ", std::strerror(errno));
  std::string event;
  varint(event, (1 << 3) | 1);  // wall_time: double
  fixed(event, wall_time());
  bytes_field(event, 3, "brain.Event:2");  // file_version
  record(event);
}

EventLog::~EventLog() {
  if (file_) std::fclose(file_);
}

void EventLog::scalar(std::string_view tag, double value, int64_t step) {
  std::string v;  // Summary.Value {tag = 1, simple_value = 2 (float)}
  bytes_field(v, 1, tag);
  varint(v, (2 << 3) | 5);
  fixed(v, static_cast<float>(value));
  std::string summary;  // Summary {repeated Value value = 1}
  bytes_field(summary, 1, v);
  std::string event;  // Event {wall_time = 1, step = 2, summary = 5}
  varint(event, (1 << 3) | 1);
  fixed(event, wall_time());
  varint(event, (2 << 3) | 0);
  varint(event, static_cast<uint64_t>(step));
  bytes_field(event, 5, summary);
  record(event);
}

void EventLog::session_start(int64_t step) {
  std::string log;  // SessionLog {status = 1: START}
  varint(log, (1 << 3) | 0);
  varint(log, 1);
  // Event {wall_time = 1, step = 2, session_log = 7}. (Field 6 is the deprecated log_message,
  // which TensorBoard reads as a log line and so never purged the replayed steps.)
  std::string event;
  varint(event, (1 << 3) | 1);
  fixed(event, wall_time());
  varint(event, (2 << 3) | 0);
  varint(event, static_cast<uint64_t>(step));
  bytes_field(event, 7, log);
  record(event);
}

void EventLog::record(const std::string& event) {
  std::string r;
  fixed(r, static_cast<uint64_t>(event.size()));
  fixed(r, masked_crc(r.data(), 8));
  r += event;
  fixed(r, masked_crc(event.data(), event.size()));
  const bool ok = std::fwrite(r.data(), 1, r.size(), file_) == r.size() && std::fflush(file_) == 0;
  FT_CHECK(ok, "[events] writing ", path_, " failed: ", std::strerror(errno));
}

}  // namespace ft
