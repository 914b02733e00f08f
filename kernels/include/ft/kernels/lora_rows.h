#pragma once
// Host launchers for the LoRA row kernels (kernels/lora_rows.cu): the memory-bound passes of the
// fused LoRA layer under autocast, each with its rank-r product folded in, so that x and dx each
// take one pass fewer over memory. Reference: the fused LoRA node's ATen path (ft/adapt/lora.h),
// which the tests compare against, with float64 products.
//
// Both kernels give one warp two token rows (one below 8192 rows, to keep every SM busy); each
// lane moves 8 consecutive columns at a time as 16-byte vectors and keeps its rank-r sums in
// registers (r ≤ 32: above that, the r multiply-adds per element outrun the memory traffic on CUDA
// cores, and the GEMM path is the faster one). LoRA dropout happens inside them: the mask is a pure
// function of the CUDA generator's (seed, offset) and the element's index (ft/kernels/philox.h),
// drawn in the forward kernel and redrawn by the backward ones, never stored.
#include <ATen/core/Tensor.h>

namespace ft::kernels {

/// Whether lora_cast_down takes these operands: x float32 (T, in) CUDA with unit column stride;
/// a (r, in) contiguous in bf16 or fp16 on x's device with r ∈ {4, 8, 12, 16, 24, 32}; xo (T, in) and
/// s (T, r) in a's dtype with unit column stride; in, x's and xo's row strides multiples of 8, 4
/// and 8 elements; every pointer 16-byte aligned (s: 2-byte).
bool lora_cast_down_fits(const at::Tensor& x, const at::Tensor& a, const at::Tensor& xo, const at::Tensor& s);

/// xo = x cast to a's dtype, and s = dtype(scale · xo aᵀ) (float32 accumulation, one rounding), in
/// one pass over x: the cast that autocast makes anyway, with the adapter's down projection S read
/// from the cast values while they are in registers (no second read of x). xo and s may be views
/// into one (T, in + r) buffer ([x | s S] of the extended GEMM). Throws unless lora_cast_down_fits.
///
/// Dropout p > 0: s = dtype(scale · h aᵀ) with h = at::native_dropout's values for the mask that the
/// kernel draws from the device's default CUDA generator (Philox, ft/kernels/philox.h; CUDA graph
/// capture works as for ATen's dropout), while xo stays undropped. Neither h nor the mask is
/// written: the returned int64 CUDA tensor (seed, offset) lets lora_up_add and lora_dropout_rows
/// redraw the mask. Returns an undefined tensor for p = 0.
at::Tensor lora_cast_down(const at::Tensor& x, const at::Tensor& a, double scale, const at::Tensor& xo,
                          const at::Tensor& s, double p = 0.0);

/// Whether lora_up_add takes these operands: base (T, in) and ds (T, r) in bf16 or fp16 CUDA with
/// unit column stride; a (r, in) contiguous in their dtype, r ∈ {4, 8, 12, 16, 24, 32}; in and base's row
/// stride multiples of 8; base and a 16-byte aligned.
bool lora_up_add_fits(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& a);

/// dx = float32(base) + scale · ds a, (T, in) float32: the input gradient's low-rank term added to
/// the base GEMM's dy W while it is converted to the float32 of autocast's input, in one pass (no
/// bf16 rounding of the sum, no separate read-modify-write of dx). base and ds may be views into
/// one (T, in + r) buffer (dy [W | B] of the extended GEMM). Throws unless lora_up_add_fits.
/// Dropout p > 0 (drawn: lora_cast_down's result): the low-rank term goes through dropout's backward,
/// dx = float32(base) + m ⊙ (scale · ds a) / (1 − p), with the forward's mask m redrawn.
at::Tensor lora_up_add(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& a, double scale, double p = 0.0,
                       const at::Tensor& drawn = {});

/// h = the dropped copy of xo that lora_cast_down's s read (p > 0, drawn: its result), (T, in)
/// contiguous: for dA = dSᵀ h in the backward pass, made there and freed after it instead of kept
/// from the forward pass. xo: (T, in) bf16 or fp16 CUDA, unit column stride, in and the row stride
/// multiples of 8, 16-byte aligned (lora_cast_down's xo).
at::Tensor lora_dropout_rows(const at::Tensor& xo, double p, const at::Tensor& drawn);

}  // namespace ft::kernels
