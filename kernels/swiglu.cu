// The fused SwiGLU (ft/kernels/swiglu.h): an elementwise loop over rows, 8 elements per thread and
// step where the tensors allow 16-byte vectors of 2-byte types (4 for float32), else one at a time.
// The per-element arithmetic is ft/kernels/swiglu_thread.h, shared with a host test.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "ft/kernels/rows.h"
#include "ft/kernels/swiglu.h"
#include "ft/kernels/swiglu_thread.h"
#include "ft/kernels/vec16.h"

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;

using detail::kVec16;

// Rows (ft/kernels/rows.h): blockIdx.y walks the rows, the threads of blockIdx.x their columns, so
// that no index is divided (ft/kernels/swiglu_thread.h). Each operand has its own row stride: the
// halves of a packed [gate | up] are rows of stride 2·I.
__device__ __forceinline__ detail::ThreadAt thread_at() {
  return {blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, threadIdx.x, blockDim.x};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(const T* __restrict__ gate, int64_t ldg,
                                                                  const T* __restrict__ up, int64_t ldu,
                                                                  T* __restrict__ h, int64_t ldh, int64_t rows,
                                                                  int64_t cols, bool vectors) {
  detail::swiglu_forward_rows(thread_at(), gate, ldg, up, ldu, h, ldh, rows, cols, vectors);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(const T* __restrict__ dh, int64_t ldd,
                                                                   const T* __restrict__ gate, int64_t ldg,
                                                                   const T* __restrict__ up, int64_t ldu,
                                                                   T* __restrict__ dgate, int64_t lddg,
                                                                   T* __restrict__ dup, int64_t lddu, int64_t rows,
                                                                   int64_t cols, bool vectors) {
  detail::swiglu_backward_rows(thread_at(), dh, ldd, gate, ldg, up, ldu, dgate, lddg, dup, lddu, rows, cols, vectors);
}

// 16-byte vectors where every operand's start and row stride keep them aligned.
template <typename T>
bool vectorizable(int64_t cols, std::initializer_list<std::pair<const at::Tensor*, int64_t>> operands) {
  if (cols % kVec16<T> != 0) return false;
  for (const auto& [t, ld] : operands)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || ld % kVec16<T> != 0) return false;
  return true;
}

dim3 grid_for(int64_t rows, int64_t items_per_row) { return detail::rows_dim3(rows, items_per_row, kThreads); }

bool fits_rows(const at::Tensor& t, const at::Tensor& like) {
  detail::RowsView v;
  return t.defined() && t.is_cuda() && t.device() == like.device() && t.scalar_type() == like.scalar_type() &&
         t.sizes() == like.sizes() && detail::tensor_rows(t, v);
}

}  // namespace

bool swiglu_fits(const at::Tensor& gate, const at::Tensor& up) {
  if (!gate.defined() || !gate.is_cuda()) return false;
  const auto t = gate.scalar_type();
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && fits_rows(gate, gate) && fits_rows(up, gate);
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(swiglu_fits(gate, up), "[swiglu kernels] unsupported operands: gate ", gate.sizes(), " ",
              gate.strides(), " ", gate.scalar_type(), ", up ", up.sizes(), " ", up.strides(), " ", up.scalar_type());
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor h = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  detail::RowsView g, u, y;
  detail::tensor_rows(gate, g), detail::tensor_rows(up, u), detail::tensor_rows(h, y);
  if (h.numel() == 0) return h;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(gate.scalar_type(), "swiglu_forward", AT_WRAP([&] {
    const bool vectors = vectorizable<scalar_t>(g.cols, {{&gate, g.ld}, {&up, u.ld}, {&h, y.ld}});
    swiglu_forward_kernel<scalar_t><<<grid_for(g.rows, vectors ? g.cols / kVec16<scalar_t> : g.cols), kThreads, 0, stream>>>(
        gate.data_ptr<scalar_t>(), g.ld, up.data_ptr<scalar_t>(), u.ld, h.data_ptr<scalar_t>(), y.ld, g.rows, g.cols,
        vectors);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

void swiglu_backward_out(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
                         const at::Tensor& dup) {
  TORCH_CHECK(swiglu_fits(gate, up) && dh.defined() && dh.sizes() == gate.sizes() && dh.device() == gate.device() &&
                  fits_rows(dgate, gate) && fits_rows(dup, gate),
              "[swiglu kernels] unsupported operands: dh ", dh.sizes(), ", gate ", gate.sizes(), " ", gate.strides(),
              ", up ", up.strides(), ", dgate ", dgate.sizes(), " ", dgate.strides(), ", dup ", dup.sizes(), " ",
              dup.strides());
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor d = dh.to(gate.scalar_type());
  detail::RowsView dv, g, u, dg, du;
  if (!detail::tensor_rows(d, dv)) d = d.contiguous(), detail::tensor_rows(d, dv);
  detail::tensor_rows(gate, g), detail::tensor_rows(up, u);
  detail::tensor_rows(dgate, dg), detail::tensor_rows(dup, du);
  if (gate.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(gate.scalar_type(), "swiglu_backward", AT_WRAP([&] {
    const bool vectors =
        vectorizable<scalar_t>(g.cols, {{&d, dv.ld}, {&gate, g.ld}, {&up, u.ld}, {&dgate, dg.ld}, {&dup, du.ld}});
    swiglu_backward_kernel<scalar_t><<<grid_for(g.rows, vectors ? g.cols / kVec16<scalar_t> : g.cols), kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), dv.ld, gate.data_ptr<scalar_t>(), g.ld, up.data_ptr<scalar_t>(), u.ld,
        dgate.data_ptr<scalar_t>(), dg.ld, dup.data_ptr<scalar_t>(), du.ld, g.rows, g.cols, vectors);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::pair<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor dgate = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dup = at::empty(up.sizes(), up.options().memory_format(at::MemoryFormat::Contiguous));
  swiglu_backward_out(dh, gate, up, dgate, dup);
  return {dgate, dup};
}

}  // namespace ft::kernels
