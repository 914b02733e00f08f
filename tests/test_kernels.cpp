// CUDA kernels against their LibTorch references; skipped where no GPU is visible.
#include <gtest/gtest.h>

#include <cstring>

#include "ft/model/llama.h"
#include "test_util.h"

#include "ft/adapt/nf4.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/nf4.h"
#include "ft/kernels/nf4_decode.h"
#include "ft/kernels/lora_rows.h"
#include "ft/kernels/lora_rows_lane.h"
#include "ft/kernels/rmsnorm.h"
#endif

using namespace ft;

namespace {

struct NormCase {
  std::vector<int64_t> shape;
  at::ScalarType x_dtype, w_dtype;
  double tol;  // max|a−b|/max|b| against the float64 evaluation of the reference formula
};

TEST(RMSNormKernel, MatchesReferenceOnRaggedShapes) {
#ifndef LIBFT_WITH_CUDA_KERNELS
  GTEST_SKIP() << "built without CUDA kernels";
#else
  FT_REQUIRE_CUDA();
  const std::vector<NormCase> table = {
      {{1, 1}, at::kFloat, at::kFloat, 1e-6},        {{3, 31}, at::kFloat, at::kFloat, 1e-6},
      {{2, 5, 33}, at::kFloat, at::kFloat, 1e-6},    {{7, 4096}, at::kFloat, at::kFloat, 1e-6},
      {{17, 4099}, at::kBFloat16, at::kBFloat16, 1e-2}, {{64, 2048}, at::kHalf, at::kHalf, 2e-3},
      {{9, 1000}, at::kBFloat16, at::kFloat, 1e-2},  {{0, 64}, at::kFloat, at::kFloat, 0},
  };
  for (const auto& c : table) {
    auto dev = at::TensorOptions().device(at::kCUDA);
    at::Tensor x = at::randn(c.shape, dev.dtype(at::kFloat)).mul_(3).to(c.x_dtype);
    const int64_t E = c.shape.back();
    at::Tensor w = (1 + 0.1 * at::randn({E}, dev.dtype(at::kFloat))).to(c.w_dtype);
    model::RMSNorm norm(E, 1e-5);
    norm->weight = w;
    at::Tensor expected = norm->reference(x);
    at::Tensor y = at::full_like(expected, std::numeric_limits<float>::quiet_NaN());  // poison
    y = kernels::rmsnorm_forward(x, w, 1e-5);
    ASSERT_EQ(y.scalar_type(), expected.scalar_type());
    ASSERT_EQ(y.sizes(), expected.sizes());
    if (y.numel() == 0) continue;
    EXPECT_TRUE(y.isfinite().all().item<bool>());
    EXPECT_LE(test::max_rel_error(y, expected), c.tol) << "shape " << at::IntArrayRef(c.shape);
  }
#endif
}

// The CUDA training path of RMSNorm (ATen's fused RMSNorm, with gradients) against the reference
// formula, float64 on the same inputs: outputs, dx and dweight, in float32 and bf16, ragged widths.
TEST(RMSNormKernel, TrainingPathMatchesTheReferenceWithGradients) {
  FT_REQUIRE_CUDA();
  for (const auto& [shape, dtype, tol] : std::vector<std::tuple<std::vector<int64_t>, at::ScalarType, double>>{
           {{3, 31}, at::kFloat, 1e-5}, {{2, 5, 2048}, at::kFloat, 1e-5}, {{17, 4099}, at::kBFloat16, 2e-2}}) {
    SCOPED_TRACE(at::IntArrayRef(shape));
    const auto dev = at::TensorOptions().device(at::kCUDA);
    const int64_t E = shape.back();
    const at::Tensor x0 = at::randn(shape, dev.dtype(at::kFloat)).mul_(3);
    const at::Tensor w0 = 1 + 0.1 * at::randn({E}, dev.dtype(at::kFloat));
    const at::Tensor dy = at::randn(shape, dev.dtype(at::kFloat));
    model::RMSNorm norm(E, 1e-5);
    norm->to(at::kCUDA);
    {
      at::NoGradGuard no_grad;
      norm->weight.set_data(w0.to(dtype));
    }
    const at::Tensor x = x0.to(dtype).requires_grad_();
    const at::Tensor y = norm->forward(x);
    ASSERT_EQ(y.scalar_type(), dtype);
    y.backward(dy.to(dtype));
    // The reference in float64 on the same (rounded) inputs.
    model::RMSNorm ref(E, 1e-5);
    ref->to(at::kCUDA, at::kDouble);
    {
      at::NoGradGuard no_grad;
      ref->weight.copy_(w0.to(dtype).to(at::kDouble));
    }
    const at::Tensor x64 = x.detach().to(at::kDouble).requires_grad_();
    const at::Tensor y64 = ref->reference(x64);
    y64.backward(dy.to(dtype).to(at::kDouble));
    EXPECT_LE(test::max_rel_error(y, y64), tol);
    EXPECT_LE(test::max_rel_error(x.grad(), x64.grad()), tol);
    EXPECT_LE(test::max_rel_error(norm->weight.grad(), ref->weight.grad()), tol);
  }
}

// NF4 dequantization on the GPU equals the tensor-op reference exactly (both form code × maximum in
// float32 and round once), for plain and double-quantized maxima, odd sizes and every output dtype;
// dequantize_nf4 uses the kernel for CUDA tensors.
TEST(NF4Kernel, EqualsTheReferenceExactly) {
#ifndef LIBFT_WITH_CUDA_KERNELS
  GTEST_SKIP() << "built without CUDA kernels";
#else
  FT_REQUIRE_CUDA();
  // The first three take the vectorized kernel (16 elements per thread), the others the scalar one.
  for (const auto& [shape, block, dq] : {std::tuple{std::vector<int64_t>{4096, 1024}, int64_t{64}, true},
                                         std::tuple{std::vector<int64_t>{16, 48}, int64_t{16}, false},
                                         std::tuple{std::vector<int64_t>{64, 40}, int64_t{32}, true},
                                         std::tuple{std::vector<int64_t>{8, 8}, int64_t{8}, false},
                                         std::tuple{std::vector<int64_t>{7, 9}, int64_t{32}, false},
                                         std::tuple{std::vector<int64_t>{1, 1}, int64_t{2}, false},
                                         std::tuple{std::vector<int64_t>{333, 129}, int64_t{64}, true}}) {
    const at::Tensor w = at::randn(shape, at::TensorOptions().device(at::kCUDA)) * 0.02;
    const adapt::NF4Tensor q = adapt::quantize_nf4(w, block, dq);
    for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const at::Tensor want = adapt::dequantize_nf4_ops(q, dtype);
      const at::Tensor got = kernels::nf4_dequantize(q.packed, adapt::nf4_absmax(q).to(at::kFloat).contiguous(), q.numel,
                                                     q.block, dtype);
      EXPECT_TRUE(got.view(want.sizes()).equal(want)) << at::IntArrayRef(shape) << " " << dtype;
      EXPECT_TRUE(adapt::dequantize_nf4(q, dtype).equal(want));
      // Codes that start one byte into their allocation (not 8-byte aligned): the scalar kernel.
      at::Tensor shifted = at::empty({q.packed.numel() + 1}, q.packed.options()).narrow(0, 1, q.packed.numel());
      shifted.copy_(q.packed);
      EXPECT_TRUE(kernels::nf4_dequantize(shifted, adapt::nf4_absmax(q).to(at::kFloat).contiguous(), q.numel, q.block, dtype)
                      .view(want.sizes())
                      .equal(want));
    }
  }
  EXPECT_THROW(kernels::nf4_dequantize(at::zeros({3}, at::TensorOptions().device(at::kCUDA).dtype(at::kByte)),
                                       at::ones({1}, at::TensorOptions().device(at::kCUDA)), 7, 64, at::kFloat),
               c10::Error);
  // Double-quantized maxima decoded inside the kernel (the path dequantize_nf4 takes for them).
  for (const auto& shape : {std::vector<int64_t>{1024, 1024}, std::vector<int64_t>{333, 129}}) {
    const adapt::NF4Tensor q = adapt::quantize_nf4(at::randn(shape, at::TensorOptions().device(at::kCUDA)), 64, true);
    const at::Tensor got = kernels::nf4_dequantize_double_quant(q.packed, q.absmax_q.contiguous(), q.absmax_scale, q.absmax_offset,
                                                                q.dq_block, q.numel, q.block, at::kBFloat16);
    EXPECT_TRUE(got.view(q.shape).equal(adapt::dequantize_nf4_ops(q, at::kBFloat16))) << at::IntArrayRef(shape);
  }
  const auto i8 = at::TensorOptions().device(at::kCUDA).dtype(at::kChar);
  EXPECT_THROW(kernels::nf4_dequantize_double_quant(at::zeros({32}, i8.dtype(at::kByte)), at::zeros({1}, i8),
                                                    at::ones({2}, i8.dtype(at::kFloat)), 0.0f, 256, 64, 64, at::kFloat),
               c10::Error);  // one block of maxima needs one scale, not two
#endif
}


// The vectorized kernel's decoding step (ft/kernels/nf4_decode.h), run on the host over a whole
// quantized tensor the way the kernel walks it (8 bytes, read as two little-endian words, to 16
// outputs, the double-quantized maxima decoded as the kernel decodes them), equals the tensor-op
// reference exactly for every output dtype. This checks the nibble
// and byte order on machines without a GPU; NF4Kernel.EqualsTheReferenceExactly runs the kernel.
#ifdef LIBFT_WITH_CUDA_KERNELS
template <typename T>
at::Tensor decode_on_host(const adapt::NF4Tensor& q, at::ScalarType dtype) {
  const at::Tensor absmax = adapt::nf4_absmax(q).to(at::kFloat).contiguous();
  const at::Tensor packed = q.packed.contiguous();
  at::Tensor out = at::empty({q.numel}, at::TensorOptions().dtype(dtype));
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  T* dst = reinterpret_cast<T*>(out.data_ptr());
  // The maxima as the kernel forms them: stored, or decoded from the double quantization inline.
  auto maximum = [&](int64_t k) {
    if (!q.double_quant) return absmax.data_ptr<float>()[k];
    return kernels::detail::nf4_double_quant_max(q.absmax_q.data_ptr<int8_t>()[k],
                                                 q.absmax_scale.data_ptr<float>()[k / q.dq_block], q.absmax_offset);
  };
  for (int64_t k = 0; k < absmax.numel(); ++k) EXPECT_EQ(maximum(k), absmax.data_ptr<float>()[k]) << "block " << k;
  for (int64_t g = 0; g < q.numel / 16; ++g) {
    uint32_t lo, hi;
    std::memcpy(&lo, bytes + 8 * g, 4);
    std::memcpy(&hi, bytes + 8 * g + 4, 4);
    kernels::detail::nf4_decode16(lo, hi, adapt::nf4_code().data(), maximum(g * 16 / q.block), dst + 16 * g);
  }
  return out.view(q.shape);
}

TEST(NF4Kernel, VectorDecodeEqualsTheReferenceOnTheHost) {
  for (const auto& [block, dq] : {std::pair{int64_t{16}, false}, std::pair{int64_t{64}, true}, std::pair{int64_t{32}, true}}) {
    const at::Tensor w = at::randn({48, 64 * 9}, at::kFloat) * 0.02;  // 432-1728 blocks: several dq scales
    const adapt::NF4Tensor q = adapt::quantize_nf4(w, block, dq);
    EXPECT_TRUE(decode_on_host<float>(q, at::kFloat).equal(adapt::dequantize_nf4_ops(q, at::kFloat)));
    EXPECT_TRUE(decode_on_host<c10::Half>(q, at::kHalf).equal(adapt::dequantize_nf4_ops(q, at::kHalf)));
    EXPECT_TRUE(decode_on_host<c10::BFloat16>(q, at::kBFloat16).equal(adapt::dequantize_nf4_ops(q, at::kBFloat16)));
  }
}
#endif


// ------------------------------------------------------------------------------------------------
// The LoRA row kernels (ft/kernels/lora_rows.h) against float64: xo = x cast exactly as
// at::Tensor::to casts, s = scale · xo aᵀ, dx = base + scale · ds a. Ragged row counts (odd: a warp's
// second row absent), widths that leave lanes idle in the last step (264 = 256 + 8), every rank,
// bf16 and fp16, and both layouts: separate tensors, and the extended GEMM's views into one
// (T, in + r) buffer. Outputs are poisoned (NaN) first, so an element left unwritten fails.
#ifdef LIBFT_WITH_CUDA_KERNELS
struct RowsCase {
  int64_t rows, in, r;
  bool extended;
  at::ScalarType dtype;
};

std::vector<RowsCase> rows_cases(const std::vector<int64_t>& row_counts, const std::vector<int64_t>& widths) {
  std::vector<RowsCase> out;
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (const int64_t r : {4, 8, 16, 32}) {
      for (const bool extended : {false, true}) {
        if (extended && r % 8 != 0) continue;  // [x | s S] rows must stay 16-byte aligned
        for (const int64_t rows : row_counts) {
          for (const int64_t in : widths) out.push_back({rows, in, r, extended, dtype});
        }
      }
    }
  }
  return out;
}

struct RowsOperands {
  at::Tensor x, a, xo, s, base, ds;
  double scale = 0.375;
  std::string what;
};

RowsOperands rows_operands(const RowsCase& c, const at::Device device) {
  RowsOperands o;
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  o.x = at::randn({c.rows, c.in}, f32).mul_(2);
  o.a = (at::randn({c.r, c.in}, f32) / std::sqrt(static_cast<double>(c.in))).to(c.dtype);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (c.extended) {
    const at::Tensor out = at::full({c.rows, c.in + c.r}, nan, f32.dtype(c.dtype));
    o.xo = out.narrow(1, 0, c.in);
    o.s = out.narrow(1, c.in, c.r);
    const at::Tensor grad = at::randn({c.rows, c.in + c.r}, f32).to(c.dtype);
    o.base = grad.narrow(1, 0, c.in);
    o.ds = grad.narrow(1, c.in, c.r);
  } else {
    o.xo = at::full({c.rows, c.in}, nan, f32.dtype(c.dtype));
    o.s = at::full({c.rows, c.r}, nan, f32.dtype(c.dtype));
    o.base = at::randn({c.rows, c.in}, f32).to(c.dtype);
    o.ds = at::randn({c.rows, c.r}, f32).to(c.dtype);
  }
  o.what = std::string(c10::toString(c.dtype)) + ", rows " + std::to_string(c.rows) + ", in " + std::to_string(c.in) +
           ", r " + std::to_string(c.r) + (c.extended ? ", extended layout" : ", separate tensors");
  return o;
}

// The down and up outputs against float64 (dx: float32 accumulation of ≤ 40 terms).
void expect_rows_outputs(const RowsOperands& o, const at::Tensor& dx) {
  SCOPED_TRACE(o.what);
  const at::Tensor xo_ref = o.x.to(o.a.scalar_type());
  EXPECT_TRUE(o.xo.equal(xo_ref));
  const at::Tensor s_ref = xo_ref.to(at::kDouble).mm(o.a.to(at::kDouble).t()) * o.scale;
  ASSERT_TRUE(o.s.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(o.s, s_ref), o.a.scalar_type() == at::kHalf ? 2e-3 : 1e-2);
  const at::Tensor dx_ref = o.base.to(at::kDouble) + o.ds.to(at::kDouble).mm(o.a.to(at::kDouble)) * o.scale;
  ASSERT_EQ(dx.scalar_type(), at::kFloat);
  ASSERT_EQ(dx.sizes(), o.base.sizes());
  ASSERT_TRUE(dx.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(dx, dx_ref), 1e-5);
}

// The kernels' lanes run one after another on the host, the warp's sum in lane order.
template <typename T, int Rank>
void rows_on_host(const RowsOperands& o, at::Tensor& dx) {
  using namespace kernels::detail;
  const int64_t rows = o.x.size(0), in = o.x.size(1);
  const float* x = o.x.data_ptr<float>();
  T* xo = reinterpret_cast<T*>(o.xo.data_ptr());
  T* s = reinterpret_cast<T*>(o.s.data_ptr());
  const T* a = reinterpret_cast<const T*>(o.a.data_ptr());
  const T* base = reinterpret_cast<const T*>(o.base.data_ptr());
  const T* ds = reinterpret_cast<const T*>(o.ds.data_ptr());
  dx = at::full({rows, in}, std::numeric_limits<double>::quiet_NaN(), o.x.options());
  float* d = dx.data_ptr<float>();
  const auto scale = static_cast<float>(o.scale);
  for (int64_t row = 0; row < rows; row += kLoraRows) {
    const int n = static_cast<int>(std::min<int64_t>(kLoraRows, rows - row));
    float total[kLoraRows][Rank] = {};
    for (int lane = 0; lane < kLoraLanes; ++lane) {
      float acc[kLoraRows][Rank];
      lora_down_lane<T, Rank>(x + row * o.x.stride(0), o.x.stride(0), xo + row * o.xo.stride(0), o.xo.stride(0), a, in,
                              n, lane, acc);
      for (int i = 0; i < kLoraRows; ++i) {
        for (int j = 0; j < Rank; ++j) total[i][j] += acc[i][j];
      }
    }
    for (int lane = 0; lane < kLoraLanes; ++lane) {
      lora_down_store<T, Rank>(total, scale, s + row * o.s.stride(0), o.s.stride(0), n, lane);
      lora_up_lane<T, Rank>(base + row * o.base.stride(0), o.base.stride(0), ds + row * o.ds.stride(0), o.ds.stride(0),
                            a, in, scale, d + row * in, in, n, lane);
    }
  }
}

template <typename T>
void rows_on_host(const RowsOperands& o, at::Tensor& dx) {
  switch (o.a.size(0)) {
    case 4: return rows_on_host<T, 4>(o, dx);
    case 8: return rows_on_host<T, 8>(o, dx);
    case 16: return rows_on_host<T, 16>(o, dx);
    case 32: return rows_on_host<T, 32>(o, dx);
    default: FAIL() << "rank " << o.a.size(0);
  }
}

TEST(LoraRowsKernel, LanesOnTheHostMatchTheFloat64Reference) {
  at::manual_seed(7);
  for (const RowsCase& c : rows_cases({1, 5}, {8, 264, 520})) {
    const RowsOperands o = rows_operands(c, at::kCPU);
    at::Tensor dx;
    if (c.dtype == at::kBFloat16) {
      rows_on_host<c10::BFloat16>(o, dx);
    } else {
      rows_on_host<c10::Half>(o, dx);
    }
    expect_rows_outputs(o, dx);
  }
}

TEST(LoraRowsKernel, MatchesTheFloat64ReferenceOnRaggedShapes) {
  FT_REQUIRE_CUDA();
  at::manual_seed(8);
  for (const RowsCase& c : rows_cases({1, 17, 4099}, {8, 264, 4096})) {
    const RowsOperands o = rows_operands(c, at::kCUDA);
    ASSERT_TRUE(kernels::lora_cast_down_fits(o.x, o.a, o.xo, o.s)) << o.what;
    ASSERT_TRUE(kernels::lora_up_add_fits(o.base, o.ds, o.a)) << o.what;
    kernels::lora_cast_down(o.x, o.a, o.scale, o.xo, o.s);
    const at::Tensor dx = kernels::lora_up_add(o.base, o.ds, o.a, o.scale);
    expect_rows_outputs(o, dx);
  }
}

TEST(LoraRowsKernel, DeclinesOperandsItCannotTake) {
  FT_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor x = at::randn({6, 64}, cuda), a = at::randn({16, 64}, cuda.dtype(at::kBFloat16));
  const at::Tensor xo = at::empty({6, 64}, cuda.dtype(at::kBFloat16)), s = at::empty({6, 16}, cuda.dtype(at::kBFloat16));
  EXPECT_TRUE(kernels::lora_cast_down_fits(x, a, xo, s));
  EXPECT_TRUE(kernels::lora_up_add_fits(xo, s, a));
  // Rank 64, a width that is not a multiple of 8, float16 input, mixed dtypes, an unaligned view.
  EXPECT_FALSE(kernels::lora_cast_down_fits(x, at::randn({64, 64}, cuda.dtype(at::kBFloat16)), xo,
                                            at::empty({6, 64}, cuda.dtype(at::kBFloat16))));
  EXPECT_FALSE(kernels::lora_cast_down_fits(x.narrow(1, 0, 60), a.narrow(1, 0, 60).contiguous(), xo.narrow(1, 0, 60), s));
  EXPECT_FALSE(kernels::lora_cast_down_fits(x.to(at::kHalf), a, xo, s));
  EXPECT_FALSE(kernels::lora_up_add_fits(xo, s, a.to(at::kHalf)));
  EXPECT_FALSE(kernels::lora_up_add_fits(at::empty({6, 72}, cuda.dtype(at::kBFloat16)).narrow(1, 4, 64), s, a));
  EXPECT_THROW(kernels::lora_up_add(xo, s, a.to(at::kHalf), 1.0), c10::Error);
}
#endif

}  // namespace
