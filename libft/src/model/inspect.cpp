#include "ft/model/inspect.h"

#include <algorithm>
#include <iomanip>
#include <sstream>

namespace ft::model {
namespace {

std::string kind_of(const std::string& name) {
  if (name.find("embed_tokens") != std::string::npos) return "embed_tokens";
  if (name.find("self_attn") != std::string::npos) return "attention";
  if (name.find(".mlp.") != std::string::npos || name.find(".block_sparse_moe.") != std::string::npos) return "mlp";
  if (name.find("norm") != std::string::npos) return "norm";
  if (name.starts_with("lm_head")) return "lm_head";
  return "other";
}

std::string human_count(int64_t n) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2);
  if (n >= 1'000'000'000) os << n / 1e9 << "B";
  else if (n >= 1'000'000) os << n / 1e6 << "M";
  else if (n >= 1'000) os << n / 1e3 << "K";
  else os << n;
  return os.str();
}

std::string human_bytes(int64_t n) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2);
  if (n >= (1ll << 30)) os << n / double(1ll << 30) << " GiB";
  else if (n >= (1ll << 20)) os << n / double(1ll << 20) << " MiB";
  else if (n >= (1ll << 10)) os << n / double(1ll << 10) << " KiB";
  else os << n << " B";
  return os.str();
}

}  // namespace

ParameterSummary summarize_parameters(CausalLM& m) {
  ParameterSummary s;
  for (const auto& item : m->named_parameters()) {
    const at::Tensor& p = item.value();
    const int64_t n = p.numel();
    s.total += n;
    if (p.requires_grad()) s.trainable += n;
    s.bytes += n * static_cast<int64_t>(p.element_size());
    s.by_kind[kind_of(item.key())] += n;
    s.by_dtype[c10::toString(p.scalar_type())] += n;
  }
  return s;
}

std::string describe(CausalLM& m) {
  const auto& c = m->config();
  const ParameterSummary s = summarize_parameters(m);
  std::ostringstream os;
  auto rope_name = [](const io::RopeConfig& r) {
    return r.type == io::RopeType::Default  ? "default"
           : r.type == io::RopeType::Linear ? "linear"
           : r.type == io::RopeType::Llama3 ? "llama3"
           : r.type == io::RopeType::Yarn   ? "yarn"
                                            : "longrope";
  };
  os << "architecture   " << c.model_type << " (" << c.num_hidden_layers << " layers, hidden " << c.hidden_size
     << ", intermediate " << c.intermediate_size << ", vocab " << c.vocab_size << ")\n";
  if (!c.image_text_architecture.empty()) {
    os << "image-text     the language model of a " << c.image_text_architecture
       << " (the vision tower is not loaded; saves as Gemma3ForCausalLM)\n";
  }
  os << "attention      " << c.num_attention_heads << " query heads, " << c.num_key_value_heads << " key/value heads"
     << ", head_dim " << c.head_dim << (c.qkv_bias ? ", q/k/v bias" : "") << (c.o_bias ? ", o bias" : "")
     << (c.qk_norm() ? c.qk_norm_full_width() ? ", q/k norms over all heads" : ", q/k norms" : "")
     << (c.packed_projections() ? ", q/k/v packed in qkv_proj" : "");
  if (c.clip_qkv > 0) os << ", q/k/v clamped to +-" << c.clip_qkv;
  if (c.query_pre_attn_scalar > 0) os << ", scores scaled by 1/sqrt(" << c.query_pre_attn_scalar << ")";
  if (c.attn_logit_softcapping > 0) os << ", scores soft-capped at " << c.attn_logit_softcapping;
  if (c.attention_sinks()) os << ", attention sinks (a learned logit per head)";
  os << "\n";
  os << "mlp            "
     << (c.hidden_act == io::Activation::GeluTanh ? "GeGLU (tanh-GELU gate)"
         : c.hidden_act == io::Activation::Gelu   ? "GeGLU (exact GELU gate)"
                                                  : "SwiGLU")
     << (c.mlp_bias || c.gpt_oss() ? ", biases" : "") << (c.packed_projections() ? ", gate/up packed in gate_up_proj" : "");
  if (c.swiglu_limit > 0) os << ", gate · sigmoid(1.702 · gate) · (up + 1), clamped at " << c.swiglu_limit;
  os << "\n";
  if (c.num_experts > 0) {
    int64_t sparse = 0;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) sparse += c.moe_in_layer(i) ? 1 : 0;
    os << "experts        " << c.num_experts << " of " << c.moe_intermediate_size << " units, " << c.num_experts_per_tok
       << " per token" << (c.norm_topk_prob ? " (weights renormalised)" : "")
       << (c.gpt_oss() ? " (weights: the softmax of the top logits; router biases)" : "") << ", in " << sparse << " of "
       << c.num_hidden_layers << " layers";
    if (c.shared_expert_intermediate_size > 0) os << ", and a gated shared expert of " << c.shared_expert_intermediate_size << " units";
    if (c.mxfp4_experts) os << "; stored in MXFP4 (dequantized on load)";
    os << "\n";
  }
  int64_t window = 0;
  for (auto w : c.layer_window) window = std::max(window, w);
  os << "positions      rope " << rope_name(c.rope) << " (theta " << c.rope.theta;
  if (c.rope.type != io::RopeType::Default) os << ", factor " << c.rope.factor;
  if (c.rope.type == io::RopeType::LongRope) {
    os << ", long factors past " << c.rope.original_max_position_embeddings << " positions, cos/sin x "
       << c.rope.attention_factor;
  }
  if (c.rope.type == io::RopeType::Yarn) {
    os << ", original context " << c.rope.original_max_position_embeddings << ", cos/sin x " << c.rope.attention_factor;
  }
  if (c.rotary_dim() < c.head_dim) os << ", turning " << c.rotary_dim() << " of " << c.head_dim << " dims";
  os << "), max " << c.max_position_embeddings;
  if (!c.layer_rope.empty()) {
    const auto nope = std::count(c.layer_rope.begin(), c.layer_rope.end(), false);
    os << ", no rotary embedding (NoPE) in " << nope << " of " << c.num_hidden_layers << " layers";
  }
  if (window > 0) {
    const auto local = std::count_if(c.layer_window.begin(), c.layer_window.end(), [](int64_t w) { return w > 0; });
    os << ", sliding window " << window << " in " << local << " of " << c.num_hidden_layers << " layers";
    if (c.sliding_rope) {
      os << " (their rope " << rope_name(*c.sliding_rope) << ", theta " << c.sliding_rope->theta;
      if (c.sliding_rope->type != io::RopeType::Default) os << ", factor " << c.sliding_rope->factor;
      os << ")";
    }
  }
  os << "\n";
  if (c.scaled_embeddings() || c.final_logit_softcapping > 0 || c.sandwich_norms()) {
    os << "gemma          ";
    os << "embeddings x sqrt(" << c.hidden_size << "), norms x (1 + w)"
       << (c.sandwich_norms() ? " around both sublayers" : "");
    if (c.final_logit_softcapping > 0) os << ", logits soft-capped at " << c.final_logit_softcapping;
    os << "\n";
  }
  if (c.olmo()) os << c.model_type << "          norms on the sublayers' outputs (no input norms), q/k norms over all heads\n";
  if (c.granite()) {
    os << "granite        embeddings x " << c.embedding_multiplier << ", scores x " << c.attention_multiplier
       << ", sublayer outputs x " << c.residual_multiplier << ", logits / " << c.logits_scaling << "\n";
  }
  if (c.residual_dropout > 0) os << "dropout        " << c.residual_dropout << " on sublayer outputs in training\n";
  os << "lm head        " << (c.tie_word_embeddings ? "tied to embed_tokens" : "separate") << "\n";
  os << "parameters     " << human_count(s.total) << " (" << s.total << "), trainable " << human_count(s.trainable)
     << "\n";
  for (const auto& [kind, n] : s.by_kind) {
    os << "  " << std::left << std::setw(13) << kind << std::right << std::setw(14) << n << "  " << std::fixed
       << std::setprecision(1) << std::setw(5) << 100.0 * n / std::max<int64_t>(s.total, 1) << "%\n";
  }
  os << "dtypes        ";
  for (const auto& [dtype, n] : s.by_dtype) os << " " << dtype << ": " << n;
  os << "\n";
  os << "memory         " << human_bytes(s.bytes) << " of parameters\n";
  return os.str();
}

}  // namespace ft::model
