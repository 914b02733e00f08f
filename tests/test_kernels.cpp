// CUDA kernels against their LibTorch references; skipped where no GPU is visible.
#include <gtest/gtest.h>

#include "ft/model/llama.h"
#include "test_util.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
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

}  // namespace
