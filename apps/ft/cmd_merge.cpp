// ft merge: a PEFT LoRA adapter folded into its base model, written as a plain Hugging Face checkpoint.
#include <ATen/ATen.h>

#include <algorithm>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/adapt/lora.h"
#include "ft/adapt/prefix.h"
#include "ft/util/error.h"
#include "ft/io/hf_checkpoint.h"

namespace ft::cli {

namespace {

// ", lm_head and embed_tokens trained in full" for an adapter with modules_to_save, else "".
std::string in_full(const adapt::LoraOptions& o) {
  std::string s;
  for (size_t i = 0; i < o.modules_to_save.size(); ++i)
    s += (i == 0 ? "" : i + 1 == o.modules_to_save.size() ? " and " : ", ") + o.modules_to_save[i];
  return s.empty() ? s : ", with " + s + " trained in full";
}

}  // namespace

void add_merge(CLI::App& app) {
  struct Args {
    std::string base, adapter, output, dtype;
    bool force = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("merge", "Merge a LoRA adapter (PEFT format) into its base model");
  cmd->add_option("base", a->base, "Base model: Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("adapter", a->adapter, "Adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-o,--output", a->output,
                  "Output checkpoint directory (absent or empty, unless --force; never the base or the adapter)")
      ->required();
  cmd->add_flag("--force", a->force,
                "Replace the model in a non-empty output directory (all of its files: the merged checkpoint is written "
                "beside it and renamed into its place)");
  cmd->add_option("--dtype", a->dtype, "Written dtype: float32 | bfloat16 | float16 (default: the base's)")
      ->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  cmd->footer(
      "W' = W + scale · B A for every adapted layer, computed in float32 (float64 for a float64 base) and stored\n"
      "in the base's dtype or --dtype, with the relative rounding error of each merged layer reported (an\n"
      "adapter trained on a QLoRA base is merged into the original 16/32-bit base this way);\n"
      "transformers loads the result without PEFT and computes the adapted model's logits.");
  cmd->callback([a] {
    check_output_dir("merge", a->output, {{"base model", a->base}, {"adapter", a->adapter}}, a->force);
    FT_CHECK(adapt::peft_adapter_type(a->adapter) != "PREFIX_TUNING", "[merge] ", a->adapter,
             " is a prefix-tuning adapter: its keys and values are extra attention inputs, not a change of weights, so "
             "there is nothing to merge (use it as an adapter: ft generate --adapter)");
    model::CausalLM m = io::load_pretrained(a->base);
    const adapt::LoraOptions o = adapt::load_peft_adapter(m, a->adapter);
    const auto layers = adapt::lora_layers(m);
    adapt::merge_and_unload_lora(m);
    io::SaveOptions so;
    so.copy_files_from = a->base;  // the base's tokenizer and generation settings
    if (a->dtype == "float32") so.dtype = at::kFloat;
    if (a->dtype == "bfloat16") so.dtype = at::kBFloat16;
    if (a->dtype == "float16") so.dtype = at::kHalf;
    // The error of writing each merged layer in the output dtype: ||cast(W') − W'|| / ||W'||.
    auto params = m->named_parameters();
    std::vector<std::pair<double, std::string>> errors;
    for (const auto& l : layers) {
      const at::Tensor w = params[l.module + ".weight"].detach().to(at::kDouble);
      const at::Tensor stored = params[l.module + ".weight"].detach().to(so.dtype.value_or(w.scalar_type())).to(at::kDouble);
      errors.emplace_back(((stored - w).norm() / w.norm().clamp_min(1e-300)).item<double>(), l.module);
    }
    std::sort(errors.rbegin(), errors.rend());
    write_output_dir("merge", a->output, a->force, [&](const std::string& dir) { io::save_pretrained(m, dir, so); });
    std::cout << "merged " << (o.dora ? "DoRA" : "LoRA") << " r " << o.r << " (alpha " << o.alpha << ") of "
              << layers.size() << " layers" << in_full(o) << " into " << a->base << "; wrote " << a->output
              << (a->dtype.empty() ? "" : " in " + a->dtype) << "\n";
    std::cout << "largest rounding error of a merged layer in the written dtype: " << errors.front().first << " ("
              << errors.front().second << ")\n";
    for (size_t i = 1; i < errors.size() && i < 4; ++i)
      std::cout << "  next: " << errors[i].first << " (" << errors[i].second << ")\n";
  });
}

void add_check_adapter(CLI::App& app) {
  struct Args {
    std::string adapter, base;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("check-adapter", "Check a LoRA or prefix-tuning adapter (PEFT format) against a base model before use");
  cmd->add_option("adapter", a->adapter, "Adapter directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("base", a->base, "Base model: Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->footer("Reports every problem (config options, target coverage, tensor names, shapes, dtypes, NaN/Inf) and\n"
              "exits with status 1 if there is any; loading such an adapter is always an error.");
  cmd->callback([a] {
    model::CausalLM m = io::load_pretrained(a->base);
    std::vector<std::string> problems;
    std::string type;
    try {
      type = adapt::peft_adapter_type(a->adapter);
    } catch (const Error& e) {
      problems.push_back(e.what());
    }
    if (type == "PREFIX_TUNING") {
      problems = adapt::check_peft_prefix(m, a->adapter);
      if (problems.empty()) {
        model::CausalLM probe = io::load_pretrained(a->base);
        const adapt::PrefixOptions o = adapt::load_peft_prefix(probe, a->adapter);
        std::cout << a->adapter << ": OK for " << a->base << ": prefix of " << o.num_virtual_tokens
                  << " virtual tokens on " << probe->config().num_hidden_layers << " layers\n";
        return;
      }
    } else if (!type.empty()) {
      problems = adapt::check_peft_adapter(m, a->adapter);
    }
    if (problems.empty()) {
      model::CausalLM probe = io::load_pretrained(a->base);
      const adapt::LoraOptions o = adapt::load_peft_adapter(probe, a->adapter);
      const auto layers = adapt::lora_layers(probe);
      std::cout << a->adapter << ": OK for " << a->base << ": " << (o.dora ? "DoRA" : "LoRA") << " r " << o.r
                << " alpha " << o.alpha << (o.rslora ? " (rsLoRA scaling)" : "") << " on " << layers.size()
                << " layers" << in_full(o) << "\n";
      return;
    }
    std::cout << a->adapter << ": " << problems.size() << " problem" << (problems.size() == 1 ? "" : "s") << " with "
              << a->base << "\n";
    for (const auto& p : problems) std::cout << "  " << p << "\n";
    std::cout.flush();
    throw CLI::RuntimeError(1);
  });
}

}  // namespace ft::cli
