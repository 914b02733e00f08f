#pragma once
// Helpers shared by the LibTorch tests.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

namespace ft::test {

/// max|a − b| / max|b|: a norm-wise relative error that does not blow up on near-zero entries.
inline double max_rel_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor a64 = a.to(at::kDouble).cpu(), b64 = b.to(at::kDouble).cpu();
  return (a64 - b64).abs().max().item<double>() / std::max(b64.abs().max().item<double>(), 1e-30);
}

/// Skips the test where no CUDA device is visible (CPU-only machines, CI).
#define FT_REQUIRE_CUDA()                                          \
  do {                                                             \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

}  // namespace ft::test
