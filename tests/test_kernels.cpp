// CUDA kernels against their LibTorch references; skipped where no GPU is visible.
#include <gtest/gtest.h>

#include <cstring>

#include "ft/model/llama.h"
#include "test_util.h"

#include "ft/adapt/nf4.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/nf4.h"
#include "ft/kernels/nf4_decode.h"
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

}  // namespace
