#pragma once
// Corpus → token store, once: read records, render and tokenize them, append them to an HDF5
// token store, with progress and a report of what was skipped. What `ft prepare` runs.
#include <cstdio>
#include <string>
#include <vector>

#include "ft/data/records.h"
#include "ft/data/token_store.h"
#include "ft/data/tokenizer.h"

namespace ft::data {

struct PrepareOptions {
  std::vector<std::string> inputs;  ///< files and directories
  std::string output;               ///< the store's path (its .sha256 sidecar goes beside it)
  RecordOptions records;
  TokenizeOptions tokenize = [] {
    TokenizeOptions t;
    t.threads = 0;  // one tokenizer thread per core
    return t;
  }();
  ErrorPolicy policy;
  std::FILE* progress = stderr;  ///< nullptr = quiet
};

struct PrepareResult {
  TokenStoreInfo store;
  ReadReport report;
  double seconds = 0;
  int64_t input_bytes = 0;  ///< size of the files read
};

/// Tokenizes `options.inputs` with `tokenizer` into a new store at `options.output`. The store is
/// committed only when everything was read within the error policy; otherwise nothing is written.
PrepareResult prepare_token_store(const PrepareOptions& options, const Tokenizer& tokenizer);

}  // namespace ft::data
