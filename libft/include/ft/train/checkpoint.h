#pragma once
// Training checkpoints on disk: atomic directories with a manifest, verification, fallback, pruning.
//
// LAYOUT. output_dir/checkpoints/step-00000120/ holds the files a save writes (weights, optimizer
// state, trainer state, RNG states: see run.cpp for what the trainer puts there) and manifest.json:
//   {"format": "libft-checkpoint", "version": 1, "step": 120,
//    "files": [{"name": "model.safetensors", "bytes": 1234, "sha256": "..."}, ...]}
//
// ATOMICITY. A save writes every file into step-00000120.tmp (a name no reader accepts), fsyncs
// each, writes the manifest LAST (itself atomically), fsyncs the directory, renames it to
// step-00000120 and fsyncs the parent. A process killed at any point leaves either no new
// directory, a .tmp directory (removed as stale by the next run), or a complete checkpoint. A
// checkpoint directory without a manifest, or whose files disagree with it (missing, truncated,
// changed by a single bit: sizes and SHA-256 are compared), is damaged; loading falls back to the
// newest intact one and says which file of which checkpoint was wrong.
//
// FAULT INJECTION. For the crash tests, LIBFT_CHECKPOINT_CRASH=<point>[@<n>] makes the n-th save
// of the process (default 1) end the process with _exit(86) at <point>, without any cleanup, as a
// kill would: one of kCrashPoints. Unset, it costs one getenv per save.
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace ft::train {

/// Where LIBFT_CHECKPOINT_CRASH may stop a save, in the order the save passes them.
inline const std::vector<std::string> kCrashPoints = {
    "begin",           // the .tmp directory exists, empty
    "after_files",     // every file written and fsynced, no manifest
    "after_manifest",  // manifest written, directory not yet renamed
    "after_rename",    // the checkpoint is complete; older ones not yet pruned
    "during_prune",    // one older checkpoint removed, others not
};

/// One file of a checkpoint as the manifest records it.
struct ManifestEntry {
  std::string name;
  uint64_t bytes = 0;
  std::string sha256;
};

class CheckpointDir {
 public:
  /// `root` is created if missing.
  explicit CheckpointDir(std::string root);

  const std::string& root() const { return root_; }
  /// "root/step-00000120".
  std::string path(int64_t step) const;

  /// Steps of the directories named like complete checkpoints (intact or not), ascending.
  std::vector<int64_t> steps() const;

  /// Writes a checkpoint for `step`: `write_files(tmp_dir)` creates the files (plain names, no
  /// subdirectories), then the manifest, fsyncs and the rename. An existing checkpoint of the same
  /// step is replaced (the new one is complete before the old one goes). Returns the final path.
  std::string save(int64_t step, const std::function<void(const std::string& dir)>& write_files);

  /// Checks `dir` against its manifest; throws ft::Error naming the checkpoint and the file.
  static std::vector<ManifestEntry> verify(const std::string& dir);

  /// The newest checkpoint that verifies. A damaged newer one is reported on `log` (one line naming
  /// the problem) and skipped, or with `strict` the error is thrown. nullopt when there is none.
  std::optional<std::string> latest_valid(bool strict, std::FILE* log) const;

  /// Removes complete checkpoints beyond the newest `keep_last`, except the steps in `keep`.
  /// Returns the steps removed.
  std::vector<int64_t> prune(int64_t keep_last, const std::set<int64_t>& keep = {});

  /// Removes leftovers of interrupted saves (*.tmp, *.old directories). Returns how many.
  int clean_stale();

 private:
  std::string root_;
  int saves_ = 0;  ///< saves by this object, for LIBFT_CHECKPOINT_CRASH's @n
};

/// fsync of a file or directory by path; throws ft::Error naming it.
void fsync_path(const std::string& path);

}  // namespace ft::train
