#pragma once
// Host launchers for the fused SwiGLU on CUDA (kernels/swiglu.cu): h = silu(gate) ⊙ up and its
// backward pass, each one pass over memory. Reference: the model's unfused at::silu(gate) * up,
// whose rounding points the kernel keeps (ft/kernels/swiglu_thread.h).
//
// Unfused (bf16): silu reads gate and writes s, the product reads s and up and writes h; the
// backward pass reads dh, up and s for the two products, then dS and gate for silu's backward:
// about 10 bytes per element forward and 18 backward, with gate, s and up held in between. Fused:
// 6 forward, 10 backward, with gate and up held (s is recomputed).
#include <ATen/core/Tensor.h>

#include <utility>

namespace ft::kernels {

/// Whether the kernels take these operands: gate and up on CUDA, same sizes and dtype (float32,
/// bf16 or fp16), both contiguous.
bool swiglu_fits(const at::Tensor& gate, const at::Tensor& up);

/// h = silu(gate) ⊙ up with the unfused pair's roundings, shaped like gate.
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up);

/// (dgate, dup) of swiglu_forward for the output gradient dh (made contiguous in gate's dtype).
std::pair<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up);

}  // namespace ft::kernels
