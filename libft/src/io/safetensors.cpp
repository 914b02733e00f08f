// safetensors reader and writer without LibTorch. See ft/io/safetensors.h.
//
// File layout (all integers little-endian):
//
//   offset 0      u64 N                      header length in bytes, N ≤ 100,000,000
//   offset 8      N bytes of UTF-8 JSON      {"__metadata__": {"k": "v", ...},          (optional)
//                                             "name": {"dtype": "F32", "shape": [2, 4],
//                                                      "data_offsets": [begin, end]}, ...}
//                                            JSON whitespace may pad it on either side; writers pad
//                                            the end with spaces so that 8 + N is a multiple of 8
//   offset 8 + N  data buffer                tensors' bytes, row-major; offsets are relative to it
//
// The reading rules are those of the reference implementation (huggingface/safetensors,
// safetensors/src/tensor.rs: SafeTensors::read_metadata and Metadata::validate): the header length
// bounds, strict UTF-8, one JSON object, known dtypes, non-negative integer dims, overflow-checked
// sizes that equal end − begin, and offsets that, sorted, tile the data buffer exactly. libft is
// stricter in three places, because each is a sign of a corrupt or hostile file: duplicate JSON keys
// (serde keeps the last one silently), unknown fields in a tensor entry (serde ignores them) and
// nesting deeper than a valid header ever needs.
#include "ft/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <unordered_set>

#include <nlohmann/json.hpp>

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; libft hands tensor bytes out unconverted");

namespace ft::io {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's MAX_HEADER_SIZE
constexpr size_t kPrefixBytes = 8;                  // the u64 N
constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";
// A valid header is at most three levels deep: the top object, a tensor entry (or "__metadata__")
// and its shape / data_offsets array. One spare level lets `"shape": [[1]]` be reported as a bad
// dimension; anything deeper is rejected while parsing, before hostile nesting costs memory.
constexpr size_t kMaxHeaderDepth = 4;
constexpr size_t kMaxIndexDepth = 16;        // an index is {"metadata": {...}, "weight_map": {...}}
constexpr uint64_t kMaxIndexBytes = 256ull << 20;

// One row per dtype. `rank` is the dtype's position in the reference's `enum Dtype`, which is
// declared in increasing alignment order; serialize sorts by it (descending) so that every tensor
// of a wider type comes first and stays naturally aligned in the data buffer.
struct DTypeRow {
  DType dtype;
  std::string_view name;
  unsigned bits;
  unsigned rank;
};
constexpr DTypeRow kDTypes[] = {
    {DType::BOOL, "BOOL", 8, 0},          {DType::F4, "F4", 4, 1},
    {DType::F6_E2M3, "F6_E2M3", 6, 2},    {DType::F6_E3M2, "F6_E3M2", 6, 3},
    {DType::U8, "U8", 8, 4},              {DType::I8, "I8", 8, 5},
    {DType::F8_E5M2, "F8_E5M2", 8, 6},    {DType::F8_E4M3, "F8_E4M3", 8, 7},
    {DType::F8_E8M0, "F8_E8M0", 8, 8},    {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8, 9},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8, 10}, {DType::I16, "I16", 16, 11},
    {DType::U16, "U16", 16, 12},          {DType::F16, "F16", 16, 13},
    {DType::BF16, "BF16", 16, 14},        {DType::I32, "I32", 32, 15},
    {DType::U32, "U32", 32, 16},          {DType::F32, "F32", 32, 17},
    {DType::C64, "C64", 64, 18},          {DType::F64, "F64", 64, 19},
    {DType::I64, "I64", 64, 20},          {DType::U64, "U64", 64, 21},
};

const DTypeRow& dtype_row(DType dtype) {
  for (const DTypeRow& row : kDTypes)
    if (row.dtype == dtype) return row;
  FT_FAIL("[safetensors] invalid DType value ", static_cast<int>(dtype));
}

/// Tensor and key names go into messages quoted; control bytes are escaped so that a hostile name
/// cannot forge lines in a log.
std::string quote_name(std::string_view s) {
  std::string out = "'";
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
  return out + "'";
}

template <typename... Args>
[[noreturn]] void fail(std::string_view source, Args&&... args) {
  FT_FAIL("[safetensors] ", source, ": ", std::forward<Args>(args)...);
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// A JSON value for an error message, "number -1" or "array [0,4,8]", its text shortened.
std::string brief(const json& j) {
  if (j.is_null()) return "null";
  // "-0" parses as signed 0 and would print as a misleading "0".
  if (j.is_number_integer() && !j.is_number_unsigned() && j.get<int64_t>() == 0) return "number -0";
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return j.type_name() + std::string(" ") + s;
}

/// Offset of the first byte that starts an ill-formed UTF-8 sequence, or npos. Well-formed means
/// Unicode's Table 3-7: no overlong forms, no surrogates (U+D800..U+DFFF), nothing above U+10FFFF —
/// what Rust's str::from_utf8 accepts.
size_t find_invalid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c == 0xE0) {
      len = 3, lo = 0xA0;
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
      len = 3;
    } else if (c == 0xED) {
      len = 3, hi = 0x9F;
    } else if (c == 0xF0) {
      len = 4, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
      len = 4;
    } else if (c == 0xF4) {
      len = 4, hi = 0x8F;
    } else {
      return i;
    }
    if (n - i < len || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if ((s[i + k] & 0xC0) != 0x80) return i;
    i += len;
  }
  return std::string_view::npos;
}

// ------------------------------------------------------------------------------------------------
// Strict JSON: nlohmann keeps the last of duplicate keys silently, so a parser callback tracks one
// key set per open object and throws on a repeat; it also bounds the nesting depth.

enum class JsonKind { Header, Index };

class StrictJson {
 public:
  StrictJson(std::string_view source, JsonKind kind, size_t max_depth)
      : source_(source), kind_(kind), max_depth_(max_depth) {}

  json parse(const char* begin, const char* end) {
    const std::string_view what = kind_ == JsonKind::Header ? "header" : "index";
    // nlohmann's lexer takes a NUL byte for the end of the input, so "{}\0garbage" would parse. JSON
    // allows no raw NUL anywhere (inside strings it must be escaped), so any NUL is an error.
    if (const void* nul = std::memchr(begin, '\0', static_cast<size_t>(end - begin)))
      fail(source_, what, " is not valid JSON: NUL byte at offset ", static_cast<const char*>(nul) - begin,
           kind_ == JsonKind::Header ? " of the header" : "");
    auto cb = [this](int, json::parse_event_t event, json& parsed) { return on_event(event, parsed); };
    try {
      return json::parse(begin, end, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::exception& e) {
      fail(source_, what, " is not valid JSON: ", e.what());
    }
  }

 private:
  struct Frame {
    bool object;
    std::unordered_set<std::string> keys;
    std::string last_key;  // the key whose value is being parsed
  };

  bool on_event(json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (frames_.size() >= max_depth_)
          fail(source_, kind_ == JsonKind::Header ? "header" : "index", " nests JSON deeper than ",
               max_depth_, " levels", where());
        frames_.push_back(Frame{event == json::parse_event_t::object_start, {}, {}});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        frames_.pop_back();
        break;
      case json::parse_event_t::key: {
        // A key event only happens directly inside the innermost open container, an object.
        const auto& key = parsed.get_ref<const std::string&>();
        Frame& top = frames_.back();
        if (!top.keys.insert(key).second) duplicate(key);
        top.last_key = key;
        break;
      }
      case json::parse_event_t::value:
        break;
    }
    return true;
  }

  /// " (inside tensor 'a')" and the like, for the depth error.
  std::string where() const {
    if (frames_.empty() || !frames_[0].object || frames_[0].last_key.empty()) return "";
    if (kind_ == JsonKind::Header && frames_[0].last_key != kMetadataKey)
      return " (inside tensor " + quote_name(frames_[0].last_key) + ")";
    return " (inside " + quote_name(frames_[0].last_key) + ")";
  }

  [[noreturn]] void duplicate(const std::string& key) const {
    if (kind_ == JsonKind::Header && frames_.size() == 1) {
      if (key == kMetadataKey) fail(source_, "duplicate key ", quote_name(key), " in the header");
      fail(source_, "duplicate tensor name ", quote_name(key), " in the header");
    }
    if (kind_ == JsonKind::Header && frames_.size() == 2) {
      if (frames_[0].last_key == kMetadataKey) fail(source_, "'__metadata__': duplicate key ", quote_name(key));
      fail(source_, "tensor ", quote_name(frames_[0].last_key), ": duplicate key ", quote_name(key));
    }
    std::string path;
    for (size_t i = 0; i + 1 < frames_.size(); ++i)
      path += "/" + (frames_[i].object ? frames_[i].last_key : std::string("[]"));
    fail(source_, "duplicate key ", quote_name(key), path.empty() ? " at the top level" : " in " + quote_name(path));
  }

  std::string_view source_;
  JsonKind kind_;
  size_t max_depth_;
  std::vector<Frame> frames_;
};

/// A JSON integer without sign or fraction, as u64 — what serde (the reference) accepts for usize.
/// nlohmann stores exactly those as number_unsigned. Rejected, as serde rejects them: negative
/// numbers, "-0" (serde reads it as the float -0.0), floats even when integral (2.0, 1e1), and
/// integers beyond u64 (which both parsers turn into floats).
bool as_u64(const json& j, uint64_t& out) {
  if (!j.is_number_unsigned()) return false;
  out = j.get<uint64_t>();
  return true;
}

/// Bytes of `numel(shape)` elements of `dtype`; false on u64 overflow. The product is folded left
/// to right like the reference's, so [0, 2^62, 2^62] is empty while [2^62, 2^62, 0] overflows.
/// `misaligned` reports a sub-byte tensor that does not fill whole bytes.
bool checked_nbytes(const std::vector<int64_t>& shape, DType dtype, uint64_t& nbytes, bool& misaligned) {
  uint64_t numel = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) return false;
  uint64_t bits = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_bits(dtype)), &bits)) return false;
  misaligned = bits % 8 != 0;
  nbytes = bits / 8;
  return true;
}

TensorInfo parse_entry(const std::string& name, const json& entry, std::string_view source) {
  const std::string tensor = "tensor " + quote_name(name);
  if (!entry.is_object()) fail(source, tensor, ": entry must be an object, not ", brief(entry));
  for (const auto& [key, value] : entry.items()) {
    (void)value;
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      fail(source, tensor, ": unknown field ", quote_name(key), " (a tensor entry has dtype, shape, data_offsets)");
  }
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(field)) fail(source, tensor, ": missing field '", field, "'");

  TensorInfo info;
  info.name = name;

  const json& dtype = entry["dtype"];
  if (!dtype.is_string()) fail(source, tensor, ": dtype must be a string, not ", brief(dtype));
  info.dtype = parse_dtype(dtype.get_ref<const std::string&>(),
                           "[safetensors] " + std::string(source) + ": " + tensor);

  const json& shape = entry["shape"];
  if (!shape.is_array()) fail(source, tensor, ": shape must be an array, not ", brief(shape));
  for (size_t i = 0; i < shape.size(); ++i) {
    uint64_t d = 0;
    if (!as_u64(shape[i], d))
      fail(source, tensor, ": shape entry ", i, " must be a non-negative integer, not ", brief(shape[i]));
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(source, tensor, ": shape entry ", i, " is ", d, ", beyond the largest supported dimension 2^63-1");
    info.shape.push_back(static_cast<int64_t>(d));
  }

  const json& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2)
    fail(source, tensor, ": data_offsets must be an array [begin, end], not ", brief(offsets));
  if (!as_u64(offsets[0], info.begin) || !as_u64(offsets[1], info.end))
    fail(source, tensor, ": data_offsets must be two non-negative integers, not ", offsets.dump());
  if (info.begin > info.end)
    fail(source, tensor, ": data_offsets [", info.begin, ", ", info.end, ") begin after they end");

  uint64_t need = 0;
  bool misaligned = false;
  if (!checked_nbytes(info.shape, info.dtype, need, misaligned))
    fail(source, tensor, ": shape ", shape_str(info.shape), " of ", dtype_name(info.dtype),
         " overflows a 64-bit byte count");
  if (misaligned)
    fail(source, tensor, ": shape ", shape_str(info.shape), " of ", dtype_name(info.dtype),
         " is not a whole number of bytes");
  if (info.end - info.begin != need)
    fail(source, tensor, ": data_offsets [", info.begin, ", ", info.end, ") hold ", info.end - info.begin,
         " bytes but shape ", shape_str(info.shape), " of ", dtype_name(info.dtype), " needs ", need);
  return info;
}

// ------------------------------------------------------------------------------------------------
// Writing

/// The JSON string escaping of serde_json (which Python's safetensors uses): `"` and `\` escaped,
/// \b \f \n \r \t short forms, other control bytes as \u00xx with lowercase hex; everything else,
/// DEL and non-ASCII included, verbatim.
void append_json_string(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

struct Prepared {
  std::string header;                       // JSON padded with spaces to a multiple of 8
  std::vector<const TensorWrite*> order;    // data buffer order
  uint64_t data_bytes = 0;
};

/// Validates the tensors and builds the header the way the reference's `prepare` does: sort by
/// dtype rank descending, then name; assign consecutive offsets; serialise
/// {"__metadata__":{...},"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...} with no spaces;
/// pad with spaces to a multiple of 8.
Prepared prepare(const std::vector<TensorWrite>& tensors, const std::map<std::string, std::string>& metadata,
                 std::string_view source) {
  Prepared p;
  std::set<std::string_view> names;
  for (const TensorWrite& t : tensors) {
    const std::string tensor = "tensor " + quote_name(t.name);
    if (t.name == kMetadataKey) fail(source, tensor, ": the name is reserved for the metadata entry");
    if (!names.insert(t.name).second) fail(source, tensor, ": duplicate tensor name");
    if (find_invalid_utf8(reinterpret_cast<const uint8_t*>(t.name.data()), t.name.size()) != std::string_view::npos)
      fail(source, tensor, ": the name is not valid UTF-8");
    for (int64_t d : t.shape)
      if (d < 0) fail(source, tensor, ": shape ", shape_str(t.shape), " has a negative dimension");
    uint64_t need = 0;
    bool misaligned = false;
    if (!checked_nbytes(t.shape, t.dtype, need, misaligned))
      fail(source, tensor, ": shape ", shape_str(t.shape), " of ", dtype_name(t.dtype), " overflows a 64-bit byte count");
    if (misaligned)
      fail(source, tensor, ": shape ", shape_str(t.shape), " of ", dtype_name(t.dtype), " is not a whole number of bytes");
    if (t.nbytes != need)
      fail(source, tensor, ": ", t.nbytes, " bytes given but shape ", shape_str(t.shape), " of ", dtype_name(t.dtype),
           " needs ", need);
    if (need > 0 && t.data == nullptr) fail(source, tensor, ": data is null");
    p.order.push_back(&t);
  }
  for (const auto& [k, v] : metadata)
    for (const std::string* s : {&k, &v})
      if (find_invalid_utf8(reinterpret_cast<const uint8_t*>(s->data()), s->size()) != std::string_view::npos)
        fail(source, "metadata entry ", quote_name(k), " is not valid UTF-8");

  std::stable_sort(p.order.begin(), p.order.end(), [](const TensorWrite* a, const TensorWrite* b) {
    const unsigned ra = dtype_row(a->dtype).rank, rb = dtype_row(b->dtype).rank;
    if (ra != rb) return ra > rb;
    return a->name < b->name;  // std::string compares bytes as unsigned char, like Rust's String
  });

  std::string& h = p.header;
  h += '{';
  bool first = true;
  if (!metadata.empty()) {
    append_json_string(h, kMetadataKey);
    h += ":{";
    for (const auto& [k, v] : metadata) {
      if (!first) h += ',';
      first = false;
      append_json_string(h, k);
      h += ':';
      append_json_string(h, v);
    }
    h += '}';
    first = false;
  }
  for (const TensorWrite* t : p.order) {
    if (!first) h += ',';
    first = false;
    append_json_string(h, t->name);
    h += ":{\"dtype\":";
    append_json_string(h, dtype_name(t->dtype));
    h += ",\"shape\":[";
    for (size_t i = 0; i < t->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(t->shape[i]);
    }
    const uint64_t begin = p.data_bytes;
    if (__builtin_add_overflow(p.data_bytes, static_cast<uint64_t>(t->nbytes), &p.data_bytes))
      fail(source, "total data size overflows 64 bits");
    h += "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(p.data_bytes) + "]}";
  }
  h += '}';
  h.resize((h.size() + kPrefixBytes - 1) / kPrefixBytes * kPrefixBytes, ' ');
  if (h.size() > kMaxHeaderBytes)
    fail(source, "header of ", h.size(), " bytes exceeds the ", kMaxHeaderBytes, "-byte limit");
  return p;
}

void put_u64le(uint8_t* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

/// Writes all of [data, data + n) to fd, across short writes and EINTR.
void write_all(int fd, const void* data, size_t n, std::string_view path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const size_t chunk = std::min<size_t>(n, 1u << 30);  // Linux writes at most ~2 GiB per call
    const ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(path, "write failed: ", std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

/// The atomic-replace protocol: write into a fresh temporary file in the target's directory (same
/// filesystem, so rename is atomic), fsync it, rename it over `path`, then fsync the directory so
/// the rename itself is durable. Readers see the old file or the new one, never a torn one, and a
/// reader that has the old file mapped keeps its (now unlinked) bytes.
void write_atomic(const std::string& path, const std::function<void(int fd, const std::string& tmp)>& fill) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  if (!target.has_filename()) fail(path, "cannot write: the path names a directory");
  const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();

  static std::atomic<uint64_t> counter{0};
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    tmp = (dir / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                  std::to_string(counter.fetch_add(1))))
              .string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && (errno != EEXIST || attempt >= 100))
      fail(path, "cannot create temporary file ", tmp, ": ", std::strerror(errno));
  }
  struct Cleanup {
    int& fd;
    const std::string& tmp;
    bool done = false;
    ~Cleanup() {
      if (done) return;
      if (fd >= 0) ::close(fd);
      ::unlink(tmp.c_str());
    }
  } cleanup{fd, tmp};

  fill(fd, tmp);
  if (::fsync(fd) != 0) fail(path, "fsync of ", tmp, " failed: ", std::strerror(errno));
  const int rc = ::close(fd);
  fd = -1;
  if (rc != 0) fail(path, "close of ", tmp, " failed: ", std::strerror(errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    fail(path, "cannot rename ", tmp, " into place: ", std::strerror(errno));
  cleanup.done = true;

  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) fail(path, "cannot open directory ", dir.string(), " to fsync it: ", std::strerror(errno));
  // Some filesystems cannot fsync a directory (EINVAL); the rename has happened either way.
  const bool synced = ::fsync(dfd) == 0 || errno == EINVAL;
  const int err = errno;
  ::close(dfd);
  if (!synced) fail(path, "fsync of directory ", dir.string(), " failed: ", std::strerror(err));
}

std::string read_small_file(const std::string& path, uint64_t limit, std::string_view what) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) fail(path, "cannot read ", what, ": ", ec.message());
  if (size > limit) fail(path, what, " is ", size, " bytes, more than the ", limit, "-byte limit");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open ", what, ": ", std::strerror(errno));
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (static_cast<uint64_t>(in.gcount()) != size) fail(path, "short read of ", what);
  return text;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// DType

std::string_view dtype_name(DType dtype) { return dtype_row(dtype).name; }

size_t dtype_bits(DType dtype) { return dtype_row(dtype).bits; }

size_t dtype_size(DType dtype) {
  const DTypeRow& row = dtype_row(dtype);
  if (row.bits % 8 != 0)
    FT_FAIL("[safetensors] dtype ", row.name, " has ", row.bits, "-bit elements, no whole-byte size");
  return row.bits / 8;
}

DType parse_dtype(std::string_view name, std::string_view context) {
  for (const DTypeRow& row : kDTypes)
    if (row.name == name) return row.dtype;
  std::string known;
  for (const DTypeRow& row : kDTypes) known += (known.empty() ? "" : " ") + std::string(row.name);
  FT_FAIL(context, ": unknown dtype ", quote_name(name), " (known: ", known, ")");
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n))
      FT_FAIL("[safetensors] tensor ", quote_name(name), ": shape ", shape_str(shape), " has no valid element count");
  return n;
}

// ------------------------------------------------------------------------------------------------
// Reading

SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, std::string_view source) {
  if (size < kPrefixBytes)
    fail(source, "file is ", size, " bytes, too short for the 8-byte header length");
  if (bytes == nullptr) fail(source, "no bytes to parse");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxHeaderBytes) fail(source, "header length ", n, " exceeds the ", kMaxHeaderBytes, "-byte limit");
  if (n > size - kPrefixBytes)
    fail(source, "header length ", n, " runs past the end of the ", size, "-byte file");

  const uint8_t* header = bytes + kPrefixBytes;
  if (const size_t bad = find_invalid_utf8(header, n); bad != std::string_view::npos) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", header[bad]);
    fail(source, "header is not valid UTF-8 (byte ", hex, " at file offset ", kPrefixBytes + bad, ")");
  }
  // JSON text has no byte order mark; nlohmann would skip one, serde (the reference) rejects it.
  if (n >= 3 && header[0] == 0xEF && header[1] == 0xBB && header[2] == 0xBF)
    fail(source, "header starts with a UTF-8 byte order mark, which JSON does not allow");

  StrictJson parser(source, JsonKind::Header, kMaxHeaderDepth);
  const auto* text = reinterpret_cast<const char*>(header);
  const json root = parser.parse(text, text + n);
  if (!root.is_object()) fail(source, "header must be a JSON object, not ", brief(root));

  SafetensorsHeader out;
  out.data_start = kPrefixBytes + n;
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      // serde reads "__metadata__": null as absent (an Option), so null is accepted too.
      if (value.is_null()) continue;
      if (!value.is_object())
        fail(source, "'__metadata__' must be an object of strings, not ", brief(value));
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          fail(source, "'__metadata__' entry ", quote_name(mk), " must be a string, not ", brief(mv));
        out.metadata.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    out.tensors.push_back(parse_entry(key, value, source));
  }

  // Sorted by offsets, the tensors must tile [0, data size) exactly: each starts where the previous
  // ends, and the last ends at the end of the file. Zero-size tensors sort before a non-empty one at
  // the same offset; the name breaks ties so the order is deterministic.
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  const uint64_t data_size = size - out.data_start;
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : out.tensors) {
    const std::string tensor = "tensor " + quote_name(t.name);
    if (t.begin > pos) {
      if (prev)
        fail(source, tensor, ": data_offsets [", t.begin, ", ", t.end, ") leave a gap of ", t.begin - pos,
             " bytes after tensor ", quote_name(prev->name), " (which ends at ", pos, ")");
      fail(source, tensor, ": data_offsets [", t.begin, ", ", t.end, ") leave a gap of ", t.begin,
           " bytes at the start of the data buffer");
    }
    if (t.begin < pos)
      fail(source, tensor, ": data_offsets [", t.begin, ", ", t.end, ") overlap tensor ", quote_name(prev->name),
           " (which ends at ", pos, ")");
    if (t.end > data_size)
      fail(source, tensor, ": data_offsets [", t.begin, ", ", t.end, ") run past the end of the ", data_size,
           "-byte data buffer (file is ", size, " bytes)");
    pos = t.end;
    prev = &t;
  }
  if (pos != data_size)
    fail(source, "tensors cover ", pos, " bytes of the ", data_size, "-byte data buffer: ", data_size - pos,
         " trailing bytes");
  return out;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, "cannot stat: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const auto size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    // Read-only private mapping: tensor bytes are paged in on demand and never copied. (A file
    // truncated by another process while mapped faults with SIGBUS; the atomic writer never does
    // that, it replaces files by rename.)
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) fail(path, "mmap of ", size, " bytes failed: ", std::strerror(errno));
    file->map_ = static_cast<const uint8_t*>(p);
    file->map_size_ = size;
  }
  static constexpr uint8_t kNothing = 0;
  file->header_ = parse_safetensors(file->map_ ? file->map_ : &kNothing, file->map_size_, path);
  for (size_t i = 0; i < file->header_.tensors.size(); ++i) file->index_.emplace(file->header_.tensors[i].name, i);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  fail(path_, "no tensor ", quote_name(name), " (the file has ", header_.tensors.size(), ")");
}

std::span<const uint8_t> SafetensorsFile::bytes(const TensorInfo& t) const {
  if (t.begin > t.end || header_.data_start > map_size_ || t.end > map_size_ - header_.data_start)
    fail(path_, "tensor ", quote_name(t.name), ": data_offsets [", t.begin, ", ", t.end, ") are outside this file");
  if (t.begin == t.end) return {};
  return {map_ + header_.data_start + t.begin, static_cast<size_t>(t.end - t.begin)};
}

// ------------------------------------------------------------------------------------------------
// Writing

std::vector<uint8_t> serialize_safetensors(const std::vector<TensorWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  const Prepared p = prepare(tensors, metadata, "serialize");
  std::vector<uint8_t> out(kPrefixBytes + p.header.size() + p.data_bytes);
  put_u64le(out.data(), p.header.size());
  std::memcpy(out.data() + kPrefixBytes, p.header.data(), p.header.size());
  uint8_t* dst = out.data() + kPrefixBytes + p.header.size();
  for (const TensorWrite* t : p.order) {
    if (t->nbytes) std::memcpy(dst, t->data, t->nbytes);
    dst += t->nbytes;
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const Prepared p = prepare(tensors, metadata, path);
  // Streams header and tensors straight into the file: no second copy of the weights in memory.
  write_atomic(path, [&](int fd, const std::string&) {
    uint8_t prefix[kPrefixBytes];
    put_u64le(prefix, p.header.size());
    write_all(fd, prefix, sizeof prefix, path);
    write_all(fd, p.header.data(), p.header.size(), path);
    for (const TensorWrite* t : p.order) write_all(fd, t->data, t->nbytes, path);
  });
}

void write_file_atomic(const std::string& path, std::span<const uint8_t> bytes) {
  write_atomic(path, [&](int fd, const std::string&) { write_all(fd, bytes.data(), bytes.size(), path); });
}

// ------------------------------------------------------------------------------------------------
// Checkpoints

namespace {

/// "model-00001-of-00002.safetensors": Hugging Face's shard naming.
std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k, n);
  return buf;
}

bool is_shard_name(const std::string& name) {
  size_t k = 0, n = 0;
  int end = 0;
  return std::sscanf(name.c_str(), "model-%5zu-of-%5zu.safetensors%n", &k, &n, &end) == 2 &&
         static_cast<size_t>(end) == name.size() && name == shard_name(k, n);
}

}  // namespace

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  SafetensorsCheckpoint ckpt;
  ckpt.dir_ = dir;
  const std::string index_path = (fs::path(dir) / kIndexName).string();
  const std::string single_path = (fs::path(dir) / kSingleName).string();
  std::error_code ec;

  if (!fs::exists(index_path, ec)) {
    if (!fs::exists(single_path, ec))
      fail(dir, "no ", kSingleName, " or ", kIndexName, " in this directory");
    auto file = SafetensorsFile::open(single_path);
    for (const TensorInfo& t : file->tensors()) ckpt.tensors_.emplace(t.name, Entry{file.get(), &t});
    ckpt.files_.push_back(std::move(file));
    return ckpt;
  }

  // Index: {"metadata": {"total_size": ...}, "weight_map": {"tensor": "shard file", ...}}
  const std::string text = read_small_file(index_path, kMaxIndexBytes, "index");
  StrictJson parser(index_path, JsonKind::Index, kMaxIndexDepth);
  const json index = parser.parse(text.data(), text.data() + text.size());
  if (!index.is_object()) fail(index_path, "index must be a JSON object, not ", brief(index));
  if (index.contains("metadata") && !index["metadata"].is_object())
    fail(index_path, "'metadata' must be an object, not ", brief(index["metadata"]));
  if (!index.contains("weight_map")) fail(index_path, "missing 'weight_map'");
  const json& weight_map = index["weight_map"];
  if (!weight_map.is_object()) fail(index_path, "'weight_map' must be an object, not ", brief(weight_map));

  std::map<std::string, std::vector<std::string>> by_shard;  // shard file → tensors the index puts there
  for (const auto& [tensor, shard] : weight_map.items()) {
    if (!shard.is_string())
      fail(index_path, "tensor ", quote_name(tensor), ": shard must be a file name string, not ", brief(shard));
    const auto& file = shard.get_ref<const std::string&>();
    // Shards are plain file names beside the index; anything else could reach outside `dir`.
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\0') != std::string::npos)
      fail(index_path, "tensor ", quote_name(tensor), ": shard ", quote_name(file), " is not a plain file name");
    by_shard[file].push_back(tensor);
  }

  // Where each tensor really is, over all shards, to tell "in two shards" from "in the wrong one".
  std::map<std::string, std::vector<const SafetensorsFile*>> found;
  for (const auto& [shard, listed] : by_shard) {
    const std::string shard_path = (fs::path(dir) / shard).string();
    if (!fs::exists(shard_path, ec))
      fail(index_path, "shard ", quote_name(shard), " (listed for tensor ", quote_name(listed.front()), ") is missing: ",
           shard_path);
    auto file = SafetensorsFile::open(shard_path);
    for (const TensorInfo& t : file->tensors()) found[t.name].push_back(file.get());
    ckpt.files_.push_back(std::move(file));
  }
  auto file_name = [](const SafetensorsFile* f) { return fs::path(f->path()).filename().string(); };
  for (const auto& [tensor, files] : found) {
    if (files.size() > 1)
      fail(index_path, "tensor ", quote_name(tensor), " is in two shards: ", file_name(files[0]), " and ",
           file_name(files[1]));
    if (!weight_map.contains(tensor))
      fail(index_path, "shard ", file_name(files[0]), " holds tensor ", quote_name(tensor), " that the index does not list");
    const auto& listed = weight_map[tensor].get_ref<const std::string&>();
    if (listed != file_name(files[0]))
      fail(index_path, "tensor ", quote_name(tensor), " is listed in shard ", listed, " but is in ", file_name(files[0]));
  }
  for (const auto& [shard, listed] : by_shard) {
    const SafetensorsFile* file = nullptr;
    for (const auto& f : ckpt.files_)
      if (file_name(f.get()) == shard) file = f.get();
    for (const std::string& tensor : listed) {
      const TensorInfo* info = file->find(tensor);
      if (!info) fail(index_path, "tensor ", quote_name(tensor), " is listed in shard ", shard, " but is not in it");
      ckpt.tensors_.emplace(tensor, Entry{file, info});
    }
  }
  return ckpt;
}

const SafetensorsCheckpoint::Entry& SafetensorsCheckpoint::at(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(dir_, "checkpoint has no tensor ", quote_name(name));
  return it->second;
}

void write_safetensors_checkpoint(const std::string& dir, const std::vector<TensorWrite>& tensors,
                                  uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  namespace fs = std::filesystem;
  // Validate all tensors together first: a duplicate name in two different shards would otherwise
  // pass each shard's own check.
  (void)prepare(tensors, metadata, dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create directory: ", ec.message());

  // Hugging Face's split (huggingface_hub split_state_dict_into_shards_factory), in input order: a
  // tensor larger than the limit gets a shard of its own, appended at once (the shard being filled
  // stays open); a tensor that would tip the current shard over the limit closes it first.
  std::vector<std::vector<const TensorWrite*>> shards;
  std::vector<const TensorWrite*> current;
  uint64_t current_bytes = 0, total_bytes = 0, total_elements = 0;
  for (const TensorWrite& t : tensors) {
    total_bytes += t.nbytes;  // prepare() has checked every size, and their sum, for overflow
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    total_elements += numel;
    if (t.nbytes > max_shard_bytes) {
      shards.push_back({&t});
      continue;
    }
    if (current_bytes + t.nbytes > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(&t);
    current_bytes += t.nbytes;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));

  // Files of an earlier save that this one supersedes: stale shards, and the index or single file.
  // Only names this writer produces are touched; other files in `dir` stay.
  auto remove_stale = [&](const std::set<std::string>& keep) {
    std::vector<fs::path> stale;  // collected first: removing while iterating a directory is unspecified
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (!keep.count(name) && (is_shard_name(name) || name == kSingleName || name == kIndexName))
        stale.push_back(entry.path());
    }
    for (const fs::path& p : stale) fs::remove(p, ec);
  };

  auto shard_tensors = [](const std::vector<const TensorWrite*>& shard) {
    std::vector<TensorWrite> out;
    for (const TensorWrite* t : shard) out.push_back(*t);
    return out;
  };
  if (shards.size() == 1) {
    write_safetensors((fs::path(dir) / kSingleName).string(), shard_tensors(shards[0]), metadata);
    remove_stale({std::string(kSingleName)});
    return;
  }

  json weight_map = json::object();
  std::set<std::string> written;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string name = shard_name(k + 1, shards.size());
    write_safetensors((fs::path(dir) / name).string(), shard_tensors(shards[k]), metadata);
    for (const TensorWrite* t : shards[k]) weight_map[t->name] = name;
    written.insert(name);
  }
  // Written last, so a reader never finds an index whose shards are not all in place. The text is
  // what transformers 5 writes: json.dumps(index, indent=2, sort_keys=True) + "\n", with
  // metadata.total_size (bytes) and metadata.total_parameters (elements; transformers counts the
  // model's parameters, which is the same number when every tensor written is a parameter).
  const json index = {{"metadata", {{"total_parameters", total_elements}, {"total_size", total_bytes}}},
                      {"weight_map", weight_map}};
  const std::string text = index.dump(2, ' ', /*ensure_ascii=*/true) + "\n";
  write_file_atomic((fs::path(dir) / kIndexName).string(),
                    std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  written.insert(std::string(kIndexName));
  remove_stale(written);
}

}  // namespace ft::io
