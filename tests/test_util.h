#pragma once
// Helpers shared by the LibTorch tests.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ft/io/hf_config.h"

namespace ft::test {

/// max|a − b| / max|b|: a norm-wise relative error that does not blow up on near-zero entries.
inline double max_rel_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor a64 = a.to(at::kDouble).cpu(), b64 = b.to(at::kDouble).cpu();
  return (a64 - b64).abs().max().item<double>() / std::max(b64.abs().max().item<double>(), 1e-30);
}

/// A 2-layer, 32-wide model of `type` (GQA 4/2, head_dim 8, vocab 97) for fast unit tests.
inline io::ModelConfig tiny_config(const std::string& type = "llama") {
  io::ModelConfig c;
  c.model_type = type;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.layer_window.assign(2, 0);
  return c;
}

/// Skips the test where no CUDA device is visible (CPU-only machines, CI).
#define FT_REQUIRE_CUDA()                                          \
  do {                                                             \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

}  // namespace ft::test
