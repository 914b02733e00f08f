// Prefix tuning (ft/adapt/prefix.h): the prefix as P cached tokens under packing, padding, the KV
// cache and activation checkpointing; PEFT files (strict loading); interop with Python PEFT
// (PeftPrefixInterop.*, with the files of tests/python/peft_interop.py in LIBFT_PEFT_DIR).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ft/adapt/mode.h"
#include "ft/adapt/prefix.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/util/error.h"
#include "test_util.h"

using namespace ft;
namespace fs = std::filesystem;

namespace {

model::CausalLM base_model(at::ScalarType dtype = at::kFloat) {
  model::CausalLM m(test::tiny_config());
  model::init_weights(m, 11);
  m->to(dtype);
  m->eval();
  return m;
}

model::CausalLM prefixed_model(bool projection, at::ScalarType dtype = at::kFloat) {
  model::CausalLM m = base_model(dtype);
  adapt::PrefixOptions o;
  o.num_virtual_tokens = 3;
  o.projection = projection;
  o.encoder_hidden_size = projection ? 12 : 0;
  o.seed = 4;
  adapt::apply_prefix(m, o);
  m->eval();
  return m;
}

at::Tensor random_ids(int64_t b, int64_t t, int64_t seed) {
  return at::arange(seed, seed + b * t, at::kLong).mul(31).remainder(97).view({b, t});
}

using test::error_of;

}  // namespace

// The prefix is attended exactly like P cached tokens: the same model without a prefix, given a KV
// cache that holds the prefix's keys and values, computes the same logits. Only the prefix trains.
TEST(Prefix, EqualsACacheHoldingThePrefix) {
  model::CausalLM m = prefixed_model(/*projection=*/true);
  at::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(2, 7, 3);
  const at::Tensor got = m->forward(ids);
  const auto kv = m->prefix_encoder->keys_values();
  ASSERT_EQ(kv.size(), 4u);
  EXPECT_EQ(kv[0].sizes(), (std::vector<int64_t>{2, 3, 8}));  // (G, P, D): key/value heads, not query heads
  model::KVCache cache;
  for (int64_t i = 0; i < 2; ++i) {
    cache.keys.push_back(kv[2 * i].unsqueeze(0).expand({2, -1, -1, -1}));
    cache.values.push_back(kv[2 * i + 1].unsqueeze(0).expand({2, -1, -1, -1}));
  }
  model::CausalLM plain = base_model();
  model::ForwardOptions f;
  f.cache = &cache;
  EXPECT_LE(test::max_rel_error(got, plain->forward(ids, f)), 1e-5);
  EXPECT_GT(test::max_rel_error(got, plain->forward(ids)), 1e-3);  // the prefix matters

  const auto counts = adapt::count_trainable(m);
  EXPECT_EQ(counts.trainable, 3 * 16 + (16 * 12 + 12) + (12 * 64 + 64));  // embedding + MLP
  for (const auto& item : m->named_parameters())
    EXPECT_EQ(item.value().requires_grad(), item.key().rfind("prefix_encoder.", 0) == 0) << item.key();
}

// Packed documents (segment ids, positions restarting) each see the whole prefix and nothing of
// each other: each computes what it computes alone. Padding does not change the real tokens.
TEST(Prefix, PackingAndPaddingSeeTheWholePrefix) {
  model::CausalLM m = prefixed_model(false);
  at::NoGradGuard no_grad;
  const at::Tensor a = random_ids(1, 5, 1), b = random_ids(1, 4, 9);
  model::ForwardOptions f;
  f.position_ids = at::cat({at::arange(5, at::kLong), at::arange(4, at::kLong)}).view({1, 9});
  f.segment_ids = at::cat({at::zeros({5}, at::kInt), at::ones({4}, at::kInt)}).view({1, 9});
  const at::Tensor packed = m->forward(at::cat({a, b}, 1), f);
  EXPECT_LE(test::max_rel_error(packed.slice(1, 0, 5), m->forward(a)), 1e-5);
  EXPECT_LE(test::max_rel_error(packed.slice(1, 5), m->forward(b)), 1e-5);

  // Right padding with an attention mask over the tokens only (the prefix is always visible).
  model::ForwardOptions p;
  p.attention_mask = at::cat({at::ones({1, 4}, at::kLong), at::zeros({1, 3}, at::kLong)}, 1);
  const at::Tensor padded = m->forward(at::cat({b, at::full({1, 3}, 5, at::kLong)}, 1), p);
  EXPECT_TRUE(padded.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(padded.slice(1, 0, 4), m->forward(b)), 1e-5);
  // A mask that also covers the prefix is refused: its length is the tokens'.
  p.attention_mask = at::ones({1, 10}, at::kLong);
  EXPECT_NE(error_of([&] { m->forward(b, p); }).find("attention_mask must be (B, cached + new tokens) = (1, 4)"),
            std::string::npos);
}

// Generation: the model puts its prefix into an empty cache; chunked decoding equals the full pass.
TEST(Prefix, KVCacheDecodingEqualsTheFullPass) {
  model::CausalLM m = prefixed_model(true);
  at::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(2, 8, 5);
  const at::Tensor full = m->forward(ids);
  model::KVCache cache;
  model::ForwardOptions f;
  f.cache = &cache;
  std::vector<at::Tensor> parts;
  for (auto [lo, hi] : {std::pair{0, 4}, {4, 7}, {7, 8}}) parts.push_back(m->forward(ids.slice(1, lo, hi), f));
  EXPECT_LE(test::max_rel_error(at::cat(parts, 1), full), 1e-5);
  EXPECT_EQ(cache.length(), 3 + 8);
  EXPECT_EQ(cache.prefix, 3);
  // A cache filled by another model (no prefix) is refused.
  model::CausalLM plain = base_model();
  model::KVCache other;
  model::ForwardOptions g;
  g.cache = &other;
  plain->forward(ids, g);
  EXPECT_NE(error_of([&] { m->forward(ids.slice(1, 0, 1), g); }).find("a cache belongs to one model"), std::string::npos);
}

// Activation checkpointing: the prefix's keys and values are inputs of every checkpointed block, so
// its gradients (through the projection MLP, too) are those of the plain backward pass.
TEST(Prefix, ActivationCheckpointingGivesTheSameGradients) {
  const at::Tensor ids = random_ids(2, 9, 2);
  std::map<std::string, at::Tensor> grads[2];
  for (int ckpt = 0; ckpt < 2; ++ckpt) {
    model::CausalLM m = prefixed_model(true);
    m->train();
    m->set_gradient_checkpointing(ckpt == 1);
    model::ForwardOptions f;
    f.segment_ids = at::cat({at::zeros({2, 4}, at::kInt), at::ones({2, 5}, at::kInt)}, 1);
    model::causal_lm_loss(m->forward(ids, f), ids).backward();
    for (const auto& item : m->named_parameters()) {
      if (item.value().requires_grad()) grads[ckpt][item.key()] = item.value().grad().clone();
    }
  }
  ASSERT_EQ(grads[0].size(), 5u);
  for (const auto& [name, g] : grads[0]) {
    ASSERT_TRUE(grads[1].count(name)) << name;
    EXPECT_GT(g.abs().max().item<double>(), 0.0) << name;
    EXPECT_LE(test::max_rel_error(grads[1][name], g), 1e-5) << name;
  }
}

// PEFT's files: the computed table is saved (the MLP is not) and loads as a plain table with the
// same logits; the config describes the model's key/value shape; loading is strict.
TEST(Prefix, PeftFilesRoundTripAndStrictLoading) {
  const fs::path dir = test::scratch_dir("prefix_files");
  model::CausalLM m = prefixed_model(true);
  adapt::PrefixOptions o;
  o.num_virtual_tokens = 3;
  o.projection = true;
  o.encoder_hidden_size = 12;
  adapt::save_peft_prefix(m, o, (dir / "adapter").string(), "base");
  const auto config = nlohmann::json::parse(std::ifstream(dir / "adapter" / "adapter_config.json"));
  EXPECT_EQ(config["peft_type"], "PREFIX_TUNING");
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["num_layers"], 2);
  EXPECT_EQ(config["token_dim"], 16);  // 2 key/value heads × head_dim 8
  EXPECT_EQ(config["num_attention_heads"], 2);
  EXPECT_EQ(config["prefix_projection"], true);
  EXPECT_EQ(config["encoder_hidden_size"], 12);
  auto file = io::SafetensorsFile::open((dir / "adapter" / "adapter_model.safetensors").string());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].name, "prompt_embeddings");
  EXPECT_EQ(file->tensors()[0].shape, (std::vector<int64_t>{3, 64}));
  EXPECT_EQ(adapt::peft_adapter_type((dir / "adapter").string()), "PREFIX_TUNING");

  at::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(2, 6, 8);
  const at::Tensor want = m->forward(ids);
  model::CausalLM loaded = base_model();
  EXPECT_TRUE(adapt::check_peft_prefix(loaded, (dir / "adapter").string()).empty());
  const adapt::PrefixOptions back = adapt::load_peft_prefix(loaded, (dir / "adapter").string());
  EXPECT_EQ(back.num_virtual_tokens, 3);
  EXPECT_FALSE(back.projection);  // loaded as the table, as PEFT does
  EXPECT_LE(test::max_rel_error(loaded->forward(ids), want), 1e-6);
  // A model with a prefix is not a Hugging Face checkpoint.
  EXPECT_NE(error_of([&] { io::save_pretrained(loaded, (dir / "hf").string()); }).find("PEFT adapter"),
            std::string::npos);

  // Another base: every mismatch is listed, and loading refuses.
  io::ModelConfig deep = test::tiny_config();
  deep.num_hidden_layers = 3;
  deep.layer_window.assign(3, 0);
  deep.num_key_value_heads = 4;
  model::CausalLM other(deep);
  const auto problems = adapt::check_peft_prefix(other, (dir / "adapter").string());
  ASSERT_EQ(problems.size(), 4u);
  EXPECT_NE(problems[0].find("num_layers = 2, but the model has 3"), std::string::npos) << problems[0];
  EXPECT_NE(problems[1].find("token_dim = 16, but the model has 32"), std::string::npos) << problems[1];
  EXPECT_NE(problems[2].find("num_attention_heads = 2, but the model has 4"), std::string::npos) << problems[2];
  EXPECT_NE(problems[3].find("has shape [3, 64], the model needs [3, 192]"), std::string::npos) << problems[3];
  EXPECT_NE(error_of([&] { adapt::load_peft_prefix(other, (dir / "adapter").string()); }).find("does not fit the model"),
            std::string::npos);

  // Encoder-decoder prefixes, another task, NaN and extra tensors.
  auto bad = config;
  bad["num_transformer_submodules"] = 2;
  fs::copy(dir / "adapter", dir / "bad");
  std::ofstream(dir / "bad" / "adapter_config.json") << bad.dump();
  model::CausalLM m2 = base_model();
  EXPECT_NE(error_of([&] { adapt::load_peft_prefix(m2, (dir / "bad").string()); }).find("num_transformer_submodules = 2"),
            std::string::npos);
  bad = config;
  bad["task_type"] = "SEQ_2_SEQ_LM";
  std::ofstream(dir / "bad" / "adapter_config.json") << bad.dump();
  EXPECT_NE(error_of([&] { adapt::load_peft_prefix(m2, (dir / "bad").string()); }).find("only CAUSAL_LM"),
            std::string::npos);
  std::ofstream(dir / "bad" / "adapter_config.json") << config.dump();
  at::Tensor nan_table = at::zeros({3, 64});
  nan_table[1][5] = std::nan("");
  at::Tensor extra = at::zeros({2});
  io::write_safetensors((dir / "bad" / "adapter_model.safetensors").string(),
                        {io::tensor_write("prompt_embeddings", nan_table), io::tensor_write("extra", extra)});
  const auto p2 = adapt::check_peft_prefix(m2, (dir / "bad").string());
  ASSERT_EQ(p2.size(), 2u);
  EXPECT_NE(p2[0].find("'prompt_embeddings' holds NaN or Inf"), std::string::npos) << p2[0];
  EXPECT_NE(p2[1].find("'extra' is not part of a prefix adapter"), std::string::npos) << p2[1];
  fs::remove_all(dir);
}

// --- against Python PEFT (files from tests/python/peft_interop.py make) ------------------------------

namespace {

const char* peft_dir() {
  const char* d = std::getenv("LIBFT_PEFT_DIR");
  return d && *d && fs::exists(fs::path(d) / "peft_logits.safetensors") ? d : nullptr;
}

model::ForwardOptions padded_options(const io::SafetensorsFile& ref) {
  model::ForwardOptions f;
  f.attention_mask = io::read_tensor(ref, ref.at("attention_mask"));
  return f;
}

}  // namespace

// PEFT's prefix adapters (a plain table, and one trained through the projection MLP) load into
// libft with PEFT's logits, also for a right-padded batch with an attention mask.
// The base a prefix of peft_interop.py is for (BASES there).
std::string prefix_base(const std::string& name) {
  return name == "prefix_qwen3"    ? "base_qwen3"
         : name == "prefix_gemma3" ? "base_gemma3"
         : name == "prefix_gemma2" ? "base_gemma2"
         : name == "prefix_phi3"   ? "base_phi3"
                                   : "base";
}

TEST(PeftPrefixInterop, LibftLoadsPeftPrefixesWithTheSameLogits) {
  const char* d = peft_dir();
  if (!d) GTEST_SKIP() << "LIBFT_PEFT_DIR has no PEFT files (ctest's peft_make writes them)";
  auto ref = io::SafetensorsFile::open((fs::path(d) / "peft_logits.safetensors").string());
  const at::Tensor input = io::read_tensor(*ref, ref->at("input_ids"));
  for (const char* name : {"prefix", "prefix_proj", "prefix_qwen3", "prefix_gemma3", "prefix_gemma2", "prefix_phi3"}) {
    SCOPED_TRACE(name);
    const std::string base_name = prefix_base(name);
    model::CausalLM m = io::load_pretrained((fs::path(d) / base_name).string());
    m->eval();
    at::NoGradGuard no_grad;
    const at::Tensor base = m->forward(input);
    const std::string dir = (fs::path(d) / (std::string("peft_") + name)).string();
    EXPECT_TRUE(adapt::check_peft_prefix(m, dir).empty());
    adapt::load_peft_prefix(m, dir);
    const at::Tensor want = io::read_tensor(*ref, ref->at(std::string("logits_") + name));
    EXPECT_LE(test::max_rel_error(m->forward(input), want), 1e-4);
    EXPECT_GT(test::max_rel_error(base, want), 1e-2);
    const at::Tensor want_padded = io::read_tensor(*ref, ref->at(std::string("logits_padded_") + name));
    const at::Tensor mask = io::read_tensor(*ref, ref->at("attention_mask"));
    const at::Tensor got_padded = m->forward(input, padded_options(*ref));
    // Compare the real tokens only (PEFT's padding rows are unspecified).
    const at::Tensor keep = mask.to(at::kBool).unsqueeze(-1).expand_as(want_padded);
    EXPECT_LE(test::max_rel_error(got_padded.masked_select(keep), want_padded.masked_select(keep)), 1e-4);
  }
}

// libft makes its own prefixes (the same configs, its own values) and saves them with its logits;
// tests/python/peft_interop.py verify loads them with PEFT.
TEST(PeftPrefixInterop, LibftSavesPrefixesForPeft) {
  const char* d = peft_dir();
  if (!d) GTEST_SKIP() << "LIBFT_PEFT_DIR has no PEFT files (ctest's peft_make writes them)";
  auto ref = io::SafetensorsFile::open((fs::path(d) / "peft_logits.safetensors").string());
  const at::Tensor input = io::read_tensor(*ref, ref->at("input_ids"));
  std::vector<at::Tensor> keep{input};
  std::vector<io::TensorWrite> writes{io::tensor_write("input_ids", keep[0])};
  for (const char* name : {"prefix", "prefix_proj", "prefix_qwen3", "prefix_gemma3", "prefix_gemma2", "prefix_phi3"}) {
    const std::string base_name = prefix_base(name);
    adapt::PrefixOptions o;
    o.num_virtual_tokens = 5;
    o.projection = std::string(name) == "prefix_proj";
    o.seed = 21;
    model::CausalLM m = io::load_pretrained((fs::path(d) / base_name).string());
    m->eval();
    adapt::apply_prefix(m, o);
    at::NoGradGuard no_grad;
    keep.push_back(m->forward(input).contiguous());
    writes.push_back(io::tensor_write(std::string("logits_") + name, keep.back()));
    adapt::save_peft_prefix(m, o, (fs::path(d) / (std::string("libft_") + name)).string(), base_name);
  }
  io::write_safetensors((fs::path(d) / "libft_prefix_logits.safetensors").string(), writes);
}
