// The output directory of a command that writes a whole model (ft init, ft merge): never one of its
// inputs, never a non-empty directory unless --force, and written beside it then renamed into place
// (as checkpoints/step-N is), so that no file of an older model is left to be read as part of it.
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

void write_output_dir(const std::string& command, const std::string& out,
                      const std::function<void(const std::string&)>& write) {
  const fs::path dir = directory_path(out);
  const fs::path tmp = dir.string() + ".tmp";
  const fs::path old = dir.string() + ".old";
  std::error_code ec;
  fs::remove_all(tmp, ec);  // what an interrupted earlier write left
  FT_CHECK(!ec, "[", command, "] cannot remove ", tmp.string(), ": ", ec.message());
  fs::create_directories(tmp, ec);
  FT_CHECK(!ec, "[", command, "] cannot create ", tmp.string(), ": ", ec.message());
  try {
    write(tmp.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  // The old directory steps aside until the new one is in place, and goes only then.
  const bool replacing = fs::exists(dir);
  if (replacing) {
    fs::remove_all(old, ec);
    fs::rename(dir, old, ec);
    FT_CHECK(!ec, "[", command, "] cannot move ", out, " aside to ", old.string(), ": ", ec.message(),
             " (the new model is in ", tmp.string(), ")");
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    std::error_code back;
    if (replacing) fs::rename(old, dir, back);
    FT_FAIL("[", command, "] cannot rename ", tmp.string(), " to ", out, ": ", ec.message(),
            " (the new model is in ", tmp.string(), ")");
  }
  if (replacing) fs::remove_all(old, ec);
}

}  // namespace ft::cli
