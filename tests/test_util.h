#pragma once
// Helpers shared by the LibTorch tests.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "ft/data/token_store.h"
#include "ft/io/hf_config.h"
#include "ft/util/error.h"

namespace ft::test {

/// max|a − b| / max|b|: a norm-wise relative error that does not blow up on near-zero entries.
inline double max_rel_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor a64 = a.to(at::kDouble).cpu(), b64 = b.to(at::kDouble).cpu();
  return (a64 - b64).abs().max().item<double>() / std::max(b64.abs().max().item<double>(), 1e-30);
}

/// The names of the operations recorded (ATen ops, and libft's kernels, which record themselves as
/// "ft::…") on any thread while it lives: the autograd engine's threads run CUDA backward passes.
/// One at a time.
class OpNames {
 public:
  OpNames() {
    std::lock_guard<std::mutex> lock(mutex());
    names().clear();
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&OpNames::enter));
  }
  ~OpNames() { at::removeCallback(handle_); }
  OpNames(const OpNames&) = delete;
  OpNames& operator=(const OpNames&) = delete;
  bool seen(const std::string& name) const { return count(name) > 0; }
  /// How many times an operation or scope of that name was entered.
  size_t count(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex());
    const auto it = names().find(name);
    return it == names().end() ? 0 : it->second;
  }

 private:
  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction& fn) {
    std::lock_guard<std::mutex> lock(mutex());
    ++names()[fn.name()];
    return nullptr;
  }
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::map<std::string, size_t>& names() {
    static std::map<std::string, size_t> n;
    return n;
  }
  at::CallbackHandle handle_;
};

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
  if (type == "granite") {  // Granite's multipliers (granite-3.1-2b's but for the scores')
    c.embedding_multiplier = 12;
    c.attention_multiplier = 0.1;
    c.residual_multiplier = 0.22;
    c.logits_scaling = 8;
  }
  // Gemma 1: the exact GELU its first configs name.
  if (c.gemma()) c.hidden_act = type == "gemma" ? io::Activation::Gelu : io::Activation::GeluTanh;
  if (type == "gemma2") {  // Gemma 2's own parts: soft-capped scores and logits, a local layer
    c.query_pre_attn_scalar = 16;
    c.attn_logit_softcapping = 5;
    c.final_logit_softcapping = 8;
    c.layer_window = {4, 0};
  }
  if (type == "phi3") {  // Phi-4-mini's parts: longrope past 8 positions, 6 of 8 dims turning, a window
    c.partial_rotary_factor = 0.75;
    c.max_position_embeddings = 64;
    c.rope.type = io::RopeType::LongRope;
    c.rope.original_max_position_embeddings = 8;
    c.rope.short_factor = {1.0, 1.5, 2.0};
    c.rope.long_factor = {2.0, 5.0, 11.0};
    c.rope.factor = 8;
    c.rope.attention_factor = 1.25;
    c.layer_window = {6, 6};
  }
  if (type == "mixtral") {  // four experts of 24 units, two per token, their weights renormalised
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 24;
    c.norm_topk_prob = true;
  }
  if (type == "qwen3_moe") {  // five experts of 16 units, two per token, not renormalised; layer 1 dense
    c.num_experts = 5;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 16;
    c.layer_moe = {true, false};
  }
  if (type == "qwen2_moe") {  // four experts of 16 units, two per token, renormalised; a shared expert of 20
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 16;
    c.norm_topk_prob = true;
    c.shared_expert_intermediate_size = 20;
    c.qkv_bias = true;
  }
  if (type == "gpt_oss") {  // four experts of 64 units (MXFP4's blocks of 32 divide both widths), two per token
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.intermediate_size = c.moe_intermediate_size = 64;
    c.swiglu_limit = 7;
    c.qkv_bias = c.o_bias = true;
    c.layer_window = {4, 0};
  }
  if (type == "olmoe") {  // four experts of the MLP's width, two per token, not renormalised; q, k, v clamped
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = c.intermediate_size;
    c.clip_qkv = 2.0;
  }
  if (c.gemma3()) {  // Gemma 3's own parts: a local layer with its rotary base, a score scale of its own
    c.query_pre_attn_scalar = 16;
    c.sliding_rope = io::RopeConfig::with_theta(1e4);
    c.rope.theta = 1e6;
    c.layer_window = {4, 0};
  }
  return c;
}

/// The message of the ft::Error that `f` throws, or "no error".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

/// A whole file's bytes.
inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// An empty directory under the system's temporary directory, unique to this process.
inline std::filesystem::path scratch_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("libft_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

/// A token store (vocabulary 97, fingerprint "synthetic") of `n_docs` documents that follow a
/// learnable rule, next = 3·t + 1 (mod 97), each 5 to 4 + `max_extra` tokens long, all trainable;
/// starts and lengths come from an LCG seeded with `seed`.
inline void write_rule_store(const std::string& path, int n_docs, uint64_t seed, int max_extra) {
  data::TokenStoreWriteOptions wo;
  wo.tokenizer_fingerprint = "synthetic";
  wo.vocab_size = 97;
  data::TokenStoreWriter writer(path, wo);
  uint64_t x = seed;
  for (int d = 0; d < n_docs; ++d) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    data::Example e;
    int32_t t = static_cast<int32_t>((x >> 33) % 97);
    const int length = 5 + static_cast<int>((x >> 20) % static_cast<uint64_t>(max_extra));
    for (int i = 0; i < length; ++i, t = (3 * t + 1) % 97) {
      e.tokens.push_back(t);
      e.trainable.push_back(1);
    }
    writer.append(e);
  }
  writer.finish();
}

/// Skips the test where no CUDA device is visible (CPU-only machines, CI).
#define FT_REQUIRE_CUDA()                                          \
  do {                                                             \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

}  // namespace ft::test
