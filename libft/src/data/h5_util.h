#pragma once
// HDF5 plumbing shared by libft's HDF5 files (token stores, array files), internal to ft_data: one
// process-wide mutex around every HDF5 call sequence (a serial HDF5 build need not be thread-safe),
// with HDF5's automatic error printing off; the error stack as one line; an owning identifier.
#include <hdf5.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace ft::data {

inline std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

/// Held around every HDF5 call sequence. Also switches HDF5's automatic error printing off for this
/// thread (the error stack is per thread in thread-safe builds), once.
class H5Lock {
 public:
  H5Lock() : lock_(hdf5_mutex()) {
    thread_local bool silenced = false;
    if (!silenced) {
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      silenced = true;
    }
  }

 private:
  std::lock_guard<std::mutex> lock_;
};

/// HDF5's error stack as one line, then cleared. The stack runs from the API call down to the
/// cause; the middle frames only repeat "can't read data", so the first and the last are kept:
/// "H5Dread: can't read data ... H5Z__filter_fletcher32: data error detected by Fletcher32 checksum".
inline std::string h5_error_stack() {
  std::vector<std::string> frames;
  auto walk = [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
    auto& out = *static_cast<std::vector<std::string>*>(data);
    std::string s = e->func_name ? e->func_name : "?";
    s += ": ";
    s += e->desc ? e->desc : "";
    char minor[160] = "";
    if (H5Eget_msg(e->min_num, nullptr, minor, sizeof minor) > 0) {
      s += " (";
      s += minor;
      s += ")";
    }
    out.push_back(std::move(s));
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk, &frames);
  H5Eclear2(H5E_DEFAULT);
  if (frames.empty()) return "no HDF5 error details";
  if (frames.size() == 1) return frames[0];
  return frames.front() + " ... " + frames.back();
}

/// Owns one HDF5 identifier (file, dataset, dataspace, property list, type, attribute).
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer close) : id_(id), close_(close) {}
  H5Id(H5Id&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), close_(o.close_) {}
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      close_ = o.close_;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }

  hid_t get() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }
  /// Closes, ignoring failure (destructors, error paths).
  void reset() {
    if (id_ >= 0 && close_) {
      close_(id_);
      H5Eclear2(H5E_DEFAULT);
    }
    id_ = H5I_INVALID_HID;
  }
  /// Closes and reports failure (the writer's final close must not fail silently).
  herr_t close() {
    const hid_t id = std::exchange(id_, H5I_INVALID_HID);
    return id >= 0 && close_ ? close_(id) : 0;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

}  // namespace ft::data
