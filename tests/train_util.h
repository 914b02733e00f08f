#pragma once
// Helpers for tests that train through the C++ API (test_checkpoint.cpp, test_ewc.cpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "ft/config/run_config.h"
#include "ft/io/hf_config.h"
#include "test_util.h"

namespace ft::test {

namespace fs = std::filesystem;

// A store whose documents follow next = 3·t + 1 (mod 97), and a config training the tiny model on it.
inline config::RunConfig synthetic_run(const fs::path& dir) {
  std::ofstream(dir / "config.json") << io::model_config_to_json(test::tiny_config());
  test::write_rule_store((dir / "store.h5").string(), 60, 11, 30);
  config::RunConfig c;
  c.source = "test";
  c.model.config = (dir / "config.json").string();
  c.data.train = {(dir / "store.h5").string()};
  c.data.seq_len = 24;
  c.data.batch_size = 2;
  c.data.grad_accum = 2;
  c.optimizer.lr = 1e-2;
  c.schedule.name = "cosine";
  c.schedule.warmup_steps = 2;
  c.max_steps = 12;
  c.schedule.total_steps = 12;
  c.eval.held_out_docs = 6;
  c.eval.every = 4;
  c.eval.batch_size = 2;
  c.checkpoint.every = 3;
  c.output_dir = (dir / "run").string();
  return c;
}

struct Quiet {
  std::FILE* f = std::getenv("LIBFT_TEST_VERBOSE") ? stderr : std::tmpfile();
  ~Quiet() {
    if (f != stderr) std::fclose(f);
  }
};

inline std::vector<nlohmann::json> metric_lines(const fs::path& run) {
  std::vector<nlohmann::json> v;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    j.erase("tokens_per_s");
    j.erase("step_time_s");
    j.erase("eval_time_s");
    j.erase("peak_rss_mib");
    v.push_back(j);
  }
  return v;
}

/// Two runs' training losses step by step (metric_lines of each, same length): the largest
/// |a − b| / a over the "train" lines, and how many there were.
struct LossComparison {
  double worst = 0;
  int steps = 0;
};
inline LossComparison compare_train_losses(const std::vector<nlohmann::json>& a, const std::vector<nlohmann::json>& b) {
  LossComparison c;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i].at("type") != "train") continue;
    const double x = a[i].at("loss"), y = b[i].at("loss");
    c.worst = std::max(c.worst, std::abs(x - y) / x);
    ++c.steps;
  }
  return c;
}

}  // namespace ft::test
