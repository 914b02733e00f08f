// The fused SwiGLU (ft/kernels/swiglu.h): an elementwise grid-stride loop, 8 elements per thread and
// step where the tensors allow 16-byte vectors of 2-byte types (4 for float32), else one at a time.
// The per-element arithmetic is ft/kernels/swiglu_thread.h, shared with a host test.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ft/kernels/swiglu.h"
#include "ft/kernels/swiglu_thread.h"
#include "ft/kernels/vec16.h"

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;

using detail::kVec16;
using detail::load16;
using detail::store16;

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                                  T* __restrict__ h, int64_t n, bool vectors) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (vectors) {
    for (int64_t v = first; v < n / kVec16<T>; v += stride) {
      alignas(16) T g[kVec16<T>], u[kVec16<T>], y[kVec16<T>];
      load16(gate + v * kVec16<T>, g);
      load16(up + v * kVec16<T>, u);
#pragma unroll
      for (int e = 0; e < kVec16<T>; ++e) y[e] = detail::swiglu_forward(g[e], u[e]);
      store16(h + v * kVec16<T>, y);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) h[i] = detail::swiglu_forward(gate[i], up[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(const T* __restrict__ dh, const T* __restrict__ gate,
                                                                   const T* __restrict__ up, T* __restrict__ dgate,
                                                                   T* __restrict__ dup, int64_t n, bool vectors) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (vectors) {
    for (int64_t v = first; v < n / kVec16<T>; v += stride) {
      alignas(16) T d[kVec16<T>], g[kVec16<T>], u[kVec16<T>], dg[kVec16<T>], du[kVec16<T>];
      load16(dh + v * kVec16<T>, d);
      load16(gate + v * kVec16<T>, g);
      load16(up + v * kVec16<T>, u);
#pragma unroll
      for (int e = 0; e < kVec16<T>; ++e) detail::swiglu_backward(d[e], g[e], u[e], dg[e], du[e]);
      store16(dgate + v * kVec16<T>, dg);
      store16(dup + v * kVec16<T>, du);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) detail::swiglu_backward(dh[i], gate[i], up[i], dgate[i], dup[i]);
  }
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 132 * 16)));
}

}  // namespace

bool swiglu_fits(const at::Tensor& gate, const at::Tensor& up) {
  if (!gate.defined() || !up.defined() || !gate.is_cuda() || gate.sizes() != up.sizes() ||
      gate.scalar_type() != up.scalar_type() || gate.device() != up.device())
    return false;
  const auto t = gate.scalar_type();
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && gate.is_contiguous() && up.is_contiguous();
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(swiglu_fits(gate, up), "[swiglu kernels] unsupported operands: gate ", gate.sizes(), " ",
              gate.scalar_type(), ", up ", up.sizes(), " ", up.scalar_type());
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor h = at::empty_like(gate, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return h;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(gate.scalar_type(), "swiglu_forward", AT_WRAP([&] {
    const bool vectors = n % kVec16<scalar_t> == 0 && aligned(gate) && aligned(up) && aligned(h);
    swiglu_forward_kernel<scalar_t><<<blocks_for(vectors ? n / kVec16<scalar_t> : n), kThreads, 0, stream>>>(
        gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), n, vectors);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

std::pair<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(swiglu_fits(gate, up) && dh.sizes() == gate.sizes() && dh.device() == gate.device(),
              "[swiglu kernels] unsupported operands: dh ", dh.sizes(), ", gate ", gate.sizes());
  c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor d = dh.to(gate.scalar_type()).contiguous();
  at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor dup = at::empty_like(up, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return {dgate, dup};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(gate.scalar_type(), "swiglu_backward", AT_WRAP([&] {
    const bool vectors =
        n % kVec16<scalar_t> == 0 && aligned(d) && aligned(gate) && aligned(up) && aligned(dgate) && aligned(dup);
    swiglu_backward_kernel<scalar_t><<<blocks_for(vectors ? n / kVec16<scalar_t> : n), kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>(),
        dup.data_ptr<scalar_t>(), n, vectors);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dgate, dup};
}

}  // namespace ft::kernels
