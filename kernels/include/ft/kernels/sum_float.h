#pragma once
// Host launcher for the float32 sum of compute-dtype gradients on CUDA (kernels/sum_float.cu): the
// backward pass of the model's shared input cast (CausalLMImpl::set_shared_input_cast), where the
// input gradients of q, k and v (gate and up) arrive in bf16 and their float32 sum is x's gradient.
// Reference: the ATen chain float32(g₀) + g₁ + g₂ (each addition rounded to float32 in that order),
// which it equals bit for bit (ft/kernels/sum_float_thread.h).
//
// The chain reads 2 and writes 4 bytes per element for the conversion, then reads 6 and writes 4 for
// each addition: 26 bytes for three gradients. The kernel: 6 read and 4 written.
#include <ATen/core/Tensor.h>

#include <vector>

namespace ft::kernels {

/// Whether sum_to_float takes these: 1 to 4 CUDA tensors of one shape, device and dtype (bf16 or
/// fp16), each contiguous or rows of its own stride (ft/kernels/rows.h): the extended GEMM's input
/// gradient, for one, is the first `in` columns of a (T, in + r) tensor.
bool sum_to_float_fits(const std::vector<at::Tensor>& grads);

/// float32(g₀) + g₁ + … in that order, float32, shaped like g₀.
at::Tensor sum_to_float(const std::vector<at::Tensor>& grads);

}  // namespace ft::kernels
