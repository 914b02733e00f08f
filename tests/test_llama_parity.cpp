// Parity with Hugging Face transformers: tiny random models of every family, saved by
// save_pretrained, loaded by libft; logits, loss and greedy generation must match.
// Reference files come from tests/python/make_reference_models.py (a ctest fixture).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/model/generate.h"
#include "ft/util/autocast.h"
#include "ft/util/json.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace ft;

namespace {

// From the environment (ctest sets it), so that object files do not depend on the build folder.
const std::string kRefDir = [] {
  const char* dir = std::getenv("LIBFT_REFERENCE_DIR");
  return std::string(dir ? dir : "LIBFT_REFERENCE_DIR-is-unset");
}();

std::vector<std::string> families() {
  if (!fs::exists(fs::path(kRefDir) / "families.json")) return {};
  return load_json_file((fs::path(kRefDir) / "families.json").string()).get<std::vector<std::string>>();
}

struct Reference {
  at::Tensor input_ids, attention_mask, labels, logits, loss, greedy_prompt, greedy_tokens;
};

Reference load_reference(const std::string& dir) {
  auto f = io::SafetensorsFile::open((fs::path(dir) / "reference.safetensors").string());
  auto get = [&](const char* name) { return io::read_tensor(*f, f->at(name)); };
  return {get("input_ids"), get("attention_mask"), get("labels"), get("logits"),
          get("loss"), get("greedy_prompt"), get("greedy_tokens")};
}

struct Case {
  std::string family;
  c10::Device device;
  c10::ScalarType dtype;
  double logits_tol;  // on max|a−b| / max|b| over non-padding positions
  double loss_tol;    // relative
  bool autocast = false;  // float32 weights under bf16 autocast (as the trainer runs dtype: bfloat16)
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return info.param.family + "_" + (info.param.device.is_cuda() ? "cuda" : "cpu") + "_" +
         (info.param.autocast ? "autocast" : info.param.dtype == at::kFloat ? "f32" : "bf16");
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const auto& family : {"llama2", "llama3", "llama3_sharded", "llama_bias", "smollm", "mistral", "qwen2", "qwen3",
                              "granite", "gemma", "gemma2", "gemma3", "gemma3_scaled",
                              "gemma3_image_text", "phi3", "phi3_longrope", "smollm3", "olmo2", "qwen2_yarn",
                              "llama_yarn", "olmo3", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss",
                              "gpt_oss_mxfp4"}) {
    // float32: the bound, 1e-4.
    out.push_back({family, c10::kCPU, at::kFloat, 1e-4, 1e-4});
    out.push_back({family, c10::Device(c10::kCUDA, 0), at::kFloat, 1e-4, 1e-4});
    // bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 4e-3); through two layers and the head the
    // logits drift by a few of those steps.
    // The same on the CPU, and bf16 autocast over float32 weights (the trainer's dtype: bfloat16).
    // Gemma 2's logits are soft-capped at 4 here, so the error is relative to a small maximum:
    // transformers' own bf16 forward is 3.26e-2 from its float32 logits (libft's: the same, 3.26e-2).
    // Qwen2-MoE's autocast case: a token's router picks another expert in bf16, and the logits at
    // that position move; transformers' own autocast forward is 5.4e-2 from its float32 logits
    // (libft's: 5.6e-2).
    const double bf16_tol = std::string(family) == "gemma2" ? 4e-2 : std::string(family) == "qwen2_moe" ? 7e-2 : 3e-2;
    for (const c10::Device device : {c10::Device(c10::kCUDA, 0), c10::Device(c10::kCPU)}) {
      out.push_back({family, device, at::kBFloat16, bf16_tol, 2e-2});
      out.push_back({family, device, at::kFloat, bf16_tol, 2e-2, /*autocast=*/true});
    }
  }
  return out;
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.family << " on " << c.device << " in " << c.dtype << (c.autocast ? " under bf16 autocast" : "");
}

class HFParity : public testing::TestWithParam<Case> {};

TEST_P(HFParity, LogitsLossAndGreedyMatchTransformers) {
  const Case& c = GetParam();
  if (c.device.is_cuda()) FT_REQUIRE_CUDA();
  ASSERT_FALSE(families().empty()) << "reference models missing in " << kRefDir
                                   << " (the ctest fixture make_reference_models did not run)";
  const std::string dir = (fs::path(kRefDir) / c.family).string();
  ASSERT_TRUE(fs::exists(dir)) << dir;
  Reference ref = load_reference(dir);
  model::CausalLM m = io::load_pretrained(dir, {c.device, c.dtype});
  m->eval();
  at::NoGradGuard no_grad;

  model::ForwardOptions f;
  f.attention_mask = ref.attention_mask.to(c.device);
  at::Tensor logits;
  {
    util::AutocastScope autocast(c.autocast, c.device.type());
    logits = m->forward(ref.input_ids.to(c.device), f).to(at::kFloat).cpu();
  }
  ASSERT_EQ(logits.sizes(), ref.logits.sizes());
  at::Tensor valid = ref.attention_mask.to(at::kBool);
  const double err = test::max_rel_error(logits.index({valid}), ref.logits.index({valid}));
  EXPECT_LE(err, c.logits_tol) << c.family;

  const double loss = model::causal_lm_loss(logits, ref.labels).item<double>();
  const double ref_loss = ref.loss.item<double>();
  std::cout << "[parity] " << c.family << " " << c.device << " " << c.dtype << (c.autocast ? " autocast" : "") << " logits " << err << " loss "
            << std::abs(loss - ref_loss) / std::abs(ref_loss) << "\n";
  EXPECT_NEAR(loss, ref_loss, c.loss_tol * std::abs(ref_loss)) << c.family;

  if (c.dtype == at::kFloat && !c.autocast) {
    auto prompt = std::vector<int64_t>(ref.greedy_prompt.data_ptr<int64_t>(),
                                       ref.greedy_prompt.data_ptr<int64_t>() + ref.greedy_prompt.numel());
    model::GenerateOptions g;
    g.max_new_tokens = ref.greedy_tokens.numel();
    auto tokens = model::generate(m, prompt, g);
    auto expected = std::vector<int64_t>(ref.greedy_tokens.data_ptr<int64_t>(),
                                         ref.greedy_tokens.data_ptr<int64_t>() + ref.greedy_tokens.numel());
    EXPECT_EQ(tokens, expected) << c.family << ": greedy generation with the KV cache differs from transformers";
  }

  // Save back for the Python round-trip check (tests/python/check_roundtrip.py), CPU float32 only.
  if (!c.device.is_cuda() && c.dtype == at::kFloat && !c.autocast) {
    io::SaveOptions save;
    if (c.family == "llama3") save.max_shard_bytes = 64 << 10;  // exercise sharded writing too
    io::save_pretrained(m, (fs::path(kRefDir) / c.family / "libft_saved").string(), save);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, HFParity, testing::ValuesIn(cases()), case_name);

}  // namespace
