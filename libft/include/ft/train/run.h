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
// {"type":"eval", "step", "set", "loss", "perplexity", "targets", "best", "eval_time_s"} per evaluation set), final/, and
// checkpoints/step-NNNNNNNN/ (checkpoint.h, state.h).
//
// RESUME. With checkpoint.every > 0 the run saves every that many steps (and at the end, at an early
// stop, on SIGINT/SIGTERM and when a callback asks). A later `ft train` of the same config continues
// from the newest intact checkpoint: weights, optimizer moments, schedule position, the batcher's
// exact position and the RNG states are restored and metrics.jsonl is cut back to its length at
// that save, so the run's losses, sample order and final weights are bit-identical to a run that
// was never interrupted (on the same machine and thread count). Train lines carry "data", a hash of
// the step's input ids, so that the order of samples can be compared between runs.
//
// DATA PARALLEL. Started by a launcher (`ft launch -n N`, `torchrun --no-python ft train`, srun,
// mpirun; dist/dist.h), every process runs this same function: each takes its share of every
// step's rows (data.batch_size rows per micro-batch per rank), gradients are all-reduced in
// buckets during the backward pass, and losses, token counts, evaluations, callback requests and
// signals are reduced so that every rank takes the same decisions. Rank 0 alone writes the output
// directory (which every rank must be able to read, for resuming); the other ranks log nothing but
// errors. A run resumes on the same number of ranks only (the global batch is part of the run).
#include <cstdio>
#include <functional>
#include <map>
#include <string>

#include "ft/config/run_config.h"
#include "ft/data/batcher.h"
#include "ft/model/llama.h"
#include "ft/train/batch.h"

namespace ft::dist {
class ProcessGroup;
}

namespace ft::train {

/// Why a run ended.
enum class StopReason { MaxSteps, EarlyStopping, Signal, Callback };
const char* stop_reason_name(StopReason reason);

struct RunSummary {
  int64_t steps = 0;    ///< optimizer steps applied (in total, across resumes)
  int64_t skipped = 0;  ///< steps skipped for non-finite values
  double first_loss = 0.0, last_loss = 0.0;
  std::map<std::string, double> final_eval_loss;  ///< per evaluation set, at the last evaluation
  std::string final_dir;       ///< the Hugging Face export (empty when the run was interrupted)
  std::string last_checkpoint; ///< newest checkpoint directory (empty if none was written)
  int64_t best_step = -1;      ///< step of the best evaluation of the first set (-1: none)
  double best_loss = 0.0;
  int64_t resumed_from = -1;   ///< step of the checkpoint this process resumed from (-1: a fresh start)
  StopReason stop = StopReason::MaxSteps;
  int signal = 0;              ///< the signal that stopped it (StopReason::Signal)
  double seconds = 0.0;        ///< this process's wall time
  double tokens_per_s = 0.0;   ///< this process's training throughput
  int64_t trainable_params = 0, frozen_params = 0;  ///< elements (NF4 weights count as frozen)
  /// Peak memory while training in this process, MiB: the CUDA caching allocator's peak on a GPU,
  /// the resident set's (VmHWM, loading excluded) on the CPU.
  double peak_memory_mib = 0.0;
  int rank = 0, world = 1;  ///< this process's place in a data-parallel job (0 of 1 alone)
};

/// What a training program sees after every optimizer step (applied or skipped).
struct StepInfo {
  int64_t step = 0;        ///< steps applied so far (after this one)
  bool applied = true;     ///< false: skipped for a non-finite loss or gradient
  double loss = 0.0;       ///< token mean over the step
  double lr = 0.0;
  double grad_norm = 0.0;  ///< before clipping
  int64_t targets = 0, tokens = 0;
  double tokens_per_s = 0.0, step_time_s = 0.0;
};

struct EvalInfo {
  int64_t step = 0;
  std::string set;
  double loss = 0.0, perplexity = 0.0;
  int64_t targets = 0;
  bool best = false;  ///< the first set improved on its best so far
};

/// What a callback asks of the trainer after a step or an evaluation.
enum class Action {
  Continue,
  Evaluate,    ///< evaluate now (after a step)
  Checkpoint,  ///< save a checkpoint now
  Stop,        ///< save a checkpoint and end the run (StopReason::Callback)
};

/// Observes and steers a run from C++. Every method has a do-nothing default; the trainer calls them
/// on its own thread, between steps.
class Callbacks {
 public:
  virtual ~Callbacks() = default;
  virtual void on_start(const config::RunConfig&, int64_t /*start_step*/) {}
  virtual Action on_step(const StepInfo&) { return Action::Continue; }
  virtual Action on_eval(const EvalInfo&) { return Action::Continue; }
  virtual void on_checkpoint(int64_t /*step*/, const std::string& /*dir*/) {}
  virtual void on_end(const RunSummary&) {}
};

struct RunOptions {
  std::FILE* log = stderr;          ///< setup lines, evaluations, the progress line
  Callbacks* callbacks = nullptr;   ///< not owned
  /// SIGINT and SIGTERM finish the current step, save a checkpoint and end the run
  /// (StopReason::Signal); a second signal kills at once. The previous handlers come back at the end.
  bool handle_signals = false;
  /// Called before every forward pass of training (after any out-of-memory split), with its rows.
  /// For tracing, and for fault injection in tests (throwing c10::OutOfMemoryError here is handled
  /// as a real out-of-memory error would be).
  std::function<void(const BatchTensors&)> before_forward;
};

/// Runs `config`, resuming from output_dir/checkpoints when config.checkpoint.resume allows.
/// Throws ft::Error for bad inputs (missing stores, a tokenizer mismatch, a CUDA setting without
/// CUDA, checkpoints of another run) and, under on_nonfinite: stop, for a non-finite step.
RunSummary run_training(const config::RunConfig& config, const RunOptions& options);
RunSummary run_training(const config::RunConfig& config, std::FILE* log = stderr);

/// The training batcher of a fresh run of `config` (its stores opened and checked against the
/// tokenizer): micro-batch k of optimizer step s is its batch number s × grad_accum + k. For tools
/// that show or export exactly what a run trains on (`ft batches`).
data::Batcher training_batcher(const config::RunConfig& config);

/// "cpu", "cuda", "cuda:N", or "auto" (CUDA when available); throws ft::Error, its message starting
/// with `what`, for anything else or for CUDA on a machine without it. A CUDA device always comes
/// back with its index ("cuda" and "auto" give the current device's).
c10::Device resolve_device(const std::string& name, const std::string& what = "[train] device");

struct EvalLoss {
  double loss = 0.0;    ///< token mean (0 when there is no target)
  int64_t targets = 0;
};
/// Token-mean loss of `model` over `sources` in packed rows of `seq_len`, `batch_size` rows at a
/// time, every document once in store order (at most `max_batches` batches; 0 = all). With
/// `held_out_docs` > 0, only the documents a training run with eval.held_out_docs = held_out_docs
/// sets aside from these stores (in this order) are read. What evaluation inside a run computes.
/// With a process group, the rows are shared out among the ranks (⌈batch_size / ranks⌉ each) and
/// the sums all-reduced: every rank returns the same result, that of one process when batch_size
/// divides evenly (and max_batches is 0, every row once, in any case).
EvalLoss evaluate_sources(model::CausalLM& model, const std::vector<data::BatcherSource>& sources, int64_t seq_len,
                          int64_t batch_size, int64_t held_out_docs, int64_t max_batches, c10::Device device,
                          dist::ProcessGroup* group = nullptr);
/// Every evaluation set of `config` (held_out, eval.stores) on `model`, as a run evaluates them, by
/// set name: for the baseline of a model before any fine-tuning.
std::map<std::string, EvalLoss> evaluate_config_sets(model::CausalLM& model, const config::RunConfig& config,
                                                     c10::Device device);

}  // namespace ft::train
