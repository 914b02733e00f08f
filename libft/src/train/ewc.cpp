#include "ft/train/ewc.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <set>

#include "ft/adapt/lora.h"
#include "ft/data/array_file.h"
#include "ft/train/batch.h"
#include "ft/train/step.h"
#include "ft/util/error.h"

namespace ft::train {

namespace {

constexpr const char* kKind = "ewc";

}  // namespace

EwcState estimate_fisher(model::CausalLM& model, data::Batcher& rows, int64_t samples,
                         const std::function<void(int64_t, int64_t)>& progress) {
  FT_CHECK(samples > 0, "[ewc] the Fisher estimate needs at least one sample, got ", samples);
  FT_CHECK(!model->prefix_encoder, "[ewc] estimate the Fisher on the plain model (it has a prefix)");
  EwcState s;
  std::vector<at::Tensor> params, sums;  // the parameters and their Σ g² accumulators, in s.names order
  std::vector<bool> required;            // requires_grad before the estimate, restored after it
  const auto device = model->model->embed_tokens->weight.device();
  for (const auto& item : model->named_parameters()) {
    at::Tensor p = item.value();
    if (!p.is_floating_point() || p.numel() == 0) continue;
    s.names.push_back(item.key());
    sums.push_back(at::zeros(p.sizes(), p.options().dtype(at::kFloat)));
    s.anchor[item.key()] = p.detach().to(at::kFloat).cpu().clone();
    params.push_back(p);
    required.push_back(p.requires_grad());
    p.set_requires_grad(true);
    p.mutable_grad() = at::Tensor();
  }
  struct Restore {  // requires_grad and train mode, however the estimate ends
    model::CausalLM& model;
    std::vector<at::Tensor>& params;
    std::vector<bool>& required;
    bool was_training;
    ~Restore() {
      for (size_t i = 0; i < params.size(); ++i) params[i].set_requires_grad(required[i]);
      if (was_training) model->train();
    }
  } restore{model, params, required, model->is_training()};
  model->eval();  // no dropout: the Fisher of the model as it is
  int64_t n = 0;
  while (n < samples) {
    std::optional<data::Batch> batch = rows.next();
    if (!batch) break;
    const BatchTensors b = to_tensors(*batch, device);
    if (b.n_targets == 0) continue;
    // ℓ = mean token log-likelihood; its square gradient is the same for −ℓ.
    const at::Tensor loss = micro_batch_loss_sum(model, b) / static_cast<double>(b.n_targets);
    const auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                             /*allow_unused=*/true);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) continue;
      const at::Tensor g = grads[i].to(at::kFloat);
      sums[i].addcmul_(g, g);
    }
    ++n;
    if (progress) progress(n, samples);
  }
  FT_CHECK(n > 0, "[ewc] the data gave no row with a target token for the Fisher estimate");
  for (size_t i = 0; i < sums.size(); ++i) s.fisher[s.names[i]] = (sums[i] / static_cast<double>(n)).cpu();
  s.samples = n;
  return s;
}

EwcState accumulate_online(const EwcState& previous, const EwcState& current, double gamma) {
  FT_CHECK(gamma >= 0.0 && gamma <= 1.0, "[ewc] gamma must be in [0, 1], got ", gamma);
  FT_CHECK(previous.names == current.names, "[ewc] the earlier EWC state covers other parameters (",
           previous.names.size(), " vs ", current.names.size(), " tensors): it belongs to another model");
  EwcState s = current;
  for (const auto& name : s.names) {
    const at::Tensor& f0 = previous.fisher.at(name);
    FT_CHECK(f0.sizes() == current.fisher.at(name).sizes(), "[ewc] '", name, "' has shape ", f0.sizes(),
             " in the earlier EWC state and ", current.fisher.at(name).sizes(), " now");
    s.fisher[name] = f0 * gamma + current.fisher.at(name);
  }
  s.tasks = previous.tasks + 1;
  s.gamma = gamma;
  return s;
}

void save_ewc(const EwcState& s, const std::string& path) {
  std::vector<data::ArrayView> arrays;
  std::vector<at::Tensor> keep;
  for (const auto& name : s.names) {
    for (const auto& [prefix, map] : {std::pair<const char*, const std::map<std::string, at::Tensor>*>{"fisher:", &s.fisher},
                                      std::pair<const char*, const std::map<std::string, at::Tensor>*>{"anchor:", &s.anchor}}) {
      keep.push_back(map->at(name).to(at::kFloat).cpu().contiguous());
      arrays.push_back({prefix + name, keep.back().sizes().vec(), keep.back().data_ptr<float>()});
    }
  }
  data::write_array_file(path, kKind,
                         {{"samples", std::to_string(s.samples)}, {"tasks", std::to_string(s.tasks)},
                          {"gamma", std::to_string(s.gamma)}},
                         arrays);
}

EwcState load_ewc(const std::string& path) {
  EwcState s;
  const data::ArrayFileInfo info = data::read_array_file(
      path, kKind, [&](const std::string& name, const std::vector<int64_t>& shape) -> float* {
        const size_t colon = name.find(':');
        FT_CHECK(colon != std::string::npos, "[ewc] ", path, ": unexpected array '", name, "'");
        const std::string kind = name.substr(0, colon), param = name.substr(colon + 1);
        FT_CHECK(kind == "fisher" || kind == "anchor", "[ewc] ", path, ": unexpected array '", name, "'");
        at::Tensor t = at::empty(shape, at::kFloat);
        (kind == "fisher" ? s.fisher : s.anchor)[param] = t;
        if (kind == "fisher") s.names.push_back(param);
        return t.data_ptr<float>();
      });
  for (const auto& name : s.names) {
    FT_CHECK(s.anchor.count(name), "[ewc] ", path, ": '", name, "' has a Fisher but no anchor");
    FT_CHECK(s.anchor[name].sizes() == s.fisher[name].sizes(), "[ewc] ", path, ": '", name,
             "' has Fisher and anchor of different shapes");
    FT_CHECK(at::isfinite(s.fisher[name]).all().item<bool>() && (s.fisher[name] >= 0).all().item<bool>(), "[ewc] ",
             path, ": the Fisher of '", name, "' holds negative or non-finite values");
  }
  FT_CHECK(s.anchor.size() == s.names.size(), "[ewc] ", path, ": anchors without a Fisher");
  try {
    s.samples = std::stoll(info.attrs.at("samples"));
    s.tasks = std::stoll(info.attrs.at("tasks"));
    s.gamma = std::stod(info.attrs.at("gamma"));
  } catch (const std::exception&) {
    FT_FAIL("[ewc] ", path, ": missing or malformed attributes samples/tasks/gamma");
  }
  return s;
}

EwcPenalty::EwcPenalty(model::CausalLM& model, const EwcState& s, double lambda) : lambda_(lambda), tasks_(s.tasks) {
  FT_CHECK(lambda >= 0.0, "[ewc] lambda must be >= 0, got ", lambda);
  FT_CHECK(!model->prefix_encoder, "[ewc] prefix tuning changes no weight of the model, so EWC has nothing to anchor");
  std::vector<std::string> problems;
  auto params = model->named_parameters();
  const auto layers = adapt::lora_layers(model);
  std::set<std::string> adapter_params;
  for (const auto& l : layers) {
    FT_CHECK(!params.contains(l.module + ".lora_magnitude_vector.weight") &&
                 !params.contains(l.module + ".lora_magnitude_vector"),
             "[ewc] DoRA is not supported with EWC (its change of the weights is not scale · B A)");
    const std::string a_name = l.a_owner + ".lora_A.weight", b_name = l.module + ".lora_B.weight";
    adapter_params.insert(a_name);
    adapter_params.insert(b_name);
    const std::string w_name = l.module + ".weight";
    if (!s.fisher.count(w_name)) {
      problems.push_back("'" + w_name + "' (adapted by LoRA) has no Fisher information");
      continue;
    }
    auto* lin = model->named_modules()[l.module]->as<model::LinearImpl>();
    const std::vector<int64_t> shape = {lin->out_features, lin->in_features};
    if (s.fisher.at(w_name).sizes().vec() != shape) {
      problems.push_back(detail::concat("'", w_name, "' has shape ", s.fisher.at(w_name).sizes(), " in the EWC state, ",
                                        at::IntArrayRef(shape), " in the model"));
      continue;
    }
    if (lin->nf4() == nullptr) {
      const at::Tensor base = lin->weight.detach().to(at::kFloat).cpu();
      const double diff = (base - s.anchor.at(w_name)).abs().max().item<double>();
      if (diff > 1e-6 * std::max(1.0, base.abs().max().item<double>())) {
        problems.push_back(detail::concat("'", w_name, "': the EWC anchor differs from this run's base weights (max ",
                                          diff, "); adapters are penalised relative to their base, so estimate the "
                                          "Fisher on the model the adapters are trained on"));
        continue;
      }
    }
    const at::Tensor& a = params[a_name];
    low_rank_.push_back({a, params[b_name], s.fisher.at(w_name).to(a.device()), l.scale});
  }
  for (const auto& item : params) {
    const at::Tensor& p = item.value();
    if (!p.requires_grad() || adapter_params.count(item.key())) continue;
    if (!s.fisher.count(item.key())) {
      problems.push_back("trainable '" + item.key() + "' has no Fisher information");
    } else if (s.fisher.at(item.key()).sizes() != p.sizes()) {
      problems.push_back(detail::concat("'", item.key(), "' has shape ", s.fisher.at(item.key()).sizes(),
                                        " in the EWC state, ", p.sizes(), " in the model"));
    } else {
      dense_.push_back({p, s.fisher.at(item.key()).to(p.device()), s.anchor.at(item.key()).to(p.device())});
    }
  }
  if (!problems.empty()) {
    std::string all;
    for (size_t i = 0; i < problems.size() && i < 20; ++i) all += "\n  " + problems[i];
    if (problems.size() > 20) all += detail::concat("\n  ... and ", problems.size() - 20, " more");
    FT_FAIL("[ewc] the EWC state does not fit this run's model:", all);
  }
  FT_CHECK(!dense_.empty() || !low_rank_.empty(), "[ewc] nothing trainable to anchor");
}

double EwcPenalty::apply(bool add_gradients) {
  at::NoGradGuard no_grad;
  double total = 0.0;
  auto add = [](at::Tensor& param, const at::Tensor& g) {
    if (param.grad().defined()) param.mutable_grad().add_(g.to(param.grad().scalar_type()));
    else param.mutable_grad() = g.to(param.scalar_type()).clone();
  };
  for (Dense& d : dense_) {
    const at::Tensor diff = d.param.detach().to(at::kFloat) - d.anchor;
    const at::Tensor fd = d.fisher * diff;
    total += 0.5 * lambda_ * (fd * diff).sum().item<double>();
    if (add_gradients) add(d.param, fd * lambda_);
  }
  for (LowRank& l : low_rank_) {
    const at::Tensor a = l.a.detach().to(at::kFloat), b = l.b.detach().to(at::kFloat);
    const at::Tensor delta = at::matmul(b, a) * l.scale;  // (out, in)
    const at::Tensor e = l.fisher * delta;
    total += 0.5 * lambda_ * (e * delta).sum().item<double>();
    if (add_gradients) {
      add(l.b, at::matmul(e, a.t()) * (lambda_ * l.scale));
      add(l.a, at::matmul(b.t(), e) * (lambda_ * l.scale));
    }
  }
  return total;
}

std::string EwcPenalty::describe() const {
  int64_t elements = 0;
  for (const Dense& d : dense_) elements += d.param.numel();
  for (const LowRank& l : low_rank_) elements += l.fisher.numel();
  return detail::concat("EWC lambda ", lambda_, " on ", dense_.size(), " tensors", low_rank_.empty() ? "" : " and ",
                        low_rank_.empty() ? "" : std::to_string(low_rank_.size()) + " LoRA layers (as scale · B A)",
                        " (", elements, " weights; Fisher of ", tasks_, tasks_ == 1 ? " task" : " tasks", ")");
}

}  // namespace ft::train
