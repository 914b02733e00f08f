// The float32 sum of compute-dtype gradients (ft/kernels/sum_float.h): a loop over rows, 8 elements
// per thread and step as 16-byte vectors (the per-thread work in ft/kernels/sum_float_thread.h,
// shared with a host test), one at a time for each row's tail.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ft/kernels/rows.h"
#include "ft/kernels/sum_float.h"
#include "ft/kernels/sum_float_thread.h"

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;
using detail::kSumMaxInputs;

template <typename T>
struct Inputs {
  const T* p[kSumMaxInputs];
  int64_t ld[kSumMaxInputs];  // row strides (ft/kernels/rows.h)
};

// blockIdx.y walks the rows, the threads of blockIdx.x a row's columns (ft/kernels/sum_float_thread.h):
// 8 at a time as 16-byte vectors up to the last multiple of 8, then one at a time. Contiguous
// inputs come as one row.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) sum_to_float_kernel(Inputs<T> in, float* __restrict__ out, int64_t rows,
                                                                int64_t cols, bool vectors) {
  detail::sum_to_float_rows<T, N>({blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, threadIdx.x, blockDim.x}, in.p, in.ld,
                                  out, rows, cols, vectors);
}

template <typename T>
void launch(const Inputs<T>& in, int n, float* out, int64_t rows, int64_t cols, bool vectors, dim3 grid,
            cudaStream_t stream) {
  switch (n) {
    case 1: sum_to_float_kernel<T, 1><<<grid, kThreads, 0, stream>>>(in, out, rows, cols, vectors); break;
    case 2: sum_to_float_kernel<T, 2><<<grid, kThreads, 0, stream>>>(in, out, rows, cols, vectors); break;
    case 3: sum_to_float_kernel<T, 3><<<grid, kThreads, 0, stream>>>(in, out, rows, cols, vectors); break;
    default: sum_to_float_kernel<T, 4><<<grid, kThreads, 0, stream>>>(in, out, rows, cols, vectors); break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

dim3 grid_for(int64_t rows, int64_t items_per_row) { return detail::rows_dim3(rows, items_per_row, kThreads); }

}  // namespace

bool sum_to_float_fits(const std::vector<at::Tensor>& grads) {
  if (grads.empty() || grads.size() > static_cast<size_t>(kSumMaxInputs)) return false;
  const at::Tensor& g0 = grads[0];
  if (!g0.defined() || !g0.is_cuda() || (g0.scalar_type() != at::kBFloat16 && g0.scalar_type() != at::kHalf)) return false;
  detail::RowsView v;
  for (const auto& g : grads) {
    if (!g.defined() || g.device() != g0.device() || g.scalar_type() != g0.scalar_type() || g.sizes() != g0.sizes() ||
        !detail::tensor_rows(g, v))
      return false;
  }
  return true;
}

at::Tensor sum_to_float(const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(sum_to_float_fits(grads), "[sum kernels] sum_to_float: unsupported operands (", grads.size(),
              " tensors; 1 to 4 bf16/fp16 CUDA tensors of one shape, each contiguous or rows of one stride)");
  const at::Tensor& g0 = grads[0];
  c10::cuda::CUDAGuard guard(g0.device());
  at::Tensor out = at::empty(g0.sizes(), g0.options().dtype(at::kFloat));
  const int64_t numel = g0.numel();
  if (numel == 0) return out;
  // Contiguous inputs as one row of numel elements (the whole grid on it); otherwise their rows.
  bool contiguous = true;
  for (const auto& g : grads) contiguous = contiguous && g.is_contiguous();
  detail::RowsView shape{1, numel, numel};
  if (!contiguous) detail::tensor_rows(g0, shape);
  AT_DISPATCH_V2(g0.scalar_type(), "sum_to_float", AT_WRAP([&] {
                   Inputs<scalar_t> in{};
                   // 16-byte vectors where every input and output row starts aligned.
                   bool vectors = aligned16(out.data_ptr()) && (shape.rows == 1 || shape.cols % 8 == 0);
                   for (size_t k = 0; k < grads.size(); ++k) {
                     detail::RowsView v = shape;
                     if (!contiguous) detail::tensor_rows(grads[k], v);
                     in.p[k] = grads[k].const_data_ptr<scalar_t>();
                     in.ld[k] = v.ld;
                     vectors = vectors && aligned16(in.p[k]) && (shape.rows == 1 || v.ld % 8 == 0);
                   }
                   const dim3 grid = grid_for(shape.rows, vectors ? std::max<int64_t>(shape.cols / 8, 1) : shape.cols);
                   launch<scalar_t>(in, static_cast<int>(grads.size()), out.data_ptr<float>(), shape.rows, shape.cols,
                                    vectors, grid, c10::cuda::getCurrentCUDAStream());
                 }),
                 at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ft::kernels
