#pragma once
// `ft bench`: adapter versus full fine-tuning, with and without forgetting control, measured on the
// same model, data and budget, and reported side by side.
//
// A bench config (YAML) names a base run config, overrides shared by every variant (the budget),
// and the variants, each a list of overrides (and optionally its own run config):
//
//   base: configs/continue-jargon.yaml
//   overrides: [max_steps=100, eval.every=20]
//   target_set: held_out        # the run's evaluation set of the new domain
//   general_set: fortunes       # ... and of the domain to keep
//   reference: full             # forgetting removed / gain kept are relative to this variant
//   fisher: {stores: [runs/default/fortunes.h5], samples: 128}   # for variants that set ewc.*
//   output_dir: runs/bench
//   variants:
//     - {name: full}
//     - {name: full+ewc, overrides: [ewc.lambda=100]}
//     - {name: lora, config: configs/lora-jargon.yaml}
//
// The base model is evaluated first on every set (the baseline). The Fisher is estimated once, on
// the base model, when a variant uses EWC (its ewc.state is filled in). Each variant is a normal
// training run in output_dir/<name> (rerunning the bench resumes unfinished ones). The reports are
// written from the runs' metrics files: report.md (a table), report.html (the table and SVG plots
// of the evaluation losses per step on both domains, the training loss, peak memory and speed; no
// network access needed) and results.json.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "ft/config/run_config.h"

namespace ft::bench {

struct Variant {
  std::string name;
  std::string config;                  ///< run config; empty = the bench's base
  std::vector<std::string> overrides;  ///< after the bench's shared overrides
};

struct FisherSection {
  std::vector<std::string> stores;
  int64_t samples = 128;
  int64_t seq_len = 0;  ///< 0: the base run's data.seq_len
  uint64_t seed = 0;
};

struct BenchConfig {
  std::string source;
  std::string base;
  std::vector<std::string> overrides;
  std::string target_set = "held_out", general_set;
  std::string reference;  ///< empty: the first variant
  FisherSection fisher;
  std::string output_dir;
  std::vector<Variant> variants;
};

/// Reads a bench config; unknown keys, missing fields and duplicate variant names are errors naming
/// the file. `overrides` (section.key=value) apply to the bench config itself (e.g. output_dir=...).
BenchConfig load_bench_config(const std::string& path, const std::vector<std::string>& overrides = {});

struct Curve {
  std::vector<int64_t> steps;
  std::vector<double> values;
};

struct VariantResult {
  std::string name, mode, run_dir;
  bool ewc = false, replay = false;
  int64_t trainable_params = 0, total_params = 0;
  double peak_memory_mib = 0.0;  ///< largest peak_rss_mib (CPU) or peak_device_mib (CUDA) of the train lines
  double tokens_per_s = 0.0;     ///< the last train line's (the run's average)
  double train_seconds = 0.0;    ///< Σ step_time_s
  double eval_seconds = 0.0;     ///< Σ eval_time_s (baseline evaluation at step 0 included)
  double target_loss = 0.0, general_loss = 0.0;  ///< the last evaluation of each set
  std::map<std::string, Curve> eval;  ///< per set, steps 0 (baseline) .. max_steps
  Curve train_loss;
};

struct BenchResult {
  std::string target_set, general_set, reference, source;
  std::map<std::string, double> baseline;  ///< per set: the base model's loss
  std::vector<VariantResult> variants;
};

/// Runs what is missing and collects every variant's figures. Progress goes to `log`.
BenchResult run_bench(const BenchConfig& config, std::FILE* log = stderr);

/// A finished variant's figures from its run directory (metrics.jsonl); throws ft::Error naming the
/// file when a figure is missing.
VariantResult read_variant(const std::string& name, const std::string& run_dir, const std::string& target_set,
                           const std::string& general_set);

/// Writes dir/report.md, dir/report.html and dir/results.json.
void write_reports(const BenchResult& result, const std::string& dir);

/// The Markdown table of report.md.
std::string markdown_table(const BenchResult& result);

}  // namespace ft::bench
