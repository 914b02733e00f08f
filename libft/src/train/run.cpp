#include "ft/train/run.h"

#include <ATen/Context.h>

#ifdef LIBFT_WITH_CUDA_KERNELS
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <csignal>
#include <set>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>

#include "ft/adapt/mode.h"
#include "ft/data/batcher.h"
#include "ft/data/tokenizer.h"
#include "ft/dist/dist.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/model/inspect.h"
#include "ft/io/safetensors.h"
#include "ft/train/batch.h"
#include "ft/train/checkpoint.h"
#include "ft/train/ewc.h"
#include "ft/train/graphs.h"
#include "ft/train/optimizer.h"
#include "ft/train/schedule.h"
#include "ft/train/state.h"
#include "ft/train/step.h"
#include "ft/util/autocast.h"
#include "ft/util/cpu_cache.h"
#include "ft/util/error.h"
#include "ft/util/event_log.h"
#include "ft/util/json.h"
#include "ft/util/progress.h"

namespace fs = std::filesystem;

namespace ft::train {

c10::Device resolve_device(const std::string& name, const std::string& what) {
  c10::Device d = c10::kCPU;
  if (name == "auto") {
    d = at::hasCUDA() ? c10::Device(c10::kCUDA) : c10::Device(c10::kCPU);
  } else {
    try {
      d = c10::Device(name);
    } catch (const c10::Error&) {
      FT_FAIL(what, ": '", name, "' is not a device (cpu, cuda, cuda:N, auto)");
    }
    FT_CHECK(!d.is_cuda() || at::hasCUDA(), what, ": ", name, ": CUDA is not available on this machine");
  }
  // "cuda" names the current device, as in PyTorch. Give it its index: the caching allocator's
  // statistics and the per-device generators take an index, and index -1 is none.
  if (d.is_cuda() && !d.has_index()) {
#ifdef LIBFT_WITH_CUDA_KERNELS
    d = c10::Device(c10::kCUDA, c10::cuda::current_device());
#else
    d = c10::Device(c10::kCUDA, 0);
#endif
  }
  return d;
}

namespace {

using Clock = std::chrono::steady_clock;

struct EvalSet {
  std::string name;
  std::vector<data::BatcherSource> sources;
  int64_t held_out_docs = 0;  ///< > 0: only the documents a run with held_out_docs: N sets aside
};

struct Stores {
  std::vector<data::BatcherSource> train;
  std::vector<EvalSet> eval;
  int64_t vocab_size = 0;
};

// "STORE@N" → (STORE, N); "STORE" → (STORE, 0).
std::pair<std::string, int64_t> split_held_out(const std::string& spec) {
  const size_t at = spec.rfind('@');
  if (at == std::string::npos || at + 1 == spec.size()) return {spec, 0};
  const std::string digits = spec.substr(at + 1);
  if (!std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) return {spec, 0};
  return {spec.substr(0, at), std::stoll(digits)};
}

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
  // The held-out set draws from the target stores only, which come first in the training sources,
  // so that store i's held-out documents are the same in both batchers.
  if (c.eval.held_out_docs > 0) s.eval.push_back({"held_out", s.train, c.eval.held_out_docs});
  if (!c.replay.stores.empty()) {
    // Replay: a sampled mixture in which the replay stores give `ratio` of the rows, and every
    // store's share within its side is its share of that side's tokens.
    auto tokens = [](const data::BatcherSource& b) { return static_cast<double>(b.store->info().n_tokens); };
    double target_tokens = 0.0, replay_tokens = 0.0;
    for (const auto& b : s.train) target_tokens += tokens(b);
    std::vector<data::BatcherSource> replay;
    for (const auto& p : c.replay.stores) {
      replay.push_back(open(p));
      replay_tokens += tokens(replay.back());
      if (c.replay.held_out_docs > 0) replay.back().held_out = data::HeldOut{0.0, c.replay.held_out_docs, 0};
    }
    for (auto& b : s.train) b.weight = (1.0 - c.replay.ratio) * tokens(b) / target_tokens;
    for (auto& b : replay) b.weight = c.replay.ratio * tokens(b) / replay_tokens;
    s.train.insert(s.train.end(), replay.begin(), replay.end());
  }
  for (const auto& p : c.eval.stores) {
    const auto [path, held] = split_held_out(p);
    s.eval.push_back({fs::path(path).stem().string(), {open(path)}, held});
  }
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
  if (!c.replay.stores.empty()) o.mixing = data::Mixing::Sample;
  return o;
}

struct EvalResult {
  double loss = 0.0;
  int64_t targets = 0;
};

EvalResult evaluate(model::CausalLM& model, const config::RunConfig& c, const EvalSet& set, c10::Device device,
                    dist::ProcessGroup* group = nullptr) {
  const EvalLoss e = evaluate_sources(model, set.sources, c.data.seq_len, c.eval.batch_size, set.held_out_docs,
                                      c.eval.max_batches, device, group);
  FT_CHECK(e.targets > 0, "[eval] set '", set.name, "' has no target token");
  return {e.loss, e.targets};
}

// An output_dir whose run finished without keeping a checkpoint (checkpoint.every: 0) has a final/
// and nothing to resume from, so this run starts from step 0 and would overwrite that final/. That
// is a rerun only if the config is the one that wrote it; otherwise it would replace another run's
// model. Returns "" when <out>/config.yaml says the same as `resolved` (to_yaml of this run's
// config), else what differs, for the refusal.
std::string finished_run_difference(const fs::path& out_dir, const std::string& resolved) {
  const fs::path path = out_dir / "config.yaml";
  if (!fs::exists(path)) return path.string() + " is missing, so the run that wrote final/ is unknown";
  std::string text = read_text_file(path.string());
  if (text.rfind("# resolved from ", 0) == 0) text.erase(0, text.find('\n') == std::string::npos ? text.size() : text.find('\n') + 1);
  if (text == resolved) return "";
  std::istringstream was(text), now(resolved);
  std::string a, b;
  for (int line = 2;; ++line) {  // line 1 is the "# resolved from" comment
    const bool more_a = static_cast<bool>(std::getline(was, a));
    const bool more_b = static_cast<bool>(std::getline(now, b));
    if (!more_a && !more_b) break;
    if (!more_a) a = "(end of file)";
    if (!more_b) b = "(nothing)";
    if (a != b || !more_a || !more_b) {
      return path.string() + " line " + std::to_string(line) + " is '" + a + "', this run's config has '" + b + "'";
    }
  }
  return path.string() + " differs from this run's config";
}

// metrics.jsonl, appended line by line and flushed, so a crashed run keeps every line written. A
// resumed run first cuts it back to its length at the checkpoint (the lines after it are written
// again, identically, by the resumed steps).
class MetricsFile {
 public:
  /// Disabled (data-parallel ranks other than 0): writes nothing.
  MetricsFile(const fs::path& path, std::optional<uint64_t> resume_bytes, std::FILE* log, bool enabled = true)
      : path_(path), enabled_(enabled) {
    if (!enabled_) return;
    if (resume_bytes) {
      std::error_code ec;
      const uint64_t size = fs::exists(path) ? fs::file_size(path, ec) : 0;
      if (size < *resume_bytes) {
        std::fprintf(log, "[train] %s is shorter (%llu bytes) than at the checkpoint (%llu); appending to it\n",
                     path.string().c_str(), static_cast<unsigned long long>(size),
                     static_cast<unsigned long long>(*resume_bytes));
      } else {
        fs::resize_file(path, *resume_bytes, ec);
        FT_CHECK(!ec, "[train] cannot truncate ", path.string(), ": ", ec.message());
      }
      out_.open(path, std::ios::app);
      bytes_ = std::min(size, *resume_bytes);
    } else {
      out_.open(path, std::ios::trunc);
    }
    FT_CHECK(out_.good(), "[train] cannot write ", path.string());
  }
  void write(const nlohmann::json& line) {
    if (!enabled_) return;
    const std::string text = line.dump() + "\n";
    out_ << text;
    out_.flush();
    FT_CHECK(out_.good(), "[train] writing ", path_.string(), " failed");
    bytes_ += text.size();
  }
  uint64_t bytes() const { return bytes_; }

 private:
  fs::path path_;
  bool enabled_ = true;
  std::ofstream out_;
  uint64_t bytes_ = 0;
};

// SIGINT/SIGTERM → a flag the loop checks between steps. SA_RESETHAND restores the default action
// after the first signal, so a second Ctrl-C ends the process at once.
//
// The handler runs on an alternate signal stack (SA_ONSTACK). oneDNN's JIT-compiled AVX-512 f32
// GEMM (the CPU linear layers' products) points the stack pointer into a heap workspace while it
// runs (uxlfoundation/oneDNN#4845, fixed upstream after the version libtorch 2.11 ships); a signal
// handled on the interrupted stack then writes its frame into the heap, and the process aborts
// later in malloc ("corrupted size vs. prev_size"). That was the rare abort of the data-parallel
// SIGTERM test: 2 of 12 runs with the GEMMs on transposed views, 0 of 24 with the alternate stack.
// Process-directed signals go to the main thread unless it blocks them, and the stack is set up for
// the thread that runs the training loop, which is the main thread of `ft train`.
std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int sig) { g_signal.store(sig); }

class SignalScope {
 public:
  explicit SignalScope(bool enable) : enabled_(enable) {
    if (!enabled_) return;
    g_signal.store(0);
    stack_.resize(std::max<size_t>(SIGSTKSZ, size_t{64} << 10));
    stack_t alt{};
    alt.ss_sp = stack_.data();
    alt.ss_size = stack_.size();
    alt_installed_ = sigaltstack(&alt, &old_alt_) == 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | (alt_installed_ ? SA_ONSTACK : 0);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~SignalScope() {
    if (!enabled_) return;
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    if (alt_installed_) sigaltstack(&old_alt_, nullptr);
  }
  SignalScope(const SignalScope&) = delete;
  SignalScope& operator=(const SignalScope&) = delete;
  int pending() const { return enabled_ ? g_signal.load() : 0; }

 private:
  bool enabled_;
  struct sigaction old_int_ {}, old_term_ {};
  std::vector<char> stack_;
  stack_t old_alt_{};
  bool alt_installed_ = false;
};

// FNV-1a over the step's input ids: the "data" field of train and skip lines, to compare sample order.
// In a data-parallel run the ranks' ids are gathered and hashed in global row order (micro-batch by
// micro-batch, rank by rank), so the hash is the one a single process with the whole batch writes.
std::string data_hash(const std::vector<data::Batch>& batches, dist::ProcessGroup* group) {
  uint64_t h = 1469598103934665603ull;
  auto add = [&](const int64_t* ids, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      for (int k = 0; k < 8; ++k) h = (h ^ ((static_cast<uint64_t>(ids[i]) >> (8 * k)) & 0xff)) * 1099511628211ull;
    }
  };
  if (!group || group->world() == 1) {
    for (const auto& b : batches) add(b.input_ids.data(), b.input_ids.size());
  } else {
    std::vector<int64_t> mine;
    for (const auto& b : batches) mine.insert(mine.end(), b.input_ids.begin(), b.input_ids.end());
    const std::vector<at::Tensor> all = group->all_gather(at::tensor(mine, at::kLong));
    const size_t per_batch = mine.size() / batches.size();
    for (size_t k = 0; k < batches.size(); ++k) {
      for (const at::Tensor& rank_ids : all) add(rank_ids.data_ptr<int64_t>() + k * per_batch, per_batch);
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// Resets the process's peak resident memory to its current value (Linux: "5" to clear_refs), so
// that the peak the metrics report is that of training, not of loading (a QLoRA base, for one, is
// read in float32 before it is quantized). Quietly does nothing where that is not possible.
void reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  if (out) out << "5" << std::flush;
}

// A "VmXXX:   12345 kB" field of /proc/self/status in MiB; 0 where /proc is unavailable.
double proc_status_mib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(field);
  while (std::getline(in, line)) {
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') return std::stod(line.substr(n + 1)) / 1024.0;
  }
  return 0.0;
}

// Peak resident memory of the process (VmHWM), MiB, since reset_peak_rss().
double peak_rss_mib() { return proc_status_mib("VmHWM"); }

// The caching allocator's peak on `device` back to its current use (CUDA only), as reset_peak_rss().
void reset_peak_device(c10::Device device) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  (void)device;
}

// Peak memory the caching allocator handed out on `device` since reset_peak_device(), MiB (CUDA only).
double peak_device_mib(c10::Device device) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024.0);
  }
#endif
  (void)device;
  return 0.0;
}

// JSON has no NaN or Infinity; a skipped step's values are written as null.
nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

}  // namespace

data::Batcher training_batcher(const config::RunConfig& c) {
  return data::Batcher(open_stores(c).train, train_batcher_options(c));
}

EvalLoss evaluate_sources(model::CausalLM& model, const std::vector<data::BatcherSource>& sources, int64_t seq_len,
                          int64_t batch_size, int64_t held_out_docs, int64_t max_batches, c10::Device device,
                          dist::ProcessGroup* group) {
  data::BatcherOptions o;
  o.mode = data::BatchMode::Packed;
  o.seq_len = seq_len;
  o.batch_size = batch_size;
  if (group) {
    o.rank = group->rank();
    o.world = group->world();
    o.batch_size = (batch_size + o.world - 1) / o.world;
  }
  o.shuffle = false;
  o.max_epochs = 1;
  o.mixing = data::Mixing::Concatenate;  // every document of the set once, whatever a training mixture
  if (held_out_docs > 0) {
    o.eval.count = held_out_docs;  // the documents a training run with eval.held_out_docs sets aside
    o.split = data::Split::Eval;
  }
  data::Batcher batcher(sources, o);
  const bool was_training = model->is_training();
  model->eval();
  double loss_sum = 0.0;
  EvalLoss e;
  int64_t batches = 0;
  while (auto batch = batcher.next()) {
    if (max_batches > 0 && batches == max_batches) break;
    const AccumulateResult r = evaluate_loss(model, {to_tensors(*batch, device)});
    loss_sum += r.loss * static_cast<double>(r.n_targets);
    e.targets += r.n_targets;
    ++batches;
  }
  if (was_training) model->train();
  if (group) {
    const std::vector<double> sums = group->sum({loss_sum, static_cast<double>(e.targets)});
    loss_sum = sums[0];
    e.targets = static_cast<int64_t>(sums[1]);
  }
  if (e.targets > 0) e.loss = loss_sum / static_cast<double>(e.targets);
  return e;
}

std::map<std::string, EvalLoss> evaluate_config_sets(model::CausalLM& model, const config::RunConfig& c,
                                                     c10::Device device) {
  std::map<std::string, EvalLoss> out;
  for (const EvalSet& set : open_stores(c).eval) {
    const EvalResult e = evaluate(model, c, set, device);
    out[set.name] = {e.loss, e.targets};
  }
  return out;
}

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::MaxSteps: return "max_steps";
    case StopReason::EarlyStopping: return "early_stopping";
    case StopReason::Signal: return "signal";
    case StopReason::Callback: return "callback";
  }
  return "?";
}

RunSummary run_training(const config::RunConfig& c, std::FILE* log) {
  RunOptions o;
  o.log = log;
  return run_training(c, o);
}

RunSummary run_training(const config::RunConfig& c, const RunOptions& ro) {
  const auto start = Clock::now();
  std::FILE* log = ro.log ? ro.log : stderr;
  Callbacks none;
  Callbacks& callbacks = ro.callbacks ? *ro.callbacks : none;
  c10::Device device = resolve_device(c.device);
  // CPU runs reuse their large per-step buffers instead of faulting fresh pages in every micro-batch
  // (ft/util/cpu_cache.h); LIBFT_CPU_CACHE=0 keeps c10's allocator.
  if (device.is_cpu()) util::install_cpu_cache();
  // The pool's idle blocks go back to the system when the run ends, after everything below is
  // destroyed (the allocator itself stays installed).
  struct TrimPoolOnExit {
    bool cpu;
    ~TrimPoolOnExit() {
      if (cpu) util::trim_cpu_cache();
    }
  } trim_pool{device.is_cpu()};

  // --- data parallel: a process group when a launcher started this process ---------------------
  const dist::LaunchEnv launch = dist::launch_env();
  std::shared_ptr<dist::ProcessGroup> group;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> quiet(nullptr, &std::fclose);
  if (launch.distributed()) {
    if (device.is_cuda()) {  // one GPU per process: the LOCAL_RANK-th of this machine
#ifdef LIBFT_WITH_CUDA_KERNELS
      FT_CHECK(launch.local_rank < c10::cuda::device_count(), "[dist] local rank ", launch.local_rank,
               " has no GPU: this machine has ", static_cast<int>(c10::cuda::device_count()));
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(launch.local_rank));
#endif
      device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank));
    }
    dist::GroupOptions go;
    go.backend = c.dist.backend;
    go.timeout = std::chrono::milliseconds(static_cast<int64_t>(c.dist.timeout_s * 1000.0));
    group = dist::ProcessGroup::create(launch, device, go);
    if (group->rank() != 0) {  // rank 0 alone reports; the others' errors still reach the caller
      quiet.reset(std::fopen("/dev/null", "w"));
      if (quiet) log = quiet.get();
    }
    std::fprintf(log, "[dist] %d rank%s, backend %s, timeout %g s (this process: %s)\n", group->world(),
                 group->world() == 1 ? "" : "s", group->backend().c_str(), c.dist.timeout_s, launch.describe().c_str());
  }
  const bool rank0 = !group || group->rank() == 0;
  // Leaving by an exception in a data-parallel job: the other ranks are (or will be) stuck in a
  // collective, so do not wait for the backend's queued work on the way out (ProcessGroup::abandon).
  struct AbandonOnError {
    std::shared_ptr<dist::ProcessGroup> group;
    int exceptions = std::uncaught_exceptions();
    ~AbandonOnError() {
      if (group && std::uncaught_exceptions() > exceptions) group->abandon();
    }
  } abandon_on_error{group};
  const bool bf16 = c.dtype == "bfloat16";

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
  // The routers' load-balancing loss, as transformers adds it where the config says
  // output_router_logits, or with the run's own weight.
  const model::ModelConfig& model_config = model->config();
  const double router_aux_loss_coef = c.model.router_aux_loss_coef.value_or(
      model_config.output_router_logits ? model_config.router_aux_loss_coef : 0.0);
  FT_CHECK(!c.model.router_aux_loss_coef || *c.model.router_aux_loss_coef == 0 || model_config.num_experts > 0,
           "[train] ", c.source, ": model.router_aux_loss_coef weighs the routers' load-balancing loss, but ",
           c.model.checkpoint.empty() ? c.model.config : c.model.checkpoint, " has no mixture-of-experts layers");
  const std::unique_ptr<adapt::Mode> mode = adapt::make_mode(c);
  mode->apply(model);
  if (bf16 && !mode->exports_base()) {
    const int64_t freed = adapt::store_frozen_linears(model, at::kBFloat16);
    if (freed > 0) {
      std::fprintf(log, "[train] frozen linear weights stored in bfloat16, as autocast computes with them (%.1f MiB less)\n",
                   static_cast<double>(freed) / (1024.0 * 1024.0));
    }
  }
  model->set_gradient_checkpointing(c.activation_checkpointing);
  model->set_loss_chunk(c.loss_chunk);
  model->set_fused_loss(c.kernels.loss);
  model->set_fused_rope(c.kernels.rope);
  model->set_fused_swiglu(c.kernels.swiglu);
  model->set_flash_sinks(c.kernels.flash_sinks);
  model->train();
  const Stores stores = open_stores(c);
  FT_CHECK(stores.vocab_size <= model->config().vocab_size, "[train] the token stores' vocabulary (",
           stores.vocab_size, ") is larger than the model's (", model->config().vocab_size, ")");

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
  std::optional<EwcPenalty> ewc;
  if (!c.ewc.state.empty()) ewc.emplace(model, load_ewc(c.ewc.state), c.ewc.lambda);
  ScheduleOptions schedule{parse_schedule_kind(c.schedule.name), c.schedule.warmup_steps, c.schedule.total_steps};
  StepOptions step_options;
  step_options.clip_grad_norm = c.clip_grad_norm;
  step_options.on_nonfinite = parse_nonfinite_policy(c.on_nonfinite);

  // --- output directory, checkpoints, resume -----------------------------------------------------
  const fs::path out_dir(c.output_dir);
  fs::create_directories(out_dir);
  CheckpointDir checkpoints((out_dir / "checkpoints").string());
  if (const int stale = rank0 ? checkpoints.clean_stale() : 0; stale > 0) {
    std::fprintf(log, "[checkpoint] removed %d unfinished checkpoint director%s of an interrupted save\n", stale,
                 stale == 1 ? "y" : "ies");
  }
  const std::string identity = [&] {
    if (!group || group->world() == 1) return run_identity(c);
    nlohmann::json j = nlohmann::json::parse(run_identity(c));
    j["world"] = group->world();
    return j.dump();
  }();
  TrainerState st;
  std::optional<std::string> resume_dir;
  if (c.checkpoint.resume == "never") {
    FT_CHECK(checkpoints.steps().empty(), "[train] ", checkpoints.root(),
             " holds checkpoints and checkpoint.resume is 'never': use a new output_dir, or checkpoint.resume: auto ",
             "to continue the run they belong to (with that run's config)");
  } else {
    // Checkpoints that are all damaged are not an empty directory: starting over would cut this
    // run's metrics.jsonl and overwrite its final/, so the run stops and says what is there.
    int64_t damaged = 0;
    if (rank0) {
      resume_dir = checkpoints.latest_valid(c.checkpoint.strict, log);
      if (!resume_dir) damaged = static_cast<int64_t>(checkpoints.steps().size());
    }
    if (group) {  // rank 0 chose (and cleaned up); everyone resumes from the same checkpoint
      double chosen = -1.0;
      if (resume_dir) {
        for (const int64_t s : checkpoints.steps()) {
          if (checkpoints.path(s) == *resume_dir) chosen = static_cast<double>(s);
        }
      }
      const std::vector<double> agreed = group->max({chosen, static_cast<double>(damaged)});
      chosen = agreed[0];
      damaged = static_cast<int64_t>(agreed[1]);
      if (chosen >= 0) resume_dir = checkpoints.path(static_cast<int64_t>(chosen));
    }
    FT_CHECK(damaged == 0, "[train] ", checkpoints.root(), " holds ", damaged, " checkpoint",
             damaged == 1 ? "" : "s", " and none is intact (each is named above as damaged), so there is nothing to ",
             "resume from; training from step 0 here would overwrite this run's metrics.jsonl and final/. To start ",
             "over, use a new output_dir, or remove ", checkpoints.root(), " yourself");
    FT_CHECK(resume_dir || c.checkpoint.resume != "required", "[train] checkpoint.resume is 'required' but ",
             checkpoints.root(), " holds no intact checkpoint");
  }
  // Dropout draws from the default generators; each data-parallel rank has its own stream (seed +
  // rank: rank 0's is a single process's), saved in the checkpoints and restored per rank.
  if (!resume_dir) at::manual_seed(c.seed + static_cast<uint64_t>(group ? group->rank() : 0));
  if (resume_dir) {
    st = read_training_state(*resume_dir, model, *mode, *optimizer, identity, group ? group->rank() : 0, device);
    // A run may be extended (a larger max_steps) but not cut below where it already is: final/ would
    // be written from the checkpoint's later step under a max_steps that says otherwise.
    FT_CHECK(st.step <= c.max_steps, "[train] ", *resume_dir, " is at step ", st.step, ", past max_steps ", c.max_steps,
             ": give max_steps of at least ", st.step, " to resume this run, or use a new output_dir");
    std::fprintf(log, "[train] resuming from %s (step %lld of %lld)\n", resume_dir->c_str(),
                 static_cast<long long>(st.step), static_cast<long long>(c.max_steps));
  }
  data::BatcherOptions batcher_options = train_batcher_options(c);
  if (group) {
    batcher_options.rank = group->rank();
    batcher_options.world = group->world();
  }
  data::Batcher batcher = [&] {
    if (!resume_dir) return data::Batcher(stores.train, batcher_options);
    try {
      return data::Batcher(stores.train, batcher_options, st.batcher);
    } catch (const Error& e) {
      FT_FAIL("[train] cannot resume from ", *resume_dir, ": ", e.what(),
              ". The token stores changed since that checkpoint: use a new output_dir, or remove ", checkpoints.root(),
              " to start over");
    }
  }();
  const std::string resolved_yaml = config::to_yaml(c);
  if (!resume_dir) {
    // A finished run that kept no checkpoint: rerun only with its own config (see
    // finished_run_difference). Rank 0 looks; every rank stops together.
    const bool finished = rank0 && fs::exists(out_dir / "final");
    std::string difference;
    if (finished) difference = finished_run_difference(out_dir, resolved_yaml);
    double refuse = difference.empty() ? 0.0 : 1.0;
    if (group) refuse = group->max({refuse})[0];
    FT_CHECK(refuse == 0.0, "[train] ", (out_dir / "final").string(), " holds the model of a finished run that kept no ",
             "checkpoint, and this run, starting from step 0, would overwrite it and its metrics.jsonl: ",
             difference.empty() ? "rank 0 found its config.yaml differs" : difference,
             ". Use a new output_dir, or move that final/ away to train here again");
    if (finished) {
      std::fprintf(log, "[train] %s is from this same config, which kept no checkpoint: training it again from step 0\n",
                   (out_dir / "final").string().c_str());
    }
  }
  // The resolved config, written only once the run is known to start or resume here: a run refused
  // above (another run's checkpoints, changed token stores, another finished run) leaves the
  // config.yaml of the run that owns this directory as it was.
  if (rank0) {
    const std::string text = "# resolved from " + c.source + "\n" + resolved_yaml;
    io::write_file_atomic((out_dir / "config.yaml").string(),
                          std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }
  MetricsFile metrics(out_dir / "metrics.jsonl", resume_dir ? std::optional<uint64_t>(st.metrics_bytes) : std::nullopt,
                      log, rank0);
  std::optional<EventLog> events;
  if (rank0) events.emplace(out_dir.string());
  // A SessionLog START makes TensorBoard drop what earlier processes in this directory logged from
  // that step on: after a resume, the steps past the checkpoint that this process replays; after a
  // start from step 0 (no checkpoint yet, e.g. killed before the first one), everything.
  if (events) events->session_start(resume_dir ? st.step + 1 : 0);
  auto event = [&](const std::string& tag, double value, int64_t step) {
    if (events) events->scalar(tag, value, step);
  };
  // Gradient all-reduce of the trainable parameters, overlapped with the backward pass.
  std::unique_ptr<dist::GradientReducer> reducer;
  if (group) {
    std::vector<at::Tensor> trainable;
    for (const auto& p : model->parameters()) {
      if (p.requires_grad()) trainable.push_back(p);
    }
    // Every replica starts from rank 0's weights, whatever each process loaded or initialised.
    {
      at::NoGradGuard no_grad;
      for (auto& p : trainable) {
        at::Tensor data = p.detach();
        group->broadcast(data, 0);
      }
    }
    reducer = std::make_unique<dist::GradientReducer>(
        group, trainable, static_cast<int64_t>(c.dist.bucket_mb * 1024.0 * 1024.0));
    std::fprintf(log, "[dist] gradients: %zu tensors in %zu buckets, %.2f MiB all-reduced per step\n",
                 trainable.size(), reducer->buckets(), static_cast<double>(reducer->bytes_per_step()) / (1024.0 * 1024.0));
  }

  // CUDA graphs: the micro-batch passes replayed (ft/train/graphs.h).
  std::unique_ptr<GraphedPasses> graphs;
  if (c.cuda_graphs) {
    FT_CHECK(!group, "[train] cuda_graphs: not with data parallelism (its gradient all-reduce starts from autograd "
                     "hooks inside the backward pass); leave cuda_graphs off for this run");
    FT_CHECK(!ro.before_forward, "[train] cuda_graphs: a before_forward hook cannot run inside a replayed pass");
    graphs = std::make_unique<GraphedPasses>(model, device);  // refuses any device but CUDA
    step_options.zero_in_place = true;
    std::fprintf(log, "[train] CUDA graphs: each micro-batch shape's forward and backward pass is captured once and "
                      "replayed\n");
  }

  const model::ParameterSummary params = model::summarize_parameters(model);
  std::fprintf(log, "[train] %s: %lld parameters (%zu tensors with weight decay %g, %zu without), device %s, %s\n",
               c.source.c_str(), static_cast<long long>(params.total), groups.decay.size(), oo.weight_decay,
               groups.no_decay.size(), device.str().c_str(), c.dtype.c_str());
  std::fprintf(log, "[train] %s\n", mode->describe(model).c_str());
  if (ewc) std::fprintf(log, "[train] %s, from %s\n", ewc->describe().c_str(), c.ewc.state.c_str());
  if (router_aux_loss_coef > 0) {
    std::fprintf(log, "[train] routers' load-balancing loss x %g in the objective (%s; top %lld of %lld experts)\n",
                 router_aux_loss_coef,
                 c.model.router_aux_loss_coef ? "model.router_aux_loss_coef" : "the config's output_router_logits and router_aux_loss_coef",
                 static_cast<long long>(model_config.num_experts_per_tok), static_cast<long long>(model_config.num_experts));
  }
  if (!c.replay.stores.empty()) {
    std::string names;
    for (const auto& p : c.replay.stores) names += (names.empty() ? "" : ", ") + p;
    std::fprintf(log, "[train] replay: %.0f%% of the rows from %s\n", 100.0 * c.replay.ratio, names.c_str());
  }
  {
    // What training holds besides activations: every weight, a gradient per trainable weight, and
    // the optimizer's state (AdamW: two float32 moments; SGD: a momentum buffer if momentum > 0).
    double weights = 0, grads = 0, state = 0;
    for (const auto& p : model->parameters()) {
      weights += static_cast<double>(p.numel() * p.element_size());
      if (!p.requires_grad()) continue;
      grads += static_cast<double>(p.numel() * p.element_size());
      const int moments = oo.kind == OptimizerKind::AdamW ? 2 : (oo.momentum > 0 ? 1 : 0);
      state += static_cast<double>(p.numel()) * 4.0 * moments;
    }
    double nf4 = 0;
    int64_t nf4_params = 0;
    for (const auto& item : model->named_modules()) {
      if (auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get()); lin && lin->nf4()) {
        nf4 += static_cast<double>(lin->nf4()->bytes());
        nf4_params += lin->nf4()->numel;
      }
    }
    const double mib = 1024.0 * 1024.0;
    std::string nf4_text;
    if (nf4_params > 0) {
      char buf[128];
      std::snprintf(buf, sizeof buf, " (%.1f MiB of them NF4: %.3f bytes per quantized weight)", nf4 / mib,
                    nf4 / static_cast<double>(nf4_params));
      nf4_text = buf;
    }
    std::fprintf(log, "[train] memory: weights %.1f MiB%s, gradients %.1f MiB, optimizer state %.1f MiB (%s)\n",
                 (weights + nf4) / mib, nf4_text.c_str(), grads / mib, state / mib, c.optimizer.name.c_str());
  }
  std::fprintf(log, "[train] %lld steps of %lld × %lld rows of %lld tokens; %s lr %g, %s schedule, warmup %lld\n",
               static_cast<long long>(c.max_steps), static_cast<long long>(c.data.grad_accum),
               static_cast<long long>(c.data.batch_size), static_cast<long long>(c.data.seq_len),
               c.optimizer.name.c_str(), c.optimizer.lr, c.schedule.name.c_str(),
               static_cast<long long>(c.schedule.warmup_steps));

  reset_peak_rss();
  reset_peak_device(device);
  // What the process holds before the first step (libraries, weights, optimizer state, data
  // buffers): metrics' peak_rss_mib minus this is what training itself added.
  std::fprintf(log, "[train] resident memory at the first step: %.0f MiB\n", proc_status_mib("VmRSS"));
  RunSummary summary;
  summary.resumed_from = resume_dir ? st.step : -1;
  summary.rank = group ? group->rank() : 0;
  summary.world = group ? group->world() : 1;
  summary.final_eval_loss = st.last_eval;
  StepCounters counters{st.step, st.skipped};
  int64_t last_saved = resume_dir ? st.step : -1;

  auto save = [&](const char* why) {
    if (last_saved == counters.step) return;  // the newest checkpoint already holds this state
    st.step = counters.step;
    st.skipped = counters.skipped;
    st.batcher = batcher.state();
    st.metrics_bytes = metrics.bytes();
    last_saved = counters.step;
    // The replicas are identical, so rank 0 writes for all; only the ranks' dropout generators
    // differ, and travel to rank 0 first.
    std::vector<at::Tensor> other_ranks;
    if (group && group->world() > 1) {
      other_ranks = group->all_gather(own_rng_state(device));
      other_ranks.erase(other_ranks.begin());
    }
    if (!rank0) return;
    const std::string dir = checkpoints.save(counters.step, [&](const std::string& tmp) {
      write_training_state(tmp, model, *mode, *optimizer, st, identity, other_ranks);
    });
    std::set<int64_t> keep;
    if (st.best_step >= 0) keep.insert(st.best_step);
    checkpoints.prune(c.checkpoint.keep_last, keep);
    summary.last_checkpoint = dir;
    std::fprintf(log, "\n[checkpoint] step %lld saved (%s): %s\n", static_cast<long long>(counters.step), why,
                 dir.c_str());
    callbacks.on_checkpoint(counters.step, dir);
  };

  // Evaluates every set; returns whether the first set improved, and the strongest callback request.
  bool stop_early = false;
  auto run_evals = [&](int64_t step, Action& action) {
    bool improved = false;
    for (size_t k = 0; k < stores.eval.size(); ++k) {
      const EvalSet& set = stores.eval[k];
      const auto eval_start = Clock::now();
      const EvalResult e = evaluate(model, c, set, device, group.get());
      const double eval_seconds = std::chrono::duration<double>(Clock::now() - eval_start).count();
      EvalInfo info{step, set.name, e.loss, std::exp(e.loss), e.targets, false};
      if (k == 0) {
        if (e.loss < st.best_loss - c.eval.min_delta) {
          st.best_loss = e.loss;
          st.best_step = step;
          st.evals_since_best = 0;
          improved = info.best = true;
        } else if (++st.evals_since_best >= c.eval.patience && c.eval.patience > 0) {
          stop_early = true;
        }
      }
      metrics.write({{"type", "eval"}, {"step", step}, {"set", set.name}, {"loss", e.loss},
                     {"perplexity", info.perplexity}, {"targets", e.targets}, {"best", info.best},
                     {"eval_time_s", eval_seconds}});
      event("eval/" + set.name + "/loss", e.loss, step);
      event("eval/" + set.name + "/perplexity", info.perplexity, step);
      std::fprintf(log, "\n[eval] step %lld, %s: loss %.4f, perplexity %.2f (%lld targets)%s\n",
                   static_cast<long long>(step), set.name.c_str(), e.loss, info.perplexity,
                   static_cast<long long>(e.targets), info.best ? ", best so far" : "");
      st.last_eval[set.name] = e.loss;
      const Action a = callbacks.on_eval(info);
      if (a == Action::Stop || (a == Action::Checkpoint && action != Action::Stop)) action = a;
    }
    if (stop_early) {
      std::fprintf(log, "[eval] no improvement of %s by more than %g in %lld evaluations: stopping early (best %.4f at "
                        "step %lld)\n", stores.eval.front().name.c_str(), c.eval.min_delta,
                   static_cast<long long>(c.eval.patience), st.best_loss, static_cast<long long>(st.best_step));
    }
    summary.final_eval_loss = st.last_eval;
    return improved;
  };

  // --- the loop ----------------------------------------------------------------------------------
  callbacks.on_start(c, counters.step);
  SignalScope signals(ro.handle_signals);
  util::AutocastScope autocast(bf16, device.type());
  Progress progress("train", static_cast<double>(c.max_steps), "steps", log);
  progress.set_start(static_cast<double>(counters.step));
  progress.update(static_cast<double>(counters.step));
  int64_t tokens_here = 0;
  double train_seconds = 0.0;
  // Every rank must take the same decisions: callback requests and signals are combined over the
  // ranks (any rank's Stop stops all, any rank's signal stops all). Without a group, as they are.
  auto agree = [&](Action a, int& signal, bool& any_evaluate) {
    if (!group) {
      any_evaluate = any_evaluate || a == Action::Evaluate;
      return a;
    }
    const std::vector<double> m = group->max({a == Action::Evaluate ? 1.0 : 0.0, a == Action::Checkpoint ? 1.0 : 0.0,
                                              a == Action::Stop ? 1.0 : 0.0, static_cast<double>(signal)});
    any_evaluate = any_evaluate || m[0] > 0;
    signal = static_cast<int>(m[3]);
    return m[2] > 0 ? Action::Stop : m[1] > 0 ? Action::Checkpoint : m[0] > 0 ? Action::Evaluate : Action::Continue;
  };
  AccumulateHooks hooks;
  hooks.before_forward = ro.before_forward;
  hooks.router_aux_loss_coef = router_aux_loss_coef;
  if (group) {
    hooks.total_targets = [&](int64_t n) { return static_cast<int64_t>(group->sum({static_cast<double>(n)})[0]); };
    hooks.before_backward = [&](bool last) { reducer->begin_pass(last); };
  }
  StopReason stop = StopReason::MaxSteps;
  if (c.eval.at_start && counters.step == 0 && !stores.eval.empty()) {
    Action ignored = Action::Continue;
    run_evals(0, ignored);
  }
  while (counters.step < c.max_steps) {
    const auto step_start = Clock::now();
    std::vector<data::Batch> batches;
    std::vector<BatchTensors> micro_batches;
    for (int64_t i = 0; i < c.data.grad_accum; ++i) {
      std::optional<data::Batch> batch = batcher.next();
      FT_CHECK(batch.has_value(), "[train] the batcher ended early");  // endless stream: cannot happen
      micro_batches.push_back(to_tensors(*batch, device));
      batches.push_back(std::move(*batch));
    }
    // Only for the lines that carry it (a data-parallel run gathers the ranks' ids for it); every
    // rank writes the same lines, so every rank takes part.
    auto hash = [&] { return data_hash(batches, group.get()); };
    const double lr = c.optimizer.lr * lr_factor(schedule, counters.step);
    AccumulateResult r;
    for (;;) {
      std::vector<BatchTensors> passes;
      for (const BatchTensors& b : micro_batches) {
        for (auto& piece : split_rows(b, st.micro_batch_rows > 0 ? st.micro_batch_rows : c.data.batch_size)) {
          passes.push_back(std::move(piece));
        }
      }
      try {
        r = graphs ? graphs->accumulate(passes) : accumulate_gradients(model, passes, hooks);
        if (reducer) {
          reducer->finish();
          const std::vector<double> sums = group->sum(
              {r.loss, static_cast<double>(r.n_tokens), std::isnan(r.router_aux_loss) ? 0.0 : r.router_aux_loss});
          r.loss = sums[0];
          r.n_tokens = static_cast<int64_t>(sums[1]);
          if (router_aux_loss_coef > 0) r.router_aux_loss = sums[2];
        }
        break;
      } catch (const c10::OutOfMemoryError& e) {
        // A partial accumulation must not leak into the retry (in place under CUDA graphs, whose
        // replays add into these very tensors).
        optimizer->zero_grad(/*set_to_none=*/!step_options.zero_in_place);
        const int64_t rows = st.micro_batch_rows > 0 ? st.micro_batch_rows : c.data.batch_size;
        std::string what = e.what();
        what = what.substr(0, what.find('\n'));
        // The ranks would disagree on the retry (some of them may be inside an all-reduce already).
        FT_CHECK(!group, "[train] step ", counters.step + 1, ": rank ", group->rank(), " ran out of memory on ",
                 device.str(), " in a forward/backward pass of ", rows, " × ", c.data.seq_len, " tokens (", what,
                 "). Data-parallel runs cannot halve the micro-batch on the fly: lower data.batch_size (and raise "
                 "data.grad_accum to keep the batch), set activation_checkpointing: true, or shorten data.seq_len");
        FT_CHECK(c.on_oom == "halve" && rows > 1, "[train] step ", counters.step + 1, ": out of memory on ", device.str(),
                 " in a forward/backward pass of ", rows, " × ", c.data.seq_len, " tokens (", what,
                 "). Lower data.batch_size (and raise data.grad_accum to keep the batch), set activation_checkpointing: "
                 "true, shorten data.seq_len", rows > 1 ? ", or set on_oom: halve" : "");
        st.micro_batch_rows = rows / 2;
        if (graphs) graphs->reset();  // the old shape's graphs and their memory
        metrics.write({{"type", "oom"}, {"step", counters.step}, {"rows", st.micro_batch_rows}});
        std::fprintf(log, "\n[train] step %lld: out of memory with %lld rows per forward pass; retrying with %lld "
                          "(the global batch stays %lld × %lld rows)\n",
                     static_cast<long long>(counters.step + 1), static_cast<long long>(rows),
                     static_cast<long long>(st.micro_batch_rows), static_cast<long long>(c.data.grad_accum),
                     static_cast<long long>(c.data.batch_size));
      }
    }
    // EWC: once per optimizer step, after the data gradients and before clipping.
    double ewc_penalty = 0.0;
    if (ewc && r.n_targets > 0) ewc_penalty = ewc->apply(/*add_gradients=*/true);
    const int64_t step_index = counters.step;
    const StepOutcome out = optimizer_step(*optimizer, r.n_targets > 0 ? r.loss : NAN, lr, step_options, counters);
    const double seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    train_seconds += seconds;
    tokens_here += r.n_tokens;
    st.tokens_total += r.n_tokens;
    const double tokens_per_s = static_cast<double>(tokens_here) / std::max(train_seconds, 1e-9);
    StepInfo info{counters.step, out.applied, r.loss, lr, out.grad_norm, r.n_targets, r.n_tokens, tokens_per_s, seconds};
    Action action = Action::Continue;
    bool due_eval = false, due_save = false, improved = false;
    if (!out.applied) {
      metrics.write({{"type", "skip"}, {"step", step_index}, {"loss", number(r.loss)},
                     {"grad_norm", number(out.grad_norm)}, {"targets", r.n_targets}, {"skipped", counters.skipped},
                     {"data", hash()}});
      std::fprintf(log, "\n[train] step %lld skipped: %s (%lld skipped so far)\n", static_cast<long long>(step_index),
                   r.n_targets == 0 ? "no target token" : std::isfinite(r.loss) ? "non-finite gradient" : "non-finite loss",
                   static_cast<long long>(counters.skipped));
      FT_CHECK(++st.consecutive_skips < 20, "[train] 20 consecutive steps were non-finite at step ", step_index,
               "; stopping (lower the learning rate or check the data)");
      action = callbacks.on_step(info);
    } else {
      st.consecutive_skips = 0;
      if (counters.step == 1) st.first_loss = r.loss;
      st.last_loss = r.loss;
      if (counters.step % c.log_every == 0 || counters.step == c.max_steps) {
        nlohmann::json line = {{"type", "train"}, {"step", counters.step}, {"loss", r.loss}, {"lr", lr},
                               {"grad_norm", out.grad_norm}, {"targets", r.n_targets}, {"tokens", r.n_tokens},
                               {"tokens_per_s", tokens_per_s}, {"step_time_s", seconds}, {"skipped", counters.skipped},
                               {"data", hash()}, {"peak_rss_mib", std::round(peak_rss_mib())}};
        if (device.is_cuda()) line["peak_device_mib"] = std::round(peak_device_mib(device));
        if (ewc) line["ewc_penalty"] = ewc_penalty;
        if (router_aux_loss_coef > 0) line["router_aux_loss"] = number(r.router_aux_loss);
        metrics.write(line);
        if (ewc) event("train/ewc_penalty", ewc_penalty, counters.step);
        if (router_aux_loss_coef > 0) event("train/router_aux_loss", r.router_aux_loss, counters.step);
        event("train/loss", r.loss, counters.step);
        event("train/lr", lr, counters.step);
        event("train/grad_norm", out.grad_norm, counters.step);
        event("train/tokens_per_s", tokens_per_s, counters.step);
      }
      char extra[128];
      std::snprintf(extra, sizeof extra, "loss %.4f, lr %.2e, %.0f tok/s", r.loss, lr, tokens_per_s);
      progress.update(static_cast<double>(counters.step), extra);
      action = callbacks.on_step(info);
      int no_signal = 0;
      bool asked_eval = false;
      action = agree(action, no_signal, asked_eval);
      due_eval = !stores.eval.empty() && ((c.eval.every > 0 && counters.step % c.eval.every == 0) ||
                                          counters.step == c.max_steps || asked_eval);
      if (due_eval) improved = run_evals(counters.step, action);
      due_save = c.checkpoint.every > 0 &&
                 (counters.step % c.checkpoint.every == 0 || counters.step == c.max_steps || improved);
    }
    int sig = signals.pending();
    bool ignored_eval = false;
    action = agree(action, sig, ignored_eval);
    if (stop_early) stop = StopReason::EarlyStopping;
    if (action == Action::Stop) stop = StopReason::Callback;
    if (sig) {
      stop = StopReason::Signal;
      summary.signal = sig;
      std::fprintf(log, "\n[train] %s: saving a checkpoint at step %lld and stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
                   static_cast<long long>(counters.step));
    }
    if (due_save || action == Action::Checkpoint ||
        (stop != StopReason::MaxSteps && (c.checkpoint.every > 0 || stop == StopReason::Signal))) {
      save(stop == StopReason::Signal ? "signal" : action == Action::Checkpoint ? "callback" : improved ? "best" : "scheduled");
    }
    if (stop != StopReason::MaxSteps) break;
  }
  progress.finish();

  // --- wrap up -----------------------------------------------------------------------------------
  summary.steps = counters.step;
  summary.skipped = counters.skipped;
  summary.first_loss = st.first_loss;
  summary.last_loss = st.last_loss;
  summary.best_step = st.best_step;
  summary.best_loss = st.best_step >= 0 ? st.best_loss : 0.0;
  summary.stop = stop;
  if (stop != StopReason::Signal) {
    summary.final_dir = (out_dir / "final").string();
    if (rank0) mode->export_final(model, summary.final_dir, c);
  }
  summary.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const adapt::TrainableCounts counts = adapt::count_trainable(model);
  summary.trainable_params = counts.trainable;
  summary.frozen_params = counts.frozen;
  summary.peak_memory_mib = device.is_cuda() ? peak_device_mib(device) : peak_rss_mib();
  summary.tokens_per_s = static_cast<double>(tokens_here) / std::max(train_seconds, 1e-9);
  if (reducer) {
    std::fprintf(log, "[dist] last step: %zu of %zu gradient buckets started inside the backward pass\n",
                 reducer->launched_in_backward(), reducer->buckets());
  }
  if (graphs)
    std::fprintf(log, "[train] CUDA graphs: %zu captured (one per micro-batch shape, padding case and document-count bucket)\n",
                 graphs->captured());
  if (stop == StopReason::Signal) {
    std::fprintf(log, "[train] stopped by a signal at step %lld of %lld; checkpoint %s; run the same command to resume\n",
                 static_cast<long long>(summary.steps), static_cast<long long>(c.max_steps),
                 summary.last_checkpoint.c_str());
  } else {
    std::fprintf(log, "[train] done (%s): %lld steps (%lld skipped), loss %.4f → %.4f, %.0f tokens/s, %s; saved %s\n",
                 stop_reason_name(stop), static_cast<long long>(summary.steps), static_cast<long long>(summary.skipped),
                 summary.first_loss, summary.last_loss, summary.tokens_per_s,
                 Progress::format_duration(summary.seconds).c_str(), summary.final_dir.c_str());
  }
  callbacks.on_end(summary);
  return summary;
}

}  // namespace ft::train
