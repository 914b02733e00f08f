#pragma once
// CPU forms of the transformer's pieces where ATen's default is slow on a small model's CPU step,
// each with its own backward pass: RMSNorm and rotary embeddings fused (composed from ATen ops, as
// Hugging Face writes them, each costs 5-6 kernels forward and about 10 backward over the
// activations; fused, one pass each way), linear layers through oneDNN, and attention over short
// packed sequences as grouped GEMMs. Each has a *_fusable/*_fits predicate; the callers keep the ATen
// composition for everything else and as the reference the tests compare with.
#include <ATen/core/Tensor.h>

namespace ft::model {

/// x: (..., D) CPU float32/float64, weight (D) of the same dtype.
bool rms_norm_fusable(const at::Tensor& x, const at::Tensor& weight);
/// weight * (x * rsqrt(mean(x², -1) + eps)), differentiable in x and weight. The mean of squares
/// is accumulated in float64.
at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

/// x: (B, H, T, D) with a unit-stride last dimension; cos and sin (B, 1, T, D), no gradient, of x's
/// dtype, each the same table twice along D (Hugging Face's rotary layout).
bool rope_fusable(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
/// scale · (x * cos + rotate_half(x) * sin), differentiable in x. The result has x's memory layout,
/// or is contiguous (B, H, T, D) with `contiguous`; x's gradient has x's layout. (The attention
/// passes its 1/√D as `scale` for the queries: free here, a pass over the scores' gradient in the
/// scaled GEMM's backward.)
at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool contiguous = false,
                      double scale = 1.0);

/// y = x Wᵀ (+ b), differentiable in x, W and b, through oneDNN on float32 CPU tensors and through
/// at::linear otherwise. ATen's CPU GEMM is MKL's, which runs AVX2 kernels on AMD processors;
/// oneDNN's JIT kernels (built into libtorch, reached through the mkldnn::_linear_pointwise op that
/// torch.compile's CPU backend uses) run AVX-512 where the processor has it. On the 2-core AMD EPYC
/// (Zen 5) development machine that is 2× (forward, dX) and 1.2-2× (dW) the GEMM throughput at
/// the bundled model's shapes. The backward products are oneDNN calls too, dX = dY W and
/// dW = dYᵀ X, on the transposed views; db = Σ dY. Results agree with MKL's to float32 rounding
/// (~1e-6 relative); both are deterministic for a given thread count. oneDNN's JIT GEMM runs with
/// its stack pointer in a heap buffer, so a process that handles signals while it computes must
/// handle them on an alternate stack (train/run.cpp's SignalScope does).
/// Where nothing needs a gradient (evaluation, or inside a custom node's forward or backward, where
/// `weight` may be a transposed view such as Wᵀ for dY W), it is the plain product, with no
/// autograd node.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});
/// Whether linear() takes the oneDNN path for these tensors (CPU float32, W (N, K) and x (..., K)
/// with K, N > 0 and rows, no sparse or quantized layouts, libtorch built with oneDNN, CPU autocast
/// off).
bool onednn_linear_fits(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

/// Attention over a short packed sequence as three batched GEMM-backed ops (scores, softmax, values)
/// instead of SDPA's CPU flash kernel, which at T = 128 spends most of its time outside its small
/// tiles (on the bundled model 1.6-2.2 ms per layer forward and backward against 2.6). Queries that
/// share a key/value head (GQA) are stacked into one (r·T, D) block per group, so keys and values
/// are neither repeated nor copied. The score matrices (B·H·T·T) are kept for the backward pass,
/// so the path is taken only for T ≤ 512 and at most 2^23 scores.
/// q (B, H, T, D) and k, v (B, G, T, D) CPU float32/float64, H a multiple of G; mask (B or 1, 1, T,
/// T) bool (true = may attend) with at least one key per query; no dropout.
bool grouped_attention_fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask);
/// softmax(q kᵀ · scale + bias) v as (B, H, T, D). `bias` is grouped_attention_bias(mask, H / G).
/// (scale 1 when q comes scaled already, as from fused_rope.)
at::Tensor grouped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                             double scale);
/// The additive form of `mask` (0 where true, -inf where false) laid out as grouped_attention's
/// scores, (Bm·G, r·T, T) for a mask of batch Bm (B or 1); made once per forward pass and shared by
/// the layers. `dtype` is the scores' type.
at::Tensor grouped_attention_bias(const at::Tensor& mask, int64_t groups, int64_t rep, at::ScalarType dtype);

}  // namespace ft::model
