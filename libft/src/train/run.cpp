#include "ft/train/run.h"

#include <ATen/autocast_mode.h>
#include <ATen/Context.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>

#include "ft/data/batcher.h"
#include "ft/data/tokenizer.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/model/inspect.h"
#include "ft/train/batch.h"
#include "ft/train/optimizer.h"
#include "ft/train/schedule.h"
#include "ft/train/step.h"
#include "ft/util/error.h"
#include "ft/util/progress.h"

namespace fs = std::filesystem;

namespace ft::train {

namespace {

using Clock = std::chrono::steady_clock;

c10::Device resolve_device(const std::string& name) {
  if (name == "auto") return at::hasCUDA() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  c10::Device d = c10::kCPU;
  try {
    d = c10::Device(name);
  } catch (const c10::Error&) {
    FT_FAIL("[train] device: '", name, "' is not a device (cpu, cuda, cuda:N, auto)");
  }
  FT_CHECK(!d.is_cuda() || at::hasCUDA(), "[train] device: ", name, ": CUDA is not available on this machine");
  return d;
}

// bfloat16 autocast for the forward passes on CUDA (weights, gradients and optimizer state stay
// float32); restores the previous state when the run ends, normally or by an exception.
class AutocastScope {
 public:
  AutocastScope(bool enable) : enabled_(enable) {
    if (!enabled_) return;
    previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~AutocastScope() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(at::kCUDA, previous_);
    at::autocast::clear_cache();
  }

 private:
  bool enabled_, previous_ = false;
};

struct EvalSet {
  std::string name;
  std::vector<data::BatcherSource> sources;
  bool held_out = false;  ///< the held-out documents of the training stores, else whole stores
};

struct Stores {
  std::vector<data::BatcherSource> train;
  std::vector<EvalSet> eval;
  int64_t vocab_size = 0;
};

Stores open_stores(const config::RunConfig& c) {
  // Without a tokenizer in the config, the stores must agree with the first one among themselves.
  std::string fingerprint = c.tokenizer.empty() ? data::TokenStoreReader::inspect(c.data.train.front()).tokenizer_fingerprint
                                                : data::Tokenizer::load(c.tokenizer).fingerprint();
  Stores s;
  auto open = [&](const std::string& path) {
    auto reader = data::TokenStoreReader::open(path, fingerprint);
    s.vocab_size = std::max(s.vocab_size, reader->info().vocab_size);
    return data::BatcherSource{reader, 1.0};
  };
  for (const auto& p : c.data.train) s.train.push_back(open(p));
  if (c.eval.held_out_docs > 0) s.eval.push_back({"held_out", s.train, true});
  for (const auto& p : c.eval.stores) s.eval.push_back({fs::path(p).stem().string(), {open(p)}, false});
  return s;
}

data::BatcherOptions train_batcher_options(const config::RunConfig& c) {
  data::BatcherOptions o;
  o.mode = data::BatchMode::Packed;
  o.seq_len = c.data.seq_len;
  o.batch_size = c.data.batch_size;
  o.shuffle = c.data.shuffle;
  o.seed = c.data.seed;
  o.max_epochs = 0;  // endless: max_steps ends the run
  o.eval.count = c.eval.held_out_docs;
  return o;
}

struct EvalResult {
  double loss = 0.0;
  int64_t targets = 0;
};

EvalResult evaluate(model::CausalLM& model, const config::RunConfig& c, const EvalSet& set, c10::Device device) {
  data::BatcherOptions o = train_batcher_options(c);
  o.batch_size = c.eval.batch_size;
  o.shuffle = false;
  o.max_epochs = 1;
  if (set.held_out) o.split = data::Split::Eval;  // same held-out choice as the training batcher
  else o.eval = {};
  data::Batcher batcher(set.sources, o);
  model->eval();
  double loss_sum = 0.0;
  int64_t targets = 0;
  int64_t batches = 0;
  while (auto batch = batcher.next()) {
    if (c.eval.max_batches > 0 && batches == c.eval.max_batches) break;
    const AccumulateResult r = evaluate_loss(model, {to_tensors(*batch, device)});
    loss_sum += r.loss * static_cast<double>(r.n_targets);
    targets += r.n_targets;
    ++batches;
  }
  model->train();
  FT_CHECK(targets > 0, "[eval] set '", set.name, "' has no target token");
  return {loss_sum / static_cast<double>(targets), targets};
}

class MetricsFile {
 public:
  explicit MetricsFile(const fs::path& path) : path_(path), out_(path, std::ios::trunc) {
    FT_CHECK(out_.good(), "[train] cannot write ", path.string());
  }
  void write(const nlohmann::json& line) {
    out_ << line.dump() << "\n";
    out_.flush();  // a crashed or interrupted run keeps every line written so far
    FT_CHECK(out_.good(), "[train] writing ", path_.string(), " failed");
  }

 private:
  fs::path path_;
  std::ofstream out_;
};

// JSON has no NaN or Infinity; a skipped step's values are written as null.
nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

}  // namespace

RunSummary run_training(const config::RunConfig& c, std::FILE* log) {
  const auto start = Clock::now();
  const c10::Device device = resolve_device(c.device);
  const bool bf16 = c.dtype == "bfloat16";
  FT_CHECK(!bf16 || device.is_cuda(), "[train] dtype bfloat16 (autocast) needs a CUDA device; on CPU use float32");

  // --- setup -------------------------------------------------------------------------------------
  model::CausalLM model{nullptr};
  if (!c.model.checkpoint.empty()) {
    io::LoadOptions lo;
    lo.device = device;
    model = io::load_pretrained(c.model.checkpoint, lo);
  } else {
    model = model::CausalLM(io::load_model_config(c.model.config));
    model::init_weights(model, c.model.init_seed);
    model->to(device);
  }
  model->train();
  const Stores stores = open_stores(c);
  FT_CHECK(stores.vocab_size <= model->config().vocab_size, "[train] the token stores' vocabulary (",
           stores.vocab_size, ") is larger than the model's (", model->config().vocab_size, ")");
  data::Batcher batcher(stores.train, train_batcher_options(c));

  OptimizerOptions oo;
  oo.kind = parse_optimizer_kind(c.optimizer.name);
  oo.lr = c.optimizer.lr;
  oo.beta1 = c.optimizer.beta1;
  oo.beta2 = c.optimizer.beta2;
  oo.eps = c.optimizer.eps;
  oo.weight_decay = c.optimizer.weight_decay;
  oo.momentum = c.optimizer.momentum;
  auto optimizer = make_optimizer(model, oo);
  const ParameterGroups groups = group_parameters(model, oo);
  ScheduleOptions schedule{parse_schedule_kind(c.schedule.name), c.schedule.warmup_steps, c.schedule.total_steps};
  StepOptions step_options;
  step_options.clip_grad_norm = c.clip_grad_norm;
  step_options.on_nonfinite = parse_nonfinite_policy(c.on_nonfinite);

  const fs::path out_dir(c.output_dir);
  fs::create_directories(out_dir);
  {
    std::ofstream cfg(out_dir / "config.yaml", std::ios::trunc);
    cfg << "# resolved from " << c.source << "\n" << config::to_yaml(c);
    FT_CHECK(cfg.good(), "[train] cannot write ", (out_dir / "config.yaml").string());
  }
  MetricsFile metrics(out_dir / "metrics.jsonl");

  const model::ParameterSummary params = model::summarize_parameters(model);
  std::fprintf(log, "[train] %s: %lld parameters (%zu tensors with weight decay %g, %zu without), device %s, %s\n",
               c.source.c_str(), static_cast<long long>(params.total), groups.decay.size(), oo.weight_decay,
               groups.no_decay.size(), device.str().c_str(), c.dtype.c_str());
  std::fprintf(log, "[train] %lld steps of %lld × %lld rows of %lld tokens; %s lr %g, %s schedule, warmup %lld\n",
               static_cast<long long>(c.max_steps), static_cast<long long>(c.data.grad_accum),
               static_cast<long long>(c.data.batch_size), static_cast<long long>(c.data.seq_len),
               c.optimizer.name.c_str(), c.optimizer.lr, c.schedule.name.c_str(),
               static_cast<long long>(c.schedule.warmup_steps));

  RunSummary summary;
  auto run_evals = [&](int64_t step) {
    for (const EvalSet& set : stores.eval) {
      const std::string& name = set.name;
      const EvalResult e = evaluate(model, c, set, device);
      metrics.write({{"type", "eval"}, {"step", step}, {"set", name}, {"loss", e.loss},
                     {"perplexity", std::exp(e.loss)}, {"targets", e.targets}});
      std::fprintf(log, "\n[eval] step %lld, %s: loss %.4f, perplexity %.2f (%lld targets)\n",
                   static_cast<long long>(step), name.c_str(), e.loss, std::exp(e.loss),
                   static_cast<long long>(e.targets));
      summary.final_eval_loss[name] = e.loss;
    }
  };

  // --- the loop ----------------------------------------------------------------------------------
  AutocastScope autocast(bf16);
  StepCounters counters;
  Progress progress("train", static_cast<double>(c.max_steps), "steps", log);
  int64_t tokens_total = 0, consecutive_skips = 0;
  double train_seconds = 0.0;
  while (counters.step < c.max_steps) {
    const auto step_start = Clock::now();
    std::vector<BatchTensors> micro_batches;
    for (int64_t i = 0; i < c.data.grad_accum; ++i) {
      std::optional<data::Batch> batch = batcher.next();
      FT_CHECK(batch.has_value(), "[train] the batcher ended early");  // endless stream: cannot happen
      micro_batches.push_back(to_tensors(*batch, device));
    }
    const double lr = c.optimizer.lr * lr_factor(schedule, counters.step);
    const AccumulateResult r = accumulate_gradients(model, micro_batches);
    const int64_t step_index = counters.step;
    const StepOutcome out = optimizer_step(*optimizer, r.n_targets > 0 ? r.loss : NAN, lr, step_options, counters);
    const double seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    train_seconds += seconds;
    tokens_total += r.n_tokens;
    const double tokens_per_s = static_cast<double>(tokens_total) / std::max(train_seconds, 1e-9);
    if (!out.applied) {
      metrics.write({{"type", "skip"}, {"step", step_index}, {"loss", number(r.loss)},
                     {"grad_norm", number(out.grad_norm)}, {"targets", r.n_targets}, {"skipped", counters.skipped}});
      std::fprintf(log, "\n[train] step %lld skipped: %s (%lld skipped so far)\n", static_cast<long long>(step_index),
                   r.n_targets == 0 ? "no target token" : std::isfinite(r.loss) ? "non-finite gradient" : "non-finite loss",
                   static_cast<long long>(counters.skipped));
      FT_CHECK(++consecutive_skips < 20, "[train] 20 consecutive steps were non-finite at step ", step_index,
               "; stopping (lower the learning rate or check the data)");
      continue;
    }
    consecutive_skips = 0;
    if (summary.steps == 0) summary.first_loss = r.loss;
    summary.steps = counters.step;
    summary.last_loss = r.loss;
    if (counters.step % c.log_every == 0 || counters.step == c.max_steps) {
      metrics.write({{"type", "train"}, {"step", counters.step}, {"loss", r.loss}, {"lr", lr},
                     {"grad_norm", out.grad_norm}, {"targets", r.n_targets}, {"tokens", r.n_tokens},
                     {"tokens_per_s", tokens_per_s}, {"step_time_s", seconds}, {"skipped", counters.skipped}});
    }
    char extra[128];
    std::snprintf(extra, sizeof extra, "loss %.4f, lr %.2e, %.0f tok/s", r.loss, lr, tokens_per_s);
    progress.update(static_cast<double>(counters.step), extra);
    if (c.eval.every > 0 && counters.step % c.eval.every == 0 && counters.step < c.max_steps) run_evals(counters.step);
  }
  progress.finish();

  // --- wrap up -----------------------------------------------------------------------------------
  run_evals(counters.step);
  summary.skipped = counters.skipped;
  summary.final_dir = (out_dir / "final").string();
  io::save_pretrained(model, summary.final_dir);
  summary.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  summary.tokens_per_s = static_cast<double>(tokens_total) / std::max(train_seconds, 1e-9);
  std::fprintf(log, "[train] done: %lld steps (%lld skipped), loss %.4f → %.4f, %.0f tokens/s, %s; saved %s\n",
               static_cast<long long>(summary.steps), static_cast<long long>(summary.skipped), summary.first_loss,
               summary.last_loss, summary.tokens_per_s, Progress::format_duration(summary.seconds).c_str(),
               summary.final_dir.c_str());
  return summary;
}

}  // namespace ft::train
