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

#if defined(__CUDACC__)
#define FT_SWIGLU_HD __host__ __device__ __forceinline__
#else
#define FT_SWIGLU_HD inline
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

}  // namespace ft::kernels::detail

#undef FT_SWIGLU_HD
