// The fused SwiGLU (ft/kernels/swiglu.h): an elementwise grid-stride loop, 8 elements per thread and
// step where the tensors allow 16-byte vectors of 2-byte types (4 for float32), else one at a time.
// The per-element arithmetic is ft/kernels/swiglu_thread.h, shared with a host test.
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

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;

struct alignas(16) Vec16 {
  uint32_t w[4];
};

template <typename T>
constexpr int kPer = static_cast<int>(16 / sizeof(T));

template <typename T>
__device__ __forceinline__ void load(const T* p, T* out) {
  *reinterpret_cast<Vec16*>(out) = *reinterpret_cast<const Vec16*>(p);
}

template <typename T>
__device__ __forceinline__ void store(T* p, const T* in) {
  *reinterpret_cast<Vec16*>(p) = *reinterpret_cast<const Vec16*>(in);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                                  T* __restrict__ h, int64_t n, bool vectors) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (vectors) {
    for (int64_t v = first; v < n / kPer<T>; v += stride) {
      alignas(16) T g[kPer<T>], u[kPer<T>], y[kPer<T>];
      load(gate + v * kPer<T>, g);
      load(up + v * kPer<T>, u);
#pragma unroll
      for (int e = 0; e < kPer<T>; ++e) y[e] = detail::swiglu_forward(g[e], u[e]);
      store(h + v * kPer<T>, y);
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
    for (int64_t v = first; v < n / kPer<T>; v += stride) {
      alignas(16) T d[kPer<T>], g[kPer<T>], u[kPer<T>], dg[kPer<T>], du[kPer<T>];
      load(dh + v * kPer<T>, d);
      load(gate + v * kPer<T>, g);
      load(up + v * kPer<T>, u);
#pragma unroll
      for (int e = 0; e < kPer<T>; ++e) detail::swiglu_backward(d[e], g[e], u[e], dg[e], du[e]);
      store(dgate + v * kPer<T>, dg);
      store(dup + v * kPer<T>, du);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) detail::swiglu_backward(dh[i], gate[i], up[i], dgate[i], dup[i]);
  }
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 132 * 16)));
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float());
    case at::kBFloat16: return f(c10::BFloat16());
    case at::kHalf: return f(c10::Half());
    default: TORCH_CHECK(false, "[swiglu kernels] unsupported dtype ", dtype);
  }
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
  dispatch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool vectors = n % kPer<T> == 0 && aligned(gate) && aligned(up) && aligned(h);
    swiglu_forward_kernel<T><<<blocks_for(vectors ? n / kPer<T> : n), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(gate.data_ptr()), reinterpret_cast<const T*>(up.data_ptr()),
        reinterpret_cast<T*>(h.data_ptr()), n, vectors);
  });
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
  dispatch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool vectors = n % kPer<T> == 0 && aligned(d) && aligned(gate) && aligned(up) && aligned(dgate) && aligned(dup);
    swiglu_backward_kernel<T><<<blocks_for(vectors ? n / kPer<T> : n), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(d.data_ptr()), reinterpret_cast<const T*>(gate.data_ptr()),
        reinterpret_cast<const T*>(up.data_ptr()), reinterpret_cast<T*>(dgate.data_ptr()),
        reinterpret_cast<T*>(dup.data_ptr()), n, vectors);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dgate, dup};
}

}  // namespace ft::kernels
