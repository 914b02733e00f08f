// ft train: a training run from a YAML config (see configs/train-tiny.yaml), with key=value overrides.
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/config/run_config.h"
#include "ft/train/run.h"

namespace ft::cli {

void add_train(CLI::App& app) {
  struct Args {
    std::string config;
    std::vector<std::string> overrides;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("train", "Train (fine-tune or pretrain) a model from a YAML run config");
  cmd->add_option("config", a->config, "Run config, e.g. configs/train-tiny.yaml")->required()->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "section.key=value overrides (YAML values), e.g. max_steps=20 optimizer.lr=1e-3");
  cmd->footer(
      "Writes OUTPUT_DIR/config.yaml (the resolved config), OUTPUT_DIR/metrics.jsonl (one JSON object per\n"
      "logged step and per evaluation), checkpoints in OUTPUT_DIR/checkpoints (checkpoint.every) and the\n"
      "trained model as a Hugging Face checkpoint in OUTPUT_DIR/final. Running the same command again resumes\n"
      "from the newest intact checkpoint. SIGINT/SIGTERM (Ctrl-C) save a checkpoint and exit with 128 + the\n"
      "signal's number; a second Ctrl-C exits at once.");
  cmd->callback([a] {
    const config::RunConfig c = config::load_run_config(a->config, a->overrides);
    train::RunOptions options;
    options.handle_signals = true;
    const train::RunSummary s = train::run_training(c, options);
    if (s.stop == train::StopReason::Signal) {
      std::cout << "interrupted at step " << s.steps << "; checkpoint in " << s.last_checkpoint
                << "; run the same command to resume\n";
      std::cout.flush();
      throw CLI::RuntimeError(128 + s.signal);
    }
    std::cout << "trained " << s.steps << " steps (" << s.skipped << " skipped): loss " << s.first_loss << " -> "
              << s.last_loss;
    for (const auto& [name, loss] : s.final_eval_loss) std::cout << ", eval " << name << " " << loss;
    std::cout << "; model in " << s.final_dir << "\n";
  });
}

}  // namespace ft::cli
