// Fused RMSNorm forward.
//
// Legend: R rows (all leading dims of x flattened), E hidden size.
//   x: (R, E) in Tin; w: (E) in Tw; y: (R, E) in Tout = promote(Tin, Tw).
//   y[r, e] = Tout( float(w[e]) * float(Tin(x[r, e] * rsqrt(mean_e x[r, e]² + eps))) )
// The intermediate rounding to Tin matches Hugging Face's `weight * hidden.to(input_dtype)`.
// One block per row: threads stride over E accumulating Σx² in float32, a warp-shuffle + shared
// memory reduction gives the row's scale, then the same threads write the outputs.
#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ft/kernels/rmsnorm.h"

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

template <typename Tin, typename Tw, typename Tout>
__global__ void rmsnorm_kernel(const Tin* __restrict__ x, const Tw* __restrict__ w, Tout* __restrict__ y,
                               int64_t E, float eps) {
  const int64_t row = blockIdx.x;
  const Tin* xr = x + row * E;
  Tout* yr = y + row * E;
  float sum = 0.f;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    const float v = static_cast<float>(xr[e]);
    sum += v * v;
  }
  const float scale = rsqrtf(block_sum(sum) / static_cast<float>(E) + eps);
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    const Tin normed = static_cast<Tin>(static_cast<float>(xr[e]) * scale);
    yr[e] = static_cast<Tout>(static_cast<float>(w[e]) * static_cast<float>(normed));
  }
}

}  // namespace

at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "[rmsnorm] x and weight must be CUDA tensors");
  TORCH_CHECK(x.device() == weight.device(), "[rmsnorm] x is on ", x.device(), " but weight on ", weight.device());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "[rmsnorm] x and weight must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0), "[rmsnorm] x ", x.sizes(),
              " and weight ", weight.sizes(), " disagree on the hidden size");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t E = x.size(-1);
  const int64_t R = E == 0 ? 0 : x.numel() / E;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(c10::promoteTypes(x.scalar_type(), weight.scalar_type())));
  if (R == 0 || E == 0) return y;
  TORCH_CHECK(R <= 0x7fffffff, "[rmsnorm] too many rows: ", R);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_x", [&] {
    using Tin = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "rmsnorm_w", [&] {
      using Tw = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "rmsnorm_y", [&] {
        rmsnorm_kernel<Tin, Tw, scalar_t><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
            x.data_ptr<Tin>(), weight.data_ptr<Tw>(), y.data_ptr<scalar_t>(), E, static_cast<float>(eps));
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace ft::kernels
