#pragma once
// Helpers for the record reader tests: a deterministic stand-in encoder, real text from the Debian
// fortunes package, and scratch files under LIBFT_DATA_TEST_TMP.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ft/data/chat_template.h"
#include "ft/data/records.h"
#include "ft/util/error.h"

namespace ft::test {

/// The message of the ft::Error that `f` throws, or "no error".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ft::Error& e) {
    return e.what();
  }
  return "no error";
}

/// The fortunes package's folder; LIBFT_FORTUNES overrides it (the GPU check unpacks the package
/// into a folder of the repository instead of the system root).
inline const char* const kFortuneDir = [] {
  const char* env = std::getenv("LIBFT_FORTUNES");
  return env && *env ? env : "/usr/share/games/fortunes";
}();

/// One token per byte, shaped like sentencepiece: encode_start puts a space in front (the dummy
/// prefix), encode_continuation does not, and decode drops one leading space. Ids: byte b → b + 3,
/// BOS 1, EOS 2; optional single-id pieces from 259 on.
class ByteEncoder final : public data::TokenEncoder {
 public:
  static constexpr int32_t kBos = 1, kEos = 2, kFirstPiece = 259;

  explicit ByteEncoder(std::vector<std::string> pieces = {}, bool add_bos = true, bool add_eos = false)
      : pieces_(std::move(pieces)) {
    special_.bos = kBos;
    special_.eos = kEos;
    special_.add_bos = add_bos;
    special_.add_eos = add_eos;
  }
  std::vector<int32_t> encode_start(std::string_view text) const override {
    return encode_continuation(" " + std::string(text));
  }
  std::vector<int32_t> encode_continuation(std::string_view text) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : text) ids.push_back(static_cast<int32_t>(c) + 3);
    return ids;
  }
  int32_t piece_id(std::string_view piece) const override {
    for (size_t i = 0; i < pieces_.size(); ++i) {
      if (pieces_[i] == piece) return kFirstPiece + static_cast<int32_t>(i);
    }
    return -1;
  }
  data::SpecialTokens special() const override { return special_; }

  /// Every id as text: BOS/EOS as <s>/</s>, pieces as themselves, bytes as bytes. No space dropped.
  std::string render(std::span<const int32_t> ids) const {
    std::string out;
    for (int32_t id : ids) {
      if (id == kBos)
        out += "<s>";
      else if (id == kEos)
        out += "</s>";
      else if (id >= kFirstPiece)
        out += pieces_.at(static_cast<size_t>(id - kFirstPiece));
      else
        out += static_cast<char>(id - 3);
    }
    return out;
  }
  /// sentencepiece-style decode of a span: render, then drop one leading space.
  std::string decode(std::span<const int32_t> ids) const {
    std::string s = render(ids);
    if (!s.empty() && s[0] == ' ') s.erase(0, 1);
    return s;
  }

 private:
  std::vector<std::string> pieces_;
  data::SpecialTokens special_;
};

/// The runs of consecutive trainable tokens.
inline std::vector<std::vector<int32_t>> trainable_spans(const data::Example& ex) {
  std::vector<std::vector<int32_t>> spans;
  for (size_t i = 0; i < ex.tokens.size(); ++i) {
    if (!ex.trainable[i]) continue;
    if (i == 0 || !ex.trainable[i - 1]) spans.emplace_back();
    spans.back().push_back(ex.tokens[i]);
  }
  return spans;
}

/// LIBFT_DATA_TEST_TMP/<name>, emptied.
inline std::string scratch_dir(const std::string& name) {
  const char* root = std::getenv("LIBFT_DATA_TEST_TMP");
  const std::filesystem::path base = root ? root : std::filesystem::current_path() / "data_tmp"  /* ctest runs in the build tree */;
  const auto dir = base / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

inline void write_file(const std::string& path, std::string_view bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// The fortune files of the fortunes package (no .dat index, no .u8 links, no off/ directory).
inline std::vector<std::string> fortune_files() {
  std::vector<std::string> files;
  if (!std::filesystem::is_directory(kFortuneDir)) return files;
  for (const auto& e : std::filesystem::directory_iterator(kFortuneDir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || e.is_symlink() || name.ends_with(".dat") || name.ends_with(".u8")) continue;
    files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

/// The fortunes of one file, split independently of the reader: on lines that are exactly "%",
/// dropping empty records. Each fortune keeps its internal newlines, without the last one.
inline std::vector<std::string> fortunes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<std::string> out;
  std::string line, cur;
  bool any = false;
  auto flush = [&] {
    if (any && cur.find_first_not_of(" \t\n") != std::string::npos) out.push_back(cur);
    cur.clear();
    any = false;
  };
  while (std::getline(in, line)) {
    if (line == "%") {
      flush();
      continue;
    }
    if (any) cur += '\n';
    cur += line;
    any = true;
  }
  flush();
  return out;
}

#define FT_REQUIRE_FORTUNES()                                                           \
  do {                                                                                  \
    if (::ft::test::fortune_files().empty())                                            \
      FAIL() << "the Debian 'fortunes' package is missing (" << ::ft::test::kFortuneDir \
             << "); scripts/setup.sh installs it";                                      \
  } while (0)

/// A few hundred real fortunes: single-paragraph ones from `file`, at most `max_bytes` long.
inline std::vector<std::string> some_fortunes(const std::string& file = "fortunes", size_t count = 200,
                                              size_t max_bytes = 400) {
  std::vector<std::string> out;
  for (const std::string& f : fortunes_of(std::string(kFortuneDir) + "/" + file)) {
    if (f.size() > max_bytes || f.find("\n\n") != std::string::npos) continue;
    out.push_back(f);
    if (out.size() == count) break;
  }
  return out;
}

}  // namespace ft::test
