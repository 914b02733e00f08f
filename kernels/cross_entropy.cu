// The fused cross-entropy kernels (ft/kernels/cross_entropy.h). Each block takes one row of logits;
// the per-thread work is ft/kernels/cross_entropy_thread.h, shared with a host test, and here only
// the block's reduction of the threads' (max, sum) pairs: a warp shuffle, then shared memory.
// Memory-bound: at V = 128256 a row is 250 KB of bf16, read once forward and once (plus one write)
// backward, with one exp per element.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ft/kernels/cross_entropy.h"
#include "ft/kernels/cross_entropy_thread.h"

namespace ft::kernels {
namespace {

using detail::MaxSum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ MaxSum shuffle_xor(MaxSum a, int offset) {
  return {__shfl_xor_sync(0xffffffffu, a.m, offset), __shfl_xor_sync(0xffffffffu, a.s, offset)};
}

// The whole block's pair, in every thread.
__device__ MaxSum block_merge(MaxSum a) {
  __shared__ MaxSum warp_pairs[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) a = detail::max_sum_merge(a, shuffle_xor(a, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_pairs[warp] = a;
  __syncthreads();
  MaxSum b = lane < kWarps ? warp_pairs[lane] : detail::max_sum_empty();
  for (int offset = 16; offset > 0; offset /= 2) b = detail::max_sum_merge(b, shuffle_xor(b, offset));
  return b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_forward_kernel(const T* __restrict__ logits,
                                                                         const int64_t* __restrict__ targets, int64_t V,
                                                                         bool vectors, int64_t ignore_index,
                                                                         float* __restrict__ loss,
                                                                         float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  const MaxSum pair = block_merge(detail::ce_row_partial(x, V, threadIdx.x, kThreads, vectors));
  if (threadIdx.x == 0) {
    const float l = detail::max_sum_lse(pair);
    lse[row] = l;
    loss[row] = detail::ce_row_loss(x, V, l, targets[row], ignore_index);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_backward_kernel(const T* __restrict__ logits,
                                                                          const int64_t* __restrict__ targets,
                                                                          const float* __restrict__ lse,
                                                                          const float* __restrict__ grad_scale,
                                                                          int64_t V, bool vectors, int64_t ignore_index,
                                                                          T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  detail::ce_row_grad(logits + row * V, grad + row * V, V, threadIdx.x, kThreads, vectors, lse[row], target,
                      *grad_scale, target == ignore_index);
}

bool vectors_fit(const at::Tensor& logits) {
  const int64_t per_vector = 16 / static_cast<int64_t>(logits.element_size());
  return logits.size(1) % per_vector == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
}

}  // namespace

bool cross_entropy_fits(const at::Tensor& logits, const at::Tensor& targets) {
  if (!logits.defined() || !targets.defined() || !logits.is_cuda() || logits.dim() != 2 || !logits.is_contiguous())
    return false;
  const auto t = logits.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  return targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong &&
         targets.device() == logits.device() && targets.is_contiguous() && logits.size(0) <= INT32_MAX;
}

std::pair<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                        int64_t ignore_index) {
  TORCH_CHECK(cross_entropy_fits(logits, targets), "[cross entropy kernels] unsupported operands: logits ",
              logits.sizes(), " ", logits.scalar_type(), ", targets ", targets.sizes(), " ", targets.scalar_type());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return {loss, lse};
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vectors = vectors_fit(logits);
  AT_DISPATCH_V2(logits.scalar_type(), "cross_entropy_forward", AT_WRAP([&] {
    cross_entropy_forward_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), V, vectors, ignore_index, loss.data_ptr<float>(),
        lse.data_ptr<float>());
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& grad_scale, int64_t ignore_index) {
  TORCH_CHECK(cross_entropy_fits(logits, targets), "[cross entropy kernels] unsupported operands: logits ",
              logits.sizes(), " ", logits.scalar_type(), ", targets ", targets.sizes(), " ", targets.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == logits.size(0) &&
                  lse.device() == logits.device(),
              "[cross entropy kernels] lse must be float32 (N) on the logits' device");
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1 && grad_scale.device() == logits.device(),
              "[cross entropy kernels] grad_scale must be one float32 value on the logits' device");
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = at::empty_like(logits);
  if (N == 0) return grad;
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vectors = vectors_fit(logits);
  const at::Tensor scale = grad_scale.contiguous();
  AT_DISPATCH_V2(logits.scalar_type(), "cross_entropy_backward", AT_WRAP([&] {
    cross_entropy_backward_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(), scale.data_ptr<float>(), V,
        vectors, ignore_index, grad.data_ptr<scalar_t>());
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace ft::kernels
