// ft prepare: tokenize a corpus once into an HDF5 token store; ft train-tokenizer: a sentencepiece
// model from text files.
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/data/prepare.h"
#include "ft/util/error.h"

namespace ft::cli {

void add_prepare(CLI::App& app) {
  struct Args {
    std::vector<std::string> inputs, extensions;
    std::string output, tokenizer, format = "text", split = "file", separator = "%", chat_template, on_error = "fail";
    std::vector<std::string> template_vars;
    std::string too_long = "error", train_turns = "all";
    int64_t max_tokens = 0;
    double max_bad_fraction = 0.0;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("prepare", "Tokenize a corpus once into an HDF5 token store (+ .sha256 sidecar)");
  cmd->add_option("inputs", a->inputs, "Files and directories (directories are walked in sorted order)")->required();
  cmd->add_option("-o,--output", a->output, "Token store to write, e.g. data/train.h5")->required();
  cmd->add_option("-t,--tokenizer", a->tokenizer, "tokenizer.model or tokenizer.json, or a checkpoint directory holding one")->required();
  cmd->add_option("--format", a->format, "text | jsonl | instruction | chat")->capture_default_str();
  auto* split = cmd->add_option("--split", a->split, "Plain text: file | blank_lines | separator")->capture_default_str();
  auto* separator = cmd->add_option("--separator", a->separator, "Plain text: the line that ends a document (--split separator)")
                        ->capture_default_str();
  cmd->add_option("--ext", a->extensions, "Only files with these extensions in directories (e.g. .jsonl)");
  auto* chat_template =
      cmd->add_option("--template", a->chat_template,
                      "Chat template: llama2 | chatml | model (the tokenizer directory's own Jinja template) | FILE.jinja "
                      "(chat data; optional for instruction)");
  cmd->add_option("--template-var", a->template_vars,
                  "NAME=VALUE for --template model, as apply_chat_template's keyword arguments (e.g. enable_thinking=false); "
                  "VALUE is JSON, or else a string")
      ->needs(chat_template);
  auto* train_turns =
      cmd->add_option("--train-turns", a->train_turns,
                      "Chat data: all | last | each: train every assistant turn, the final one only (the others "
                      "are context; for templates such as gpt-oss's that render a turn differently once others "
                      "follow), or each one in an example of its own (the conversation up to it)")
          ->capture_default_str();
  cmd->add_option("--max-tokens", a->max_tokens, "Longest document in tokens (0 = no limit)")->capture_default_str();
  auto* too_long =
      cmd->add_option("--too-long", a->too_long, "error | truncate documents above --max-tokens")->capture_default_str();
  cmd->add_option("--threads", a->threads, "Tokenizer threads (0 = one per core); the output is the same for any value")
      ->capture_default_str();
  cmd->add_option("--on-error", a->on_error, "fail | skip bad records")->capture_default_str();
  auto* max_bad = cmd->add_option("--max-bad-fraction", a->max_bad_fraction, "With skip: stop if more records than this are bad")
                      ->capture_default_str();
  cmd->callback([=] {
    // An option that applies only with another is an error without it, not silently ignored.
    FT_CHECK(a->format == "text" || (split->count() == 0 && separator->count() == 0),
             "--split and --separator apply to --format text only, not to --format ", a->format);
    FT_CHECK(separator->count() == 0 || a->split == "separator", "--separator applies with --split separator only");
    FT_CHECK(chat_template->count() == 0 || a->format == "chat" || a->format == "instruction",
             "--template applies to --format chat or instruction only, not to --format ", a->format);
    FT_CHECK(train_turns->count() == 0 || a->format == "chat", "--train-turns applies to --format chat only, not to --format ",
             a->format);
    FT_CHECK(too_long->count() == 0 || a->max_tokens > 0, "--too-long applies with --max-tokens N (N > 0) only");
    FT_CHECK(max_bad->count() == 0 || a->on_error == "skip", "--max-bad-fraction applies with --on-error skip only");
    data::PrepareOptions o;
    o.inputs = a->inputs;
    o.output = a->output;
    o.records.format = data::parse_record_format(a->format);
    o.records.split = data::parse_text_split(a->split);
    o.records.separator = a->separator;
    o.records.extensions = a->extensions;
    o.tokenize.chat_template = a->chat_template;
    for (const auto& v : a->template_vars) o.tokenize.template_vars.push_back(data::parse_template_var(v));
    o.tokenize.train_turns = data::parse_train_turns(a->train_turns);
    o.tokenize.max_tokens = a->max_tokens;
    o.tokenize.threads = a->threads;
    FT_CHECK(a->too_long == "error" || a->too_long == "truncate", "--too-long: '", a->too_long,
             "' is not error or truncate");
    o.tokenize.too_long = a->too_long == "error" ? data::TokenizeOptions::TooLong::error
                                                 : data::TokenizeOptions::TooLong::truncate;
    FT_CHECK(a->on_error == "fail" || a->on_error == "skip", "--on-error: '", a->on_error, "' is not fail or skip");
    o.policy.on_error = a->on_error == "fail" ? data::ErrorPolicy::OnError::fail : data::ErrorPolicy::OnError::skip;
    o.policy.max_bad_fraction = a->max_bad_fraction;
    const data::Tokenizer tokenizer = data::Tokenizer::load(a->tokenizer);
    const data::PrepareResult r = data::prepare_token_store(o, tokenizer);
    std::cout << "wrote " << r.store.path << ": " << r.store.n_docs << " documents, " << r.store.n_tokens
              << " tokens (" << r.store.n_trainable_tokens << " trainable) from " << r.store.source_files.size()
              << " files, " << r.input_bytes / 1e6 << " MB in " << r.seconds << " s ("
              << r.input_bytes / 1e6 / std::max(r.seconds, 1e-9) << " MB/s)\n"
              << r.report.summary() << "\n";
  });
}

void add_train_tokenizer(CLI::App& app) {
  auto o = std::make_shared<data::TrainTokenizerOptions>();
  auto out_dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("train-tokenizer", "Train a sentencepiece tokenizer.model (byte fallback, Llama-style)");
  cmd->add_option("inputs", o->inputs, "Text files (one sentence or paragraph per line)")->required()->check(CLI::ExistingFile);
  cmd->add_option("-o,--output", *out_dir, "Directory to write tokenizer.model into")->required();
  cmd->add_option("--vocab-size", o->vocab_size, "Vocabulary size")->capture_default_str();
  cmd->add_option("--model-type", o->model_type, "bpe | unigram")->capture_default_str();
  cmd->add_option("--sentences", o->input_sentence_size, "Train on a seeded sample of this many lines (0 = all)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Sampling seed")->capture_default_str();
  cmd->callback([o, out_dir] {
    std::filesystem::create_directories(*out_dir);
    o->model_prefix = (std::filesystem::path(*out_dir) / "tokenizer").string();
    const std::string model = data::Tokenizer::train(*o);
    const data::Tokenizer t = data::Tokenizer::load(model);
    std::cout << "wrote " << model << ": vocabulary " << t.vocab_size() << ", fingerprint " << t.fingerprint() << "\n";
  });
}

}  // namespace ft::cli
