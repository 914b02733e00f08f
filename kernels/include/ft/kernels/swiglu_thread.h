#pragma once
// One element of the fused SwiGLU (kernels/swiglu.cu), shared with the host so that a CPU test
// checks it against float64 on machines without a GPU (SwigluKernel.ElementsOnTheHost*).
//
// The unfused pair of operations rounds twice, and the kernel rounds at the same points:
//   s = T(silu(g)) with silu(g) = g / (1 + exp(−g)) in float32 (ATen's formula);
//   h = T(float(s) · float(u)).
// The backward pass of that pair, as autograd computes it (mul's two gradients rounded to T, then
// silu's backward on the rounded one):
//   du = T(dh · s);   ds = T(dh · u);   dg = T(ds · σ · (1 + g (1 − σ))) with σ = 1 / (1 + exp(−g)).
#include <cmath>
#include <cstdint>

#include "ft/kernels/rows.h"
#include "ft/kernels/vec16.h"

#if defined(__CUDACC__)
#define FT_SWIGLU_HD __host__ __device__ __forceinline__
#define FT_SWIGLU_UNROLL _Pragma("unroll")
#else
#define FT_SWIGLU_HD inline
#define FT_SWIGLU_UNROLL
#endif

namespace ft::kernels::detail {

FT_SWIGLU_HD float swiglu_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // the accurate exp, as ATen's silu (no fast-math intrinsic)
#else
  return std::exp(x);
#endif
}

template <typename T>
FT_SWIGLU_HD T swiglu_forward(T g, T u) {
  const float gf = static_cast<float>(g);
  const T s = static_cast<T>(gf / (1.0f + swiglu_exp(-gf)));
  return static_cast<T>(static_cast<float>(s) * static_cast<float>(u));
}

template <typename T>
FT_SWIGLU_HD void swiglu_backward(T dh, T g, T u, T& dg, T& du) {
  const float gf = static_cast<float>(g), dhf = static_cast<float>(dh);
  const T s = static_cast<T>(gf / (1.0f + swiglu_exp(-gf)));
  du = static_cast<T>(dhf * static_cast<float>(s));
  const float ds = static_cast<float>(static_cast<T>(dhf * static_cast<float>(u)));
  const float sig = 1.0f / (1.0f + swiglu_exp(-gf));
  dg = static_cast<T>(ds * sig * (1.0f + gf * (1.0f - sig)));
}

// What one thread of the row kernels does (kernels/swiglu.cu; ft/kernels/rows.h): rows by.. step
// gy, and in each the columns from (bx · bdx + tx) · step on, step gx · bdx · step, where step is 8
// (4 for float32) with 16-byte vectors and 1 without. Each operand has its own row stride.
template <typename T>
FT_SWIGLU_HD void swiglu_forward_rows(const ThreadAt& th, const T* __restrict__ gate, int64_t ldg,
                                      const T* __restrict__ up, int64_t ldu, T* __restrict__ h, int64_t ldh,
                                      int64_t rows, int64_t cols, bool vectors) {
  const int64_t step = vectors ? kVec16<T> : 1;
  const int64_t first = (th.bx * th.bdx + th.tx) * step, stride = th.gx * th.bdx * step;
  for (int64_t r = th.by; r < rows; r += th.gy) {
    const T* g = gate + r * ldg;
    const T* u = up + r * ldu;
    T* y = h + r * ldh;
    if (vectors) {
      for (int64_t c = first; c < cols; c += stride) {
        alignas(16) T gv[kVec16<T>], uv[kVec16<T>], yv[kVec16<T>];
        load16(g + c, gv);
        load16(u + c, uv);
        FT_SWIGLU_UNROLL
        for (int e = 0; e < kVec16<T>; ++e) yv[e] = swiglu_forward(gv[e], uv[e]);
        store16(y + c, yv);
      }
    } else {
      for (int64_t c = first; c < cols; c += stride) y[c] = swiglu_forward(g[c], u[c]);
    }
  }
}

template <typename T>
FT_SWIGLU_HD void swiglu_backward_rows(const ThreadAt& th, const T* __restrict__ dh, int64_t ldd,
                                       const T* __restrict__ gate, int64_t ldg, const T* __restrict__ up, int64_t ldu,
                                       T* __restrict__ dgate, int64_t lddg, T* __restrict__ dup, int64_t lddu,
                                       int64_t rows, int64_t cols, bool vectors) {
  const int64_t step = vectors ? kVec16<T> : 1;
  const int64_t first = (th.bx * th.bdx + th.tx) * step, stride = th.gx * th.bdx * step;
  for (int64_t r = th.by; r < rows; r += th.gy) {
    const T* d = dh + r * ldd;
    const T* g = gate + r * ldg;
    const T* u = up + r * ldu;
    T* dg = dgate + r * lddg;
    T* du = dup + r * lddu;
    if (vectors) {
      for (int64_t c = first; c < cols; c += stride) {
        alignas(16) T dv[kVec16<T>], gv[kVec16<T>], uv[kVec16<T>], dgv[kVec16<T>], duv[kVec16<T>];
        load16(d + c, dv);
        load16(g + c, gv);
        load16(u + c, uv);
        FT_SWIGLU_UNROLL
        for (int e = 0; e < kVec16<T>; ++e) swiglu_backward(dv[e], gv[e], uv[e], dgv[e], duv[e]);
        store16(dg + c, dgv);
        store16(du + c, duv);
      }
    } else {
      for (int64_t c = first; c < cols; c += stride) swiglu_backward(d[c], g[c], u[c], dg[c], du[c]);
    }
  }
}

}  // namespace ft::kernels::detail

#undef FT_SWIGLU_HD
#undef FT_SWIGLU_UNROLL
