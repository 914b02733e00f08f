#pragma once
// NF4 (4-bit NormalFloat, Dettmers et al. 2023): the storage of QLoRA's frozen base weights.
//
// A tensor is cut into blocks of `block` consecutive elements (64 by default); each block keeps
// its absolute maximum c (float32) and, per element, the index of the nearest of the 16 NF4 values
// to x / c. The NF4 values are the code book of bitsandbytes: quantiles of N(0, 1) chosen so that
// both halves of [-1, 1] carry equal probability mass, with an exact 0 (8 positive values from
// Φ⁻¹ of linspace(0.9677083, 0.5, 9), 7 negative ones from linspace(0.9677083, 0.5, 8), scaled so
// that the largest is 1). Indices are packed two per byte, the first element in the high nibble
// (bitsandbytes' order). Dequantization is code[index] × c.
//
// Double quantization (optional) stores the float32 block maxima as 8-bit codes too: the maxima
// minus their mean, in blocks of 256, each with a float32 scale (symmetric linear int8), so that the
// maxima cost about 8/64 instead of 32/64 bits per weight: 4.127 bits per weight in all instead of
// 4.5. (bitsandbytes
// uses its 8-bit dynamic-tree map for this step; libft's linear map has a bounded error stated in
// tests/test_nf4.cpp and is not bit-compatible with bitsandbytes' quant_state.)
//
// Bounds: every element's error is at most half the gap between the two code values around x / c,
// times c (double quantization adds the error of c itself), and at most 0.1386 c.
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

namespace ft::adapt {

/// The 16 NF4 values, ascending; index 7 is 0.
const std::array<float, 16>& nf4_code();

struct NF4Tensor {
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int64_t block = 64;
  at::Tensor packed;  ///< uint8, ceil(numel / 2): two indices per byte, first in the high nibble
  at::Tensor absmax;  ///< float32 (blocks), when not double-quantized
  // Double quantization:
  bool double_quant = false;
  int64_t dq_block = 256;
  at::Tensor absmax_q;      ///< int8 (blocks): round((c − offset) / scale)
  at::Tensor absmax_scale;  ///< float32 (ceil(blocks / dq_block))
  float absmax_offset = 0.0f;

  /// Bytes held (codes plus scales).
  int64_t bytes() const;
};

/// Bytes an NF4 tensor of `numel` elements holds (what NF4Tensor::bytes() will say), without
/// quantizing: for memory estimates of a whole base (ft inspect --nf4).
int64_t nf4_bytes(int64_t numel, int64_t block = 64, bool double_quant = true, int64_t dq_block = 256);

/// Quantizes `w` (any shape, any float dtype; computed in float32 on its device). `block` must be
/// even and > 0.
NF4Tensor quantize_nf4(const at::Tensor& w, int64_t block = 64, bool double_quant = false, int64_t dq_block = 256);
/// The float tensor `q` stands for, in `dtype`, on the device of q.packed. On the CPU a decoding
/// loop that allocates only the output; on CUDA the kernel of kernels/nf4.cu (when built with the
/// kernels); elsewhere dequantize_nf4_ops().
at::Tensor dequantize_nf4(const NF4Tensor& q, at::ScalarType dtype = at::kFloat);
/// The same written into `out` (shaped like q, of any float dtype, on the codes' device; any
/// strides): on CUDA a 2-D view with unit column stride takes the kernel directly, with no
/// temporary (the extended GEMM's [W | B] buffer, whose first `in` columns receive W); elsewhere
/// dequantize_nf4 and a copy.
void dequantize_nf4_into(const NF4Tensor& q, const at::Tensor& out);
/// The same from ATen tensor ops, on any device: the reference the CPU loop and the CUDA kernel are
/// tested against.
at::Tensor dequantize_nf4_ops(const NF4Tensor& q, at::ScalarType dtype = at::kFloat);
/// The block maxima as dequantization uses them (after double quantization, if any).
at::Tensor nf4_absmax(const NF4Tensor& q);

}  // namespace ft::adapt
