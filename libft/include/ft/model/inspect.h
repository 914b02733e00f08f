#pragma once
// Human-readable summary of a model: architecture, parameter counts by module kind, dtypes, memory.
#include <cstdint>
#include <map>
#include <string>

#include "ft/model/llama.h"

namespace ft::model {

struct ParameterSummary {
  int64_t total = 0;
  int64_t trainable = 0;
  int64_t bytes = 0;
  /// Parameter counts by module kind: "embed_tokens", "attention", "mlp", "norm", "lm_head".
  std::map<std::string, int64_t> by_kind;
  /// Parameter counts by dtype name ("Float", "BFloat16", ...).
  std::map<std::string, int64_t> by_dtype;
};

ParameterSummary summarize_parameters(CausalLM& model);
/// Multi-line report for `ft inspect`.
std::string describe(CausalLM& model);

}  // namespace ft::model
