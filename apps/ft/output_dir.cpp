// The output directory of a command that writes a whole model (ft init, ft merge): never one of its
// inputs, never a non-empty directory unless --force, and never a mix of two models: an absent
// directory is written beside and renamed into place, an empty one is filled from a directory of
// its own inside it, and with --force the new model is written beside and swapped with the old one
// in one rename (renameat2 RENAME_EXCHANGE). Temporary directories have fresh random names, so no
// directory the user had is ever removed but the model that --force replaces.
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "commands.h"
#include "ft/util/error.h"

namespace fs = std::filesystem;

namespace ft::cli {
namespace {

// The directory itself: absolute, normalised, without a trailing separator ("out/" names "out").
fs::path directory_path(const std::string& dir) {
  fs::path p = fs::absolute(fs::path(dir)).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();
  return p;
}

// Whether `inner` is `outer` or lies inside it (both resolved through symbolic links).
bool is_within(const fs::path& inner, const fs::path& outer) {
  std::error_code ec;
  const fs::path a = fs::weakly_canonical(inner, ec);
  if (ec) return false;
  const fs::path b = fs::weakly_canonical(outer, ec);
  if (ec) return false;
  auto ai = a.begin();
  for (auto bi = b.begin(); bi != b.end(); ++bi, ++ai) {
    if (bi->empty() && std::next(bi) == b.end()) break;  // a trailing separator
    if (ai == a.end() || *ai != *bi) return false;
  }
  return true;
}

bool looks_like_a_model(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || name == "adapter_config.json" || name.ends_with(".safetensors") ||
        name == "model.safetensors.index.json")
      return true;
  }
  return false;
}

}  // namespace

void check_output_dir(const std::string& command, const std::string& out, const std::vector<NamedPath>& inputs,
                      bool force) {
  const fs::path dir = directory_path(out);
  std::error_code ec;
  for (const NamedPath& in : inputs) {
    const bool same = fs::exists(dir) && fs::exists(in.path) && fs::equivalent(dir, in.path, ec);
    FT_CHECK(!same && !is_within(in.path, dir), "[", command, "] the output directory ", out,
             same ? " is the " : " contains the ", in.name, " ", in.path,
             ": writing it would replace the input it is made from (--force does not change that); choose another "
             "output directory");
  }
  if (!fs::exists(dir)) return;
  FT_CHECK(fs::is_directory(dir), "[", command, "] the output ", out, " exists and is not a directory");
  if (fs::is_empty(dir)) return;
  FT_CHECK(force, "[", command, "] the output directory ", out,
           " is not empty: choose another, or pass --force to replace the model in it");
  FT_CHECK(looks_like_a_model(dir), "[", command, "] the output directory ", out,
           " is not empty and holds no model (no config.json, adapter_config.json or *.safetensors): --force only "
           "replaces a model directory; choose another output directory, or empty this one yourself");
}

namespace {

// A new directory named `prefix` + six random characters (mkdtemp): never an existing directory,
// so nothing the user had (an input, an earlier run's leftovers) is ever written over or removed.
fs::path fresh_directory(const std::string& command, const fs::path& prefix) {
  std::string name = prefix.string() + "XXXXXX";
  FT_CHECK(::mkdtemp(name.data()) != nullptr, "[", command, "] cannot create a directory next to ", prefix.string(),
           ": ", std::strerror(errno));
  return name;
}

void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace

void write_output_dir(const std::string& command, const std::string& out, bool force,
                      const std::function<void(const std::string&)>& write) {
  const fs::path dir = directory_path(out);
  std::error_code ec;
  // Where it stands now (check_output_dir ran before the model was built, which can take minutes).
  const bool exists = fs::exists(dir, ec);
  FT_CHECK(!exists || fs::is_directory(dir), "[", command, "] the output ", out, " exists and is not a directory");
  const bool empty = exists && fs::is_empty(dir, ec);
  if (exists && !empty) {
    FT_CHECK(force, "[", command, "] the output directory ", out,
             " is not empty (it was when the command started): choose another, or pass --force");
    FT_CHECK(looks_like_a_model(dir), "[", command, "] the output directory ", out, " holds no model: not replaced");
  }
  auto written = [&](const fs::path& tmp) {
    try {
      write(tmp.string());
    } catch (...) {
      fs::remove_all(tmp, ec);  // a directory of this call's own
      throw;
    }
  };

  if (empty) {
    // Into the directory itself (a mount point or a symbolic link stays what it is): the files go to
    // a directory of their own inside it first, then up; nothing of an older model can be among them.
    const fs::path tmp = fresh_directory(command, dir / ".ft-write-");
    written(tmp);
    for (const auto& e : fs::directory_iterator(tmp)) fs::rename(e.path(), dir / e.path().filename());
    fs::remove(tmp, ec);
    sync_directory(dir);
    return;
  }

  // Beside the directory (through a symbolic link: beside its target), then into its place.
  const fs::path target = exists ? fs::canonical(dir) : dir;
  const fs::path tmp = fresh_directory(command, target.string() + ".tmp-");
  written(tmp);
  if (!exists) {
    // rename() refuses a directory that someone made meanwhile and filled.
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      FT_FAIL("[", command, "] cannot rename ", tmp.string(), " to ", out, ": ", std::strerror(errno),
              " (the new model is in ", tmp.string(), ")");
    }
    sync_directory(target.parent_path());
    return;
  }
  // --force over a model: the two directories swap places in one step (no moment without a model at
  // `out`); the old model, now at the temporary name, goes after that.
  // LIBFT_NO_RENAME_EXCHANGE: take the fallback below (for its test on file systems that have it).
  static const bool exchange = std::getenv("LIBFT_NO_RENAME_EXCHANGE") == nullptr;
  if (!exchange) errno = ENOSYS;
  if (exchange && ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    sync_directory(target.parent_path());
    fs::remove_all(tmp, ec);
    return;
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) {
    FT_FAIL("[", command, "] cannot put ", tmp.string(), " in the place of ", out, ": ", std::strerror(errno),
            " (the new model is in ", tmp.string(), "; ", out, " is unchanged)");
  }
  // A file system without the exchange (NFS, some overlays): the old model steps aside to a fresh
  // name of its own (rename() replaces the empty directory made for it), the new one takes its place.
  const fs::path old = fresh_directory(command, target.string() + ".old-");
  if (::rename(target.c_str(), old.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    fs::remove(old, ec);
    FT_FAIL("[", command, "] cannot move ", out, " aside: ", why, " (the new model is in ", tmp.string(), ")");
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    const bool back = ::rename(old.c_str(), target.c_str()) == 0;
    FT_FAIL("[", command, "] cannot rename ", tmp.string(), " to ", out, ": ", why, " (the new model is in ",
            tmp.string(), back ? "; " + out + " is unchanged)" : "; the old model is in " + old.string() + ")");
  }
  sync_directory(target.parent_path());
  fs::remove_all(old, ec);
}

}  // namespace ft::cli
