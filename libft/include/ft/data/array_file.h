#pragma once
// Named float32 arrays and string attributes in one HDF5 file: what EWC keeps between runs (the
// Fisher information and the anchor weights, ft/train/ewc.h), readable with h5py or h5dump.
//
// Layout: root attributes "format" = "libft.arrays", "kind" (what the file holds, e.g. "ewc") and
// the caller's string attributes; one dataset per array under /arrays/<name>, float32, shaped,
// chunked, deflate level 1 and a Fletcher32 checksum (a flipped byte is an error naming the array).
// Files are written to a temporary name, fsynced and renamed: a crash leaves the old file or none.
// Arrays pass by pointer both ways, so a model-sized file is never copied in memory.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace ft::data {

struct ArrayView {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;  ///< product(shape) floats
};

struct ArrayFileInfo {
  std::string kind;
  std::map<std::string, std::string> attrs;
  std::vector<std::pair<std::string, std::vector<int64_t>>> arrays;  ///< names and shapes, in file order
};

void write_array_file(const std::string& path, const std::string& kind, const std::map<std::string, std::string>& attrs,
                      const std::vector<ArrayView>& arrays);

/// Reads the attributes and the arrays' names and shapes. Throws ft::Error naming the file for a
/// missing or unreadable file, another format, or a kind other than `kind` (when not empty).
ArrayFileInfo inspect_array_file(const std::string& path, const std::string& kind = "");

/// Reads every array into the memory `destination(name, shape)` returns (product(shape) floats), or
/// skips it where that returns null. Errors name the file and the array (checksum, size).
ArrayFileInfo read_array_file(const std::string& path, const std::string& kind,
                              const std::function<float*(const std::string&, const std::vector<int64_t>&)>& destination);

}  // namespace ft::data
