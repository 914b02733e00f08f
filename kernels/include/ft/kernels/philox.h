#pragma once
// Counter-based random numbers for dropout inside libft's kernels: Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator behind ATen's and cuRAND's
// CUDA dropout. Written from the published algorithm; the host test checks it against the
// algorithm's published known-answer vectors. Usable on the host and the device, so that the CPU
// tests can redraw exactly the masks that a kernel drew.
//
// A dropout mask drawn by a kernel is a pure function of (seed, offset, element index): ATen's CUDA
// generator hands out (seed, offset) pairs (CUDAGeneratorImpl::philox_cuda_state), and element e of
// the masked (rows, cols) matrix, e = row · cols + col, takes word e mod 4 of
// Philox4x32-10(counter {offset / 4 (64 bits), e / 4 (64 bits)}, key seed). That is cuRAND's layout
// for curand_init(seed, subsequence e / 4, offset): the generator's offsets are never handed out
// twice, so the draws never overlap those of ATen's own kernels. A backward pass redraws the same
// mask from the same pair instead of keeping it in memory.
#include <cstdint>

#if defined(__CUDACC__)
#define FT_PHILOX_HD __host__ __device__ __forceinline__
#define FT_PHILOX_UNROLL _Pragma("unroll")
#else
#define FT_PHILOX_HD inline
#define FT_PHILOX_UNROLL
#endif

namespace ft::kernels::detail {

struct Philox4 {
  uint32_t w[4];
};

/// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a 64-bit key.
FT_PHILOX_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // the round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // the key schedule's increments
  FT_PHILOX_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.w[0];  // one 32×32→64 multiply (mul.wide)
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.w[2];
    const Philox4 next = {{static_cast<uint32_t>(p1 >> 32) ^ ctr.w[1] ^ key0, static_cast<uint32_t>(p1),
                           static_cast<uint32_t>(p0 >> 32) ^ ctr.w[3] ^ key1, static_cast<uint32_t>(p0)}};
    ctr = next;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

/// One kernel's dropout draws: element e is kept iff its word is ≥ threshold, and a kept value is
/// multiplied by inv_keep = 1 / (1 − p).
struct DropoutDraws {
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  float inv_keep = 1.0f;
};

/// The threshold for drop probability p ∈ [0, 1): round(p · 2³²), so that P(keep) = 1 − p within 2⁻³³.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

/// inv_keep for drop probability p as at::native_dropout forms its scale: the keep probability
/// rounded to float, 1 / it in double, rounded to float (float(1 / (1 − p)) differs from it in the
/// last bit for some p, e.g. 0.04 and 0.15), so that the kernels' dropped values equal ATen's.
inline float dropout_inv_keep(double p) {
  return static_cast<float>(1.0 / static_cast<double>(static_cast<float>(1.0 - p)));
}

/// The four words for elements 4q … 4q + 3.
FT_PHILOX_HD Philox4 dropout_words(const DropoutDraws& d, uint64_t q) {
  const uint64_t o = d.offset / 4;
  const Philox4 ctr = {{static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), static_cast<uint32_t>(q),
                        static_cast<uint32_t>(q >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32));
}

/// Whether element e is kept (one Philox call; the kernels draw four elements per call).
FT_PHILOX_HD bool dropout_keeps(const DropoutDraws& d, uint64_t e) {
  return dropout_words(d, e / 4).w[e % 4] >= d.threshold;
}

/// keep[k] for the 8 elements e … e + 7, e a multiple of 4 (two Philox calls).
FT_PHILOX_HD void dropout_keeps8(const DropoutDraws& d, uint64_t e, bool (&keep)[8]) {
  FT_PHILOX_UNROLL
  for (int h = 0; h < 2; ++h) {
    const Philox4 w = dropout_words(d, e / 4 + h);
    FT_PHILOX_UNROLL
    for (int k = 0; k < 4; ++k) keep[4 * h + k] = w.w[k] >= d.threshold;
  }
}

}  // namespace ft::kernels::detail

#undef FT_PHILOX_HD
#undef FT_PHILOX_UNROLL
