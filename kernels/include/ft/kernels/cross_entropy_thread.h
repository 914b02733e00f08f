#pragma once
// What one thread of the fused cross-entropy kernels (kernels/cross_entropy.cu) computes over its
// share of a row of logits, shared with the host so that a CPU test runs it on machines without a
// GPU (CrossEntropyKernel.ThreadsOnTheHost*). The device kernels add the block's reduction of the
// threads' (max, sum) pairs.
//
// Thread t of n walks the row's elements c = kVec (t + n k), k = 0, 1, … as 16-byte vectors
// (kVec = 16 / sizeof(T) elements) when the row allows it (V a multiple of kVec, 16-byte aligned
// rows), else c = t + n k one at a time. Arithmetic is float32 throughout.
//
//   forward:  (m, s) with m = max x, s = Σ exp(x − m) over the thread's elements (online: one exp
//             per element, a rescale when the maximum grows); merged across threads, the row's
//             log-sum-exp is m + log s.
//   backward: grad[c] = T(g · (exp(x[c] − lse) − [c == target])), or exact zeros for an ignored row.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ft/kernels/vec16.h"

#if defined(__CUDACC__)
#define FT_CE_HD __host__ __device__ __forceinline__
#define FT_CE_UNROLL _Pragma("unroll")
#else
#define FT_CE_HD inline
#define FT_CE_UNROLL
#endif

namespace ft::kernels::detail {

/// A running maximum and the sum of exp(x − max) over the elements seen.
struct MaxSum {
  float m;
  float s;
};

FT_CE_HD MaxSum max_sum_empty() { return {-std::numeric_limits<float>::infinity(), 0.0f}; }

FT_CE_HD float ce_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

/// Adds one element. −∞ (a masked logit) adds nothing; NaN makes s NaN, and the loss with it.
FT_CE_HD MaxSum max_sum_add(MaxSum a, float x) {
  if (x == -std::numeric_limits<float>::infinity()) return a;
  if (x > a.m) {
    a.s = a.s * ce_exp(a.m - x) + 1.0f;
    a.m = x;
  } else {
    a.s += ce_exp(x - a.m);
  }
  return a;
}

/// Adds n elements at once: one rescale for their maximum, then n independent exps (more
/// instruction-level parallelism than n chained max_sum_add calls; the same sum up to rounding).
template <int n>
FT_CE_HD MaxSum max_sum_add_n(MaxSum a, const float* x) {
  float m = x[0];
  FT_CE_UNROLL
  for (int e = 1; e < n; ++e) m = x[e] > m ? x[e] : m;
  if (m == -std::numeric_limits<float>::infinity()) return a;  // all masked (a NaN shows in the sum below)
  if (m > a.m) {
    a.s *= ce_exp(a.m - m);
    a.m = m;
  }
  float sum = 0.0f;
  FT_CE_UNROLL
  for (int e = 0; e < n; ++e) sum += ce_exp(x[e] - a.m);
  a.s += sum;
  return a;
}

/// Merges two partial pairs (either may be empty).
FT_CE_HD MaxSum max_sum_merge(MaxSum a, MaxSum b) {
  if (b.s == 0.0f && b.m == -std::numeric_limits<float>::infinity()) return a;
  if (a.s == 0.0f && a.m == -std::numeric_limits<float>::infinity()) return b;
  const float m = a.m > b.m ? a.m : b.m;
  return {m, a.s * ce_exp(a.m - m) + b.s * ce_exp(b.m - m)};
}

/// The row's log-sum-exp from its merged pair (NaN if the row held a NaN, −∞ if every logit was −∞).
FT_CE_HD float max_sum_lse(MaxSum a) {
#if defined(__CUDA_ARCH__)
  return a.m + __logf(a.s);
#else
  return a.m + std::log(a.s);
#endif
}

/// This thread's (max, sum) over row[0, V).
template <typename T>
FT_CE_HD MaxSum ce_row_partial(const T* row, int64_t V, int thread, int threads, bool vectors) {
  MaxSum a = max_sum_empty();
  if (vectors) {
    constexpr int kVec = kVec16<T>;
    for (int64_t c = static_cast<int64_t>(thread) * kVec; c < V; c += static_cast<int64_t>(threads) * kVec) {
      float f[kVec];
      load16_float(row + c, f);
      a = max_sum_add_n<kVec>(a, f);
    }
  } else {
    for (int64_t c = thread; c < V; c += threads) a = max_sum_add(a, static_cast<float>(row[c]));
  }
  return a;
}

/// This thread's share of the row's gradient: g (exp(x − lse) − [c == target]), or zeros where
/// `ignored`.
template <typename T>
FT_CE_HD void ce_row_grad(const T* row, T* grad, int64_t V, int thread, int threads, bool vectors, float lse,
                          int64_t target, float g, bool ignored) {
  auto value = [&](float x, int64_t c) { return ignored ? 0.0f : g * (ce_exp(x - lse) - (c == target ? 1.0f : 0.0f)); };
  if (vectors) {
    constexpr int kVec = kVec16<T>;
    for (int64_t c = static_cast<int64_t>(thread) * kVec; c < V; c += static_cast<int64_t>(threads) * kVec) {
      float f[kVec];
      load16_float(row + c, f);
      FT_CE_UNROLL
      for (int e = 0; e < kVec; ++e) f[e] = value(f[e], c + e);
      store16_float(grad + c, f);
    }
  } else {
    for (int64_t c = thread; c < V; c += threads) grad[c] = static_cast<T>(value(static_cast<float>(row[c]), c));
  }
}

/// The row's loss from its log-sum-exp: lse − x[target], 0 for an ignored row, NaN for a target
/// outside [0, V) (so that the trainer's non-finite check stops on it rather than reading out of bounds).
template <typename T>
FT_CE_HD float ce_row_loss(const T* row, int64_t V, float lse, int64_t target, int64_t ignore_index) {
  if (target == ignore_index) return 0.0f;
  if (target < 0 || target >= V) return std::numeric_limits<float>::quiet_NaN();
  return lse - static_cast<float>(row[target]);
}

}  // namespace ft::kernels::detail

#undef FT_CE_HD
#undef FT_CE_UNROLL
