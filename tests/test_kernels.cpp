// CUDA kernels against their LibTorch references; skipped where no GPU is visible.
#include <gtest/gtest.h>

#include "ft/model/llama.h"
#include "test_util.h"

#include "ft/adapt/nf4.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/nf4.h"
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

// NF4 dequantization on the GPU equals the tensor-op reference exactly (both form code × maximum in
// float32 and round once), for plain and double-quantized maxima, odd sizes and every output dtype;
// dequantize_nf4 uses the kernel for CUDA tensors.
TEST(NF4Kernel, EqualsTheReferenceExactly) {
#ifndef LIBFT_WITH_CUDA_KERNELS
  GTEST_SKIP() << "built without CUDA kernels";
#else
  FT_REQUIRE_CUDA();
  for (const auto& [shape, block, dq] : {std::tuple{std::vector<int64_t>{4096, 1024}, int64_t{64}, true},
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
    }
  }
  EXPECT_THROW(kernels::nf4_dequantize(at::zeros({3}, at::TensorOptions().device(at::kCUDA).dtype(at::kByte)),
                                       at::ones({1}, at::TensorOptions().device(at::kCUDA)), 7, 64, at::kFloat),
               c10::Error);
#endif
}

}  // namespace
