#pragma once
// One optimizer step's forward and backward passes over its micro-batches (gradient accumulation),
// normalised by the step's total number of supervised tokens.
//
// N = Σ n_targets over ALL micro-batches of the step is counted before the first backward pass, and
// every micro-batch backpropagates (Σ its token losses) / N. The accumulated gradient is therefore
// the gradient of the token mean over the whole step, whatever the split into micro-batches, and
// the reported loss is the same mean. (Later, across ranks: N becomes the all-reduced count.)
#include <functional>
#include <vector>

#include "ft/model/llama.h"
#include "ft/train/batch.h"

namespace ft::train {

struct AccumulateResult {
  double loss = 0.0;      ///< Σ token losses / n_targets (0 when n_targets is 0)
  int64_t n_targets = 0;  ///< N: supervised tokens of the step
  int64_t n_tokens = 0;   ///< input tokens (attention_mask = 1) of the step, for tokens/s
};

/// Forward + backward of every micro-batch; gradients are ADDED to the parameters' .grad (zero them
/// before the step). With no target at all (a finite stream's padding), nothing is backpropagated.
/// `before_forward`, when set, is called before each micro-batch's forward pass.
AccumulateResult accumulate_gradients(model::CausalLM& model, const std::vector<BatchTensors>& micro_batches,
                                      const std::function<void(const BatchTensors&)>& before_forward = {});

/// Summed loss and target count without gradients (evaluation); loss = sum / n_targets.
AccumulateResult evaluate_loss(model::CausalLM& model, const std::vector<BatchTensors>& batches);

}  // namespace ft::train
