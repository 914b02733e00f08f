#pragma once
// What one lane of a warp computes in the LoRA row kernels (kernels/lora_rows.cu), shared with the
// host so that a CPU test runs the kernels' indexing, vector packing and rounding on machines
// without a GPU (LoraRowsKernel.LanesOnTheHost*). The device kernels add only the warp's row
// assignment and, for the down projection, a shuffle reduction of the lanes' partial sums.
//
// A warp owns Rows (1 or 2) consecutive token rows; with two, a's vectors serve both. Lane l walks
// the columns c = 8 (l + 32 k), k = 0, 1, …: 8 consecutive elements per step, moved as 16-byte vectors (two for float32). Rank is the adapter
// rank r (a template argument: the partial sums live in registers).
//
//   down (forward): xo[t, c] = T(x[t, c]);  acc[t][j] = Σ_c float(xo[t, c]) · float(a[j, c])
//                   (this lane's columns; the warp's sum, times the scale, is s S[t, j])
//   up (backward):  dx[t, c] = float(base[t, c]) + Σ_j (scale · float(ds[t, j])) · float(a[j, c])
//
// With dropout (Drop = true), the down projection reads h = drop(xo) instead of xo, and the up
// projection's low-rank term goes through dropout's backward; the mask is redrawn from Philox
// (ft/kernels/philox.h) for element e = t · in + c of the (T, in) input, never stored:
//   down: h[t, c] = keep(e) ? T(float(xo[t, c]) · inv_keep) : 0 (at::native_dropout's values),
//         acc[t][j] = Σ_c float(h[t, c]) · float(a[j, c]); xo itself is written undropped (the
//         frozen base reads x, not its dropped copy)
//   up:   dx[t, c] = float(base[t, c]) + (keep(e) ? inv_keep · Σ_j (scale · float(ds[t, j])) · float(a[j, c]) : 0)
#include <cstdint>

#include "ft/kernels/philox.h"
#include "ft/kernels/vec16.h"

#if defined(__CUDACC__)
#define FT_LORA_HD __host__ __device__ __forceinline__
#define FT_LORA_UNROLL _Pragma("unroll")
#else
#define FT_LORA_HD inline
#define FT_LORA_UNROLL
#endif

namespace ft::kernels::detail {

constexpr int kLoraLanes = 32;      ///< lanes per warp
constexpr int kLoraLaneCols = 8;    ///< consecutive columns per lane and step
constexpr int kLoraStepCols = kLoraLanes * kLoraLaneCols;

/// h = T(v · inv_keep) where kept, else 0, for 8 values v of T (as float) at element e.
template <typename T>
FT_LORA_HD void lora_drop8(const DropoutDraws& d, uint64_t e, float (&v)[8]) {
  bool keep[8];
  dropout_keeps8(d, e, keep);
  FT_LORA_UNROLL
  for (int k = 0; k < 8; ++k) v[k] = keep[k] ? static_cast<float>(static_cast<T>(v[k] * d.inv_keep)) : 0.0f;
}

/// The down projection's per-lane part for `rows` (≤ Rows) rows starting at x, xo: casts this
/// lane's columns of x to T into xo and accumulates acc[i][j] = Σ float(xo[i, c]) a[j, c] over them
/// (with Drop, Σ float(h[i, c]) a[j, c]; row0: the first row's index in the (T, in) input, for the
/// mask). x: float32 rows of `in` elements at stride ldx; xo: T rows at stride ldo; a: (Rank, in) T,
/// contiguous. in, ldx (mod 4), ldo (mod 8) and the pointers' 16-byte alignment as the launcher checks.
template <typename T, int Rank, int Rows, bool Drop = false>
FT_LORA_HD void lora_down_lane(const float* x, int64_t ldx, T* xo, int64_t ldo, const T* a, int64_t in, int rows,
                               int lane, float (&acc)[Rows][Rank], const DropoutDraws& drop = {}, int64_t row0 = 0) {
  FT_LORA_UNROLL
  for (int i = 0; i < Rows; ++i) {
    FT_LORA_UNROLL
    for (int j = 0; j < Rank; ++j) acc[i][j] = 0.0f;
  }
  for (int64_t c = static_cast<int64_t>(lane) * kLoraLaneCols; c < in; c += kLoraStepCols) {
    float xb[Rows][8];
    FT_LORA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      if (i < rows) {
        float f[8];
        load16_float(x + i * ldx + c, f);
        load16_float(x + i * ldx + c + 4, f + 4);
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) xb[i][e] = static_cast<float>(static_cast<T>(f[e]));
        store16_float(xo + i * ldo + c, xb[i]);  // exact: xb holds T's values
        if constexpr (Drop) lora_drop8<T>(drop, static_cast<uint64_t>(row0 + i) * in + c, xb[i]);
      } else {
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) xb[i][e] = 0.0f;
      }
    }
    FT_LORA_UNROLL
    for (int j = 0; j < Rank; ++j) {
      float av[8];
      load16_float(a + j * in + c, av);
      FT_LORA_UNROLL
      for (int i = 0; i < Rows; ++i) {
        float sum = acc[i][j];
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) sum += xb[i][e] * av[e];
        acc[i][j] = sum;
      }
    }
  }
}

/// After the warp's reduction (every lane holds the row sums): lane j mod 32 writes
/// s[i, j] = T(scale · acc[i][j]), one rounding as a GEMM with alpha = scale rounds.
template <typename T, int Rank, int Rows>
FT_LORA_HD void lora_down_store(const float (&acc)[Rows][Rank], float scale, T* s, int64_t lds, int rows, int lane) {
  FT_LORA_UNROLL
  for (int i = 0; i < Rows; ++i) {
    if (i >= rows) break;
    FT_LORA_UNROLL
    for (int j = 0; j < Rank; ++j) {
      if (j % kLoraLanes == lane) s[i * lds + j] = static_cast<T>(scale * acc[i][j]);
    }
  }
}

/// The up projection's per-lane part for `rows` (≤ Rows) rows: dx[i, c] = float(base[i, c]) +
/// Σ_j scale · float(ds[i, j]) · float(a[j, c]) for this lane's columns, written as float32 (with
/// Drop, the sum through dropout's backward; row0 as for lora_down_lane). base: T rows at stride
/// ldb (mod 8); ds: T rows of Rank at stride ldd; a: (Rank, in) T, contiguous; dx: float32 rows at
/// stride ldx (mod 4).
template <typename T, int Rank, int Rows, bool Drop = false>
FT_LORA_HD void lora_up_lane(const T* base, int64_t ldb, const T* ds, int64_t ldd, const T* a, int64_t in, float scale,
                             float* dx, int64_t ldx, int rows, int lane, const DropoutDraws& drop = {},
                             int64_t row0 = 0) {
  float d[Rows][Rank];
  FT_LORA_UNROLL
  for (int i = 0; i < Rows; ++i) {
    FT_LORA_UNROLL
    for (int j = 0; j < Rank; ++j) d[i][j] = i < rows ? scale * static_cast<float>(ds[i * ldd + j]) : 0.0f;
  }
  for (int64_t c = static_cast<int64_t>(lane) * kLoraLaneCols; c < in; c += kLoraStepCols) {
    alignas(16) float acc[Rows][8];  // without dropout the sum starts at base; with it, at 0
    FT_LORA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      if (i < rows && !Drop) {
        load16_float(base + i * ldb + c, acc[i]);
      } else {
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
      }
    }
    FT_LORA_UNROLL
    for (int j = 0; j < Rank; ++j) {
      float av[8];
      load16_float(a + j * in + c, av);
      FT_LORA_UNROLL
      for (int i = 0; i < Rows; ++i) {
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) acc[i][e] += d[i][j] * av[e];
      }
    }
    if constexpr (Drop) {
      FT_LORA_UNROLL
      for (int i = 0; i < Rows; ++i) {
        if (i >= rows) break;
        bool keep[8];
        dropout_keeps8(drop, static_cast<uint64_t>(row0 + i) * in + c, keep);
        float b[8];
        load16_float(base + i * ldb + c, b);
        FT_LORA_UNROLL
        for (int e = 0; e < 8; ++e) acc[i][e] = b[e] + (keep[e] ? acc[i][e] * drop.inv_keep : 0.0f);
      }
    }
    FT_LORA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      if (i >= rows) break;
      store16(dx + i * ldx + c, acc[i]);
      store16(dx + i * ldx + c + 4, acc[i] + 4);
    }
  }
}

/// The dropped copy h of 8 elements of row `row` (in columns, T): h[c + k] = T(float(xo[c + k]) ·
/// inv_keep) where kept, else 0; the values lora_down_lane's dropout read (for dA = dSᵀ h in the
/// backward pass). c a multiple of 8; xo and h 16-byte aligned.
template <typename T>
FT_LORA_HD void lora_dropout8(const T* xo, T* h, const DropoutDraws& drop, int64_t row, int64_t in, int64_t c) {
  float v[8];
  load16_float(xo, v);
  lora_drop8<T>(drop, static_cast<uint64_t>(row) * in + c, v);
  store16_float(h, v);
}

}  // namespace ft::kernels::detail

#undef FT_LORA_HD
#undef FT_LORA_UNROLL
