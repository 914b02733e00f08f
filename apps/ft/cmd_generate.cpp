// ft generate: continue a prompt of token ids with a KV cache (greedy or top-p sampling).
#include <ATen/ATen.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/model/generate.h"
#include "ft/util/error.h"

namespace ft::cli {
namespace {

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      FT_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      FT_FAIL("--prompt-ids: '", item, "' is not an integer token id");
    }
  }
  return ids;
}

}  // namespace

void add_generate(CLI::App& app) {
  struct Args {
    std::string dir, prompt_ids, device = "auto", dtype = "float32";
    int64_t max_new_tokens = 32;
    bool sample = false;
    double temperature = 1.0, top_p = 0.9;
    uint64_t seed = 0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a KV cache (greedy, or top-p sampling)");
  cmd->add_option("model_dir", a->dir, "Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids, e.g. 1,15043,29892")->required();
  cmd->add_option("-n,--max-new-tokens", a->max_new_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_flag("--sample", a->sample, "Sample with temperature and top-p instead of greedy decoding");
  cmd->add_option("--temperature", a->temperature, "Sampling temperature")->capture_default_str();
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--seed", a->seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "float32, bfloat16 or float16")->capture_default_str();
  cmd->callback([a] {
    io::LoadOptions load;
    load.device = parse_device(a->device);
    load.dtype = parse_dtype(a->dtype);
    model::CausalLM m = io::load_pretrained(a->dir, load);
    model::GenerateOptions g;
    g.max_new_tokens = a->max_new_tokens;
    g.greedy = !a->sample;
    g.temperature = a->temperature;
    g.top_p = a->top_p;
    g.seed = a->seed;
    g.stop_tokens = m->config().eos_token_ids;
    g.on_token = [](int64_t t) { std::cout << t << " " << std::flush; };
    const auto prompt = parse_ids(a->prompt_ids);
    std::cout << "prompt: " << a->prompt_ids << "\ngenerated: ";
    const auto start = std::chrono::steady_clock::now();
    auto out = model::generate(m, prompt, g);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "\n" << out.size() << " tokens in " << seconds << " s (" << out.size() / std::max(seconds, 1e-9)
              << " tokens/s) on " << load.device << "\n";
  });
}

}  // namespace ft::cli
