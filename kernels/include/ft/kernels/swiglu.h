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
/// bf16 or fp16), each rows of its own stride (ft/kernels/rows.h): contiguous, or column slices of
/// a contiguous tensor such as the halves of a packed [gate | up].
bool swiglu_fits(const at::Tensor& gate, const at::Tensor& up);

/// h = silu(gate) ⊙ up with the unfused pair's roundings, shaped like gate.
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up);

/// (dgate, dup) of swiglu_forward for the output gradient dh (cast to gate's dtype), contiguous.
std::pair<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up);

/// The same into dgate and dup: rows shaped and typed like gate, for example the halves of one
/// (…, 2·I) tensor, so that a packed [gate | up] gets its gradient as one tensor without a copy.
/// dgate and dup must not overlap each other or the inputs (the kernel reads through restrict
/// pointers): fresh memory, as model::swiglu_packed passes.
void swiglu_backward_out(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
                         const at::Tensor& dup);

}  // namespace ft::kernels
