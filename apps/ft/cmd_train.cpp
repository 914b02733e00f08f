// ft train: a training run from a YAML config (see configs/train-tiny.yaml), with key=value overrides.
#include <iostream>
#include <ATen/ATen.h>

#include <memory>

#include "commands.h"
#include "ft/config/run_config.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/train/run.h"
#include "ft/util/progress.h"

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
      if (s.rank == 0)
        std::cout << "interrupted at step " << s.steps << "; checkpoint in " << s.last_checkpoint
                << "; run the same command to resume\n";
      std::cout.flush();
      throw CLI::RuntimeError(128 + s.signal);
    }
    if (s.rank != 0) return;  // data parallel: rank 0 reports for the job
    std::cout << "trained " << s.steps << " steps (" << s.skipped << " skipped): loss " << s.first_loss << " -> "
              << s.last_loss;
    for (const auto& [name, loss] : s.final_eval_loss) std::cout << ", eval " << name << " " << loss;
    std::cout << "; model in " << s.final_dir << "\n";
  });
}

void add_batches(CLI::App& app) {
  struct Args {
    std::string config, output;
    int64_t steps = 1;
    std::vector<std::string> overrides;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("batches", "Export the batches a training run would see, as safetensors");
  cmd->add_option("config", a->config, "Run config")->required()->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "section.key=value overrides, as for ft train");
  cmd->add_option("-o,--output", a->output, "Output .safetensors file")->required();
  cmd->add_option("--steps", a->steps, "Optimizer steps to export (from step 0)")->check(CLI::PositiveNumber);
  cmd->footer(
      "Writes int64 tensors input_ids, labels, position_ids and segment_ids of shape\n"
      "(steps, grad_accum, batch_size, seq_len): exactly the micro-batches `ft train` feeds the model, in\n"
      "order, so that another implementation (tests/python/train_reference.py) can train on the same data.");
  cmd->callback([a] {
    const config::RunConfig c = config::load_run_config(a->config, a->overrides);
    data::Batcher batcher = train::training_batcher(c);
    const int64_t n = a->steps * c.data.grad_accum, rows = c.data.batch_size, cols = c.data.seq_len;
    const char* names[] = {"input_ids", "labels", "position_ids", "segment_ids"};
    std::vector<at::Tensor> out;
    for (int k = 0; k < 4; ++k) out.push_back(at::empty({a->steps, c.data.grad_accum, rows, cols}, at::kLong));
    for (int64_t i = 0; i < n; ++i) {
      const auto batch = batcher.next();
      FT_CHECK(batch && batch->rows == rows && batch->cols == cols, "[batches] batch ", i, " is not ", rows, " × ", cols);
      int64_t* dst[] = {out[0].data_ptr<int64_t>(), out[1].data_ptr<int64_t>(), out[2].data_ptr<int64_t>(),
                        out[3].data_ptr<int64_t>()};
      for (int64_t j = 0; j < rows * cols; ++j) {
        const int64_t at = i * rows * cols + j;
        dst[0][at] = batch->input_ids[static_cast<size_t>(j)];
        dst[1][at] = batch->labels[static_cast<size_t>(j)];
        dst[2][at] = batch->position_ids[static_cast<size_t>(j)];
        dst[3][at] = batch->segment_ids[static_cast<size_t>(j)];
      }
    }
    std::vector<io::TensorWrite> writes;
    for (int k = 0; k < 4; ++k) writes.push_back(io::tensor_write(names[k], out[static_cast<size_t>(k)]));
    io::write_safetensors(a->output, writes);
    std::cout << "wrote " << a->output << ": " << a->steps << " steps × " << c.data.grad_accum << " micro-batches of "
              << rows << " × " << cols << " tokens\n";
  });
}

}  // namespace ft::cli
