#pragma once
// Host launchers for the fused rotary embedding on CUDA (kernels/rope.cu). Reference: the model's
// unfused formula q cos + rotate_half(q) sin (ft/model/llama.cpp), which it equals bit for bit
// where the tables are float32 (see ft/kernels/rope_thread.h).
//
// Unfused under bf16 autocast, the bf16 projection meets float32 tables: a float32 product, a
// rotated copy (two slices and a concatenation), a second product and a sum, all (B, H, T, D) in
// float32, then attention's cast back to bf16 — about 40 bytes of traffic per element, and as much
// again in the backward pass. Fused: 2 read and 2 written each way (plus the tables, shared by
// the heads).
#include <ATen/core/Tensor.h>

namespace ft::kernels {

/// Whether rope_forward takes these operands: x (B, H, T, D) on CUDA in float32, bf16 or fp16 with
/// unit last stride and D even; cos and sin (B, 1, T, D) float32 on x's device with unit last stride.
bool rope_fits(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// y = x cos + rotate_half(x) sin in float32, rounded once to x's dtype; y has x's strides where x is
/// dense (a transposed projection stays one), else it is contiguous.
at::Tensor rope_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// The gradient of rope_forward with respect to x, in `dtype`, laid out with `strides` where those
/// describe a dense tensor of dy's sizes (else contiguous): dx = dy cos + rotate_halfᵀ(dy sin).
at::Tensor rope_backward(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin, at::ScalarType dtype,
                         at::IntArrayRef strides);

}  // namespace ft::kernels
