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

}  // namespace ft::cli
