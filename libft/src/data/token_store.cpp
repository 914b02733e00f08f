// HDF5 token store: writer, reader, checksum sidecar. The layout and the write protocol are described
// in ft/data/token_store.h. HDF5 is used through its C API and the small RAII wrappers below; all
// HDF5 calls run under one process-wide mutex (a serial HDF5 build need not be thread-safe) with
// HDF5's automatic error printing off: failures become ft::Error carrying HDF5's error stack.
#include "ft/data/token_store.h"

#include <fcntl.h>
#include <hdf5.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <utility>

#include "ft/util/error.h"
#include "h5_util.h"

namespace ft::data {
namespace {

namespace fs = std::filesystem;

constexpr const char* kFormatName = "libft.token_store";
constexpr const char* kCreatedBy = "libft 0.1";
constexpr int64_t kOffsetsChunk = 8192;       // doc_offsets elements per chunk (64 KiB)
constexpr int64_t kOffsetsFlush = 8 * kOffsetsChunk;
constexpr size_t kMaxSidecarBytes = 4096;
constexpr size_t kMaxStringAttrBytes = 1 << 20;

// ------------------------------------------------------------------------------------------------
// HDF5 plumbing

template <typename... Args>
[[noreturn]] void fail(const std::string& path, Args&&... args) {
  FT_FAIL("[token_store] ", path, ": ", std::forward<Args>(args)...);
}

template <typename... Args>
[[noreturn]] void h5_fail(const std::string& path, Args&&... args) {
  const std::string stack = h5_error_stack();
  fail(path, std::forward<Args>(args)..., ": ", stack);
}

H5Id checked(hid_t id, H5Id::Closer close, const std::string& path, std::string_view what) {
  if (id < 0) h5_fail(path, what);
  return H5Id(id, close);
}

void check(herr_t rc, const std::string& path, std::string_view what) {
  if (rc < 0) h5_fail(path, what);
}

H5Id scalar_space(const std::string& path) { return checked(H5Screate(H5S_SCALAR), H5Sclose, path, "H5Screate"); }

H5Id simple_space(hsize_t n, const std::string& path) {
  return checked(H5Screate_simple(1, &n, nullptr), H5Sclose, path, "H5Screate_simple");
}

/// Fixed-length UTF-8 string type of `size` bytes (at least 1: HDF5 refuses 0).
H5Id string_type(size_t size, const std::string& path) {
  H5Id t = checked(H5Tcopy(H5T_C_S1), H5Tclose, path, "H5Tcopy");
  check(H5Tset_size(t.get(), std::max<size_t>(size, 1)), path, "H5Tset_size");
  check(H5Tset_strpad(t.get(), H5T_STR_NULLPAD), path, "H5Tset_strpad");
  check(H5Tset_cset(t.get(), H5T_CSET_UTF8), path, "H5Tset_cset");
  return t;
}

void write_i64_attr(hid_t obj, const char* name, int64_t value, const std::string& path) {
  H5Id space = scalar_space(path);
  H5Id attr = checked(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose, path,
                      std::string("creating attribute ") + name);
  check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), path, std::string("writing attribute ") + name);
}

void write_str_attr(hid_t obj, const char* name, const std::string& value, const std::string& path) {
  H5Id type = string_type(value.size(), path);
  H5Id space = scalar_space(path);
  H5Id attr = checked(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose, path,
                      std::string("creating attribute ") + name);
  std::string buf = value;
  buf.resize(std::max<size_t>(value.size(), 1), '\0');
  check(H5Awrite(attr.get(), type.get(), buf.data()), path, std::string("writing attribute ") + name);
}

H5Id open_attr(hid_t obj, const char* name, const std::string& path) {
  const htri_t exists = H5Aexists(obj, name);
  if (exists < 0) h5_fail(path, "looking up attribute '", name, "'");
  if (exists == 0) fail(path, "attribute '", name, "' is missing: not a libft token store");
  H5Id attr = checked(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, path, std::string("opening attribute ") + name);
  H5Id space = checked(H5Aget_space(attr.get()), H5Sclose, path, "H5Aget_space");
  if (H5Sget_simple_extent_type(space.get()) != H5S_SCALAR) fail(path, "attribute '", name, "' is not a scalar");
  return attr;
}

int64_t read_i64_attr(hid_t obj, const char* name, const std::string& path) {
  H5Id attr = open_attr(obj, name, path);
  H5Id type = checked(H5Aget_type(attr.get()), H5Tclose, path, "H5Aget_type");
  if (H5Tget_class(type.get()) != H5T_INTEGER) fail(path, "attribute '", name, "' is not an integer");
  int64_t value = 0;
  check(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), path, std::string("reading attribute ") + name);
  return value;
}

std::string read_str_attr(hid_t obj, const char* name, const std::string& path) {
  H5Id attr = open_attr(obj, name, path);
  H5Id type = checked(H5Aget_type(attr.get()), H5Tclose, path, "H5Aget_type");
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) != 0)
    fail(path, "attribute '", name, "' is not a fixed-length string");
  const size_t size = H5Tget_size(type.get());
  if (size == 0 || size > kMaxStringAttrBytes) fail(path, "attribute '", name, "' has an implausible size ", size);
  std::string value(size, '\0');
  check(H5Aread(attr.get(), type.get(), value.data()), path, std::string("reading attribute ") + name);
  value.resize(std::strlen(value.c_str()));  // NULLPAD / NULLTERM padding
  return value;
}

/// Extendible 1-D chunked dataset, filtered shuffle (if asked) → deflate → Fletcher32. The order is
/// the pipeline order on write (reversed on read), so the checksum covers the compressed bytes.
H5Id create_array(hid_t file, const char* name, hid_t file_type, int64_t chunk, bool shuffle, int level,
                  const std::string& path) {
  const hsize_t dims = 0, maxdims = H5S_UNLIMITED, chunk_dims = static_cast<hsize_t>(chunk);
  H5Id space = checked(H5Screate_simple(1, &dims, &maxdims), H5Sclose, path, "H5Screate_simple");
  H5Id dcpl = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, path, "H5Pcreate");
  check(H5Pset_chunk(dcpl.get(), 1, &chunk_dims), path, "H5Pset_chunk");
  if (shuffle) check(H5Pset_shuffle(dcpl.get()), path, "H5Pset_shuffle");
  check(H5Pset_deflate(dcpl.get(), static_cast<unsigned>(level)), path, "H5Pset_deflate");
  check(H5Pset_fletcher32(dcpl.get()), path, "H5Pset_fletcher32");
  // Every chunk is written in full before the file closes: no fill values needed.
  check(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), path, "H5Pset_fill_time");
  // No object timestamps: the same input then gives the same bytes (and the same SHA-256).
  check(H5Pset_obj_track_times(dcpl.get(), 0), path, "H5Pset_obj_track_times");
  return checked(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose,
                 path, std::string("creating dataset ") + name);
}

/// Appends `n` elements to a 1-D extendible dataset that already holds `have`.
void append_array(hid_t dset, hid_t mem_type, const void* data, hsize_t have, hsize_t n, const char* name,
                  const std::string& path) {
  if (n == 0) return;
  const hsize_t size = have + n;
  check(H5Dset_extent(dset, &size), path, std::string("extending dataset ") + name);
  H5Id fspace = checked(H5Dget_space(dset), H5Sclose, path, "H5Dget_space");
  check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &have, nullptr, &n, nullptr), path, "H5Sselect_hyperslab");
  H5Id mspace = simple_space(n, path);
  check(H5Dwrite(dset, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, data), path,
        std::string("writing dataset ") + name);
}

/// File access properties shared by writer and reader: sec2 driver, no file locking (stores are
/// immutable once committed and locks fail on some network filesystems), SEMI close degree so that
/// H5Fclose fails loudly instead of deferring the close while an object is still open.
H5Id file_access(const std::string& path) {
  H5Id fapl = checked(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, path, "H5Pcreate");
  check(H5Pset_fapl_sec2(fapl.get()), path, "H5Pset_fapl_sec2");  // the reader fstat()s its descriptor
  check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_SEMI), path, "H5Pset_fclose_degree");
#if H5_VERSION_GE(1, 10, 7)
  check(H5Pset_file_locking(fapl.get(), false, true), path, "H5Pset_file_locking");
#endif
  return fapl;
}

// ------------------------------------------------------------------------------------------------
// Files: checksums, fsync, temporary names

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string sha256_fd(int fd, const std::string& path) {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail(path, "cannot initialise SHA-256");
  std::vector<unsigned char> buf(size_t{4} << 20);
  off_t offset = 0;
  for (;;) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path, "read failed while hashing: ", std::strerror(errno));
    }
    if (n == 0) break;
    if (EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n)) != 1) fail(path, "SHA-256 update failed");
    offset += n;
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1 || len != 32) fail(path, "SHA-256 final failed");
  static const char* hex = "0123456789abcdef";
  std::string out(64, '0');
  for (unsigned i = 0; i < 32; ++i) {
    out[2 * i] = hex[md[i] >> 4];
    out[2 * i + 1] = hex[md[i] & 15];
  }
  return out;
}

void fsync_file(const std::string& file, const std::string& path) {
  Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) fail(path, "cannot open ", file, " to fsync it: ", std::strerror(errno));
  if (::fsync(fd.fd) != 0) fail(path, "fsync of ", file, " failed: ", std::strerror(errno));
}

void fsync_dir(const fs::path& dir, const std::string& path) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.fd < 0) fail(path, "cannot open directory ", dir.string(), " to fsync it: ", std::strerror(errno));
  // Some filesystems cannot fsync a directory (EINVAL); the rename has happened either way.
  if (::fsync(fd.fd) != 0 && errno != EINVAL)
    fail(path, "fsync of directory ", dir.string(), " failed: ", std::strerror(errno));
}

fs::path dir_of(const std::string& path) {
  const fs::path p(path);
  return p.parent_path().empty() ? fs::path(".") : p.parent_path();
}

std::string host_name() {
  char buf[256] = "";
  if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "host";
  std::string h(buf);
  for (char& c : h)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') c = '_';
  return h;
}

/// Temporary names: ".<name>.tmp.<host>.<pid>.<n>" and ".<name>.sha256.tmp.<host>.<pid>.<n>".
/// Dot-prefixed (hidden, never matched by a store glob), in the target's directory (same filesystem,
/// so rename is atomic), and carrying host and pid so that stale ones can be told from live ones.
std::string temp_prefix(const std::string& path, bool sidecar) {
  const std::string name = fs::path(path).filename().string();
  return "." + name + (sidecar ? ".sha256" : "") + ".tmp.";
}

struct TempOwner {
  std::string host;
  long pid = -1;
};

/// Parses "<host>.<pid>.<n>" (the part after the prefix); host may contain dots.
std::optional<TempOwner> parse_temp_owner(const std::string& rest) {
  const size_t last = rest.rfind('.');
  if (last == std::string::npos || last == 0) return std::nullopt;
  const size_t mid = rest.rfind('.', last - 1);
  if (mid == std::string::npos) return std::nullopt;
  const std::string pid = rest.substr(mid + 1, last - mid - 1);
  const auto digit = [](char c) { return c >= '0' && c <= '9'; };
  if (pid.empty() || pid.size() > 9 || !std::all_of(pid.begin(), pid.end(), digit)) return std::nullopt;
  return TempOwner{rest.substr(0, mid), std::stol(pid)};
}

bool process_alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

std::string temps_note(const std::string& path) {
  const auto temps = token_store_temp_files(path);
  if (temps.empty()) return "";
  std::string s = " (temporary files of an unfinished write are present: ";
  for (size_t i = 0; i < temps.size(); ++i) s += (i ? ", " : "") + temps[i];
  return s + "; their writer crashed or is still running: rerun the data preparation)";
}

std::atomic<uint64_t> g_temp_counter{0};

// ------------------------------------------------------------------------------------------------
// Verification (before HDF5 sees a byte of the file)

struct Verified {
  std::string sha256;
  struct stat st {};
};

/// Reads "<64 hex>  <name>\n" (sha256sum's format; " *name" for binary mode is accepted too).
/// The name is informational: only the digest is compared, so a renamed pair still opens.
std::string read_sidecar(const std::string& sidecar, const std::string& path) {
  Fd fd(::open(sidecar.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) {
    if (errno == ENOENT)
      fail(path, "the checksum sidecar ", sidecar,
           " is missing: libft only opens token stores that its writer finished and checksummed",
           temps_note(path));
    fail(path, "cannot open the checksum sidecar ", sidecar, ": ", std::strerror(errno));
  }
  std::string text(kMaxSidecarBytes + 1, '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = ::read(fd.fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path, "cannot read ", sidecar, ": ", std::strerror(errno));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  text.resize(got);
  const bool hex64 = text.size() >= 66 && std::all_of(text.begin(), text.begin() + 64, [](char c) {
                       return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                     });
  if (got > kMaxSidecarBytes || !hex64 || text[64] != ' ' || (text[65] != ' ' && text[65] != '*'))
    fail(path, "the checksum sidecar ", sidecar, " is malformed (expected \"<64 lowercase hex>  <file name>\")");
  return text.substr(0, 64);
}

Verified verify(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "no such token store", temps_note(path));
  const std::string sidecar = token_store_sidecar_path(path);
  const std::string expected = read_sidecar(sidecar, path);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) fail(path, "cannot open: ", std::strerror(errno));
  Verified v;
  if (::fstat(fd.fd, &v.st) != 0) fail(path, "cannot stat: ", std::strerror(errno));
  if (!S_ISREG(v.st.st_mode)) fail(path, "not a regular file");
  ::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  v.sha256 = sha256_fd(fd.fd, path);
  if (v.sha256 != expected)
    fail(path, "checksum mismatch: the file's SHA-256 is ", v.sha256, " but ", sidecar, " records ", expected,
         ": the store is damaged or truncated, or its write stopped between its two renames; rewrite it",
         temps_note(path));
  return v;
}

hsize_t extent_1d(hid_t dset, const char* name, const std::string& path) {
  H5Id space = checked(H5Dget_space(dset), H5Sclose, path, "H5Dget_space");
  if (H5Sget_simple_extent_ndims(space.get()) != 1) fail(path, "dataset '", name, "' is not 1-D");
  hsize_t n = 0;
  check(H5Sget_simple_extent_dims(space.get(), &n, nullptr), path, "H5Sget_simple_extent_dims");
  return n;
}

void check_int_type(hid_t dset, const char* name, size_t size, H5T_sign_t sign, const std::string& path) {
  H5Id type = checked(H5Dget_type(dset), H5Tclose, path, "H5Dget_type");
  if (H5Tget_class(type.get()) != H5T_INTEGER || H5Tget_size(type.get()) != size || H5Tget_sign(type.get()) != sign)
    fail(path, "dataset '", name, "' is not a ", size * 8, "-bit ", sign == H5T_SGN_NONE ? "unsigned" : "signed",
         " integer array");
}

uint64_t next_prime(uint64_t n) {
  auto prime = [](uint64_t x) {
    if (x < 2) return false;
    for (uint64_t d = 2; d * d <= x; ++d)
      if (x % d == 0) return false;
    return true;
  };
  while (!prime(n)) ++n;
  return n;
}

/// Dataset access properties with a chunk cache of `bytes`. HDF5 hashes chunks into `nslots` slots
/// (a collision evicts), so it wants a prime about 100× the number of chunks that fit.
H5Id chunk_cache_dapl(size_t bytes, size_t chunk_bytes, const std::string& path) {
  H5Id dapl = checked(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose, path, "H5Pcreate");
  const uint64_t fit = std::max<uint64_t>(1, bytes / std::max<size_t>(chunk_bytes, 1));
  const uint64_t slots = next_prime(std::clamp<uint64_t>(100 * fit, 521, 1000003));
  // w0 = 0.75 (HDF5's default): chunks read in full (the middle of a long document) go before
  // partly read ones, which neighbouring short documents are likely to need.
  check(H5Pset_chunk_cache(dapl.get(), slots, bytes, 0.75), path, "H5Pset_chunk_cache");
  return dapl;
}

std::vector<std::string> read_string_list(hid_t file, const char* name, const std::string& path) {
  H5Id dset = checked(H5Dopen2(file, name, H5P_DEFAULT), H5Dclose, path, std::string("opening dataset ") + name);
  H5Id space = checked(H5Dget_space(dset.get()), H5Sclose, path, "H5Dget_space");
  if (H5Sget_simple_extent_ndims(space.get()) != 1) fail(path, "dataset '", name, "' is not 1-D");
  hsize_t n = 0;
  check(H5Sget_simple_extent_dims(space.get(), &n, nullptr), path, "H5Sget_simple_extent_dims");
  H5Id ftype = checked(H5Dget_type(dset.get()), H5Tclose, path, "H5Dget_type");
  if (H5Tget_class(ftype.get()) != H5T_STRING || H5Tis_variable_str(ftype.get()) <= 0)
    fail(path, "dataset '", name, "' is not a variable-length string array");
  if (n == 0) return {};
  if (n > (1u << 24)) fail(path, "dataset '", name, "' has an implausible length ", n);
  H5Id mtype = checked(H5Tcopy(H5T_C_S1), H5Tclose, path, "H5Tcopy");
  check(H5Tset_size(mtype.get(), H5T_VARIABLE), path, "H5Tset_size");
  check(H5Tset_cset(mtype.get(), H5T_CSET_UTF8), path, "H5Tset_cset");
  std::vector<char*> raw(n, nullptr);
  check(H5Dread(dset.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, raw.data()), path,
        std::string("reading dataset ") + name);
  std::vector<std::string> out;
  out.reserve(n);
  for (char* s : raw) out.emplace_back(s ? s : "");
#if H5_VERSION_GE(1, 12, 0)
  H5Treclaim(mtype.get(), space.get(), H5P_DEFAULT, raw.data());
#else
  H5Dvlen_reclaim(mtype.get(), space.get(), H5P_DEFAULT, raw.data());
#endif
  return out;
}

void write_string_list(hid_t file, const char* name, const std::vector<std::string>& values,
                       const std::string& path) {
  H5Id type = checked(H5Tcopy(H5T_C_S1), H5Tclose, path, "H5Tcopy");
  check(H5Tset_size(type.get(), H5T_VARIABLE), path, "H5Tset_size");
  check(H5Tset_cset(type.get(), H5T_CSET_UTF8), path, "H5Tset_cset");
  H5Id space = simple_space(values.size(), path);
  H5Id dcpl = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, path, "H5Pcreate");
  check(H5Pset_obj_track_times(dcpl.get(), 0), path, "H5Pset_obj_track_times");
  H5Id dset = checked(H5Dcreate2(file, name, type.get(), space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                      H5Dclose, path, std::string("creating dataset ") + name);
  if (values.empty()) return;
  std::vector<const char*> ptrs;
  for (const auto& v : values) ptrs.push_back(v.c_str());
  check(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()), path,
        std::string("writing dataset ") + name);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public helpers

std::string sha256_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) fail(path, "cannot open to hash it: ", std::strerror(errno));
  return sha256_fd(fd.fd, path);
}

std::string token_store_sidecar_path(const std::string& path) { return path + ".sha256"; }

std::vector<std::string> token_store_temp_files(const std::string& path) {
  std::vector<std::string> out;
  const std::string p1 = temp_prefix(path, false), p2 = temp_prefix(path, true);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir_of(path), ec)) {
    const std::string name = entry.path().filename().string();
    if (name.starts_with(p1) || name.starts_with(p2)) out.push_back(entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ------------------------------------------------------------------------------------------------
// Writer

struct TokenStoreWriter::Impl {
  std::string path, tmp, sidecar_tmp;
  TokenStoreWriteOptions opt;
  H5Id file, tokens, trainable, offsets;
  std::vector<int32_t> tok_buf;
  std::vector<uint8_t> tr_buf;
  std::vector<int64_t> off_buf{0};
  hsize_t tokens_in_file = 0, offsets_in_file = 0;
  int64_t n_docs = 0, n_tokens = 0, n_trainable = 0, n_skipped = 0;
  int64_t flush_tokens = 0;
  bool done = false;
  bool broken = false;  // an HDF5 write failed: the file's state is unknown, finish() must not commit

  void usable() const {
    if (done) fail(path, "the writer has already finished");
    if (broken) fail(path, "an earlier write failed; the store cannot be finished");
  }

  /// Writes the buffered whole chunks (all of the buffers when `final`).
  void flush(bool final) {
    const auto chunk = static_cast<size_t>(opt.chunk_tokens);
    const size_t n = final ? tok_buf.size() : tok_buf.size() / chunk * chunk;
    append_array(tokens.get(), H5T_NATIVE_INT32, tok_buf.data(), tokens_in_file, n, "tokens", path);
    append_array(trainable.get(), H5T_NATIVE_UINT8, tr_buf.data(), tokens_in_file, n, "trainable", path);
    tokens_in_file += n;
    tok_buf.erase(tok_buf.begin(), tok_buf.begin() + static_cast<ptrdiff_t>(n));
    tr_buf.erase(tr_buf.begin(), tr_buf.begin() + static_cast<ptrdiff_t>(n));
    const size_t m = final ? off_buf.size() : off_buf.size() / kOffsetsChunk * kOffsetsChunk;
    append_array(offsets.get(), H5T_NATIVE_INT64, off_buf.data(), offsets_in_file, m, "doc_offsets", path);
    offsets_in_file += m;
    off_buf.erase(off_buf.begin(), off_buf.begin() + static_cast<ptrdiff_t>(m));
  }

  void remove_temps() {
    if (!tmp.empty()) ::unlink(tmp.c_str());
    if (!sidecar_tmp.empty()) ::unlink(sidecar_tmp.c_str());
  }
};

TokenStoreWriter::TokenStoreWriter(const std::string& path, TokenStoreWriteOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = path;
  w.opt = std::move(options);
  if (!fs::path(path).has_filename()) fail(path, "cannot write: the path names a directory");
  if (w.opt.tokenizer_fingerprint.empty()) fail(path, "a tokenizer fingerprint is required");
  if (w.opt.vocab_size <= 0) fail(path, "vocab_size must be positive, not ", w.opt.vocab_size);
  if (w.opt.chunk_tokens < 1 || w.opt.chunk_tokens > (int64_t{1} << 24))
    fail(path, "chunk_tokens must be in [1, 2^24], not ", w.opt.chunk_tokens);
  if (w.opt.deflate_level < 0 || w.opt.deflate_level > 9)
    fail(path, "deflate_level must be in [0, 9], not ", w.opt.deflate_level);
  w.flush_tokens = std::max<int64_t>(1, (w.opt.buffer_tokens + w.opt.chunk_tokens - 1) / w.opt.chunk_tokens) *
                   w.opt.chunk_tokens;

  // Stale temporaries of earlier writers of this target on this host whose process is gone.
  const std::string host = host_name();
  const std::string p1 = temp_prefix(path, false), p2 = temp_prefix(path, true);
  for (const std::string& t : token_store_temp_files(path)) {
    const std::string name = fs::path(t).filename().string();
    const std::string rest = name.substr(name.starts_with(p2) ? p2.size() : p1.size());
    const auto owner = parse_temp_owner(rest);
    if (owner && owner->host == host && !process_alive(owner->pid)) ::unlink(t.c_str());
  }

  H5Lock lock;
  H5Id fapl = file_access(path);
  const fs::path dir = dir_of(path);
  for (int attempt = 0;; ++attempt) {
    w.tmp = (dir / (p1 + host + "." + std::to_string(::getpid()) + "." + std::to_string(g_temp_counter++))).string();
    std::error_code ec;
    if (fs::exists(w.tmp, ec) && attempt < 100) continue;
    const hid_t f = H5Fcreate(w.tmp.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get());
    if (f < 0) {
      w.tmp.clear();
      h5_fail(path, "cannot create the temporary file in ", dir.string());
    }
    w.file = H5Id(f, H5Fclose);
    break;
  }
  try {
    w.tokens = create_array(w.file.get(), "tokens", H5T_STD_I32LE, w.opt.chunk_tokens, true, w.opt.deflate_level, path);
    // One byte per element: byte shuffling would do nothing.
    w.trainable =
        create_array(w.file.get(), "trainable", H5T_STD_U8LE, w.opt.chunk_tokens, false, w.opt.deflate_level, path);
    w.offsets =
        create_array(w.file.get(), "doc_offsets", H5T_STD_I64LE, kOffsetsChunk, true, w.opt.deflate_level, path);
  } catch (...) {
    w.tokens.reset();
    w.trainable.reset();
    w.offsets.reset();
    w.file.reset();
    w.remove_temps();
    throw;
  }
  w.tok_buf.reserve(static_cast<size_t>(w.flush_tokens));
  w.tr_buf.reserve(static_cast<size_t>(w.flush_tokens));
}

TokenStoreWriter::~TokenStoreWriter() {
  if (!impl_ || impl_->done) return;
  H5Lock lock;
  impl_->tokens.reset();
  impl_->trainable.reset();
  impl_->offsets.reset();
  impl_->file.reset();
  impl_->remove_temps();
}

void TokenStoreWriter::append(const Example& e) {
  Impl& w = *impl_;
  w.usable();
  const int64_t doc = w.n_docs;
  if (e.tokens.empty()) fail(w.path, "document ", doc, " is empty");
  if (e.tokens.size() != e.trainable.size())
    fail(w.path, "document ", doc, ": ", e.tokens.size(), " tokens but ", e.trainable.size(), " trainable flags");
  int64_t trainable = 0;
  for (size_t i = 0; i < e.tokens.size(); ++i) {
    if (e.tokens[i] < 0 || e.tokens[i] >= w.opt.vocab_size)
      fail(w.path, "document ", doc, ": token ", i, " is ", e.tokens[i], ", outside the vocabulary [0, ",
           w.opt.vocab_size, ")");
    if (e.trainable[i] > 1)
      fail(w.path, "document ", doc, ": trainable flag ", i, " is ", int(e.trainable[i]), ", not 0 or 1");
    trainable += e.trainable[i];
  }
  w.tok_buf.insert(w.tok_buf.end(), e.tokens.begin(), e.tokens.end());
  w.tr_buf.insert(w.tr_buf.end(), e.trainable.begin(), e.trainable.end());
  w.n_tokens += static_cast<int64_t>(e.tokens.size());
  w.n_trainable += trainable;
  w.off_buf.push_back(w.n_tokens);
  ++w.n_docs;
  if (static_cast<int64_t>(w.tok_buf.size()) >= w.flush_tokens ||
      static_cast<int64_t>(w.off_buf.size()) >= kOffsetsFlush) {
    H5Lock lock;
    try {
      w.flush(false);
    } catch (...) {
      w.broken = true;
      throw;
    }
  }
}

void TokenStoreWriter::add_skipped(int64_t n) {
  impl_->usable();
  impl_->n_skipped += n;
}

void TokenStoreWriter::add_source_file(const std::string& file) {
  impl_->usable();
  impl_->opt.source_files.push_back(file);
}

int64_t TokenStoreWriter::n_docs() const { return impl_->n_docs; }
int64_t TokenStoreWriter::n_tokens() const { return impl_->n_tokens; }
const std::string& TokenStoreWriter::temp_path() const { return impl_->tmp; }

TokenStoreInfo TokenStoreWriter::finish() {
  Impl& w = *impl_;
  w.usable();
  const std::string& path = w.path;
  {
    H5Lock lock;
    try {
      w.flush(true);
      const hid_t root = w.file.get();  // a file id addresses its root group
      write_str_attr(root, "format", kFormatName, path);
      write_i64_attr(root, "format_version", kTokenStoreFormatVersion, path);
      write_str_attr(root, "tokenizer_fingerprint", w.opt.tokenizer_fingerprint, path);
      write_i64_attr(root, "vocab_size", w.opt.vocab_size, path);
      write_i64_attr(root, "n_docs", w.n_docs, path);
      write_i64_attr(root, "n_tokens", w.n_tokens, path);
      write_i64_attr(root, "n_trainable_tokens", w.n_trainable, path);
      write_i64_attr(root, "n_skipped_records", w.n_skipped, path);
      write_str_attr(root, "created_by", kCreatedBy, path);
      write_string_list(root, "source_files", w.opt.source_files, path);
      check(w.tokens.close(), path, "closing dataset tokens");
      check(w.trainable.close(), path, "closing dataset trainable");
      check(w.offsets.close(), path, "closing dataset doc_offsets");
      check(w.file.close(), path, "closing the file");
    } catch (...) {
      w.broken = true;
      throw;
    }
  }
  // Commit: fsync, hash, sidecar, rename store, rename sidecar (see the header for why this order).
  TokenStoreInfo info;
  std::string sha;
  try {
    fsync_file(w.tmp, path);
    sha = sha256_file(w.tmp);
    const fs::path dir = dir_of(path);
    const std::string sidecar = token_store_sidecar_path(path);
    w.sidecar_tmp = (dir / (temp_prefix(path, true) + host_name() + "." + std::to_string(::getpid()) + "." +
                            std::to_string(g_temp_counter++)))
                        .string();
    {
      Fd fd(::open(w.sidecar_tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
      if (fd.fd < 0) fail(path, "cannot create ", w.sidecar_tmp, ": ", std::strerror(errno));
      const std::string line = sha + "  " + fs::path(path).filename().string() + "\n";
      if (::write(fd.fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
        fail(path, "cannot write ", w.sidecar_tmp, ": ", std::strerror(errno));
      if (::fsync(fd.fd) != 0) fail(path, "fsync of ", w.sidecar_tmp, " failed: ", std::strerror(errno));
    }
    if (::rename(w.tmp.c_str(), path.c_str()) != 0)
      fail(path, "cannot rename ", w.tmp, " into place: ", std::strerror(errno));
    w.tmp.clear();
    fsync_dir(dir, path);
    if (::rename(w.sidecar_tmp.c_str(), sidecar.c_str()) != 0)
      fail(path, "cannot rename ", w.sidecar_tmp, " to ", sidecar, ": ", std::strerror(errno));
    w.sidecar_tmp.clear();
    fsync_dir(dir, path);
  } catch (...) {
    w.broken = true;  // the destructor removes what is left of the temporary files
    throw;
  }
  w.done = true;

  info.path = path;
  info.format_version = kTokenStoreFormatVersion;
  info.tokenizer_fingerprint = w.opt.tokenizer_fingerprint;
  info.vocab_size = w.opt.vocab_size;
  info.source_files = w.opt.source_files;
  info.n_docs = w.n_docs;
  info.n_tokens = w.n_tokens;
  info.n_trainable_tokens = w.n_trainable;
  info.n_skipped_records = w.n_skipped;
  info.chunk_tokens = w.opt.chunk_tokens;
  info.sha256 = sha;
  info.created_by = kCreatedBy;
  return info;
}

// ------------------------------------------------------------------------------------------------
// Reader

struct TokenStoreReader::Impl {
  TokenStoreInfo info;
  H5Id file, tokens, trainable, tokens_space, trainable_space;
  std::vector<int64_t> offsets;

  /// `fingerprint` null: any tokenizer (inspect()).
  void open(const std::string& path, const std::string* fingerprint, const TokenStoreReadOptions& opt) {
    const Verified v = verify(path);
    info.path = path;
    info.sha256 = v.sha256;

    H5Lock lock;
    H5Id fapl = file_access(path);
    file = checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose, path, "HDF5 cannot open the file");
    // The file HDF5 opened must be the very file we hashed, unchanged (guards against a swap
    // between hashing and opening).
    {
      void* handle = nullptr;
      check(H5Fget_vfd_handle(file.get(), fapl.get(), &handle), path, "H5Fget_vfd_handle");
      struct stat st {};
      if (handle == nullptr || ::fstat(*static_cast<int*>(handle), &st) != 0 || st.st_dev != v.st.st_dev ||
          st.st_ino != v.st.st_ino || st.st_size != v.st.st_size || st.st_mtim.tv_sec != v.st.st_mtim.tv_sec ||
          st.st_mtim.tv_nsec != v.st.st_mtim.tv_nsec)
        fail(path, "the file changed between checksum verification and opening");
    }
    const hid_t root = file.get();
    const std::string format = read_str_attr(root, "format", path);
    if (format != kFormatName) fail(path, "not a libft token store (format '", format, "')");
    info.format_version = read_i64_attr(root, "format_version", path);
    if (info.format_version != kTokenStoreFormatVersion)
      fail(path, "token store format version ", info.format_version, "; this libft reads version ",
           kTokenStoreFormatVersion, ": rewrite the store with this version");
    info.tokenizer_fingerprint = read_str_attr(root, "tokenizer_fingerprint", path);
    if (fingerprint && *fingerprint != info.tokenizer_fingerprint)
      fail(path, "written with the tokenizer whose fingerprint is ", info.tokenizer_fingerprint,
           ", but the tokenizer in use has fingerprint ", *fingerprint,
           ": token ids would mean different things; re-tokenize the data or use the matching tokenizer");
    info.vocab_size = read_i64_attr(root, "vocab_size", path);
    info.n_docs = read_i64_attr(root, "n_docs", path);
    info.n_tokens = read_i64_attr(root, "n_tokens", path);
    info.n_trainable_tokens = read_i64_attr(root, "n_trainable_tokens", path);
    info.n_skipped_records = read_i64_attr(root, "n_skipped_records", path);
    info.created_by = read_str_attr(root, "created_by", path);
    info.source_files = read_string_list(root, "source_files", path);
    if (info.n_docs < 0 || info.n_tokens < 0 || info.n_trainable_tokens < 0 ||
        info.n_trainable_tokens > info.n_tokens || info.vocab_size <= 0)
      fail(path, "inconsistent counts in the metadata");

    // Chunk size from the creation properties, for the cache's slot count.
    {
      H5Id probe = checked(H5Dopen2(root, "tokens", H5P_DEFAULT), H5Dclose, path, "opening dataset tokens");
      H5Id dcpl = checked(H5Dget_create_plist(probe.get()), H5Pclose, path, "H5Dget_create_plist");
      hsize_t chunk = 0;
      if (H5Pget_layout(dcpl.get()) != H5D_CHUNKED || H5Pget_chunk(dcpl.get(), 1, &chunk) != 1)
        fail(path, "dataset 'tokens' is not chunked");
      info.chunk_tokens = static_cast<int64_t>(chunk);
    }
    const size_t chunk = static_cast<size_t>(info.chunk_tokens);
    H5Id tok_dapl = chunk_cache_dapl(opt.cache_bytes / 5 * 4, chunk * 4, path);
    H5Id tr_dapl = chunk_cache_dapl(opt.cache_bytes / 5, chunk, path);
    tokens = checked(H5Dopen2(root, "tokens", tok_dapl.get()), H5Dclose, path, "opening dataset tokens");
    trainable = checked(H5Dopen2(root, "trainable", tr_dapl.get()), H5Dclose, path, "opening dataset trainable");
    H5Id offs = checked(H5Dopen2(root, "doc_offsets", H5P_DEFAULT), H5Dclose, path, "opening dataset doc_offsets");
    check_int_type(tokens.get(), "tokens", 4, H5T_SGN_2, path);
    check_int_type(trainable.get(), "trainable", 1, H5T_SGN_NONE, path);
    check_int_type(offs.get(), "doc_offsets", 8, H5T_SGN_2, path);
    const hsize_t nt = extent_1d(tokens.get(), "tokens", path);
    const hsize_t nr = extent_1d(trainable.get(), "trainable", path);
    const hsize_t no = extent_1d(offs.get(), "doc_offsets", path);
    if (nt != static_cast<hsize_t>(info.n_tokens) || nr != nt)
      fail(path, "'tokens' holds ", nt, " and 'trainable' ", nr, " elements, the metadata says ", info.n_tokens);
    if (no != static_cast<hsize_t>(info.n_docs) + 1)
      fail(path, "'doc_offsets' holds ", no, " elements, expected n_docs + 1 = ", info.n_docs + 1);
    offsets.resize(no);
    check(H5Dread(offs.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets.data()), path,
          "reading dataset doc_offsets");
    // Our own reads index the arrays through these offsets: they must be sane.
    if (offsets.front() != 0 || offsets.back() != info.n_tokens)
      fail(path, "'doc_offsets' must run from 0 to n_tokens = ", info.n_tokens);
    for (size_t i = 1; i < offsets.size(); ++i)
      if (offsets[i] <= offsets[i - 1]) fail(path, "'doc_offsets' is not increasing at document ", i - 1);
    tokens_space = checked(H5Dget_space(tokens.get()), H5Sclose, path, "H5Dget_space");
    trainable_space = checked(H5Dget_space(trainable.get()), H5Sclose, path, "H5Dget_space");
  }

  void close() {
    H5Lock lock;
    tokens_space.reset();
    trainable_space.reset();
    tokens.reset();
    trainable.reset();
    file.reset();
  }
};

TokenStoreReader::TokenStoreReader() : impl_(std::make_unique<Impl>()) {}

TokenStoreReader::~TokenStoreReader() {
  if (impl_) impl_->close();
}

std::shared_ptr<TokenStoreReader> TokenStoreReader::open(const std::string& path,
                                                         const std::string& tokenizer_fingerprint,
                                                         const TokenStoreReadOptions& options) {
  std::shared_ptr<TokenStoreReader> r(new TokenStoreReader());
  r->impl_->open(path, &tokenizer_fingerprint, options);  // on error ~TokenStoreReader closes what opened
  return r;
}

TokenStoreInfo TokenStoreReader::inspect(const std::string& path) {
  TokenStoreReader r;
  TokenStoreReadOptions small;
  small.cache_bytes = size_t{1} << 20;
  r.impl_->open(path, nullptr, small);
  return r.impl_->info;
}

const TokenStoreInfo& TokenStoreReader::info() const { return impl_->info; }
const std::string& TokenStoreReader::path() const { return impl_->info.path; }
int64_t TokenStoreReader::n_docs() const { return impl_->info.n_docs; }
std::span<const int64_t> TokenStoreReader::doc_offsets() const { return impl_->offsets; }

int64_t TokenStoreReader::doc_length(int64_t doc) const {
  if (doc < 0 || doc >= impl_->info.n_docs)
    fail(impl_->info.path, "document ", doc, " is out of range [0, ", impl_->info.n_docs, ")");
  return impl_->offsets[static_cast<size_t>(doc) + 1] - impl_->offsets[static_cast<size_t>(doc)];
}

Example TokenStoreReader::doc(int64_t doc) const {
  const int64_t n = doc_length(doc);
  Example e;
  e.tokens.resize(static_cast<size_t>(n));
  e.trainable.resize(static_cast<size_t>(n));
  read(doc, 0, n, e.tokens.data(), e.trainable.data());
  return e;
}

void TokenStoreReader::read(int64_t doc, int64_t begin, int64_t count, int32_t* tokens, uint8_t* trainable) const {
  const Impl& r = *impl_;
  const std::string& path = r.info.path;
  const int64_t len = doc_length(doc);
  if (begin < 0 || count < 0 || begin > len || count > len - begin)
    fail(path, "document ", doc, ": range [", begin, ", ", begin + count, ") is outside its ", len, " tokens");
  if (count == 0) return;
  const hsize_t start = static_cast<hsize_t>(r.offsets[static_cast<size_t>(doc)] + begin);
  const hsize_t n = static_cast<hsize_t>(count);
  H5Lock lock;
  H5Id mspace = simple_space(n, path);
  auto read_one = [&](hid_t dset, hid_t fspace, hid_t mem_type, void* out, const char* name) {
    if (out == nullptr) return;
    if (H5Sselect_hyperslab(fspace, H5S_SELECT_SET, &start, nullptr, &n, nullptr) < 0 ||
        H5Dread(dset, mem_type, mspace.get(), fspace, H5P_DEFAULT, out) < 0)
      h5_fail(path, "reading dataset '", name, "' for document ", doc, " (elements [", start, ", ", start + n, "))");
  };
  read_one(r.tokens.get(), r.tokens_space.get(), H5T_NATIVE_INT32, tokens, "tokens");
  read_one(r.trainable.get(), r.trainable_space.get(), H5T_NATIVE_UINT8, trainable, "trainable");
}

}  // namespace ft::data
