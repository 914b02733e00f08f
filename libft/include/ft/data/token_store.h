#pragma once
// The token store: tokenized documents in one HDF5 file, written once by TokenStoreWriter and read
// at random by TokenStoreReader (and through it by the Batcher). Torch-free.
//
// File layout (format version 1), all little-endian:
//
//   /tokens        int32[n_tokens]     every document's token ids, back to back
//   /trainable     uint8[n_tokens]     1 = the token is a label (see Example), 0 = context only
//   /doc_offsets   int64[n_docs + 1]   document i is tokens[doc_offsets[i], doc_offsets[i + 1]);
//                                      doc_offsets[0] = 0, doc_offsets[n_docs] = n_tokens
//   /source_files  UTF-8 variable-length strings: the input files the documents came from
//   root attributes:
//     format                 "libft.token_store"
//     format_version         int64, 1
//     tokenizer_fingerprint  the writing tokenizer's Tokenizer::fingerprint()
//     vocab_size             int64; every token id is in [0, vocab_size)
//     n_docs, n_tokens, n_trainable_tokens, n_skipped_records   int64 counts
//     created_by             "libft <version>"
//
// The three arrays are chunked (1-D, `chunk_tokens` elements per chunk; doc_offsets 8192) and
// filtered shuffle (multi-byte types) → deflate → Fletcher32, so Fletcher32 checks the bytes as
// stored and a damaged chunk is caught before inflate sees it. Any HDF5 reader (h5py, h5dump) can
// read the file.
//
// Integrity: next to `store.h5` lies `store.h5.sha256`, in sha256sum's format ("<64 hex>  store.h5\n",
// so `sha256sum -c store.h5.sha256` checks it by hand), holding the SHA-256 of the whole file.
// The reader hashes the file and compares BEFORE handing it to HDF5: HDF5's parser has a history of
// memory-safety bugs on malformed files, so libft only parses files it wrote and checksummed.
// SHA-256 rather than a faster non-cryptographic hash: the sidecar lies beside the file, so it
// proves completeness and integrity, not authenticity, and speed decides; OpenSSL's SHA-256 (SHA-NI
// or AVX2) runs at 1–2 GB/s, so verifying costs about a second per 500M tokens, and the standard
// format lets operators check a store with coreutils. The file name in the sidecar is informational:
// only the digest is compared, so a store renamed together with its sidecar still opens.
//
// Write protocol (crash safety): the writer fills `.store.h5.tmp.<host>.<pid>.<n>` in the target's
// directory, closes it, fsyncs it, hashes it, writes the sidecar to its own temporary file and
// fsyncs that, then renames the STORE into place, fsyncs the directory, renames the SIDECAR into
// place and fsyncs the directory again. The hash is taken of the closed, fsynced file, never while
// writing (HDF5 rewrites its superblock and object headers at close). The sidecar's rename is the
// commit point: a pair that verifies can only exist once the complete store is durable under its
// final name. A crash before the store's rename leaves the old pair (or none) untouched plus
// temporary files; a crash between the renames leaves the new store beside the old sidecar (or
// none), which fails verification with a message that says so. Publishing the sidecar first would
// make the commit record precede the data it vouches for, so that a pair's validity would rest on
// the content hash alone; with the store first, "sidecar present and matching" also means "every
// step before it completed".
//
// One writer per target at a time: two racing writers can leave one's store beside the other's
// sidecar, which fails verification rather than passing. Readers never open temporary files (they
// have other names); the reader's errors name any it finds, and a new writer for the same target
// deletes those whose process (on this host) is gone.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ft/data/example.h"

namespace ft::data {

inline constexpr int64_t kTokenStoreFormatVersion = 1;

/// Metadata of a verified store (or of one just written).
struct TokenStoreInfo {
  std::string path;
  int64_t format_version = 0;
  std::string tokenizer_fingerprint;
  int64_t vocab_size = 0;
  std::vector<std::string> source_files;
  int64_t n_docs = 0;
  int64_t n_tokens = 0;
  int64_t n_trainable_tokens = 0;
  int64_t n_skipped_records = 0;
  int64_t chunk_tokens = 0;  ///< elements per chunk of /tokens and /trainable
  std::string sha256;        ///< hex digest of the whole file (the sidecar's content)
  std::string created_by;
};

struct TokenStoreWriteOptions {
  std::string tokenizer_fingerprint;      ///< required
  int64_t vocab_size = 0;                 ///< required, > 0; appended token ids are checked against it
  std::vector<std::string> source_files;  ///< more can be added with add_source_file()
  /// Elements per chunk. A chunk is the unit HDF5 reads, checks and inflates: 16Ki tokens (64 KiB
  /// of int32) compress well and keep the read amplification of a random short document low.
  int64_t chunk_tokens = 16384;
  int deflate_level = 1;  ///< 1–9; token data gains little above 4 and writes slower
  /// Tokens buffered before they go to HDF5 (rounded up to whole chunks). Only whole chunks are
  /// written until finish(), so each chunk is compressed and placed in the file exactly once.
  int64_t buffer_tokens = 1 << 20;
};

/// Streams documents into a new store. Not thread-safe (one writer per thread; every HDF5 call in
/// libft is serialized by one process-wide lock, so writers and readers may live in different threads).
class TokenStoreWriter {
 public:
  /// Creates the temporary file beside `path` (see the write protocol above) and deletes stale
  /// temporary files of earlier, dead writers of the same target.
  TokenStoreWriter(const std::string& path, TokenStoreWriteOptions options);
  /// Without finish(): closes and deletes the temporary file, leaving any existing store untouched.
  ~TokenStoreWriter();
  TokenStoreWriter(const TokenStoreWriter&) = delete;
  TokenStoreWriter& operator=(const TokenStoreWriter&) = delete;

  /// Appends one document. Throws ft::Error (naming the store and the document's index) for an empty
  /// document, tokens/trainable of different lengths, a token id outside [0, vocab_size) or a
  /// trainable flag other than 0/1; the writer stays usable after such an error.
  void append(const Example& example);
  /// Counts records the reader skipped (malformed, filtered) for the store's metadata.
  void add_skipped(int64_t n = 1);
  void add_source_file(const std::string& file);

  int64_t n_docs() const;
  int64_t n_tokens() const;

  /// Flushes, closes and commits the store (the protocol above); returns its metadata. The writer
  /// is done afterwards (further calls throw).
  TokenStoreInfo finish();

  /// The temporary file's path (for tests and diagnostics).
  const std::string& temp_path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct TokenStoreReadOptions {
  /// Bytes of HDF5's chunk cache (decoded chunks, least recently used evicted first), shared 4:1
  /// between /tokens and /trainable. HDF5's default is 1 MiB per dataset, which makes a shuffled
  /// epoch inflate each chunk once per document it holds. 128 MiB keeps ~27M tokens decoded.
  size_t cache_bytes = size_t{128} << 20;
};

/// A verified, opened store. All methods lock the process-wide HDF5 lock, so a reader may be used
/// from several threads (calls are serialized).
class TokenStoreReader {
 public:
  /// Verifies `path` against `path`.sha256 (before HDF5 sees the file), opens it, checks the format
  /// and that it was written with the tokenizer whose fingerprint is `tokenizer_fingerprint`, and
  /// loads doc_offsets. Every failure is an ft::Error naming the store: missing store or sidecar
  /// (and any temporary files of an unfinished write), checksum mismatch, wrong format version,
  /// tokenizer mismatch (both fingerprints), inconsistent arrays.
  static std::shared_ptr<TokenStoreReader> open(const std::string& path, const std::string& tokenizer_fingerprint,
                                                const TokenStoreReadOptions& options = {});
  /// Verifies and reads only the metadata, whatever the tokenizer (for `ft data info`-style tools).
  static TokenStoreInfo inspect(const std::string& path);

  ~TokenStoreReader();
  TokenStoreReader(const TokenStoreReader&) = delete;
  TokenStoreReader& operator=(const TokenStoreReader&) = delete;

  const TokenStoreInfo& info() const;
  const std::string& path() const;
  int64_t n_docs() const;
  /// n_docs + 1 offsets into the token arrays (kept in memory: 8 bytes per document).
  std::span<const int64_t> doc_offsets() const;
  int64_t doc_length(int64_t doc) const;

  /// Document `doc` (0-based); throws ft::Error for an index out of range or an HDF5 read error
  /// (a Fletcher32 mismatch included), naming the store, dataset and document.
  Example doc(int64_t doc) const;
  /// Tokens [begin, begin + count) of document `doc` into `tokens` and `trainable` (either may be
  /// null to skip that dataset). One hyperslab read per dataset through the chunk cache.
  void read(int64_t doc, int64_t begin, int64_t count, int32_t* tokens, uint8_t* trainable) const;

 private:
  TokenStoreReader();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Hex SHA-256 of a whole file (what the sidecar holds). Throws ft::Error naming the path.
std::string sha256_file(const std::string& path);
/// `path` + ".sha256".
std::string token_store_sidecar_path(const std::string& path);
/// Temporary files of unfinished writes of `path` (`.<name>.tmp.*` and `.<name>.sha256.tmp.*` in
/// its directory), whether or not their writer still runs.
std::vector<std::string> token_store_temp_files(const std::string& path);

}  // namespace ft::data
