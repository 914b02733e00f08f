#pragma once
// A training run from a RunConfig, end to end: the recipe behind `ft train run.yaml`, callable from
// C++ programs. The loop is written out in run.cpp in one place: for each optimizer step, take
// grad_accum micro-batches from the batcher, count their targets, forward/backward with that count
// (step.h), then the guarded optimizer step with clipping and the scheduled rate (optimizer.h), then
// metrics, progress and, every eval.every steps, evaluation. At the end: a last evaluation and the
// model saved as a Hugging Face checkpoint in output_dir/final.
//
// Files in output_dir: config.yaml (the resolved config), metrics.jsonl (one JSON object per line:
// {"type":"train", "step", "loss", "lr", "grad_norm", "targets", "tokens", "tokens_per_s",
// "step_time_s", "skipped"} every log_every steps, {"type":"skip", ...} for every skipped step and
// {"type":"eval", "step", "set", "loss", "perplexity", "targets"} per evaluation set), final/.
#include <cstdio>
#include <map>
#include <string>

#include "ft/config/run_config.h"

namespace ft::train {

struct RunSummary {
  int64_t steps = 0;    ///< optimizer steps applied
  int64_t skipped = 0;  ///< steps skipped for non-finite values
  double first_loss = 0.0, last_loss = 0.0;
  std::map<std::string, double> final_eval_loss;  ///< per evaluation set
  std::string final_dir;
  double seconds = 0.0;
  double tokens_per_s = 0.0;
};

/// Runs `config`. Human-readable lines (setup, evaluations, the progress line) go to `log`.
/// Throws ft::Error for bad inputs (missing stores, a tokenizer mismatch, a CUDA setting without
/// CUDA) and, under on_nonfinite: stop, for a non-finite step.
RunSummary run_training(const config::RunConfig& config, std::FILE* log = stderr);

}  // namespace ft::train
