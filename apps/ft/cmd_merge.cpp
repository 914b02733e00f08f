// ft merge: a PEFT LoRA adapter folded into its base model, written as a plain Hugging Face checkpoint.
#include <ATen/ATen.h>

#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/adapt/lora.h"
#include "ft/io/hf_checkpoint.h"

namespace ft::cli {

void add_merge(CLI::App& app) {
  struct Args {
    std::string base, adapter, output;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("merge", "Merge a LoRA adapter (PEFT format) into its base model");
  cmd->add_option("base", a->base, "Base model: Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("adapter", a->adapter, "Adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("-o,--output", a->output, "Output checkpoint directory")->required();
  cmd->footer(
      "W' = W + scale · B A for every adapted layer, computed in float32 (float64 for a float64 base) and stored\n"
      "in the base's dtype; transformers loads the result without PEFT and computes the adapted model's logits.");
  cmd->callback([a] {
    model::CausalLM m = io::load_pretrained(a->base);
    const adapt::LoraOptions o = adapt::load_peft_adapter(m, a->adapter);
    const auto layers = adapt::lora_layers(m);
    adapt::merge_and_unload_lora(m);
    io::save_pretrained(m, a->output);
    std::cout << "merged LoRA r " << o.r << " (alpha " << o.alpha << ") of " << layers.size() << " layers into "
              << a->base << "; wrote " << a->output << "\n";
  });
}

void add_check_adapter(CLI::App& app) {
  struct Args {
    std::string adapter, base;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("check-adapter", "Check a LoRA adapter (PEFT format) against a base model before use");
  cmd->add_option("adapter", a->adapter, "Adapter directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("base", a->base, "Base model: Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->footer("Reports every problem (config options, target coverage, tensor names, shapes, dtypes, NaN/Inf) and\n"
              "exits with status 1 if there is any; loading such an adapter is always an error.");
  cmd->callback([a] {
    model::CausalLM m = io::load_pretrained(a->base);
    const std::vector<std::string> problems = adapt::check_peft_adapter(m, a->adapter);
    if (problems.empty()) {
      model::CausalLM probe = io::load_pretrained(a->base);
      const adapt::LoraOptions o = adapt::load_peft_adapter(probe, a->adapter);
      const auto layers = adapt::lora_layers(probe);
      std::cout << a->adapter << ": OK for " << a->base << ": LoRA r " << o.r << " alpha " << o.alpha << " on "
                << layers.size() << " layers\n";
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
