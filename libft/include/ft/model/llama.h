#pragma once
// Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, TinyLlama, SmolLM, SmolLM3, Granite 3, OLMo 2;
// Gemma 1, 2 and 3 text models; Phi-3) in LibTorch.
//
// Module and parameter names are Hugging Face's ("model.layers.0.self_attn.q_proj.weight"), and so
// is the q/k layout that HF's rotate-half rotary embedding expects, so checkpoints and PEFT
// adapters map one to one without permutation.
//
// Dimension letters: B batch, T new tokens, S tokens attended (cache + new), H query heads,
// G key/value heads, D head_dim, E hidden_size, F intermediate_size, V vocab_size.
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include "ft/model/linear.h"
#include <torch/nn/pimpl.h>

#include <map>
#include <optional>
#include <vector>

#include "ft/io/hf_config.h"

namespace ft::model {

using io::ModelConfig;

/// Root-mean-square layer norm, computed in float32 and cast back (as HF does). With `unit_offset`
/// (Gemma, ModelConfig::norm_unit_offset) the weight is an offset from one: x̂ · (1 + w), the
/// product taken in float32 before the cast.
/// With `float_product` (OLMo 2) the product w · x̂ is likewise taken in float32 before the cast.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, bool unit_offset = false, bool float_product = false);
  /// The fused CPU form (ft/model/cpu_ops.h) for float32/float64 CPU inputs; the fused CUDA kernel
  /// for CUDA inputs when gradients are off; else reference().
  at::Tensor forward(const at::Tensor& x);
  /// The LibTorch computation that every path is tested against.
  at::Tensor reference(const at::Tensor& x);
  at::Tensor weight;
  double eps;
  bool unit_offset = false;
  bool float_product = false;
};
TORCH_MODULE(RMSNorm);

/// Keys and values of past tokens, per layer: (B, G, S, D).
struct KVCache {
  std::vector<at::Tensor> keys, values;
  /// Leading entries that are a learned prefix (prefix tuning), not tokens: the model puts its
  /// prefix into an empty cache, and attention masks and positions count only the tokens after it.
  int64_t prefix = 0;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

/// What one forward pass attends to.
struct AttentionInputs {
  at::Tensor cos, sin;  ///< (B, T, D) rotary tables for the new tokens' positions
  /// The sliding-window layers' tables where they have a rotary embedding of their own
  /// (ModelConfig::sliding_rope); undefined otherwise.
  at::Tensor sliding_cos, sliding_sin;
  /// Boolean masks (B or 1, 1, T, S), true = may attend, by attention window (0 = full). An
  /// undefined mask means plain causal attention is exact: SDPA's is_causal when `causal`.
  std::map<int64_t, at::Tensor> masks;
  bool causal = false;
  int64_t past = 0;  ///< cached tokens before the new ones
  /// Variable-length attention over the flattened rows (ForwardOptions::cu_seqlens), where defined:
  /// `masks` are then all undefined and unused.
  at::Tensor cu_seqlens;
  int64_t max_seqlen = 0;
  /// Rotary embedding through the fused CUDA kernel where it applies (CausalLMImpl::fused_rope).
  bool fused_rope = false;
  /// grouped_attention_bias() of each window's mask, made by the first layer that takes the CPU
  /// grouped path (ft/model/cpu_ops.h) and reused by the others.
  mutable std::map<int64_t, at::Tensor> grouped_bias;
};

class AttentionImpl : public torch::nn::Module {
 public:
  /// `rope`: whether this layer turns q and k by the rotary embedding (ModelConfig::layer_rope).
  AttentionImpl(const ModelConfig& c, int64_t window, bool rope = true);
  /// x: (B, T, E) → (B, T, E). Appends this layer's keys/values to `cache_k`/`cache_v` when given.
  /// `prefix_k`/`prefix_v` (G, P, D), when defined, are attended before the tokens (prefix tuning
  /// without a cache; the masks in `in` then cover P + T keys).
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& in, at::Tensor* cache_k, at::Tensor* cache_v,
                     const at::Tensor& prefix_k = {}, const at::Tensor& prefix_v = {});
  /// q_proj, k_proj and v_proj; or (ModelConfig::packed_projections, Phi-3) qkv_proj, whose output
  /// rows are [q | k | v], and the three null.
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  Linear qkv_proj{nullptr};
  /// Qwen3 and Gemma 3 (ModelConfig::qk_norm): RMSNorm of each head's queries and keys before the
  /// rotary embedding; OLMo 2: of all the queries and all the keys (weights of H·D and G·D); null
  /// for the other families.
  RMSNorm q_norm{nullptr}, k_norm{nullptr};
  bool qk_norm_full_width = false;  ///< OLMo 2's
  int64_t heads, kv_heads, head_dim, window;
  /// The leading dimensions of each head that the rotary embedding turns (ModelConfig::rotary_dim);
  /// head_dim but for Phi-4-mini's kind.
  int64_t rotary_dim;
  /// Whether q and k are turned (SmolLM3's NoPE layers: not).
  bool use_rope = true;
  /// The scores' scale, ModelConfig::attention_scale; `default_scale` when it is 1/√head_dim (SDPA's
  /// own, left to SDPA).
  double scale;
  bool default_scale;
  /// Gemma 2 (ModelConfig::attn_logit_softcapping): scores = softcap · tanh(scores / softcap) before
  /// the mask, which no fused attention computes: the scores are then materialised (as transformers'
  /// eager attention does). 0: none.
  double softcap = 0;
  /// ModelConfig::attention_dropout: dropout on the attention probabilities in training mode.
  double dropout = 0;
  /// OLMoE (ModelConfig::clip_qkv): q, k and v clamped to ±clip_qkv after the norms; 0: none.
  double clip_qkv = 0;
  /// gpt-oss (ModelConfig::attention_sinks): one learned logit per query head (H), a key that every
  /// query sees and that carries no value; the scores are then materialised (materialized_attention).
  /// Undefined for the other families.
  at::Tensor sinks;
  /// Whether the scores are materialised (soft-capped or with sinks: materialized_attention), which
  /// no fused or variable-length attention computes.
  bool materialized() const { return softcap > 0 || sinks.defined(); }
  /// CausalLMImpl::set_flash_sinks: the sinks through sink_flash_attention where it applies.
  bool flash_sinks = false;
  bool shared_input_cast = true;  ///< CausalLMImpl::set_shared_input_cast
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const ModelConfig& c);
  /// A mixture-of-experts model's expert (bias-free SwiGLU of `intermediate` units), its
  /// projections registered under Mixtral's names (w1: gate, w3: up, w2: down) where the config is
  /// Mixtral's, else as gate_proj, up_proj and down_proj.
  MLPImpl(const ModelConfig& c, int64_t intermediate);
  at::Tensor forward(const at::Tensor& x);  ///< down(act(gate(x)) * up(x)), act silu or a GELU
  /// gate_proj and up_proj; or (ModelConfig::packed_projections, Phi-3) gate_up_proj, whose output
  /// rows are [gate | up], and the two null.
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  Linear gate_up_proj{nullptr};
  io::Activation act = io::Activation::Silu;
  /// gpt-oss's experts (ModelConfig::swiglu_limit): gate clamped to ≤ limit, up to ±limit, and
  /// down(gate · sigmoid(1.702 · gate) · (up + 1)); 0: the plain gated activation.
  double glu_limit = 0;
  bool fused_swiglu = false;  ///< CausalLMImpl::set_fused_swiglu (silu only)
  bool shared_input_cast = true;  ///< CausalLMImpl::set_shared_input_cast
};
TORCH_MODULE(MLP);

/// A mixture of experts (ModelConfig::num_experts): the router `gate` (num_experts × hidden, no
/// bias) scores each token; softmax in float32, the top_k most probable experts, their weights
/// renormalised where `normalize`, and rounded to the router's output dtype unless `float_weights`
/// (Mixtral keeps them in float32). Each expert runs on its tokens only; a token's output is the
/// weighted sum of its experts' outputs, added in the input's dtype expert by expert in index order,
/// as transformers adds them. In a training pass that records gradients, an expert that no token
/// chose runs on no rows, so that its weights get a zero gradient (as every slice of transformers 5's
/// fused 3-D expert weights does) and AdamW moves them by their momentum.
class SparseMoeImpl : public torch::nn::Module {
 public:
  explicit SparseMoeImpl(const ModelConfig& c);
  /// `router_logits`: where given, set to the router's logits (B·T, num_experts), in the router's
  /// output dtype, for load_balancing_loss.
  at::Tensor forward(const at::Tensor& x, at::Tensor* router_logits = nullptr);
  Linear gate{nullptr};
  torch::nn::ModuleList experts{nullptr};  ///< MLP each
  /// Qwen2-MoE: the shared expert, which every token passes through, and its gate (hidden → 1),
  /// whose sigmoid scales its output before it joins the routed experts' sum; null elsewhere.
  MLP shared_expert{nullptr};
  Linear shared_expert_gate{nullptr};
  int64_t top_k = 0;
  bool normalize = false;
  bool float_weights = false;
  /// gpt-oss: the router (registered as "router", with a bias) picks each token's top_k logits and
  /// the weights are their softmax, in the logits' dtype.
  bool softmax_top_k = false;
};
TORCH_MODULE(SparseMoe);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const ModelConfig& c, int64_t layer);
  /// `router_logits`: where given and the layer has experts, set to its router's logits
  /// (SparseMoeImpl::forward); left as it is in a dense layer.
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& in, at::Tensor* cache_k, at::Tensor* cache_v,
                     const at::Tensor& prefix_k = {}, const at::Tensor& prefix_v = {},
                     at::Tensor* router_logits = nullptr);
  /// post_attention_layernorm norms the MLP's input, or with ModelConfig::sandwich_norms (Gemma 2 and 3)
  /// the attention's output, and pre/post_feedforward_layernorm the MLP's input and output. OLMo 2:
  /// no input_layernorm (null) nor pre_feedforward_layernorm; post_attention_layernorm and
  /// post_feedforward_layernorm norm the sublayers' outputs.
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  RMSNorm pre_feedforward_layernorm{nullptr}, post_feedforward_layernorm{nullptr};  ///< null but for Gemma 2, 3 (OLMo 2: post)
  Attention self_attn{nullptr};
  /// The MLP: dense (mlp), or in a mixture-of-experts model's sparse layers (moe, registered as
  /// "block_sparse_moe" for Mixtral and "mlp" for Qwen3-MoE) its experts and router; the other null.
  MLP mlp{nullptr};
  SparseMoe moe{nullptr};
  /// mlp or moe on x (moe's router logits into `router_logits` where given).
  at::Tensor feed_forward(const at::Tensor& x, at::Tensor* router_logits = nullptr) {
    return mlp ? mlp(x) : moe->forward(x, router_logits);
  }
  /// The dense MLP and every expert (for the settings they share).
  std::vector<MLPImpl*> mlps();
  /// Granite (ModelConfig::residual_multiplier): each sublayer's output times this before it joins
  /// the residual stream; 1 for the other families.
  double residual_multiplier = 1;
  /// Phi-3 (ModelConfig::residual_dropout): dropout on each sublayer's output before the residual
  /// add, in training mode.
  double residual_dropout = 0;
};
TORCH_MODULE(DecoderLayer);

/// The decoder stack without the LM head ("model." in HF keys).
class DecoderImpl : public torch::nn::Module {
 public:
  explicit DecoderImpl(const ModelConfig& c);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(Decoder);

/// Prefix tuning (Li & Liang 2021) as PEFT implements it: per layer, P learned keys and values per
/// key/value head that every query attends to before the sequence's own tokens, as if they were P
/// cached tokens (they are not rotated, and the tokens' positions start at P, as in PEFT). The
/// table is PEFT's: (P, L·2·G·D), entry ((2·layer + kv)·G + head)·D + d, kv 0 = key, 1 = value.
/// With `projection` (PEFT's prefix_projection), a (P, G·D) embedding goes through
/// Linear(G·D, hidden) → tanh → Linear(hidden, L·2·G·D) to make the table instead; PEFT saves the
/// table that results, never the MLP.
class PrefixEncoderImpl : public torch::nn::Module {
 public:
  PrefixEncoderImpl(const ModelConfig& c, int64_t virtual_tokens, bool projection, int64_t encoder_hidden);
  /// The key/value table, (P, L·2·G·D).
  at::Tensor table();
  /// Per layer, keys at 2·layer and values at 2·layer + 1, each (G, P, D).
  std::vector<at::Tensor> keys_values();
  int64_t virtual_tokens, layers, kv_heads, head_dim;
  bool projection;
  torch::nn::Embedding embedding{nullptr};
  torch::nn::ModuleList transform{nullptr};  ///< Linear, Tanh, Linear (with projection only)
};
TORCH_MODULE(PrefixEncoder);

struct ForwardOptions {
  /// (B, S) 1 = token, 0 = padding, covering cached + new tokens (not a prefix: its keys are always
  /// visible); optional
  at::Tensor attention_mask;
  /// Whether attention_mask has a 0, where the caller knows it (the trainer counts on the host).
  /// Unset: forward reads the mask to find out, which on CUDA makes the host wait for the device.
  std::optional<bool> padding;
  /// (B, T); default: past .. past+T-1, as HF's forward. With a prefix, P is added (PEFT's rule).
  at::Tensor position_ids;
  /// (B, T) integer document ids of packed rows (the batcher's segment_ids): when given, a token
  /// attends only to earlier tokens of its own document (block-diagonal causal attention). Not
  /// combinable with a KV cache.
  at::Tensor segment_ids;
  /// Packed rows as variable-length sequences, for flash attention on CUDA: int32 offsets (n + 1),
  /// on the model's device, of the n runs of equal segment_ids in the flattened B·T tokens (each
  /// document, and each row's padding), and the longest run (train::varlen_offsets builds both from
  /// the host batch). Taken with segment_ids on a CUDA model whose attention computes in bf16 or
  /// fp16 (head_dim a multiple of 8, at most 256), without a KV cache or a prefix: attention then
  /// runs over those runs (at::_flash_attention_forward, sliding windows included) instead of SDPA
  /// with a (B, 1, T, T) block-diagonal mask, which is not even built. Ignored elsewhere. The
  /// offsets must describe segment_ids (and its padding): they are not checked against it, which
  /// would make the host wait for the device.
  at::Tensor cu_seqlens;
  int64_t max_seqlen = 0;
  /// The largest entry of position_ids, where the caller knows it (the trainer, from the host
  /// batch). Only a longrope model (Phi-3's long-context models) reads it: its rotary frequencies
  /// depend on whether the largest position + 1 exceeds the original context. Unset, forward reads
  /// position_ids, which on CUDA makes the host wait for the device.
  std::optional<int64_t> max_position;
  KVCache* cache = nullptr;   ///< when set, attends to and extends the cache
  /// When set, every mixture-of-experts layer appends its router's logits (B·T, num_experts) here,
  /// in layer order (dense layers append nothing), for load_balancing_loss. With activation
  /// checkpointing they carry their gradient through the block's recomputation.
  std::vector<at::Tensor>* router_logits = nullptr;
};

class CausalLMImpl : public torch::nn::Module {
 public:
  explicit CausalLMImpl(ModelConfig config);
  /// input_ids: (B, T) int64 → final hidden states (B, T, E).
  at::Tensor hidden_states(const at::Tensor& input_ids, const ForwardOptions& options = {});
  /// input_ids: (B, T) int64 → logits (B, T, V), in the model's dtype.
  at::Tensor forward(const at::Tensor& input_ids, const ForwardOptions& options = {});
  /// hidden (…, E) → logits (…, V), through lm_head or the tied embedding (then soft-capped where
  /// the config says, ModelConfig::final_logit_softcapping).
  at::Tensor logits(const at::Tensor& hidden);

  const ModelConfig& config() const { return config_; }
  /// Activation (gradient) checkpointing per decoder block: training forward passes keep only each
  /// block's input and recompute the block during the backward pass (memory for activations falls
  /// from O(layers × block activations) to O(layers × hidden) + one block, for about one more
  /// forward pass of compute). Gradients are the same. No effect without gradients or with a KV cache.
  void set_gradient_checkpointing(bool on) { gradient_checkpointing_ = on; }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }
  /// The trainer's loss in chunks of this many token rows (0: the whole (B·T, V) logits at once):
  /// see chunked_lm_loss_sum.
  void set_loss_chunk(int64_t rows) { loss_chunk_ = rows; }
  int64_t loss_chunk() const { return loss_chunk_; }
  /// The trainer's loss through the fused cross-entropy kernels on CUDA (ft/kernels/cross_entropy.h):
  /// scored straight from the bf16/fp16/float32 logits, the gradient written in their dtype, without
  /// the float32 copy, log-softmax and gradient of the unfused path. Off by default until the GPU
  /// check has measured it; no effect on the CPU. See cross_entropy_sum.
  void set_fused_loss(bool on) { fused_loss_ = on; }
  bool fused_loss() const { return fused_loss_; }
  /// Rotary embeddings through the fused CUDA kernel (ft/kernels/rope.h) where the tables are
  /// float32 (autocast, or a float32 model) and no KV cache is kept: the same forward values bit for
  /// bit, the input gradient rounded once instead of per term, without the float32 (B, H, T, D)
  /// intermediates. Off by default until the GPU check has measured it; no effect on the CPU.
  void set_fused_rope(bool on) { fused_rope_ = on; }
  bool fused_rope() const { return fused_rope_; }
  /// silu(gate) ⊙ up through the fused CUDA kernel (ft/kernels/swiglu.h) where gate and up are
  /// CUDA tensors of one dtype, separate or the halves of grouped projections' [gate | up]
  /// (swiglu_packed): the unfused pair's rounding points, one pass each way,
  /// gate and up kept for the backward pass instead of gate, silu(gate) and up. Off by default
  /// until the GPU check has measured it; no effect on the CPU.
  void set_fused_swiglu(bool on);
  bool fused_swiglu() const { return fused_swiglu_; }
  /// gpt-oss's attention sinks through flash attention (sink_flash_attention) instead of
  /// materialised scores: on the CPU with the layers' masks; on CUDA in bf16/fp16 over packed rows
  /// (variable-length, windows included) or unpadded ones, else materialised. Off by default until
  /// the GPU check has measured it.
  void set_flash_sinks(bool on);
  bool flash_sinks() const { return flash_sinks_; }
  /// Under autocast, the normed hidden state is cast to the compute dtype once for the projections
  /// that read it (q, k, v; gate, up) instead of once by each, and their input gradients, which
  /// come back in the compute dtype, are summed in float32 in one place instead of each being
  /// converted to float32 and then summed: the same forward values bit for bit, the same gradients
  /// up to the order of that sum. Skipped for a group with an adapter that wants the float32 input
  /// (LinearAdapter::wants_float_input). On by default; off for comparisons.
  void set_shared_input_cast(bool on);
  bool shared_input_cast() const { return shared_input_cast_; }
  /// Rotary inverse frequencies (rotary_dim/2), float32, after the config's rope scaling (longrope:
  /// the short factors').
  const at::Tensor& inv_freq() const { return inv_freq_; }
  /// Whether a forward pass over positions up to `max_position` uses longrope's long factors
  /// (max_position + 1 > the original context, as transformers decides); false for other ropes.
  bool long_rope(int64_t max_position) const;
  /// input_ids (B, T) → their embeddings (B, T, E), scaled where the config says
  /// (ModelConfig::scaled_embeddings).
  at::Tensor embed(const at::Tensor& input_ids);
  /// A tied model (tie_word_embeddings) gets an lm_head of its own, a copy of the embeddings, and
  /// its config says untied from then on (so save_pretrained writes both). The logits are the same
  /// until one of the two changes. No effect on an untied model. PEFT's modules_to_save does this
  /// when it trains lm_head or embed_tokens of a tied model.
  void untie_embeddings();
  /// Attaches a prefix (prefix tuning), registered as the submodule "prefix_encoder". Its shape must
  /// fit this model; a model takes one prefix.
  void set_prefix(PrefixEncoder encoder);

  Decoder model{nullptr};
  Linear lm_head{nullptr};  ///< null when tie_word_embeddings
  PrefixEncoder prefix_encoder{nullptr};  ///< null without prefix tuning

 private:
  /// `host` (inv_freq_ or sliding_inv_freq_) on `device`, copied into `copy` once per device: a copy
  /// in every forward pass would make the host wait for the device on CUDA (a copy from pageable
  /// memory) and could not be captured in a CUDA graph.
  static const at::Tensor& on_device(const at::Tensor& host, at::Tensor& copy, const c10::Device& device);
  /// The rotary tables (cos, sin) of `inv_freq` for `positions` (B, T), in `dtype`.
  /// Both are multiplied by `scale` (longrope's attention factor) in float32 before the cast.
  static std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                       at::ScalarType dtype, double scale = 1.0);

  ModelConfig config_;
  at::Tensor inv_freq_;
  at::Tensor inv_freq_device_;  ///< the last device's copy (see on_device)
  /// longrope: the long factors' frequencies, and their last device's copy.
  at::Tensor long_inv_freq_, long_inv_freq_device_;
  /// The sliding-window layers' (ModelConfig::sliding_rope), and its last device's copy.
  at::Tensor sliding_inv_freq_, sliding_inv_freq_device_;
  bool gradient_checkpointing_ = false;
  int64_t loss_chunk_ = 0;
  bool fused_loss_ = false;
  bool fused_rope_ = false;
  bool fused_swiglu_ = false;
  bool flash_sinks_ = false;
  bool shared_input_cast_ = true;
};
TORCH_MODULE(CausalLM);

/// Rotary inverse frequencies for `config` (default, linear, llama3 and longrope scaling), float32,
/// (rotary_dim/2). longrope: the short factors', or with `long_factors` the long ones'.
at::Tensor rope_inv_freq(const ModelConfig& config, bool long_factors = false);
/// The same for one rotary embedding `rope` turning `dim` dimensions of each head.
at::Tensor rope_inv_freq(const io::RopeConfig& rope, int64_t dim, bool long_factors = false);
/// silu(gate) ⊙ up for gate and up side by side in one tensor, gate_up = [gate | up] (…, 2·I), as
/// grouped projections compute them (adapt::set_lora_group_projections): the same values as
/// at::silu(gate) * up on its halves, bit for bit, and gradients written straight into one
/// (…, 2·I) tensor, the layout of the grouped node's output gradient (the halves' two gradients
/// would be joined by a copy). silu(gate) is recomputed in the backward pass; gate_up is kept.
/// `fused_kernel`: on CUDA, through the fused SwiGLU kernel (ft/kernels/swiglu.h, as
/// CausalLMImpl::set_fused_swiglu), which reads the halves in place and writes the gradient's; its
/// values are then the kernel's on separate gate and up. Ignored on the CPU.
/// `act` GeluTanh or Gelu: gelu(gate) ⊙ up (Gemma's GeGLU, tanh-approximated or exact), likewise,
/// with no kernel.
at::Tensor swiglu_packed(const at::Tensor& gate_up, bool fused_kernel = false, io::Activation act = io::Activation::Silu);

/// Gemma 2's attention with soft-capped scores, as transformers' eager attention computes it (no
/// fused attention soft-caps): scores = q·kᵀ · scale, then cap · tanh(scores / cap), masked, a
/// float32 softmax cast back to the compute dtype (autocast's where it is on, else q's), times v;
/// each key/value head serves its group of query heads. q (B, H, T, D), k and v (B, G, S, D);
/// `mask` (B or 1, 1, T, S) bool, true where a query may see a key, or undefined: causal
/// (`causal`, T = S) or none. Returns (B, H, T, D) in the compute dtype. Keeps only q, k, v and the
/// mask for the backward pass, which recomputes the scores; both passes work through blocks of
/// query rows whose scores hold at most `max_scores` elements (at least one row).
at::Tensor softcapped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                bool causal, double scale, double cap, int64_t max_scores = int64_t{1} << 26);
/// softcapped_attention's computation with each part optional: `cap` 0 leaves the scores uncapped;
/// `sinks` (H), where defined, are gpt-oss's attention sinks, one logit per query head joined to
/// each row's scores in the softmax and dropped after it (transformers' eager_attention_forward),
/// so that a row's probabilities sum to less than one. The sinks get their gradient.
at::Tensor materialized_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                  bool causal, double scale, double cap, const at::Tensor& sinks,
                                  int64_t max_scores = int64_t{1} << 26);

/// Attention with gpt-oss's sinks (`sinks` (H), as materialized_attention takes them) through flash
/// attention, which never materialises the scores: a row's softmax over its keys and its sink is the
/// softmax over its keys times g = sigmoid(lse − sink), lse the row's log-sum-exp that flash attention
/// returns. The backward pass is flash attention's own, given g·dy as the output gradient and g·o as
/// the output: then its D = Σ dy·o term is the one the sink's column needs (g² · Σ dy'·o), and
/// dsink = −Σ (Σ dy'·o) · g(1 − g) over the rows.
///   CPU: q (B, H, T, D), k and v (B, G, S, D), `mask` (B or 1, 1, T, S) bool or undefined (causal or
///   none), through ATen's CPU flash kernel, in the compute dtype (autocast's where it is on);
///   returns (B, H, T, D). `window` must be 0 (windows come in the mask).
///   CUDA (bf16 or fp16): q (B, T, H, D), k and v (B, T, G, D), or with `cu_seqlens` (packed runs,
///   causal within each) (N, H, D) and (N, G, D); no mask; `window` > 0 keeps the keys within that
///   many positions; returns q's layout.
at::Tensor sink_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                bool causal, double scale, const at::Tensor& sinks, int64_t window = 0,
                                const at::Tensor& cu_seqlens = {}, int64_t max_seqlen = 0);

/// Initialises weights as HF does for a fresh model (normal(0, initializer_range) for linears and
/// embeddings, ones for norms (zeros for Gemma's offsets from one), zeros for biases), from `seed`.
void init_weights(CausalLM& model, uint64_t seed);

/// Token-mean causal LM loss as HF computes it: logits[:, :-1] predict labels[:, 1:]; positions with
/// label `ignore_index` do not count. Returns the mean over counted tokens, float32.
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index = -100);
/// The same shifted cross-entropy, summed over the counted tokens (for normalising by the target
/// count of a whole optimizer step, see ft/train/step.h).
/// `fused`: through cross_entropy_sum's kernels where they apply (CausalLMImpl::fused_loss).
at::Tensor causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index = -100,
                              bool fused = false);
/// Σ over rows of the cross-entropy of logits (N, V) against targets (N), rows whose target is
/// `ignore_index` not counted, in float32 (float64 for float64 logits). With `fused` on CUDA
/// (contiguous float32/bf16/fp16 logits, int64 targets): the fused kernels, one pass over the logits
/// forward (the row's log-sum-exp kept) and one backward writing the gradient in the logits' dtype;
/// a target outside [0, V) gives NaN. Otherwise ATen's cross_entropy on the logits cast to float32.
at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, bool fused);
/// causal_lm_loss_sum(model->logits(hidden), labels) without ever holding more than `chunk` rows of
/// logits: hidden (B, T, E) goes through the output head `chunk` token rows at a time, each chunk's
/// logits (and their float32 copy) freed after its loss is taken. With a large vocabulary the
/// (B·T, V) logits, their float32 copy and their gradient are the largest tensors of a step (at
/// 128k words and 8192 tokens, 2 + 4 + 4 GiB); chunked, they take chunk/(B·T) of that. The backward
/// pass recomputes each chunk's logits (one more output-head GEMM, as activation checkpointing
/// does for a block) and differentiates it with respect to hidden and the head's trainable
/// parameters (their gradients summed over the chunks, then passed on once). The same value up to
/// the order of the float32 sum; the same gradients up to rounding.
at::Tensor chunked_lm_loss_sum(CausalLMImpl& model, const at::Tensor& hidden, const at::Tensor& labels, int64_t chunk,
                               int64_t ignore_index = -100);

/// The routers' load-balancing loss of a mixture of experts (Switch Transformer's, as transformers'
/// load_balancing_loss_func computes it for Mixtral, Qwen2-MoE and Qwen3-MoE): over every layer's
/// router logits (ForwardOptions::router_logits) together, with f_e the share of (token, top-k slot)
/// choices that went to expert e and P_e its mean softmax probability, both per token-layer row,
/// num_experts × Σ_e f_e·P_e (top_k when perfectly balanced). `token_mask` (B, T), 1 = token,
/// 0 = padding, where given, keeps the padding out of both means. A float32 scalar whose gradient
/// reaches the routers through P (the choices f are counts).
at::Tensor load_balancing_loss(const std::vector<at::Tensor>& router_logits, int64_t num_experts, int64_t top_k,
                               const at::Tensor& token_mask = {});

}  // namespace ft::model
