// Model building blocks against float64 / hand-written references, and the errors users see.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <numbers>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include "ft/adapt/lora.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/util/error.h"
#include "ft/io/hf_config.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/model/generate.h"
#include "ft/model/inspect.h"
#include "ft/util/autocast.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace ft;

namespace {

using test::tiny_config;

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const ::ft::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an ft::Error";
  return "";
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("libft_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

const char* kLlamaJson = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 32,
  "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "eos_token_id": [5, 6],
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
})";

TEST(Config, ParsesLegacyLlama3Layout) {
  auto c = io::parse_model_config(kLlamaJson, "config.json");
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.rope.type, io::RopeType::Llama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{5, 6}));
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  // And what we write parses back to the same thing.
  auto again = io::parse_model_config(io::model_config_to_json(c), "written");
  EXPECT_EQ(again.rope.type, c.rope.type);
  EXPECT_DOUBLE_EQ(again.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(again.eos_token_ids, c.eos_token_ids);
}

// Qwen3, as transformers 5 writes it (rope_parameters, layer_types): one attention_bias for the four
// projections, per-head q/k norms, windows per layer only where use_sliding_window says so; what
// libft writes back parses to the same model, and the model has HF's q_norm/k_norm parameters.
TEST(Config, ParsesQwen3) {
  const std::string json = R"({
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 97, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 24, "attention_bias": true, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "use_sliding_window": true,
    "sliding_window": 5, "max_window_layers": 28,
    "layer_types": ["full_attention", "sliding_attention", "full_attention"], "attention_dropout": 0.0
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.qk_norm());
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.o_bias);
  EXPECT_EQ(c.head_dim, 24);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{0, 5, 0}));
  auto again = io::parse_model_config(io::model_config_to_json(c), "written");
  EXPECT_EQ(again.model_type, "qwen3");
  EXPECT_TRUE(again.o_bias);
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_DOUBLE_EQ(again.rope.theta, 1e6);
  EXPECT_NE(io::model_config_to_json(c).find("Qwen3ForCausalLM"), std::string::npos);
  model::CausalLM m(c);
  auto params = m->named_parameters();
  ASSERT_TRUE(params.contains("model.layers.2.self_attn.q_norm.weight"));
  EXPECT_EQ(params["model.layers.2.self_attn.k_norm.weight"].sizes(), (std::vector<int64_t>{24}));
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.o_proj.bias"));
  // The other families have no such norms; a qwen3 config built in C++ cannot split the bias.
  EXPECT_FALSE(model::CausalLM(tiny_config("qwen2"))->named_parameters().contains("model.layers.0.self_attn.q_norm.weight"));
  c.o_bias = false;
  EXPECT_NE(expect_error([&] { c.validate("built"); }).find("built: qwen3 has biases on all four"), std::string::npos);
  c.model_type = "gemma2_text";
  EXPECT_NE(expect_error([&] { c.validate("built"); }).find("model_type 'gemma2_text' is not supported"), std::string::npos);
}

// `text` with its first `from` replaced by `to` (a failure where `from` is not in it): one key of a
// config.json edited.
std::string edited(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

// Gemma 3's text model as the Hub's gemma-3-1b config.json has it (transformers 4.x layout:
// rope_theta and rope_local_base_freq, sliding_window_pattern), shrunk: every sixth layer global,
// the local layers with their own rotary base, Gemma's defaults where keys are absent (a tied head),
// and what libft writes back (transformers 5's layout) parses to the same model.
TEST(Config, ParsesGemma3Text) {
  const std::string json = R"({
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 32,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 48, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 13, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.gemma() && c.qk_norm() && c.norm_unit_offset() && c.sandwich_norms() && c.scaled_embeddings());
  EXPECT_EQ(c.hidden_act, io::Activation::GeluTanh);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{512, 512, 512, 512, 512, 0, 512, 512, 512, 512, 512, 0, 512}));
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  ASSERT_TRUE(c.sliding_rope.has_value());
  EXPECT_DOUBLE_EQ(c.sliding_rope->theta, 1e4);
  EXPECT_DOUBLE_EQ(c.attention_scale(), 1.0 / 16);
  EXPECT_EQ(c.final_logit_softcapping, 0.0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1, 106}));
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Gemma3ForCausalLM"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_DOUBLE_EQ(again.sliding_rope->theta, 1e4);
  EXPECT_DOUBLE_EQ(again.rope.theta, 1e6);
  EXPECT_DOUBLE_EQ(again.query_pre_attn_scalar, 256);
  EXPECT_TRUE(again.tie_word_embeddings);

  // HF's module names, and norms that start at zero (offsets from one).
  model::CausalLM m(c);
  model::init_weights(m, 1);
  auto params = m->named_parameters();
  for (const char* name : {"model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
                           "model.layers.0.self_attn.q_norm.weight", "model.norm.weight"}) {
    ASSERT_TRUE(params.contains(name)) << name;
    EXPECT_EQ(params[name].abs().max().item<double>(), 0.0) << name;
  }
  EXPECT_FALSE(params.contains("lm_head.weight"));

  // What a Gemma 3 model might say that libft cannot honour, each named.
  auto error_for = [&](const std::string& from, const std::string& to) {
    return expect_error([&] { io::parse_model_config(edited(json, from, to), "g.json"); });
  };
  EXPECT_NE(error_for(R"("attn_logit_softcapping": null)", R"("attn_logit_softcapping": 50.0)")
                .find("attn_logit_softcapping is not supported for gemma3_text"),
            std::string::npos);
  EXPECT_NE(error_for(R"("use_cache": true)", R"("use_cache": true, "use_bidirectional_attention": true)")
                .find("use_bidirectional_attention"),
            std::string::npos);
  EXPECT_NE(error_for(R"("gelu_pytorch_tanh")", R"("gelu")").find("hidden_activation 'gelu' is not supported"),
            std::string::npos);
  EXPECT_NE(error_for(R"("model_type": "gemma3_text")", R"("model_type": "gemma3")").find("Gemma3ForConditionalGeneration"),
            std::string::npos);
  EXPECT_NE(error_for(R"("rope_scaling": null)", R"("rope_parameters": {"rope_type": "default"})")
                .find("one entry per layer type"),
            std::string::npos);
  EXPECT_NE(error_for(R"("final_logit_softcapping": null)", R"("final_logit_softcapping": -1)")
                .find("'final_logit_softcapping' must be > 0"),
            std::string::npos);
  EXPECT_NE(error_for(R"("rope_local_base_freq": 10000)", R"("rope_local_base_freq": 0)")
                .find("the sliding-window layers' 'rope_theta' must be a finite number > 0"),
            std::string::npos);
}

// Granite 3 as the Hub's granite-3.1-2b-instruct config.json has it, shrunk: its four multipliers
// read, shown and written back; they belong to granite alone.
TEST(Config, ParsesGranite) {
  const std::string json = R"({
    "architectures": ["GraniteForCausalLM"], "attention_bias": false, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "granite",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 5000000.0,
    "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": true,
    "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.granite() && !c.gemma());
  EXPECT_DOUBLE_EQ(c.embedding_multiplier, 12.0);
  EXPECT_DOUBLE_EQ(c.attention_scale(), 0.015625);
  EXPECT_DOUBLE_EQ(c.residual_multiplier, 0.22);
  EXPECT_DOUBLE_EQ(c.logits_scaling, 8.0);
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("GraniteForCausalLM"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_DOUBLE_EQ(again.attention_multiplier, 0.015625);
  EXPECT_DOUBLE_EQ(again.residual_multiplier, 0.22);
  model::CausalLM m(c);
  EXPECT_EQ(m->model->layers->ptr<model::DecoderLayerImpl>(1)->residual_multiplier, 0.22);
  EXPECT_FALSE(m->model->layers->ptr<model::DecoderLayerImpl>(0)->self_attn->default_scale);
  const std::string shown = model::describe(m);
  EXPECT_NE(shown.find("granite        embeddings x 12, scores x 0.015625, sublayer outputs x 0.22, logits / 8"),
            std::string::npos) << shown;
  std::string bad = json;
  bad.replace(bad.find(R"("logits_scaling": 8.0)"), 21, R"("logits_scaling": 0.0)");
  EXPECT_NE(expect_error([&] { io::parse_model_config(bad, "g.json"); }).find("g.json: 'logits_scaling' must be a finite number > 0"),
            std::string::npos);
  // The multipliers are Granite's: a Llama config naming one is refused as an unknown key, and a
  // config built in C++ that sets one is invalid.
  io::ModelConfig llama = tiny_config("llama");
  llama.residual_multiplier = 0.5;
  EXPECT_NE(expect_error([&] { llama.validate("built"); }).find("only granite has 'residual_multiplier'"), std::string::npos);
}

// Phi-4-mini as the Hub's config.json has it, shrunk (head_dim 16: 12 dimensions turn, so six
// longrope factors each), and Phi-3-mini-128k's older spelling of longrope ("su"): the packed
// projections, the rotary embedding's parts, the window and resid_pdrop read, shown and written back.
TEST(Config, ParsesPhi3) {
  const std::string json = R"({
    "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "bos_token_id": 199999, "embd_pdrop": 0.0,
    "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "interpolate_factor": 1, "lm_head_bias": false, "max_position_embeddings": 131072,
    "mlp_bias": false, "model_type": "phi3", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
    "partial_rotary_factor": 0.75, "resid_pdrop": 0.1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1, 1.118, 1.25, 1.398, 1.564, 1.75],
                     "short_factor": [1, 1.118, 1.25, 1.398, 1.564, 1.75], "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 300
  })";
  // (Phi-4-mini's config names keys of Microsoft's own modelling code that transformers reads past:
  // libft refuses what it does not know.)
  EXPECT_NE(expect_error([&] { io::parse_model_config(json, "config.json"); }).find("unknown key 'full_attn_mod'"),
            std::string::npos);
  std::string plain = json;
  for (const std::string key : {R"("full_attn_mod": 1, )", R"("interpolate_factor": 1, )", R"("lm_head_bias": false, )"}) {
    plain.erase(plain.find(key), key.size());
  }
  auto c = io::parse_model_config(plain, "config.json");
  EXPECT_TRUE(c.phi3() && c.packed_projections());
  EXPECT_EQ(c.rotary_dim(), 12);
  EXPECT_EQ(c.rope.type, io::RopeType::LongRope);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rope.attention_factor, std::sqrt(1 + std::log(32.0) / std::log(4096.0)));
  EXPECT_EQ(c.rope.long_factor.size(), 6u);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{262144, 262144}));
  EXPECT_DOUBLE_EQ(c.residual_dropout, 0.1);
  model::CausalLM m(c);
  auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(0);
  EXPECT_TRUE(layer->self_attn->qkv_proj && !layer->self_attn->q_proj);
  EXPECT_EQ(layer->self_attn->qkv_proj->weight.sizes(), (std::vector<int64_t>{(4 + 2 * 2) * 16, 64}));
  EXPECT_TRUE(layer->mlp->gate_up_proj && !layer->mlp->gate_proj);
  EXPECT_EQ(layer->mlp->gate_up_proj->weight.sizes(), (std::vector<int64_t>{2 * 96, 64}));
  EXPECT_EQ(m->inv_freq().size(0), 6);
  // Short factors up to the original context, long ones past it.
  EXPECT_FALSE(m->long_rope(4095));
  EXPECT_TRUE(m->long_rope(4096));
  const std::string shown = model::describe(m);
  for (const char* part : {"q/k/v packed in qkv_proj", "gate/up packed in gate_up_proj",
                           "rope longrope (theta 10000, factor 32, long factors past 4096 positions, cos/sin x 1.1",
                           "turning 12 of 16 dims", "dropout        0.1 on sublayer outputs"}) {
    EXPECT_NE(shown.find(part), std::string::npos) << part << "\n" << shown;
  }
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Phi3ForCausalLM"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_EQ(again.rope.long_factor, c.rope.long_factor);
  EXPECT_EQ(again.rope.short_factor, c.rope.short_factor);
  EXPECT_DOUBLE_EQ(again.rope.attention_factor, c.rope.attention_factor);
  EXPECT_DOUBLE_EQ(again.partial_rotary_factor, 0.75);
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_DOUBLE_EQ(again.residual_dropout, 0.1);

  // transformers 5's layout: the fraction and the original context inside rope_parameters too (its
  // fraction wins); and Phi-3-mini-128k's "su".
  std::string v5 = plain;
  v5.replace(v5.find(R"("rope_scaling")"), 14, R"("rope_parameters")");
  v5.replace(v5.find(R"("type": "longrope"})"), 19,
             R"("type": "longrope", "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": 4096})");
  v5.replace(v5.find(R"([1, 1.118, 1.25, 1.398, 1.564, 1.75])"), 36, "[1, 2, 3, 4]");
  v5.replace(v5.find(R"([1, 1.118, 1.25, 1.398, 1.564, 1.75])"), 36, "[1, 1, 1, 1]");
  EXPECT_EQ(io::parse_model_config(v5, "v5.json").rotary_dim(), 8);
  std::string su = plain;
  su.replace(su.find(R"("type": "longrope")"), 18, R"("type": "su")");
  EXPECT_EQ(io::parse_model_config(su, "su.json").rope.type, io::RopeType::LongRope);

  auto error_for = [&](const std::string& from, const std::string& to) {
    std::string bad = plain;
    bad.replace(bad.find(from), from.size(), to);
    return expect_error([&] { io::parse_model_config(bad, "p.json"); });
  };
  EXPECT_NE(error_for(R"("partial_rotary_factor": 0.75)", R"("partial_rotary_factor": 1.0)")
                .find("longrope's short_factor has 6 entries, the rotary embedding turns 16 dimensions of each head (8 frequencies)"),
            std::string::npos);
  EXPECT_NE(error_for(R"("partial_rotary_factor": 0.75)", R"("partial_rotary_factor": 0.7)")
                .find("must be even"),
            std::string::npos);
  EXPECT_NE(error_for(R"("attention_bias": false)", R"("attention_bias": true)").find("phi3 has no biases"),
            std::string::npos);
  EXPECT_NE(error_for(R"("resid_pdrop": 0.1)", R"("resid_pdrop": 1.5)").find("'resid_pdrop' must be in [0, 1)"),
            std::string::npos);
  EXPECT_NE(error_for(R"("long_factor": [1, )", R"("long_factor": [0, )").find("'long_factor' must hold numbers > 0"),
            std::string::npos);
  EXPECT_NE(error_for(R"(, "type": "longrope")", "").find("option 'long_factor' is not supported for rope type 'default'"),
            std::string::npos);
  // Phi-3's parts belong to phi3: a llama config with longrope, a turning fraction or resid_pdrop is refused.
  std::string llama = plain;
  llama.replace(llama.find(R"("model_type": "phi3")"), 20, R"("model_type": "llama")");
  llama.replace(llama.find(R"("Phi3ForCausalLM")"), 17, R"("LlamaForCausalLM")");
  EXPECT_NE(expect_error([&] { io::parse_model_config(llama, "l.json"); }).find("longrope with phi3"), std::string::npos);
  io::ModelConfig built = tiny_config("llama");
  built.partial_rotary_factor = 0.5;
  EXPECT_NE(expect_error([&] { built.validate("built"); }).find("only phi3 has 'partial_rotary_factor'"), std::string::npos);
  EXPECT_NE(expect_error([&] {
              io::parse_model_config(R"({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "longrope", "short_factor": [1, 1], "long_factor": [1, 1]}})", "l.json");
            }).find("rope type 'longrope' is not supported (supported: default, linear, llama3, yarn; longrope with phi3)"),
            std::string::npos);
}

// SmolLM3 as the Hub's SmolLM3-3B config.json has it, shrunk to 4 layers: every fourth layer without
// a rotary embedding (no_rope_layers), read, shown and written back; the interval where the list is
// absent, and sliding NoPE layers where use_sliding_window says so.
TEST(Config, ParsesSmolLM3) {
  const std::string json = R"({
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": null,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention"],
    "max_position_embeddings": 65536, "max_window_layers": 28, "mlp_bias": false, "model_type": "smollm3",
    "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0], "num_attention_heads": 4, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "pad_token_id": 128004, "pretraining_tp": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": null, "rope_theta": 5000000.0, "sliding_window": null, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0.dev0", "use_cache": false, "use_sliding_window": false, "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_EQ(c.layer_rope, (std::vector<bool>{true, true, true, false}));
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{0, 0, 0, 0}));
  model::CausalLM m(c);
  EXPECT_TRUE(m->model->layers->ptr<model::DecoderLayerImpl>(0)->self_attn->use_rope);
  EXPECT_FALSE(m->model->layers->ptr<model::DecoderLayerImpl>(3)->self_attn->use_rope);
  EXPECT_NE(model::describe(m).find("no rotary embedding (NoPE) in 1 of 4 layers"), std::string::npos);
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("SmolLM3ForCausalLM"), std::string::npos);
  EXPECT_EQ(io::parse_model_config(written, "written").layer_rope, c.layer_rope);
  // Without the list: every no_rope_layer_interval-th layer; without layer_types, the NoPE layers slide
  // where use_sliding_window and sliding_window say so.
  std::string derived = json;
  for (const std::string key : {R"("no_rope_layers": [1, 1, 1, 0], )",
                                R"("layer_types": ["full_attention", "full_attention", "full_attention", "full_attention"],
    )"}) {
    const auto at = derived.find(key);
    ASSERT_NE(at, std::string::npos) << key;
    derived.erase(at, key.size());
  }
  derived.replace(derived.find(R"("no_rope_layer_interval": 4)"), 27, R"("no_rope_layer_interval": 2)");
  derived.replace(derived.find(R"("sliding_window": null)"), 22, R"("sliding_window": 8)");
  derived.replace(derived.find(R"("use_sliding_window": false)"), 27, R"("use_sliding_window": true)");
  auto d = io::parse_model_config(derived, "derived.json");
  EXPECT_EQ(d.layer_rope, (std::vector<bool>{true, false, true, false}));
  EXPECT_EQ(d.layer_window, (std::vector<int64_t>{0, 8, 0, 8}));
  std::string bad = json;
  bad.replace(bad.find("[1, 1, 1, 0]"), 12, "[1, 1, 2, 0]");
  EXPECT_NE(expect_error([&] { io::parse_model_config(bad, "s.json"); }).find("s.json: no_rope_layers[2] must be 0 or 1"),
            std::string::npos);
  bad = json;
  bad.replace(bad.find("[1, 1, 1, 0]"), 12, "[1, 0]");
  EXPECT_NE(expect_error([&] { io::parse_model_config(bad, "s.json"); }).find("no_rope_layers must list 0 or 1 for each of the 4 layers"),
            std::string::npos);
  io::ModelConfig llama = tiny_config("llama");
  llama.layer_rope = {true, false};
  EXPECT_NE(expect_error([&] { llama.validate("built"); }).find("only smollm3 has layers without a rotary embedding"),
            std::string::npos);
}

// OLMo 2 as the Hub's OLMo-2-0425-1B config.json has it, shrunk: norms on the sublayers' outputs
// only and full-width q/k norms, from the model type alone; written back and read again.
TEST(Config, ParsesOlmo2) {
  const std::string json = R"({
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": null,
    "rope_theta": 500000, "tie_word_embeddings": false, "torch_dtype": "float32", "transformers_version": "4.52.0.dev0",
    "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.olmo() && c.qk_norm() && c.qk_norm_full_width());
  model::CausalLM m(c);
  auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(0);
  EXPECT_FALSE(layer->input_layernorm);
  EXPECT_FALSE(layer->pre_feedforward_layernorm);
  EXPECT_TRUE(layer->post_attention_layernorm->float_product && layer->post_feedforward_layernorm->float_product);
  EXPECT_EQ(layer->self_attn->q_norm->weight.size(0), 64);
  EXPECT_EQ(layer->self_attn->k_norm->weight.size(0), 64);
  EXPECT_NE(model::describe(m).find("norms on the sublayers' outputs (no input norms)"), std::string::npos);
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Olmo2ForCausalLM"), std::string::npos);
  EXPECT_TRUE(io::parse_model_config(written, "written").olmo());
  std::string bad = json;
  bad.replace(bad.find(R"("attention_bias": false)"), 23, R"("mlp_bias": true)");
  EXPECT_NE(expect_error([&] { io::parse_model_config(bad, "o.json"); }).find("olmo2 has no MLP biases"),
            std::string::npos);
}

// YaRN as Qwen2.5's model cards ask for long contexts (4.x's rope_scaling with "type"): the
// attention factor 0.1 · ln(factor) + 1, beta_fast 32 and beta_slow 1, truncated ramp ends; written
// back and read again; bad values named.
TEST(Config, ParsesYarn) {
  const std::string json = R"({
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 96,
    "max_position_embeddings": 131072, "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 300,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_EQ(c.rope.type, io::RopeType::Yarn);
  EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c.rope.attention_factor, 0.1 * std::log(4.0) + 1);
  EXPECT_DOUBLE_EQ(c.rope.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.rope.beta_slow, 1.0);
  EXPECT_TRUE(c.rope.truncate);
  model::CausalLM m(c);
  EXPECT_NE(model::describe(m).find("rope yarn (theta 1e+06, factor 4, original context 32768"), std::string::npos);
  auto again = io::parse_model_config(io::model_config_to_json(c), "written");
  EXPECT_EQ(again.rope.type, io::RopeType::Yarn);
  EXPECT_DOUBLE_EQ(again.rope.attention_factor, c.rope.attention_factor);
  EXPECT_EQ(again.rope.original_max_position_embeddings, 32768);
  EXPECT_TRUE(again.rope.truncate);

  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = json;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const std::string scaling = R"("factor": 4.0, "original_max_position_embeddings": 32768)";
  // DeepSeek's pair: the attention factor is their ratio.
  auto ds = io::parse_model_config(with(scaling, scaling + R"(, "mscale": 1.0, "mscale_all_dim": 0.5)"), "ds.json");
  EXPECT_DOUBLE_EQ(ds.rope.attention_factor, (0.1 * std::log(4.0) + 1) / (0.05 * std::log(4.0) + 1));
  // No original context: max_position_embeddings, as transformers fills it in.
  auto plain = io::parse_model_config(with(R"(, "original_max_position_embeddings": 32768)", ""), "p.json");
  EXPECT_EQ(plain.rope.original_max_position_embeddings, 131072);
  // truncate false survives a round trip.
  auto untruncated = io::parse_model_config(with(scaling, scaling + R"(, "truncate": false)"), "t.json");
  EXPECT_FALSE(untruncated.rope.truncate);
  EXPECT_FALSE(io::parse_model_config(io::model_config_to_json(untruncated), "written").rope.truncate);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(R"("factor": 4.0, )", ""), "f.json"); })
                .find("f.json: rope_scaling: rope type 'yarn' needs 'factor'"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(scaling, scaling + R"(, "truncate": 1)"), "t.json"); })
                .find("'truncate' must be true or false"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(scaling, scaling + R"(, "beta": 2)"), "b.json"); })
                .find("option 'beta' is not supported for rope type 'yarn'"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("32768}", "-5}"), "o.json"); })
                .find("'original_max_position_embeddings' must be a whole number > 0"),
            std::string::npos);
}

// OLMo 3 in the layout of the Hub's Olmo-3-7B config.json (4.x's keys), shrunk: no layer_types, so
// three of each four layers slide (window 4096); YaRN ×8 over 8192 positions with its given
// attention factor on the full-attention layers only, the sliding ones turning by plain rope of the
// same base. Written back (transformers 5's rope per layer type) and read again.
TEST(Config, ParsesOlmo3) {
  const std::string json = R"({
    "architectures": ["Olmo3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 65536, "model_type": "olmo3", "num_attention_heads": 4, "num_hidden_layers": 8,
    "num_key_value_heads": 4, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
    "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                     "original_max_position_embeddings": 8192, "rope_type": "yarn"},
    "rope_theta": 500000, "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0", "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.olmo() && c.olmo3() && c.qk_norm_full_width());
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{4096, 4096, 4096, 0, 4096, 4096, 4096, 0}));
  EXPECT_EQ(c.rope.type, io::RopeType::Yarn);
  EXPECT_DOUBLE_EQ(c.rope.attention_factor, 1.2079441541679836);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  ASSERT_TRUE(c.sliding_rope.has_value());
  EXPECT_EQ(c.sliding_rope->type, io::RopeType::Default);
  EXPECT_DOUBLE_EQ(c.sliding_rope->theta, 500000);
  model::CausalLM m(c);
  auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(0);
  EXPECT_FALSE(layer->input_layernorm);
  EXPECT_TRUE(layer->post_attention_layernorm->float_product);
  EXPECT_NE(model::describe(m).find("sliding window 4096 in 6 of 8 layers (their rope default, theta 500000)"),
            std::string::npos);
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Olmo3ForCausalLM"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_EQ(again.rope.type, io::RopeType::Yarn);
  EXPECT_DOUBLE_EQ(again.rope.attention_factor, c.rope.attention_factor);
  EXPECT_EQ(again.sliding_rope->type, io::RopeType::Default);
  EXPECT_DOUBLE_EQ(again.sliding_rope->theta, 500000);
  std::string flat = json;
  flat.replace(flat.find(R"("rope_theta": 500000,)"), 21, R"("rope_parameters": {"rope_type": "default"},)");
  flat.replace(flat.find(R"("rope_scaling")"), 14, R"("rope_scaling_unused")");
  EXPECT_NE(expect_error([&] { io::parse_model_config(flat, "o.json"); })
                .find("olmo3's rope_parameters has one entry per layer type (full_attention, sliding_attention), not 'rope_type'"),
            std::string::npos);
}

// Mixtral and Qwen3-MoE in the layouts of the Hub's Mixtral-8x7B and Qwen3-30B-A3B config.json,
// shrunk: the experts, their sizes and routing, the dense layers; written back and read again; bad
// values named.
TEST(Config, ParsesMixtureOfExperts) {
  const std::string mixtral = R"({
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 112,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 4, "num_experts_per_tok": 2,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": false,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": null,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": true,
    "vocab_size": 300
  })";
  auto c = io::parse_model_config(mixtral, "config.json");
  EXPECT_TRUE(c.mixtral());
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 112);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.moe_in_layer(0) && c.moe_in_layer(1));
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  {
    model::CausalLM m(c);
    auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(0);
    EXPECT_FALSE(layer->mlp);
    ASSERT_TRUE(layer->moe);
    EXPECT_TRUE(layer->moe->float_weights);
    const auto params = m->named_parameters();
    EXPECT_TRUE(params.contains("model.layers.1.block_sparse_moe.experts.7.w3.weight"));
    EXPECT_EQ(params["model.layers.1.block_sparse_moe.gate.weight"].sizes(), (std::vector<int64_t>{8, 64}));
    EXPECT_NE(model::describe(m).find("experts        8 of 112 units, 2 per token (weights renormalised), in 2 of 2 layers"),
              std::string::npos);
  }
  auto again = io::parse_model_config(io::model_config_to_json(c), "written");
  EXPECT_TRUE(again.mixtral() && again.num_experts == 8 && again.num_experts_per_tok == 2);
  EXPECT_DOUBLE_EQ(again.router_aux_loss_coef, 0.02);

  const std::string qwen = R"({
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 24, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 112, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [2], "model_type": "qwen3_moe", "moe_intermediate_size": 40,
    "norm_topk_prob": true, "num_attention_heads": 4, "num_experts": 16, "num_experts_per_tok": 8,
    "num_hidden_layers": 3, "num_key_value_heads": 2, "output_router_logits": false, "rms_norm_eps": 1e-06,
    "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": null,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
    "use_sliding_window": false, "vocab_size": 300
  })";
  auto q = io::parse_model_config(qwen, "config.json");
  EXPECT_EQ(q.num_experts, 16);
  EXPECT_EQ(q.moe_intermediate_size, 40);
  EXPECT_TRUE(q.norm_topk_prob && q.qk_norm());
  EXPECT_TRUE(q.moe_in_layer(0) && q.moe_in_layer(1) && !q.moe_in_layer(2));
  {
    model::CausalLM m(q);
    EXPECT_TRUE(m->model->layers->ptr<model::DecoderLayerImpl>(2)->mlp);
    const auto params = m->named_parameters();
    EXPECT_TRUE(params.contains("model.layers.0.mlp.experts.15.down_proj.weight"));
    EXPECT_TRUE(params.contains("model.layers.0.mlp.gate.weight"));
    EXPECT_TRUE(params.contains("model.layers.2.mlp.gate_proj.weight"));
    EXPECT_EQ(params["model.layers.0.mlp.experts.3.up_proj.weight"].sizes(), (std::vector<int64_t>{40, 64}));
    EXPECT_FALSE(m->model->layers->ptr<model::DecoderLayerImpl>(0)->moe->float_weights);
  }
  auto q2 = io::parse_model_config(io::model_config_to_json(q), "written");
  EXPECT_EQ(q2.num_experts, 16);
  EXPECT_TRUE(q2.norm_topk_prob && !q2.moe_in_layer(2) && q2.moe_in_layer(1));
  // transformers 5 saves num_experts as num_local_experts.
  std::string saved5 = qwen;
  saved5.replace(saved5.find(R"("num_experts": 16)"), 17, R"("num_local_experts": 16)");
  EXPECT_EQ(io::parse_model_config(saved5, "c.json").num_experts, 16);

  // Qwen2-MoE in the layout of Qwen1.5-MoE-A2.7B's config.json (4.x: no qkv_bias key, biases always).
  const std::string qwen2 = R"({
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 112, "max_position_embeddings": 8192, "max_window_layers": 21,
    "model_type": "qwen2_moe", "moe_intermediate_size": 40, "norm_topk_prob": false, "num_attention_heads": 4,
    "num_experts": 6, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 4,
    "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 96, "sliding_window": 32768, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": true, "use_sliding_window": false,
    "vocab_size": 300
  })";
  auto q3 = io::parse_model_config(qwen2, "config.json");
  EXPECT_TRUE(q3.qkv_bias && !q3.o_bias);
  EXPECT_EQ(q3.shared_expert_intermediate_size, 96);
  EXPECT_EQ(q3.layer_window, (std::vector<int64_t>{0, 0}));
  {
    model::CausalLM m(q3);
    const auto params = m->named_parameters();
    EXPECT_EQ(params["model.layers.1.mlp.shared_expert.up_proj.weight"].sizes(), (std::vector<int64_t>{96, 64}));
    EXPECT_EQ(params["model.layers.1.mlp.shared_expert_gate.weight"].sizes(), (std::vector<int64_t>{1, 64}));
    EXPECT_TRUE(params.contains("model.layers.0.self_attn.q_proj.bias"));
    EXPECT_NE(model::describe(m).find("and a gated shared expert of 96 units"), std::string::npos);
  }
  auto q4 = io::parse_model_config(io::model_config_to_json(q3), "written");
  EXPECT_TRUE(q4.qkv_bias && q4.shared_expert_intermediate_size == 96 && q4.num_experts == 6);

  auto with = [](std::string s, const std::string& from, const std::string& to) {
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(mixtral, R"("sliding_window": null)", R"("router_jitter_noise": 0.01)"), "m.json"); })
                .find("router_jitter_noise 0.01 is not supported"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(mixtral, R"("num_experts_per_tok": 2)", R"("num_experts_per_tok": 9)"), "m.json"); })
                .find("m.json: num_experts_per_tok must be in [1, 8], got 9"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(qwen, R"("mlp_only_layers": [2])", R"("mlp_only_layers": [3])"), "q.json"); })
                .find("mlp_only_layers holds 3, not a layer index in [0, 3)"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(qwen, R"("num_experts": 16)", R"("num_experts": 16, "num_local_experts": 8)"), "q.json"); })
                .find("num_experts (16) and num_local_experts differ"),
            std::string::npos);
}

// OLMoE in the layout of the Hub's OLMoE-1B-7B-0924 config.json, shrunk: experts of intermediate_size
// in every layer, q and k normed over all heads (as OLMo 2's, but with Llama's pre-norm block),
// clip_qkv; the defaults where keys are absent (OlmoeConfig's); written back and read again.
TEST(Config, ParsesOlmoe) {
  const std::string olmoe = R"({
    "architectures": ["OlmoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "clip_qkv": null,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 32, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": false,
    "num_attention_heads": 4, "num_experts": 16, "num_experts_per_tok": 8, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "output_router_logits": false, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": null, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(olmoe, "config.json");
  EXPECT_TRUE(c.olmoe() && !c.olmo());
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.qk_norm() && c.qk_norm_full_width());
  EXPECT_EQ(c.clip_qkv, 0.0);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.01);
  {
    model::CausalLM m(c);
    auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(1);
    ASSERT_TRUE(layer->moe);
    EXPECT_TRUE(layer->input_layernorm);  // (Llama's pre-norm block, not OLMo 2's)
    const auto params = m->named_parameters();
    EXPECT_EQ(params["model.layers.0.self_attn.q_norm.weight"].sizes(), (std::vector<int64_t>{64}));
    EXPECT_TRUE(params.contains("model.layers.1.mlp.experts.15.gate_proj.weight"));
    EXPECT_EQ(params["model.layers.1.mlp.gate.weight"].sizes(), (std::vector<int64_t>{16, 64}));
    EXPECT_NE(model::describe(m).find("q/k norms over all heads"), std::string::npos);
  }
  auto with = [](std::string s, const std::string& from, const std::string& to) {
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const auto clipped = io::parse_model_config(with(olmoe, R"("clip_qkv": null)", R"("clip_qkv": 8.5)"), "c.json");
  EXPECT_EQ(clipped.clip_qkv, 8.5);
  {
    model::CausalLM m(clipped);
    EXPECT_NE(model::describe(m).find("q/k/v clamped to +-8.5"), std::string::npos);
  }
  auto again = io::parse_model_config(io::model_config_to_json(clipped), "written");
  EXPECT_TRUE(again.olmoe() && again.num_experts == 16 && again.num_experts_per_tok == 8 && !again.norm_topk_prob);
  EXPECT_EQ(again.clip_qkv, 8.5);
  EXPECT_EQ(again.moe_intermediate_size, 32);
  // transformers 5 saves num_experts as num_local_experts; absent keys take OlmoeConfig's defaults.
  const auto v5 = io::parse_model_config(with(olmoe, R"("num_experts": 16)", R"("num_local_experts": 16)"), "c.json");
  EXPECT_EQ(v5.num_experts, 16);
  const auto bare = io::parse_model_config(
      with(with(with(olmoe, R"("num_experts": 16, "num_experts_per_tok": 8,)", ""), R"("rms_norm_eps": 1e-05,)", ""),
           R"("router_aux_loss_coef": 0.01,)", ""),
      "c.json");
  EXPECT_EQ(bare.num_experts, 64);
  EXPECT_EQ(bare.num_experts_per_tok, 8);
  EXPECT_DOUBLE_EQ(bare.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(bare.router_aux_loss_coef, 0.01);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(olmoe, R"("clip_qkv": null)", R"("clip_qkv": -1)"), "o.json"); })
                .find("'clip_qkv' must be null or a number > 0, got -1"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(olmoe, R"("clip_qkv": null)", R"("sliding_window": 64)"), "o.json"); })
                .find("sliding_window is not supported for model_type 'olmoe'"),
            std::string::npos);
}

// generation_config.json's eos_token_id, which transformers' generate() stops at in place of
// config.json's (gpt-oss's lists <|return|>, <|endoftext|> and <|call|>).
TEST(Config, ReadsGenerationConfigsEndOfSequenceIds) {
  const fs::path dir = temp_dir("generation_config");
  EXPECT_TRUE(io::load_generation_eos(dir.string()).empty());  // no file
  auto write = [&](const std::string& text) { std::ofstream(dir / "generation_config.json") << text; };
  write(R"({"bos_token_id": 199998, "do_sample": true, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999})");
  EXPECT_EQ(io::load_generation_eos(dir.string()), (std::vector<int64_t>{200002, 199999, 200012}));
  write(R"({"eos_token_id": 2, "transformers_version": "4.55.0"})");
  EXPECT_EQ(io::load_generation_eos(dir.string()), (std::vector<int64_t>{2}));
  write(R"({"eos_token_id": null})");
  EXPECT_TRUE(io::load_generation_eos(dir.string()).empty());
  write(R"({"temperature": 0.6})");
  EXPECT_TRUE(io::load_generation_eos(dir.string()).empty());
  const std::string path = (dir / "generation_config.json").string();
  write(R"({"eos_token_id": ["</s>"]})");
  EXPECT_EQ(expect_error([&] { io::load_generation_eos(dir.string()); }),
            "[config] " + path + ": eos_token_id must be a token id or a list of them, not [\"</s>\"]");
  write(R"({"eos_token_id": [2,)");
  EXPECT_NE(expect_error([&] { io::load_generation_eos(dir.string()); }).find(path), std::string::npos);
  fs::remove_all(dir);
}

// gpt-oss in the layout of OpenAI's gpt-oss-20b config.json (transformers 4.55), shrunk: MXFP4
// experts (quantization_config), OpenAI's own keys (experts_per_token, initial_context_length,
// swiglu_limit), YaRN in rope_scaling; written back (without the quantization, as saved models hold
// dense weights) and read again; GptOssConfig's defaults where keys are absent; bad values named.
TEST(Config, ParsesGptOss) {
  const std::string gpt_oss = R"({
    "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 8,
    "num_experts_per_tok": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_local_experts": 8,
    "output_router_logits": false, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                            "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false}, "rope_theta": 150000,
    "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": false,
    "transformers_version": "4.55.0.dev0", "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(gpt_oss, "config.json");
  EXPECT_TRUE(c.gpt_oss() && c.attention_sinks() && c.mxfp4_experts);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_EQ(c.swiglu_limit, 7.0);
  EXPECT_TRUE(c.qkv_bias && c.o_bias);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{128, 0, 128, 0}));
  EXPECT_EQ(c.rope.type, io::RopeType::Yarn);
  EXPECT_EQ(c.rope.factor, 32.0);
  EXPECT_FALSE(c.rope.truncate);
  EXPECT_EQ(c.rope.theta, 150000.0);
  EXPECT_EQ(c.pad_token_id, 199999);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.9);
  {
    model::CausalLM m(c);
    auto layer = m->model->layers->ptr<model::DecoderLayerImpl>(1);
    ASSERT_TRUE(layer->moe);
    EXPECT_TRUE(layer->moe->softmax_top_k);
    const auto params = m->named_parameters();
    EXPECT_EQ(params["model.layers.0.self_attn.sinks"].sizes(), (std::vector<int64_t>{8}));
    EXPECT_EQ(params["model.layers.1.mlp.router.bias"].sizes(), (std::vector<int64_t>{8}));
    EXPECT_EQ(params["model.layers.1.mlp.experts.7.down_proj.bias"].sizes(), (std::vector<int64_t>{64}));
    EXPECT_TRUE(adapt::is_router("model.layers.1.mlp.router"));
    const std::string d = model::describe(m);
    EXPECT_NE(d.find("attention sinks"), std::string::npos) << d;
    EXPECT_NE(d.find("clamped at 7"), std::string::npos) << d;
  }
  auto with = [](std::string s, const std::string& from, const std::string& to) {
    const auto at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    s.replace(at, from.size(), to);
    return s;
  };
  const std::string written = io::model_config_to_json(c);
  EXPECT_EQ(written.find("quantization_config"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_TRUE(again.gpt_oss() && !again.mxfp4_experts && again.num_experts == 8 && again.num_experts_per_tok == 4);
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_EQ(again.swiglu_limit, 7.0);
  EXPECT_EQ(again.rope.factor, 32.0);
  // GptOssConfig's defaults: sliding layers of 128 alternating with global ones, YaRN ×32 over 4096,
  // theta 150000, top 4 of 128, attention biases, head_dim 64.
  const auto bare = io::parse_model_config(R"({"model_type": "gpt_oss", "vocab_size": 300, "hidden_size": 64,
    "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2})", "c.json");
  EXPECT_EQ(bare.layer_window, (std::vector<int64_t>{128, 0, 128}));
  EXPECT_EQ(bare.rope.type, io::RopeType::Yarn);
  EXPECT_EQ(bare.rope.factor, 32.0);
  EXPECT_EQ(bare.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(bare.rope.theta, 150000.0);
  EXPECT_EQ(bare.num_experts, 128);
  EXPECT_EQ(bare.num_experts_per_tok, 4);
  EXPECT_EQ(bare.head_dim, 64);
  EXPECT_TRUE(bare.qkv_bias && bare.o_bias && !bare.mxfp4_experts);
  EXPECT_DOUBLE_EQ(bare.rms_norm_eps, 1e-5);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(gpt_oss, R"("experts_per_token": 4)", R"("experts_per_token": 2)"), "g.json"); })
                .find("num_experts_per_tok (4) and experts_per_token differ"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(gpt_oss, R"("quant_method": "mxfp4")", R"("quant_method": "bitsandbytes")"), "g.json"); })
                .find("gpt_oss's quantization_config must be quant_method 'mxfp4'"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with(gpt_oss, R"("swiglu_limit": 7.0)", R"("swiglu_limit": -1)"), "g.json"); })
                .find("'swiglu_limit' must be a finite number > 0, got -1"),
            std::string::npos);
}

// gpt-oss's attention sinks: a learned logit per head that joins each row's softmax and is dropped
// after it. materialized_attention's output and its gradients for q, k, v and the sinks against
// autograd through transformers' eager chain (cat, softmax, drop the column), in float64 and in
// float32 under bf16 autocast, in one block of query rows and in several, with a soft cap too.
TEST(Model, AttentionSinksMatchTheEagerChainAndTheirGradients) {
  auto eager = [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sinks,
                  const at::Tensor& allowed, double scale, double cap) {
    const int64_t rep = q.size(1) / k.size(1);
    at::Tensor s = at::matmul(q, k.repeat_interleave(rep, 1).transpose(2, 3)) * scale;
    if (cap > 0) s = at::tanh(s / cap) * cap;
    s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    const at::Tensor sink = sinks.to(s.scalar_type()).view({1, -1, 1, 1}).expand({s.size(0), -1, s.size(2), 1});
    const at::ScalarType wide = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor p = at::softmax(at::cat({s, sink}, -1), -1, wide).narrow(-1, 0, s.size(3));
    return at::matmul(p.to(q.scalar_type()), v.repeat_interleave(rep, 1));
  };
  for (const double cap : {0.0, 2.0}) {
    for (const bool autocast : {false, true}) {
      for (const int64_t max_scores : {int64_t{1} << 26, int64_t{2 * 4 * 7 * 3}}) {  // 1 and 3 blocks
        SCOPED_TRACE(std::string(autocast ? "autocast" : "float64") + " cap " + std::to_string(cap) + " max_scores " +
                     std::to_string(max_scores));
        at::manual_seed(5);
        const at::ScalarType dt = autocast ? at::kFloat : at::kDouble;
        at::Tensor q = (2 * at::randn({2, 4, 7, 8}, dt)).requires_grad_();
        at::Tensor k = (2 * at::randn({2, 2, 7, 8}, dt)).requires_grad_();
        at::Tensor v = at::randn({2, 2, 7, 8}, dt).requires_grad_();
        at::Tensor sinks = (2 * at::randn({4}, dt)).requires_grad_();
        const at::Tensor dout = at::randn({2, 4, 7, 8}, dt);
        // A window of 3 (gpt-oss's sliding layers), as a mask.
        const at::Tensor qi = at::arange(7).view({7, 1}), ki = at::arange(7).view({1, 7});
        const at::Tensor allowed = ki.le(qi).logical_and(qi - ki < 3).view({1, 1, 7, 7});
        util::AutocastScope scope(autocast, at::kCPU);
        const at::Tensor got = model::materialized_attention(q, k, v, allowed.expand({2, 1, 7, 7}).contiguous(),
                                                             false, 0.3, cap, sinks, max_scores);
        const auto g = torch::autograd::grad({got}, {q, k, v, sinks}, {dout.to(got.scalar_type())});
        const at::Tensor want = eager(q, k, v, sinks, allowed, 0.3, cap);
        const auto w = torch::autograd::grad({want}, {q, k, v, sinks}, {dout.to(want.scalar_type())});
        const double tol = autocast ? 2e-2 : 1e-12;
        EXPECT_LE(test::max_rel_error(got, want), autocast ? 0.0 : tol) << "output";
        for (int i = 0; i < 4; ++i) {
          EXPECT_EQ(g[i].scalar_type(), w[i].scalar_type());
          EXPECT_LE(test::max_rel_error(g[i], w[i]), tol) << "gradient of " << (i == 3 ? "the sinks" : std::string(1, "qkv"[i]));
        }
        // The sinks take probability away: without them the output differs.
        const at::Tensor plain = model::materialized_attention(q, k, v, allowed.expand({2, 1, 7, 7}).contiguous(), false,
                                                               0.3, cap, at::Tensor(), max_scores);
        EXPECT_GT(test::max_rel_error(plain, got), 1e-2);
      }
    }
  }
}

// Attention sinks through flash attention's log-sum-exp (CPU kernel) against materialized_attention:
// float64 to rounding, with a window and padding in the mask (a padded row that sees no key: 0, as
// the materialised path gives), causal without a mask, grouped heads; under bf16 autocast within
// bf16's rounding. The sinks' gradient is derived, not autograd's: a wrong sign or a missing g(1 − g)
// fails it.
TEST(Model, SinkFlashAttentionMatchesTheMaterializedPath) {
  for (const bool autocast : {false, true}) {
    for (const int mask_kind : {0, 1, 2}) {  // causal, no mask; window + padding mask; a row with no key
      SCOPED_TRACE(std::string(autocast ? "autocast" : "float64") + " mask " + std::to_string(mask_kind));
      at::manual_seed(7);
      const at::ScalarType dt = autocast ? at::kFloat : at::kDouble;
      at::Tensor q = (2 * at::randn({2, 4, 9, 8}, dt)).requires_grad_();
      at::Tensor k = (2 * at::randn({2, 2, 9, 8}, dt)).requires_grad_();
      at::Tensor v = at::randn({2, 2, 9, 8}, dt).requires_grad_();
      at::Tensor sinks = (2 * at::randn({4}, dt)).requires_grad_();
      const at::Tensor dout = at::randn({2, 4, 9, 8}, dt);
      at::Tensor mask;
      if (mask_kind > 0) {
        const at::Tensor qi = at::arange(9).view({9, 1}), ki = at::arange(9).view({1, 9});
        const at::Tensor window = ki.le(qi).logical_and(qi - ki < 4).view({1, 1, 9, 9});
        // Row 1 of the batch: its first two keys are padding.
        at::Tensor keep = at::ones({2, 1, 1, 9}, at::kBool);
        keep.index_put_({1, 0, 0, at::indexing::Slice(0, 2)}, false);
        mask = window.logical_and(keep).contiguous();
        if (mask_kind == 2) mask.index_put_({0, 0, 3}, false);  // a query that sees nothing
      }
      util::AutocastScope scope(autocast, at::kCPU);
      const at::Tensor got = model::sink_flash_attention(q, k, v, mask, mask_kind == 0, 0.3, sinks);
      const auto g = torch::autograd::grad({got}, {q, k, v, sinks}, {dout.to(got.scalar_type())});
      const at::Tensor want = model::materialized_attention(q, k, v, mask, mask_kind == 0, 0.3, 0.0, sinks);
      const auto w = torch::autograd::grad({want}, {q, k, v, sinks}, {dout.to(want.scalar_type())});
      EXPECT_EQ(got.scalar_type(), want.scalar_type());
      const double tol = autocast ? 3e-2 : 1e-12;
      EXPECT_LE(test::max_rel_error(got, want), tol) << "output";
      for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(g[i].scalar_type(), w[i].scalar_type());
        EXPECT_LE(test::max_rel_error(g[i], w[i]), tol) << "gradient of " << (i == 3 ? "the sinks" : std::string(1, "qkv"[i]));
      }
      if (mask_kind == 2) EXPECT_EQ(got[0].select(1, 3).abs().max().item<double>(), 0.0);
    }
  }
  // Where the sinks are not (H) or the mask is not bool, an error.
  const at::Tensor q = at::randn({1, 4, 3, 8}), kv = at::randn({1, 2, 3, 8});
  EXPECT_NE(expect_error([&] { model::sink_flash_attention(q, kv, kv, {}, true, 0.3, at::zeros({2})); })
                .find("the sinks must be (H) = (4)"),
            std::string::npos);
  EXPECT_NE(expect_error([&] { model::sink_flash_attention(q, kv, kv, at::ones({1, 1, 3, 3}), false, 0.3, at::zeros({4})); })
                .find("the mask must be (B or 1, 1, T, S) bool"),
            std::string::npos);
}

// A mixture of experts' forward pass and gradients against a dense float64 reference (but for the
// router's softmax, in float32 as in transformers): every expert on every token, each output weighted by the token's renormalised (Mixtral) or plain (Qwen3-MoE)
// top-k probability, zero for the experts it did not choose.
TEST(Model, MixtureOfExpertsMatchesADenseReference) {
  for (const std::string type : {"mixtral", "qwen3_moe", "qwen2_moe", "olmoe"}) {
    SCOPED_TRACE(type);
    const io::ModelConfig c = test::tiny_config(type);
    model::CausalLM m(c);
    model::init_weights(m, 3);
    m->to(at::kDouble);
    auto* moe = m->model->layers->ptr<model::DecoderLayerImpl>(0)->moe.get();
    ASSERT_NE(moe, nullptr);
    at::manual_seed(5);
    const at::Tensor x = at::randn({3, 7, c.hidden_size}, at::kDouble);
    const at::Tensor y = moe->forward(x);

    const at::Tensor h = x.reshape({-1, c.hidden_size});
    // (the router's softmax in float32, as transformers takes it whatever the model's dtype)
    const at::Tensor probs = at::softmax(at::matmul(h, moe->gate->weight.t()), -1, at::kFloat);
    auto [top, idx] = at::topk(probs, c.num_experts_per_tok, -1);
    if (c.norm_topk_prob) top = top / top.sum(-1, true);
    const at::Tensor dense_weights = at::zeros_like(h.narrow(1, 0, c.num_experts)).scatter(1, idx, top.to(at::kDouble));
    at::Tensor want = at::zeros_like(h);
    for (int64_t e = 0; e < c.num_experts; ++e) {
      auto* ex = moe->experts[e]->as<model::MLPImpl>();
      const at::Tensor a = at::silu(at::matmul(h, ex->gate_proj->weight.t())) * at::matmul(h, ex->up_proj->weight.t());
      want = want + dense_weights.select(1, e).unsqueeze(1) * at::matmul(a, ex->down_proj->weight.t());
    }
    if (moe->shared_expert) {  // Qwen2-MoE: + sigmoid(h · g) × the shared expert's output
      auto* sh = moe->shared_expert.get();
      const at::Tensor a = at::silu(at::matmul(h, sh->gate_proj->weight.t())) * at::matmul(h, sh->up_proj->weight.t());
      want = want + at::sigmoid(at::matmul(h, moe->shared_expert_gate->weight.t())) * at::matmul(a, sh->down_proj->weight.t());
    }
    EXPECT_LE(test::max_rel_error(y.reshape({-1, c.hidden_size}), want), 1e-12);
    // Gradients of one scalar through both: the experts' weights and the router's.
    const at::Tensor probe = at::randn_like(want);
    const auto params = moe->parameters();
    const auto got = torch::autograd::grad({(y.reshape({-1, c.hidden_size}) * probe).sum()}, params, {}, std::nullopt,
                                           false, /*allow_unused=*/true);
    const auto ref = torch::autograd::grad({(want * probe).sum()}, params, {}, std::nullopt, false, /*allow_unused=*/true);
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].defined()) << i;  // (training mode: every expert runs, on no rows if none chose it)
      if (ref[i].abs().max().item<double>() == 0) {
        EXPECT_EQ(got[i].abs().max().item<double>(), 0) << i;
        continue;
      }
      EXPECT_LE(test::max_rel_error(got[i], ref[i]), 1e-10) << i;
    }
    // A router that never picks expert 0: in training mode its weights get a zero gradient (as
    // transformers 5's fused expert weights do), in eval mode none.
    {
      at::NoGradGuard no_grad;
      moe->gate->weight.copy_(at::arange(c.num_experts, at::kDouble).unsqueeze(1).expand({-1, c.hidden_size}) - 0.5);
    }
    const at::Tensor positive = x.abs() + 0.1;
    auto* unused = moe->experts[0]->as<model::MLPImpl>();
    for (const bool training : {true, false}) {
      m->train(training);
      for (auto& p : moe->parameters()) p.mutable_grad() = at::Tensor();
      moe->forward(positive).sum().backward();
      if (training) {
        ASSERT_TRUE(unused->down_proj->weight.grad().defined());
        EXPECT_EQ(unused->down_proj->weight.grad().abs().max().item<double>(), 0);
        EXPECT_GT(moe->experts[3]->as<model::MLPImpl>()->down_proj->weight.grad().abs().max().item<double>(), 0);
      } else {
        EXPECT_FALSE(unused->down_proj->weight.grad().defined());
      }
    }
  }
}

// transformers builds every family's embedding with padding_idx = pad_token_id: the padding token's
// row gets no gradient even where the token occurs as input (Phi-3's pad is its <|endoftext|>),
// the other rows do; a negative id counts from the end, and one outside the vocabulary (a real
// config shrunk for a test) leaves every row trainable.
TEST(Model, PaddingTokenRowGetsNoGradient) {
  io::ModelConfig c = test::tiny_config();
  c.tie_word_embeddings = false;
  for (const int64_t pad : {int64_t{3}, int64_t{-1}}) {
    c.pad_token_id = pad;
    const int64_t row = pad < 0 ? c.vocab_size + pad : pad;
    model::CausalLM m(c);
    model::init_weights(m, 1);
    const at::Tensor ids = at::tensor(std::vector<int64_t>{5, row, 7, row, 9, 11}, at::kLong).view({1, 6});
    model::causal_lm_loss(m->forward(ids), ids).backward();
    const at::Tensor g = m->model->embed_tokens->weight.grad();
    EXPECT_EQ(g[row].abs().max().item<float>(), 0.0f) << pad;
    EXPECT_GT(g[7].abs().max().item<float>(), 0.0f) << pad;
    // (the row still moves the forward pass: it is not zeroed)
    EXPECT_GT(m->model->embed_tokens->weight[row].abs().max().item<float>(), 0.0f) << pad;
  }
  c.pad_token_id = c.vocab_size;
  model::CausalLM m(c);
  EXPECT_FALSE(m->model->embed_tokens->options.padding_idx().has_value());
}

// The routers' load-balancing loss against a float64 reference written from Switch Transformer's
// formula: per layer and token, the top-k choices counted one by one on the host, the softmax in
// float64; padding rows left out of both means. Its gradient too (the counts are constants), and
// the padding rule: a masked batch gives what its unpadded rows alone give.
TEST(Model, LoadBalancingLossMatchesTheFloat64Formula) {
  const int64_t E = 6, k = 2, B = 2, T = 5;
  at::manual_seed(11);
  std::vector<at::Tensor> logits;
  for (int l = 0; l < 3; ++l) logits.push_back((at::randn({B * T, E}) * 2).requires_grad_());
  at::Tensor mask = at::ones({B, T}, at::kLong);
  mask.index_put_({1, at::indexing::Slice(3, T)}, 0);  // the second row's last two tokens are padding
  const at::Tensor got = model::load_balancing_loss(logits, E, k, mask);
  ASSERT_EQ(got.scalar_type(), at::kFloat);

  std::vector<double> counts(E, 0.0);
  at::Tensor prob_sum = at::zeros({E}, at::kDouble);
  double rows = 0;
  std::vector<at::Tensor> ref_logits;
  const auto m = mask.reshape({-1});
  for (const auto& l : logits) {
    ref_logits.push_back(l.detach().to(at::kDouble).requires_grad_());
    const at::Tensor p = at::softmax(ref_logits.back(), -1);
    for (int64_t i = 0; i < B * T; ++i) {
      if (m[i].item<int64_t>() == 0) continue;
      rows += 1;
      prob_sum = prob_sum + p[i];
      std::vector<std::pair<double, int64_t>> row;
      for (int64_t e = 0; e < E; ++e) row.emplace_back(p[i][e].item<double>(), e);
      std::sort(row.begin(), row.end(), [](auto& a, auto& b) { return a.first > b.first; });
      for (int64_t j = 0; j < k; ++j) counts[row[j].second] += 1;
    }
  }
  at::Tensor want = at::zeros({}, at::kDouble);
  for (int64_t e = 0; e < E; ++e) want = want + counts[e] / rows * prob_sum[e] / rows;
  want = want * static_cast<double>(E);
  EXPECT_NEAR(got.item<double>(), want.item<double>(), 1e-6 * want.item<double>());
  EXPECT_GT(want.item<double>(), 0.5);  // (k = 2 when perfectly balanced)

  const auto g = torch::autograd::grad({got}, logits);
  const auto g_ref = torch::autograd::grad({want}, ref_logits);
  for (size_t l = 0; l < logits.size(); ++l) {
    EXPECT_LE(test::max_rel_error(g[l], g_ref[l]), 1e-5) << l;
    // padding rows get no gradient
    EXPECT_EQ(g[l].view({B, T, E}).index({1, at::indexing::Slice(3, T)}).abs().max().item<float>(), 0.0f) << l;
  }
  // The same loss from the unpadded rows alone, without a mask.
  std::vector<at::Tensor> kept;
  const at::Tensor keep = m.nonzero().squeeze(1);
  for (const auto& l : logits) kept.push_back(l.detach().index_select(0, keep));
  EXPECT_NEAR(model::load_balancing_loss(kept, E, k).item<double>(), got.item<double>(), 1e-6);
  EXPECT_THROW(model::load_balancing_loss({at::randn({4, E + 1})}, E, k), Error);
  EXPECT_THROW(model::load_balancing_loss({}, E, k), Error);
}

// The router logits a forward pass records, with and without activation checkpointing: the same
// values, one per mixture-of-experts layer (none for Qwen3-MoE's dense layer), and a loss that adds
// the load-balancing term gives the same gradients either way: through the recomputation, the
// term's gradient reaches the routers and the layers below.
TEST(Model, RouterLogitsTrainThroughActivationCheckpointing) {
  for (const std::string type : {"mixtral", "qwen3_moe"}) {
    SCOPED_TRACE(type);
    const io::ModelConfig c = test::tiny_config(type);
    model::CausalLM m(c);
    model::init_weights(m, 4);
    m->train();
    at::manual_seed(2);
    const at::Tensor ids = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
    int64_t moe_layers = 0;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) moe_layers += c.moe_in_layer(i) ? 1 : 0;
    std::vector<std::vector<at::Tensor>> grads;
    std::vector<double> aux_values;
    for (const bool checkpointing : {false, true}) {
      m->set_gradient_checkpointing(checkpointing);
      m->zero_grad();
      std::vector<at::Tensor> router_logits;
      model::ForwardOptions fo;
      fo.router_logits = &router_logits;
      const at::Tensor logits = m->forward(ids, fo);
      ASSERT_EQ(static_cast<int64_t>(router_logits.size()), moe_layers);
      const at::Tensor aux = model::load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok);
      aux_values.push_back(aux.item<double>());
      (model::causal_lm_loss(logits, ids) + aux * 0.5).backward();
      std::vector<at::Tensor> g;
      for (const auto& p : m->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
      grads.push_back(g);
    }
    EXPECT_EQ(aux_values[0], aux_values[1]);
    size_t compared = 0;
    for (size_t i = 0; i < grads[0].size(); ++i) {
      ASSERT_EQ(grads[0][i].defined(), grads[1][i].defined()) << i;
      if (!grads[0][i].defined()) continue;
      EXPECT_LE(test::max_rel_error(grads[1][i], grads[0][i]), 1e-5) << i;
      ++compared;
    }
    EXPECT_GT(compared, 0u);
    // The aux term alone moves the first router (checked against its gradient without the term).
    m->set_gradient_checkpointing(true);
    m->zero_grad();
    std::vector<at::Tensor> router_logits;
    model::ForwardOptions fo;
    fo.router_logits = &router_logits;
    m->forward(ids, fo);  // (its logits unused: the backward pass starts from the routers alone)
    model::load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok).backward();
    auto* first = m->model->layers->ptr<model::DecoderLayerImpl>(0)->moe.get();
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->gate->weight.grad().defined());
    EXPECT_GT(first->gate->weight.grad().abs().max().item<double>(), 0);
  }
}

// Gemma 3's image-text checkpoints as the Hub's gemma-3-4b-it config.json has it: the language
// model's settings in a text_config that names only what differs from Gemma3TextConfig's defaults,
// the EOS ids and dtype at the top level; the vision tower's settings are read past.
TEST(Config, ParsesGemma3ImageTextConfig) {
  const std::string json = R"({
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": false}
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_EQ(c.model_type, "gemma3_text");
  EXPECT_EQ(c.image_text_architecture, "Gemma3ForConditionalGeneration");
  EXPECT_EQ(c.vocab_size, 262208);
  EXPECT_EQ(c.hidden_size, 2560);
  EXPECT_EQ(c.num_hidden_layers, 34);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_DOUBLE_EQ(c.attention_scale(), 1.0 / 16);
  EXPECT_EQ(c.rope.type, io::RopeType::Linear);
  EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.sliding_rope->theta, 1e4);
  EXPECT_EQ(c.layer_window[0], 1024);
  EXPECT_EQ(c.layer_window[5], 0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1, 106}));
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_TRUE(c.tie_word_embeddings);
  // What libft writes back is the text model (Gemma3ForCausalLM) with every size spelled out.
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Gemma3ForCausalLM"), std::string::npos);
  EXPECT_EQ(written.find("vision_config"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_TRUE(again.image_text_architecture.empty());
  EXPECT_EQ(again.vocab_size, 262208);
  EXPECT_EQ(again.layer_window, c.layer_window);

  auto error_for = [&](const std::string& from, const std::string& to) {
    return expect_error([&] { io::parse_model_config(edited(json, from, to), "mm.json"); });
  };
  EXPECT_NE(error_for(R"("mm_tokens_per_image": 256)", R"("mm_tokens_per_image": 256, "frobnicate": 1)")
                .find("mm.json: unknown key 'frobnicate'"),
            std::string::npos);
  EXPECT_NE(error_for(R"(["Gemma3ForConditionalGeneration"])", R"(["Gemma3ForCausalLM"])").find("expected [\"Gemma3ForConditionalGeneration\"]"),
            std::string::npos);
  EXPECT_NE(error_for(R"("model_type": "gemma3_text")", R"("model_type": "gemma2")").find("text_config's model_type must be 'gemma3_text'"),
            std::string::npos);
  EXPECT_NE(error_for(R"("sliding_window": 1024)", R"("sliding_window": 1024, "mlp_bias": true)")
                .find("mm.json: text_config: gemma3_text has no MLP biases"),
            std::string::npos);
  EXPECT_NE(expect_error([] { io::parse_model_config(R"({"model_type": "gemma3", "vocab_size": 8})", "bare.json"); })
                .find("needs its language model's settings in 'text_config'"),
            std::string::npos);
}

// Gemma 2 as the Hub's gemma-2-2b config.json has it (transformers 4.42's layout: both soft-caps,
// hidden_act beside hidden_activation, rope_theta, no layer_types), shrunk: sliding layers alternate
// with global ones from the first; what libft writes back parses to the same model; and the keys
// whose absence means Gemma2Config's defaults (caps of 50 and 30) are told from nulls (no cap).
TEST(Config, ParsesGemma2) {
  const std::string json = R"({
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0, "head_dim": 32, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 48, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 4, "num_hidden_layers": 5,
    "num_key_value_heads": 2, "pad_token_id": 0, "query_pre_attn_scalar": 224, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": true, "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.gemma() && !c.gemma3() && !c.qk_norm() && c.norm_unit_offset() && c.sandwich_norms() &&
              c.scaled_embeddings());
  EXPECT_EQ(c.hidden_act, io::Activation::GeluTanh);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{4096, 0, 4096, 0, 4096}));
  EXPECT_FALSE(c.sliding_rope.has_value());
  EXPECT_DOUBLE_EQ(c.attention_scale(), 1.0 / std::sqrt(224.0));
  EXPECT_EQ(c.attn_logit_softcapping, 50.0);
  EXPECT_EQ(c.final_logit_softcapping, 30.0);
  const std::string written = io::model_config_to_json(c);
  EXPECT_NE(written.find("Gemma2ForCausalLM"), std::string::npos);
  auto again = io::parse_model_config(written, "written");
  EXPECT_EQ(again.layer_window, c.layer_window);
  EXPECT_EQ(again.attn_logit_softcapping, 50.0);
  EXPECT_EQ(again.final_logit_softcapping, 30.0);
  EXPECT_DOUBLE_EQ(again.query_pre_attn_scalar, 224);

  model::CausalLM m(c);
  auto params = m->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.0.pre_feedforward_layernorm.weight"));
  EXPECT_FALSE(params.contains("model.layers.0.self_attn.q_norm.weight"));
  EXPECT_EQ(m->model->layers->ptr<model::DecoderLayerImpl>(0)->self_attn->softcap, 50.0);
  const std::string shown = model::describe(m);
  EXPECT_NE(shown.find("scores scaled by 1/sqrt(224), scores soft-capped at 50"), std::string::npos) << shown;
  EXPECT_NE(shown.find("norms x (1 + w) around both sublayers, logits soft-capped at 30"), std::string::npos) << shown;

  // Absent: Gemma2Config's defaults; null: none (and libft writes the null back).
  std::string bare = edited(json, R"("attn_logit_softcapping": 50.0, )", "");
  const std::string final_cap = R"("final_logit_softcapping": 30.0, )";
  bare.erase(bare.find(final_cap), final_cap.size());
  auto absent = io::parse_model_config(bare, "a.json");
  EXPECT_EQ(absent.attn_logit_softcapping, 50.0);
  EXPECT_EQ(absent.final_logit_softcapping, 30.0);
  auto none = io::parse_model_config(edited(json, R"("attn_logit_softcapping": 50.0)", R"("attn_logit_softcapping": null)"), "n.json");
  EXPECT_EQ(none.attn_logit_softcapping, 0.0);
  EXPECT_EQ(io::parse_model_config(io::model_config_to_json(none), "w.json").attn_logit_softcapping, 0.0);
  auto error_for = [&](const std::string& from, const std::string& to) {
    return expect_error([&] { io::parse_model_config(edited(json, from, to), "g2.json"); });
  };
  EXPECT_NE(error_for(R"("attn_logit_softcapping": 50.0)", R"("attn_logit_softcapping": -3)")
                .find("g2.json: 'attn_logit_softcapping' must be > 0 or null"),
            std::string::npos);
  EXPECT_NE(error_for(R"("hidden_act": "gelu_pytorch_tanh")", R"("hidden_act": "silu")").find("hidden_act 'silu' is not a GELU"),
            std::string::npos);
  EXPECT_NE(error_for(R"("sliding_window": 4096)", R"("sliding_window": 4096, "sliding_window_size": 2048)")
                .find("'sliding_window_size' (2048) differs from 'sliding_window' (4096)"),
            std::string::npos);
  // Only Gemma 2 soft-caps its scores.
  io::ModelConfig llama = tiny_config("llama");
  llama.attn_logit_softcapping = 10;
  EXPECT_NE(expect_error([&] { llama.validate("built"); }).find("only gemma2 soft-caps its attention scores"),
            std::string::npos);
}

// Gemma 1 as the Hub's gemma-2b config.json has it: multi-query attention, hidden_act "gelu" (the
// exact GELU, as transformers 5 reads it), no sandwich norms; hidden_activation, where a config
// gives it, decides; a window is refused.
TEST(Config, ParsesGemma1) {
  const std::string json = R"({
    "architectures": ["GemmaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 32, "hidden_act": "gelu", "hidden_size": 48, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": null,
    "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": true,
    "vocab_size": 300
  })";
  auto c = io::parse_model_config(json, "config.json");
  EXPECT_TRUE(c.gemma() && !c.qk_norm() && c.norm_unit_offset() && !c.sandwich_norms() && c.scaled_embeddings());
  EXPECT_EQ(c.hidden_act, io::Activation::Gelu);
  EXPECT_EQ(c.layer_window, (std::vector<int64_t>{0, 0}));
  EXPECT_DOUBLE_EQ(c.attention_scale(), 1.0 / std::sqrt(32.0));
  auto again = io::parse_model_config(io::model_config_to_json(c), "written");
  EXPECT_EQ(again.hidden_act, io::Activation::Gelu);
  EXPECT_NE(io::model_config_to_json(c).find("GemmaForCausalLM"), std::string::npos);
  std::string tanh = json;
  tanh.replace(tanh.find(R"("hidden_act": "gelu")"), 20, R"("hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh")");
  EXPECT_EQ(io::parse_model_config(tanh, "t.json").hidden_act, io::Activation::GeluTanh);
  model::CausalLM m(c);
  auto params = m->named_parameters();
  EXPECT_FALSE(params.contains("model.layers.0.pre_feedforward_layernorm.weight"));
  EXPECT_EQ(params["model.layers.0.self_attn.k_proj.weight"].sizes(), (std::vector<int64_t>{32, 48}));
  const std::string shown = model::describe(m);
  EXPECT_NE(shown.find("GeGLU (exact GELU gate)"), std::string::npos) << shown;
  EXPECT_EQ(shown.find("soft-capped"), std::string::npos) << shown;
  EXPECT_EQ(shown.find("sublayers"), std::string::npos) << shown;
  std::string windowed = json;
  windowed.replace(windowed.find(R"("use_cache": true)"), 17, R"("use_cache": true, "sliding_window": 8)");
  EXPECT_NE(expect_error([&] { io::parse_model_config(windowed, "w.json"); })
                .find("sliding_window is not supported for model_type 'gemma'"),
            std::string::npos);
  std::string silu = json;
  silu.replace(silu.find(R"("gelu")"), 6, R"("silu")");
  EXPECT_NE(expect_error([&] { io::parse_model_config(silu, "s.json"); }).find("activation 'silu' is not supported for gemma"),
            std::string::npos);
}

TEST(Config, RejectsWhatItCannotHonour) {
  std::string base = kLlamaJson;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = base;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"llama\"", "\"gpt2\""), "c.json"); })
                .find("model_type 'gpt2' is not supported"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"vocab_size\"", "\"vocab_sise\": 1, \"vocab_size\""), "c.json"); })
                .find("unknown key 'vocab_sise'"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"llama3\"", "\"dynamic\""), "c.json"); })
                .find("rope type 'dynamic' is not supported"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"hidden_size\": 32", "\"hidden_size\": 32, \"hidden_size\": 64"), "c.json"); })
                .find("duplicate key 'hidden_size'"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"), "c.json"); })
                .find("multiple of num_key_value_heads"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("\"hidden_size\": 32", "\"hidden_size\": \"32\""), "c.json"); })
                .find("'hidden_size' must be an integer"), std::string::npos);
  EXPECT_NE(expect_error([&] { io::parse_model_config(with("{", "{\"hidden_act\": \"gelu\","), "c.json"); })
                .find("hidden_act 'gelu'"), std::string::npos);
  const std::string truncated = expect_error([&] { io::parse_model_config(base.substr(0, 100), "c.json"); });
  EXPECT_NE(truncated.find("c.json:"), std::string::npos) << truncated;
}

// Every size is range-checked where it is read, and so is rope_theta: an error naming the file and
// the key, never a std::vector length error, an allocation that aborts the process, or NaN losses.
TEST(Config, RangeChecksSizesAndRopeTheta) {
  const std::string base = kLlamaJson;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = base;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  auto parse_error = [&](const std::string& json) {
    return expect_error([&] { io::parse_model_config(json, "c.json"); });
  };
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads"}) {
    SCOPED_TRACE(key);
    const std::string k = std::string("\"") + key + "\": ";
    const size_t at = base.find(k);
    ASSERT_NE(at, std::string::npos);
    const size_t end = base.find(',', at);
    for (const char* bad : {"-1", "0"}) {
      const std::string e = parse_error(base.substr(0, at) + k + bad + base.substr(end));
      EXPECT_NE(e.find(std::string("c.json: '") + key + "' must be > 0, got " + bad), std::string::npos) << e;
    }
    const std::string e = parse_error(base.substr(0, at) + k + "100000000000" + base.substr(end));
    EXPECT_NE(e.find(std::string("c.json: '") + key + "' must be at most 2^31 - 1"), std::string::npos) << e;
  }
  std::string e = parse_error(with("\"hidden_size\": 32", "\"hidden_size\": 32, \"head_dim\": -2"));
  EXPECT_NE(e.find("c.json: 'head_dim' must be > 0, got -2"), std::string::npos) << e;
  e = parse_error(with("\"hidden_size\": 32", "\"hidden_size\": 32, \"max_position_embeddings\": 0"));
  EXPECT_NE(e.find("c.json: 'max_position_embeddings' must be > 0"), std::string::npos) << e;
  // Sizes each in range whose product is not: the parameter bound, naming the keys.
  const std::string huge = R"({"model_type": "llama", "vocab_size": 2000000000, "hidden_size": 2000000000,
      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8})";
  e = parse_error(huge);
  EXPECT_NE(e.find("c.json: the sizes make a model of about"), std::string::npos) << e;
  EXPECT_NE(e.find("vocab_size (2000000000)"), std::string::npos) << e;
  // rope_theta <= 0, at the top level and in rope_parameters; JSON has no inf or NaN (1e999 is a
  // number out of range, an error naming the file), a ModelConfig built in C++ may.
  for (const char* bad : {"0", "-10000.0"}) {
    SCOPED_TRACE(bad);
    e = parse_error(with("\"rope_theta\": 500000.0", std::string("\"rope_theta\": ") + bad));
    EXPECT_NE(e.find("c.json: 'rope_theta' must be a finite number > 0"), std::string::npos) << e;
  }
  e = parse_error(with("\"rope_theta\": 500000.0", "\"rope_theta\": 1e999"));
  EXPECT_NE(e.find("[json] c.json: "), std::string::npos) << e;
  for (double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    auto c = tiny_config();
    c.rope.theta = bad;
    e = expect_error([&] { c.validate("built"); });
    EXPECT_NE(e.find("built: 'rope_theta' must be a finite number > 0"), std::string::npos) << e;
  }
  EXPECT_NO_THROW(io::parse_model_config(with("\"rope_theta\": 500000.0,", ""), "c.json"));  // the default
  const std::string params = R"({"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
      "num_hidden_layers": 2, "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": -1}})";
  e = parse_error(params);
  EXPECT_NE(e.find("c.json: 'rope_theta' must be a finite number > 0, got -1"), std::string::npos) << e;
}

// A config whose sizes are each in range but whose parameters do not fit in this machine's memory
// is an ft::Error when the model is built, not LibTorch's fatal allocation failure.
TEST(Config, AModelLargerThanMemoryIsAnError) {
  auto c = tiny_config();
  c.vocab_size = 500'000'000;
  c.hidden_size = 1024;  // 5e11 to 1e12 parameters: below the 2^40 bound, far above any machine's memory
  const std::string e = expect_error([&] { model::CausalLM m(c); });
  EXPECT_NE(e.find("GiB in float32, more than this machine's"), std::string::npos) << e;
  EXPECT_NE(e.find("vocab_size (500000000)"), std::string::npos) << e;
}

TEST(Rope, Llama3InverseFrequenciesMatchFloat64Formula) {
  auto c = tiny_config();
  c.head_dim = 64;
  c.rope = {io::RopeType::Llama3, 500000.0, 8.0, 1.0, 4.0, 8192};
  at::Tensor got = model::rope_inv_freq(c).to(at::kDouble);
  for (int64_t i = 0; i < 32; ++i) {
    double f = 1.0 / std::pow(500000.0, 2.0 * i / 64.0);
    const double wavelen = 2 * std::numbers::pi / f;
    const double low = 8192 / 1.0, high = 8192 / 4.0;
    double expected;
    if (wavelen < high) expected = f;
    else if (wavelen > low) expected = f / 8.0;
    else {
      const double s = (8192 / wavelen - 1.0) / (4.0 - 1.0);
      expected = (1 - s) * f / 8.0 + s * f;
    }
    EXPECT_NEAR(got[i].item<double>(), expected, 1e-6 * expected) << "frequency " << i;
  }
}

// Gemma 2's soft-capped attention against the chain transformers' eager attention writes, run by
// autograd: values and gradients of q, k and v, in float64 (to 1e-12: the same formula) and under
// bf16 autocast (the same roundings but for the backward's order), whole and in ragged blocks of
// query rows, with grouped heads, for a causal pass (no mask), a padding mask per batch row, and new
// tokens after cached ones (T < S).
TEST(Model, SoftcappedAttentionMatchesTheEagerChainAndItsGradients) {
  auto eager = [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed, double scale,
                  double cap) {
    const int64_t rep = q.size(1) / k.size(1);
    at::Tensor s = at::matmul(q, k.repeat_interleave(rep, 1).transpose(2, 3)) * scale;
    s = at::tanh(s / cap) * cap;
    s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    const at::ScalarType wide = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::matmul(at::softmax(s, -1, wide).to(q.scalar_type()), v.repeat_interleave(rep, 1));
  };
  struct Case {
    const char* name;
    int64_t T, S;
    bool padded;
  };
  for (const Case& c : {Case{"causal", 7, 7, false}, Case{"padding", 7, 7, true}, Case{"after a cache", 3, 7, false}}) {
    for (const bool autocast : {false, true}) {
      for (const int64_t max_scores : {int64_t{1} << 26, int64_t{2 * 4 * 7 * 3}, int64_t{1}}) {  // 1, 3 and 7 blocks
        SCOPED_TRACE(std::string(c.name) + (autocast ? " autocast" : " float64") + " max_scores " +
                     std::to_string(max_scores));
        at::manual_seed(3);
        const at::ScalarType dt = autocast ? at::kFloat : at::kDouble;
        at::Tensor q = (2 * at::randn({2, 4, c.T, 8}, dt)).requires_grad_();
        at::Tensor k = (2 * at::randn({2, 2, c.S, 8}, dt)).requires_grad_();
        at::Tensor v = at::randn({2, 2, c.S, 8}, dt).requires_grad_();
        const at::Tensor dout = at::randn({2, 4, c.T, 8}, dt);
        // Allowed: causal with the new tokens last; row 1 padded at its first two keys.
        at::Tensor allowed = (at::arange(c.S).view({1, c.S}) <= at::arange(c.S - c.T, c.S).view({c.T, 1})).view({1, 1, c.T, c.S});
        at::Tensor mask;  // what softcapped_attention is given
        if (c.padded) {
          at::Tensor keys_valid = at::ones({2, c.S}, at::kBool);
          keys_valid.index_put_({1, at::indexing::Slice(0, 2)}, false);
          allowed = allowed.logical_and(keys_valid.view({2, 1, 1, c.S})).logical_or(at::eye(c.T, c.S, at::kBool).view({1, 1, c.T, c.S}));
        }
        if (c.padded || c.T != c.S) mask = allowed.expand({2, 1, c.T, c.S}).contiguous();
        util::AutocastScope scope(autocast, at::kCPU);
        const at::Tensor got = model::softcapped_attention(q, k, v, mask, !mask.defined(), 0.3, 2.0, max_scores);
        const auto g = torch::autograd::grad({got}, {q, k, v}, {dout.to(got.scalar_type())});
        const at::Tensor want = eager(q, k, v, allowed, 0.3, 2.0);
        const auto w = torch::autograd::grad({want}, {q, k, v}, {dout.to(want.scalar_type())});
        EXPECT_EQ(got.scalar_type(), want.scalar_type());
        const double tol = autocast ? 2e-2 : 1e-12;
        EXPECT_LE(test::max_rel_error(got, want), autocast ? 0.0 : tol) << "output";
        for (int i = 0; i < 3; ++i) {
          EXPECT_EQ(g[i].scalar_type(), w[i].scalar_type());
          EXPECT_LE(test::max_rel_error(g[i], w[i]), tol) << "gradient " << "qkv"[i];
        }
      }
    }
  }
}

// (Gemma 2: soft-capped scores, materialised and masked by libft itself rather than by SDPA; a cap
// of 0.05 bites on the initialisation's small scores.)
TEST(Model, KVCacheAndMasksMatchFullRecomputation) {
  for (const auto& [type, window] : std::vector<std::pair<std::string, int64_t>>{
           {"mistral", 0}, {"mistral", 3}, {"gemma2", 0}, {"gemma2", 3}}) {
    SCOPED_TRACE(type);
    auto c = tiny_config(type);
    if (type == "gemma2") c.attn_logit_softcapping = 0.05;
    c.layer_window.assign(2, window);
    model::CausalLM m(c);
    model::init_weights(m, 7);
    m->eval();
    at::NoGradGuard no_grad;
    at::Tensor ids = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
    at::Tensor full = m->forward(ids);
    // Prefill 5 tokens, then 3, then 1: every chunk must see exactly what the full pass saw.
    model::KVCache cache;
    model::ForwardOptions f;
    f.cache = &cache;
    std::vector<at::Tensor> parts;
    for (auto [lo, hi] : {std::pair{0, 5}, {5, 8}, {8, 9}}) parts.push_back(m->forward(ids.slice(1, lo, hi), f));
    EXPECT_LE(test::max_rel_error(at::cat(parts, 1), full), 1e-5) << "window " << window;
    EXPECT_EQ(cache.length(), 9);
  }
}

// attention_dropout (Granite 3.1's 0.1): dropout on the attention probabilities in training mode
// only, drawn from the seeded generator, and replayed exactly by activation checkpointing's
// recomputation (the gradients equal the plain pass's).
// longrope picks its frequencies by a pass's largest position, as transformers does: short factors
// for documents that stay within the original context (8 here), long ones past it, whether the
// positions are the default ones, given, or given with their maximum (the trainer's host count).
TEST(Model, LongRopeFollowsTheLargestPosition) {
  io::ModelConfig c = tiny_config("phi3");
  c.layer_window = {0, 0};
  model::CausalLM m(c);
  model::init_weights(m, 5);
  m->eval();
  at::NoGradGuard no_grad;
  EXPECT_FALSE(at::allclose(model::rope_inv_freq(c, true), model::rope_inv_freq(c, false)));
  const at::Tensor ids = at::randint(0, c.vocab_size, {1, 12}, at::kLong);
  const at::Tensor whole = m->forward(ids);  // positions 0..11: long factors
  model::ForwardOptions given;
  given.position_ids = at::arange(12, at::kLong).view({1, 12});
  EXPECT_TRUE(at::equal(m->forward(ids, given), whole));
  given.max_position = 11;
  EXPECT_TRUE(at::equal(m->forward(ids, given), whole));
  // The first 6 tokens alone stay short; within the 12-token pass they were turned with the long
  // factors, so they differ.
  const at::Tensor first = m->forward(ids.slice(1, 0, 6));
  EXPECT_GT(test::max_rel_error(whole.slice(1, 0, 6), first), 1e-3);
  // Two packed documents of 6 (positions 0..5 twice): short factors, each as it is alone.
  model::ForwardOptions packed;
  packed.position_ids = at::cat({at::arange(6, at::kLong), at::arange(6, at::kLong)}).view({1, 12});
  packed.segment_ids = at::cat({at::zeros({6}, at::kLong), at::ones({6}, at::kLong)}).view({1, 12});
  const at::Tensor both = m->forward(ids, packed);
  EXPECT_LE(test::max_rel_error(both.slice(1, 0, 6), first), 1e-6);
  EXPECT_LE(test::max_rel_error(both.slice(1, 6, 12), m->forward(ids.slice(1, 6, 12))), 1e-6);
  packed.max_position = 5;
  EXPECT_TRUE(at::equal(m->forward(ids, packed), both));
}

// Phi-3's resid_pdrop: dropout on the sublayers' outputs in training mode only, replayed by
// activation checkpointing's recomputation.
namespace {
// A config's training-mode dropout (`with`, else `without` it): eval mode leaves the model as it is
// without dropout, the draws follow the seed and change the outputs, and activation checkpointing's
// recomputation replays them (the same gradients as the plain pass).
void check_training_dropout(const io::ModelConfig& with, const io::ModelConfig& without, uint64_t seed, int64_t tokens) {
  model::CausalLM m(with), reference(without);
  model::init_weights(m, seed);
  model::init_weights(reference, seed);
  const at::Tensor ids = at::randint(0, with.vocab_size, {2, tokens}, at::kLong);
  {
    at::NoGradGuard no_grad;
    m->eval();
    reference->eval();
    EXPECT_TRUE(at::equal(m->forward(ids), reference->forward(ids)));  // no dropout in eval mode
    m->train();
    at::manual_seed(1);
    const at::Tensor a = m->forward(ids);
    at::manual_seed(1);
    EXPECT_TRUE(at::equal(m->forward(ids), a));
    at::manual_seed(2);
    EXPECT_GT(test::max_rel_error(m->forward(ids), a), 1e-4);
    EXPECT_GT(test::max_rel_error(a, reference->forward(ids)), 1e-4);
  }
  m->train();
  auto gradients = [&](bool checkpointing) {
    m->set_gradient_checkpointing(checkpointing);
    m->zero_grad();
    at::manual_seed(3);
    model::causal_lm_loss(m->forward(ids), ids).backward();
    std::vector<at::Tensor> g;
    for (const auto& p : m->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  const auto plain_grads = gradients(false), recomputed = gradients(true);
  for (size_t i = 0; i < plain_grads.size(); ++i) EXPECT_LE(test::max_rel_error(recomputed[i], plain_grads[i]), 1e-6) << i;
}
}  // namespace

TEST(Model, ResidualDropoutInTrainingModeOnly) {
  io::ModelConfig c = tiny_config("phi3");
  c.residual_dropout = 0.2;
  io::ModelConfig plain = c;
  plain.residual_dropout = 0;
  check_training_dropout(c, plain, 6, 7);
  EXPECT_DOUBLE_EQ(io::parse_model_config(io::model_config_to_json(c), "w").residual_dropout, 0.2);
}

TEST(Model, AttentionDropoutInTrainingModeOnly) {
  io::ModelConfig c = tiny_config("granite");
  c.attention_dropout = 0.3;
  io::ModelConfig plain = c;
  plain.attention_dropout = 0;
  check_training_dropout(c, plain, 4, 9);
  // Written back for transformers; refused with soft-capped scores (no fused attention has both).
  EXPECT_DOUBLE_EQ(io::parse_model_config(io::model_config_to_json(c), "w").attention_dropout, 0.3);
  io::ModelConfig capped = tiny_config("gemma2");
  capped.attention_dropout = 0.1;
  EXPECT_NE(expect_error([&] { capped.validate("built"); }).find("attention_dropout with soft-capped attention scores"),
            std::string::npos);
}

TEST(Model, PaddingDoesNotChangeRealTokens) {
  auto c = tiny_config();
  model::CausalLM m(c);
  model::init_weights(m, 3);
  m->eval();
  at::NoGradGuard no_grad;
  at::Tensor ids = at::randint(0, c.vocab_size, {1, 6}, at::kLong);
  at::Tensor alone = m->forward(ids);
  // Left-pad with 2 junk tokens; positions continue from 0 at the first real token.
  at::Tensor padded = at::cat({at::full({1, 2}, 11, at::kLong), ids}, 1);
  model::ForwardOptions f;
  f.attention_mask = at::cat({at::zeros({1, 2}, at::kLong), at::ones({1, 6}, at::kLong)}, 1);
  f.position_ids = at::cat({at::zeros({1, 2}, at::kLong), at::arange(6, at::kLong).view({1, 6})}, 1);
  at::Tensor out = m->forward(padded, f);
  EXPECT_TRUE(out.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(out.slice(1, 2), alone), 1e-5);
  // The caller's word on padding (the trainer's, counted on the host) replaces reading the mask:
  // the same outputs when it is right...
  f.padding = true;
  EXPECT_TRUE(at::equal(m->forward(padded, f), out));
  // ...and it is what forward goes by: told "no padding", the junk tokens are attended.
  f.padding = false;
  EXPECT_GT(test::max_rel_error(m->forward(padded, f).slice(1, 2), alone), 1e-3);
  // A mask of ones, said to have padding, takes the masked path to the same outputs as none.
  model::ForwardOptions ones;
  ones.attention_mask = at::ones({1, 6}, at::kLong);
  ones.padding = true;
  EXPECT_LE(test::max_rel_error(m->forward(ids, ones), alone), 1e-6);
}

TEST(Model, PackedDocumentsWithSegmentIdsEqualSeparatePasses) {
  // Two documents packed into one row, positions restarting at the second: with segment ids each
  // must compute exactly what it computes alone (no attention across the boundary). Also with
  // Gemma 2's soft-capped scores (materialised and masked by libft, a cap that bites).
  for (const std::string type : {"llama", "gemma2"}) {
    SCOPED_TRACE(type);
    auto c = tiny_config(type);
    if (type == "gemma2") c.attn_logit_softcapping = 0.05;
    model::CausalLM m(c);
    model::init_weights(m, 5);
    m->eval();
    at::NoGradGuard no_grad;
    at::Tensor a = at::randint(0, c.vocab_size, {1, 5}, at::kLong), b = at::randint(0, c.vocab_size, {1, 4}, at::kLong);
    model::ForwardOptions f;
    f.position_ids = at::cat({at::arange(5, at::kLong), at::arange(4, at::kLong)}).view({1, 9});
    f.segment_ids = at::cat({at::zeros({5}, at::kInt), at::ones({4}, at::kInt)}).view({1, 9});
    at::Tensor packed = m->forward(at::cat({a, b}, 1), f);
    EXPECT_LE(test::max_rel_error(packed.slice(1, 0, 5), m->forward(a)), 1e-5);
    EXPECT_LE(test::max_rel_error(packed.slice(1, 5), m->forward(b)), 1e-5);
    // Without segment ids the second document sees the first: the outputs must differ.
    f.segment_ids = at::Tensor();
    EXPECT_GT(test::max_rel_error(m->forward(at::cat({a, b}, 1), f).slice(1, 5), m->forward(b)), 1e-3);
  }
}

TEST(Model, GreedyWithCacheEqualsWithoutAndSamplingIsSeeded) {
  auto c = tiny_config("qwen2");
  c.qkv_bias = true;
  c.tie_word_embeddings = true;
  model::CausalLM m(c);
  model::init_weights(m, 11);
  // Larger weights than the default init so that argmax is not decided by noise.
  {
    at::NoGradGuard g;
    for (auto& p : m->parameters()) p.mul_(20);
  }
  model::GenerateOptions o;
  o.max_new_tokens = 12;
  auto cached = model::generate(m, {1, 2, 3}, o);
  o.use_cache = false;
  EXPECT_EQ(cached, model::generate(m, {1, 2, 3}, o));
  o.greedy = false;
  o.top_p = 0.8;
  o.seed = 5;
  auto a = model::generate(m, {1, 2, 3}, o), b = model::generate(m, {1, 2, 3}, o);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 12u);
  EXPECT_NE(expect_error([&] { model::generate(m, {1, 200}, o); }).find("outside the vocabulary"), std::string::npos);
}

TEST(Sampling, TopPKeepsOnlyTheNucleus) {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two tokens only.
  at::Tensor logits = at::log(at::tensor({0.05, 0.5, 0.15, 0.3}, at::kDouble));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  std::map<int64_t, int> seen;
  for (int i = 0; i < 400; ++i) seen[model::sample_top_p(logits, 1.0, 0.75, gen)]++;
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[1], seen[3]);
  EXPECT_EQ(seen.count(0) + seen.count(2), 0u);
}

// gpt-oss's checkpoints hold each layer's experts fused (gate and up interleaved): saved so, loaded
// back bit for bit; MXFP4 blocks and scales decode as the format says; a mis-shaped or missing
// fused tensor is named.
TEST(Checkpoint, GptOssFusedAndMxfp4ExpertsLoadAndSave) {
  // MXFP4: byte 0x2F holds 0xF (−6) in its low nibble (the even element) and 0x2 (1.0) in its
  // high one; scale 129 is 2^2, 125 is 2^−2.
  at::Tensor blocks = at::zeros({2, 16}, at::kByte), scales = at::tensor(std::vector<uint8_t>{129, 125}).to(at::kByte);
  blocks.index_put_({0, 0}, 0x2F);
  blocks.index_put_({1, 15}, 0x97);  // 0x7 (6.0) low, 0x9 (−0.5) high
  // (two rows of one block each)
  const at::Tensor v = io::mxfp4_dequantize(blocks.view({2, 1, 16}), scales.view({2, 1}));
  ASSERT_EQ(v.sizes(), (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(v[0][0].item<float>(), -24.0f);
  EXPECT_EQ(v[0][1].item<float>(), 4.0f);
  EXPECT_EQ(v[1][30].item<float>(), 1.5f);
  EXPECT_EQ(v[1][31].item<float>(), -0.125f);
  EXPECT_EQ(v.abs().sum().item<float>(), 24.0f + 4.0f + 1.5f + 0.125f);
  EXPECT_NE(expect_error([&] { io::mxfp4_dequantize(blocks.slice(1, 0, 8), scales); }).find("blocks (…, G, 16)"),
            std::string::npos);
  EXPECT_EQ(io::mxfp4_dequantize(blocks, scales).sizes(), (std::vector<int64_t>{64}));  // (one row of two blocks)
  {
    // Random bytes over several of the decoder's chunks (2^18 blocks each) against the formula in
    // one piece: value = ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}[nibble] · 2^(scale − 127), low nibble first.
    at::manual_seed(4);
    const at::Tensor big = at::randint(0, 256, {3, 65543, 4, 16}, at::kByte);
    const at::Tensor exps = at::randint(110, 140, {3, 65543, 4}, at::kByte);
    const at::Tensor lut = at::tensor(std::vector<float>{0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0f, -0.5, -1, -1.5, -2, -3, -4, -6});
    const at::Tensor lo = lut.index({big.to(at::kLong).bitwise_and(15)}), hi = lut.index({big.to(at::kLong).bitwise_right_shift(4)});
    const at::Tensor want = (at::stack({lo, hi}, -1).flatten(-2) *
                             at::pow(2.0, exps.to(at::kDouble) - 127).to(at::kFloat).unsqueeze(-1)).flatten(-2);
    const at::Tensor got = io::mxfp4_dequantize(big, exps);
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{3, 65543, 128}));
    EXPECT_TRUE(at::equal(got, want));
  }
  EXPECT_NE(expect_error([&] { io::mxfp4_dequantize(blocks.to(at::kInt), scales); }).find("of uint8 expected"),
            std::string::npos);

  const auto c = tiny_config("gpt_oss");
  model::CausalLM m(c);
  model::init_weights(m, 4);
  const fs::path dir = fs::temp_directory_path() / "libft_gpt_oss_ckpt";
  fs::remove_all(dir);
  io::save_pretrained(m, dir.string());
  auto f = io::SafetensorsFile::open((dir / "model.safetensors").string());
  const auto& gate_up = f->at("model.layers.1.mlp.experts.gate_up_proj");
  EXPECT_EQ(gate_up.shape, (std::vector<int64_t>{4, 32, 128}));
  EXPECT_EQ(f->at("model.layers.1.mlp.experts.down_proj").shape, (std::vector<int64_t>{4, 64, 32}));
  for (const auto& t : f->tensors()) EXPECT_EQ(t.name.find("experts.2."), std::string::npos) << t.name;
  // Column 2j of expert 3's gate_up is its gate's row j, column 2j + 1 its up's.
  const auto params = m->named_parameters();
  const at::Tensor fused = io::read_tensor(*f, gate_up)[3];
  EXPECT_TRUE(at::equal(fused.select(1, 10), params["model.layers.1.mlp.experts.3.gate_proj.weight"][5]));
  EXPECT_TRUE(at::equal(fused.select(1, 11), params["model.layers.1.mlp.experts.3.up_proj.weight"][5]));
  model::CausalLM back = io::load_pretrained(dir.string());
  const auto loaded = back->named_parameters();
  for (const auto& item : params) EXPECT_TRUE(at::equal(item.value(), loaded[item.key()])) << item.key();

  // The experts of layer 0 as MXFP4 (one block per 32 inputs), the rest as saved: loads, and the
  // weights are the blocks' values; a wrong blocks shape is named.
  std::vector<at::Tensor> keep;
  auto rewrite = [&](int64_t blocks_per_row) {
    std::vector<io::TensorWrite> writes;
    for (const auto& t : f->tensors()) {
      if (t.name == "model.layers.0.mlp.experts.gate_up_proj") continue;
      keep.push_back(io::read_tensor(*f, t));
      writes.push_back(io::tensor_write(t.name, keep.back()));
    }
    keep.push_back(at::full({4, 128, blocks_per_row, 16}, 0x21, at::kByte));  // values 0.5 and 1.0
    writes.push_back(io::tensor_write("model.layers.0.mlp.experts.gate_up_proj_blocks", keep.back()));
    keep.push_back(at::full({4, 128, blocks_per_row}, 127, at::kByte));
    writes.push_back(io::tensor_write("model.layers.0.mlp.experts.gate_up_proj_scales", keep.back()));
    io::write_safetensors((dir / "model.safetensors").string(), writes);
  };
  rewrite(1);
  model::CausalLM quantized = io::load_pretrained(dir.string());
  const auto qp = quantized->named_parameters();
  EXPECT_TRUE(at::equal(qp["model.layers.0.mlp.experts.2.gate_proj.weight"][7].slice(0, 0, 2),
                        at::tensor(std::vector<float>{0.5f, 1.0f})));
  EXPECT_TRUE(at::equal(qp["model.layers.1.mlp.experts.2.gate_proj.weight"], params["model.layers.1.mlp.experts.2.gate_proj.weight"]));
  rewrite(2);
  const std::string err = expect_error([&] { io::load_pretrained(dir.string()); });
  EXPECT_NE(err.find("model.layers.0.mlp.experts.gate_up_proj_blocks and _scales (checkpoint U8 [4, 128, 2, 16]"),
            std::string::npos)
      << err;
  fs::remove_all(dir);
}

TEST(Checkpoint, SaveLoadRoundTripAndStrictErrors) {
  auto dir = temp_dir("ckpt");
  model::CausalLM m(tiny_config());
  model::init_weights(m, 1);
  io::save_pretrained(m, dir.string());
  model::CausalLM back = io::load_pretrained(dir.string());
  for (const auto& item : m->named_parameters()) {
    EXPECT_TRUE(at::equal(item.value(), back->named_parameters()[item.key()])) << item.key();
  }
  EXPECT_NE(model::describe(back).find("attention"), std::string::npos);

  // A model with another shape is refused, with every mismatch named.
  auto other = tiny_config();
  other.intermediate_size = 40;
  model::CausalLM wrong(other);
  std::string err = expect_error([&] { io::load_weights(wrong, dir.string()); });
  EXPECT_NE(err.find("shape mismatches (6)"), std::string::npos) << err;
  EXPECT_NE(err.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << err;

  auto tied = tiny_config();
  tied.tie_word_embeddings = true;
  model::CausalLM tied_model(tied);
  err = expect_error([&] { io::load_weights(tied_model, dir.string()); });
  EXPECT_NE(err.find("unexpected tensors (1):\n    lm_head.weight"), std::string::npos) << err;

  // Pickle checkpoints are never loaded.
  auto pickle = temp_dir("pickle");
  fs::copy(dir / "config.json", pickle / "config.json");
  std::ofstream(pickle / "pytorch_model.bin") << "not loaded";
  err = expect_error([&] { io::load_pretrained(pickle.string()); });
  EXPECT_NE(err.find("never loaded"), std::string::npos) << err;
  fs::remove_all(dir);
  fs::remove_all(pickle);
}

}  // namespace

// swiglu_packed (the grouped projections' SwiGLU on [gate | up]) gives at::silu(gate) * up and its
// autograd gradients bit for bit, in float32, bf16 and float64, and its gradient is one tensor.
TEST(Model, PackedSwigluIsTheChainBitForBit) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor gu = (at::randn({3, 5, 2 * 37}, at::kDouble) * 3).to(dtype).requires_grad_();
    const at::Tensor dh = at::randn({3, 5, 37}, at::kDouble).to(dtype);
    const at::Tensor ref_in = gu.detach().clone().requires_grad_();
    const at::Tensor ref = at::silu(ref_in.narrow(-1, 0, 37)) * ref_in.narrow(-1, 37, 37);
    ref.backward(dh);
    for (const bool kernel : {false, true}) {  // the CUDA kernel asked for on the CPU: the same chain
      gu.mutable_grad() = at::Tensor();
      const at::Tensor h = model::swiglu_packed(gu, kernel);
      h.backward(dh);
      EXPECT_TRUE(h.equal(ref));
      EXPECT_TRUE(gu.grad().equal(ref_in.grad()));
      EXPECT_TRUE(gu.grad().is_contiguous());
    }
  }
  EXPECT_NE(test::error_of([] { model::swiglu_packed(at::zeros({2, 7})); }).find("swiglu_packed"), std::string::npos);
}
