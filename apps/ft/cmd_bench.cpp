// ft bench: adapter vs full fine-tuning (with and without EWC and replay) on one model, data and
// budget, reported side by side (ft/bench/bench.h).
#include <iostream>
#include <memory>

#include "commands.h"
#include "ft/bench/bench.h"

namespace ft::cli {

void add_bench(CLI::App& app) {
  struct Args {
    std::string config;
    std::vector<std::string> overrides;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("bench", "Compare adaptation modes and forgetting control on one model, data and budget");
  cmd->add_option("config", a->config, "Bench config, e.g. configs/bench-forgetting.yaml")->required()->check(CLI::ExistingFile);
  cmd->add_option("overrides", a->overrides, "key=value overrides of the bench config's top-level keys (output_dir=...)");
  cmd->footer(
      "Evaluates the base model on every set, estimates the Fisher once if a variant uses EWC, trains every\n"
      "variant into OUTPUT_DIR/<name> (rerunning resumes unfinished ones), then writes OUTPUT_DIR/report.md,\n"
      "report.html (table and SVG plots, viewable offline) and results.json from the runs' metrics.");
  cmd->callback([a] {
    const bench::BenchConfig c = bench::load_bench_config(a->config, a->overrides);
    const bench::BenchResult r = bench::run_bench(c);
    std::cout << bench::markdown_table(r) << "\nreports in " << c.output_dir << "/report.md and report.html\n";
  });
}

}  // namespace ft::cli
