#pragma once
// What a training checkpoint holds, and how the trainer writes and restores it (the directory
// mechanics, atomicity and verification are checkpoint.h's).
//
// Files: model.safetensors   the adaptation mode's tensors (the trainable weights; mode.h), by name
//        optimizer.safetensors  per parameter "<name>.exp_avg", "<name>.exp_avg_sq" (AdamW) or
//                            "<name>.momentum_buffer" (SGD), float32 as the optimizer keeps them
//        rng.safetensors     the default generators' states ("cpu", "cuda:N"), uint8
//        trainer_state.json  counters, the batcher's position, metrics.jsonl's length, best
//                            evaluation, early-stopping count, AdamW step counts, the run identity
// Restoring all of it makes the next step exactly the step an uninterrupted run would take.
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <limits>
#include <map>
#include <string>

#include "ft/adapt/mode.h"
#include "ft/config/run_config.h"
#include "ft/data/batcher.h"
#include "ft/model/llama.h"

namespace ft::train {

struct TrainerState {
  int64_t step = 0;               ///< optimizer steps applied
  int64_t skipped = 0;            ///< steps skipped for non-finite values
  int64_t consecutive_skips = 0;
  data::BatcherState batcher;     ///< position of the next batch
  uint64_t metrics_bytes = 0;     ///< metrics.jsonl's length at the save (a resume truncates to it)
  int64_t tokens_total = 0;
  double first_loss = 0.0, last_loss = 0.0;
  int64_t best_step = -1;         ///< step of the best evaluation (first eval set), -1 before any
  double best_loss = std::numeric_limits<double>::infinity();
  int64_t evals_since_best = 0;   ///< for early stopping
  int64_t micro_batch_rows = 0;   ///< rows per forward pass when out-of-memory halving changed it (0 = batch_size)
  std::map<std::string, double> last_eval;  ///< per set
};

/// The config fields a resumed run must share with the run that wrote the checkpoint (model source,
/// tokenizer, data, mode, optimizer kind): JSON text, compared key by key.
std::string run_identity(const config::RunConfig& config);

/// Writes the checkpoint files into `dir` (the temporary directory of CheckpointDir::save).
void write_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                          const torch::optim::Optimizer& optimizer, const TrainerState& state,
                          const std::string& identity);

/// Restores weights, optimizer state and RNG states from a verified checkpoint `dir` and returns the
/// trainer state. Throws ft::Error naming the file and tensor for anything that does not fit (a
/// missing or unexpected tensor, a shape or dtype change, another run's identity).
TrainerState read_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                                 torch::optim::Optimizer& optimizer, const std::string& identity);

}  // namespace ft::train
