// ft init: a freshly initialised model from a Hugging Face config.json, saved as a checkpoint.
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/model/inspect.h"

namespace ft::cli {

void add_init(CLI::App& app) {
  struct Args {
    std::string config, out, dtype = "float32";
    uint64_t seed = 0;
    bool force = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("init", "Create a randomly initialised model from a config.json and save it");
  cmd->add_option("config", args->config, "Hugging Face config.json (see configs/models/)")->required()->check(CLI::ExistingFile);
  cmd->add_option("out", args->out, "Output checkpoint directory (absent or empty, unless --force)")->required();
  cmd->add_option("--seed", args->seed, "Initialisation seed")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Saved dtype: float32, bfloat16, float16")->capture_default_str();
  cmd->add_flag("--force", args->force,
                 "Replace the model in a non-empty output directory (all of its files: the new checkpoint is written "
                 "beside it and renamed into its place)");
  cmd->callback([args] {
    check_output_dir("init", args->out, {}, args->force);
    model::CausalLM m(io::load_model_config(args->config));
    model::init_weights(m, args->seed);
    io::SaveOptions save;
    save.dtype = parse_dtype(args->dtype);
    write_output_dir("init", args->out, args->force, [&](const std::string& dir) { io::save_pretrained(m, dir, save); });
    std::cout << "saved " << model::summarize_parameters(m).total << " parameters to " << args->out << "\n";
  });
}

}  // namespace ft::cli
