#pragma once
// The NF4 decoding step of the dequantization kernel (kernels/nf4.cu), shared with the host so that
// a CPU test checks it against the tensor-op reference on machines without a GPU.
//
// 8 packed bytes hold 16 elements that share one maximum (the block is a multiple of 16); each
// byte holds two 4-bit code indices, the first element in the high nibble; the bytes are read as
// two little-endian 32-bit words. Each value is code × maximum in float32, rounded once to T.
#include <cstdint>

#if defined(__CUDACC__)
#define FT_NF4_HD __host__ __device__ __forceinline__
#else
#define FT_NF4_HD inline
#endif

namespace ft::kernels::detail {

template <typename T>
FT_NF4_HD void nf4_decode16(uint32_t lo, uint32_t hi, const float* code, float scale, T* out) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < 8; ++j) {
    const uint32_t word = j < 4 ? lo : hi;
    const uint32_t byte = (word >> (8 * (j & 3))) & 0xffu;
    out[2 * j] = static_cast<T>(code[byte >> 4] * scale);
    out[2 * j + 1] = static_cast<T>(code[byte & 15u] * scale);
  }
}

/// A double-quantized block maximum, code × scale + offset, as ft::adapt::nf4_absmax forms it: a
/// float32 product and a float32 sum, each rounded (no fused multiply-add, which would round once
/// and differ in the last bit).
FT_NF4_HD float nf4_double_quant_max(int8_t code, float scale, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(static_cast<float>(code), scale), offset);
#else
  const volatile float product = static_cast<float>(code) * scale;  // kept apart from the sum
  return product + offset;
#endif
}

}  // namespace ft::kernels::detail

#undef FT_NF4_HD
