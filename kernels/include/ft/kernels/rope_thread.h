#pragma once
// One element pair of the fused rotary embedding (kernels/rope.cu), shared with the host so that a
// CPU test checks it bit for bit against the unfused tensor formula on machines without a GPU
// (RopeKernel.PairsOnTheHost*).
//
// The unfused formula, y = x cos + rotate_half(x) sin with rotate_half(x) = [−x₂, x₁], evaluated in
// float32 (the promotion of a bf16 projection with float32 tables under autocast): for i < D/2,
//   y₁ = x₁ c₁ + (−x₂) s₁,   y₂ = x₂ c₂ + x₁ s₂,
// each product and sum rounded to float32 separately (never a fused multiply-add, which would
// round once and differ in the last bit), then y rounded once to the output type. The backward
// pass of that formula, again in float32 and in autograd's order:
//   dx₁ = dy₁ c₁ + dy₂ s₂,   dx₂ = dy₂ c₂ + (−(dy₁ s₁)).
#if defined(__CUDACC__)
#define FT_ROPE_HD __host__ __device__ __forceinline__
#else
#define FT_ROPE_HD inline
#endif

namespace ft::kernels::detail {

FT_ROPE_HD float rope_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  const volatile float p = a * b;  // kept apart from the sum (no contraction)
  return p;
#endif
}

FT_ROPE_HD float rope_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/// The forward pair: (x₁, x₂) with tables (c₁, c₂, s₁, s₂) → (y₁, y₂) in float32.
FT_ROPE_HD void rope_pair(float x1, float x2, float c1, float c2, float s1, float s2, float& y1, float& y2) {
  y1 = rope_add(rope_mul(x1, c1), rope_mul(-x2, s1));
  y2 = rope_add(rope_mul(x2, c2), rope_mul(x1, s2));
}

/// The backward pair: (dy₁, dy₂) → (dx₁, dx₂) in float32.
FT_ROPE_HD void rope_pair_backward(float dy1, float dy2, float c1, float c2, float s1, float s2, float& dx1,
                                   float& dx2) {
  dx1 = rope_add(rope_mul(dy1, c1), rope_mul(dy2, s2));
  dx2 = rope_add(rope_mul(dy2, c2), -rope_mul(dy1, s1));
}

}  // namespace ft::kernels::detail

#undef FT_ROPE_HD
