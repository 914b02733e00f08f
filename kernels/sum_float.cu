// The float32 sum of compute-dtype gradients (ft/kernels/sum_float.h): a grid-stride loop, 8
// elements per thread and step as 16-byte vectors (the per-thread work in
// ft/kernels/sum_float_thread.h, shared with a host test), one at a time for the tail.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ft/kernels/sum_float.h"
#include "ft/kernels/sum_float_thread.h"

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;
using detail::kSumMaxInputs;

template <typename T>
struct Inputs {
  const T* p[kSumMaxInputs];
};

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) sum_to_float_kernel(Inputs<T> in, float* __restrict__ out, int64_t numel,
                                                                bool vectors) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t tail = 0;
  if (vectors) {
    for (int64_t v = first; v < numel / 8; v += stride) detail::sum_to_float8<T, N>(in.p, v * 8, out);
    tail = numel / 8 * 8;
  }
  for (int64_t i = tail + first; i < numel; i += stride) out[i] = detail::sum_to_float1<T, N>(in.p, i);
}

template <typename T>
void launch(const Inputs<T>& in, int n, float* out, int64_t numel, bool vectors, unsigned blocks, cudaStream_t stream) {
  switch (n) {
    case 1: sum_to_float_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(in, out, numel, vectors); break;
    case 2: sum_to_float_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(in, out, numel, vectors); break;
    case 3: sum_to_float_kernel<T, 3><<<blocks, kThreads, 0, stream>>>(in, out, numel, vectors); break;
    default: sum_to_float_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(in, out, numel, vectors); break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool sum_to_float_fits(const std::vector<at::Tensor>& grads) {
  if (grads.empty() || grads.size() > static_cast<size_t>(kSumMaxInputs)) return false;
  const at::Tensor& g0 = grads[0];
  if (!g0.defined() || !g0.is_cuda() || (g0.scalar_type() != at::kBFloat16 && g0.scalar_type() != at::kHalf)) return false;
  for (const auto& g : grads) {
    if (!g.defined() || g.device() != g0.device() || g.scalar_type() != g0.scalar_type() || g.sizes() != g0.sizes() ||
        !g.is_contiguous())
      return false;
  }
  return true;
}

at::Tensor sum_to_float(const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(sum_to_float_fits(grads), "[sum kernels] sum_to_float: unsupported operands (", grads.size(),
              " tensors; 1 to 4 contiguous bf16/fp16 CUDA tensors of one shape)");
  const at::Tensor& g0 = grads[0];
  c10::cuda::CUDAGuard guard(g0.device());
  at::Tensor out = at::empty(g0.sizes(), g0.options().dtype(at::kFloat));
  const int64_t numel = g0.numel();
  if (numel == 0) return out;
  bool vectors = aligned16(out.data_ptr());
  for (const auto& g : grads) vectors = vectors && aligned16(g.data_ptr());
  const int64_t work = vectors ? std::max<int64_t>(numel / 8, 1) : numel;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8));
  AT_DISPATCH_V2(g0.scalar_type(), "sum_to_float", AT_WRAP([&] {
                   Inputs<scalar_t> in{};
                   for (size_t k = 0; k < grads.size(); ++k) in.p[k] = grads[k].const_data_ptr<scalar_t>();
                   launch<scalar_t>(in, static_cast<int>(grads.size()), out.data_ptr<float>(), numel, vectors, blocks,
                                    c10::cuda::getCurrentCUDAStream());
                 }),
                 at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ft::kernels
