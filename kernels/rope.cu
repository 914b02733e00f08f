// The fused rotary embedding (ft/kernels/rope.h): one thread per element pair (i, i + D/2) of a
// (b, h, t) row, the tables read from (B, 1, T, D) and shared by the heads. The arithmetic is
// ft/kernels/rope_thread.h, shared with a host test.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ft/kernels/rope.h"
#include "ft/kernels/rope_thread.h"

#include <algorithm>
#include <vector>

namespace ft::kernels {
namespace {

constexpr int kThreads = 256;

// Strides (in elements) of a (B, H, T, D) tensor with unit last stride, and of the tables (B, 1, T, D).
struct Strides4 {
  int64_t b, h, t;
};

template <typename Scalar, bool kBackward>
__global__ void __launch_bounds__(kThreads) rope_kernel(const Scalar* __restrict__ x, Strides4 xs, Scalar* __restrict__ y,
                                                        Strides4 ys, const float* __restrict__ cos,
                                                        const float* __restrict__ sin, Strides4 cs, int64_t H,
                                                        int64_t T, int64_t half, int64_t pairs) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p % half;
    const int64_t row = p / half;  // (b, h, t) with t fastest
    const int64_t t = row % T, h = (row / T) % H, b = row / (T * H);
    const int64_t xo = b * xs.b + h * xs.h + t * xs.t + i;
    const int64_t yo = b * ys.b + h * ys.h + t * ys.t + i;
    const int64_t co = b * cs.b + t * cs.t + i;
    const float x1 = static_cast<float>(x[xo]), x2 = static_cast<float>(x[xo + half]);
    const float c1 = cos[co], c2 = cos[co + half], s1 = sin[co], s2 = sin[co + half];
    float y1, y2;
    if constexpr (kBackward) {
      detail::rope_pair_backward(x1, x2, c1, c2, s1, s2, y1, y2);
    } else {
      detail::rope_pair(x1, x2, c1, c2, s1, s2, y1, y2);
    }
    y[yo] = static_cast<Scalar>(y1);
    y[yo + half] = static_cast<Scalar>(y2);
  }
}

bool dense(at::IntArrayRef sizes, at::IntArrayRef strides) {
  // Non-overlapping and dense: sorted by stride, each stride is the product of the smaller sizes.
  std::vector<int64_t> order(sizes.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(k);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return strides[a] < strides[b]; });
  int64_t expected = 1;
  for (const int64_t k : order) {
    if (sizes[k] != 1 && strides[k] != expected) return false;
    expected *= sizes[k];
  }
  return true;
}

at::Tensor output_like(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  if (strides.size() == sizes.size() && strides.back() == 1 && dense(sizes, strides))
    return at::empty_strided(sizes, strides, options);
  return at::empty(sizes, options);
}

// y = rope(x) (or its backward pass) for x and y of one dtype, (B, H, T, D) with unit last stride.
template <bool kBackward>
void launch(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "[rope kernels] input and output dtypes differ: ", x.scalar_type(),
              " vs ", y.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), half = x.size(3) / 2;
  const int64_t pairs = B * H * T * half;
  if (pairs == 0) return;
  const Strides4 xs{x.stride(0), x.stride(1), x.stride(2)}, ys{y.stride(0), y.stride(1), y.stride(2)};
  // The tables broadcast over B where they have one row (size 1: stride 0).
  const Strides4 cs{cos.size(0) == 1 ? 0 : cos.stride(0), 0, cos.stride(2)};
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 65535 * 16));
  AT_DISPATCH_V2(x.scalar_type(), "rope", AT_WRAP([&] {
    rope_kernel<scalar_t, kBackward><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), xs, y.data_ptr<scalar_t>(), ys, cos.data_ptr<float>(), sin.data_ptr<float>(), cs, H,
        T, half, pairs);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool rope_fits(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!x.defined() || !cos.defined() || !sin.defined() || !x.is_cuda() || x.dim() != 4 || cos.dim() != 4) return false;
  const auto t = x.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (x.stride(3) != 1 || x.size(3) % 2 != 0 || x.numel() == 0) return false;
  if (cos.scalar_type() != at::kFloat || sin.scalar_type() != at::kFloat || cos.device() != x.device() ||
      sin.device() != x.device() || cos.sizes() != sin.sizes() || cos.strides() != sin.strides())
    return false;
  return (cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == 1 && cos.size(2) == x.size(2) &&
         cos.size(3) == x.size(3) && cos.stride(3) == 1 && !cos.requires_grad() && !sin.requires_grad();
}

at::Tensor rope_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(rope_fits(x, cos, sin), "[rope kernels] unsupported operands: x ", x.sizes(), " ", x.strides(), " ",
              x.scalar_type(), ", cos ", cos.sizes(), " ", cos.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = output_like(x.sizes(), x.strides(), x.options());
  launch<false>(x, y, cos, sin);
  return y;
}

at::Tensor rope_backward(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin, at::ScalarType dtype,
                         at::IntArrayRef strides) {
  const at::Tensor g = dy.stride(3) == 1 && dy.scalar_type() == dtype ? dy : dy.to(dtype).contiguous();
  TORCH_CHECK(rope_fits(g, cos, sin), "[rope kernels] unsupported gradient: ", dy.sizes(), " ", dy.strides(), " ",
              dy.scalar_type());
  c10::cuda::CUDAGuard guard(g.device());
  at::Tensor dx = output_like(g.sizes(), strides, g.options());
  launch<true>(g, dx, cos, sin);
  return dx;
}

}  // namespace ft::kernels
