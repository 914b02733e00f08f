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

/// The generators this process draws dropout from (the CPU's and, on CUDA, `device`'s), as one
/// uint8 tensor: what a data-parallel rank other than 0 contributes to rank 0's checkpoint.
at::Tensor own_rng_state(c10::Device device);

/// Writes the checkpoint files into `dir` (the temporary directory of CheckpointDir::save).
/// `other_ranks[k - 1]` is rank k's own_rng_state() in a data-parallel run (each rank draws its own
/// dropout stream); it is stored as "rank<k>" in rng.safetensors.
void write_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                          const torch::optim::Optimizer& optimizer, const TrainerState& state,
                          const std::string& identity, const std::vector<at::Tensor>& other_ranks = {});

/// Restores weights, optimizer state and RNG states from a verified checkpoint `dir` and returns the
/// trainer state. Throws ft::Error naming the file and tensor for anything that does not fit (a
/// missing or unexpected tensor, a shape or dtype change, another run's identity). Rank k > 0 of a
/// data-parallel run restores its own generators ("rank<k>", onto `device`'s).
TrainerState read_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                                 torch::optim::Optimizer& optimizer, const std::string& identity, int rank = 0,
                                 c10::Device device = c10::kCPU);

}  // namespace ft::train
