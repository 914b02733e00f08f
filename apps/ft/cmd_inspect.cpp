// ft inspect: what a checkpoint holds.
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/model/inspect.h"

namespace ft::cli {

void add_inspect(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("inspect", "Show a checkpoint's architecture, parameter counts, dtypes and memory");
  cmd->add_option("model_dir", *dir, "Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->callback([dir] {
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
  });
}

}  // namespace ft::cli
