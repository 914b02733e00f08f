#include "ft/train/step.h"

#include <algorithm>

#include <torch/autograd.h>

#include "ft/util/error.h"

namespace ft::train {

at::Tensor micro_batch_loss_sum(model::CausalLM& model, const BatchTensors& b, std::vector<at::Tensor>* router_logits) {
  model::ForwardOptions fo;
  fo.router_logits = router_logits;
  fo.position_ids = b.position_ids;
  fo.segment_ids = b.segment_ids;
  fo.attention_mask = b.attention_mask;
  fo.padding = b.padding();
  if (!b.row_max_positions.empty() && static_cast<int64_t>(b.row_max_positions.size()) == b.input_ids.size(0)) {
    fo.max_position = *std::max_element(b.row_max_positions.begin(), b.row_max_positions.end());
  }
  // Packed rows on CUDA: flash attention over each document (the model decides whether it can).
  if (b.cu_seqlens.defined()) {
    fo.cu_seqlens = b.cu_seqlens;
    fo.max_seqlen = b.max_seqlen;
  } else if (b.input_ids.is_cuda()) {
    std::tie(fo.cu_seqlens, fo.max_seqlen) = varlen_offsets(b, b.input_ids.device());
  }
  if (model->loss_chunk() > 0) {
    return model::chunked_lm_loss_sum(*model, model->hidden_states(b.input_ids, fo), b.labels, model->loss_chunk());
  }
  return model::causal_lm_loss_sum(model->forward(b.input_ids, fo), b.labels, -100, model->fused_loss());
}

AccumulateResult accumulate_gradients(model::CausalLM& model, const std::vector<BatchTensors>& micro_batches,
                                      const std::function<void(const BatchTensors&)>& before_forward) {
  AccumulateHooks hooks;
  hooks.before_forward = before_forward;
  return accumulate_gradients(model, micro_batches, hooks);
}

AccumulateResult accumulate_gradients(model::CausalLM& model, const std::vector<BatchTensors>& micro_batches,
                                      const AccumulateHooks& hooks) {
  FT_CHECK(!micro_batches.empty(), "[train] an optimizer step needs at least one micro-batch");
  AccumulateResult r;
  // N first, from the labels alone: the divisor must be known before the first backward pass.
  int64_t local_targets = 0;
  size_t last = 0;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    const BatchTensors& b = micro_batches[i];
    local_targets += b.n_targets;
    if (b.n_targets > 0) last = i;
    r.n_tokens += b.tokens();
  }
  r.n_targets = hooks.total_targets ? hooks.total_targets(local_targets) : local_targets;
  if (r.n_targets == 0 || local_targets == 0) return r;
  const double inv_n = 1.0 / static_cast<double>(r.n_targets);
  const double coef = hooks.router_aux_loss_coef;
  const model::ModelConfig& config = model->config();
  FT_CHECK(coef == 0 || config.num_experts > 0, "[train] the routers' load-balancing loss needs a mixture of experts");
  // The losses are summed in float64 on the loss's device and read once, after the last backward
  // pass: reading each micro-batch's loss would make the host wait for the device between every
  // forward and backward pass (the same sums, in the same order, so the same figure).
  at::Tensor loss_sum, aux_sum;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    const BatchTensors& b = micro_batches[i];
    if (b.n_targets == 0) continue;  // contributes nothing to the loss or the gradient
    if (hooks.before_forward) hooks.before_forward(b);
    std::vector<at::Tensor> router_logits;
    at::Tensor sum = micro_batch_loss_sum(model, b, coef > 0 ? &router_logits : nullptr);
    const at::Tensor s64 = sum.detach().to(at::kDouble);
    loss_sum = loss_sum.defined() ? loss_sum + s64 : s64;
    at::Tensor objective = sum;
    if (coef > 0) {
      // Padding is not routed: transformers leaves it out through the attention mask.
      const at::Tensor mask = b.padding().value_or(true) && b.attention_mask.defined() ? b.attention_mask : at::Tensor();
      const at::Tensor aux = model::load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok, mask) *
                             static_cast<double>(b.n_targets);
      const at::Tensor a64 = aux.detach().to(at::kDouble);
      aux_sum = aux_sum.defined() ? aux_sum + a64 : a64;
      objective = sum + aux.to(sum.scalar_type()) * coef;
    }
    if (hooks.before_backward) hooks.before_backward(i == last);
    (objective * inv_n).backward();
  }
  r.loss = loss_sum.item<double>() * inv_n;
  if (aux_sum.defined()) r.router_aux_loss = aux_sum.item<double>() * inv_n;
  return r;
}

AccumulateResult evaluate_loss(model::CausalLM& model, const std::vector<BatchTensors>& batches) {
  torch::NoGradGuard no_grad;
  AccumulateResult r;
  at::Tensor loss_sum;  // float64 on the device, read once (as in accumulate_gradients)
  for (const BatchTensors& b : batches) {
    r.n_targets += b.n_targets;
    r.n_tokens += b.tokens();
    if (b.n_targets == 0) continue;
    const at::Tensor s64 = micro_batch_loss_sum(model, b).to(at::kDouble);
    loss_sum = loss_sum.defined() ? loss_sum + s64 : s64;
  }
  if (r.n_targets > 0) r.loss = loss_sum.item<double>() / static_cast<double>(r.n_targets);
  return r;
}

}  // namespace ft::train
