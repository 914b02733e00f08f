#pragma once
// safetensors reader and writer, free of LibTorch so that it can be built alone under
// AddressSanitizer/UBSan and libFuzzer. ft/io/tensor_io.h converts to and from torch tensors.
//
// Format: u64le N | N bytes of UTF-8 JSON object (may be space-padded) | data buffer.
// Every rule of the reference implementation is enforced on read (see parse_safetensors_header).
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ft/util/error.h"

namespace ft::io {

/// Every dtype the reference implementation (huggingface/safetensors 0.8) accepts. The numeric order
/// here is libft's own; the writer orders tensors by the reference's alignment rank (see
/// serialize_safetensors), not by these values. F4 and F6_* are sub-byte types (4 and 6 bits per
/// element): a tensor of them must hold a whole number of bytes; C64 is two F32 (real, imaginary).
enum class DType : uint8_t {
  BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2,
  F4, F6_E2M3, F6_E3M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, C64,
};

/// "F32", "BF16", ...: the names the format uses.
std::string_view dtype_name(DType dtype);
/// Size of one element in bits (4 for F4, 6 for F6_*, otherwise 8 × dtype_size).
size_t dtype_bits(DType dtype);
/// Size of one element in bytes. Throws ft::Error for the sub-byte types F4 and F6_*.
size_t dtype_size(DType dtype);
/// Parses a format dtype name; throws ft::Error naming `context` for an unknown one.
DType parse_dtype(std::string_view name, std::string_view context);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< byte offset of the first byte, relative to the start of the data buffer
  uint64_t end = 0;    ///< one past the last byte
  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;             ///< in the order of their data offsets
  std::map<std::string, std::string> metadata; ///< the optional "__metadata__" object (string → string)
  uint64_t data_start = 0;                     ///< 8 + N: where the data buffer starts in the file
};

/// Validates and parses a whole safetensors file image of `size` bytes (header and data).
/// Enforces: N ≤ 100,000,000 and 8 + N ≤ size; the header is UTF-8 and one JSON object; no duplicate
/// keys anywhere; known dtypes; non-negative integer shapes; numel × dtype size computed with
/// overflow checks and equal to end − begin; offsets sorted tile [0, data size) with no gaps,
/// overlaps or trailing bytes; "__metadata__" maps strings to strings; no unknown fields.
/// Errors throw ft::Error naming `source` (usually the file path) and the tensor.
SafetensorsHeader parse_safetensors(const uint8_t* bytes, size_t size, std::string_view source);

/// A memory-mapped, validated safetensors file. Tensor bytes stay in the mapping (zero copy).
class SafetensorsFile {
 public:
  /// Opens, maps and validates; throws ft::Error naming the path on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  /// nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
  /// Throws ft::Error naming the file when absent.
  const TensorInfo& at(std::string_view name) const;
  std::span<const uint8_t> bytes(const TensorInfo& t) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;
};

/// A tensor to write: the bytes are little-endian, row-major, `nbytes` = numel × dtype size.
struct TensorWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

/// Serialises to bytes exactly as Python's safetensors does (tensors ordered by dtype alignment then
/// name, header JSON padded with spaces to a multiple of 8). Validates names, shapes and sizes.
/// An empty `metadata` writes no "__metadata__" entry (Python's metadata=None). Metadata keys are
/// written in sorted order; Python writes them in hash order, which varies between processes, so
/// the bytes match Python's whenever there is at most one metadata key.
std::vector<uint8_t> serialize_safetensors(const std::vector<TensorWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata = {});

/// Writes atomically: a temporary file beside `path`, fsync, rename, fsync of the directory.
void write_safetensors(const std::string& path, const std::vector<TensorWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, directory fsync).
void write_file_atomic(const std::string& path, std::span<const uint8_t> bytes);

/// A checkpoint directory's weights: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json` ({"metadata": {...}, "weight_map": {tensor: file}}).
/// Validation: the index is valid JSON without duplicate keys; every shard exists and is valid; every
/// tensor in the weight map is in its shard; no tensor appears in two shards; no shard holds a tensor
/// that the index does not list.
class SafetensorsCheckpoint {
 public:
  /// `dir` holds model.safetensors or model.safetensors.index.json (the index wins if both exist).
  static SafetensorsCheckpoint open(const std::string& dir);
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  const std::map<std::string, Entry>& tensors() const { return tensors_; }
  /// Throws ft::Error naming the checkpoint when absent.
  const Entry& at(const std::string& name) const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
};

/// Writes `tensors` as model.safetensors, or — when their total exceeds `max_shard_bytes` — as
/// model-0000K-of-0000N.safetensors shards plus model.safetensors.index.json, the way Hugging Face
/// save_pretrained does. Every file is written atomically; the index last.
void write_safetensors_checkpoint(const std::string& dir, const std::vector<TensorWrite>& tensors,
                                  uint64_t max_shard_bytes = 5ull << 30,
                                  const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace ft::io
