#include "ft/adapt/nf4.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ft/util/error.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/nf4.h"
#endif

namespace ft::adapt {

const std::array<float, 16>& nf4_code() {
  // bitsandbytes' NF4 table (create_normal_map(offset=0.9677083), normalised); tests/python/
  // nf4_reference.py recomputes it from the normal quantile function.
  static const std::array<float, 16> code = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return code;
}

int64_t NF4Tensor::bytes() const {
  int64_t b = packed.numel();
  if (double_quant) b += absmax_q.numel() + 4 * absmax_scale.numel() + 4;
  else b += 4 * absmax.numel();
  return b;
}

int64_t nf4_bytes(int64_t numel, int64_t block, bool double_quant, int64_t dq_block) {
  const int64_t blocks = (numel + block - 1) / block;
  const int64_t codes = (numel + 1) / 2;
  if (!double_quant) return codes + 4 * blocks;
  return codes + blocks + 4 * ((blocks + dq_block - 1) / dq_block) + 4;
}

NF4Tensor quantize_nf4(const at::Tensor& w, int64_t block, bool double_quant, int64_t dq_block) {
  FT_CHECK(block > 0 && block % 2 == 0, "[nf4] block must be even and > 0, got ", block);
  FT_CHECK(dq_block > 0, "[nf4] dq_block must be > 0, got ", dq_block);
  FT_CHECK(w.is_floating_point(), "[nf4] only float tensors can be quantized, got ", w.scalar_type());
  NF4Tensor q;
  q.shape = w.sizes().vec();
  q.numel = w.numel();
  q.block = block;
  const int64_t blocks = (q.numel + block - 1) / block;
  at::Tensor flat = w.detach().to(at::kFloat).reshape({-1});
  if (blocks * block != q.numel) flat = at::constant_pad_nd(flat, {0, blocks * block - q.numel}, 0.0);
  const at::Tensor x = flat.view({blocks, block});
  at::Tensor absmax = x.abs().amax(1);  // (blocks)

  if (double_quant) {
    q.double_quant = true;
    q.dq_block = dq_block;
    q.absmax_offset = absmax.mean().item<float>();
    const int64_t groups = (blocks + dq_block - 1) / dq_block;
    at::Tensor centred = absmax - q.absmax_offset;
    if (groups * dq_block != blocks) centred = at::constant_pad_nd(centred, {0, groups * dq_block - blocks}, 0.0);
    const at::Tensor g = centred.view({groups, dq_block});
    q.absmax_scale = (g.abs().amax(1) / 127.0).clamp_min(1e-30);
    q.absmax_q = (g / q.absmax_scale.unsqueeze(1)).round().clamp(-127, 127).to(at::kChar).reshape({-1}).narrow(0, 0, blocks);
    absmax = nf4_absmax(q);  // quantize the elements against the maxima dequantization will use
  } else {
    q.absmax = absmax;
  }
  // x / c, then the nearest code value: the index of the first midpoint above it.
  const at::Tensor scaled = x / absmax.clamp_min(1e-30).unsqueeze(1);
  const auto& code = nf4_code();
  std::vector<float> mids(15);
  for (int i = 0; i < 15; ++i) mids[static_cast<size_t>(i)] = 0.5f * (code[static_cast<size_t>(i)] + code[static_cast<size_t>(i) + 1]);
  const at::Tensor boundaries = at::tensor(mids, at::TensorOptions().dtype(at::kFloat)).to(scaled.device());
  const at::Tensor idx = at::bucketize(scaled.clamp(-1.0, 1.0), boundaries).to(at::kByte).reshape({-1});
  const at::Tensor pairs = idx.view({-1, 2});
  q.packed = pairs.select(1, 0).bitwise_left_shift(4).bitwise_or(pairs.select(1, 1)).contiguous();
  q.packed = q.packed.narrow(0, 0, (q.numel + 1) / 2).contiguous();
  return q;
}

at::Tensor nf4_absmax(const NF4Tensor& q) {
  if (!q.double_quant) return q.absmax;
  const int64_t blocks = q.absmax_q.numel();
  const int64_t groups = q.absmax_scale.numel();
  at::Tensor codes = q.absmax_q.to(at::kFloat);
  if (groups * q.dq_block != blocks) codes = at::constant_pad_nd(codes, {0, groups * q.dq_block - blocks}, 0.0);
  return (codes.view({groups, q.dq_block}) * q.absmax_scale.unsqueeze(1)).reshape({-1}).narrow(0, 0, blocks) +
         q.absmax_offset;
}

namespace {

// CPU: decode straight into the float32 output, two elements per byte, in parallel; the only
// allocation is the output (the tensor-op path below makes int64 indices and several temporaries:
// about 24 bytes per weight at its peak, inside every QLoRA layer's forward and backward pass).
at::Tensor dequantize_cpu(const NF4Tensor& q) {
  const at::Tensor absmax = nf4_absmax(q).to(at::kFloat).contiguous();
  const at::Tensor packed = q.packed.contiguous();
  at::Tensor out = at::empty({q.numel}, at::kFloat);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* c = absmax.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const auto& code = nf4_code();
  const int64_t numel = q.numel, block = q.block, bytes = (numel + 1) / 2;
  at::parallel_for(0, bytes, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = 2 * i;  // block is even, so both elements of a byte share a block
      const float scale = c[e / block];
      o[e] = code[p[i] >> 4] * scale;
      if (e + 1 < numel) o[e + 1] = code[p[i] & 15] * scale;
    }
  });
  return out.view(q.shape);
}

#ifdef LIBFT_WITH_CUDA_KERNELS
// The CUDA kernel (kernels/nf4.cu), into `out` if defined (a 2-D view with unit column stride).
at::Tensor dequantize_cuda(const NF4Tensor& q, at::ScalarType dtype, const at::Tensor& out) {
  if (q.double_quant) {
    return kernels::nf4_dequantize_double_quant(q.packed.contiguous(), q.absmax_q.contiguous(),
                                                q.absmax_scale.to(at::kFloat).contiguous(), q.absmax_offset, q.dq_block,
                                                q.numel, q.block, dtype, out);
  }
  return kernels::nf4_dequantize(q.packed.contiguous(), q.absmax.to(at::kFloat).contiguous(), q.numel, q.block, dtype,
                                 out);
}
#endif

}  // namespace

at::Tensor dequantize_nf4(const NF4Tensor& q, at::ScalarType dtype) {
  if (q.packed.device().is_cpu()) return dequantize_cpu(q).to(dtype);
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (q.packed.is_cuda() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16)) {
    return dequantize_cuda(q, dtype, {}).view(q.shape);
  }
#endif
  return dequantize_nf4_ops(q, dtype);
}

void dequantize_nf4_into(const NF4Tensor& q, const at::Tensor& out) {
  FT_CHECK(out.defined() && out.sizes().vec() == q.shape,
           "[nf4] dequantize_nf4_into: the result must be shaped like the quantized tensor");
#ifdef LIBFT_WITH_CUDA_KERNELS
  const at::ScalarType dtype = out.scalar_type();
  if (q.packed.is_cuda() && out.device() == q.packed.device() && out.dim() == 2 &&
      (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && (out.size(1) <= 1 || out.stride(1) == 1) &&
      (out.size(0) <= 1 || out.stride(0) >= out.size(1))) {
    (void)dequantize_cuda(q, dtype, out);
    return;
  }
#endif
  out.copy_(dequantize_nf4(q, out.scalar_type()));
}

at::Tensor dequantize_nf4_ops(const NF4Tensor& q, at::ScalarType dtype) {
  const auto device = q.packed.device();
  const at::Tensor table = at::tensor(std::vector<float>(nf4_code().begin(), nf4_code().end()),
                                      at::TensorOptions().dtype(at::kFloat)).to(device);
  const at::Tensor hi = q.packed.bitwise_right_shift(4).to(at::kLong), lo = q.packed.bitwise_and(15).to(at::kLong);
  at::Tensor idx = at::stack({hi, lo}, 1).reshape({-1}).narrow(0, 0, q.numel);
  const int64_t blocks = (q.numel + q.block - 1) / q.block;
  at::Tensor values = table.index_select(0, idx);
  if (blocks * q.block != q.numel) values = at::constant_pad_nd(values, {0, blocks * q.block - q.numel}, 0.0);
  const at::Tensor out = (values.view({blocks, q.block}) * nf4_absmax(q).to(device).unsqueeze(1)).reshape({-1});
  return out.narrow(0, 0, q.numel).view(q.shape).to(dtype);
}

}  // namespace ft::adapt
