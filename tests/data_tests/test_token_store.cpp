// Token store: round trips, metadata, and every way a store can be damaged or half-written.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "ft/data/token_store.h"
#include "ft/util/error.h"
#include "store_test_util.h"

using namespace ft::data;
using namespace ft::data::testing;
namespace fs = std::filesystem;

namespace {

/// Runs `f`, expects an ft::Error whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an ft::Error";
  } catch (const ft::Error& e) {
    const std::string what = e.what();
    if (std::getenv("LIBFT_SHOW_ERRORS")) std::cerr << "  error: " << what << "\n";  // to review the wording
    for (const auto& p : parts) EXPECT_NE(what.find(p), std::string::npos) << "missing '" << p << "' in: " << what;
  }
}

void expect_round_trip(const std::string& path, const std::vector<Example>& docs) {
  auto r = TokenStoreReader::open(path, kFingerprint);
  ASSERT_EQ(r->n_docs(), static_cast<int64_t>(docs.size()));
  int64_t tokens = 0, trainable = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    const Example e = r->doc(static_cast<int64_t>(i));
    ASSERT_EQ(e.tokens, docs[i].tokens) << "document " << i;
    ASSERT_EQ(e.trainable, docs[i].trainable) << "document " << i;
    ASSERT_EQ(r->doc_length(static_cast<int64_t>(i)), static_cast<int64_t>(docs[i].tokens.size()));
    tokens += static_cast<int64_t>(docs[i].tokens.size());
    for (uint8_t t : docs[i].trainable) trainable += t;
  }
  EXPECT_EQ(r->info().n_tokens, tokens);
  EXPECT_EQ(r->info().n_trainable_tokens, trainable);
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good());
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

/// Test-only bypass of the sidecar: re-checksums a deliberately modified store, as if the writer
/// had produced it, so that what lies behind the sidecar (HDF5's own checks) can be tested.
void forge_sidecar(const std::string& path) {
  std::ofstream(token_store_sidecar_path(path)) << sha256_file(path) << "  " << fs::path(path).filename().string()
                                                << "\n";
}

}  // namespace

TEST(TokenStore, RoundTripAcrossChunkBoundariesAndFlushes) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "store.h5").string();
  // Chunks of 64 tokens, a 200-token buffer (flushes of whole chunks only): short documents, ones
  // that straddle chunks and buffers, one exactly a chunk, and large ones of many chunks.
  std::vector<int64_t> lengths = random_lengths(300, 1, 150, 7);
  lengths.insert(lengths.begin() + 10, 64);
  lengths.insert(lengths.begin() + 50, 64 * 40 + 7);
  lengths.push_back(5000);
  const auto docs = make_docs(lengths, kVocab, 1);
  const TokenStoreInfo written = write_store(path, docs);
  expect_round_trip(path, docs);

  auto r = TokenStoreReader::open(path, kFingerprint);
  const TokenStoreInfo& info = r->info();
  EXPECT_EQ(info.format_version, kTokenStoreFormatVersion);
  EXPECT_EQ(info.tokenizer_fingerprint, kFingerprint);
  EXPECT_EQ(info.vocab_size, kVocab);
  EXPECT_EQ(info.source_files, (std::vector<std::string>{"a.jsonl", "b.txt"}));
  EXPECT_EQ(info.n_docs, static_cast<int64_t>(docs.size()));
  EXPECT_EQ(info.chunk_tokens, 64);
  EXPECT_EQ(info.n_tokens, written.n_tokens);
  EXPECT_EQ(info.n_trainable_tokens, written.n_trainable_tokens);
  EXPECT_EQ(info.sha256, written.sha256);
  EXPECT_EQ(info.sha256, sha256_file(path));
  // The sidecar is in sha256sum's format.
  std::ifstream side(token_store_sidecar_path(path));
  std::string line;
  std::getline(side, line);
  EXPECT_EQ(line, info.sha256 + "  store.h5");
  EXPECT_TRUE(token_store_temp_files(path).empty());

  // Sub-ranges of a document, across chunk boundaries.
  const int64_t big = 50;
  std::vector<int32_t> tok(100);
  std::vector<uint8_t> tr(100);
  r->read(big, 60, 100, tok.data(), tr.data());
  EXPECT_TRUE(std::equal(tok.begin(), tok.end(), docs[big].tokens.begin() + 60));
  EXPECT_TRUE(std::equal(tr.begin(), tr.end(), docs[big].trainable.begin() + 60));
  r->read(big, 0, 3, tok.data(), nullptr);
  EXPECT_EQ(tok[2], docs[big].tokens[2]);
  expect_error([&] { r->read(big, 2600, 100, tok.data(), tr.data()); }, {"store.h5", "outside its 2567 tokens"});
  expect_error([&] { r->doc(static_cast<int64_t>(docs.size())); }, {"store.h5", "out of range"});

  // inspect() needs no tokenizer.
  const TokenStoreInfo seen = TokenStoreReader::inspect(path);
  EXPECT_EQ(seen.n_docs, info.n_docs);
  EXPECT_EQ(seen.tokenizer_fingerprint, kFingerprint);
}

TEST(TokenStore, EmptyAndSingleDocumentStores) {
  const auto dir = scratch_dir();
  const std::string empty = (dir / "empty.h5").string();
  const TokenStoreInfo info = write_store(empty, {});
  EXPECT_EQ(info.n_docs, 0);
  auto r = TokenStoreReader::open(empty, kFingerprint);
  EXPECT_EQ(r->n_docs(), 0);
  EXPECT_EQ(r->info().n_tokens, 0);
  EXPECT_EQ(r->doc_offsets().size(), 1u);
  EXPECT_THROW(r->doc(0), ft::Error);

  const std::string single = (dir / "single.h5").string();
  const auto docs = make_docs({1}, kVocab, 2);
  write_store(single, docs);
  expect_round_trip(single, docs);
}

TEST(TokenStore, DefaultChunkingAndLargeDocuments) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "large.h5").string();
  const auto docs = make_docs({100000, 3, 40000, 16384, 16385}, kVocab, 3);
  TokenStoreWriteOptions o;
  o.tokenizer_fingerprint = kFingerprint;
  o.vocab_size = kVocab;
  TokenStoreWriter w(path, o);
  for (const auto& d : docs) w.append(d);
  w.add_skipped(3);
  w.add_source_file("x.jsonl");
  w.finish();
  expect_round_trip(path, docs);
  const auto info = TokenStoreReader::inspect(path);
  EXPECT_EQ(info.n_skipped_records, 3);
  EXPECT_EQ(info.chunk_tokens, 16384);
  EXPECT_EQ(info.source_files, std::vector<std::string>{"x.jsonl"});
}

TEST(TokenStore, RejectsBadDocumentsAndStaysUsable) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  TokenStoreWriteOptions o;
  o.tokenizer_fingerprint = kFingerprint;
  o.vocab_size = 10;
  TokenStoreWriter w(path, o);
  w.append({{1, 2, 3}, {0, 1, 1}});
  expect_error([&] { w.append({{}, {}}); }, {"s.h5", "document 1 is empty"});
  expect_error([&] { w.append({{1, 2}, {0}}); }, {"s.h5", "document 1", "2 tokens but 1 trainable"});
  expect_error([&] { w.append({{1, 10}, {0, 1}}); }, {"document 1", "token 1 is 10", "[0, 10)"});
  expect_error([&] { w.append({{1, -1}, {0, 1}}); }, {"token 1 is -1"});
  expect_error([&] { w.append({{1, 2}, {0, 2}}); }, {"trainable flag 1 is 2"});
  w.append({{4, 5}, {0, 1}});
  w.finish();
  expect_error([&] { w.append({{1}, {0}}); }, {"already finished"});
  auto r = TokenStoreReader::open(path, kFingerprint);
  ASSERT_EQ(r->n_docs(), 2);
  EXPECT_EQ(r->doc(1).tokens, (std::vector<int32_t>{4, 5}));

  EXPECT_THROW(TokenStoreWriter((dir / "x.h5").string(), TokenStoreWriteOptions{}), ft::Error);  // no fingerprint
}

TEST(TokenStore, WrongTokenizerNamesBothFingerprints) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  write_store(path, make_docs({5, 6}, kVocab, 4));
  expect_error([&] { TokenStoreReader::open(path, "feedface-other"); },
               {path, "feedface-other", kFingerprint, "re-tokenize"});
}

TEST(TokenStore, MissingStoreOrSidecar) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); }, {path, "no such token store"});
  write_store(path, make_docs({5, 6}, kVocab, 5));
  fs::remove(token_store_sidecar_path(path));
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); }, {path, "s.h5.sha256", "missing"});
  std::ofstream(token_store_sidecar_path(path)) << "not a checksum\n";
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); }, {path, "malformed"});
}

TEST(TokenStore, ChecksumCatchesTruncationAndFlippedBytes) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  const auto docs = make_docs(random_lengths(50, 1, 100, 6), kVocab, 6);
  write_store(path, docs);
  const auto size = fs::file_size(path);

  const std::string copy = (dir / "t.h5").string();
  fs::copy_file(path, copy);
  fs::copy_file(token_store_sidecar_path(path), token_store_sidecar_path(copy));
  fs::resize_file(copy, size / 2);
  expect_error([&] { TokenStoreReader::open(copy, kFingerprint); }, {copy, "checksum mismatch", "truncated"});

  // Every region of the file: superblock, metadata, raw chunks, the tail.
  for (uint64_t offset : {uint64_t{0}, uint64_t{100}, size / 3, size / 2, size - 1}) {
    fs::remove(copy);
    fs::copy_file(path, copy);
    flip_byte(copy, offset);
    expect_error([&] { TokenStoreReader::open(copy, kFingerprint); }, {copy, "checksum mismatch"});
  }
  expect_round_trip(path, docs);  // the original is untouched
}

TEST(TokenStore, Fletcher32CatchesAFlippedChunkByteBehindTheSidecar) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  const auto docs = make_docs(std::vector<int64_t>(20, 50), kVocab, 8);  // 1000 tokens, chunks of 64
  write_store(path, docs);

  // Where chunk 3 of /tokens (elements [192, 256): documents 3–5) lies in the file.
  haddr_t addr = 0;
  hsize_t chunk_bytes = 0;
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t d = H5Dopen2(f, "tokens", H5P_DEFAULT);
    ASSERT_GE(d, 0);
    const hsize_t coord = 192;
    unsigned mask = 0;
    ASSERT_GE(H5Dget_chunk_info_by_coord(d, &coord, &mask, &addr, &chunk_bytes), 0);
    H5Dclose(d);
    H5Fclose(f);
  }
  ASSERT_GT(chunk_bytes, 8u);
  flip_byte(path, addr + chunk_bytes / 2);
  forge_sidecar(path);

  auto r = TokenStoreReader::open(path, kFingerprint);  // metadata intact: opens
  EXPECT_EQ(r->doc(0).tokens, docs[0].tokens);          // other chunks still read
  expect_error([&] { r->doc(4); }, {path, "reading dataset 'tokens' for document 4", "Fletcher32"});
  EXPECT_EQ(r->doc(10).tokens, docs[10].tokens);
}

TEST(TokenStore, FormatVersionIsChecked) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  write_store(path, make_docs({5}, kVocab, 9));
  {
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    const int64_t v = 2;
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT64, &v), 0);
    H5Aclose(a);
    H5Fclose(f);
  }
  forge_sidecar(path);
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); }, {path, "format version 2", "reads version 1"});
}

TEST(TokenStore, AbandonedWriterLeavesNothing) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  {
    TokenStoreWriteOptions o;
    o.tokenizer_fingerprint = kFingerprint;
    o.vocab_size = kVocab;
    TokenStoreWriter w(path, o);
    EXPECT_TRUE(fs::exists(w.temp_path()));
    w.append({{1, 2}, {0, 1}});
  }  // no finish(): an exception unwound past it, say
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(token_store_temp_files(path).empty());
}

TEST(TokenStore, CrashedWriterIsNeverPickedUpAndIsCleanedLater) {
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  const auto old_docs = make_docs({7, 8}, kVocab, 10);
  write_store(path, old_docs);

  // A writer that dies (no destructor, no finish) after writing data: the temporary file stays.
  fflush(nullptr);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    try {
      TokenStoreWriteOptions o;
      o.tokenizer_fingerprint = kFingerprint;
      o.vocab_size = kVocab;
      o.chunk_tokens = 16;
      o.buffer_tokens = 16;
      auto* w = new TokenStoreWriter(path, o);  // leaked on purpose: the process "crashes"
      for (const auto& d : make_docs(std::vector<int64_t>(100, 30), kVocab, 11)) w->append(d);
    } catch (...) {
      _exit(2);
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const auto temps = token_store_temp_files(path);
  ASSERT_EQ(temps.size(), 1u);
  EXPECT_GT(fs::file_size(temps[0]), 0u);

  // Readers keep getting the old, complete store; the half-written file is never opened.
  expect_round_trip(path, old_docs);
  // Without a committed store, the error names the leftover.
  const std::string other = (dir / "other.h5").string();
  fs::rename(path, other);
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); },
               {path, "no such token store", temps[0], "unfinished write"});
  fs::rename(other, path);

  // The next writer of the same target removes it (its process is gone) and commits normally.
  const auto new_docs = make_docs({3, 4, 5}, kVocab, 12);
  write_store(path, new_docs);
  EXPECT_TRUE(token_store_temp_files(path).empty());
  expect_round_trip(path, new_docs);
}

TEST(TokenStore, NewStoreBesideOldSidecarFailsVerification) {
  // The state a crash between the two renames leaves: new store, old sidecar.
  const auto dir = scratch_dir();
  const std::string path = (dir / "s.h5").string();
  write_store(path, make_docs({5, 6}, kVocab, 13));
  const std::string old_sidecar = (dir / "old.sha256").string();
  fs::copy_file(token_store_sidecar_path(path), old_sidecar);
  write_store(path, make_docs({9, 9, 9}, kVocab, 14));
  fs::copy_file(old_sidecar, token_store_sidecar_path(path), fs::copy_options::overwrite_existing);
  expect_error([&] { TokenStoreReader::open(path, kFingerprint); }, {path, "checksum mismatch", "two renames"});
}
