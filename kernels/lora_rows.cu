// The LoRA row kernels (ft/kernels/lora_rows.h): the fused LoRA layer's memory-bound passes with
// the rank-r products folded in. The per-lane work is ft/kernels/lora_rows_lane.h, shared with a
// host test; here only the warp's rows and the reduction across lanes.
//
// Why CUDA cores and not tensor cores: per element of x (4 bytes read, 2 written) the down
// projection does r multiply-adds, and the up projection r per element of dx (2 read, 4 written).
// At r ≤ 32 and the H100's ~1.75 elements per clock per SM of DRAM traffic that is at most 56 of
// the 128 FP32 lanes per SM, so the kernels stay memory-bound; a's 16-byte vectors come from L1
// and are reused across the warp's two rows. Dropout adds two Philox4x32-10 calls per 8 elements,
// ~100 integer instructions each (10 rounds of two wide multiplies, four XORs and the key
// schedule): ~25 per element, which Hopper's 64 INT32 lanes per SM issue at ~2.5 elements per
// clock, against memory's ~1.75: under the memory time, with less slack than the multiply-adds.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <mutex>

#include "ft/kernels/lora_rows.h"
#include "ft/kernels/lora_rows_lane.h"

namespace ft::kernels {
namespace {

using detail::kLoraLanes;

constexpr int kThreads = 256;  // 8 warps, 8 · Rows rows per block
constexpr int kWarpsPerBlock = kThreads / kLoraLanes;
// Two rows per warp (A's vectors serve both) where there are enough rows to fill the card; one row
// per warp below that, so that a few thousand tokens still give every SM several warps.
constexpr int64_t kTwoRowsFrom = 8192;

// The warp's first row.
template <int Rows>
__device__ __forceinline__ int64_t warp_first_row() {
  return (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kLoraLanes) * Rows;
}

// Dropout's arguments for the kernels: the forward kernel takes the generator's Philox state
// (unpacked on the device, which CUDA graph capture needs) and records the (seed, offset) it used in
// `record` for the backward kernels, which read them back from there.
struct RowsDropout {
  at::PhiloxCudaState state;
  int64_t* record = nullptr;       // forward: where block 0 writes (seed, offset)
  const int64_t* drawn = nullptr;  // backward: the forward's (seed, offset)
  uint32_t threshold = 0;
  float inv_keep = 1.0f;

  __device__ __forceinline__ detail::DropoutDraws forward_draws() const {
    const auto [seed, offset] = at::cuda::philox::unpack(state);
    if (record != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
      record[0] = static_cast<int64_t>(seed);
      record[1] = static_cast<int64_t>(offset);
    }
    return {seed, offset, threshold, inv_keep};
  }
  __device__ __forceinline__ detail::DropoutDraws backward_draws() const {
    return {static_cast<uint64_t>(drawn[0]), static_cast<uint64_t>(drawn[1]), threshold, inv_keep};
  }
};

template <typename T, int Rank, int Rows, bool Drop>
__global__ void __launch_bounds__(kThreads) lora_cast_down_kernel(const float* __restrict__ x, int64_t ldx,
                                                                  T* __restrict__ xo, int64_t ldo, T* s, int64_t lds,
                                                                  const T* __restrict__ a, int64_t in, int64_t rows,
                                                                  float scale, RowsDropout dropout) {
  detail::DropoutDraws draws;
  if constexpr (Drop) draws = dropout.forward_draws();
  const int lane = threadIdx.x % kLoraLanes;
  const int64_t row = warp_first_row<Rows>();
  if (row >= rows) return;  // the whole warp: its lanes share the row
  const int n = static_cast<int>(rows - row < Rows ? rows - row : Rows);
  float acc[Rows][Rank];
  detail::lora_down_lane<T, Rank, Rows, Drop>(x + row * ldx, ldx, xo + row * ldo, ldo, a, in, n, lane, acc, draws, row);
#pragma unroll
  for (int i = 0; i < Rows; ++i) {
#pragma unroll
    for (int j = 0; j < Rank; ++j) {
#pragma unroll
      for (int offset = kLoraLanes / 2; offset > 0; offset /= 2) {
        acc[i][j] += __shfl_xor_sync(0xffffffffu, acc[i][j], offset);
      }
    }
  }
  detail::lora_down_store<T, Rank, Rows>(acc, scale, s + row * lds, lds, n, lane);
}

template <typename T, int Rank, int Rows, bool Drop>
__global__ void __launch_bounds__(kThreads) lora_up_add_kernel(const T* __restrict__ base, int64_t ldb,
                                                               const T* __restrict__ ds, int64_t ldd,
                                                               const T* __restrict__ a, int64_t in, float scale,
                                                               float* __restrict__ dx, int64_t rows,
                                                               RowsDropout dropout) {
  const int lane = threadIdx.x % kLoraLanes;
  const int64_t row = warp_first_row<Rows>();
  if (row >= rows) return;
  detail::DropoutDraws draws;
  if constexpr (Drop) draws = dropout.backward_draws();
  const int n = static_cast<int>(rows - row < Rows ? rows - row : Rows);
  detail::lora_up_lane<T, Rank, Rows, Drop>(base + row * ldb, ldb, ds + row * ldd, ldd, a, in, scale, dx + row * in, in,
                                            n, lane, draws, row);
}

// h = drop(xo) (rows, in), contiguous, from the forward's draws: one thread per 8 elements.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_dropout_rows_kernel(const T* __restrict__ xo, int64_t ldo,
                                                                     T* __restrict__ h, int64_t in, int64_t chunks,
                                                                     RowsDropout dropout) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= chunks) return;
  const int64_t per_row = in / 8, row = i / per_row, c = (i % per_row) * 8;
  detail::lora_dropout8<T>(xo + row * ldo + c, h + row * in + c, dropout.backward_draws(), row, in, c);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// 12 and 24: grouped q, k and v of ranks 4 and 8 (ranks summed, adapt::set_lora_group_projections).
bool rank_fits(int64_t r) { return r == 4 || r == 8 || r == 12 || r == 16 || r == 24 || r == 32; }

bool half_type(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// a: (r, in) contiguous, a 2-byte float type, on `device`, with in a multiple of 8.
bool adapter_fits(const at::Tensor& a, const at::Device& device) {
  return a.dim() == 2 && a.is_contiguous() && half_type(a.scalar_type()) && a.device() == device &&
         rank_fits(a.size(0)) && a.size(1) % 8 == 0 && aligned16(a);
}

unsigned blocks_for(int64_t rows, int rows_per_warp) {
  const int64_t per_block = static_cast<int64_t>(kWarpsPerBlock) * rows_per_warp;
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
}

// Launch<T, Rank>::run(args...) for a's dtype (bf16 or fp16) and rank.
template <template <typename, int> class Launch, typename T, typename... Args>
void dispatch_rank(int64_t r, Args&&... args) {
  switch (r) {
    case 4: return Launch<T, 4>::run(args...);
    case 8: return Launch<T, 8>::run(args...);
    case 12: return Launch<T, 12>::run(args...);
    case 16: return Launch<T, 16>::run(args...);
    case 24: return Launch<T, 24>::run(args...);
    case 32: return Launch<T, 32>::run(args...);
    default: TORCH_CHECK(false, "[lora kernels] rank ", r, " is not one of 4, 8, 12, 16, 24, 32");
  }
}

template <template <typename, int> class Launch, typename... Args>
void dispatch(at::ScalarType dtype, int64_t r, Args&&... args) {
  AT_DISPATCH_V2(dtype, "lora_rows", AT_WRAP([&] { dispatch_rank<Launch, scalar_t>(r, args...); }), at::kBFloat16,
                 at::kHalf);
}

// The kernel for Rows and Drop chosen at run time.
template <template <typename, int, int, bool> class Kernel, typename T, int Rank>
auto pick(bool two_rows, bool drop) {
  if (two_rows) return drop ? Kernel<T, Rank, 2, true>::fn : Kernel<T, Rank, 2, false>::fn;
  return drop ? Kernel<T, Rank, 1, true>::fn : Kernel<T, Rank, 1, false>::fn;
}
template <typename T, int Rank, int Rows, bool Drop>
struct CastDownKernel {
  static constexpr auto fn = lora_cast_down_kernel<T, Rank, Rows, Drop>;
};
template <typename T, int Rank, int Rows, bool Drop>
struct UpAddKernel {
  static constexpr auto fn = lora_up_add_kernel<T, Rank, Rows, Drop>;
};

template <typename T, int Rank>
struct CastDown {
  static void run(const at::Tensor& x, const at::Tensor& a, float scale, const at::Tensor& xo, const at::Tensor& s,
                  bool drop, const RowsDropout& dropout, cudaStream_t stream) {
    const int64_t rows = x.size(0);
    const bool two = rows >= kTwoRowsFrom;
    pick<CastDownKernel, T, Rank>(two, drop)<<<blocks_for(rows, two ? 2 : 1), kThreads, 0, stream>>>(
        x.data_ptr<float>(), x.stride(0), reinterpret_cast<T*>(xo.data_ptr()), xo.stride(0),
        reinterpret_cast<T*>(s.data_ptr()), s.stride(0), reinterpret_cast<const T*>(a.data_ptr()), x.size(1), rows,
        scale, dropout);
  }
};

template <typename T, int Rank>
struct UpAdd {
  static void run(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& a, float scale, const at::Tensor& dx,
                  bool drop, const RowsDropout& dropout, cudaStream_t stream) {
    const int64_t rows = base.size(0);
    const bool two = rows >= kTwoRowsFrom;
    pick<UpAddKernel, T, Rank>(two, drop)<<<blocks_for(rows, two ? 2 : 1), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(base.data_ptr()), base.stride(0), reinterpret_cast<const T*>(ds.data_ptr()),
        ds.stride(0), reinterpret_cast<const T*>(a.data_ptr()), base.size(1), scale, dx.data_ptr<float>(), rows,
        dropout);
  }
};

// Dropout's probability as the kernels take it.
RowsDropout rows_dropout(double p) {
  TORCH_CHECK(p >= 0 && p < 1, "[lora kernels] dropout must be in [0, 1), got ", p);
  RowsDropout d;
  d.threshold = detail::dropout_threshold(p);
  d.inv_keep = detail::dropout_inv_keep(p);  // at::native_dropout's scale
  return d;
}

// The forward's recorded (seed, offset): an int64 tensor of 2 on `device`.
void check_drawn(const at::Tensor& drawn, const at::Device& device) {
  TORCH_CHECK(drawn.defined() && drawn.scalar_type() == at::kLong && drawn.numel() == 2 && drawn.is_contiguous() &&
                  drawn.device() == device,
              "[lora kernels] dropout needs the (seed, offset) pair that lora_cast_down returned");
}

}  // namespace

bool lora_cast_down_fits(const at::Tensor& x, const at::Tensor& a, const at::Tensor& xo, const at::Tensor& s) {
  if (!x.defined() || !a.defined() || !xo.defined() || !s.defined()) return false;
  if (!x.is_cuda() || x.dim() != 2 || x.scalar_type() != at::kFloat || x.stride(1) != 1 || x.stride(0) % 4 != 0 ||
      !aligned16(x))
    return false;
  if (!adapter_fits(a, x.device()) || a.size(1) != x.size(1)) return false;
  const int64_t rows = x.size(0), in = x.size(1), r = a.size(0);
  if (xo.dim() != 2 || xo.size(0) != rows || xo.size(1) != in || xo.scalar_type() != a.scalar_type() ||
      xo.device() != x.device() || xo.stride(1) != 1 || xo.stride(0) % 8 != 0 || !aligned16(xo) ||
      (rows > 1 && xo.stride(0) < in))  // rows that overlap (an expanded tensor) would race
    return false;
  return s.dim() == 2 && s.size(0) == rows && s.size(1) == r && s.scalar_type() == a.scalar_type() &&
         s.device() == x.device() && s.stride(1) == 1 && (rows <= 1 || s.stride(0) >= r);  // s's rows must not overlap
}

at::Tensor lora_cast_down(const at::Tensor& x, const at::Tensor& a, double scale, const at::Tensor& xo,
                          const at::Tensor& s, double p) {
  TORCH_CHECK(lora_cast_down_fits(x, a, xo, s), "[lora kernels] lora_cast_down: unsupported operands x ", x.sizes(),
              " ", x.scalar_type(), ", a ", a.sizes(), " ", a.scalar_type(), ", xo ", xo.sizes(), " ", xo.strides(),
              ", s ", s.sizes(), " ", s.strides());
  RowsDropout dropout = rows_dropout(p);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor drawn;
  if (p > 0) {
    drawn = at::empty({2}, x.options().dtype(at::kLong));
    dropout.record = drawn.data_ptr<int64_t>();
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    dropout.state = gen->philox_cuda_state(4);  // one counter block per element quad: see philox.h
  }
  const int64_t rows = x.size(0);
  if (rows == 0) {
    if (drawn.defined()) drawn.zero_();
    return drawn;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch<CastDown>(a.scalar_type(), a.size(0), x, a, static_cast<float>(scale), xo, s, p > 0, dropout,
                     stream.stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return drawn;
}

bool lora_up_add_fits(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& a) {
  if (!base.defined() || !ds.defined() || !a.defined()) return false;
  if (!base.is_cuda() || base.dim() != 2 || !half_type(base.scalar_type()) || base.stride(1) != 1 ||
      base.stride(0) % 8 != 0 || !aligned16(base))
    return false;
  if (!adapter_fits(a, base.device()) || a.scalar_type() != base.scalar_type() || a.size(1) != base.size(1)) return false;
  return ds.dim() == 2 && ds.size(0) == base.size(0) && ds.size(1) == a.size(0) &&
         ds.scalar_type() == base.scalar_type() && ds.device() == base.device() && ds.stride(1) == 1;
}

at::Tensor lora_up_add(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& a, double scale, double p,
                       const at::Tensor& drawn) {
  TORCH_CHECK(lora_up_add_fits(base, ds, a), "[lora kernels] lora_up_add: unsupported operands base ", base.sizes(),
              " ", base.strides(), " ", base.scalar_type(), ", ds ", ds.sizes(), " ", ds.strides(), ", a ", a.sizes(),
              " ", a.scalar_type());
  RowsDropout dropout = rows_dropout(p);
  if (p > 0) {
    check_drawn(drawn, base.device());
    dropout.drawn = drawn.data_ptr<int64_t>();
  }
  const int64_t rows = base.size(0), in = base.size(1);
  at::Tensor dx = at::empty({rows, in}, base.options().dtype(at::kFloat));
  if (rows == 0) return dx;
  c10::cuda::CUDAGuard guard(base.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch<UpAdd>(a.scalar_type(), a.size(0), base, ds, a, static_cast<float>(scale), dx, p > 0, dropout,
                  stream.stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

at::Tensor lora_dropout_rows(const at::Tensor& xo, double p, const at::Tensor& drawn) {
  TORCH_CHECK(xo.defined() && xo.is_cuda() && xo.dim() == 2 && half_type(xo.scalar_type()) && xo.stride(1) == 1 &&
                  xo.size(1) % 8 == 0 && xo.stride(0) % 8 == 0 && aligned16(xo),
              "[lora kernels] lora_dropout_rows: unsupported operand ", xo.sizes(), " ", xo.strides(), " ",
              xo.scalar_type());
  TORCH_CHECK(p > 0, "[lora kernels] lora_dropout_rows: dropout must be > 0, got ", p);
  check_drawn(drawn, xo.device());
  RowsDropout dropout = rows_dropout(p);
  dropout.drawn = drawn.data_ptr<int64_t>();
  at::Tensor h = at::empty(xo.sizes(), xo.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t chunks = xo.numel() / 8;
  if (chunks == 0) return h;
  c10::cuda::CUDAGuard guard(xo.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
  AT_DISPATCH_V2(xo.scalar_type(), "lora_dropout_rows", AT_WRAP([&] {
                   lora_dropout_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream.stream()>>>(
                       reinterpret_cast<const scalar_t*>(xo.data_ptr()), xo.stride(0),
                       reinterpret_cast<scalar_t*>(h.data_ptr()), xo.size(1), chunks, dropout);
                 }),
                 at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

}  // namespace ft::kernels
