#pragma once
// One optimizer step's forward and backward passes over its micro-batches (gradient accumulation),
// normalised by the step's total number of supervised tokens.
//
// N = Σ n_targets over ALL micro-batches of the step is counted before the first backward pass, and
// every micro-batch backpropagates (Σ its token losses) / N. The accumulated gradient is therefore
// the gradient of the token mean over the whole step, whatever the split into micro-batches, and
// the reported loss is the same mean. Across data-parallel ranks N is the all-reduced count
// (AccumulateHooks::total_targets), so the ranks' gradients SUM to that of the global token mean.
//
// A mixture of experts trained with the routers' load-balancing loss (AccumulateHooks::
// router_aux_loss_coef, transformers' output_router_logits and router_aux_loss_coef) adds
// coef × aux_m per micro-batch m, aux_m over m's tokens (model::load_balancing_loss), weighted by
// n_targets_m / N: the step's objective is then the token mean plus coef × the target-weighted mean
// of the micro-batches' aux losses. With one micro-batch on one rank that is transformers' loss
// (its token-mean cross-entropy + coef × aux); whatever the split, each micro-batch's aux weighs
// what its targets weigh in the cross-entropy.
#include <functional>
#include <limits>
#include <vector>

#include "ft/model/llama.h"
#include "ft/train/batch.h"

namespace ft::train {

struct AccumulateResult {
  double loss = 0.0;      ///< Σ this process's token losses / n_targets (0 when n_targets is 0)
  int64_t n_targets = 0;  ///< N: supervised tokens of the step (all ranks)
  int64_t n_tokens = 0;   ///< this process's input tokens (attention_mask = 1), for tokens/s
  /// Σ this process's micro-batches' load-balancing losses × their targets / n_targets (not times
  /// the coefficient, and not part of `loss`); NaN when the step trains without it.
  double router_aux_loss = std::numeric_limits<double>::quiet_NaN();
};

struct AccumulateHooks {
  /// Called before each micro-batch's forward pass.
  std::function<void(const BatchTensors&)> before_forward;
  /// This process's target count → the step's N (data parallel: the sum over the ranks). Unset: N
  /// is the local count.
  std::function<int64_t(int64_t)> total_targets;
  /// Called before each backward pass; `last` marks the step's final one (dist::GradientReducer).
  std::function<void(bool last)> before_backward;
  /// > 0: the routers' load-balancing loss trains with this weight (a mixture-of-experts model).
  double router_aux_loss_coef = 0.0;
};

/// The summed token loss of one micro-batch's forward pass (causal_lm_loss_sum of the model's logits),
/// with the batch's positions, segments, mask and padding, and on CUDA its documents' offsets for
/// variable-length attention (varlen_offsets; a batch without row_runs, such as a CUDA graph's own
/// input copy, keeps the block-diagonal mask).
/// `router_logits`: where given, the mixture-of-experts layers' router logits are appended to it
/// (model::ForwardOptions::router_logits).
at::Tensor micro_batch_loss_sum(model::CausalLM& model, const BatchTensors& b,
                                std::vector<at::Tensor>* router_logits = nullptr);

/// Forward + backward of every micro-batch; gradients are ADDED to the parameters' .grad (zero them
/// before the step). With no target at all (a finite stream's padding), nothing is backpropagated.
/// `before_forward`, when set, is called before each micro-batch's forward pass.
AccumulateResult accumulate_gradients(model::CausalLM& model, const std::vector<BatchTensors>& micro_batches,
                                      const std::function<void(const BatchTensors&)>& before_forward = {});
AccumulateResult accumulate_gradients(model::CausalLM& model, const std::vector<BatchTensors>& micro_batches,
                                      const AccumulateHooks& hooks);

/// Summed loss and target count without gradients (evaluation); loss = sum / n_targets.
AccumulateResult evaluate_loss(model::CausalLM& model, const std::vector<BatchTensors>& batches);

}  // namespace ft::train
