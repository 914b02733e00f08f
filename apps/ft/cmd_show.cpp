// ft show: the documents of a token store as text, with what is trained marked.
#include <unistd.h>

#include <cstdio>
#include <iomanip>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "ft/data/token_store.h"
#include "ft/data/tokenizer.h"
#include "ft/util/error.h"

namespace ft::cli {

namespace {

// How trained text is marked: ANSI colours (green text, special tokens bold), or « » around it.
struct Marks {
  bool color = false;
  std::string open() const { return color ? "\x1b[32m" : "\xC2\xAB"; }
  std::string close() const { return color ? "\x1b[0m" : "\xC2\xBB"; }
  std::string special(const std::string& piece) const { return color ? "\x1b[1m" + piece + "\x1b[22m" : piece; }
};

std::string percent(int64_t part, int64_t whole) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << (whole > 0 ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0)
     << "%";
  return os.str();
}

void show_document(const data::TokenStoreReader& store, const data::Tokenizer& tok, int64_t doc, bool tokens,
                   const Marks& marks) {
  const int64_t n = store.doc_length(doc);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::vector<uint8_t> trainable(static_cast<size_t>(n));
  store.read(doc, 0, n, ids.data(), trainable.data());
  int64_t trained = 0;
  for (uint8_t t : trainable) trained += t;
  std::cout << "document " << doc << ": " << n << " tokens, " << trained << " trained (" << percent(trained, n) << ")\n";
  // Trained text in one marked region, special tokens inside it included.
  std::string line;
  bool in_mark = false;
  for (const data::TextSpan& s : tok.decode_spans(ids, trainable)) {
    if (s.trainable != in_mark) {
      line += s.trainable ? marks.open() : marks.close();
      in_mark = s.trainable;
    }
    line += s.special ? marks.special(s.text) : s.text;
  }
  if (in_mark) line += marks.close();
  std::cout << line << "\n";
  if (tokens) {
    std::cout << "  " << std::setw(6) << "index" << "  " << std::setw(8) << "id" << "  trained  piece\n";
    for (int64_t i = 0; i < n; ++i) {
      std::cout << "  " << std::setw(6) << i << "  " << std::setw(8) << ids[i] << "  " << std::setw(7)
                << int(trainable[i]) << "  " << nlohmann::json(tok.id_to_piece(ids[i])).dump(-1, ' ', false,
                                                                                   nlohmann::json::error_handler_t::replace)
                << "\n";
    }
  }
  std::cout << "\n";
}

}  // namespace

void add_show(CLI::App& app) {
  struct Args {
    std::string store, tokenizer, color = "auto";
    int64_t count = 3;
    std::vector<int64_t> docs;
    bool tokens = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "show", "Show documents of a token store as text, with the trained tokens marked (« » or green)");
  cmd->add_option("store", a->store, "Token store (.h5) written by ft prepare")->required();
  cmd->add_option("-t,--tokenizer", a->tokenizer, "The tokenizer the store was written with (file or directory)")
      ->required();
  auto* count = cmd->add_option("-n,--count", a->count, "Show the first N documents")->capture_default_str()
                    ->check(CLI::PositiveNumber);
  cmd->add_option("-d,--doc", a->docs, "Show these documents (0-based; repeat the option)")->excludes(count);
  cmd->add_flag("--tokens", a->tokens, "Also list each token: index, id, trained, piece");
  cmd->add_option("--color", a->color, "Colour trained text instead of « »: auto (on a terminal), always, never")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "always", "never"}));
  cmd->callback([a] {
    const data::Tokenizer tok = data::Tokenizer::load(a->tokenizer);
    // Opening checks the store's checksum and that this tokenizer wrote it.
    const auto store = data::TokenStoreReader::open(a->store, tok.fingerprint());
    const data::TokenStoreInfo& info = store->info();
    std::vector<int64_t> docs = a->docs;
    if (docs.empty()) {
      for (int64_t d = 0; d < std::min(a->count, store->n_docs()); ++d) docs.push_back(d);
    }
    for (int64_t d : docs) {
      FT_CHECK(d >= 0 && d < store->n_docs(), "--doc ", d, ": ", a->store, " has documents 0 to ", store->n_docs() - 1);
    }
    Marks marks;
    marks.color = a->color == "always" || (a->color == "auto" && ::isatty(STDOUT_FILENO));
    std::cout << a->store << ": " << info.n_docs << " documents, " << info.n_tokens << " tokens, "
              << info.n_trainable_tokens << " trained (" << percent(info.n_trainable_tokens, info.n_tokens) << "), from";
    for (const auto& f : info.source_files) std::cout << " " << f;
    std::cout << "\n\n";
    for (int64_t d : docs) show_document(*store, tok, d, a->tokens, marks);
  });
}

}  // namespace ft::cli
