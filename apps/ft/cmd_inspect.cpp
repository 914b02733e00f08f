// ft inspect: what a checkpoint holds.
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/adapt/nf4.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/model/inspect.h"

namespace ft::cli {

void add_inspect(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto nf4 = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand("inspect", "Show a checkpoint's architecture, parameter counts, dtypes and memory");
  cmd->add_option("model_dir", *dir, "Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_flag("--nf4", *nf4, "Also show the memory of the base as QLoRA stores it (NF4 linear layers, block 64, "
                               "double-quantized maxima)");
  cmd->callback([dir, nf4] {
    auto ckpt = io::SafetensorsCheckpoint::open(*dir);
    std::map<std::string, int64_t> stored;
    uint64_t bytes = 0;
    std::set<std::string> files;
    for (const auto& [name, entry] : ckpt.tensors()) {
      stored[std::string(io::dtype_name(entry.info->dtype))] += entry.info->numel();
      bytes += entry.info->nbytes();
      files.insert(std::filesystem::path(entry.file->path()).filename().string());
    }
    model::CausalLM m = io::load_pretrained(*dir);
    std::cout << "checkpoint     " << *dir << " (" << files.size() << " safetensors file"
              << (files.size() == 1 ? "" : "s") << ", " << ckpt.tensors().size() << " tensors, "
              << bytes / double(1 << 20) << " MiB)\n";
    std::cout << "stored dtypes ";
    for (const auto& [dtype, n] : stored) std::cout << " " << dtype << ": " << n;
    std::cout << "\n" << model::describe(m);
    if (*nf4) {
      int64_t quantized = 0, q_bytes = 0, other_bytes = 0;
      std::set<const void*> seen;
      for (const auto& item : m->named_modules()) {
        auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
        if (lin == nullptr || item.key() == "lm_head") continue;
        quantized += lin->weight.numel();
        q_bytes += adapt::nf4_bytes(lin->weight.numel());
        seen.insert(lin->weight.unsafeGetTensorImpl());
      }
      for (const auto& p : m->parameters()) {
        if (!seen.count(p.unsafeGetTensorImpl())) other_bytes += p.numel() * p.element_size();
      }
      std::cout << "NF4 (QLoRA)    linear layers " << quantized << " weights in " << q_bytes / double(1 << 20)
                << " MiB (" << double(q_bytes) / double(std::max<int64_t>(quantized, 1))
                << " bytes per weight); with the rest in its stored dtype " << (q_bytes + other_bytes) / double(1 << 20)
                << " MiB\n";
    }
  });
}

}  // namespace ft::cli
