#include "ft/adapt/mode.h"

#include <map>
#include <optional>
#include <mutex>
#include <set>

#include "ft/adapt/lora.h"
#include "ft/adapt/prefix.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/util/error.h"
#include "ft/util/progress.h"

namespace ft::adapt {

namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::map<std::string, ModeFactory>& registry();

// mode: full. Every parameter trains.
class FullMode final : public Mode {
 public:
  std::string name() const override { return "full"; }
  void apply(model::CausalLM& model) override {
    for (auto& p : model->parameters()) p.set_requires_grad(true);
  }
};

// mode: freeze. Every parameter trains except the ones config.freeze selects.
class FreezeMode final : public Mode {
 public:
  explicit FreezeMode(config::FreezeSection f) : freeze_(std::move(f)) {}
  std::string name() const override { return "freeze"; }
  void apply(model::CausalLM& model) override {
    const std::vector<std::string> frozen = frozen_parameter_names(model, freeze_);
    const std::set<std::string> set(frozen.begin(), frozen.end());
    for (auto& item : model->named_parameters()) item.value().set_requires_grad(set.count(item.key()) == 0);
    FT_CHECK(count_trainable(model).trainable > 0, "[mode] freeze: every parameter of the model is frozen; nothing would train");
  }

 private:
  config::FreezeSection freeze_;
};

// mode: lora. The base is frozen; LoRA adapters on the targeted layers train (adapt/lora.h).
class LoraMode final : public Mode {
 public:
  LoraMode(const config::LoraSection& l, std::optional<config::QloraSection> qlora) : qlora_(qlora) {
    options_.r = l.r;
    options_.alpha = l.alpha;
    options_.dropout = l.dropout;
    options_.targets = l.targets;
    options_.rslora = l.rslora;
    options_.dora = l.dora;
    options_.bias = l.bias;
    options_.init = l.init;
    options_.seed = l.seed;
    options_.rank_pattern = l.rank_pattern;
    options_.alpha_pattern = l.alpha_pattern;
    options_.modules_to_save = l.modules_to_save;
    options_.exclude_modules = l.exclude_modules;
    options_.layers_to_transform = l.layers_to_transform;
    options_.layers_pattern = l.layers_pattern;
    init_from_ = l.init_from;
    fused_ = l.fused;
    extended_gemm_ = l.extended_gemm;
    row_kernels_ = l.row_kernels;
    grad_splits_ = l.grad_splits;
    group_projections_ = l.group_projections;
  }
  std::string name() const override { return qlora_ ? "qlora" : "lora"; }
  void apply(model::CausalLM& model) override {
    if (qlora_) {
      // QLoRA: every linear layer but the output head (and a mixture of experts' routers, whose
      // few weights decide where each token goes) is stored in NF4 before the adapters go on.
      for (const auto& item : model->named_modules()) {
        auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
        if (lin != nullptr && item.key() != "lm_head" && !adapt::is_router(item.key())) {
          lin->quantize_nf4(qlora_->block, qlora_->double_quant);
        }
      }
    }
    if (init_from_.empty()) {
      apply_lora(model, options_);
    } else {
      const double dropout = options_.dropout;
      options_ = load_peft_adapter(model, init_from_);  // the adapter's own r, alpha, targets, patterns
      options_.dropout = dropout;
      // load_peft_adapter applies PEFT's dropout from the file; the run's setting is the YAML's.
      set_lora_dropout(model, dropout);
    }
    set_lora_fused(model, fused_);
    set_lora_extended_gemm(model, extended_gemm_);
    set_lora_row_kernels(model, row_kernels_);
    set_lora_grad_splits(model, grad_splits_);
    set_lora_group_projections(model, group_projections_);
  }
  std::string describe(model::CausalLM& model) const override {
    const auto layers = lora_layers(model);
    std::string path = fused_ ? "fused" : "unfused";
    if (extended_gemm_) path += ", extended GEMM";
    if (row_kernels_) path += ", row kernels";
    if (grad_splits_ > 1) path += detail::concat(", adapter gradients in ", grad_splits_, " token chunks");
    // DoRA layers always run one node each (set_lora_group_projections declines them).
    if (group_projections_) {
      path += model->config().packed_projections() ? ", projections packed by the checkpoint (nothing to group)"
              : options_.dora                      ? ", projections ungrouped: DoRA layers run one node each"
                                                   : ", grouped projections";
    }
    std::string full;
    for (const auto& m : options_.modules_to_save) full += (full.empty() ? "" : ", ") + m;
    return Mode::describe(model) + detail::concat("; ", options_.dora ? "DoRA" : "LoRA", " r ", options_.r, " alpha ",
                                                  options_.alpha, " on ", layers.size(), " layers (", path, ")",
                                                  full.empty() ? "" : "; trained in full: " + full);
  }
  void export_final(model::CausalLM& model, const std::string& dir, const config::RunConfig& c) const override {
    save_peft_adapter(model, options_, dir, c.model.checkpoint);
  }
  bool exports_base() const override { return false; }

 private:
  LoraOptions options_;
  std::string init_from_;
  bool fused_ = true, extended_gemm_ = false, row_kernels_ = false, group_projections_ = false;
  int64_t grad_splits_ = 1;
  std::optional<config::QloraSection> qlora_;
};

// mode: prefix. The base is frozen; a learned key/value prefix per layer trains (adapt/prefix.h).
class PrefixMode final : public Mode {
 public:
  explicit PrefixMode(const config::PrefixSection& p) : init_from_(p.init_from) {
    options_.num_virtual_tokens = p.num_virtual_tokens;
    options_.projection = p.projection;
    options_.encoder_hidden_size = p.encoder_hidden_size;
    options_.init = p.init;
    options_.seed = p.seed;
  }
  std::string name() const override { return "prefix"; }
  void apply(model::CausalLM& model) override {
    if (init_from_.empty()) apply_prefix(model, options_);
    else options_ = load_peft_prefix(model, init_from_);
  }
  std::string describe(model::CausalLM& model) const override {
    return Mode::describe(model) + detail::concat("; prefix of ", options_.num_virtual_tokens, " virtual tokens",
                                                  options_.projection ? " through a projection MLP" : "", " on ",
                                                  model->config().num_hidden_layers, " layers");
  }
  void export_final(model::CausalLM& model, const std::string& dir, const config::RunConfig& c) const override {
    save_peft_prefix(model, options_, dir, c.model.checkpoint);
  }
  bool exports_base() const override { return false; }

 private:
  PrefixOptions options_;
  std::string init_from_;
};

std::map<std::string, ModeFactory>& registry() {
  static std::map<std::string, ModeFactory> r = {
      {"full", [](const config::RunConfig&) { return std::make_unique<FullMode>(); }},
      {"freeze", [](const config::RunConfig& c) { return std::make_unique<FreezeMode>(c.freeze); }},
      {"lora", [](const config::RunConfig& c) { return std::make_unique<LoraMode>(c.lora, std::nullopt); }},
      {"qlora", [](const config::RunConfig& c) { return std::make_unique<LoraMode>(c.lora, c.qlora); }},
      {"prefix", [](const config::RunConfig& c) { return std::make_unique<PrefixMode>(c.prefix); }},
  };
  return r;
}

}  // namespace

NamedTensors Mode::state(model::CausalLM& model) const {
  NamedTensors v;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad()) v.emplace_back(item.key(), item.value());
  }
  return v;
}

std::string Mode::describe(model::CausalLM& model) const {
  const TrainableCounts c = count_trainable(model);
  const double total = static_cast<double>(c.trainable + c.frozen);
  return detail::concat("mode ", name(), ": ", Progress::format_count(c.trainable), " trainable parameters in ", c.trainable_tensors,
                        " tensors (", total > 0 ? 100.0 * static_cast<double>(c.trainable) / total : 0.0, "%), ",
                        Progress::format_count(c.frozen), " frozen in ", c.frozen_tensors, " tensors");
}

void Mode::export_final(model::CausalLM& model, const std::string& dir, const config::RunConfig& c) const {
  io::SaveOptions so;
  so.copy_files_from = c.model.checkpoint;  // the base's tokenizer travels with the fine-tuned model
  io::save_pretrained(model, dir, so);
}

int64_t store_frozen_linears(model::CausalLM& model, at::ScalarType dtype) {
  int64_t freed = 0;
  at::NoGradGuard no_grad;
  for (const auto& item : model->named_modules()) {
    auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
    if (lin == nullptr) continue;
    at::Tensor& w = lin->weight;
    if (!w.defined() || w.requires_grad() || w.numel() == 0 || !w.is_floating_point() || w.scalar_type() == dtype ||
        w.layout() != at::kStrided)
      continue;
    const int64_t before = w.numel() * static_cast<int64_t>(w.element_size());
    w.set_data(w.to(dtype));
    freed += before - w.numel() * static_cast<int64_t>(w.element_size());
  }
  return freed;
}

void register_mode(const std::string& name, ModeFactory factory) {
  std::lock_guard lock(registry_mutex());
  registry()[name] = std::move(factory);
}

std::unique_ptr<Mode> make_mode(const config::RunConfig& config) {
  ModeFactory factory;
  {
    std::lock_guard lock(registry_mutex());
    const auto it = registry().find(config.mode);
    if (it != registry().end()) factory = it->second;
  }
  if (!factory) {
    std::string known;
    for (const auto& n : mode_names()) known += (known.empty() ? "" : ", ") + n;
    FT_FAIL("[mode] '", config.mode, "' is not a known adaptation mode (", known, ")");
  }
  return factory(config);
}

std::vector<std::string> mode_names() {
  std::lock_guard lock(registry_mutex());
  std::vector<std::string> v;
  for (const auto& [name, f] : registry()) v.push_back(name);
  return v;
}

TrainableCounts count_trainable(model::CausalLM& model) {
  TrainableCounts c;
  for (const auto& p : model->parameters()) {
    (p.requires_grad() ? c.trainable : c.frozen) += p.numel();
    ++(p.requires_grad() ? c.trainable_tensors : c.frozen_tensors);
  }
  // NF4-stored weights (QLoRA) are frozen parameters too, though not torch parameters any more.
  for (const auto& item : model->named_modules()) {
    if (auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get()); lin && lin->nf4()) c.frozen += lin->nf4()->numel;
  }
  return c;
}

bool glob_match(std::string_view pattern, std::string_view text) {
  size_t p = 0, t = 0, star = std::string_view::npos, mark = 0;
  while (t < text.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == text[t])) {
      ++p, ++t;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++, mark = t;
    } else if (star != std::string_view::npos) {
      p = star + 1, t = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::vector<std::string> frozen_parameter_names(model::CausalLM& model, const config::FreezeSection& f) {
  const int64_t n_layers = model->config().num_hidden_layers;
  std::vector<bool> frozen_block(static_cast<size_t>(n_layers), false);
  for (const std::string& item : f.layers) {
    const auto range = config::parse_layer_range(item);
    FT_CHECK(range.has_value(), "[mode] freeze.layers: '", item, "' is not a block index or range");
    int64_t a = range->first < 0 ? range->first + n_layers : range->first;
    int64_t b = range->second < 0 ? range->second + n_layers : range->second;
    FT_CHECK(a >= 0 && b < n_layers && a <= b, "[mode] freeze.layers: '", item, "' is outside the model's blocks 0..",
             n_layers - 1, " (or an empty range)");
    for (int64_t i = a; i <= b; ++i) frozen_block[static_cast<size_t>(i)] = true;
  }
  if (f.train_last > 0) {
    FT_CHECK(f.train_last <= n_layers, "[mode] freeze.train_last: ", f.train_last, " blocks, but the model has ", n_layers);
    for (int64_t i = 0; i < n_layers - f.train_last; ++i) frozen_block[static_cast<size_t>(i)] = true;
  }
  const bool tied = model->config().tie_word_embeddings;
  FT_CHECK(!tied || f.embeddings == f.lm_head, "[mode] freeze: the model ties lm_head to embed_tokens (one tensor), so "
           "freeze.embeddings and freeze.lm_head must agree (got ", f.embeddings, " and ", f.lm_head, ")");

  std::vector<bool> pattern_used(f.patterns.size(), false);
  std::vector<std::string> names;
  const std::string block_prefix = "model.layers.";
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    bool frozen = false;
    if (name.rfind(block_prefix, 0) == 0) {
      const int64_t index = std::stoll(name.substr(block_prefix.size()));
      frozen = frozen_block[static_cast<size_t>(index)];
    } else if (name.rfind("model.embed_tokens.", 0) == 0) {
      frozen = f.embeddings;
    } else if (name.rfind("lm_head.", 0) == 0) {
      frozen = f.lm_head;
    } else if (name.rfind("model.norm.", 0) == 0) {
      frozen = f.norm;
    }
    for (size_t k = 0; k < f.patterns.size(); ++k) {
      if (glob_match(f.patterns[k], name)) frozen = true, pattern_used[k] = true;
    }
    if (frozen) names.push_back(name);
  }
  for (size_t k = 0; k < f.patterns.size(); ++k) {
    FT_CHECK(pattern_used[k], "[mode] freeze.patterns: '", f.patterns[k], "' matches no parameter (names look like "
             "model.layers.0.self_attn.q_proj.weight)");
  }
  return names;
}

}  // namespace ft::adapt
