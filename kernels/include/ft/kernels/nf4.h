#pragma once
// Host launcher for the NF4 dequantization kernel (kernels/nf4.cu).
// Reference: ft::adapt::dequantize_nf4_ops (ATen tensor ops), which the tests compare against.
#include <ATen/core/Tensor.h>

namespace ft::kernels {

/// out[e] = dtype(code[index(e)] × absmax[e / block]) for e < numel, where index(e) is the high
/// nibble of packed[e / 2] for even e and the low nibble for odd e (bitsandbytes' order) and `code`
/// the 16 NF4 values. One pass: each thread decodes one byte into two outputs; only `out` is
/// allocated. packed: uint8 (ceil(numel / 2)), absmax: float32 (ceil(numel / block)), both on one
/// CUDA device; block even. dtype: float32, float16 or bfloat16. Returns a 1-D tensor of numel.
at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t block,
                          at::ScalarType dtype);

}  // namespace ft::kernels
