#include "ft/io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::io {
namespace {

using nlohmann::json;

// Keys every transformers PretrainedConfig may write that do not change a decoder-only model's
// forward pass. Anything not here and not parsed below is rejected: a key we do not know might.
const std::set<std::string> kHarmlessKeys = {
    "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pretraining_tp", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "torchscript", "pruned_heads", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    "use_bfloat16", "model_type", "max_window_layers", "use_sliding_window", "auto_map",
    "cache_implementation", "sliding_window_size"};

bool supported_model_type(const std::string& t) {
  return t == "llama" || t == "mistral" || t == "qwen2" || t == "qwen3" || t == "granite" || t == "gemma" ||
         t == "gemma2" || t == "gemma3_text" || t == "phi3" || t == "smollm3" || t == "olmo2" ||
         t == "olmo3" || t == "mixtral" || t == "qwen2_moe" || t == "qwen3_moe" || t == "olmoe" || t == "gpt_oss";
}

constexpr const char* kSupportedTypes =
    "llama, mistral, qwen2, qwen3, granite, gemma, gemma2, gemma3_text, phi3, smollm3, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss";

void check_model_type(const std::string& t, const std::string& source) {
  // Gemma 3's larger checkpoints are the multimodal Gemma3ForConditionalGeneration ("gemma3"), whose
  // language model sits under text_config; their text-only siblings (270m, 1b) are gemma3_text.
  FT_CHECK(t != "gemma3", "[config] ", source,
           ": model_type 'gemma3' (Gemma3ForConditionalGeneration, an image-text model) needs its language model's "
           "settings in 'text_config'");
  FT_CHECK(supported_model_type(t), "[config] ", source, ": model_type '", t, "' is not supported (supported: ",
           kSupportedTypes, ")");
}

struct Reader {
  const json& j;
  const std::string& source;
  std::set<std::string> used;

  bool has(const std::string& key) const { return j.contains(key) && !j.at(key).is_null(); }

  const json& get(const std::string& key) {
    used.insert(key);
    FT_CHECK(j.contains(key), "[config] ", source, ": missing required key '", key, "'");
    return j.at(key);
  }
  int64_t integer(const std::string& key) {
    const json& v = get(key);
    FT_CHECK(v.is_number_integer(), "[config] ", source, ": '", key, "' must be an integer, got ", v.dump());
    return v.get<int64_t>();
  }
  int64_t integer_or(const std::string& key, int64_t fallback) {
    used.insert(key);
    return has(key) ? integer(key) : fallback;
  }
  double number_or(const std::string& key, double fallback) {
    used.insert(key);
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    FT_CHECK(v.is_number(), "[config] ", source, ": '", key, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  bool boolean_or(const std::string& key, bool fallback) {
    used.insert(key);
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    FT_CHECK(v.is_boolean(), "[config] ", source, ": '", key, "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string string_or(const std::string& key, const std::string& fallback) {
    used.insert(key);
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    FT_CHECK(v.is_string(), "[config] ", source, ": '", key, "' must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  std::optional<int64_t> optional_integer(const std::string& key) {
    used.insert(key);
    if (!has(key)) return std::nullopt;
    return integer(key);
  }
};

// What a rotary embedding's parameters may need from the rest of the config.
struct RopeContext {
  explicit RopeContext(int64_t max_position_embeddings) : max_pos(max_position_embeddings) {}
  int64_t max_pos = 0;  ///< max_position_embeddings
  /// Phi-3's top-level original_max_position_embeddings (Phi3Config's default 4096), which
  /// transformers puts over the rope parameters' own; unset for the other families.
  std::optional<int64_t> original_max;
  /// Where the parameters may carry partial_rotary_factor (transformers 5 writes Phi-3's there):
  /// set to it when they do. Elsewhere the key must say 1.
  std::optional<double>* partial = nullptr;
};

// A list of numbers, each finite and > 0 (longrope's factors).
std::vector<double> positive_numbers(const json& v, const std::string& where, const char* key) {
  FT_CHECK(v.is_array() && !v.empty(), "[config] ", where, ": '", key, "' must be a list of numbers, got ", v.dump());
  std::vector<double> out;
  for (const auto& x : v) {
    FT_CHECK(x.is_number() && std::isfinite(x.get<double>()) && x.get<double>() > 0, "[config] ", where, ": '", key,
             "' must hold numbers > 0, got ", x.dump());
    out.push_back(x.get<double>());
  }
  return out;
}

// An optional number of a rope's parameters: `fallback` where it is absent or null.
double optional_number(const json& params, const char* key, double fallback, const std::string& where) {
  if (!params.contains(key) || params.at(key).is_null()) return fallback;
  const json& v = params.at(key);
  FT_CHECK(v.is_number() && std::isfinite(v.get<double>()), "[config] ", where, ": '", key,
           "' must be a finite number, got ", v.dump());
  return v.get<double>();
}

// YaRN (transformers' _compute_yarn_parameters): factor (null: max_position_embeddings over the
// original context), original_max_position_embeddings (default: max_position_embeddings, as
// transformers' standardisation fills it), and the optional attention_factor, beta_fast,
// beta_slow, mscale, mscale_all_dim and truncate.
void parse_yarn(const json& params, const RopeContext& ctx, const std::string& where, RopeConfig& rope,
                std::set<std::string>& allowed) {
  rope.type = RopeType::Yarn;
  for (const char* key : {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "truncate"}) {
    allowed.insert(key);
  }
  FT_CHECK(params.contains("factor"), "[config] ", where, ": rope type 'yarn' needs 'factor'");
  const double original = optional_number(params, "original_max_position_embeddings",
                                          static_cast<double>(ctx.max_pos), where);
  FT_CHECK(original >= 1 && original == std::floor(original) && original < 0x1p53, "[config] ", where,
           ": 'original_max_position_embeddings' must be a whole number > 0, got ", original);
  rope.original_max_position_embeddings = static_cast<int64_t>(original);
  rope.factor = optional_number(params, "factor", static_cast<double>(ctx.max_pos) / original, where);
  FT_CHECK(rope.factor > 0, "[config] ", where, ": the yarn 'factor' must be > 0, got ", rope.factor);
  // (transformers reads beta_fast and beta_slow with `or`: 0 and null both give the default)
  rope.beta_fast = optional_number(params, "beta_fast", 32.0, where);
  if (rope.beta_fast == 0) rope.beta_fast = 32.0;
  rope.beta_slow = optional_number(params, "beta_slow", 1.0, where);
  if (rope.beta_slow == 0) rope.beta_slow = 1.0;
  FT_CHECK(rope.beta_fast > 0 && rope.beta_slow > 0, "[config] ", where,
           ": yarn's beta_fast and beta_slow must be > 0, got ", rope.beta_fast, " and ", rope.beta_slow);
  if (params.contains("truncate") && !params.at("truncate").is_null()) {
    FT_CHECK(params.at("truncate").is_boolean(), "[config] ", where, ": 'truncate' must be true or false, got ",
             params.at("truncate").dump());
    rope.truncate = params.at("truncate").get<bool>();
  }
  auto get_mscale = [&](double mscale) { return rope.factor <= 1 ? 1.0 : 0.1 * mscale * std::log(rope.factor) + 1.0; };
  const double mscale = optional_number(params, "mscale", 0.0, where);
  const double mscale_all_dim = optional_number(params, "mscale_all_dim", 0.0, where);
  rope.attention_factor = optional_number(
      params, "attention_factor",
      mscale != 0 && mscale_all_dim != 0 ? get_mscale(mscale) / get_mscale(mscale_all_dim) : get_mscale(1.0), where);
}

RopeConfig parse_rope(const json& params, double theta, const RopeContext& ctx, const std::string& where) {
  FT_CHECK(params.is_object(), "[config] ", where, " must be an object, got ", params.dump());
  RopeConfig rope;
  rope.theta = theta;
  std::string type = params.value("rope_type", params.value("type", std::string("default")));
  // Phi-3's configs say "su" (and Phi3Config reads "yarn" too) for longrope.
  if (ctx.original_max && (type == "su" || type == "yarn")) type = "longrope";
  std::set<std::string> allowed = {"rope_type", "type", "rope_theta"};
  auto num = [&](const char* key) {
    FT_CHECK(params.contains(key) && params.at(key).is_number(), "[config] ", where, ": rope type '", type,
             "' needs a number '", key, "'");
    allowed.insert(key);
    return params.at(key).get<double>();
  };
  if (params.contains("rope_theta")) {
    FT_CHECK(params.at("rope_theta").is_number(), "[config] ", where, ": rope_theta must be a number");
    rope.theta = params.at("rope_theta").get<double>();
  }
  if (params.contains("partial_rotary_factor")) {
    const json& v = params.at("partial_rotary_factor");
    FT_CHECK(v.is_number(), "[config] ", where, ": partial_rotary_factor must be a number, got ", v.dump());
    allowed.insert("partial_rotary_factor");
    if (ctx.partial != nullptr) {
      *ctx.partial = v.get<double>();
    } else {
      FT_CHECK(v.get<double>() == 1.0, "[config] ", where, ": partial_rotary_factor ", v.dump(),
               " is not supported for this model type (only phi3 turns part of each head)");
    }
  }
  if (type == "default") {
    rope.type = RopeType::Default;
  } else if (type == "linear") {
    rope.type = RopeType::Linear;
    rope.factor = num("factor");
  } else if (type == "llama3") {
    rope.type = RopeType::Llama3;
    rope.factor = num("factor");
    rope.low_freq_factor = num("low_freq_factor");
    rope.high_freq_factor = num("high_freq_factor");
    rope.original_max_position_embeddings = static_cast<int64_t>(num("original_max_position_embeddings"));
    FT_CHECK(rope.high_freq_factor > rope.low_freq_factor, "[config] ", where,
             ": llama3 rope needs high_freq_factor > low_freq_factor");
  } else if (type == "longrope" && ctx.original_max) {
    // transformers' _compute_longrope_parameters with Phi3Config: the top-level
    // original_max_position_embeddings wins over the parameters' own.
    rope.type = RopeType::LongRope;
    for (const char* key : {"short_factor", "long_factor"}) {
      FT_CHECK(params.contains(key), "[config] ", where, ": rope type 'longrope' needs '", key, "'");
      allowed.insert(key);
    }
    rope.short_factor = positive_numbers(params.at("short_factor"), where, "short_factor");
    rope.long_factor = positive_numbers(params.at("long_factor"), where, "long_factor");
    allowed.insert("original_max_position_embeddings");
    rope.original_max_position_embeddings = *ctx.original_max;
    FT_CHECK(rope.original_max_position_embeddings > 0, "[config] ", where,
             ": original_max_position_embeddings must be > 0, got ", rope.original_max_position_embeddings);
    const double original = static_cast<double>(rope.original_max_position_embeddings);
    rope.factor = params.contains("factor") && !params.at("factor").is_null()
                      ? num("factor")
                      : static_cast<double>(ctx.max_pos) / original;
    allowed.insert("factor");
    allowed.insert("attention_factor");
    if (params.contains("attention_factor") && !params.at("attention_factor").is_null()) {
      rope.attention_factor = num("attention_factor");
    } else {
      rope.attention_factor = rope.factor <= 1.0 ? 1.0 : std::sqrt(1 + std::log(rope.factor) / std::log(original));
    }
  } else if (type == "yarn") {
    parse_yarn(params, ctx, where, rope, allowed);
  } else {
    FT_FAIL("[config] ", where, ": rope type '", type, "' is not supported (supported: default, linear, llama3, yarn",
            ctx.original_max ? ", longrope" : "; longrope with phi3", ")");
  }
  for (const auto& [key, value] : params.items()) {
    FT_CHECK(allowed.count(key), "[config] ", where, ": option '", key, "' is not supported for rope type '",
             type, "'");
  }
  return rope;
}

// layer_types: "full_attention" or "sliding_attention" (a window of `window` tokens) per layer.
void read_layer_types(Reader& r, ModelConfig& c, std::optional<int64_t> window) {
  const json& types = r.get("layer_types");
  FT_CHECK(types.is_array() && static_cast<int64_t>(types.size()) == c.num_hidden_layers, "[config] ", r.source,
           ": layer_types must list one type per layer");
  c.layer_window.assign(c.num_hidden_layers, 0);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    std::string t = types[i].is_string() ? types[i].get<std::string>() : "";
    FT_CHECK(t == "full_attention" || t == "sliding_attention", "[config] ", r.source, ": layer_types[", i,
             "] = ", types[i].dump(), " is not supported");
    if (t == "sliding_attention") {
      FT_CHECK(window.has_value(), "[config] ", r.source, ": sliding_attention layers need sliding_window");
      c.layer_window[i] = *window;
    }
  }
}

// A soft-capping key of Gemma 2 and 3: its value (> 0), 0 where it is null, `absent` where the key
// is missing (the config class's default).
double softcap(Reader& r, const char* key, double absent) {
  if (!r.j.contains(key)) {
    r.used.insert(key);
    return absent;
  }
  const double cap = r.number_or(key, 0.0);
  FT_CHECK(!r.has(key) || (std::isfinite(cap) && cap > 0), "[config] ", r.source, ": '", key,
           "' must be > 0 or null, got ", cap);
  return cap;
}

// The attention keys Gemma 2 and 3 share: the score scale, the soft-capping of the final logits
// (`final_cap`: Gemma2Config's default is 30, Gemma3TextConfig's none), causal attention, and the
// window of the sliding layers.
int64_t parse_gemma_attention(Reader& r, ModelConfig& c, double final_cap) {
  const std::string& source = r.source;
  c.query_pre_attn_scalar = r.number_or("query_pre_attn_scalar", 256.0);
  FT_CHECK(c.query_pre_attn_scalar > 0, "[config] ", source, ": 'query_pre_attn_scalar' must be > 0, got ",
           c.query_pre_attn_scalar);
  c.final_logit_softcapping = softcap(r, "final_logit_softcapping", final_cap);
  FT_CHECK(!r.boolean_or("use_bidirectional_attention", false), "[config] ", source,
           ": use_bidirectional_attention (EmbeddingGemma's encoder) is not supported: libft trains causal language models");
  const int64_t window = r.integer_or("sliding_window", 4096);
  FT_CHECK(window > 0, "[config] ", source, ": 'sliding_window' must be > 0, got ", window);
  // (transformers 4.42's Gemma 2 configs also wrote the window as sliding_window_size)
  if (r.has("sliding_window_size")) {
    const json& v = r.j.at("sliding_window_size");
    FT_CHECK(v.is_number_integer() && v.get<int64_t>() == window, "[config] ", source, ": 'sliding_window_size' (",
             v.dump(), ") differs from 'sliding_window' (", window, ")");
  }
  return window;
}

// Gemma 2's own keys (Gemma2Config): soft-capped attention scores (default 50) and final logits
// (default 30), the score scale, and sliding-window layers alternating with global ones (the first
// slides) unless layer_types says otherwise. One rotary embedding, read as Llama's.
void parse_gemma2(Reader& r, ModelConfig& c) {
  const int64_t window = parse_gemma_attention(r, c, 30.0);
  c.attn_logit_softcapping = softcap(r, "attn_logit_softcapping", 50.0);
  if (r.has("layer_types")) {
    read_layer_types(r, c, window);
  } else {
    c.layer_window.assign(c.num_hidden_layers, 0);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_window[i] = i % 2 == 0 ? window : 0;
  }
}

// A rotary embedding per layer type (Gemma 3, OLMo 3): transformers 5 writes rope_parameters
// with one entry per layer type (full_attention, sliding_attention), each with its rope_theta;
// 4.x's configs write rope_scaling, which applies to the full-attention layers, beside the
// bases, `theta` (full attention) and `local_theta` (sliding).
void parse_layer_type_ropes(Reader& r, ModelConfig& c, double theta, double local_theta) {
  const json& j = r.j;
  const std::string& source = r.source;
  r.used.insert("rope_scaling");
  r.used.insert("rope_parameters");
  if (r.has("rope_parameters")) {
    const json& p = j.at("rope_parameters");
    FT_CHECK(!r.has("rope_scaling"), "[config] ", source, ": both rope_parameters and rope_scaling given");
    FT_CHECK(p.is_object(), "[config] ", source, ": rope_parameters must be an object, got ", p.dump());
    for (const auto& [key, value] : p.items()) {
      FT_CHECK(key == "full_attention" || key == "sliding_attention", "[config] ", source, ": ", c.model_type,
               "'s rope_parameters has one entry per layer type (full_attention, sliding_attention), not '", key, "'");
    }
    const json none = json::object();
    auto entry = [&](const char* key) { return p.contains(key) && !p.at(key).is_null() ? p.at(key) : none; };
    const RopeContext ctx(c.max_position_embeddings);
    c.rope = parse_rope(entry("full_attention"), theta, ctx, source + ": rope_parameters.full_attention");
    c.sliding_rope = parse_rope(entry("sliding_attention"), local_theta, ctx,
                                source + ": rope_parameters.sliding_attention");
  } else {
    c.rope = r.has("rope_scaling") ? parse_rope(j.at("rope_scaling"), theta,
                                                RopeContext(c.max_position_embeddings),
                                                source + ": rope_scaling")
                                   : RopeConfig::with_theta(theta);
    c.sliding_rope = RopeConfig::with_theta(local_theta);
  }
}

// Gemma 3's own keys (Gemma3TextConfig): the attention's score scale and soft-capping, which layers
// slide, and the two rotary embeddings (global for full-attention layers, local for sliding ones).
void parse_gemma3(Reader& r, ModelConfig& c) {
  const std::string& source = r.source;
  const int64_t window = parse_gemma_attention(r, c, 0.0);
  r.used.insert("attn_logit_softcapping");
  FT_CHECK(!r.has("attn_logit_softcapping"), "[config] ", source,
           ": attn_logit_softcapping is not supported for gemma3_text (Gemma 3 has no soft-capped attention scores)");

  // Windows: layer_types (transformers 5), else every sliding_window_pattern-th layer is global.
  const int64_t pattern =
      r.integer_or("sliding_window_pattern", r.integer_or("_sliding_window_pattern", 6));
  if (r.has("layer_types")) {
    read_layer_types(r, c, window);
  } else {
    FT_CHECK(pattern > 0, "[config] ", source, ": 'sliding_window_pattern' must be > 0, got ", pattern);
    c.layer_window.assign(c.num_hidden_layers, 0);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_window[i] = (i + 1) % pattern != 0 ? window : 0;
  }

  // Rotary embeddings: 4.x checkpoints write rope_theta and rope_scaling (the global layers') and
  // rope_local_base_freq (the local layers').
  const double theta = r.number_or("rope_theta", 1e6);
  parse_layer_type_ropes(r, c, theta, r.number_or("rope_local_base_freq", 1e4));
}

// OLMo 3's own keys (Olmo3Config): sliding-window layers (layer_types, else three of each four,
// the fourth global; a window of sliding_window, default 4096), and a rotary embedding per layer
// type, both of base rope_theta (default 500000) in 4.x's layout, rope_scaling applying to the
// full-attention layers only (OLMo 3's YaRN).
void parse_olmo3(Reader& r, ModelConfig& c) {
  const int64_t window = r.integer_or("sliding_window", 4096);
  FT_CHECK(window > 0, "[config] ", r.source, ": 'sliding_window' must be > 0, got ", window);
  if (r.has("layer_types")) {
    read_layer_types(r, c, window);
  } else {
    r.used.insert("layer_types");
    c.layer_window.assign(c.num_hidden_layers, 0);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_window[i] = (i + 1) % 4 != 0 ? window : 0;
  }
  const double theta = r.number_or("rope_theta", 500000.0);
  parse_layer_type_ropes(r, c, theta, theta);
}

// The experts of Mixtral (MixtralConfig: num_local_experts, default 8; each of intermediate_size;
// the chosen weights always renormalised) and Qwen3-MoE (Qwen3MoeConfig: num_experts, default 128,
// of moe_intermediate_size; norm_topk_prob; dense layers where mlp_only_layers lists them or
// decoder_sparse_step skips them).
// num_experts, or num_local_experts (the attribute_map's name, which transformers 5 saves for
// Qwen3-MoE and OLMoE); both given must agree.
int64_t read_num_experts(Reader& r, int64_t fallback) {
  const int64_t n = r.integer_or("num_experts", r.integer_or("num_local_experts", fallback));
  FT_CHECK(!r.has("num_experts") || !r.has("num_local_experts") || r.j.at("num_experts") == r.j.at("num_local_experts"),
           "[config] ", r.source, ": num_experts (", r.j.at("num_experts").dump(), ") and num_local_experts differ");
  return n;
}

void parse_experts(Reader& r, ModelConfig& c) {
  const std::string& source = r.source;
  if (c.mixtral()) {
    c.num_experts = r.integer_or("num_local_experts", 8);
    c.num_experts_per_tok = r.integer_or("num_experts_per_tok", 2);
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;
    const double jitter = r.number_or("router_jitter_noise", 0.0);
    FT_CHECK(jitter == 0, "[config] ", source, ": router_jitter_noise ", jitter,
             " is not supported (libft routes each token by its router's probabilities alone; set it to 0)");
  } else if (c.gpt_oss()) {
    // GptOssConfig: experts of intermediate_size in every layer, top 4 of 128 (num_local_experts;
    // OpenAI's configs also say experts_per_token, which must agree), each token's top-k router
    // logits softmaxed; every expert's activation clamped at swiglu_limit.
    c.num_experts = read_num_experts(r, 128);
    c.num_experts_per_tok = r.integer_or("num_experts_per_tok", r.integer_or("experts_per_token", 4));
    FT_CHECK(!r.has("num_experts_per_tok") || !r.has("experts_per_token") ||
                 r.j.at("num_experts_per_tok") == r.j.at("experts_per_token"),
             "[config] ", source, ": num_experts_per_tok (", r.j.at("num_experts_per_tok").dump(),
             ") and experts_per_token differ");
    c.moe_intermediate_size = c.intermediate_size;
    c.swiglu_limit = r.number_or("swiglu_limit", 7.0);
    FT_CHECK(std::isfinite(c.swiglu_limit) && c.swiglu_limit > 0, "[config] ", source,
             ": 'swiglu_limit' must be a finite number > 0, got ", c.swiglu_limit);
  } else if (c.olmoe()) {
    // OlmoeConfig: experts of intermediate_size each, in every layer; top 8 of 64, not
    // renormalised, by default (OLMoE-1B-7B's).
    c.num_experts = read_num_experts(r, 64);
    c.num_experts_per_tok = r.integer_or("num_experts_per_tok", 8);
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
  } else {
    const bool qwen2 = c.model_type == "qwen2_moe";  // (Qwen2MoeConfig's defaults: Qwen1.5-MoE-A2.7B's)
    c.num_experts = read_num_experts(r, qwen2 ? 60 : 128);
    c.num_experts_per_tok = r.integer_or("num_experts_per_tok", qwen2 ? 4 : 8);
    c.moe_intermediate_size = r.integer_or("moe_intermediate_size", qwen2 ? 1408 : 768);
    if (qwen2) {
      c.shared_expert_intermediate_size = r.integer_or("shared_expert_intermediate_size", 5632);
      FT_CHECK(c.shared_expert_intermediate_size > 0 && c.shared_expert_intermediate_size < (int64_t{1} << 31),
               "[config] ", source, ": 'shared_expert_intermediate_size' must be in (0, 2^31), got ",
               c.shared_expert_intermediate_size);
    }
    c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
    const int64_t step = r.integer_or("decoder_sparse_step", 1);
    FT_CHECK(step > 0, "[config] ", source, ": 'decoder_sparse_step' must be > 0, got ", step);
    std::set<int64_t> dense;
    r.used.insert("mlp_only_layers");
    if (r.has("mlp_only_layers")) {
      const json& v = r.j.at("mlp_only_layers");
      FT_CHECK(v.is_array(), "[config] ", source, ": 'mlp_only_layers' must be a list of layer indices, got ", v.dump());
      for (const auto& i : v) {
        FT_CHECK(i.is_number_integer() && i.get<int64_t>() >= 0 && i.get<int64_t>() < c.num_hidden_layers, "[config] ",
                 source, ": mlp_only_layers holds ", i.dump(), ", not a layer index in [0, ", c.num_hidden_layers, ")");
        dense.insert(i.get<int64_t>());
      }
    }
    c.layer_moe.assign(c.num_hidden_layers, true);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      c.layer_moe[static_cast<size_t>(i)] = !dense.count(i) && (i + 1) % step == 0;
    }
    if (std::find(c.layer_moe.begin(), c.layer_moe.end(), false) == c.layer_moe.end()) c.layer_moe.clear();
  }
  FT_CHECK(c.num_experts > 0, "[config] ", source, ": the number of experts must be > 0, got ", c.num_experts);
  c.output_router_logits = r.boolean_or("output_router_logits", false);
  c.router_aux_loss_coef = r.number_or("router_aux_loss_coef", c.olmoe() ? 0.01 : 0.001);
}

// The sizes of a model, each in (0, 2^31) (a tensor dimension that LibTorch's kernels index with
// 32-bit integers; a negative or huge value would otherwise fail far from the config, as a
// std::vector length error or an allocation that aborts the process).
void check_sizes(const ModelConfig& c, const std::string& source) {
  constexpr int64_t kMaxSize = (int64_t{1} << 31) - 1;
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"vocab_size", c.vocab_size},
                                {"hidden_size", c.hidden_size},
                                {"intermediate_size", c.intermediate_size},
                                {"num_hidden_layers", c.num_hidden_layers},
                                {"num_attention_heads", c.num_attention_heads},
                                {"num_key_value_heads", c.num_key_value_heads},
                                {"head_dim", c.head_dim},
                                {"max_position_embeddings", c.max_position_embeddings}}) {
    FT_CHECK(v > 0, "[config] ", source, ": '", name, "' must be > 0, got ", v);
    FT_CHECK(v <= kMaxSize, "[config] ", source, ": '", name, "' must be at most 2^31 - 1, got ", v);
  }
}

}  // namespace

double ModelConfig::parameter_estimate() const {
  const double h = static_cast<double>(hidden_size);
  const double q = static_cast<double>(num_attention_heads) * static_cast<double>(head_dim);
  const double kv = static_cast<double>(num_key_value_heads) * static_cast<double>(head_dim);
  const double dense = 3 * h * static_cast<double>(intermediate_size);
  // A sparse layer: its experts, their router, and Qwen2-MoE's shared expert with its gate.
  const double sparse = static_cast<double>(num_experts) * (3 * h * static_cast<double>(moe_intermediate_size) + h) +
                        (shared_expert_intermediate_size > 0 ? 3 * h * static_cast<double>(shared_expert_intermediate_size) + h : 0);
  double layers = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) {
    layers += h * q * 2 + h * kv * 2 + 2 * h + (moe_in_layer(i) ? sparse : dense);
  }
  return static_cast<double>(vocab_size) * h * (tie_word_embeddings ? 1 : 2) + layers + h;
}

namespace {

// `which` names the rotary embedding in messages ("" for the model's, or the sliding-window layers').
void check_rope(const RopeConfig& r, const std::string& source, const std::string& which) {
  FT_CHECK(std::isfinite(r.theta) && r.theta > 0, "[config] ", source, ": ", which,
           "'rope_theta' must be a finite number > 0, got ", r.theta);
  if (r.type != RopeType::Default) {
    FT_CHECK(std::isfinite(r.factor) && r.factor > 0, "[config] ", source, ": ", which,
             "the rope scaling 'factor' must be a finite number > 0, got ", r.factor);
  }
  FT_CHECK(std::isfinite(r.attention_factor) && r.attention_factor > 0, "[config] ", source, ": ", which,
           "the rope's attention_factor must be a finite number > 0, got ", r.attention_factor);
  if (r.type == RopeType::Yarn) {
    FT_CHECK(r.original_max_position_embeddings > 0, "[config] ", source, ": ", which,
             "yarn's 'original_max_position_embeddings' must be > 0, got ", r.original_max_position_embeddings);
    FT_CHECK(std::isfinite(r.beta_fast) && std::isfinite(r.beta_slow) && r.beta_fast > 0 && r.beta_slow > 0,
             "[config] ", source, ": ", which, "yarn's beta_fast and beta_slow must be finite and > 0, got ",
             r.beta_fast, " and ", r.beta_slow);
  }
  if (r.type == RopeType::Llama3) {
    FT_CHECK(std::isfinite(r.low_freq_factor) && r.low_freq_factor > 0 && std::isfinite(r.high_freq_factor),
             "[config] ", source, ": ", which,
             "the rope scaling 'low_freq_factor' and 'high_freq_factor' must be finite and > 0, got ",
             r.low_freq_factor, " and ", r.high_freq_factor);
    FT_CHECK(r.original_max_position_embeddings > 0, "[config] ", source, ": ", which,
             "the rope scaling 'original_max_position_embeddings' must be > 0, got ",
             r.original_max_position_embeddings);
  }
}

}  // namespace

double ModelConfig::attention_scale() const {
  if (attention_multiplier > 0) return attention_multiplier;
  return 1.0 / std::sqrt(query_pre_attn_scalar > 0 ? query_pre_attn_scalar : static_cast<double>(head_dim));
}

void ModelConfig::validate(const std::string& source) const {
  check_model_type(model_type, source);
  // Qwen3's and Gemma's one attention_bias covers the four projections.
  FT_CHECK((model_type != "qwen3" && model_type != "qwen3_moe" && !gemma() && !olmo() && !olmoe() && !gpt_oss()) ||
               qkv_bias == o_bias, "[config] ",
           source, ": ", model_type,
           " has biases on all four attention projections or on none");
  FT_CHECK((!gemma() && !olmo() && num_experts == 0) || !mlp_bias, "[config] ", source, ": ", model_type,
           " has no MLP biases");
  FT_CHECK(!mixtral() || (!qkv_bias && !o_bias), "[config] ", source, ": mixtral has no attention biases");
  FT_CHECK(num_experts == 0 || mixtral() || model_type == "qwen2_moe" || model_type == "qwen3_moe" || olmoe() || gpt_oss(),
           "[config] ", source, ": only mixtral, qwen2_moe, qwen3_moe, olmoe and gpt_oss have experts");
  FT_CHECK((!olmoe() && !gpt_oss()) || num_experts > 0, "[config] ", source, ": ", model_type, " needs experts");
  FT_CHECK(swiglu_limit == 0 || gpt_oss(), "[config] ", source, ": only gpt_oss clamps its experts' activations (swiglu_limit)");
  FT_CHECK(std::isfinite(swiglu_limit) && swiglu_limit >= 0, "[config] ", source, ": swiglu_limit must be >= 0, got ",
           swiglu_limit);
  FT_CHECK(!mxfp4_experts || gpt_oss(), "[config] ", source, ": only gpt_oss's experts come in MXFP4");
  FT_CHECK(!gpt_oss() || moe_intermediate_size == intermediate_size, "[config] ", source,
           ": gpt_oss's experts are intermediate_size wide (", intermediate_size, "), not ", moe_intermediate_size);
  FT_CHECK(clip_qkv == 0 || olmoe(), "[config] ", source, ": only olmoe clamps q, k and v (clip_qkv)");
  FT_CHECK(std::isfinite(clip_qkv) && clip_qkv >= 0, "[config] ", source, ": clip_qkv must be >= 0, got ", clip_qkv);
  FT_CHECK(shared_expert_intermediate_size == 0 || (model_type == "qwen2_moe" && num_experts > 0), "[config] ", source,
           ": only qwen2_moe has a shared expert");
  if (num_experts > 0) {
    FT_CHECK(num_experts_per_tok > 0 && num_experts_per_tok <= num_experts, "[config] ", source,
             ": num_experts_per_tok must be in [1, ", num_experts, "], got ", num_experts_per_tok);
    FT_CHECK(moe_intermediate_size > 0 && moe_intermediate_size < (int64_t{1} << 31), "[config] ", source,
             ": the experts' intermediate size must be in (0, 2^31), got ", moe_intermediate_size);
    FT_CHECK(std::isfinite(router_aux_loss_coef), "[config] ", source, ": 'router_aux_loss_coef' must be finite");
  }
  FT_CHECK(layer_moe.empty() || static_cast<int64_t>(layer_moe.size()) == num_hidden_layers, "[config] ", source,
           ": one sparse-MLP flag per layer expected");
  if (model_type == "gemma") {
    FT_CHECK(hidden_act == Activation::GeluTanh || hidden_act == Activation::Gelu, "[config] ", source,
             ": gemma uses a GELU activation (gelu_pytorch_tanh or gelu)");
  } else {
    FT_CHECK(hidden_act == (gemma() ? Activation::GeluTanh : Activation::Silu), "[config] ", source, ": ", model_type,
             gemma() ? " uses the tanh-GELU activation (gelu_pytorch_tanh)" : " uses the silu activation");
  }
  FT_CHECK(std::isfinite(attn_logit_softcapping) && attn_logit_softcapping >= 0, "[config] ", source,
           ": 'attn_logit_softcapping' must be a finite number > 0, got ", attn_logit_softcapping);
  FT_CHECK(attn_logit_softcapping == 0 || model_type == "gemma2", "[config] ", source,
           ": only gemma2 soft-caps its attention scores (attn_logit_softcapping)");
  for (const auto& [name, v] : {std::pair<const char*, double>{"embedding_multiplier", embedding_multiplier},
                                {"residual_multiplier", residual_multiplier},
                                {"logits_scaling", logits_scaling}}) {
    FT_CHECK(std::isfinite(v) && v > 0, "[config] ", source, ": '", name, "' must be a finite number > 0, got ", v);
    FT_CHECK(v == 1 || granite(), "[config] ", source, ": only granite has '", name, "'");
  }
  FT_CHECK(attention_dropout >= 0 && attention_dropout < 1, "[config] ", source,
           ": 'attention_dropout' must be in [0, 1), got ", attention_dropout);
  FT_CHECK(attention_dropout == 0 || attn_logit_softcapping == 0, "[config] ", source,
           ": attention_dropout with soft-capped attention scores is not supported");
  FT_CHECK(attention_dropout == 0 || !attention_sinks(), "[config] ", source,
           ": attention_dropout with attention sinks is not supported");
  FT_CHECK(std::isfinite(attention_multiplier) && attention_multiplier >= 0, "[config] ", source,
           ": 'attention_multiplier' must be a finite number > 0, got ", attention_multiplier);
  FT_CHECK(attention_multiplier == 0 || granite(), "[config] ", source, ": only granite has 'attention_multiplier'");
  FT_CHECK(std::isfinite(query_pre_attn_scalar) && query_pre_attn_scalar >= 0, "[config] ", source,
           ": 'query_pre_attn_scalar' must be a finite number > 0, got ", query_pre_attn_scalar);
  FT_CHECK(std::isfinite(final_logit_softcapping) && final_logit_softcapping >= 0, "[config] ", source,
           ": 'final_logit_softcapping' must be a finite number > 0, got ", final_logit_softcapping);
  FT_CHECK(residual_dropout >= 0 && residual_dropout < 1, "[config] ", source,
           ": 'resid_pdrop' must be in [0, 1), got ", residual_dropout);
  FT_CHECK(residual_dropout == 0 || phi3(), "[config] ", source, ": only phi3 has 'resid_pdrop'");
  FT_CHECK(std::isfinite(partial_rotary_factor) && partial_rotary_factor > 0 && partial_rotary_factor <= 1, "[config] ",
           source, ": 'partial_rotary_factor' must be in (0, 1], got ", partial_rotary_factor);
  FT_CHECK(partial_rotary_factor == 1 || phi3(), "[config] ", source, ": only phi3 has 'partial_rotary_factor'");
  FT_CHECK(rope.type != RopeType::LongRope || phi3(), "[config] ", source, ": only phi3 has longrope rotary embeddings");
  FT_CHECK(layer_rope.empty() || static_cast<int64_t>(layer_rope.size()) == num_hidden_layers, "[config] ", source,
           ": one rotary-embedding flag per layer expected (no_rope_layers)");
  FT_CHECK(layer_rope.empty() || model_type == "smollm3", "[config] ", source,
           ": only smollm3 has layers without a rotary embedding (no_rope_layers)");
  FT_CHECK(!sliding_rope || gemma3() || olmo3(), "[config] ", source,
           ": only gemma3_text and olmo3 have a rotary embedding of their own for their sliding-window layers");
  check_sizes(*this, source);
  FT_CHECK(num_attention_heads % num_key_value_heads == 0, "[config] ", source, ": num_attention_heads (",
           num_attention_heads, ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  FT_CHECK(head_dim % 2 == 0, "[config] ", source, ": head_dim must be even for rotary embeddings, got ", head_dim);
  FT_CHECK(rotary_dim() >= 2 && rotary_dim() % 2 == 0, "[config] ", source, ": head_dim · partial_rotary_factor (",
           head_dim, " · ", partial_rotary_factor, " → ", rotary_dim(), ") must be even and at least 2");
  if (rope.type == RopeType::LongRope) {
    for (const auto* factors : {&rope.short_factor, &rope.long_factor}) {
      FT_CHECK(static_cast<int64_t>(factors->size()) == rotary_dim() / 2, "[config] ", source, ": longrope's ",
               factors == &rope.short_factor ? "short_factor" : "long_factor", " has ", factors->size(),
               " entries, the rotary embedding turns ", rotary_dim(), " dimensions of each head (", rotary_dim() / 2,
               " frequencies)");
    }
  }
  FT_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "[config] ", source,
           ": 'rms_norm_eps' must be a finite number > 0, got ", rms_norm_eps);
  check_rope(rope, source, "");
  if (sliding_rope) check_rope(*sliding_rope, source, "the sliding-window layers' ");
  const double params = parameter_estimate();
  FT_CHECK(params <= 0x1p40, "[config] ", source, ": the sizes make a model of about ", params,
           " parameters, more than libft builds (2^40, about 1.1e12): check vocab_size (", vocab_size,
           "), hidden_size (", hidden_size, "), intermediate_size (", intermediate_size, ") and num_hidden_layers (",
           num_hidden_layers, ")");
  FT_CHECK(static_cast<int64_t>(layer_window.size()) == num_hidden_layers, "[config] ", source,
           ": one attention window per layer expected");
}

namespace {
ModelConfig parse_model_config(const json& j, const std::string& source);

// Gemma 3's image-text checkpoints (Gemma3ForConditionalGeneration, model_type "gemma3": the 4B,
// 12B and 27B models): the language model's config is text_config, a Gemma3TextConfig that names
// only what differs from its defaults; the token ids and dtype may sit at the top level. The
// vision tower's and the projector's settings are read past: libft trains the language model.
ModelConfig parse_image_text_gemma3(const json& j, const std::string& source) {
  static const std::set<std::string> kImageTextKeys = {
      "text_config", "vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
      "image_token_index", "boi_token_id", "eoi_token_id", "image_token_id", "tie_word_embeddings",
      "bos_token_id", "eos_token_id", "pad_token_id"};
  for (const auto& [key, value] : j.items()) {
    FT_CHECK(kImageTextKeys.count(key) || kHarmlessKeys.count(key), "[config] ", source, ": unknown key '", key,
             "' (libft does not know whether it changes the model; remove it if it does not)");
  }
  if (j.contains("architectures")) {
    FT_CHECK(j.at("architectures") == json::array({"Gemma3ForConditionalGeneration"}), "[config] ", source,
             ": model_type 'gemma3' with architectures ", j.at("architectures").dump(),
             " (expected [\"Gemma3ForConditionalGeneration\"])");
  }
  const json& top_text = j.at("text_config");
  FT_CHECK(top_text.is_object(), "[config] ", source, ": 'text_config' must be an object, got ", top_text.dump());
  json text = top_text;
  if (!text.contains("model_type")) text["model_type"] = "gemma3_text";
  FT_CHECK(text.at("model_type") == "gemma3_text", "[config] ", source, ": text_config's model_type must be "
           "'gemma3_text', got ", text.at("model_type").dump());
  for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "tie_word_embeddings"}) {
    if (j.contains(key) && !text.contains(key)) text[key] = j.at(key);
  }
  const bool tied = text.value("tie_word_embeddings", true);
  FT_CHECK(!j.contains("tie_word_embeddings") || j.at("tie_word_embeddings") == tied, "[config] ", source,
           ": tie_word_embeddings differs between the top level and text_config");
  ModelConfig c = parse_model_config(text, source + ": text_config");
  c.image_text_architecture = "Gemma3ForConditionalGeneration";
  return c;
}

ModelConfig parse_model_config(const json& j, const std::string& source) {
  FT_CHECK(j.is_object(), "[config] ", source, ": expected a JSON object");
  if (j.value("model_type", "") == "gemma3" && j.contains("text_config")) return parse_image_text_gemma3(j, source);
  Reader r{j, source, {}};
  ModelConfig c;
  c.model_type = r.string_or("model_type", "");
  check_model_type(c.model_type, source);
  const bool gemma = c.gemma();
  if (r.has("architectures")) {
    const json& arch = j.at("architectures");
    FT_CHECK(arch.is_array(), "[config] ", source, ": 'architectures' must be a list");
    for (const auto& a : arch) {
      FT_CHECK(a.is_string() && a.get<std::string>().ends_with("ForCausalLM"), "[config] ", source,
               ": architecture ", a.dump(), " is not supported (only *ForCausalLM)");
    }
  }
  if (c.model_type == "gemma") {
    // GemmaConfig: transformers 5 reads hidden_act; 4.39 to 4.x read hidden_activation where given
    // (Gemma 1's first configs said hidden_act "gelu", and the model was trained with the tanh
    // approximation), so where a config gives both, hidden_activation decides.
    std::string act = r.string_or("hidden_act", "gelu_pytorch_tanh");
    act = r.string_or("hidden_activation", act);
    FT_CHECK(act == "gelu_pytorch_tanh" || act == "gelu", "[config] ", source, ": activation '", act,
             "' is not supported for gemma (gelu_pytorch_tanh or gelu)");
    c.hidden_act = act == "gelu" ? Activation::Gelu : Activation::GeluTanh;
  } else if (gemma) {
    // Gemma2Config's and Gemma3TextConfig's key and default; the exact-tanh "gelu_python_tanh"
    // rounds differently. (Gemma 2's configs also carry a hidden_act, which transformers ignores.)
    std::string act = r.string_or("hidden_activation", "gelu_pytorch_tanh");
    FT_CHECK(act == "gelu_pytorch_tanh", "[config] ", source, ": hidden_activation '", act,
             "' is not supported for ", c.model_type, " (only gelu_pytorch_tanh)");
    if (c.model_type == "gemma2") {
      const std::string ignored = r.string_or("hidden_act", "gelu_pytorch_tanh");
      FT_CHECK(ignored == "gelu_pytorch_tanh" || ignored == "gelu", "[config] ", source, ": hidden_act '", ignored,
               "' is not a GELU (gemma2 uses hidden_activation, gelu_pytorch_tanh)");
    }
    c.hidden_act = Activation::GeluTanh;
  } else {
    std::string act = r.string_or("hidden_act", "silu");
    FT_CHECK(act == "silu", "[config] ", source, ": hidden_act '", act, "' is not supported (only silu)");
  }
  if (c.gemma3()) {
    // Gemma3TextConfig's defaults (gemma-3-2b's sizes): the text_config of Gemma 3's image-text
    // checkpoints names only what differs from them.
    c.vocab_size = r.integer_or("vocab_size", 262208);
    c.hidden_size = r.integer_or("hidden_size", 2304);
    c.intermediate_size = r.integer_or("intermediate_size", 9216);
    c.num_hidden_layers = r.integer_or("num_hidden_layers", 26);
    c.num_attention_heads = r.integer_or("num_attention_heads", 8);
  } else {
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.intermediate_size = r.integer("intermediate_size");
    c.num_hidden_layers = r.integer("num_hidden_layers");
    c.num_attention_heads = r.integer("num_attention_heads");
  }
  // (GemmaConfig's default is 16, Gemma2Config's and Gemma3TextConfig's 4)
  c.num_key_value_heads = r.integer_or("num_key_value_heads", c.model_type == "gemma" ? 16
                                                              : gemma                 ? 4
                                                                                      : c.num_attention_heads);
  FT_CHECK(c.num_attention_heads > 0, "[config] ", source, ": 'num_attention_heads' must be > 0, got ", c.num_attention_heads);
  // Gemma's config classes' defaults differ from Llama's: head_dim 256, 8192 positions (Gemma 3:
  // 131072), a tied head.
  c.head_dim = r.integer_or("head_dim", gemma ? 256 : c.gpt_oss() ? 64 : c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = r.integer_or("max_position_embeddings", c.gemma3() ? 131072 : gemma ? 8192 : 2048);
  check_sizes(c, source);  // before any of them sizes a vector below (layer_window)
  // (the config classes' defaults: 1e-5 for Mixtral, Phi-3 and AI2's models, 1e-6 elsewhere)
  c.rms_norm_eps = r.number_or("rms_norm_eps", c.mixtral() || c.phi3() || c.olmo() || c.olmoe() || c.gpt_oss() ? 1e-5 : 1e-6);
  c.initializer_range = r.number_or("initializer_range", 0.02);
  c.attention_dropout = r.number_or("attention_dropout", 0.0);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", gemma);
  c.mlp_bias = r.boolean_or("mlp_bias", false);
  bool attention_bias = r.boolean_or("attention_bias", c.gpt_oss());  // (GptOssConfig's default: true)
  if (c.model_type == "qwen2") {
    // Qwen2 always has q/k/v biases and no o_proj bias, whatever the config says.
    c.qkv_bias = true;
    c.o_bias = false;
  } else if (c.model_type == "qwen2_moe") {
    // Qwen2MoeConfig: q/k/v biases where qkv_bias says (transformers 5's key; before it, always).
    c.qkv_bias = r.boolean_or("qkv_bias", true);
    c.o_bias = false;
  } else {
    c.qkv_bias = attention_bias;
    c.o_bias = attention_bias;
  }
  c.bos_token_id = r.optional_integer("bos_token_id");
  c.pad_token_id = r.optional_integer("pad_token_id");
  r.used.insert("eos_token_id");
  if (gemma) {  // Gemma's config classes' defaults where the key is absent (a null stays null)
    if (!j.contains("bos_token_id")) c.bos_token_id = 2;
    if (!j.contains("pad_token_id")) c.pad_token_id = 0;
    if (!j.contains("eos_token_id")) c.eos_token_ids = {1};
  }
  if (r.has("eos_token_id")) {
    const json& e = j.at("eos_token_id");
    if (e.is_number_integer()) {
      c.eos_token_ids.push_back(e.get<int64_t>());
    } else {
      FT_CHECK(e.is_array(), "[config] ", source, ": eos_token_id must be an integer or a list of integers");
      for (const auto& v : e) {
        FT_CHECK(v.is_number_integer(), "[config] ", source, ": eos_token_id must be a list of integers");
        c.eos_token_ids.push_back(v.get<int64_t>());
      }
    }
  }
  c.torch_dtype = r.string_or("torch_dtype", r.string_or("dtype", "float32"));

  if (c.gemma3()) {
    parse_gemma3(r, c);
  } else if (c.olmo3()) {
    parse_olmo3(r, c);
  } else {
    // RoPE: transformers 5 writes "rope_parameters" (with rope_theta inside); 4.x and most Hub
    // checkpoints write "rope_theta" and "rope_scaling".
    // (MixtralConfig's and GptOssConfig's default_theta)
    double theta = r.number_or("rope_theta", c.mixtral() ? 1e6 : c.gpt_oss() ? 150000.0 : 10000.0);
    r.used.insert("rope_scaling");
    r.used.insert("rope_parameters");
    RopeContext ctx(c.max_position_embeddings);
    std::optional<double> rope_partial;
    if (c.phi3()) {
      // Phi3Config: original_max_position_embeddings (default 4096) at the top level, and the
      // fraction of each head that turns, at the top level or (transformers 5) in rope_parameters,
      // whose value wins.
      ctx.original_max = r.integer_or("original_max_position_embeddings", 4096);
      ctx.partial = &rope_partial;
      c.partial_rotary_factor = r.number_or("partial_rotary_factor", 1.0);
    }
    if (r.has("rope_parameters")) {
      FT_CHECK(!r.has("rope_scaling"), "[config] ", source, ": both rope_parameters and rope_scaling given");
      c.rope = parse_rope(j.at("rope_parameters"), theta, ctx, source + ": rope_parameters");
    } else if (r.has("rope_scaling")) {
      c.rope = parse_rope(j.at("rope_scaling"), theta, ctx, source + ": rope_scaling");
    } else if (c.gpt_oss()) {
      // GptOssConfig's default: YaRN ×32 over 4096 positions (gpt-oss's own).
      const json yarn = {{"rope_type", "yarn"}, {"factor", 32.0}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                         {"truncate", false}, {"original_max_position_embeddings", 4096}};
      c.rope = parse_rope(yarn, theta, ctx, source + ": gpt_oss's default rope");
    } else {
      c.rope.theta = theta;
    }
    if (rope_partial) c.partial_rotary_factor = *rope_partial;
    if (c.phi3() && c.rope.type != RopeType::LongRope) c.rope.original_max_position_embeddings = *ctx.original_max;
  }

  // Attention windows. Mistral: one window for every layer. Qwen2: layer_types (or, in older
  // configs, use_sliding_window with max_window_layers).
  if (c.model_type == "gemma2") parse_gemma2(r, c);
  if (c.granite()) {  // GraniteConfig's multipliers, each 1.0 where absent
    c.embedding_multiplier = r.number_or("embedding_multiplier", 1.0);
    c.attention_multiplier = r.number_or("attention_multiplier", 1.0);
    FT_CHECK(c.attention_multiplier > 0, "[config] ", source, ": 'attention_multiplier' must be > 0, got ",
             c.attention_multiplier);
    c.residual_multiplier = r.number_or("residual_multiplier", 1.0);
    c.logits_scaling = r.number_or("logits_scaling", 1.0);
  }
  if (c.phi3()) {
    // Phi3Config: dropout on the sublayers' outputs (resid_pdrop), applied in training; its
    // embd_pdrop is read past, as transformers' Phi-3 never applies it. No biases (Phi-3's
    // projections have none whatever the config says: a config saying otherwise is refused).
    c.residual_dropout = r.number_or("resid_pdrop", 0.0);
    r.number_or("embd_pdrop", 0.0);
    FT_CHECK(!c.qkv_bias && !c.mlp_bias, "[config] ", source, ": phi3 has no biases (attention_bias, mlp_bias)");
  }
  if (c.mixtral() || c.model_type == "qwen2_moe" || c.model_type == "qwen3_moe" || c.olmoe() || c.gpt_oss()) {
    parse_experts(r, c);
  }
  if (c.gpt_oss()) {
    // OpenAI's configs name the context the rotary embedding was trained at; the YaRN parameters'
    // original_max_position_embeddings is what transformers uses.
    r.integer_or("initial_context_length", c.rope.original_max_position_embeddings);
  }
  if (c.olmoe()) {
    c.clip_qkv = r.number_or("clip_qkv", 0.0);  // (null: none)
    FT_CHECK(std::isfinite(c.clip_qkv) && c.clip_qkv >= 0, "[config] ", source, ": 'clip_qkv' must be null or a number > 0, got ",
             c.clip_qkv);
  }
  if (c.model_type == "gemma") {
    FT_CHECK(!r.boolean_or("use_bidirectional_attention", false), "[config] ", source,
             ": use_bidirectional_attention is not supported: libft trains causal language models");
  }
  const bool own_windows = c.model_type == "gemma2" || c.gemma3() || c.olmo3();
  if (!own_windows) c.layer_window.assign(c.num_hidden_layers, 0);
  auto window = r.optional_integer("sliding_window");
  r.used.insert("layer_types");
  if (own_windows) {
    // parse_gemma2, parse_gemma3 or parse_olmo3 set the windows
  } else if (c.model_type == "mistral" || c.phi3() || c.mixtral()) {
    if (window) c.layer_window.assign(c.num_hidden_layers, *window);
  } else if (c.gpt_oss()) {
    // GptOssConfig: layer_types, else sliding-window layers (128) alternating with global ones,
    // the first sliding.
    const int64_t w = window.value_or(128);
    FT_CHECK(w > 0, "[config] ", source, ": 'sliding_window' must be > 0, got ", w);
    if (r.has("layer_types")) {
      read_layer_types(r, c, w);
    } else {
      for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_window[static_cast<size_t>(i)] = i % 2 == 0 ? w : 0;
    }
  } else if (c.model_type == "qwen3_moe") {
    // Qwen3MoeConfig: one window for every layer, where use_sliding_window says so.
    if (r.boolean_or("use_sliding_window", false) && window) c.layer_window.assign(c.num_hidden_layers, *window);
  } else if (c.model_type == "smollm3") {
    // SmolLM3Config: no_rope_layers (1: the layer turns q and k, 0: NoPE), else every
    // no_rope_layer_interval-th layer without; layer_types, else the NoPE layers slide where
    // use_sliding_window says so.
    const int64_t interval = r.integer_or("no_rope_layer_interval", 4);
    c.layer_rope.assign(c.num_hidden_layers, true);
    if (r.has("no_rope_layers")) {
      const json& flags = r.get("no_rope_layers");
      FT_CHECK(flags.is_array() && static_cast<int64_t>(flags.size()) == c.num_hidden_layers, "[config] ", source,
               ": no_rope_layers must list 0 or 1 for each of the ", c.num_hidden_layers, " layers, got ", flags.dump());
      for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
        const json& f = flags[static_cast<size_t>(i)];
        FT_CHECK(f.is_number_integer() && (f.get<int64_t>() == 0 || f.get<int64_t>() == 1), "[config] ", source,
                 ": no_rope_layers[", i, "] must be 0 or 1, got ", f.dump());
        c.layer_rope[static_cast<size_t>(i)] = f.get<int64_t>() == 1;
      }
    } else {
      r.used.insert("no_rope_layers");
      FT_CHECK(interval > 0, "[config] ", source, ": 'no_rope_layer_interval' must be > 0, got ", interval);
      for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_rope[static_cast<size_t>(i)] = (i + 1) % interval != 0;
    }
    const bool sliding = r.boolean_or("use_sliding_window", false);
    if (r.has("layer_types")) {
      read_layer_types(r, c, window);
    } else if (sliding && window) {
      for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
        if (!c.layer_rope[static_cast<size_t>(i)]) c.layer_window[static_cast<size_t>(i)] = *window;
      }
    }
  } else if (c.model_type == "qwen2" || c.model_type == "qwen3" || c.model_type == "qwen2_moe") {
    if (r.has("layer_types")) {
      read_layer_types(r, c, window);
    } else if (r.boolean_or("use_sliding_window", false)) {
      FT_CHECK(window.has_value(), "[config] ", source, ": use_sliding_window needs sliding_window");
      int64_t first = r.integer_or("max_window_layers", 0);
      for (int64_t i = first; i < c.num_hidden_layers; ++i) c.layer_window[i] = *window;
    }
  } else if (window) {
    FT_FAIL("[config] ", source, ": sliding_window is not supported for model_type '", c.model_type, "'");
  }

  if (c.gpt_oss() && j.contains("quantization_config")) {
    // gpt-oss as OpenAI released it: the experts in MXFP4 (the rest, modules_to_not_convert, as
    // they are), which io::load_weights dequantizes.
    r.used.insert("quantization_config");
    const json& q = j.at("quantization_config");
    FT_CHECK(q.is_object() && q.value("quant_method", "") == "mxfp4", "[config] ", source,
             ": gpt_oss's quantization_config must be quant_method 'mxfp4', got ", q.dump());
    for (const auto& [key, value] : q.items()) {
      FT_CHECK(key == "quant_method" || key == "modules_to_not_convert" || key == "dequantize", "[config] ", source,
               ": quantization_config: unknown key '", key, "'");
    }
    c.mxfp4_experts = true;
  }
  FT_CHECK(!j.contains("quantization_config") || c.mxfp4_experts, "[config] ", source,
           ": quantized checkpoints (quantization_config) are not supported (but gpt_oss's mxfp4 experts)");
  for (const auto& [key, value] : j.items()) {
    FT_CHECK(r.used.count(key) || kHarmlessKeys.count(key), "[config] ", source, ": unknown key '", key,
             "' (libft does not know whether it changes the model; remove it if it does not)");
  }
  c.validate(source);
  return c;
}
}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  return parse_model_config(parse_json_strict(json_text, source), source);
}

ModelConfig load_model_config(const std::string& path) { return parse_model_config(read_text_file(path), path); }

std::vector<int64_t> load_generation_eos(const std::string& dir) {
  const std::string path = dir + "/generation_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return {};
  const json j = load_json_file(path);
  FT_CHECK(j.is_object(), "[config] ", path, ": expected a JSON object");
  std::vector<int64_t> ids;
  const auto it = j.find("eos_token_id");
  if (it == j.end() || it->is_null()) return ids;
  const bool list = it->is_array();
  for (const json& v : list ? *it : json::array({*it})) {
    FT_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0, "[config] ", path,
             ": eos_token_id must be a token id or a list of them, not ", it->dump());
    ids.push_back(v.get<int64_t>());
  }
  return ids;
}

namespace {
// rope_scaling / rope_parameters for `r` (without rope_theta).
json rope_json(const RopeConfig& r) {
  switch (r.type) {
    case RopeType::Default: return {{"rope_type", "default"}};
    case RopeType::Linear: return {{"rope_type", "linear"}, {"factor", r.factor}};
    case RopeType::Llama3:
      return {{"rope_type", "llama3"},
              {"factor", r.factor},
              {"low_freq_factor", r.low_freq_factor},
              {"high_freq_factor", r.high_freq_factor},
              {"original_max_position_embeddings", r.original_max_position_embeddings}};
    case RopeType::LongRope:
      // (the attention factor written as the number it is, so no reader recomputes it differently)
      return {{"rope_type", "longrope"},
              {"short_factor", r.short_factor},
              {"long_factor", r.long_factor},
              {"factor", r.factor},
              {"attention_factor", r.attention_factor},
              {"original_max_position_embeddings", r.original_max_position_embeddings}};
    case RopeType::Yarn: {
      json y = {{"rope_type", "yarn"},
                {"factor", r.factor},
                {"attention_factor", r.attention_factor},
                {"beta_fast", r.beta_fast},
                {"beta_slow", r.beta_slow},
                {"original_max_position_embeddings", r.original_max_position_embeddings}};
      if (!r.truncate) y["truncate"] = false;  // (the default left out: transformers before 4.56 has no such key)
      return y;
    }
  }
  FT_FAIL("[config] unknown rope type");
}
}  // namespace

std::string model_config_to_json(const ModelConfig& c) {
  json j;
  const std::string arch = c.model_type == "llama"     ? "LlamaForCausalLM"
                           : c.model_type == "mistral" ? "MistralForCausalLM"
                           : c.model_type == "qwen2"   ? "Qwen2ForCausalLM"
                           : c.granite()               ? "GraniteForCausalLM"
                           : c.model_type == "gemma"   ? "GemmaForCausalLM"
                           : c.model_type == "gemma2"  ? "Gemma2ForCausalLM"
                           : c.gemma3()                ? "Gemma3ForCausalLM"
                           : c.phi3()                  ? "Phi3ForCausalLM"
                           : c.model_type == "smollm3" ? "SmolLM3ForCausalLM"
                           : c.olmo3()                 ? "Olmo3ForCausalLM"
                           : c.mixtral()               ? "MixtralForCausalLM"
                           : c.model_type == "qwen3_moe" ? "Qwen3MoeForCausalLM"
                           : c.model_type == "qwen2_moe" ? "Qwen2MoeForCausalLM"
                           : c.olmoe()                 ? "OlmoeForCausalLM"
                           : c.gpt_oss()               ? "GptOssForCausalLM"
                           : c.olmo()                  ? "Olmo2ForCausalLM"
                                                       : "Qwen3ForCausalLM";
  j["architectures"] = json::array({arch});
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  if (c.model_type == "gemma") {
    j["hidden_act"] = c.hidden_act == Activation::Gelu ? "gelu" : "gelu_pytorch_tanh";
  } else if (c.gemma()) {
    j["hidden_activation"] = "gelu_pytorch_tanh";
  } else {
    j["hidden_act"] = "silu";
  }
  j["initializer_range"] = c.initializer_range;
  j["attention_dropout"] = c.attention_dropout;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.model_type != "qwen2" && c.model_type != "qwen2_moe" && !c.phi3() && !c.mixtral()) j["attention_bias"] = c.qkv_bias;
  if (c.model_type == "qwen2_moe") {
    j["qkv_bias"] = c.qkv_bias;
    j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
  }
  if (c.mixtral()) {
    j["num_local_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["router_jitter_noise"] = 0.0;
  } else if (c.gpt_oss()) {
    j["num_local_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["swiglu_limit"] = c.swiglu_limit;
  } else if (c.olmoe()) {
    j["num_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["clip_qkv"] = c.clip_qkv > 0 ? json(c.clip_qkv) : json(nullptr);
  } else if (c.num_experts > 0) {
    j["num_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["norm_topk_prob"] = c.norm_topk_prob;
    json dense = json::array();
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      if (!c.moe_in_layer(i)) dense.push_back(i);
    }
    j["mlp_only_layers"] = dense;
    j["decoder_sparse_step"] = 1;
  }
  if (c.num_experts > 0) {
    j["output_router_logits"] = c.output_router_logits;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
  }
  if (c.model_type == "llama" || c.granite() || c.model_type == "smollm3") j["mlp_bias"] = c.mlp_bias;
  if (c.model_type == "smollm3") {
    json flags = json::array();
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) flags.push_back(c.rope_in_layer(i) ? 1 : 0);
    j["no_rope_layers"] = flags;
  }
  if (c.phi3()) {
    j["resid_pdrop"] = c.residual_dropout;
    j["embd_pdrop"] = 0.0;
    j["partial_rotary_factor"] = c.partial_rotary_factor;
    j["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
  }
  if (c.granite()) {
    j["embedding_multiplier"] = c.embedding_multiplier;
    j["attention_multiplier"] = c.attention_scale();  // (0, not given, is 1/√head_dim)
    j["residual_multiplier"] = c.residual_multiplier;
    j["logits_scaling"] = c.logits_scaling;
  }
  if (c.gemma3() || c.olmo3()) {
    // transformers 5's layout: one rotary embedding per layer type, each with its theta.
    const RopeConfig local = c.sliding_rope.value_or(RopeConfig::with_theta(1e4));
    json full = rope_json(c.rope), sliding = rope_json(local);
    full["rope_theta"] = c.rope.theta;
    sliding["rope_theta"] = local.theta;
    j["rope_parameters"] = {{"full_attention", full}, {"sliding_attention", sliding}};
  } else {
    j["rope_theta"] = c.rope.theta;
    j["rope_scaling"] = c.rope.type == RopeType::Default ? json(nullptr) : rope_json(c.rope);
  }
  if (c.model_type == "gemma2" || c.gemma3()) {
    // Gemma2Config and Gemma3TextConfig type it as an int (and check): written so where it is whole.
    const double scalar = c.query_pre_attn_scalar;
    j["query_pre_attn_scalar"] = scalar == std::floor(scalar) && scalar < 0x1p53 ? json(static_cast<int64_t>(scalar)) : json(scalar);
    // (null, not absent, for none: an absent key is Gemma 2's default cap)
    j["final_logit_softcapping"] = c.final_logit_softcapping > 0 ? json(c.final_logit_softcapping) : json(nullptr);
    j["attn_logit_softcapping"] = c.attn_logit_softcapping > 0 ? json(c.attn_logit_softcapping) : json(nullptr);
  }
  if (c.gemma()) j["use_bidirectional_attention"] = false;
  int64_t window = 0;
  for (auto w : c.layer_window) window = std::max(window, w);
  if (c.model_type == "mistral" || c.phi3() || c.mixtral()) {
    j["sliding_window"] = window > 0 ? json(window) : json(nullptr);
  } else if (c.model_type == "qwen3_moe") {
    j["sliding_window"] = window > 0 ? json(window) : json(nullptr);
    j["use_sliding_window"] = window > 0;
  } else if (c.model_type == "qwen2" || c.model_type == "qwen3" || c.model_type == "smollm3" ||
             c.model_type == "gemma2" || c.gemma3() || c.olmo3() || c.model_type == "qwen2_moe" || c.gpt_oss()) {
    // (Gemma's and OLMo 3's configs build both masks whatever the layers are: a window is always
    // written.)
    j["sliding_window"] = window > 0 ? json(window) : c.gemma() || c.olmo3() ? json(4096) : json(nullptr);
    if (!c.gemma() && !c.olmo3() && !c.gpt_oss()) j["use_sliding_window"] = window > 0;
    json types = json::array();
    for (auto w : c.layer_window) types.push_back(w > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
  }
  j["bos_token_id"] = c.bos_token_id ? json(*c.bos_token_id) : json(nullptr);
  j["pad_token_id"] = c.pad_token_id ? json(*c.pad_token_id) : json(nullptr);
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  else if (c.eos_token_ids.empty()) j["eos_token_id"] = nullptr;
  else j["eos_token_id"] = c.eos_token_ids;
  j["torch_dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  j["transformers_version"] = "5.17.0";
  return j.dump(2) + "\n";
}

}  // namespace ft::io
