#pragma once
// What one thread of the float32 sum (kernels/sum_float.cu) computes for 8 consecutive elements,
// shared with the host so that a CPU test checks it against ATen's chain bit for bit:
// out[e] = ((float(g₀[e]) + float(g₁[e])) + float(g₂[e])) + …, every addition rounded to float32
// (no contraction is possible: there is no product).
#include <cstdint>

#include "ft/kernels/rows.h"
#include "ft/kernels/vec16.h"

#if defined(__CUDACC__)
#define FT_SUM_HD __host__ __device__ __forceinline__
#define FT_SUM_UNROLL _Pragma("unroll")
#else
#define FT_SUM_HD inline
#define FT_SUM_UNROLL
#endif

namespace ft::kernels::detail {

constexpr int kSumMaxInputs = 4;

/// N (1 … kSumMaxInputs) inputs of T at element offset i, 16-byte aligned → 8 floats at out + i.
/// (N is a template argument: the pointers stay in registers, never indexed at run time.)
template <typename T, int N>
FT_SUM_HD void sum_to_float8(const T* const (&in)[kSumMaxInputs], int64_t i, float* out) {
  static_assert(kVec16<T> == 8, "2-byte types");
  static_assert(N >= 1 && N <= kSumMaxInputs, "1 to kSumMaxInputs inputs");
  alignas(16) float acc[8];
  load16_float(in[0] + i, acc);
  FT_SUM_UNROLL
  for (int k = 1; k < N; ++k) {
    float v[8];
    load16_float(in[k] + i, v);
    FT_SUM_UNROLL
    for (int e = 0; e < 8; ++e) acc[e] += v[e];
  }
  store16(out + i, acc);
  store16(out + i + 4, acc + 4);
}

/// The same for one element (the tail, or unaligned tensors).
template <typename T, int N>
FT_SUM_HD float sum_to_float1(const T* const (&in)[kSumMaxInputs], int64_t i) {
  float acc = static_cast<float>(in[0][i]);
  FT_SUM_UNROLL
  for (int k = 1; k < N; ++k) acc += static_cast<float>(in[k][i]);
  return acc;
}

/// What one thread of the kernel does (kernels/sum_float.cu; ft/kernels/rows.h): rows by.. step gy
/// of the N inputs (row strides ld) into out (rows × cols, contiguous), in each row 8 elements at a
/// time from (bx · bdx + tx) · 8, step gx · bdx · 8, up to the last multiple of 8 when `vectors`,
/// then one at a time from bx · bdx + tx, step gx · bdx.
template <typename T, int N>
FT_SUM_HD void sum_to_float_rows(const ThreadAt& th, const T* const (&in)[kSumMaxInputs],
                                 const int64_t (&ld)[kSumMaxInputs], float* out, int64_t rows, int64_t cols,
                                 bool vectors) {
  const int64_t first = th.bx * th.bdx + th.tx, stride = th.gx * th.bdx;
  const int64_t body = vectors ? cols / 8 * 8 : 0;
  for (int64_t r = th.by; r < rows; r += th.gy) {
    const T* row[kSumMaxInputs] = {};
    FT_SUM_UNROLL
    for (int k = 0; k < N; ++k) row[k] = in[k] + r * ld[k];
    float* o = out + r * cols;
    for (int64_t v = first; v < body / 8; v += stride) sum_to_float8<T, N>(row, v * 8, o);
    for (int64_t i = body + first; i < cols; i += stride) o[i] = sum_to_float1<T, N>(row, i);
  }
}

}  // namespace ft::kernels::detail

#undef FT_SUM_HD
#undef FT_SUM_UNROLL
