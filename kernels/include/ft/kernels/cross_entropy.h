#pragma once
// Host launchers for the fused cross-entropy kernels (kernels/cross_entropy.cu): the loss of a
// language model's output head scored straight from its bf16/fp16/float32 logits, and the logits'
// gradient written in their own dtype, each in one pass over the logits. Reference: ATen's
// cross_entropy on the logits cast to float32 (what ft::model's loss does on the CPU), which the
// tests compare against, with float64.
//
// Unfused, the (N, V) logits take a float32 copy, a float32 log-softmax kept for the backward pass,
// a float32 gradient and its cast back: about 38 bytes of memory traffic per logit and 4 bytes per
// logit held between the passes. Fused: 2 bytes read in the forward pass (plus the row's
// log-sum-exp kept, 4 bytes per row), 2 read and 2 written in the backward pass (bf16).
#include <ATen/core/Tensor.h>

#include <utility>

namespace ft::kernels {

/// Whether the kernels take these operands: logits (N, V) contiguous CUDA in float32, bf16 or fp16,
/// targets (N) int64 on the same device.
bool cross_entropy_fits(const at::Tensor& logits, const at::Tensor& targets);

/// Per row: lse = log Σ exp(logits), loss = lse − logits[target] (0 where target == ignore_index,
/// NaN for a target outside [0, V)). Returns (loss (N), lse (N)), both float32. One block per row.
std::pair<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                        int64_t ignore_index);

/// The gradient of Σ loss · grad_scale with respect to the logits, in their dtype:
/// grad = grad_scale · (exp(logits − lse) − onehot(target)), zero rows where target == ignore_index.
/// grad_scale: a float32 scalar tensor on the device (the upstream gradient; read by the kernel, no
/// host synchronisation).
at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index);

}  // namespace ft::kernels
