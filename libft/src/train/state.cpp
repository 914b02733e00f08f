#include "ft/train/state.h"

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/util/error.h"
#include "ft/util/rng.h"
#include "ft/util/json.h"

namespace fs = std::filesystem;

namespace ft::train {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kRngFile = "rng.safetensors";
constexpr const char* kStateFile = "trainer_state.json";

// JSON cannot hold ±inf (the best loss before any evaluation): null stands for it.
nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }
double from_finite_or_null(const nlohmann::json& j) {
  return j.is_null() ? std::numeric_limits<double>::infinity() : j.get<double>();
}

void write_tensors(const std::string& path, const adapt::NamedTensors& tensors) {
  std::vector<at::Tensor> keep;  // contiguous CPU copies live until the write is done
  std::vector<io::TensorWrite> writes;
  keep.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    keep.push_back(t.detach().to(at::kCPU).contiguous());
    writes.push_back(io::tensor_write(name, keep.back()));
  }
  io::write_safetensors(path, writes);
}

/// Parameter name of every optimizer parameter, through the model's names.
std::map<const void*, std::string> names_by_impl(model::CausalLM& model) {
  std::map<const void*, std::string> m;
  for (const auto& item : model->named_parameters()) m[item.value().unsafeGetTensorImpl()] = item.key();
  return m;
}

std::vector<std::pair<std::string, at::Tensor>> optimizer_params(model::CausalLM& model,
                                                                 const torch::optim::Optimizer& optimizer) {
  const auto names = names_by_impl(model);
  std::vector<std::pair<std::string, at::Tensor>> v;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      const auto it = names.find(p.unsafeGetTensorImpl());
      FT_CHECK(it != names.end(), "[checkpoint] the optimizer holds a parameter that is not the model's");
      v.emplace_back(it->second, p);
    }
  }
  return v;
}

void copy_into(const at::Tensor& dst, const at::Tensor& src, const std::string& file, const std::string& name) {
  FT_CHECK(dst.sizes() == src.sizes(), "[checkpoint] ", file, ": tensor '", name, "' has shape ", src.sizes(),
           ", the run expects ", dst.sizes());
  FT_CHECK(dst.scalar_type() == src.scalar_type(), "[checkpoint] ", file, ": tensor '", name, "' is ",
           src.scalar_type(), ", the run expects ", dst.scalar_type());
  c10::NoGradGuard no_grad;
  dst.copy_(src);
}

}  // namespace

std::string run_identity(const config::RunConfig& c) {
  nlohmann::json freeze = nullptr;
  if (c.mode == "freeze") {
    freeze = {{"layers", c.freeze.layers}, {"train_last", c.freeze.train_last}, {"patterns", c.freeze.patterns},
              {"embeddings", c.freeze.embeddings}, {"lm_head", c.freeze.lm_head}, {"norm", c.freeze.norm}};
  }
  nlohmann::json j = {
      {"model", {{"checkpoint", c.model.checkpoint}, {"config", c.model.config}, {"init_seed", c.model.init_seed}}},
      {"tokenizer", c.tokenizer},
      {"data", {{"train", c.data.train}, {"seq_len", c.data.seq_len}, {"batch_size", c.data.batch_size},
                {"grad_accum", c.data.grad_accum}, {"shuffle", c.data.shuffle}, {"seed", c.data.seed}}},
      {"mode", c.mode},
      {"freeze", freeze},
      {"qlora", c.mode == "qlora" ? nlohmann::json{{"block", c.qlora.block}, {"double_quant", c.qlora.double_quant}}
                                  : nlohmann::json(nullptr)},
      {"lora", c.mode == "lora" || c.mode == "qlora" ? nlohmann::json{{"r", c.lora.r}, {"alpha", c.lora.alpha}, {"targets", c.lora.targets},
                                                 {"rslora", c.lora.rslora}, {"dora", c.lora.dora}, {"bias", c.lora.bias},
                                                 {"rank_pattern", c.lora.rank_pattern},
                                                 {"init_from", c.lora.init_from}}
                                : nlohmann::json(nullptr)},
      {"optimizer", c.optimizer.name},
  };
  // Only present for prefix runs, so the identities of other runs stay as earlier versions wrote them.
  if (c.mode == "prefix") {
    j["prefix"] = {{"num_virtual_tokens", c.prefix.num_virtual_tokens}, {"projection", c.prefix.projection},
                   {"encoder_hidden_size", c.prefix.encoder_hidden_size}, {"init_from", c.prefix.init_from}};
  }
  if (c.model.router_aux_loss_coef) j["model"]["router_aux_loss_coef"] = *c.model.router_aux_loss_coef;
  // Likewise only when used: the regularisers change what a resumed run must compute.
  if ((c.mode == "lora" || c.mode == "qlora") && !c.lora.modules_to_save.empty())
    j["lora"]["modules_to_save"] = c.lora.modules_to_save;
  if ((c.mode == "lora" || c.mode == "qlora") && !c.lora.exclude_modules.empty())
    j["lora"]["exclude_modules"] = c.lora.exclude_modules;
  if ((c.mode == "lora" || c.mode == "qlora") && !c.lora.layers_to_transform.empty())
    j["lora"]["layers"] = {{"to_transform", c.lora.layers_to_transform}, {"pattern", c.lora.layers_pattern}};
  if (!c.ewc.state.empty()) j["ewc"] = {{"state", c.ewc.state}, {"lambda", c.ewc.lambda}};
  if (!c.replay.stores.empty()) j["replay"] = {{"stores", c.replay.stores}, {"ratio", c.replay.ratio}};
  return j.dump();
}

at::Tensor own_rng_state(c10::Device device) { return util::generator_states(device); }

void write_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                          const torch::optim::Optimizer& optimizer, const TrainerState& s, const std::string& identity,
                          const std::vector<at::Tensor>& other_ranks) {
  write_tensors((fs::path(dir) / kModelFile).string(), mode.state(model));

  adapt::NamedTensors opt_tensors;
  nlohmann::json adam_steps = nlohmann::json::object();
  for (const auto& [name, p] : optimizer_params(model, optimizer)) {
    const auto it = optimizer.state().find(p.unsafeGetTensorImpl());
    if (it == optimizer.state().end()) continue;  // no step yet
    if (const auto* a = dynamic_cast<const torch::optim::AdamWParamState*>(it->second.get())) {
      opt_tensors.emplace_back(name + ".exp_avg", a->exp_avg());
      opt_tensors.emplace_back(name + ".exp_avg_sq", a->exp_avg_sq());
      adam_steps[name] = a->step();
    } else if (const auto* m = dynamic_cast<const torch::optim::SGDParamState*>(it->second.get())) {
      if (m->momentum_buffer().defined()) opt_tensors.emplace_back(name + ".momentum_buffer", m->momentum_buffer());
    } else {
      FT_FAIL("[checkpoint] optimizer state of '", name, "' is of an unsupported kind");
    }
  }
  write_tensors((fs::path(dir) / kOptimizerFile).string(), opt_tensors);

  adapt::NamedTensors rng;
  {
    auto cpu = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(cpu.mutex());
    rng.emplace_back("cpu", cpu.get_state());
  }
  if (at::hasCUDA()) {
    for (c10::DeviceIndex i = 0; i < static_cast<c10::DeviceIndex>(at::getNumGPUs()); ++i) {
      auto g = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i));
      std::lock_guard<std::mutex> lock(g.mutex());
      rng.emplace_back("cuda:" + std::to_string(i), g.get_state());
    }
  }
  for (size_t k = 0; k < other_ranks.size(); ++k) rng.emplace_back("rank" + std::to_string(k + 1), other_ranks[k]);
  write_tensors((fs::path(dir) / kRngFile).string(), rng);

  nlohmann::json last_eval = nlohmann::json::object();
  for (const auto& [k, v] : s.last_eval) last_eval[k] = v;
  const nlohmann::json j = {
      {"identity", nlohmann::json::parse(identity)},
      {"step", s.step},
      {"skipped", s.skipped},
      {"consecutive_skips", s.consecutive_skips},
      {"batcher", nlohmann::json::parse(s.batcher.to_json())},
      {"metrics_bytes", s.metrics_bytes},
      {"tokens_total", s.tokens_total},
      {"first_loss", s.first_loss},
      {"last_loss", s.last_loss},
      {"best_step", s.best_step},
      {"best_loss", finite_or_null(s.best_loss)},
      {"evals_since_best", s.evals_since_best},
      {"micro_batch_rows", s.micro_batch_rows},
      {"last_eval", last_eval},
      {"adamw_steps", adam_steps},
  };
  const std::string text = j.dump(2) + "\n";
  io::write_file_atomic((fs::path(dir) / kStateFile).string(),
                        std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

TrainerState read_training_state(const std::string& dir, model::CausalLM& model, const adapt::Mode& mode,
                                 torch::optim::Optimizer& optimizer, const std::string& identity, int rank,
                                 c10::Device device) {
  const std::string state_path = (fs::path(dir) / kStateFile).string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(state_path));
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[checkpoint] ", state_path, ": not valid JSON: ", e.what());
  }
  TrainerState s;
  nlohmann::json adam_steps;
  try {
    const nlohmann::json want = nlohmann::json::parse(identity);
    const nlohmann::json& have = j.at("identity");
    for (const auto& [key, value] : want.items()) {
      if (key == "world") continue;  // below, with its own message
      FT_CHECK(have.contains(key) && have.at(key) == value, "[checkpoint] ", dir,
               " was written by a run with another '", key, "' (", have.contains(key) ? have.at(key).dump() : "none",
               ", this run: ", value.dump(), "): to resume that run, rerun it with the config it was started ",
               "with; to start this one, give it another output_dir");
    }
    // Data-parallel runs add "world" when it is above 1; the global batch depends on it both ways.
    const int64_t have_world = have.value("world", int64_t{1}), want_world = want.value("world", int64_t{1});
    FT_CHECK(have_world == want_world, "[checkpoint] ", dir, " was written by a run on ", have_world,
             " rank(s) and this run has ", want_world, ": resume with the same number of ranks (the global batch is ",
             "data.batch_size × data.grad_accum × ranks), or use another output_dir");
    s.step = j.at("step");
    s.skipped = j.at("skipped");
    s.consecutive_skips = j.at("consecutive_skips");
    s.batcher = data::BatcherState::from_json(j.at("batcher").dump());
    s.metrics_bytes = j.at("metrics_bytes");
    s.tokens_total = j.at("tokens_total");
    s.first_loss = j.at("first_loss");
    s.last_loss = j.at("last_loss");
    s.best_step = j.at("best_step");
    s.best_loss = from_finite_or_null(j.at("best_loss"));
    s.evals_since_best = j.at("evals_since_best");
    s.micro_batch_rows = j.at("micro_batch_rows");
    for (const auto& [k, v] : j.at("last_eval").items()) s.last_eval[k] = v.get<double>();
    adam_steps = j.at("adamw_steps");
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[checkpoint] ", state_path, ": malformed trainer state: ", e.what());
  }

  // Weights: exactly the mode's tensors, no more, no fewer.
  {
    const std::string path = (fs::path(dir) / kModelFile).string();
    auto file = io::SafetensorsFile::open(path);
    std::set<std::string> expected;
    for (const auto& [name, t] : mode.state(model)) {
      expected.insert(name);
      const io::TensorInfo* info = file->find(name);
      FT_CHECK(info != nullptr, "[checkpoint] ", path, ": tensor '", name, "' is missing (mode ", mode.name(), ")");
      copy_into(t, io::read_tensor(*file, *info).to(t.device()), path, name);
    }
    for (const auto& info : file->tensors()) {
      FT_CHECK(expected.count(info.name), "[checkpoint] ", path, ": tensor '", info.name,
               "' is not trained by this run (mode ", mode.name(), "): the checkpoint belongs to another setup");
    }
  }

  // Optimizer moments.
  {
    const std::string path = (fs::path(dir) / kOptimizerFile).string();
    auto file = io::SafetensorsFile::open(path);
    std::set<std::string> used;
    auto tensor = [&](const std::string& name, const at::Tensor& like) -> at::Tensor {
      const io::TensorInfo* info = file->find(name);
      if (info == nullptr) return {};
      used.insert(name);
      at::Tensor t = io::read_tensor(*file, *info).to(like.device());
      FT_CHECK(t.sizes() == like.sizes(), "[checkpoint] ", path, ": tensor '", name, "' has shape ", t.sizes(),
               ", the parameter has ", like.sizes());
      return t;
    };
    optimizer.state().clear();
    const bool adamw = dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr;
    for (const auto& [name, p] : optimizer_params(model, optimizer)) {
      if (adamw) {
        at::Tensor m = tensor(name + ".exp_avg", p), v = tensor(name + ".exp_avg_sq", p);
        if (!m.defined() && !v.defined()) continue;
        FT_CHECK(m.defined() && v.defined() && adam_steps.contains(name), "[checkpoint] ", path,
                 ": incomplete AdamW state of '", name, "'");
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(adam_steps.at(name).get<int64_t>());
        st->exp_avg(m);
        st->exp_avg_sq(v);
        optimizer.state()[p.unsafeGetTensorImpl()] = std::move(st);
      } else {
        at::Tensor b = tensor(name + ".momentum_buffer", p);
        if (!b.defined()) continue;
        auto st = std::make_unique<torch::optim::SGDParamState>();
        st->momentum_buffer(b);
        optimizer.state()[p.unsafeGetTensorImpl()] = std::move(st);
      }
    }
    for (const auto& info : file->tensors()) {
      FT_CHECK(used.count(info.name), "[checkpoint] ", path, ": tensor '", info.name,
               "' belongs to no parameter this run trains");
    }
  }

  // Random generators.
  {
    const std::string path = (fs::path(dir) / kRngFile).string();
    auto file = io::SafetensorsFile::open(path);
    bool restored = rank == 0;
    for (const auto& info : file->tensors()) {
      if (info.name.rfind("rank", 0) == 0) {  // another data-parallel rank's generators
        if (info.name == "rank" + std::to_string(rank)) {
          util::set_generator_states(io::read_tensor(*file, info), device, path + ": '" + info.name + "'");
          restored = true;
        }
        continue;
      }
      if (rank != 0) continue;
      at::Generator g;
      if (info.name == "cpu") {
        g = at::detail::getDefaultCPUGenerator();
      } else if (info.name.rfind("cuda:", 0) == 0) {
        const int index = std::stoi(info.name.substr(5));
        if (!at::hasCUDA() || index >= static_cast<int>(at::getNumGPUs())) continue;  // resumed elsewhere
        g = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index)));
      } else {
        FT_FAIL("[checkpoint] ", path, ": unknown generator '", info.name, "'");
      }
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(io::read_tensor(*file, info));
    }
    FT_CHECK(restored, "[checkpoint] ", path, ": no generator state for rank ", rank);
  }
  return s;
}

}  // namespace ft::train
