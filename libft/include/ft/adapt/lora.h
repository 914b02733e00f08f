#pragma once
// LoRA (Hu et al. 2021) on libft's linear layers, with Hugging Face PEFT's semantics and files.
//
// A targeted layer computes  y = x Wᵀ + b + scale · B(A(dropout(x)))  with A: r × in, B: out × r,
// scale = alpha / r (or alpha / √r with rsLoRA). A is initialised as PEFT does by default
// (kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in)) or "gaussian" (N(0, 1/r)); B starts at zero,
// so the adapted model starts exactly as the base. The base weights are frozen.
//
// TARGETS, as PEFT matches target_modules: a list of names matches a module whose name equals one
// or ends with "." + one ("q_proj" matches model.layers.3.self_attn.q_proj); a single string is a
// regular expression that must match the whole module name; "all-linear" is every linear layer but
// the output head. As in PEFT, layers_to_transform keeps the targets matched by suffix (or by
// all-linear) to the layers it lists, the layer being the number after the first "<pattern>." of
// layers_pattern (with none, after the first dotted segment: model.layers.3 → 3); a module that
// modules_to_save names, or one inside it, is never a target, and neither is one that
// exclude_modules names (a list: the name or a "."-suffix of it; a string: a regular expression
// matching the whole name), PEFT's check_target_module_exists in that order. rank_pattern / alpha_pattern map a regular expression to a rank / alpha for the
// modules whose name matches "(.*\.)?(pattern)$" (the first matching pattern wins), as in PEFT.
//
// FILES (PEFT's): adapter_config.json ({"peft_type": "LORA", "r", "lora_alpha", "target_modules",
// "rank_pattern", "alpha_pattern", "use_rslora", ...}) and adapter_model.safetensors with keys
// "base_model.model.<module>.lora_A.weight" / ".lora_B.weight". Loading is strict: a PEFT option
// libft does not implement (bias training, fan_in_fan_out, lora_bias, ...), a target
// that matches nothing, a missing, unexpected or misshapen tensor is an error naming it.
//
// MODULES_TO_SAVE, as PEFT's: modules trained in full beside the adapters (typically lm_head and
// embed_tokens, for new tokens or a new head). An entry matches every module whose name ends with it
// (PEFT's plain suffix test: "norm" also matches each block's input_layernorm); the adapter file
// holds their whole parameters under "base_model.model.<module>.<parameter>", and loading it puts
// them in place of the base's. On a model whose output head is its embeddings (tie_word_embeddings),
// an entry that names lm_head or embed_tokens unties them first, as PEFT does: the model gets an
// lm_head of its own, a copy of the embeddings, and the named one trains while the other stays the
// base's (the merged checkpoint is then untied). Refused: an entry that matches nothing, a module
// that is also a LoRA target or holds one, and an NF4-quantized layer.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ft/model/llama.h"

namespace ft::adapt {

struct LoraOptions {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  /// Module names or suffixes (see TARGETS); {"all-linear"} for every linear layer but lm_head.
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  /// A single regular expression instead of `targets` (PEFT's string form), if not empty.
  std::string target_regex;
  bool rslora = false;          ///< scale alpha/√r instead of alpha/r
  /// DoRA (Liu et al. 2024, PEFT's use_dora): a trained magnitude m per output row rescales the
  /// adapted weight, W' = m ⊙ (W + ΔW) / ||W + ΔW||_row, the norms treated as constants in backward.
  bool dora = false;
  /// PEFT's bias: which of the base's biases train beside the adapters and travel in the adapter
  /// file, under PEFT's keys (an adapted layer's as <layer>.base_layer.bias, the others' as
  /// <layer>.bias): "none", "all" (every linear layer's but those modules_to_save trains in full) or
  /// "lora_only" (the adapted layers'). Not with target_parameters (PEFT's expert adapters).
  std::string bias = "none";
  std::string init = "kaiming"; ///< kaiming (PEFT's default) | gaussian
  uint64_t seed = 0;            ///< for A's initialisation
  /// Ordered (pattern, value) overrides; see TARGETS.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  /// Modules trained in full beside the adapters (see MODULES_TO_SAVE), e.g. {"lm_head"}.
  std::vector<std::string> modules_to_save;
  /// Only these layers' matches, if not empty (see TARGETS; PEFT's layers_to_transform).
  std::vector<int64_t> layers_to_transform;
  /// Where a module name's layer index is (PEFT's layers_pattern, e.g. {"layers"}); see TARGETS.
  std::vector<std::string> layers_pattern;
  /// Modules never adapted, by name or suffix (PEFT's exclude_modules list); see TARGETS.
  std::vector<std::string> exclude_modules;
  /// PEFT's exclude_modules string form: a regular expression over the whole name, if not empty.
  std::string exclude_regex;
  /// PEFT's target_parameters: transformers 5's 3-D expert weights of a mixture of experts, by name
  /// or suffix ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", or a whole
  /// "model.layers.N.mlp.experts.down_proj"); see EXPERT PARAMETERS. Only those two.
  std::vector<std::string> target_parameters;
  /// "all-linear" as PEFT takes it on transformers 5's modules (read_peft_lora_config sets it): a
  /// mixture of experts' experts are 3-D parameters there, not linear layers (target_parameters
  /// adapts them), and of its routers only Qwen2-MoE's shared_expert_gate is an nn.Linear. libft's
  /// own all-linear adapts every expert and no router.
  bool all_linear_as_peft = false;
};

/// The parameters that `modules_to_save` trains in full, by model name ("lm_head.weight"), in model
/// order. Throws ft::Error for the refusals of MODULES_TO_SAVE (LoRA targets are checked by
/// apply_lora, which calls this), and for a tied model that untie_for_modules_to_save has not untied.
std::vector<std::pair<std::string, at::Tensor>> modules_to_save_parameters(model::CausalLM& model,
                                                                         const std::vector<std::string>& entries);

/// One adapted layer.
struct LoraLayer {
  std::string module;  ///< "model.layers.0.self_attn.q_proj"
  int64_t r = 0;
  double alpha = 0.0, scale = 0.0;
  /// The layer whose lora_A parameter holds this layer's A: `module`, but for an expert's up
  /// projection adapted through PEFT's gate_up_proj (target_parameters), whose A is its gate
  /// projection's, one parameter trained by both as PEFT's one A is.
  std::string a_owner;
};

/// Adds LoRA to the targeted layers of `model` (which must have none yet), freezes every other
/// parameter, and returns the adapted layers in model order. Throws ft::Error when a target matches
/// no layer or an option is out of range.
std::vector<LoraLayer> apply_lora(model::CausalLM& model, const LoraOptions& options);

/// Whether the module named `name` is a mixture of experts' router: model.layers.N.block_sparse_moe.gate
/// (Mixtral), model.layers.N.mlp.gate (Qwen2/3-MoE, OLMoE), mlp.router (gpt-oss), or Qwen2-MoE's
/// mlp.shared_expert_gate. all-linear leaves routers alone (a low-rank change to a router moves tokens between experts), and QLoRA keeps
/// their few weights unquantized.
bool is_router(const std::string& name);

/// The adapted layers of `model` (empty when it has no LoRA).
std::vector<LoraLayer> lora_layers(model::CausalLM& model);

/// W += scale · B A in every adapted layer, after which the adapters are bypassed (merged() is
/// true); unmerge_lora() subtracts it again. Merging twice or unmerging unmerged layers is an error.
void merge_lora(model::CausalLM& model);
void unmerge_lora(model::CausalLM& model);
bool lora_merged(model::CausalLM& model);
/// Sets the dropout of every adapter (training only).
void set_lora_dropout(model::CausalLM& model, double dropout);
/// FUSED TRAINING PATH. In training (train mode, gradients on), a LoRA layer (not merged) runs as
/// one autograd node with its backward written out:
///   s S = s drop(x) Aᵀ (s: the GEMM's alpha);  y = b + (s S) Bᵀ, then y += x Wᵀ (the base GEMM
///   accumulates, beta = 1)
///   dS = s dy B;  dB = s dyᵀ S;  dA = dSᵀ drop(x);  dx = drop'(dS A), then dx += dy W
/// (on float32 CPU tensors the oneDNN base product comes first and the low-rank term is added to
/// it, since oneDNN's linear cannot accumulate)
/// instead of PEFT's chain, which writes B(A(x)), its scaled copy and the sum as separate (…, out)
/// tensors and adds a separate (…, in) gradient. W (dense, or NF4 dequantized again) is not saved.
/// DoRA likewise: y = b + c ⊙ Z with Z = x Wᵀ + s S Bᵀ and c = m / ||W + s B A||_row (a constant, as
/// in PEFT); dm = Σ_rows dy ⊙ Z / ||·||, and the rest as above with dZ = dy ⊙ c. With dropout PEFT
/// multiplies W by both x and its dropped-out copy h, y = x Wᵀ + b + (c − 1) ⊙ h Wᵀ + c ⊙ s (h Aᵀ) Bᵀ;
/// the fused node computes it as (x − h) Wᵀ + c ⊙ Z + b with Z = h Wᵀ + s S Bᵀ (two GEMMs with W, as
/// PEFT's chain, and its backward pass two, dx = dy W + drop'((dy ⊙ (c − 1)) W + dS A)).
/// Dropout: on CUDA at::dropout's own kernel; on the CPU lora_dropout_noise (below), because
/// at::dropout's serial Bernoulli draws cost a third of a LoRA step there. Evaluation and inference keep the unfused path,
/// whose logits equal PEFT's bit for bit. On by default; off gives the plain autograd chain (for
/// comparisons and benchmarks).
void set_lora_fused(model::CausalLM& model, bool fused);
/// The fused path's base GEMM extended by the rank, off by default until the GPU benchmarks
/// (BM_LoraLinear mode 4 beside mode 2) decide. Where the input needs a cast to the compute dtype
/// anyway (float32 activations under bf16 autocast) and W is stored in that dtype (as the trainer
/// stores a frozen base under autocast), the cast writes x into the first `in` columns of a
/// (T, in + r) buffer, s S = s drop(x) Aᵀ goes into its last r columns, and one GEMM over
/// K = in + r,
///   y = [x | s S] [W | B]ᵀ (+ b),
/// gives the output: no (T, out) low-rank product is written and read back (two memory-bound
/// passes over y, for r/in ≈ 0.4% more multiply-adds). W then lives in the first `in` columns of
/// an (out, in + r) buffer whose last r columns receive B (cast) at every forward, and the layer's
/// "weight" parameter becomes a (strided) view of it, so the base is still stored once. The
/// backward pass extends N the same way: dy [W | B] = [dy W | dy B] in one GEMM reads dy once for
/// the base input gradient and dS (no separate dy B GEMM, no (T, in) low-rank product written and
/// read back), then dx = dy W + s (dy B) A in place and dA = s (dy B)ᵀ drop(x).
/// QLoRA (an NF4 base) too: its W is decoded at every pass anyway, so each pass decodes it straight
/// into the first `in` columns of an (out, in + r) buffer of its own (the kernel writes the strided
/// rows: no copy), which is freed after the GEMM, as the split path frees its decoded W.
/// Other calls (inputs already in the compute dtype, DoRA) keep the split GEMMs. Turning
/// it off gives each extended weight contiguous storage of its own again. Since the cast is where
/// [x | s S] is written, an extended layer takes the float32 input: its group of projections (q, k,
/// v; gate, up) then keeps its own casts instead of the model's shared one
/// (model::CausalLMImpl::set_shared_input_cast); the row kernels likewise.
void set_lora_extended_gemm(model::CausalLM& model, bool on);
/// The fused path's memory-bound passes with the rank-r products folded in (ft/kernels/lora_rows.h),
/// off by default until the GPU benchmarks (BM_LoraLinear modes 5 and 6 beside 2 and 4) decide.
/// Where x is float32 under bf16/fp16 autocast on CUDA, r ∈ {4, 8, 12, 16, 24, 32} (for a group, the
/// summed rank) and the widths are multiples of 8: the forward cast of x and s S = s drop(x) Aᵀ
/// take one pass over x (S from the cast values in registers, not a second read), and the backward
/// pass writes
/// dx = float32(dy W) + s drop'((dy B) A) once (no bf16 read-modify-write of dx before its
/// conversion, and no bf16 rounding of the sum). Dropout happens inside the kernels: the mask is
/// drawn there from Philox counters (ft/kernels/philox.h) and redrawn in the backward pass, so
/// neither a dropped copy of x nor a mask is written in the forward pass or kept for the backward
/// one (the dropped copy that dA = dSᵀ drop(x) reads is made in the backward pass and freed after
/// it), and the saved activations are those of a layer without dropout. With either GEMM layout
/// (split or extended), and in DoRA's fused node (without dropout); other calls keep the ATen path.
void set_lora_row_kernels(model::CausalLM& model, bool on);
/// The fused path's projections that read the same input (q, k and v; gate and up) as one node,
/// off by default until the GPU benchmarks (BM_LoraLinear's grouped rows, BM_LoraStep's) decide.
/// Their weights are stacked into one buffer (each layer's "weight" parameter becomes a view of its
/// rows: the base is still stored once) and the node is the fused layer's with A = [A_q; A_k; A_v]
/// and B block-diagonal: one GEMM gives q, k and v (column views of one output; the extended GEMM's
/// [x | s S] [W | B]ᵀ likewise), one gives dx from all three output gradients, and the rank-r
/// products are one GEMM each at rank R = r_q + r_k + r_v instead of three: x and dy are read once
/// for them, and the small projections of grouped-query attention (k, v) no longer run as GEMMs of
/// their own with too few output tiles to fill a GPU. A projection without an adapter joins the
/// group frozen (a zero block of B), so PEFT's default targets (q_proj, v_proj) group too. The
/// gradients of A and B are those of separate layers; dB's blocks off the diagonal are computed and
/// dropped (R/r times a small GEMM's work). With dropout each adapter keeps a mask of its own (as
/// PEFT's separate dropout modules): its block of S is drop_i(x) A_iᵀ, one small GEMM per block, and
/// the row kernels, which draw one mask, are not used (so each block keeps its dropped copy and mask
/// for the backward pass: more activation memory than separate layers on the row kernels, which
/// keep neither). Where a group member cannot take it (DoRA, another dropout than the others', a
/// merged or unfused adapter, a trainable base, mixed storage), each layer runs on its own.
/// Turning it off gives each weight contiguous storage of its own again.
void set_lora_group_projections(model::CausalLM& model, bool on);
/// The fused path's adapter gradients dA = dSᵀ drop(x) and dB = dyᵀ (s S) as `splits` partial
/// GEMMs over equal chunks of the tokens (one batched GEMM, float32 partials, summed in a fixed
/// order) instead of one GEMM each: split-K, for the shapes where one GEMM has too few output tiles
/// to fill the GPU (r × in and out × r outputs, a reduction over a few thousand tokens). 1 (the
/// default) is one GEMM; where the token count does not divide by `splits`, one GEMM too. Off by
/// default until the GPU benchmarks (BM_LoraOp's split rows beside the single GEMMs) decide.
/// LoRA and DoRA, either GEMM layout. splits ∈ [1, 64].
void set_lora_grad_splits(model::CausalLM& model, int64_t splits);
/// The product behind those gradients, scale · a b in dtype `out` (a: (M, K), b: (K, N), K the
/// tokens), as the fused backward pass computes it with `splits` chunks (1: one GEMM); for benchmarks.
at::Tensor adapter_grad_mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out, double scale, int64_t splits);
/// The fused path's dropout noise on the CPU: a tensor shaped and typed like `x` holding 0 with
/// probability p and 1/(1 − p) otherwise. Counter-based: element i is decided by 32 bits of
/// SplitMix64(seed + ⌈(i+1)/2⌉·γ), filled in parallel, where `seed` is one 64-bit draw from the
/// default CPU generator, so that manual_seed and a checkpoint's generator state reproduce it
/// (p is resolved to 2⁻³²).
at::Tensor lora_dropout_noise(const at::Tensor& x, double p);
/// ||W + scale · B A|| per output row (W: (out, in) as stored, A: (r, in), B: (out, r)), as DoRA's
/// fused training node takes it, without forming W + scale · B A (out × in in float32, plus a float32
/// copy of W: ~26 bytes per weight and step through memory, as PEFT's get_weight_norm does it):
///   ||W_i + s (B A)_i||² = ||W_i||² + 2 s Σ_k B_ik (W Aᵀ)_ik + s² Σ_k (B (A Aᵀ))_ik B_ik,
/// one (out, r) GEMM that reads W once (a bf16/fp16 W on CUDA against A split into two halves of W's
/// dtype with float32 accumulation, A's precision kept within 2⁻¹⁶), the rest (out, r) and (r, r)
/// work. `w_sq`: ||W_i||² if known (the adapter computes it once per frozen base). float64 for a
/// float64 W, else float32; autocast does not apply.
at::Tensor dora_row_norm(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                         const at::Tensor& w_sq = {});
/// Merges (unless merged) and removes the adapters: a plain model again, for save_pretrained.
void merge_and_unload_lora(model::CausalLM& model);

/// Unties a tied model (CausalLMImpl::untie_embeddings) when `entries` name lm_head or
/// embed_tokens, as apply_lora, load_peft_adapter and check_peft_adapter do; true if it did.
bool untie_for_modules_to_save(model::CausalLM& model, const std::vector<std::string>& entries);

/// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (the LoRA tensors, and the
/// parameters of options.modules_to_save).
/// `base_model` is recorded as base_model_name_or_path.
void save_peft_adapter(model::CausalLM& model, const LoraOptions& options, const std::string& dir,
                       const std::string& base_model = "");

/// Reads a PEFT LoRA adapter_config.json (see FILES for what is refused).
LoraOptions read_peft_lora_config(const std::string& path);

/// Every problem of the adapter in `dir` for `model`, without applying it: an unreadable or
/// unsupported config, targets that match no layer, tensors missing, unexpected, misshapen, of a
/// non-float dtype or holding NaN/Inf. Empty when load_peft_adapter() would succeed. Unties a tied
/// model as loading would (see MODULES_TO_SAVE).
std::vector<std::string> check_peft_adapter(model::CausalLM& model, const std::string& dir);

/// Applies the adapter in `dir` to `model` (apply_lora with its config, then its tensors, strictly).
LoraOptions load_peft_adapter(model::CausalLM& model, const std::string& dir);

}  // namespace ft::adapt
