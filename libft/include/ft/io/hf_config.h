#pragma once
// Hugging Face config.json → typed model configuration for the Llama family
// (llama, mistral, qwen2, qwen3, granite; TinyLlama and SmolLM are "llama") and Gemma's text models
// (gemma: Gemma 1; gemma2: Gemma 2; gemma3_text: Gemma3ForCausalLM, e.g. gemma-3-270m and gemma-3-1b) and
// Microsoft's Phi-3 family (phi3: Phi-3, Phi-3.5-mini, Phi-4-mini, Phi-4), SmolLM3 (smollm3) and
// AI2's OLMo 2 (olmo2) and OLMo 3 (olmo3), and the mixture-of-experts models Mixtral (mixtral),
// Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe) and OLMoE (olmoe).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ft::io {

/// LongRope: Phi-3's (rope_type "longrope"; "su" and "yarn" in Phi-3 configs, which transformers
/// reads as longrope). Yarn: YaRN (Qwen2.5's and Qwen3's long-context configs, OLMo 3's
/// full-attention layers).
enum class RopeType { Default, Linear, Llama3, LongRope, Yarn };

/// The MLP's gate activation: silu (SwiGLU), the tanh approximation of GELU (GeGLU, Gemma's
/// gelu_pytorch_tanh), or the exact, erf GELU (a Gemma 1 config's hidden_act "gelu").
enum class Activation { Silu, GeluTanh, Gelu };

struct RopeConfig {
  /// The plain rotary embedding of base `theta`.
  static RopeConfig with_theta(double theta) {
    RopeConfig r;
    r.theta = theta;
    return r;
  }
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;                           ///< linear, llama3, longrope and yarn
  double low_freq_factor = 1.0;                  ///< llama3
  double high_freq_factor = 4.0;                 ///< llama3
  int64_t original_max_position_embeddings = 0;  ///< llama3, longrope, yarn
  /// longrope: per rotary frequency, the divisors of the inverse frequencies for sequences of at
  /// most original_max_position_embeddings positions (short) and longer ones (long): a forward
  /// pass whose largest position + 1 exceeds original_max_position_embeddings uses long_factor, as
  /// transformers' dynamic update does. Each has rotary_dim / 2 entries.
  std::vector<double> short_factor, long_factor;
  /// longrope and yarn: cos and sin are multiplied by this (transformers' attention_scaling); 1
  /// elsewhere. Read from attention_factor, else computed as transformers does: longrope
  /// √(1 + ln(factor) / ln(original)) with factor max_position_embeddings /
  /// original_max_position_embeddings (1 where factor ≤ 1); yarn 0.1 · ln(factor) + 1, or with
  /// DeepSeek's mscale and mscale_all_dim the ratio (0.1 · mscale · ln(factor) + 1) /
  /// (0.1 · mscale_all_dim · ln(factor) + 1) (each 1 where factor ≤ 1).
  double attention_factor = 1.0;
  /// yarn: the frequencies that turn more than beta_fast times over the original context keep
  /// their own (extrapolation), those turning fewer than beta_slow times are divided by `factor`
  /// (interpolation), with a linear ramp over the dimensions in between, whose ends are rounded
  /// outwards to whole dimensions where `truncate` says so (transformers' default).
  double beta_fast = 32.0, beta_slow = 1.0;
  bool truncate = true;
};

struct ModelConfig {
  std::string model_type = "llama";  ///< llama | mistral | qwen2 | qwen3 | granite | gemma | gemma2 | gemma3_text | phi3 | smollm3 | olmo2 | olmo3 | mixtral | qwen2_moe | qwen3_moe | olmoe | gpt_oss
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
  /// The fraction of each head's dimensions that the rotary embedding turns (the first
  /// rotary_dim()); the rest pass through (Phi-4-mini: 0.75). 1 for the other families.
  double partial_rotary_factor = 1.0;
  /// Gemma 3 and OLMo 3: the rotary embedding of the sliding-window layers (Gemma 3's
  /// rope_local_base_freq, or rope_parameters.sliding_attention); `rope` is the full-attention
  /// layers'. Unset: every layer uses `rope`.
  std::optional<RopeConfig> sliding_rope;
  Activation hidden_act = Activation::Silu;
  /// Gemma 2 and 3: attention scores scaled by query_pre_attn_scalar^-1/2; 0: by head_dim^-1/2.
  double query_pre_attn_scalar = 0;
  /// Gemma 2 and 3: logits = cap · tanh(logits / cap); 0: none.
  double final_logit_softcapping = 0;
  /// Gemma 2: attention scores = cap · tanh(scores / cap), after the scale, before the mask; 0: none.
  double attn_logit_softcapping = 0;
  /// Granite's multipliers (GraniteConfig): the embeddings are multiplied by embedding_multiplier,
  /// the attention scores by attention_multiplier (in place of 1/√head_dim; 0: not given), each
  /// sublayer's output by residual_multiplier before it joins the residual stream, and the logits
  /// divided by logits_scaling. 1 (0) for the other families.
  double embedding_multiplier = 1, attention_multiplier = 0, residual_multiplier = 1, logits_scaling = 1;
  /// Dropout on the attention probabilities in training (attention_dropout; Granite 3.1's configs
  /// say 0.1, most others 0), as transformers applies it; none in eval mode.
  double attention_dropout = 0;
  /// Phi-3 (resid_pdrop): dropout on each sublayer's output before it joins the residual stream,
  /// in training mode. 0 for the other families.
  double residual_dropout = 0;
  bool qkv_bias = false;       ///< llama/mistral/qwen3: attention_bias; qwen2: always true
  bool o_bias = false;         ///< llama/qwen3: attention_bias; qwen2/mistral: false
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  /// Attention window per layer, 0 = full causal attention (mistral's sliding_window, qwen2's and
  /// qwen3's layer_types).
  std::vector<int64_t> layer_window;
  /// SmolLM3 (no_rope_layers): per layer, whether its queries and keys are turned by the rotary
  /// embedding; a layer without one (NoPE) attends by content and causality alone. Empty: every
  /// layer turns them.
  std::vector<bool> layer_rope;
  /// Mixture of experts (Mixtral, Qwen3-MoE): in a sparse layer the MLP is num_experts SwiGLU
  /// experts of moe_intermediate_size and a router, a bias-free linear layer (gate) whose softmax
  /// (in float32) over the experts picks each token's num_experts_per_tok most probable; their
  /// outputs are summed, each weighted by its probability, renormalised over the chosen where
  /// norm_topk_prob says (Mixtral: always). Qwen3-MoE rounds the weights to the activations' dtype
  /// first, Mixtral keeps them in float32. 0 experts: every MLP is dense.
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  /// Qwen2-MoE: beside the routed experts, a shared expert (SwiGLU of this many units) that every
  /// token passes through, its output scaled by sigmoid(shared_expert_gate(x)) and added. 0: none.
  int64_t shared_expert_intermediate_size = 0;
  /// Per layer, whether its MLP is sparse (Qwen3-MoE's mlp_only_layers and decoder_sparse_step
  /// make some dense, of intermediate_size). Empty: every layer's, where num_experts > 0.
  std::vector<bool> layer_moe;
  /// output_router_logits: transformers adds router_aux_loss_coef × the load-balancing loss of the
  /// routers to the training loss (read; libft's trainer refuses it, see train::check_trainable).
  /// OLMoE: q, k and v clamped to [-clip_qkv, clip_qkv] after the projections (and q/k norms); 0:
  /// no clamp (the config's null).
  double clip_qkv = 0;
  /// gpt-oss (swiglu_limit): each expert's gate clamped to at most this and its up to ±this, its
  /// activation gate · sigmoid(1.702 · gate) · (up + 1). 0 for the other families.
  double swiglu_limit = 0;
  /// gpt-oss's checkpoints (quantization_config quant_method "mxfp4"): the experts' weights are
  /// stored as MXFP4 blocks and scales, which io::load_weights dequantizes. Never written back: a
  /// saved model holds the weights it trains.
  bool mxfp4_experts = false;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
  /// Also the embedding's padding_idx, as transformers builds it: that row gets no gradient.
  std::optional<int64_t> pad_token_id;
  std::string torch_dtype = "float32";  ///< the checkpoint's declared dtype
  /// Read from an image-text checkpoint's text_config (Gemma 3's 4B and larger models, model_type
  /// "gemma3"): that checkpoint's architecture, Gemma3ForConditionalGeneration. Its language model's
  /// weights load (io::load_weights) and its vision tower's do not; the model saves as the text
  /// model it is (Gemma3ForCausalLM). Empty otherwise.
  std::string image_text_architecture;
  double initializer_range = 0.02;

  /// Whether layer `i`'s MLP is a mixture of experts (see num_experts, layer_moe).
  bool moe_in_layer(int64_t i) const {
    return num_experts > 0 && (layer_moe.empty() || layer_moe.at(static_cast<size_t>(i)));
  }
  /// Mistral AI's Mixtral (MixtralForCausalLM): Mistral's attention, its experts' projections named
  /// w1 (gate), w3 (up) and w2 (down) under block_sparse_moe.
  bool mixtral() const { return model_type == "mixtral"; }
  /// AI2's OLMoE: Llama's block with q and k normed over all heads (as OLMo 2's) and a mixture of experts.
  bool olmoe() const { return model_type == "olmoe"; }
  /// OpenAI's gpt-oss (GptOssForCausalLM): a mixture of experts with biases everywhere (the
  /// router's, each expert's, the attention's), a learned attention sink per head, sliding-window
  /// layers between global ones, and a router that takes each token's top k logits and softmaxes
  /// those. Its checkpoints keep a layer's experts as fused 3-D tensors, gate and up interleaved
  /// (io::load_weights splits them into libft's per-expert projections, save_pretrained fuses them).
  bool gpt_oss() const { return model_type == "gpt_oss"; }
  /// gpt-oss: each head's learned sink logit joins the softmax over the scores and takes its share
  /// of the probability, attending to nothing.
  bool attention_sinks() const { return gpt_oss(); }
  /// OLMo 2/3 and gpt-oss: RMSNorm's weight product taken in float32 before the cast back.
  bool norm_float_product() const { return olmo() || gpt_oss(); }
  /// IBM's Granite 3 (GraniteForCausalLM): Llama's block with four multipliers.
  bool granite() const { return model_type == "granite"; }
  /// Whether layer `i` applies the rotary embedding (see layer_rope).
  bool rope_in_layer(int64_t i) const { return layer_rope.empty() || layer_rope.at(static_cast<size_t>(i)); }
  /// Microsoft's Phi-3 family (Phi3ForCausalLM).
  bool phi3() const { return model_type == "phi3"; }
  /// Phi-3: q, k and v come from one projection, qkv_proj (rows [q | k | v]), and gate and up from
  /// one, gate_up_proj (rows [gate | up]), as the checkpoints store them.
  bool packed_projections() const { return model_type == "phi3"; }
  /// The dimensions of each head that the rotary embedding turns: head_dim · partial_rotary_factor,
  /// truncated (as transformers computes it).
  int64_t rotary_dim() const { return static_cast<int64_t>(static_cast<double>(head_dim) * partial_rotary_factor); }
  /// Gemma 1, 2 and 3's text models.
  bool gemma() const { return model_type == "gemma" || model_type == "gemma2" || gemma3(); }
  /// Gemma 3's text models.
  bool gemma3() const { return model_type == "gemma3_text"; }
  /// Qwen3 and Gemma 3: an RMSNorm over each head's queries and keys (q_norm, k_norm: weights of
  /// head_dim), after the projections and before the rotary embedding; OLMo 2: over all of the
  /// queries and all of the keys (qk_norm_full_width: weights of H·D and G·D).
  bool qk_norm() const { return model_type == "qwen3" || model_type == "qwen3_moe" || gemma3() || olmo() || olmoe(); }
  bool qk_norm_full_width() const { return olmo() || olmoe(); }
  /// AI2's OLMo 2 and OLMo 3 (Olmo2ForCausalLM, Olmo3ForCausalLM): norms on the sublayers' outputs
  /// only (post_attention_layernorm, post_feedforward_layernorm; no input_layernorm), each w · x̂
  /// taken in float32 before the cast, and full-width q/k norms. OLMo 3 adds sliding-window
  /// layers (three of each four by default) with a rotary embedding of their own (sliding_rope):
  /// its full-attention layers' may be YaRN.
  bool olmo() const { return model_type == "olmo2" || olmo3(); }
  bool olmo3() const { return model_type == "olmo3"; }
  /// Gemma: RMSNorm weights are offsets from one, x̂ · (1 + w), computed in float32 and then cast
  /// to x's dtype, and initialised to zero.
  bool norm_unit_offset() const { return gemma(); }
  /// Gemma 2 and 3: each block also norms its attention output (post_attention_layernorm) and its
  /// MLP's input and output (pre_feedforward_layernorm, post_feedforward_layernorm).
  bool sandwich_norms() const { return model_type == "gemma2" || gemma3(); }
  /// Gemma: the embeddings are scaled by √hidden_size, rounded to float32 and then to the
  /// weights' dtype (the tied output head uses the unscaled weights).
  bool scaled_embeddings() const { return gemma(); }
  /// The attention's score scale: attention_multiplier, query_pre_attn_scalar^-1/2 or head_dim^-1/2.
  double attention_scale() const;

  /// Throws ft::Error when values are inconsistent (heads not dividing, non-positive sizes...).
  void validate(const std::string& source) const;
  /// About how many parameters the sizes make (biases and norms' few left out), in double: the
  /// sizes' products may overflow int64. validate() bounds it, and the model's constructor checks
  /// it against the machine's memory.
  double parameter_estimate() const;
};

/// Parses config.json text. `source` names the file in error messages. Unknown model types, unknown
/// keys and unsupported options (other activations, rope types, quantization...) are errors.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
/// Reads and parses a config.json file.
ModelConfig load_model_config(const std::string& path);
/// The end-of-sequence ids of a checkpoint directory's generation_config.json (eos_token_id, an
/// integer or a list), which transformers' generate() stops at in place of config.json's: gpt-oss
/// lists <|return|>, <|endoftext|> and <|call|>, its config.json <|return|> alone. Empty when the file
/// or the key is absent (or null). Throws ft::Error naming the file for bad JSON or a bad value.
std::vector<int64_t> load_generation_eos(const std::string& dir);
/// HF-style config.json text for `config` (rope_theta + rope_scaling, as transformers 4.x and 5.x read).
std::string model_config_to_json(const ModelConfig& config);

}  // namespace ft::io
