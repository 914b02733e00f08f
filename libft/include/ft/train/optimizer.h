#pragma once
// The optimizer and the guarded step: AdamW (decoupled weight decay) with parameter groups, or SGD;
// gradient clipping by global norm; non-finite losses and gradients caught BEFORE the step.
#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <vector>

#include "ft/model/llama.h"

namespace ft::train {

enum class OptimizerKind { AdamW, SGD };

struct OptimizerOptions {
  OptimizerKind kind = OptimizerKind::AdamW;
  double lr = 3e-4;            ///< base rate; the schedule multiplies it
  double beta1 = 0.9;          ///< AdamW
  double beta2 = 0.999;        ///< AdamW
  double eps = 1e-8;           ///< AdamW
  double weight_decay = 0.0;   ///< decoupled (AdamW) or L2 (SGD), on the decay group only
  double momentum = 0.0;       ///< SGD
  /// Decay norms, biases and embeddings too. Off by default: shrinking a norm's gain or an
  /// embedding row towards 0 is not regularisation but damage (the usual GPT/Llama recipe).
  bool decay_all = false;
};

/// Which trainable parameters (requires_grad) get weight decay, by Hugging Face name.
struct ParameterGroups {
  std::vector<std::string> decay, no_decay;
};

/// Norm weights and biases (1-D) and embeddings (embed_tokens) go to no_decay unless decay_all.
ParameterGroups group_parameters(model::CausalLM& model, const OptimizerOptions& options);

/// Group 0 = decay, group 1 = no_decay (an empty group is left out). Throws ft::Error when nothing trains.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(model::CausalLM& model, const OptimizerOptions& options);

OptimizerKind parse_optimizer_kind(const std::string& name);  ///< "adamw" | "sgd"

enum class NonFinitePolicy { Skip, Stop };
NonFinitePolicy parse_nonfinite_policy(const std::string& name);  ///< "skip" | "stop"

struct StepOptions {
  double clip_grad_norm = 0.0;  ///< max global L2 norm of the gradients; 0 = no clipping
  NonFinitePolicy on_nonfinite = NonFinitePolicy::Skip;
  /// Zero the gradients in place after the step (or the skip) instead of releasing them: CUDA
  /// graphs (ft/train/graphs.h) accumulate into the same tensors at every replay.
  bool zero_in_place = false;
};

/// Optimizer steps applied and skipped; `step` drives the schedule and only moves when a step is applied.
struct StepCounters {
  int64_t step = 0;
  int64_t skipped = 0;
};

struct StepOutcome {
  bool applied = false;
  double grad_norm = 0.0;  ///< global L2 norm before clipping (NaN/Inf when that caused a skip)
};

/// The guarded update, after accumulate_gradients(): computes the global gradient norm; if the loss or
/// the norm is not finite the step is skipped (gradients zeroed; weights, optimizer moments and
/// counters.step untouched; counters.skipped + 1), or with NonFinitePolicy::Stop an ft::Error is
/// thrown. Otherwise clips, sets every group's learning rate to `lr`, steps, zeroes the gradients
/// and advances counters.step.
StepOutcome optimizer_step(torch::optim::Optimizer& optimizer, double loss, double lr, const StepOptions& options,
                           StepCounters& counters);

/// L2 norm of all gradients of the optimizer's parameters together (each tensor's norm in its dtype,
/// the squares summed in float64).
double global_grad_norm(const torch::optim::Optimizer& optimizer);

}  // namespace ft::train
