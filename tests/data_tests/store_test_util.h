#pragma once
// Helpers shared by the token store and batcher tests: scratch directories and synthetic documents.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "ft/data/example.h"
#include "ft/data/token_store.h"

namespace ft::data::testing {

/// A fresh, empty directory for the current test: $LIBFT_DATA_TEST_TMP/<suite>.<test>/ (ctest sets
/// the variable to a folder in the build tree), else the system temp directory.
inline std::filesystem::path scratch_dir() {
  namespace fs = std::filesystem;
  const char* env = std::getenv("LIBFT_DATA_TEST_TMP");
  const fs::path root = env && *env ? fs::path(env) : fs::current_path() / "data_tmp"  /* ctest runs in the build tree */;
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  for (char& c : name)
    if (c == '/') c = '_';
  const fs::path dir = root / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

/// Documents of the given lengths with random tokens in [0, vocab) and random trainable flags
/// (the first token of each document, a BOS, is never trainable), from a fixed seed.
inline std::vector<Example> make_docs(const std::vector<int64_t>& lengths, int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Example> docs;
  for (int64_t len : lengths) {
    Example e;
    for (int64_t i = 0; i < len; ++i) {
      e.tokens.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab)));
      e.trainable.push_back(i == 0 ? 0 : static_cast<uint8_t>(rng() % 4 != 0));
    }
    docs.push_back(std::move(e));
  }
  return docs;
}

/// `n` lengths uniform in [lo, hi].
inline std::vector<int64_t> random_lengths(size_t n, int64_t lo, int64_t hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> out;
  for (size_t i = 0; i < n; ++i) out.push_back(lo + static_cast<int64_t>(rng() % static_cast<uint32_t>(hi - lo + 1)));
  return out;
}

inline const char* kFingerprint = "0123456789abcdef-test-tokenizer";
inline constexpr int32_t kVocab = 1000;

inline TokenStoreInfo write_store(const std::string& path, const std::vector<Example>& docs,
                                  int64_t chunk_tokens = 64, int64_t buffer_tokens = 200) {
  TokenStoreWriteOptions o;
  o.tokenizer_fingerprint = kFingerprint;
  o.vocab_size = kVocab;
  o.source_files = {"a.jsonl", "b.txt"};
  o.chunk_tokens = chunk_tokens;
  o.buffer_tokens = buffer_tokens;
  TokenStoreWriter w(path, o);
  for (const auto& d : docs) w.append(d);
  return w.finish();
}

}  // namespace ft::data::testing
