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
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("init", "Create a randomly initialised model from a config.json and save it");
  cmd->add_option("config", args->config, "Hugging Face config.json (see configs/models/)")->required()->check(CLI::ExistingFile);
  cmd->add_option("out", args->out, "Output checkpoint directory")->required();
  cmd->add_option("--seed", args->seed, "Initialisation seed")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Saved dtype: float32, bfloat16, float16")->capture_default_str();
  cmd->callback([args] {
    model::CausalLM m(io::load_model_config(args->config));
    model::init_weights(m, args->seed);
    io::SaveOptions save;
    save.dtype = parse_dtype(args->dtype);
    io::save_pretrained(m, args->out, save);
    std::cout << "saved " << model::summarize_parameters(m).total << " parameters to " << args->out << "\n";
  });
}

}  // namespace ft::cli
