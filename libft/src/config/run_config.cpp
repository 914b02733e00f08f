#include "ft/config/run_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <functional>
#include <optional>
#include <regex>
#include <set>

#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::config {

namespace {

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// Collects every error of a file with its place; the parse goes on after an error so that one run
// of `ft train` reports all of them.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}

  void add_override(const YAML::Node& node, const std::string& text) { overrides_.emplace_back(node, text); }

  std::string where(const YAML::Node& node) const {
    // The latest override of a key wins (an override given twice shares its node with the first).
    for (auto it = overrides_.rbegin(); it != overrides_.rend(); ++it) {
      if (it->first.is(node)) return "override '" + it->second + "'";
    }
    const YAML::Mark m = node.Mark();
    if (m.is_null()) return source_;
    return detail::concat(source_, ":", m.line + 1, ":", m.column + 1);
  }
  void error(const YAML::Node& node, const std::string& message) { errors_.push_back(where(node) + ": " + message); }
  void error_at(const std::string& place, const std::string& message) { errors_.push_back(place + ": " + message); }
  const std::vector<std::string>& errors() const { return errors_; }
  const std::string& source() const { return source_; }

  /// Checks that `map` is a mapping with no duplicate and no unknown key. Returns false if it is not a map.
  bool check_map(const YAML::Node& map, const std::string& path, const std::vector<std::string>& known) {
    if (!map.IsMap()) {
      error(map, (path.empty() ? std::string("a run config") : "'" + path + "'") + " must be a mapping of keys to values");
      return false;
    }
    std::set<std::string> seen;
    for (auto it = map.begin(); it != map.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) {
        error(key, "keys of '" + path + "' must be plain names");
        continue;
      }
      const std::string name = key.Scalar();
      const std::string full = path.empty() ? name : path + "." + name;
      if (!seen.insert(name).second) {
        error(key, "duplicate key '" + full + "' (each key may appear once)");
        continue;
      }
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        std::string message = "unknown key '" + full + "'";
        std::string best;
        size_t best_d = 3;
        for (const auto& k : known) {
          const size_t d = edit_distance(name, k);
          if (d < best_d && d <= std::max<size_t>(1, k.size() / 3)) best = k, best_d = d;
        }
        message += best.empty() ? "; known keys: " + join(known) : "; did you mean '" + best + "'?";
        error(key, message);
      }
    }
    return true;
  }

  template <typename T>
  void get(const YAML::Node& map, const std::string& path, const std::string& key, T& out) {
    const YAML::Node node = map[key];
    if (!node) return;
    const std::string full = path.empty() ? key : path + "." + key;
    if (node.IsNull()) return error(node, "'" + full + "' has no value");
    if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      if (node.IsScalar()) {  // a single path is a list of one
        out = {node.Scalar()};
        return;
      }
      if (!node.IsSequence()) return error(node, "'" + full + "' must be a path or a list of paths");
      std::vector<std::string> v;
      for (const auto& item : node) {
        if (!item.IsScalar()) return error(item, "'" + full + "' must be a list of paths");
        v.push_back(item.Scalar());
      }
      out = v;
    } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
      // An integer or a list of them (PEFT's layers_to_transform takes both).
      std::vector<int64_t> v;
      std::vector<YAML::Node> items;
      if (node.IsSequence()) {
        for (const auto& item : node) items.push_back(item);
      } else {
        items.push_back(node);
      }
      for (const auto& item : items) {
        int64_t x = 0;
        if (!item.IsScalar() || !YAML::convert<int64_t>::decode(item, x)) {
          unreadable_.insert(full);
          return error(item, "'" + full + "' must be an integer or a list of integers");
        }
        v.push_back(x);
      }
      out = v;
    } else {
      if (!node.IsScalar()) return error(node, "'" + full + "' must be " + type_name<T>());
      // yaml-cpp converts through a stream; reject what it would half-read ("12abc", "1.5" as integer).
      try {
        T value = node.as<T>();
        if constexpr (std::is_floating_point_v<T>) {
          if (!std::isfinite(value)) return error(node, "'" + full + "' must be a finite number");
        }
        if constexpr (std::is_unsigned_v<T>) {
          if (!node.Scalar().empty() && node.Scalar()[0] == '-') throw YAML::BadConversion(node.Mark());
        }
        out = value;
      } catch (const YAML::BadConversion&) {
        unreadable_.insert(full);
        error(node, "'" + full + "' must be " + type_name<T>() + ", got '" + node.Scalar() + "'");
      }
    }
  }

  // The range checks below skip a key whose value could not be read: its default would only add a
  // second, false error ("must be > 0, got 0" after "must be an integer, got '20.5'").
  void positive(const YAML::Node& map, const std::string& path, const std::string& key, double value, bool zero_ok) {
    if (value > 0 || (zero_ok && value == 0)) return;
    if (unreadable_.count(path.empty() ? key : path + "." + key)) return;
    const YAML::Node node = map[key];
    const std::string full = path.empty() ? key : path + "." + key;
    const std::string message = detail::concat("'", full, "' must be ", zero_ok ? ">= 0" : "> 0", ", got ", value);
    node ? error(node, message) : error_at(source_, message);
  }

  void one_of(const YAML::Node& map, const std::string& path, const std::string& key, const std::string& value,
              const std::vector<std::string>& allowed) {
    if (std::find(allowed.begin(), allowed.end(), value) != allowed.end()) return;
    if (unreadable_.count(path.empty() ? key : path + "." + key)) return;
    const YAML::Node node = map[key];
    const std::string message = "'" + (path.empty() ? key : path + "." + key) + "' must be one of " + join(allowed) +
                                ", got '" + value + "'";
    node ? error(node, message) : error_at(source_, message);
  }

  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  }

 private:
  template <typename T>
  static std::string type_name() {
    if constexpr (std::is_same_v<T, bool>) return "true or false";
    else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T>) return "a non-negative integer";
    else if constexpr (std::is_integral_v<T>) return "an integer";
    else if constexpr (std::is_floating_point_v<T>) return "a number";
    else return "a string";
  }

  std::string source_;
  std::vector<std::string> errors_;
  std::vector<std::pair<YAML::Node, std::string>> overrides_;
  std::set<std::string> unreadable_;  // keys (section.key) whose value get() could not convert
};

void parse_model(Reader& r, const YAML::Node& n, ModelSection& m) {
  if (!r.check_map(n, "model", {"checkpoint", "config", "init_seed", "router_aux_loss_coef"})) return;
  r.get(n, "model", "checkpoint", m.checkpoint);
  r.get(n, "model", "config", m.config);
  r.get(n, "model", "init_seed", m.init_seed);
  if (n["router_aux_loss_coef"]) {
    double coef = 0;
    r.get(n, "model", "router_aux_loss_coef", coef);
    r.positive(n, "model", "router_aux_loss_coef", coef, true);
    m.router_aux_loss_coef = coef;
  }
  if (m.checkpoint.empty() == m.config.empty()) {
    r.error(n, "'model' needs exactly one of 'checkpoint' (a Hugging Face checkpoint directory) or 'config' (a "
               "config.json for a freshly initialised model)");
  }
  if (!m.checkpoint.empty() && n["init_seed"]) r.error(n["init_seed"], "'model.init_seed' only applies with 'model.config'");
}

void parse_data(Reader& r, const YAML::Node& n, DataSection& d) {
  if (!r.check_map(n, "data", {"train", "seq_len", "batch_size", "grad_accum", "shuffle", "seed"})) return;
  r.get(n, "data", "train", d.train);
  r.get(n, "data", "seq_len", d.seq_len);
  r.get(n, "data", "batch_size", d.batch_size);
  r.get(n, "data", "grad_accum", d.grad_accum);
  r.get(n, "data", "shuffle", d.shuffle);
  r.get(n, "data", "seed", d.seed);
  if (d.train.empty()) r.error(n, "'data.train' needs at least one token store (ft prepare)");
  if (d.seq_len < 2) r.error(n["seq_len"] ? n["seq_len"] : n, detail::concat("'data.seq_len' must be >= 2, got ", d.seq_len));
  r.positive(n, "data", "batch_size", static_cast<double>(d.batch_size), false);
  r.positive(n, "data", "grad_accum", static_cast<double>(d.grad_accum), false);
}

void parse_optimizer(Reader& r, const YAML::Node& n, OptimizerSection& o) {
  if (!r.check_map(n, "optimizer", {"name", "lr", "betas", "weight_decay", "eps", "momentum"})) return;
  r.get(n, "optimizer", "name", o.name);
  r.get(n, "optimizer", "lr", o.lr);
  r.get(n, "optimizer", "weight_decay", o.weight_decay);
  r.get(n, "optimizer", "eps", o.eps);
  r.get(n, "optimizer", "momentum", o.momentum);
  r.one_of(n, "optimizer", "name", o.name, {"adamw", "sgd"});
  r.positive(n, "optimizer", "lr", o.lr, false);
  r.positive(n, "optimizer", "weight_decay", o.weight_decay, true);
  r.positive(n, "optimizer", "eps", o.eps, false);
  r.positive(n, "optimizer", "momentum", o.momentum, true);
  if (const YAML::Node betas = n["betas"]) {
    if (!betas.IsSequence() || betas.size() != 2) {
      r.error(betas, "'optimizer.betas' must be a list of two numbers, e.g. [0.9, 0.999]");
    } else {
      double b[2] = {o.beta1, o.beta2};
      for (int i = 0; i < 2; ++i) {
        try {
          b[i] = betas[i].as<double>();
          if (!(b[i] >= 0 && b[i] < 1)) r.error(betas[i], detail::concat("'optimizer.betas' must be in [0, 1), got ", b[i]));
        } catch (const YAML::BadConversion&) {
          r.error(betas[i], "'optimizer.betas' must be numbers");
        }
      }
      o.beta1 = b[0], o.beta2 = b[1];
    }
    if (o.name == "sgd") r.error(betas, "'optimizer.betas' only applies to adamw");
  }
  if (o.name == "adamw" && n["momentum"]) r.error(n["momentum"], "'optimizer.momentum' only applies to sgd");
}

void parse_schedule(Reader& r, const YAML::Node& n, ScheduleSection& s) {
  if (!r.check_map(n, "schedule", {"name", "warmup_steps", "total_steps"})) return;
  r.get(n, "schedule", "name", s.name);
  r.get(n, "schedule", "warmup_steps", s.warmup_steps);
  r.get(n, "schedule", "total_steps", s.total_steps);
  r.one_of(n, "schedule", "name", s.name, {"constant", "linear", "cosine"});
  r.positive(n, "schedule", "warmup_steps", static_cast<double>(s.warmup_steps), true);
  r.positive(n, "schedule", "total_steps", static_cast<double>(s.total_steps), true);
}

void parse_eval(Reader& r, const YAML::Node& n, EvalSection& e) {
  if (!r.check_map(n, "eval", {"stores", "held_out_docs", "every", "max_batches", "batch_size", "patience", "min_delta",
                                    "at_start"}))
    return;
  r.get(n, "eval", "patience", e.patience);
  r.get(n, "eval", "min_delta", e.min_delta);
  r.get(n, "eval", "at_start", e.at_start);
  r.positive(n, "eval", "patience", static_cast<double>(e.patience), true);
  r.positive(n, "eval", "min_delta", e.min_delta, true);
  r.get(n, "eval", "stores", e.stores);
  r.get(n, "eval", "held_out_docs", e.held_out_docs);
  r.get(n, "eval", "every", e.every);
  r.get(n, "eval", "max_batches", e.max_batches);
  r.get(n, "eval", "batch_size", e.batch_size);
  r.positive(n, "eval", "held_out_docs", static_cast<double>(e.held_out_docs), true);
  r.positive(n, "eval", "every", static_cast<double>(e.every), true);
  r.positive(n, "eval", "max_batches", static_cast<double>(e.max_batches), true);
  r.positive(n, "eval", "batch_size", static_cast<double>(e.batch_size), true);
  if (e.stores.empty() && e.held_out_docs == 0) {
    r.error(n, "'eval' needs 'stores' or 'held_out_docs' (or leave the section out)");
  }
}

void parse_checkpoint(Reader& r, const YAML::Node& n, CheckpointSection& c) {
  if (!r.check_map(n, "checkpoint", {"every", "keep_last", "resume", "strict"})) return;
  r.get(n, "checkpoint", "every", c.every);
  r.get(n, "checkpoint", "keep_last", c.keep_last);
  r.get(n, "checkpoint", "resume", c.resume);
  r.get(n, "checkpoint", "strict", c.strict);
  r.positive(n, "checkpoint", "every", static_cast<double>(c.every), true);
  r.positive(n, "checkpoint", "keep_last", static_cast<double>(c.keep_last), false);
  r.one_of(n, "checkpoint", "resume", c.resume, {"auto", "never", "required"});
}

void parse_freeze(Reader& r, const YAML::Node& n, FreezeSection& f) {
  if (!r.check_map(n, "freeze", {"layers", "train_last", "patterns", "embeddings", "lm_head", "norm"})) return;
  r.get(n, "freeze", "layers", f.layers);
  r.get(n, "freeze", "train_last", f.train_last);
  r.get(n, "freeze", "patterns", f.patterns);
  r.get(n, "freeze", "embeddings", f.embeddings);
  r.get(n, "freeze", "lm_head", f.lm_head);
  r.get(n, "freeze", "norm", f.norm);
  r.positive(n, "freeze", "train_last", static_cast<double>(f.train_last), true);
  if (f.train_last > 0 && !f.layers.empty()) {
    r.error(n["train_last"], "'freeze.train_last' and 'freeze.layers' exclude each other (pick one way to choose blocks)");
  }
  if (const YAML::Node layers = n["layers"]) {
    for (const std::string& item : f.layers) {
      if (!parse_layer_range(item)) {
        r.error(layers, "'freeze.layers' items are block indices or inclusive ranges like 0-5 (negative counts from the "
                        "end: -1 is the last block), got '" + item + "'");
      }
    }
  }
}

void parse_prefix(Reader& r, const YAML::Node& n, PrefixSection& p) {
  if (!r.check_map(n, "prefix", {"num_virtual_tokens", "projection", "encoder_hidden_size", "init", "seed", "init_from"}))
    return;
  r.get(n, "prefix", "init_from", p.init_from);
  if (!p.init_from.empty()) {
    for (const char* key : {"num_virtual_tokens", "projection", "encoder_hidden_size", "init"}) {
      if (n[key]) r.error(n[key], std::string("'prefix.") + key + "' comes from the adapter of 'prefix.init_from'; leave it out");
    }
  }
  r.get(n, "prefix", "num_virtual_tokens", p.num_virtual_tokens);
  r.get(n, "prefix", "projection", p.projection);
  r.get(n, "prefix", "encoder_hidden_size", p.encoder_hidden_size);
  r.get(n, "prefix", "init", p.init);
  r.get(n, "prefix", "seed", p.seed);
  r.positive(n, "prefix", "num_virtual_tokens", static_cast<double>(p.num_virtual_tokens), false);
  r.positive(n, "prefix", "encoder_hidden_size", static_cast<double>(p.encoder_hidden_size), true);
  if (n["encoder_hidden_size"] && !p.projection)
    r.error(n["encoder_hidden_size"], "'prefix.encoder_hidden_size' only applies with 'prefix.projection: true'");
  r.one_of(n, "prefix", "init", p.init, {"normal", "zero"});
}

void parse_lora(Reader& r, const YAML::Node& n, LoraSection& l) {
  if (!r.check_map(n, "lora", {"r", "alpha", "dropout", "targets", "rslora", "dora", "bias", "init", "seed", "rank_pattern",
                               "alpha_pattern", "init_from", "fused", "extended_gemm", "row_kernels", "grad_splits",
                               "group_projections", "modules_to_save", "layers_to_transform", "layers_pattern",
                               "exclude_modules"}))
    return;
  r.get(n, "lora", "fused", l.fused);
  r.get(n, "lora", "extended_gemm", l.extended_gemm);
  r.get(n, "lora", "row_kernels", l.row_kernels);
  r.get(n, "lora", "group_projections", l.group_projections);
  r.get(n, "lora", "grad_splits", l.grad_splits);
  if (l.grad_splits < 1 || l.grad_splits > 64)
    r.error(n["grad_splits"], detail::concat("'lora.grad_splits' must be in [1, 64], got ", l.grad_splits));
  else if (l.grad_splits > 1 && !l.fused)
    r.error(n["grad_splits"], "'lora.grad_splits' is a path of the fused layer; it needs 'lora.fused: true'");
  for (const auto& [key, on] : {std::pair{"extended_gemm", l.extended_gemm}, std::pair{"row_kernels", l.row_kernels},
                                std::pair{"group_projections", l.group_projections}}) {
    if (on && !l.fused) r.error(n[key], std::string("'lora.") + key + "' is a path of the fused layer; it needs 'lora.fused: true'");
  }
  r.get(n, "lora", "init_from", l.init_from);
  if (!l.init_from.empty()) {
    for (const char* key : {"r", "alpha", "targets", "rslora", "dora", "bias", "init", "seed", "rank_pattern", "alpha_pattern",
                            "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules"}) {
      if (n[key]) r.error(n[key], std::string("'lora.") + key + "' comes from the adapter of 'lora.init_from'; leave it out");
    }
  }
  r.get(n, "lora", "r", l.r);
  r.get(n, "lora", "alpha", l.alpha);
  r.get(n, "lora", "dropout", l.dropout);
  r.get(n, "lora", "targets", l.targets);
  r.get(n, "lora", "modules_to_save", l.modules_to_save);
  for (const auto& m : l.modules_to_save) {
    if (m.empty()) r.error(n["modules_to_save"], "'lora.modules_to_save' entries must be module names, not empty");
  }
  r.get(n, "lora", "exclude_modules", l.exclude_modules);
  for (const auto& m : l.exclude_modules) {
    if (m.empty()) r.error(n["exclude_modules"], "'lora.exclude_modules' entries must be module names, not empty");
  }
  r.get(n, "lora", "layers_to_transform", l.layers_to_transform);
  for (const int64_t i : l.layers_to_transform) {
    if (i < 0) r.error(n["layers_to_transform"], detail::concat("'lora.layers_to_transform' holds ", i, "; layers count from 0"));
  }
  r.get(n, "lora", "layers_pattern", l.layers_pattern);
  for (const auto& [key, list] : {std::pair{"modules_to_save", &l.modules_to_save}, std::pair{"layers_pattern", &l.layers_pattern}}) {
    for (const auto& p : *list) {
      try {
        std::regex check(p);
      } catch (const std::regex_error&) {
        r.error(n[key], std::string("'lora.") + key + "' entry '" + p + "' is not a regular expression (PEFT reads it as one)");
      }
    }
  }
  if (!l.layers_pattern.empty() && l.layers_to_transform.empty())
    r.error(n["layers_pattern"], "'lora.layers_pattern' only applies with 'lora.layers_to_transform'");
  r.get(n, "lora", "rslora", l.rslora);
  r.get(n, "lora", "dora", l.dora);
  r.get(n, "lora", "bias", l.bias);
  r.one_of(n, "lora", "bias", l.bias, {"none", "all", "lora_only"});
  r.get(n, "lora", "init", l.init);
  r.get(n, "lora", "seed", l.seed);
  r.positive(n, "lora", "r", static_cast<double>(l.r), false);
  r.positive(n, "lora", "alpha", l.alpha, false);
  if (l.dropout < 0 || l.dropout >= 1) r.error(n["dropout"], detail::concat("'lora.dropout' must be in [0, 1), got ", l.dropout));
  r.one_of(n, "lora", "init", l.init, {"kaiming", "gaussian"});
  if (l.targets.empty()) r.error(n["targets"] ? n["targets"] : n, "'lora.targets' needs at least one module name");
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    const YAML::Node m = n[key];
    if (!m) continue;
    if (!m.IsMap()) {
      r.error(m, std::string("'lora.") + key + "' must map module patterns to values, e.g. {down_proj: 4}");
      continue;
    }
    for (auto it = m.begin(); it != m.end(); ++it) {
      // Each key is a regular expression (PEFT's: matched as (.*\.)?(KEY) against a module's name).
      if (it->first.IsScalar()) {
        try {
          (void)std::regex("(.*\\.)?(" + it->first.Scalar() + ")");
        } catch (const std::regex_error& e) {
          r.error(it->first, std::string("'lora.") + key + "' key '" + it->first.Scalar() +
                                 "' is not a regular expression: " + e.what());
          continue;
        }
      }
      try {
        if (std::string(key) == "rank_pattern") {
          const int64_t v = it->second.as<int64_t>();
          if (v <= 0) r.error(it->second, "'lora.rank_pattern' ranks must be > 0");
          l.rank_pattern.emplace_back(it->first.as<std::string>(), v);
        } else {
          const double v = it->second.as<double>();
          if (!(v > 0)) r.error(it->second, "'lora.alpha_pattern' values must be > 0");
          l.alpha_pattern.emplace_back(it->first.as<std::string>(), v);
        }
      } catch (const YAML::BadConversion&) {
        r.error(it->second, std::string("'lora.") + key + "' values must be numbers");
      }
    }
  }
}

const std::vector<std::string> kTopKeys = {"model",      "tokenizer",  "data",         "optimizer",  "schedule",
                                           "max_steps",  "seed",       "clip_grad_norm", "dtype",    "device",     "eval",
                                           "activation_checkpointing", "cuda_graphs", "loss_chunk", "kernels",
                                           "mode",       "freeze",     "lora",       "qlora",      "prefix",     "ewc",        "replay",     "dist",     "checkpoint",   "log_every",  "output_dir",
                                           "on_nonfinite", "on_oom"};

void apply_override(Reader& r, YAML::Node& root, const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    r.error_at("override '" + text + "'", "expected section.key=value");
    return;
  }
  const std::string path = text.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    r.error_at("override '" + text + "'", "the value is not YAML: " + e.msg);
    return;
  }
  if (!root.IsMap()) return;  // reported by the main parse
  YAML::Node node;
  node.reset(root);
  size_t begin = 0;
  for (;;) {
    const size_t dot = path.find('.', begin);
    const std::string part = path.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin);
    if (part.empty()) {
      r.error_at("override '" + text + "'", "empty key in '" + path + "'");
      return;
    }
    // A key the override adds (the file lacks it) is the override's: an error about the key itself
    // (unknown, misspelt) then names the override, not the file.
    auto own_new_key = [&](bool existed) {
      if (existed) return;
      for (auto it = node.begin(); it != node.end(); ++it) {
        if (it->first.IsScalar() && it->first.Scalar() == part) r.add_override(it->first, text);
      }
    };
    const bool existed = static_cast<const YAML::Node&>(node)[part].IsDefined();
    if (dot == std::string::npos) {
      if (value.IsNull()) {  // "key=null" (or "key=~", "key="): back to the default, as if the file lacked it
        node.remove(part);
        return;
      }
      node[part] = value;
      r.add_override(node[part], text);
      // The value's own keys and items too: their marks are places in the override's text, not
      // in the file (lora.rank_pattern={'(': 4}).
      std::function<void(const YAML::Node&)> own = [&](const YAML::Node& n) {
        for (auto it = n.begin(); it != n.end(); ++it) {
          if (n.IsMap()) {
            r.add_override(it->first, text);
            r.add_override(it->second, text);
            own(it->second);
          } else {
            r.add_override(*it, text);
            own(*it);
          }
        }
      };
      if (value.IsMap() || value.IsSequence()) own(value);
      own_new_key(existed);
      return;
    }
    YAML::Node child = node[part];
    if (!child.IsDefined() || child.IsNull()) {
      node[part] = YAML::Node(YAML::NodeType::Map);
      own_new_key(existed);
    } else if (!child.IsMap()) {
      r.error_at("override '" + text + "'", "'" + path.substr(0, dot) + "' is not a section");
      return;
    }
    YAML::Node next = node[part];
    node.reset(next);
    begin = dot + 1;
  }
}

}  // namespace

std::optional<std::pair<int64_t, int64_t>> parse_layer_range(const std::string& text) {
  auto number = [](std::string_view s, int64_t& out) {
    if (s.empty()) return false;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), out);
    return r.ec == std::errc() && r.ptr == s.data() + s.size();
  };
  int64_t a = 0, b = 0;
  // "3", "-1", "0-5", "-3--1": the separating dash is the first one after the first character.
  const size_t dash = text.find('-', 1);
  if (dash == std::string::npos) {
    if (!number(text, a)) return std::nullopt;
    return std::make_pair(a, a);
  }
  if (!number(std::string_view(text).substr(0, dash), a) || !number(std::string_view(text).substr(dash + 1), b)) {
    return std::nullopt;
  }
  return std::make_pair(a, b);
}

RunConfig parse_run_config(std::string_view yaml, const std::string& source, const std::vector<std::string>& overrides) {
  Reader r(source);
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::ParserException& e) {
    FT_FAIL("[config] ", source, ":", e.mark.line + 1, ":", e.mark.column + 1, ": YAML syntax error: ", e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);  // empty file: "required" errors below
  for (const auto& o : overrides) apply_override(r, root, o);

  RunConfig c;
  c.source = source;
  if (r.check_map(root, "", kTopKeys)) {
    auto section = [&](const char* key, auto parse, auto& out) {
      if (const YAML::Node n = root[key]) parse(r, n, out);
    };
    if (root["model"]) section("model", parse_model, c.model);
    else r.error_at(source, "'model' is required (model.checkpoint or model.config)");
    r.get(root, "", "tokenizer", c.tokenizer);
    if (root["data"]) section("data", parse_data, c.data);
    else r.error_at(source, "'data' is required (data.train: token stores)");
    section("optimizer", parse_optimizer, c.optimizer);
    section("schedule", parse_schedule, c.schedule);
    r.get(root, "", "max_steps", c.max_steps);
    r.get(root, "", "seed", c.seed);
    r.get(root, "", "clip_grad_norm", c.clip_grad_norm);
    r.get(root, "", "dtype", c.dtype);
    r.get(root, "", "device", c.device);
    r.get(root, "", "activation_checkpointing", c.activation_checkpointing);
    r.get(root, "", "cuda_graphs", c.cuda_graphs);
    if (c.cuda_graphs && c.activation_checkpointing) {
      r.error(root["cuda_graphs"], "'cuda_graphs' and 'activation_checkpointing' exclude each other (the recomputation "
                                   "saves and restores generator states, which a CUDA graph cannot capture)");
    }
    if (c.cuda_graphs && c.device == "cpu") r.error(root["cuda_graphs"], "'cuda_graphs' needs a CUDA device (device is cpu)");
    r.get(root, "", "loss_chunk", c.loss_chunk);
    if (c.loss_chunk < 0) r.error(root["loss_chunk"], "'loss_chunk' must be >= 0 token rows (0: the whole logits at once), got " + std::to_string(c.loss_chunk));
    if (const YAML::Node k = root["kernels"]; k && r.check_map(k, "kernels", {"loss", "rope", "swiglu", "flash_sinks"})) {
      r.get(k, "kernels", "loss", c.kernels.loss);
      r.get(k, "kernels", "rope", c.kernels.rope);
      r.get(k, "kernels", "swiglu", c.kernels.swiglu);
      r.get(k, "kernels", "flash_sinks", c.kernels.flash_sinks);
    }
    section("eval", parse_eval, c.eval);
    r.get(root, "", "mode", c.mode);
    r.one_of(root, "", "mode", c.mode, {"full", "freeze", "lora", "qlora", "prefix"});
    section("freeze", parse_freeze, c.freeze);
    if (root["freeze"] && c.mode != "freeze") r.error(root["freeze"], "'freeze' only applies with 'mode: freeze'");
    section("lora", parse_lora, c.lora);
    if (root["lora"] && c.mode != "lora" && c.mode != "qlora")
      r.error(root["lora"], "'lora' only applies with 'mode: lora' or 'mode: qlora'");
    section("prefix", parse_prefix, c.prefix);
    if (const YAML::Node e = root["ewc"]; e && r.check_map(e, "ewc", {"state", "lambda"})) {
      r.get(e, "ewc", "state", c.ewc.state);
      r.get(e, "ewc", "lambda", c.ewc.lambda);
      if (c.ewc.state.empty()) r.error(e, "'ewc.state' is required: the file `ft fisher` writes");
      r.positive(e, "ewc", "lambda", c.ewc.lambda, true);
      if (c.mode == "prefix") r.error(e, "'ewc' does not apply with 'mode: prefix' (a prefix changes no weight)");
    }
    if (const YAML::Node d = root["dist"]; d && r.check_map(d, "dist", {"backend", "bucket_mb", "timeout_s"})) {
      r.get(d, "dist", "backend", c.dist.backend);
      r.one_of(d, "dist", "backend", c.dist.backend, {"auto", "gloo", "nccl"});
      r.get(d, "dist", "bucket_mb", c.dist.bucket_mb);
      r.positive(d, "dist", "bucket_mb", c.dist.bucket_mb, false);
      r.get(d, "dist", "timeout_s", c.dist.timeout_s);
      r.positive(d, "dist", "timeout_s", c.dist.timeout_s, false);
    }
    if (const YAML::Node rp = root["replay"]; rp && r.check_map(rp, "replay", {"stores", "ratio", "held_out_docs"})) {
      r.get(rp, "replay", "stores", c.replay.stores);
      r.get(rp, "replay", "ratio", c.replay.ratio);
      r.get(rp, "replay", "held_out_docs", c.replay.held_out_docs);
      r.positive(rp, "replay", "held_out_docs", static_cast<double>(c.replay.held_out_docs), true);
      if (c.replay.stores.empty()) r.error(rp, "'replay.stores' needs at least one token store");
      if (!(c.replay.ratio > 0.0 && c.replay.ratio < 1.0))
        r.error(rp["ratio"] ? rp["ratio"] : rp, detail::concat("'replay.ratio' must be in (0, 1), got ", c.replay.ratio));
    }
    if (root["prefix"] && c.mode != "prefix") r.error(root["prefix"], "'prefix' only applies with 'mode: prefix'");
    if (const YAML::Node q = root["qlora"]) {
      if (c.mode != "qlora") r.error(q, "'qlora' only applies with 'mode: qlora'");
      if (r.check_map(q, "qlora", {"block", "double_quant"})) {
        r.get(q, "qlora", "block", c.qlora.block);
        r.get(q, "qlora", "double_quant", c.qlora.double_quant);
        if (c.qlora.block <= 0 || c.qlora.block % 2 != 0)
          r.error(q["block"] ? q["block"] : q, detail::concat("'qlora.block' must be even and > 0, got ", c.qlora.block));
      }
    }
    section("checkpoint", parse_checkpoint, c.checkpoint);
    r.get(root, "", "log_every", c.log_every);
    r.get(root, "", "output_dir", c.output_dir);
    r.get(root, "", "on_nonfinite", c.on_nonfinite);
    r.get(root, "", "on_oom", c.on_oom);
    r.one_of(root, "", "on_oom", c.on_oom, {"stop", "halve"});

    if (root["max_steps"]) r.positive(root, "", "max_steps", static_cast<double>(c.max_steps), false);
    else r.error_at(source, "'max_steps' is required (optimizer steps to train)");
    r.positive(root, "", "clip_grad_norm", c.clip_grad_norm, true);
    r.positive(root, "", "log_every", static_cast<double>(c.log_every), false);
    r.one_of(root, "", "dtype", c.dtype, {"float32", "bfloat16"});
    r.one_of(root, "", "on_nonfinite", c.on_nonfinite, {"skip", "stop"});
    if (c.output_dir.empty()) r.error_at(source, "'output_dir' is required");
    if (c.schedule.name != "constant" && c.max_steps > 0) {
      const int64_t total = c.schedule.total_steps > 0 ? c.schedule.total_steps : c.max_steps;
      if (total <= c.schedule.warmup_steps) {
        r.error(root["schedule"], detail::concat("'schedule.warmup_steps' (", c.schedule.warmup_steps,
                                                 ") must be below the schedule's total steps (", total, ")"));
      }
    }
  }
  if (!r.errors().empty()) {
    std::string message = detail::concat("[config] ", source, ": ", r.errors().size(),
                                         r.errors().size() == 1 ? " error" : " errors");
    for (const auto& e : r.errors()) message += "\n  " + e;
    throw Error(message);
  }
  if (c.schedule.total_steps == 0) c.schedule.total_steps = c.max_steps;
  if (c.eval.batch_size == 0) c.eval.batch_size = c.data.batch_size;
  return c;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  return parse_run_config(read_text_file(path), path, overrides);
}

namespace {

// The shortest text that reads back as the same double ("0.1", not 0.10000000000000001).
std::string shortest(double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

}  // namespace

std::string to_yaml(const RunConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  if (!c.model.checkpoint.empty()) out << YAML::Key << "checkpoint" << YAML::Value << c.model.checkpoint;
  if (!c.model.config.empty()) {
    out << YAML::Key << "config" << YAML::Value << c.model.config;
    out << YAML::Key << "init_seed" << YAML::Value << c.model.init_seed;
  }
  if (c.model.router_aux_loss_coef) {
    out << YAML::Key << "router_aux_loss_coef" << YAML::Value << shortest(*c.model.router_aux_loss_coef);
  }
  out << YAML::EndMap;
  if (!c.tokenizer.empty()) out << YAML::Key << "tokenizer" << YAML::Value << c.tokenizer;
  out << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "train" << YAML::Value << YAML::Flow << c.data.train;
  out << YAML::Key << "seq_len" << YAML::Value << c.data.seq_len;
  out << YAML::Key << "batch_size" << YAML::Value << c.data.batch_size;
  out << YAML::Key << "grad_accum" << YAML::Value << c.data.grad_accum;
  out << YAML::Key << "shuffle" << YAML::Value << c.data.shuffle;
  out << YAML::Key << "seed" << YAML::Value << c.data.seed;
  out << YAML::EndMap;
  out << YAML::Key << "optimizer" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "name" << YAML::Value << c.optimizer.name;
  out << YAML::Key << "lr" << YAML::Value << shortest(c.optimizer.lr);
  if (c.optimizer.name == "adamw") {
    out << YAML::Key << "betas" << YAML::Value << YAML::Flow
        << std::vector<std::string>{shortest(c.optimizer.beta1), shortest(c.optimizer.beta2)};
    out << YAML::Key << "eps" << YAML::Value << shortest(c.optimizer.eps);
  } else {
    out << YAML::Key << "momentum" << YAML::Value << shortest(c.optimizer.momentum);
  }
  out << YAML::Key << "weight_decay" << YAML::Value << shortest(c.optimizer.weight_decay);
  out << YAML::EndMap;
  out << YAML::Key << "schedule" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "name" << YAML::Value << c.schedule.name;
  out << YAML::Key << "warmup_steps" << YAML::Value << c.schedule.warmup_steps;
  out << YAML::Key << "total_steps" << YAML::Value << c.schedule.total_steps;
  out << YAML::EndMap;
  out << YAML::Key << "max_steps" << YAML::Value << c.max_steps;
  out << YAML::Key << "seed" << YAML::Value << c.seed;
  out << YAML::Key << "clip_grad_norm" << YAML::Value << shortest(c.clip_grad_norm);
  out << YAML::Key << "dtype" << YAML::Value << c.dtype;
  out << YAML::Key << "device" << YAML::Value << c.device;
  out << YAML::Key << "activation_checkpointing" << YAML::Value << c.activation_checkpointing;
  out << YAML::Key << "cuda_graphs" << YAML::Value << c.cuda_graphs;
  out << YAML::Key << "loss_chunk" << YAML::Value << c.loss_chunk;
  out << YAML::Key << "kernels" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "loss" << YAML::Value << c.kernels.loss;
  out << YAML::Key << "rope" << YAML::Value << c.kernels.rope;
  out << YAML::Key << "swiglu" << YAML::Value << c.kernels.swiglu;
  out << YAML::Key << "flash_sinks" << YAML::Value << c.kernels.flash_sinks;
  out << YAML::EndMap;
  if (!c.eval.stores.empty() || c.eval.held_out_docs > 0) {
    out << YAML::Key << "eval" << YAML::Value << YAML::BeginMap;
    if (!c.eval.stores.empty()) out << YAML::Key << "stores" << YAML::Value << YAML::Flow << c.eval.stores;
    out << YAML::Key << "held_out_docs" << YAML::Value << c.eval.held_out_docs;
    out << YAML::Key << "every" << YAML::Value << c.eval.every;
    out << YAML::Key << "max_batches" << YAML::Value << c.eval.max_batches;
    out << YAML::Key << "batch_size" << YAML::Value << c.eval.batch_size;
    out << YAML::Key << "patience" << YAML::Value << c.eval.patience;
    out << YAML::Key << "min_delta" << YAML::Value << shortest(c.eval.min_delta);
    out << YAML::Key << "at_start" << YAML::Value << c.eval.at_start;
    out << YAML::EndMap;
  }
  out << YAML::Key << "mode" << YAML::Value << c.mode;
  if (c.mode == "freeze") {
    out << YAML::Key << "freeze" << YAML::Value << YAML::BeginMap;
    if (!c.freeze.layers.empty()) out << YAML::Key << "layers" << YAML::Value << YAML::Flow << c.freeze.layers;
    if (c.freeze.train_last > 0) out << YAML::Key << "train_last" << YAML::Value << c.freeze.train_last;
    if (!c.freeze.patterns.empty()) out << YAML::Key << "patterns" << YAML::Value << YAML::Flow << c.freeze.patterns;
    out << YAML::Key << "embeddings" << YAML::Value << c.freeze.embeddings;
    out << YAML::Key << "lm_head" << YAML::Value << c.freeze.lm_head;
    out << YAML::Key << "norm" << YAML::Value << c.freeze.norm;
    out << YAML::EndMap;
  }
  if (c.mode == "qlora") {
    out << YAML::Key << "qlora" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "block" << YAML::Value << c.qlora.block;
    out << YAML::Key << "double_quant" << YAML::Value << c.qlora.double_quant;
    out << YAML::EndMap;
  }
  if (!c.ewc.state.empty()) {
    out << YAML::Key << "ewc" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "state" << YAML::Value << c.ewc.state;
    out << YAML::Key << "lambda" << YAML::Value << shortest(c.ewc.lambda);
    out << YAML::EndMap;
  }
  if (!c.replay.stores.empty()) {
    out << YAML::Key << "replay" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "stores" << YAML::Value << YAML::Flow << c.replay.stores;
    out << YAML::Key << "ratio" << YAML::Value << shortest(c.replay.ratio);
    out << YAML::Key << "held_out_docs" << YAML::Value << c.replay.held_out_docs;
    out << YAML::EndMap;
  }
  if (c.mode == "prefix") {
    out << YAML::Key << "prefix" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "num_virtual_tokens" << YAML::Value << c.prefix.num_virtual_tokens;
    out << YAML::Key << "projection" << YAML::Value << c.prefix.projection;
    if (c.prefix.projection) out << YAML::Key << "encoder_hidden_size" << YAML::Value << c.prefix.encoder_hidden_size;
    out << YAML::Key << "init" << YAML::Value << c.prefix.init;
    out << YAML::Key << "seed" << YAML::Value << c.prefix.seed;
    if (!c.prefix.init_from.empty()) out << YAML::Key << "init_from" << YAML::Value << c.prefix.init_from;
    out << YAML::EndMap;
  }
  if (c.mode == "lora" || c.mode == "qlora") {
    out << YAML::Key << "lora" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "r" << YAML::Value << c.lora.r;
    out << YAML::Key << "alpha" << YAML::Value << shortest(c.lora.alpha);
    out << YAML::Key << "dropout" << YAML::Value << shortest(c.lora.dropout);
    out << YAML::Key << "targets" << YAML::Value << YAML::Flow << c.lora.targets;
    out << YAML::Key << "modules_to_save" << YAML::Value << YAML::Flow << c.lora.modules_to_save;
    out << YAML::Key << "exclude_modules" << YAML::Value << YAML::Flow << c.lora.exclude_modules;
    out << YAML::Key << "layers_to_transform" << YAML::Value << YAML::Flow << c.lora.layers_to_transform;
    out << YAML::Key << "layers_pattern" << YAML::Value << YAML::Flow << c.lora.layers_pattern;
    out << YAML::Key << "rslora" << YAML::Value << c.lora.rslora;
    out << YAML::Key << "dora" << YAML::Value << c.lora.dora;
    out << YAML::Key << "bias" << YAML::Value << c.lora.bias;
    out << YAML::Key << "init" << YAML::Value << c.lora.init;
    out << YAML::Key << "seed" << YAML::Value << c.lora.seed;
    if (!c.lora.init_from.empty()) out << YAML::Key << "init_from" << YAML::Value << c.lora.init_from;
    out << YAML::Key << "fused" << YAML::Value << c.lora.fused;
    out << YAML::Key << "extended_gemm" << YAML::Value << c.lora.extended_gemm;
    out << YAML::Key << "row_kernels" << YAML::Value << c.lora.row_kernels;
    out << YAML::Key << "group_projections" << YAML::Value << c.lora.group_projections;
    out << YAML::Key << "grad_splits" << YAML::Value << c.lora.grad_splits;
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      out << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginMap;
      if (std::string(key) == "rank_pattern") {
        for (const auto& [p, v] : c.lora.rank_pattern) out << YAML::Key << p << YAML::Value << v;
      } else {
        for (const auto& [p, v] : c.lora.alpha_pattern) out << YAML::Key << p << YAML::Value << shortest(v);
      }
      out << YAML::EndMap;
    }
    out << YAML::EndMap;
  }
  out << YAML::Key << "dist" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "backend" << YAML::Value << c.dist.backend;
  out << YAML::Key << "bucket_mb" << YAML::Value << shortest(c.dist.bucket_mb);
  out << YAML::Key << "timeout_s" << YAML::Value << shortest(c.dist.timeout_s);
  out << YAML::EndMap;
  out << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "every" << YAML::Value << c.checkpoint.every;
  out << YAML::Key << "keep_last" << YAML::Value << c.checkpoint.keep_last;
  out << YAML::Key << "resume" << YAML::Value << c.checkpoint.resume;
  out << YAML::Key << "strict" << YAML::Value << c.checkpoint.strict;
  out << YAML::EndMap;
  out << YAML::Key << "log_every" << YAML::Value << c.log_every;
  out << YAML::Key << "output_dir" << YAML::Value << c.output_dir;
  out << YAML::Key << "on_nonfinite" << YAML::Value << c.on_nonfinite;
  out << YAML::Key << "on_oom" << YAML::Value << c.on_oom;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace ft::config
