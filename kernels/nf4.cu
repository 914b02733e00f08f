// NF4 dequantization (QLoRA's frozen base weights, ft/adapt/nf4.h).
//
// Legend: N elements, P = ceil(N / 2) packed bytes, K = ceil(N / block) block maxima.
//   packed: (P) uint8, two 4-bit indices per byte, the first element in the high nibble;
//   absmax: (K) float32; out: (N) in T.
//   out[e] = T(code[index(e)] * absmax[e / block])
// The product is formed in float32 and rounded once to T, exactly as the tensor-op reference does.
//
// Main kernel (N a multiple of 16, block a multiple of 16, 8-byte aligned codes): one thread per
// 16 elements. It loads 8 bytes in one instruction and stores 16 outputs as 16-byte vectors (two
// for bf16/fp16, four for float32), so the kernel issues few memory instructions per byte moved,
// which is what a memory-bound kernel needs to approach copy bandwidth. Other shapes take the
// scalar kernel, one thread per byte. The 16-entry code book is copied to shared memory first:
// from constant memory, the lanes of a warp reading different entries would be served one address
// at a time, while shared memory serves 16 distinct words from 16 banks at once.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ft/kernels/nf4.h"
#include "ft/kernels/nf4_decode.h"

namespace ft::kernels {
namespace {

// bitsandbytes' NF4 values, as in ft::adapt::nf4_code().
__constant__ float kCode[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Copies the code book to shared memory; every thread of the block calls it (it synchronizes).
__device__ __forceinline__ void stage_code(float* code) {
  if (threadIdx.x < 16) code[threadIdx.x] = kCode[threadIdx.x];
  __syncthreads();
}

// The block maxima as a function of the block index: stored in float32, or double-quantized (int8
// codes, a float32 scale per dq_block of them and one offset), decoded inline so that
// dequantization is one kernel with no temporary for the maxima.
struct PlainMaxima {
  const float* __restrict__ absmax;
  __device__ __forceinline__ float operator()(int64_t k) const { return absmax[k]; }
};
struct DoubleQuantMaxima {
  const int8_t* __restrict__ codes;
  const float* __restrict__ scales;
  float offset;
  int64_t dq_block;
  __device__ __forceinline__ float operator()(int64_t k) const {
    return detail::nf4_double_quant_max(codes[k], scales[k / dq_block], offset);
  }
};

// Where element e of the (rows, cols) result goes: out + row · ld + col (ld = cols for a contiguous
// result; ld > cols for the first columns of a wider buffer, as the extended GEMM's [W | B]).
struct RowLayout {
  int64_t cols, ld;
  __device__ __forceinline__ int64_t operator()(int64_t e) const { return ld == cols ? e : e / cols * ld + e % cols; }
};

template <typename T, typename Maxima>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, Maxima maxima, T* __restrict__ out,
                                      int64_t numel, int64_t block, RowLayout layout) {
  __shared__ float code[16];
  stage_code(code);
  const int64_t bytes = (numel + 1) / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t b = packed[i];
    const int64_t e = 2 * i;
    const float scale = maxima(e / block);  // block is even: both elements share it
    out[layout(e)] = static_cast<T>(code[b >> 4] * scale);
    if (e + 1 < numel) out[layout(e + 1)] = static_cast<T>(code[b & 15] * scale);
  }
}

// 16 elements per thread; with a row stride, cols is a multiple of 16 (a group never spans two rows)
// and rows start 16-byte aligned.
template <typename T, typename Maxima>
__global__ void nf4_dequantize16_kernel(const uint2* __restrict__ packed, Maxima maxima, T* __restrict__ out,
                                        int64_t groups, int64_t block, RowLayout layout) {
  __shared__ float code[16];
  stage_code(code);
  static_assert(16 * sizeof(T) % sizeof(uint4) == 0, "16 outputs must fill whole 16-byte vectors");
  constexpr int kVectors = 16 * sizeof(T) / sizeof(uint4);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint2 p = packed[g];
    const float scale = maxima(g * 16 / block);
    alignas(16) T v[16];
    detail::nf4_decode16(p.x, p.y, code, scale, v);
    uint4* dst = reinterpret_cast<uint4*>(out + layout(g * 16));
#pragma unroll
    for (int k = 0; k < kVectors; ++k) dst[k] = reinterpret_cast<const uint4*>(v)[k];
  }
}

void check_codes(const at::Tensor& packed, int64_t numel, int64_t block, at::ScalarType dtype) {
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "[nf4] packed must be a contiguous uint8 CUDA tensor");
  TORCH_CHECK(block > 0 && block % 2 == 0, "[nf4] block must be even and > 0, got ", block);
  TORCH_CHECK(numel >= 0 && packed.numel() == (numel + 1) / 2, "[nf4] ", numel, " elements need ", (numel + 1) / 2,
              " bytes; got ", packed.numel());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "[nf4] output dtype must be float32, float16 or bfloat16");
}

// The result: `into` when given (checked: numel elements as a (rows, cols) view with unit column
// stride, of dtype, on the codes' device), else a new contiguous 1-D tensor.
at::Tensor result_for(const at::Tensor& packed, const at::Tensor& into, int64_t numel, at::ScalarType dtype) {
  if (!into.defined()) return at::empty({numel}, packed.options().dtype(dtype));
  TORCH_CHECK(into.device() == packed.device() && into.scalar_type() == dtype && into.dim() == 2 &&
                  into.numel() == numel && (into.size(0) <= 1 || into.stride(0) >= into.size(1)) &&
                  (into.size(1) <= 1 || into.stride(1) == 1),
              "[nf4] the result must be a (rows, cols) ", dtype, " view on the codes' device with unit column stride and ",
              numel, " elements; got ", into.sizes(), " with strides ", into.strides(), ", ", into.scalar_type(), " on ",
              into.device());
  return into;
}

template <typename Maxima>
at::Tensor launch(const at::Tensor& packed, Maxima maxima, int64_t numel, int64_t block, at::ScalarType dtype,
                  const at::Tensor& into) {
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = result_for(packed, into, numel, dtype);
  if (numel == 0) return out;
  constexpr int kThreads = 256;
  auto grid_for = [](int64_t items) {
    return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, 65535 * 8));
  };
  const int64_t cols = out.dim() == 2 ? out.size(1) : numel;
  const RowLayout layout{cols, out.dim() == 2 && out.size(0) > 1 ? out.stride(0) : cols};
  const int64_t row_bytes = layout.ld * static_cast<int64_t>(c10::elementSize(dtype));
  const bool vectorized = numel % 16 == 0 && block % 16 == 0 && cols % 16 == 0 && row_bytes % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(packed.data_ptr()) % alignof(uint2) == 0 &&
                          reinterpret_cast<uintptr_t>(out.data_ptr()) % alignof(uint4) == 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    if (vectorized) {
      const int64_t groups = numel / 16;
      nf4_dequantize16_kernel<scalar_t><<<grid_for(groups), kThreads, 0, stream>>>(
          reinterpret_cast<const uint2*>(packed.data_ptr<uint8_t>()), maxima, out.data_ptr<scalar_t>(), groups, block,
          layout);
    } else {
      nf4_dequantize_kernel<scalar_t><<<grid_for((numel + 1) / 2), kThreads, 0, stream>>>(
          packed.data_ptr<uint8_t>(), maxima, out.data_ptr<scalar_t>(), numel, block, layout);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t block,
                          at::ScalarType dtype, const at::Tensor& out) {
  check_codes(packed, numel, block, dtype);
  TORCH_CHECK(absmax.is_cuda() && packed.device() == absmax.device() && absmax.scalar_type() == at::kFloat &&
                  absmax.is_contiguous(),
              "[nf4] absmax must be a contiguous float32 tensor on the codes' device");
  TORCH_CHECK(absmax.numel() == (numel + block - 1) / block, "[nf4] ", numel, " elements need ",
              (numel + block - 1) / block, " maxima; got ", absmax.numel());
  return launch(packed, PlainMaxima{absmax.data_ptr<float>()}, numel, block, dtype, out);
}

at::Tensor nf4_dequantize_double_quant(const at::Tensor& packed, const at::Tensor& absmax_q,
                                       const at::Tensor& absmax_scale, float absmax_offset, int64_t dq_block,
                                       int64_t numel, int64_t block, at::ScalarType dtype, const at::Tensor& out) {
  check_codes(packed, numel, block, dtype);
  TORCH_CHECK(absmax_q.is_cuda() && absmax_scale.is_cuda() && absmax_q.device() == packed.device() &&
                  absmax_scale.device() == packed.device(),
              "[nf4] the maxima's codes and scales must be on the codes' device");
  TORCH_CHECK(absmax_q.scalar_type() == at::kChar && absmax_scale.scalar_type() == at::kFloat &&
                  absmax_q.is_contiguous() && absmax_scale.is_contiguous(),
              "[nf4] double quantization needs contiguous int8 maxima codes and float32 scales");
  const int64_t blocks = (numel + block - 1) / block;
  TORCH_CHECK(dq_block > 0 && absmax_q.numel() == blocks && absmax_scale.numel() == (blocks + dq_block - 1) / dq_block,
              "[nf4] ", numel, " elements in blocks of ", block, " need ", blocks, " maxima codes and ",
              dq_block > 0 ? (blocks + dq_block - 1) / dq_block : 0, " scales (dq_block ", dq_block, "); got ",
              absmax_q.numel(), " and ", absmax_scale.numel());
  return launch(packed, DoubleQuantMaxima{absmax_q.data_ptr<int8_t>(), absmax_scale.data_ptr<float>(), absmax_offset, dq_block},
                numel, block, dtype, out);
}

}  // namespace ft::kernels
