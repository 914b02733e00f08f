#pragma once
// Host launcher for the fused RMSNorm forward kernel (kernels/rmsnorm.cu).
// Reference: ft::model::RMSNormImpl::forward's LibTorch path, which the tests compare against.
#include <ATen/core/Tensor.h>

namespace ft::kernels {

/// y = weight * (x * rsqrt(mean(x², -1) + eps)).to(x.dtype), statistics in float32; one pass over
/// x for the statistics and one for the output, instead of LibTorch's five elementwise kernels.
/// x: (..., E) contiguous CUDA float32/float16/bfloat16; weight: (E) same device. Output dtype is
/// the promotion of weight's and x's dtypes, as in the reference.
at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace ft::kernels
