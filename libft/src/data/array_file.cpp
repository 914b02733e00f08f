#include "ft/data/array_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "ft/util/error.h"
#include "h5_util.h"

namespace ft::data {
namespace {

namespace fs = std::filesystem;
constexpr const char* kFormat = "libft.arrays";

template <typename... Args>
[[noreturn]] void fail(const std::string& path, Args&&... args) {
  FT_FAIL("[arrays] ", path, ": ", std::forward<Args>(args)...);
}

H5Id checked(hid_t id, H5Id::Closer close, const std::string& path, const std::string& what) {
  if (id < 0) fail(path, what, ": ", h5_error_stack());
  return H5Id(id, close);
}

void check(herr_t rc, const std::string& path, const std::string& what) {
  if (rc < 0) fail(path, what, ": ", h5_error_stack());
}

void write_string(hid_t obj, const std::string& name, const std::string& value, const std::string& path) {
  H5Id type = checked(H5Tcopy(H5T_C_S1), H5Tclose, path, "H5Tcopy");
  check(H5Tset_size(type.get(), std::max<size_t>(value.size(), 1)), path, "H5Tset_size");
  check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), path, "H5Tset_strpad");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), path, "H5Tset_cset");
  H5Id space = checked(H5Screate(H5S_SCALAR), H5Sclose, path, "H5Screate");
  H5Id attr = checked(H5Acreate2(obj, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                      path, "creating attribute " + name);
  std::string buf = value;
  buf.resize(std::max<size_t>(value.size(), 1), '\0');
  check(H5Awrite(attr.get(), type.get(), buf.data()), path, "writing attribute " + name);
}

std::string read_string(hid_t attr, const std::string& name, const std::string& path) {
  H5Id type = checked(H5Aget_type(attr), H5Tclose, path, "H5Aget_type");
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) != 0)
    fail(path, "attribute '", name, "' is not a fixed-length string");
  const size_t size = H5Tget_size(type.get());
  if (size == 0 || size > (1u << 20)) fail(path, "attribute '", name, "' has an implausible size ", size);
  std::string value(size, '\0');
  check(H5Aread(attr, type.get(), value.data()), path, "reading attribute " + name);
  value.resize(std::strlen(value.c_str()));
  return value;
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) fail(path, "cannot open for fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail(path, "fsync failed: ", std::strerror(errno));
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Root attributes and the arrays' names and shapes of an open file.
ArrayFileInfo read_info(hid_t file, const std::string& path, const std::string& kind) {
  ArrayFileInfo info;
  std::map<std::string, std::string> all;
  // The format first: another HDF5 file (a token store, say) is named as such before anything else.
  {
    const htri_t exists = H5Aexists(file, "format");
    std::string format;
    if (exists > 0) {
      H5Id attr = checked(H5Aopen(file, "format", H5P_DEFAULT), H5Aclose, path, "opening attribute format");
      H5Id type = checked(H5Aget_type(attr.get()), H5Tclose, path, "H5Aget_type");
      if (H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0)
        format = read_string(attr.get(), "format", path);
    }
    if (format != kFormat) fail(path, "not a libft array file (format '", format, "', expected '", kFormat, "')");
  }
  H5O_info_t oinfo;
#if H5_VERSION_GE(1, 12, 0)
  check(H5Oget_info3(file, &oinfo, H5O_INFO_NUM_ATTRS), path, "H5Oget_info");
#else
  check(H5Oget_info2(file, &oinfo, H5O_INFO_NUM_ATTRS), path, "H5Oget_info");
#endif
  for (hsize_t i = 0; i < oinfo.num_attrs; ++i) {
    H5Id attr = checked(H5Aopen_by_idx(file, ".", H5_INDEX_NAME, H5_ITER_INC, i, H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                        path, "opening a root attribute");
    char name[256] = "";
    if (H5Aget_name(attr.get(), sizeof name, name) < 0) fail(path, "reading an attribute name: ", h5_error_stack());
    all[name] = read_string(attr.get(), name, path);
  }
  info.kind = all["kind"];
  if (!kind.empty() && info.kind != kind) fail(path, "holds '", info.kind, "' arrays, expected '", kind, "'");
  all.erase("format");
  all.erase("kind");
  info.attrs = std::move(all);
  if (H5Lexists(file, "arrays", H5P_DEFAULT) <= 0) fail(path, "no /arrays group");
  H5Id group = checked(H5Gopen2(file, "arrays", H5P_DEFAULT), H5Gclose, path, "opening /arrays");
  H5G_info_t ginfo;
  check(H5Gget_info(group.get(), &ginfo), path, "H5Gget_info");
  for (hsize_t i = 0; i < ginfo.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(group.get(), ".", H5_INDEX_CRT_ORDER, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len < 0) fail(path, "reading an array name: ", h5_error_stack());
    std::string name(static_cast<size_t>(len) + 1, '\0');
    H5Lget_name_by_idx(group.get(), ".", H5_INDEX_CRT_ORDER, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
    name.resize(static_cast<size_t>(len));
    H5Id dset = checked(H5Dopen2(group.get(), name.c_str(), H5P_DEFAULT), H5Dclose, path, "opening array '" + name + "'");
    H5Id space = checked(H5Dget_space(dset.get()), H5Sclose, path, "H5Dget_space");
    const int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0 || rank > 8) fail(path, "array '", name, "' has an implausible rank ", rank);
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    H5Id type = checked(H5Dget_type(dset.get()), H5Tclose, path, "H5Dget_type");
    if (H5Tget_class(type.get()) != H5T_FLOAT || H5Tget_size(type.get()) != 4) fail(path, "array '", name, "' is not float32");
    info.arrays.emplace_back(name, std::vector<int64_t>(dims.begin(), dims.end()));
  }
  return info;
}

// The file access settings of token stores (sec2, SEMI close degree, no file locking): HDF5 refuses
// to open one file twice with different settings, and locks fail on some network filesystems.
H5Id file_access(const std::string& path) {
  H5Id fapl = checked(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, path, "H5Pcreate");
  check(H5Pset_fapl_sec2(fapl.get()), path, "H5Pset_fapl_sec2");
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_SEMI), path, "H5Pset_fclose_degree");
#if H5_VERSION_GE(1, 10, 7)
  check(H5Pset_file_locking(fapl.get(), false, true), path, "H5Pset_file_locking");
#endif
  return fapl;
}

H5Id open_file(const std::string& path) {
  if (!fs::exists(path)) fail(path, "no such file");
  H5Id fapl = file_access(path);
  return checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose, path, "cannot open as HDF5");
}

}  // namespace

void write_array_file(const std::string& path, const std::string& kind, const std::map<std::string, std::string>& attrs,
                      const std::vector<ArrayView>& arrays) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    H5Lock lock;
    H5Id fcpl = checked(H5Pcreate(H5P_FILE_CREATE), H5Pclose, tmp, "H5Pcreate");
    H5Id fapl = file_access(tmp);
    H5Id file = checked(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, fcpl.get(), fapl.get()), H5Fclose, tmp, "creating the file");
    write_string(file.get(), "format", kFormat, tmp);
    write_string(file.get(), "kind", kind, tmp);
    for (const auto& [k, v] : attrs) {
      if (k == "format" || k == "kind") fail(tmp, "attribute name '", k, "' is reserved");
      write_string(file.get(), k, v, tmp);
    }
    H5Id gcpl = checked(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, tmp, "H5Pcreate");
    check(H5Pset_link_creation_order(gcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED), tmp, "creation order");
    H5Id group = checked(H5Gcreate2(file.get(), "arrays", H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose, tmp,
                         "creating /arrays");
    for (const ArrayView& a : arrays) {
      if (a.name.empty() || a.name.find('/') != std::string::npos) fail(tmp, "bad array name '", a.name, "'");
      std::vector<hsize_t> dims(a.shape.begin(), a.shape.end());
      H5Id space = checked(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose, tmp,
                           "H5Screate_simple");
      H5Id dcpl = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, tmp, "H5Pcreate");
      if (numel(a.shape) > 0) {
        // Chunks of about a million elements along the first dimension.
        std::vector<hsize_t> chunk = dims;
        const int64_t row = dims.empty() ? 1 : numel(a.shape) / std::max<int64_t>(a.shape[0], 1);
        if (!chunk.empty()) chunk[0] = std::clamp<hsize_t>(static_cast<hsize_t>((1 << 20) / std::max<int64_t>(row, 1)), 1, dims[0]);
        if (!chunk.empty()) {
          check(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()), tmp, "H5Pset_chunk");
          check(H5Pset_deflate(dcpl.get(), 1), tmp, "H5Pset_deflate");
          check(H5Pset_fletcher32(dcpl.get()), tmp, "H5Pset_fletcher32");
        }
      }
      check(H5Pset_obj_track_times(dcpl.get(), 0), tmp, "H5Pset_obj_track_times");
      H5Id dset = checked(H5Dcreate2(group.get(), a.name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, dcpl.get(),
                                     H5P_DEFAULT),
                          H5Dclose, tmp, "creating array '" + a.name + "'");
      if (numel(a.shape) > 0)
        check(H5Dwrite(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.data), tmp, "writing array '" + a.name + "'");
    }
    group.reset();
    if (file.close() < 0) fail(tmp, "closing the file: ", h5_error_stack());
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(path, "cannot rename ", tmp, " into place: ", ec.message());
  const fs::path parent = fs::absolute(path).parent_path();
  fsync_path(parent.string(), true);
}

ArrayFileInfo inspect_array_file(const std::string& path, const std::string& kind) {
  H5Lock lock;
  H5Id file = open_file(path);
  return read_info(file.get(), path, kind);
}

ArrayFileInfo read_array_file(const std::string& path, const std::string& kind,
                              const std::function<float*(const std::string&, const std::vector<int64_t>&)>& destination) {
  H5Lock lock;
  H5Id file = open_file(path);
  ArrayFileInfo info = read_info(file.get(), path, kind);
  H5Id group = checked(H5Gopen2(file.get(), "arrays", H5P_DEFAULT), H5Gclose, path, "opening /arrays");
  for (const auto& [name, shape] : info.arrays) {
    float* out = destination(name, shape);
    if (out == nullptr || numel(shape) == 0) continue;
    H5Id dset = checked(H5Dopen2(group.get(), name.c_str(), H5P_DEFAULT), H5Dclose, path, "opening array '" + name + "'");
    if (H5Dread(dset.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
      fail(path, "array '", name, "' cannot be read (damaged?): ", h5_error_stack());
  }
  return info;
}

}  // namespace ft::data
