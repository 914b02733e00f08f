#pragma once
// Token generation with a KV cache, for sanity checks of trained models: greedy or top-p sampling.
#include <cstdint>
#include <functional>
#include <vector>

#include "ft/model/llama.h"

namespace ft::model {

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  bool greedy = true;          ///< argmax; otherwise sample
  double temperature = 1.0;    ///< sampling only
  double top_p = 1.0;          ///< nucleus sampling: smallest set of tokens with probability ≥ top_p
  uint64_t seed = 0;           ///< sampling RNG seed
  std::vector<int64_t> stop_tokens;  ///< generation ends after emitting one of these (e.g. EOS)
  bool use_cache = true;       ///< false recomputes the whole sequence each step (a reference for tests)
  /// Called with each new token as it is chosen (for streaming output); may be empty.
  std::function<void(int64_t)> on_token;
};

/// Continues `prompt` (non-empty token ids) and returns only the new tokens.
std::vector<int64_t> generate(CausalLM& model, const std::vector<int64_t>& prompt, const GenerateOptions& options);

/// Samples one token from `logits` (V) with temperature and top-p, using `gen`.
int64_t sample_top_p(const at::Tensor& logits, double temperature, double top_p, at::Generator& gen);

}  // namespace ft::model
