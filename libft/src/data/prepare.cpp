#include "ft/data/prepare.h"

#include <chrono>
#include <filesystem>
#include <sstream>

#include "ft/data/chat_template.h"
#include "ft/util/progress.h"

namespace ft::data {

PrepareResult prepare_token_store(const PrepareOptions& o, const Tokenizer& tokenizer) {
  const auto start = std::chrono::steady_clock::now();
  PrepareResult result;
  const std::vector<std::string> files = list_source_files(o.inputs, o.records.extensions);
  for (const auto& f : files) result.input_bytes += static_cast<int64_t>(std::filesystem::file_size(f));

  TokenStoreWriteOptions store_options;
  store_options.tokenizer_fingerprint = tokenizer.fingerprint();
  store_options.vocab_size = tokenizer.vocab_size();
  store_options.source_files = files;
  TokenStoreWriter writer(o.output, store_options);

  TokenizerEncoder encoder(tokenizer);
  ExampleReader reader(o.inputs, o.records, o.tokenize, o.policy, encoder);
  Progress progress("prepare", 0, "docs", o.progress);
  Example example;
  RecordOrigin origin;
  int64_t tokens = 0;
  while (reader.next(example, origin)) {
    writer.append(example);
    tokens += static_cast<int64_t>(example.tokens.size());
    if (writer.n_docs() % 256 == 0) {  // formatting the line per document cost more than 10% of the caller's time
      std::ostringstream extra;
      extra << tokens << " tokens, " << reader.report().skipped << " skipped";
      progress.update(static_cast<double>(writer.n_docs()), extra.str());
    }
  }
  result.report = reader.report();
  writer.add_skipped(result.report.skipped);
  result.store = writer.finish();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ostringstream extra;
  extra << result.store.n_tokens << " tokens, " << result.report.skipped << " skipped";
  progress.finish(extra.str());
  return result;
}

}  // namespace ft::data
