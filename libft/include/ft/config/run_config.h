#pragma once
// The typed configuration of a training run (`ft train run.yaml`), parsed from YAML.
//
// Every default lives here, in the struct fields. The parser is strict: an unknown key (with a
// suggestion when it looks like a typo), a duplicate key (yaml-cpp would silently keep the first), a
// wrong type or a value out of range is an error naming file:line:column, and every error of the
// file is reported at once. Relative paths are relative to the working directory, as for the other
// `ft` commands. Overrides "section.key=value" (the value is YAML) are applied before validation.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ft::config {

struct ModelSection {
  /// Hugging Face checkpoint directory to fine-tune. Exactly one of checkpoint / config.
  std::string checkpoint;
  /// Or: a config.json to build a fresh model from (continued pretraining from scratch) ...
  std::string config;
  /// ... initialised with this seed (init_weights).
  uint64_t init_seed = 0;
};

struct DataSection {
  std::vector<std::string> train;  ///< token stores (ft prepare), concatenated; at least one
  int64_t seq_len = 512;           ///< packed row length
  int64_t batch_size = 8;          ///< rows per micro-batch
  int64_t grad_accum = 1;          ///< micro-batches per optimizer step
  bool shuffle = true;
  uint64_t seed = 0;               ///< shuffle seed
};

struct OptimizerSection {
  std::string name = "adamw";  ///< adamw | sgd
  double lr = 3e-4;
  double beta1 = 0.9, beta2 = 0.999;  ///< YAML: betas: [0.9, 0.999]
  double weight_decay = 0.0;          ///< never on norms, biases and embeddings
  double eps = 1e-8;
  double momentum = 0.0;              ///< sgd only
};

struct ScheduleSection {
  std::string name = "cosine";  ///< constant | linear | cosine
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;      ///< 0: max_steps
};

struct EvalSection {
  std::vector<std::string> stores;  ///< separate evaluation stores (read whole, in order)
  /// Documents of the training stores held out of training and evaluated on (0 = none).
  int64_t held_out_docs = 0;
  int64_t every = 0;                ///< evaluate every N optimizer steps and at the end (0 = only at the end)
  int64_t max_batches = 0;          ///< per set; 0 = the whole set
  int64_t batch_size = 0;           ///< 0: data.batch_size
};

struct RunConfig {
  std::string source;  ///< where it was read from (for messages)
  ModelSection model;
  std::string tokenizer;  ///< optional tokenizer.model (or directory); stores must match it
  DataSection data;
  OptimizerSection optimizer;
  ScheduleSection schedule;
  int64_t max_steps = 0;          ///< optimizer steps; required > 0
  double clip_grad_norm = 1.0;    ///< 0 = off
  std::string dtype = "float32";  ///< float32 | bfloat16 (bfloat16: autocast, CUDA only)
  std::string device = "cpu";     ///< cpu | cuda | cuda:N | auto
  EvalSection eval;
  int64_t log_every = 1;          ///< metrics.jsonl line every N steps
  std::string output_dir;         ///< required; metrics.jsonl, config.yaml and final/ go here
  std::string on_nonfinite = "skip";  ///< skip | stop
};

/// Parses YAML text; `source` names it in errors. Throws ft::Error listing every problem, one per
/// line, each as "source:line:column: message".
RunConfig parse_run_config(std::string_view yaml, const std::string& source,
                           const std::vector<std::string>& overrides = {});
/// Reads and parses a file.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});
/// The resolved configuration (all defaults filled in) as YAML that parse_run_config accepts.
std::string to_yaml(const RunConfig& config);

}  // namespace ft::config
