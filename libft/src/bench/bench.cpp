#include "ft/bench/bench.h"

#include <ATen/ATen.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ft/data/batcher.h"
#include "ft/data/token_store.h"
#include "ft/data/tokenizer.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/train/ewc.h"
#include "ft/train/run.h"
#include "ft/util/error.h"
#include "ft/util/progress.h"
#include "ft/util/json.h"

namespace fs = std::filesystem;

namespace ft::bench {

namespace {

std::vector<std::string> string_list(const YAML::Node& n, const std::string& where) {
  std::vector<std::string> v;
  if (!n) return v;
  FT_CHECK(n.IsSequence(), where, " must be a list");
  for (const auto& item : n) {
    FT_CHECK(item.IsScalar(), where, ": every entry must be a string");
    v.push_back(item.as<std::string>());
  }
  return v;
}

void check_keys(const YAML::Node& n, const std::set<std::string>& known, const std::string& where) {
  FT_CHECK(n.IsMap(), where, " must be a mapping");
  for (const auto& kv : n) {
    const std::string key = kv.first.as<std::string>();
    if (!known.count(key)) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      FT_FAIL(where, ": unknown key '", key, "' (known: ", list, ")");
    }
  }
}

// A variant that uses EWC without naming its state gets the Fisher the bench estimates.
bool needs_bench_fisher(const Variant& v) {
  auto starts = [&](const char* prefix) {
    return std::any_of(v.overrides.begin(), v.overrides.end(),
                       [&](const std::string& o) { return o.rfind(prefix, 0) == 0; });
  };
  return starts("ewc.") && !starts("ewc.state=");
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += ch;
    }
  }
  return out;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// The derived columns of a variant, against the baseline and the reference variant.
struct Derived {
  double gain = 0, forgetting = 0;
  std::string forgetting_removed = "", gain_kept = "";
};

Derived derive(const BenchResult& r, const VariantResult& v) {
  Derived d;
  d.gain = r.baseline.at(r.target_set) - v.target_loss;
  d.forgetting = v.general_loss - r.baseline.at(r.general_set);
  const auto ref = std::find_if(r.variants.begin(), r.variants.end(), [&](const VariantResult& x) { return x.name == r.reference; });
  if (ref == r.variants.end() || ref->name == v.name) return d;
  const double ref_gain = r.baseline.at(r.target_set) - ref->target_loss;
  const double ref_forgetting = ref->general_loss - r.baseline.at(r.general_set);
  if (ref_forgetting > 0) d.forgetting_removed = fmt("%.0f%%", 100.0 * (1.0 - d.forgetting / ref_forgetting));
  if (ref_gain > 0) d.gain_kept = fmt("%.0f%%", 100.0 * d.gain / ref_gain);
  return d;
}

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                          "#7f7f7f", "#bcbd22"};

// A line chart of one curve per variant, as inline SVG.
std::string line_chart(const std::string& title, const std::string& y_label,
                       const std::vector<std::pair<std::string, const Curve*>>& series, double baseline = NAN) {
  const double W = 720, H = 340, left = 64, right = 170, top = 34, bottom = 44;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const auto& [name, c] : series) {
    for (size_t i = 0; i < c->steps.size(); ++i) {
      x0 = std::min(x0, static_cast<double>(c->steps[i]));
      x1 = std::max(x1, static_cast<double>(c->steps[i]));
      y0 = std::min(y0, c->values[i]);
      y1 = std::max(y1, c->values[i]);
    }
  }
  if (std::isfinite(baseline)) y0 = std::min(y0, baseline), y1 = std::max(y1, baseline);
  if (!(x1 > x0)) x1 = x0 + 1;
  if (!(y1 > y0)) y1 = y0 + 1e-3;
  const double pad = 0.06 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto X = [&](double x) { return left + (x - x0) / (x1 - x0) * (W - left - right); };
  auto Y = [&](double y) { return top + (y1 - y) / (y1 - y0) * (H - top - bottom); };
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\" role=\"img\" aria-label=\"" << html_escape(title) << "\">\n";
  s << "<text x=\"" << left << "\" y=\"20\" font-size=\"15\" font-weight=\"bold\">" << html_escape(title) << "</text>\n";
  s << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << W - left - right << "\" height=\"" << H - top - bottom
    << "\" fill=\"none\" stroke=\"#999\"/>\n";
  for (int k = 0; k <= 4; ++k) {
    const double yv = y0 + (y1 - y0) * k / 4.0, xv = x0 + (x1 - x0) * k / 4.0;
    s << "<line x1=\"" << left << "\" x2=\"" << W - right << "\" y1=\"" << Y(yv) << "\" y2=\"" << Y(yv)
      << "\" stroke=\"#eee\"/>\n";
    s << "<text x=\"" << left - 6 << "\" y=\"" << Y(yv) + 4 << "\" font-size=\"11\" text-anchor=\"end\">"
      << fmt("%.3f", yv) << "</text>\n";
    s << "<text x=\"" << X(xv) << "\" y=\"" << H - bottom + 16 << "\" font-size=\"11\" text-anchor=\"middle\">"
      << fmt("%.0f", xv) << "</text>\n";
  }
  s << "<text x=\"" << (left + W - right) / 2 << "\" y=\"" << H - 8 << "\" font-size=\"12\" text-anchor=\"middle\">step</text>\n";
  s << "<text x=\"14\" y=\"" << (top + H - bottom) / 2 << "\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 "
    << (top + H - bottom) / 2 << ")\">" << html_escape(y_label) << "</text>\n";
  if (std::isfinite(baseline)) {
    s << "<line x1=\"" << left << "\" x2=\"" << W - right << "\" y1=\"" << Y(baseline) << "\" y2=\"" << Y(baseline)
      << "\" stroke=\"#444\" stroke-dasharray=\"5,4\"/>\n";
    s << "<text x=\"" << W - right - 4 << "\" y=\"" << Y(baseline) - 4 << "\" font-size=\"11\" text-anchor=\"end\">base model</text>\n";
  }
  for (size_t i = 0; i < series.size(); ++i) {
    const Curve& c = *series[i].second;
    const char* color = kPalette[i % 10];
    s << "<polyline fill=\"none\" stroke=\"" << color << "\" stroke-width=\"2\" points=\"";
    for (size_t k = 0; k < c.steps.size(); ++k) s << X(static_cast<double>(c.steps[k])) << "," << Y(c.values[k]) << " ";
    s << "\"/>\n";
    if (c.steps.size() <= 60) {
      for (size_t k = 0; k < c.steps.size(); ++k)
        s << "<circle cx=\"" << X(static_cast<double>(c.steps[k])) << "\" cy=\"" << Y(c.values[k]) << "\" r=\"2.5\" fill=\""
          << color << "\"/>\n";
    }
    const double ly = top + 14 + 18.0 * static_cast<double>(i);
    s << "<line x1=\"" << W - right + 12 << "\" x2=\"" << W - right + 32 << "\" y1=\"" << ly - 4 << "\" y2=\"" << ly - 4
      << "\" stroke=\"" << color << "\" stroke-width=\"3\"/>\n";
    s << "<text x=\"" << W - right + 38 << "\" y=\"" << ly << "\" font-size=\"12\">" << html_escape(series[i].first)
      << "</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

// Horizontal bars, one per variant.
std::string bar_chart(const std::string& title, const std::string& unit, const std::vector<std::pair<std::string, double>>& bars) {
  const double W = 720, row = 24, left = 150, right = 90, top = 34;
  const double H = top + row * static_cast<double>(bars.size()) + 12;
  double vmax = 0;
  for (const auto& b : bars) vmax = std::max(vmax, b.second);
  if (!(vmax > 0)) vmax = 1;
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << " " << H << "\" role=\"img\" aria-label=\"" << html_escape(title) << "\">\n";
  s << "<text x=\"" << 8 << "\" y=\"20\" font-size=\"15\" font-weight=\"bold\">" << html_escape(title) << "</text>\n";
  for (size_t i = 0; i < bars.size(); ++i) {
    const double y = top + row * static_cast<double>(i);
    const double w = (W - left - right) * bars[i].second / vmax;
    s << "<text x=\"" << left - 8 << "\" y=\"" << y + 15 << "\" font-size=\"12\" text-anchor=\"end\">"
      << html_escape(bars[i].first) << "</text>\n";
    s << "<rect x=\"" << left << "\" y=\"" << y + 3 << "\" width=\"" << w << "\" height=\"" << row - 6 << "\" fill=\""
      << kPalette[i % 10] << "\"/>\n";
    s << "<text x=\"" << left + w + 6 << "\" y=\"" << y + 15 << "\" font-size=\"12\">" << fmt("%.0f", bars[i].second) << " "
      << html_escape(unit) << "</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

// The table's rows as cells, shared by the Markdown and HTML reports so that they agree.
std::vector<std::string> header() {
  return {"variant", "mode", "trainable", "peak memory (MiB)", "tokens/s", "train time (s)", "wall time (s)", "target loss",
          "target gain", "general loss", "forgetting", "forgetting removed", "gain kept"};
}

std::vector<std::vector<std::string>> rows(const BenchResult& r) {
  std::vector<std::vector<std::string>> out;
  out.push_back({"base model", "", "", "", "", "", "", fmt("%.4f", r.baseline.at(r.target_set)), "",
                 fmt("%.4f", r.baseline.at(r.general_set)), "", "", ""});
  for (const VariantResult& v : r.variants) {
    const Derived d = derive(r, v);
    std::string mode = v.mode + (v.ewc ? " + EWC" : "") + (v.replay ? " + replay" : "");
    const double share = v.total_params > 0 ? 100.0 * static_cast<double>(v.trainable_params) / static_cast<double>(v.total_params) : 0.0;
    out.push_back({v.name, mode, Progress::format_count(v.trainable_params) + " (" + fmt("%.2f", share) + "%)",
                   fmt("%.0f", v.peak_memory_mib), fmt("%.0f", v.tokens_per_s), fmt("%.1f", v.train_seconds),
                   fmt("%.1f", v.train_seconds + v.eval_seconds),
                   fmt("%.4f", v.target_loss), fmt("%+.4f", d.gain), fmt("%.4f", v.general_loss), fmt("%+.4f", d.forgetting),
                   d.forgetting_removed, d.gain_kept});
  }
  return out;
}

}  // namespace

BenchConfig load_bench_config(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    FT_FAIL("[bench] ", path, ": ", e.what());
  }
  for (const auto& o : overrides) {
    const size_t eq = o.find('=');
    FT_CHECK(eq != std::string::npos && eq > 0, "[bench] override '", o, "': expected key=value");
    root[o.substr(0, eq)] = YAML::Load(o.substr(eq + 1));
  }
  const std::string where = "[bench] " + path;
  BenchConfig c;
  c.source = path;
  try {
    check_keys(root, {"vars", "base", "overrides", "target_set", "general_set", "reference", "fisher", "output_dir",
                      "variants"}, where);
    // vars: {name: value}; "${name}" in any string below becomes value.
    std::map<std::string, std::string> vars;
    if (const YAML::Node v = root["vars"]) {
      FT_CHECK(v.IsMap(), where, ": 'vars' must map names to strings");
      for (const auto& kv : v) vars["${" + kv.first.as<std::string>() + "}"] = kv.second.as<std::string>();
    }
    std::function<void(YAML::Node)> substitute = [&](YAML::Node n) {
      if (n.IsScalar()) {
        std::string text = n.as<std::string>();
        bool changed = false;
        for (const auto& [key, value] : vars) {
          for (size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + value.size())) {
            text.replace(at, key.size(), value);
            changed = true;
          }
        }
        if (changed) n = text;
      } else if (n.IsSequence()) {
        for (size_t i = 0; i < n.size(); ++i) substitute(n[i]);
      } else if (n.IsMap()) {
        for (auto kv : n) substitute(kv.second);
      }
    };
    for (auto kv : root) {
      if (kv.first.as<std::string>() != "vars") substitute(kv.second);
    }
    FT_CHECK(root["base"] && root["base"].IsScalar(), where, ": 'base' (a run config) is required");
    c.base = root["base"].as<std::string>();
    c.overrides = string_list(root["overrides"], where + ": overrides");
    if (root["target_set"]) c.target_set = root["target_set"].as<std::string>();
    FT_CHECK(root["general_set"], where, ": 'general_set' (the evaluation set of the domain to keep) is required");
    c.general_set = root["general_set"].as<std::string>();
    if (root["reference"]) c.reference = root["reference"].as<std::string>();
    FT_CHECK(root["output_dir"], where, ": 'output_dir' is required");
    c.output_dir = root["output_dir"].as<std::string>();
    if (const YAML::Node f = root["fisher"]) {
      check_keys(f, {"stores", "samples", "seq_len", "seed"}, where + ": fisher");
      c.fisher.stores = string_list(f["stores"], where + ": fisher.stores");
      if (f["samples"]) c.fisher.samples = f["samples"].as<int64_t>();
      if (f["seq_len"]) c.fisher.seq_len = f["seq_len"].as<int64_t>();
      if (f["seed"]) c.fisher.seed = f["seed"].as<uint64_t>();
    }
    FT_CHECK(root["variants"] && root["variants"].IsSequence() && root["variants"].size() > 0, where,
             ": 'variants' must list at least one variant");
    std::set<std::string> names;
    for (const auto& v : root["variants"]) {
      check_keys(v, {"name", "config", "overrides"}, where + ": variant");
      FT_CHECK(v["name"], where, ": every variant needs a name");
      Variant x;
      x.name = v["name"].as<std::string>();
      FT_CHECK(!x.name.empty() && x.name.find('/') == std::string::npos, where, ": bad variant name '", x.name, "'");
      FT_CHECK(names.insert(x.name).second, where, ": two variants are named '", x.name, "'");
      if (v["config"]) x.config = v["config"].as<std::string>();
      x.overrides = string_list(v["overrides"], where + ": variant " + x.name + " overrides");
      c.variants.push_back(std::move(x));
    }
  } catch (const YAML::Exception& e) {
    FT_FAIL(where, ": ", e.what());
  }
  if (c.reference.empty()) c.reference = c.variants.front().name;
  FT_CHECK(std::any_of(c.variants.begin(), c.variants.end(), [&](const Variant& v) { return v.name == c.reference; }),
           where, ": reference '", c.reference, "' is not a variant");
  const bool any_ewc = std::any_of(c.variants.begin(), c.variants.end(), needs_bench_fisher);
  FT_CHECK(!any_ewc || !c.fisher.stores.empty(), where, ": a variant uses EWC, so 'fisher.stores' (the data of the "
           "domain to keep) is required");
  return c;
}

VariantResult read_variant(const std::string& name, const std::string& run_dir, const std::string& target_set,
                           const std::string& general_set) {
  VariantResult v;
  v.name = name;
  v.run_dir = run_dir;
  const std::string path = (fs::path(run_dir) / "metrics.jsonl").string();
  std::ifstream in(path);
  FT_CHECK(in, "[bench] ", path, ": cannot open");
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      FT_FAIL("[bench] ", path, ":", n, ": not JSON: ", e.what());
    }
    const std::string type = j.value("type", "");
    if (type == "train") {
      v.train_loss.steps.push_back(j.at("step").get<int64_t>());
      v.train_loss.values.push_back(j.at("loss").get<double>());
      v.tokens_per_s = j.at("tokens_per_s").get<double>();
      v.train_seconds += j.at("step_time_s").get<double>();
      const double peak = j.contains("peak_device_mib") ? j["peak_device_mib"].get<double>() : j.value("peak_rss_mib", 0.0);
      v.peak_memory_mib = std::max(v.peak_memory_mib, peak);
    } else if (type == "eval") {
      Curve& c = v.eval[j.at("set").get<std::string>()];
      const int64_t step = j.at("step").get<int64_t>();
      if (!c.steps.empty() && c.steps.back() == step) continue;  // a repeated evaluation (resume)
      v.eval_seconds += j.value("eval_time_s", 0.0);
      c.steps.push_back(step);
      c.values.push_back(j.at("loss").get<double>());
    }
  }
  FT_CHECK(!v.train_loss.steps.empty(), "[bench] ", path, ": no train line");
  for (const std::string& set : {target_set, general_set}) {
    FT_CHECK(v.eval.count(set) && !v.eval[set].values.empty(), "[bench] ", path, ": no evaluation of set '", set,
             "' (sets of the run: the held-out split is 'held_out', eval.stores are named by file stem)");
  }
  v.target_loss = v.eval[target_set].values.back();
  v.general_loss = v.eval[general_set].values.back();
  return v;
}

BenchResult run_bench(const BenchConfig& bc, std::FILE* log) {
  fs::create_directories(bc.output_dir);
  BenchResult r;
  r.target_set = bc.target_set;
  r.general_set = bc.general_set;
  r.reference = bc.reference;
  r.source = bc.source;
  auto run_config = [&](const Variant& v, const std::string& fisher_path) {
    std::vector<std::string> o = bc.overrides;
    o.insert(o.end(), v.overrides.begin(), v.overrides.end());
    if (needs_bench_fisher(v)) o.push_back("ewc.state=" + fisher_path);
    o.push_back("output_dir=" + (fs::path(bc.output_dir) / v.name).string());
    o.push_back("eval.at_start=true");
    return config::load_run_config(v.config.empty() ? bc.base : v.config, o);
  };
  const std::string fisher_path = (fs::path(bc.output_dir) / "fisher.h5").string();
  // Every variant's run config, checked before anything runs: a mistake in the last variant's
  // overrides must not wait for the first variants to train, and its message names the variant.
  std::vector<config::RunConfig> configs;
  for (const Variant& v : bc.variants) {
    try {
      configs.push_back(run_config(v, fisher_path));
    } catch (const Error& e) {
      throw Error("[bench] " + bc.source + ": variant '" + v.name + "': " + e.what());
    }
  }
  const config::RunConfig& first = configs.front();
  FT_CHECK(!first.model.checkpoint.empty(), "[bench] ", bc.source, ": the base run config must start from a checkpoint "
           "(model.checkpoint): the bench compares ways of adapting one pretrained model");
  const c10::Device device = train::resolve_device(first.device);

  // The baseline: the untouched base model on every evaluation set, first.
  {
    io::LoadOptions lo;
    lo.device = device;
    model::CausalLM base = io::load_pretrained(first.model.checkpoint, lo);
    {
      at::NoGradGuard no_grad;
      for (const auto& [set, e] : train::evaluate_config_sets(base, first, device)) {
        r.baseline[set] = e.loss;
        std::fprintf(log, "[bench] base model: %s loss %.4f\n", set.c_str(), e.loss);
      }
    }
    for (const auto& [key, set] : {std::pair{"target_set", bc.target_set}, std::pair{"general_set", bc.general_set}}) {
      std::string sets;
      for (const auto& item : r.baseline) sets += (sets.empty() ? "" : ", ") + item.first;
      FT_CHECK(r.baseline.count(set), "[bench] ", bc.source, ": ", key, " '", set,
               "' is not one of the run config's evaluation sets (", sets.empty() ? "none" : sets, ")");
    }
    // The Fisher of the base model on the domain to keep, once, for the EWC variants.
    const bool need_fisher = std::any_of(bc.variants.begin(), bc.variants.end(), needs_bench_fisher);
    if (need_fisher && !fs::exists(fisher_path)) {
      const std::string fp = first.tokenizer.empty()
                                 ? data::TokenStoreReader::inspect(bc.fisher.stores.front()).tokenizer_fingerprint
                                 : data::Tokenizer::load(first.tokenizer).fingerprint();
      std::vector<data::BatcherSource> sources;
      for (const auto& p : bc.fisher.stores) sources.push_back({data::TokenStoreReader::open(p, fp), 1.0});
      data::BatcherOptions o;
      o.seq_len = bc.fisher.seq_len > 0 ? bc.fisher.seq_len : first.data.seq_len;
      o.batch_size = 1;
      o.seed = bc.fisher.seed;
      o.max_epochs = 1;
      data::Batcher rows(sources, o);
      const train::EwcState s = train::estimate_fisher(base, rows, bc.fisher.samples);
      train::save_ewc(s, fisher_path);
      std::fprintf(log, "[bench] Fisher of the base model from %lld rows: %s\n", static_cast<long long>(s.samples),
                   fisher_path.c_str());
    }
  }
  const auto started = std::chrono::steady_clock::now();
  for (size_t k = 0; k < bc.variants.size(); ++k) {
    const Variant& v = bc.variants[k];
    const config::RunConfig& c = configs[k];
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::string eta = "?";
    if (k > 0) eta = Progress::format_duration(elapsed / static_cast<double>(k) * static_cast<double>(bc.variants.size() - k));
    std::fprintf(log, "[bench] variant %zu/%zu: %s (mode %s); elapsed %s, ETA %s\n", k + 1, bc.variants.size(),
                 v.name.c_str(), c.mode.c_str(), Progress::format_duration(elapsed).c_str(), eta.c_str());
    train::RunOptions ro;
    ro.log = log;
    ro.handle_signals = true;
    const train::RunSummary s = train::run_training(c, ro);
    FT_CHECK(s.stop != train::StopReason::Signal, "[bench] interrupted in variant ", v.name,
             "; run the same command to resume");
    VariantResult x = read_variant(v.name, c.output_dir, bc.target_set, bc.general_set);
    x.mode = c.mode;
    x.ewc = !c.ewc.state.empty();
    x.replay = !c.replay.stores.empty();
    x.trainable_params = s.trainable_params;
    x.total_params = s.trainable_params + s.frozen_params;
    r.variants.push_back(std::move(x));
  }
  write_reports(r, bc.output_dir);
  return r;
}

std::string markdown_table(const BenchResult& r) {
  std::ostringstream s;
  const auto h = header();
  s << "|";
  for (const auto& x : h) s << " " << x << " |";
  s << "\n|";
  for (size_t i = 0; i < h.size(); ++i) s << " --- |";
  s << "\n";
  for (const auto& row : rows(r)) {
    s << "|";
    for (const auto& x : row) s << " " << x << " |";
    s << "\n";
  }
  return s.str();
}

void write_reports(const BenchResult& r, const std::string& dir) {
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    io::write_file_atomic((fs::path(dir) / name).string(),
                          std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  };
  const std::string note =
      "Target gain: the base model's target-set loss minus the variant's (higher is better). Forgetting: the "
      "variant's general-set loss minus the base model's (lower is better). Forgetting removed and gain kept are "
      "relative to the reference variant '" + r.reference + "'.";
  write("report.md", "# ft bench: " + r.source + "\n\nTarget set: " + r.target_set + "; general set: " + r.general_set +
                         ".\n\n" + markdown_table(r) + "\n" + note + "\n");

  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>ft bench: "
    << html_escape(r.source) << "</title>\n<style>\nbody { font-family: sans-serif; margin: 24px; color: #222; }\n"
    << "table { border-collapse: collapse; font-size: 13px; }\nth, td { border: 1px solid #ccc; padding: 4px 8px; "
    << "text-align: right; }\nth:first-child, td:first-child, td:nth-child(2) { text-align: left; }\n"
    << "figure { margin: 18px 0; }\n</style>\n</head>\n<body>\n<h1>ft bench</h1>\n<p>"
    << html_escape(r.source) << ": target set <b>" << html_escape(r.target_set) << "</b>, general set <b>"
    << html_escape(r.general_set) << "</b>.</p>\n<table id=\"results\">\n<thead><tr>";
  for (const auto& x : header()) h << "<th>" << html_escape(x) << "</th>";
  h << "</tr></thead>\n<tbody>\n";
  for (const auto& row : rows(r)) {
    h << "<tr>";
    for (const auto& x : row) h << "<td>" << html_escape(x) << "</td>";
    h << "</tr>\n";
  }
  h << "</tbody>\n</table>\n<p>" << html_escape(note) << "</p>\n";
  std::vector<std::pair<std::string, const Curve*>> target, general, train;
  for (const auto& v : r.variants) {
    target.emplace_back(v.name, &v.eval.at(r.target_set));
    general.emplace_back(v.name, &v.eval.at(r.general_set));
    train.emplace_back(v.name, &v.train_loss);
  }
  h << "<figure>" << line_chart("Target domain (" + r.target_set + "): evaluation loss", "loss", target,
                                r.baseline.at(r.target_set))
    << "</figure>\n";
  h << "<figure>" << line_chart("General domain (" + r.general_set + "): evaluation loss", "loss", general,
                                r.baseline.at(r.general_set))
    << "</figure>\n";
  h << "<figure>" << line_chart("Training loss", "loss", train) << "</figure>\n";
  std::vector<std::pair<std::string, double>> memory, speed;
  for (const auto& v : r.variants) memory.emplace_back(v.name, v.peak_memory_mib), speed.emplace_back(v.name, v.tokens_per_s);
  h << "<figure>" << bar_chart("Peak memory in training", "MiB", memory) << "</figure>\n";
  h << "<figure>" << bar_chart("Training speed", "tokens/s", speed) << "</figure>\n";
  h << "</body>\n</html>\n";
  write("report.html", h.str());

  nlohmann::ordered_json j;
  j["source"] = r.source;
  j["target_set"] = r.target_set;
  j["general_set"] = r.general_set;
  j["reference"] = r.reference;
  j["baseline"] = r.baseline;
  j["variants"] = nlohmann::ordered_json::array();
  for (const auto& v : r.variants) {
    const Derived d = derive(r, v);
    j["variants"].push_back({{"name", v.name}, {"mode", v.mode}, {"ewc", v.ewc}, {"replay", v.replay},
                             {"run_dir", v.run_dir}, {"trainable_params", v.trainable_params},
                             {"total_params", v.total_params}, {"peak_memory_mib", v.peak_memory_mib},
                             {"tokens_per_s", v.tokens_per_s}, {"train_seconds", v.train_seconds},
                             {"eval_seconds", v.eval_seconds},
                             {"target_loss", v.target_loss}, {"general_loss", v.general_loss},
                             {"target_gain", d.gain}, {"forgetting", d.forgetting}});
  }
  write("results.json", j.dump(2) + "\n");
}

}  // namespace ft::bench
