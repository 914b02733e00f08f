// ft eval: several evaluation sets at once, the base model first, then fine-tuned models or
// adapters beside it with the changes. ft fisher: the EWC state (Fisher information and anchor) of
// a model on the data of its domain.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "ft/adapt/lora.h"
#include "ft/adapt/prefix.h"
#include "ft/data/tokenizer.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/train/ewc.h"
#include "ft/train/run.h"
#include "ft/util/error.h"
#include "ft/util/progress.h"

namespace ft::cli {
namespace {

namespace fs = std::filesystem;

// "NAME=STORE[@N]": a named set; @N = the N held-out documents of a training run on STORE.
struct SetSpec {
  std::string name, store;
  int64_t held_out = 0;
};

SetSpec parse_set(const std::string& text) {
  const size_t eq = text.find('=');
  FT_CHECK(eq != std::string::npos && eq > 0, "--set '", text, "': expected NAME=STORE or NAME=STORE@HELD_OUT_DOCS");
  SetSpec s{text.substr(0, eq), text.substr(eq + 1), 0};
  if (const size_t at = s.store.rfind('@'); at != std::string::npos) {
    try {
      size_t used = 0;
      s.held_out = std::stoll(s.store.substr(at + 1), &used);
      FT_CHECK(used == s.store.size() - at - 1 && s.held_out > 0, "");
    } catch (const std::exception&) {
      FT_FAIL("--set '", text, "': '", s.store.substr(at + 1), "' is not a positive document count");
    }
    s.store = s.store.substr(0, at);
  }
  return s;
}

std::string fingerprint_of(const std::string& tokenizer, const std::string& first_store) {
  return tokenizer.empty() ? data::TokenStoreReader::inspect(first_store).tokenizer_fingerprint
                           : data::Tokenizer::load(tokenizer).fingerprint();
}

// A variant to evaluate: the base with a fine-tuned checkpoint in its place, or with an adapter.
model::CausalLM load_variant(const std::string& base, const std::string& spec, c10::Device device) {
  io::LoadOptions lo;
  lo.device = device;
  if (spec.empty()) return io::load_pretrained(base, lo);
  if (fs::exists(fs::path(spec) / "adapter_config.json")) {
    model::CausalLM m = io::load_pretrained(base, lo);
    if (adapt::peft_adapter_type(spec) == "PREFIX_TUNING") adapt::load_peft_prefix(m, spec);
    else adapt::load_peft_adapter(m, spec);
    return m;
  }
  return io::load_pretrained(spec, lo);
}

}  // namespace

void add_eval(CLI::App& app) {
  struct Args {
    std::string base, tokenizer, json, device = "auto";
    std::vector<std::string> variants, sets;
    int64_t seq_len = 512, batch_size = 8, max_batches = 0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("eval", "Evaluate a base model and fine-tuned versions of it on several sets at once");
  cmd->add_option("base", a->base, "The base model (Hugging Face checkpoint directory)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("variants", a->variants,
                  "Fine-tuned checkpoints or PEFT adapters (LoRA, prefix) of the base, evaluated after it")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-s,--set", a->sets, "NAME=STORE, or NAME=STORE@N for the N held-out documents a training run "
                                       "with eval.held_out_docs: N sets aside")->required();
  cmd->add_option("-t,--tokenizer", a->tokenizer, "The stores must have been made with this tokenizer");
  cmd->add_option("--seq-len", a->seq_len, "Packed row length")->capture_default_str();
  cmd->add_option("--batch-size", a->batch_size, "Rows per forward pass")->capture_default_str();
  cmd->add_option("--max-batches", a->max_batches, "Per set; 0 = the whole set")->capture_default_str();
  cmd->add_option("--json", a->json, "Also write the results as JSON");
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  cmd->footer("The base is always evaluated first; every variant's loss and perplexity are shown with their change\n"
              "against it (negative = better): the gain on the target domain and the forgetting on the general one.");
  cmd->callback([a] {
    const c10::Device device = parse_device(a->device);
    std::vector<SetSpec> sets;
    for (const auto& t : a->sets) {
      sets.push_back(parse_set(t));
      for (size_t i = 0; i + 1 < sets.size(); ++i) {
        FT_CHECK(sets[i].name != sets.back().name, "--set '", t, "': the name '", sets.back().name,
                 "' is taken by an earlier set; each set needs a name of its own");
      }
    }
    const std::string fp = fingerprint_of(a->tokenizer, sets.front().store);
    std::vector<std::string> names = {"base"};
    for (const auto& v : a->variants) {
      fs::path p = fs::path(v).lexically_normal();
      names.push_back((p.has_filename() ? p : p.parent_path()).string());
    }
    // results[variant][set]
    std::vector<std::vector<train::EvalLoss>> results;
    for (size_t vi = 0; vi < names.size(); ++vi) {
      model::CausalLM m = load_variant(a->base, vi == 0 ? "" : a->variants[vi - 1], device);
      std::vector<train::EvalLoss> row;
      for (const auto& s : sets) {
        auto reader = data::TokenStoreReader::open(s.store, fp);
        FT_CHECK(reader->info().vocab_size <= m->config().vocab_size, "[eval] ", s.store, ": vocabulary ",
                 reader->info().vocab_size, " is larger than the model's ", m->config().vocab_size);
        at::NoGradGuard no_grad;
        const train::EvalLoss e = train::evaluate_sources(m, {data::BatcherSource{reader, 1.0}}, a->seq_len,
                                                          a->batch_size, s.held_out, a->max_batches, device);
        FT_CHECK(e.targets > 0, "[eval] set '", s.name, "' (", s.store, ") has no target token");
        row.push_back(e);
        std::fprintf(stderr, "[eval] %s on %s: loss %.4f (%lld targets)\n", names[vi].c_str(), s.name.c_str(), e.loss,
                     static_cast<long long>(e.targets));
      }
      results.push_back(std::move(row));
    }
    std::cout << "| model |";
    for (const auto& s : sets) std::cout << " " << s.name << " loss | " << s.name << " perplexity |";
    std::cout << "\n| --- |";
    for (size_t i = 0; i < sets.size(); ++i) std::cout << " --- | --- |";
    std::cout << "\n";
    nlohmann::ordered_json j = nlohmann::ordered_json::array();
    for (size_t vi = 0; vi < names.size(); ++vi) {
      std::cout << "| " << names[vi] << " |";
      nlohmann::ordered_json row = {{"model", names[vi]}};
      for (size_t si = 0; si < sets.size(); ++si) {
        const double loss = results[vi][si].loss, base = results[0][si].loss;
        char cell[160];
        if (vi == 0) {
          std::snprintf(cell, sizeof cell, " %.4f | %.2f |", loss, std::exp(loss));
        } else {
          std::snprintf(cell, sizeof cell, " %.4f (%+.4f) | %.2f (%+.1f%%) |", loss, loss - base, std::exp(loss),
                        100.0 * (std::exp(loss - base) - 1.0));
        }
        std::cout << cell;
        row[sets[si].name] = {{"loss", loss}, {"perplexity", std::exp(loss)}, {"delta_loss", loss - base},
                              {"targets", results[vi][si].targets}};
      }
      std::cout << "\n";
      j.push_back(row);
    }
    if (!a->json.empty()) std::ofstream(a->json) << j.dump(2) << "\n";
  });
}

void add_fisher(CLI::App& app) {
  struct Args {
    std::string model, output, previous, tokenizer, device = "auto";
    std::vector<std::string> stores;
    int64_t samples = 256, seq_len = 512;
    uint64_t seed = 0;
    double gamma = 1.0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("fisher", "Estimate the EWC state (diagonal Fisher and anchor) of a model on its domain's data");
  cmd->add_option("model", a->model, "Model (Hugging Face checkpoint directory)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("stores", a->stores, "Token stores of the domain to protect")->required();
  cmd->add_option("-o,--output", a->output, "Output .h5 file (for ewc.state in a run config)")->required();
  cmd->add_option("-n,--samples", a->samples, "Rows (samples) to average over")->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "Packed row length")->capture_default_str();
  cmd->add_option("--seed", a->seed, "Which rows: the shuffle seed")->capture_default_str();
  auto* previous = cmd->add_option("--previous", a->previous, "An earlier EWC state to fold in (online EWC)")
                       ->check(CLI::ExistingFile);
  cmd->add_option("--gamma", a->gamma, "Decay of the earlier state: F = gamma * F_previous + F_new (with --previous)")
      ->capture_default_str()
      ->needs(previous);
  cmd->add_option("-t,--tokenizer", a->tokenizer, "The stores must have been made with this tokenizer");
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  cmd->footer("F = mean over rows of the squared gradient of the row's mean token log-likelihood, for every parameter,\n"
              "at the model's weights (the anchor). Written as HDF5 arrays fisher:<name> and anchor:<name>.");
  cmd->callback([a] {
    const c10::Device device = parse_device(a->device);
    io::LoadOptions lo;
    lo.device = device;
    model::CausalLM m = io::load_pretrained(a->model, lo);
    const std::string fp = fingerprint_of(a->tokenizer, a->stores.front());
    std::vector<data::BatcherSource> sources;
    for (const auto& p : a->stores) sources.push_back({data::TokenStoreReader::open(p, fp), 1.0});
    data::BatcherOptions o;
    o.seq_len = a->seq_len;
    o.batch_size = 1;
    o.seed = a->seed;
    o.max_epochs = 1;
    data::Batcher rows(sources, o);
    Progress progress("fisher", static_cast<double>(a->samples), "rows");
    train::EwcState s = train::estimate_fisher(m, rows, a->samples, [&](int64_t done, int64_t) {
      progress.update(static_cast<double>(done), "");
    });
    progress.finish();
    if (!a->previous.empty()) s = train::accumulate_online(train::load_ewc(a->previous), s, a->gamma);
    train::save_ewc(s, a->output);
    double total = 0.0, largest = 0.0;
    int64_t n = 0;
    for (const auto& [name, f] : s.fisher) {
      total += f.sum().item<double>();
      largest = std::max(largest, f.max().item<double>());
      n += f.numel();
    }
    std::cout << "Fisher of " << n << " weights from " << s.samples << " rows" << (s.tasks > 1 ? " (online, task " : "")
              << (s.tasks > 1 ? std::to_string(s.tasks) + ")" : "") << ": mean " << total / static_cast<double>(n)
              << ", max " << largest << "; wrote " << a->output << "\n";
  });
}

}  // namespace ft::cli
