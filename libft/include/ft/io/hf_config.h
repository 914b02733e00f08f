#pragma once
// Hugging Face config.json → typed model configuration for the Llama family
// (llama, mistral, qwen2, qwen3; TinyLlama and SmolLM are "llama").
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ft::io {

enum class RopeType { Default, Linear, Llama3 };

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;                           ///< linear and llama3
  double low_freq_factor = 1.0;                  ///< llama3
  double high_freq_factor = 4.0;                 ///< llama3
  int64_t original_max_position_embeddings = 0;  ///< llama3
};

struct ModelConfig {
  std::string model_type = "llama";  ///< llama | mistral | qwen2 | qwen3
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  ///< defaults to hidden_size / num_attention_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool qkv_bias = false;       ///< llama/mistral/qwen3: attention_bias; qwen2: always true
  bool o_bias = false;         ///< llama/qwen3: attention_bias; qwen2/mistral: false
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  /// Attention window per layer, 0 = full causal attention (mistral's sliding_window, qwen2's and
  /// qwen3's layer_types).
  std::vector<int64_t> layer_window;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> pad_token_id;
  std::string torch_dtype = "float32";  ///< the checkpoint's declared dtype
  double initializer_range = 0.02;

  /// Qwen3: an RMSNorm over each head's queries and keys (q_norm, k_norm: weights of head_dim),
  /// after the projections and before the rotary embedding.
  bool qk_norm() const { return model_type == "qwen3"; }

  /// Throws ft::Error when values are inconsistent (heads not dividing, non-positive sizes...).
  void validate(const std::string& source) const;
};

/// Parses config.json text. `source` names the file in error messages. Unknown model types, unknown
/// keys and unsupported options (other activations, rope types, quantization...) are errors.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
/// Reads and parses a config.json file.
ModelConfig load_model_config(const std::string& path);
/// HF-style config.json text for `config` (rope_theta + rope_scaling, as transformers 4.x and 5.x read).
std::string model_config_to_json(const ModelConfig& config);

}  // namespace ft::io
