#include "ft/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "ft/data/token_store.h"
#include "ft/io/safetensors.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

namespace fs = std::filesystem;

namespace ft::train {

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kFormat = "libft-checkpoint";

std::atomic<int> g_saves{0};  // saves in this process, for LIBFT_CHECKPOINT_CRASH=<point>@<n>

void crash_point(const char* point, int save_number) {
  const char* spec = std::getenv("LIBFT_CHECKPOINT_CRASH");
  if (spec == nullptr || *spec == '\0') return;
  std::string s(spec);
  int n = 1;
  if (const size_t at = s.find('@'); at != std::string::npos) {
    n = std::atoi(s.c_str() + at + 1);
    s.resize(at);
  }
  if (std::find(kCrashPoints.begin(), kCrashPoints.end(), s) == kCrashPoints.end()) {
    std::fprintf(stderr, "LIBFT_CHECKPOINT_CRASH: '%s' is not a crash point\n", s.c_str());
    std::_Exit(2);
  }
  if (s == point && n == save_number) {
    std::fprintf(stderr, "[checkpoint] LIBFT_CHECKPOINT_CRASH: exiting at %s of save %d\n", point, save_number);
    std::fflush(stderr);
    std::_Exit(86);
  }
}

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

/// The step of "step-00000120", or -1 for any other name.
int64_t parse_step_name(const std::string& name) {
  if (name.size() != 13 || name.compare(0, 5, "step-") != 0) return -1;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

}  // namespace

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FT_CHECK(fd >= 0, "[checkpoint] cannot open ", path, " to fsync it: ", std::strerror(errno));
  const bool ok = ::fsync(fd) == 0 || errno == EINVAL;  // some filesystems cannot fsync directories
  const int err = errno;
  ::close(fd);
  FT_CHECK(ok, "[checkpoint] fsync of ", path, " failed: ", std::strerror(err));
}

CheckpointDir::CheckpointDir(std::string root) : root_(std::move(root)) {
  std::error_code ec;
  fs::create_directories(root_, ec);
  FT_CHECK(!ec, "[checkpoint] cannot create ", root_, ": ", ec.message());
}

std::string CheckpointDir::path(int64_t step) const { return (fs::path(root_) / step_name(step)).string(); }

std::vector<int64_t> CheckpointDir::steps() const {
  std::vector<int64_t> v;
  for (const auto& e : fs::directory_iterator(root_)) {
    if (!e.is_directory()) continue;
    const int64_t s = parse_step_name(e.path().filename().string());
    if (s >= 0) v.push_back(s);
  }
  std::sort(v.begin(), v.end());
  return v;
}

std::string CheckpointDir::save(int64_t step, const std::function<void(const std::string&)>& write_files) {
  FT_CHECK(step >= 0, "[checkpoint] negative step ", step);
  const int number = ++g_saves;
  const std::string final_path = path(step);
  const std::string tmp = final_path + ".tmp";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  FT_CHECK(!ec, "[checkpoint] cannot create ", tmp, ": ", ec.message());
  crash_point("begin", number);

  // A failed write (a full disk, most often) removes its unfinished directory, so that the space
  // it took is free again for whatever the caller does next; the error goes on unchanged.
  try {
    write_files(tmp);
    nlohmann::json files = nlohmann::json::array();
    std::vector<fs::path> names;
    for (const auto& e : fs::directory_iterator(tmp)) names.push_back(e.path());
    std::sort(names.begin(), names.end());
    for (const fs::path& p : names) {
      const std::string name = p.filename().string();
      FT_CHECK(fs::is_regular_file(p), "[checkpoint] ", tmp, ": '", name, "' is not a plain file");
      FT_CHECK(name != kManifest, "[checkpoint] ", tmp, ": the files may not include ", kManifest);
      fsync_path(p.string());
      files.push_back({{"name", name}, {"bytes", fs::file_size(p)}, {"sha256", data::sha256_file(p.string())}});
    }
    crash_point("after_files", number);

    const nlohmann::json manifest = {{"format", kFormat}, {"version", 1}, {"step", step}, {"files", files}};
    const std::string text = manifest.dump(2) + "\n";
    io::write_file_atomic((fs::path(tmp) / kManifest).string(),
                          std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
    fsync_path(tmp);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  crash_point("after_manifest", number);

  // Replacing a checkpoint of the same step: the old one steps aside as .old until the new one is
  // in place (clean_stale() puts an .old back if a crash leaves no step-N).
  const std::string old = final_path + ".old";
  const bool replacing = fs::exists(final_path);
  if (replacing) {
    fs::remove_all(old, ec);
    fs::rename(final_path, old, ec);
    FT_CHECK(!ec, "[checkpoint] cannot move ", final_path, " aside: ", ec.message());
  }
  fs::rename(tmp, final_path, ec);
  FT_CHECK(!ec, "[checkpoint] cannot rename ", tmp, " to ", final_path, ": ", ec.message());
  fsync_path(root_);
  if (replacing) fs::remove_all(old, ec);
  crash_point("after_rename", number);
  return final_path;
}

std::vector<ManifestEntry> CheckpointDir::verify(const std::string& dir) {
  const fs::path manifest_path = fs::path(dir) / kManifest;
  FT_CHECK(fs::exists(manifest_path), "[checkpoint] ", dir, ": no ", kManifest, " (the save did not finish)");
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(read_text_file(manifest_path.string()));
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[checkpoint] ", manifest_path.string(), ": not valid JSON: ", e.what());
  }
  std::vector<ManifestEntry> entries;
  try {
    FT_CHECK(m.at("format") == kFormat, "[checkpoint] ", manifest_path.string(), ": format is not ", kFormat);
    FT_CHECK(m.at("version") == 1, "[checkpoint] ", manifest_path.string(), ": unsupported version ", m.at("version").dump());
    for (const auto& f : m.at("files")) {
      ManifestEntry e{f.at("name").get<std::string>(), f.at("bytes").get<uint64_t>(), f.at("sha256").get<std::string>()};
      FT_CHECK(!e.name.empty() && e.name.find('/') == std::string::npos && e.name != "." && e.name != "..",
               "[checkpoint] ", manifest_path.string(), ": bad file name '", e.name, "'");
      entries.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[checkpoint] ", manifest_path.string(), ": malformed manifest: ", e.what());
  }
  for (const ManifestEntry& e : entries) {
    const fs::path p = fs::path(dir) / e.name;
    std::error_code ec;
    const uint64_t size = fs::file_size(p, ec);
    FT_CHECK(!ec, "[checkpoint] ", p.string(), ": missing (listed in ", kManifest, ")");
    FT_CHECK(size == e.bytes, "[checkpoint] ", p.string(), ": ", size, " bytes, the manifest says ", e.bytes,
             " (truncated or overwritten)");
    FT_CHECK(data::sha256_file(p.string()) == e.sha256, "[checkpoint] ", p.string(),
             ": SHA-256 differs from the manifest (the file changed after it was written)");
  }
  return entries;
}

std::optional<std::string> CheckpointDir::latest_valid(bool strict, std::FILE* log) const {
  const std::vector<int64_t> all = steps();
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const std::string dir = path(*it);
    try {
      verify(dir);
      return dir;
    } catch (const Error& e) {
      if (strict) FT_FAIL(e.what(), " (checkpoint.strict: not falling back to an older checkpoint)");
      if (log) std::fprintf(log, "[checkpoint] skipping damaged checkpoint: %s\n", e.what());
    }
  }
  return std::nullopt;
}

std::vector<int64_t> CheckpointDir::prune(int64_t keep_last, const std::set<int64_t>& keep) {
  std::vector<int64_t> all = steps(), removed;
  const int64_t n = static_cast<int64_t>(all.size());
  const int number = g_saves.load();
  for (int64_t i = 0; i + keep_last < n; ++i) {
    if (keep.count(all[static_cast<size_t>(i)])) continue;
    // Renamed to .tmp first, so that a crash in the middle of remove_all leaves a stale directory
    // (cleaned at the next start) and never a half-deleted step-N that looks like a checkpoint.
    const std::string p = path(all[static_cast<size_t>(i)]);
    std::error_code ec;
    fs::rename(p, p + ".tmp", ec);
    FT_CHECK(!ec, "[checkpoint] cannot remove ", p, ": ", ec.message());
    fs::remove_all(p + ".tmp", ec);
    removed.push_back(all[static_cast<size_t>(i)]);
    crash_point("during_prune", number);
  }
  return removed;
}

int CheckpointDir::clean_stale() {
  int n = 0;
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(root_)) entries.push_back(e.path());
  for (const fs::path& p : entries) {
    const std::string name = p.filename().string();
    auto ends = [&](const char* suffix) {
      const size_t k = std::strlen(suffix);
      return name.size() > k && name.compare(name.size() - k, k, suffix) == 0;
    };
    std::error_code ec;
    if (ends(".old")) {
      const fs::path original = p.parent_path() / name.substr(0, name.size() - 4);
      if (!fs::exists(original)) {  // a replacement crashed between its two renames: keep the old one
        fs::rename(p, original, ec);
        if (!ec) continue;
      }
      fs::remove_all(p, ec);
      ++n;
    } else if (ends(".tmp")) {
      fs::remove_all(p, ec);
      ++n;
    }
  }
  return n;
}

}  // namespace ft::train
