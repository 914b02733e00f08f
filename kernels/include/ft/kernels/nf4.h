#pragma once
// Host launcher for the NF4 dequantization kernel (kernels/nf4.cu).
// Reference: ft::adapt::dequantize_nf4_ops (ATen tensor ops), which the tests compare against.
#include <ATen/core/Tensor.h>

namespace ft::kernels {

/// out[e] = dtype(code[index(e)] × absmax[e / block]) for e < numel, where index(e) is the high
/// nibble of packed[e / 2] for even e and the low nibble for odd e (bitsandbytes' order) and `code`
/// the 16 NF4 values. One pass (16 elements per thread where the shape allows, else one byte per
/// thread); only `out` is allocated. packed: uint8 (ceil(numel / 2)), absmax: float32 (ceil(numel / block)), both on one
/// CUDA device; block even. dtype: float32, float16 or bfloat16. Returns a 1-D tensor of numel.
///
/// `out`, if given, receives the result instead: a 2-D (rows, cols) tensor of dtype on the codes'
/// device with rows · cols = numel, unit column stride and any row stride ≥ cols (the first `in`
/// columns of the extended GEMM's (out, in + r) [W | B] buffer, which then needs no copy of W).
/// Element e goes to row e / cols, column e mod cols. Returns `out`.
at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t block,
                          at::ScalarType dtype, const at::Tensor& out = {});

/// The same with double-quantized maxima, decoded inside the kernel (one launch, no temporary):
/// absmax[k] = float(absmax_q[k]) × absmax_scale[k / dq_block] + absmax_offset, rounded as
/// ft::adapt::nf4_absmax rounds it. absmax_q: int8 (ceil(numel / block)), absmax_scale: float32
/// (ceil(blocks / dq_block)), on the codes' device. `out` as for nf4_dequantize.
at::Tensor nf4_dequantize_double_quant(const at::Tensor& packed, const at::Tensor& absmax_q,
                                       const at::Tensor& absmax_scale, float absmax_offset, int64_t dq_block,
                                       int64_t numel, int64_t block, at::ScalarType dtype, const at::Tensor& out = {});

}  // namespace ft::kernels
