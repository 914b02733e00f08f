#include "ft/train/optimizer.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <cmath>

#include "ft/util/error.h"

namespace ft::train {

namespace {

bool exempt_from_decay(const std::string& name, const at::Tensor& p) {
  // 1-D parameters are norm gains and biases; embeddings are looked up, not multiplied.
  return p.dim() < 2 || name.find("embed_tokens") != std::string::npos;
}

}  // namespace

ParameterGroups group_parameters(model::CausalLM& model, const OptimizerOptions& options) {
  ParameterGroups g;
  for (const auto& item : model->named_parameters()) {
    if (!item.value().requires_grad()) continue;
    (options.decay_all || !exempt_from_decay(item.key(), item.value()) ? g.decay : g.no_decay).push_back(item.key());
  }
  return g;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(model::CausalLM& model, const OptimizerOptions& o) {
  FT_CHECK(o.lr >= 0 && std::isfinite(o.lr), "[optimizer] lr must be finite and >= 0, got ", o.lr);
  FT_CHECK(o.weight_decay >= 0, "[optimizer] weight_decay must be >= 0, got ", o.weight_decay);
  const ParameterGroups names = group_parameters(model, o);
  FT_CHECK(!names.decay.empty() || !names.no_decay.empty(), "[optimizer] the model has no trainable parameter");
  const auto params = model->named_parameters();
  auto collect = [&](const std::vector<std::string>& keys) {
    std::vector<at::Tensor> v;
    for (const auto& k : keys) v.push_back(params[k]);
    return v;
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto add_group = [&](const std::vector<std::string>& keys, double decay) {
    if (keys.empty()) return;
    if (o.kind == OptimizerKind::AdamW) {
      FT_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "[optimizer] adamw: betas must be in [0, 1), got [",
               o.beta1, ", ", o.beta2, "]");
      FT_CHECK(o.eps > 0, "[optimizer] adamw: eps must be > 0, got ", o.eps);
      auto opts = std::make_unique<torch::optim::AdamWOptions>(o.lr);
      opts->betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(decay);
      groups.emplace_back(collect(keys), std::move(opts));
    } else {
      auto opts = std::make_unique<torch::optim::SGDOptions>(o.lr);
      opts->momentum(o.momentum).weight_decay(decay);
      groups.emplace_back(collect(keys), std::move(opts));
    }
  };
  add_group(names.decay, o.weight_decay);
  add_group(names.no_decay, 0.0);
  // The constructors' default options only fill what a group leaves unset; every group sets its own.
  if (o.kind == OptimizerKind::AdamW) {
    return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(o.lr));
  }
  return std::make_unique<torch::optim::SGD>(std::move(groups), torch::optim::SGDOptions(o.lr));
}

OptimizerKind parse_optimizer_kind(const std::string& name) {
  if (name == "adamw") return OptimizerKind::AdamW;
  if (name == "sgd") return OptimizerKind::SGD;
  FT_FAIL("[optimizer] '", name, "' is not one of adamw, sgd");
}

NonFinitePolicy parse_nonfinite_policy(const std::string& name) {
  if (name == "skip") return NonFinitePolicy::Skip;
  if (name == "stop") return NonFinitePolicy::Stop;
  FT_FAIL("[train] on_nonfinite: '", name, "' is not one of skip, stop");
}

double global_grad_norm(const torch::optim::Optimizer& optimizer) {
  at::Tensor total;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      at::Tensor sq = p.grad().to(at::kDouble).pow(2).sum();
      total = total.defined() ? total + sq : sq;
    }
  }
  return total.defined() ? std::sqrt(total.item<double>()) : 0.0;  // one device sync per step
}

StepOutcome optimizer_step(torch::optim::Optimizer& optimizer, double loss, double lr, const StepOptions& options,
                           StepCounters& counters) {
  StepOutcome out;
  out.grad_norm = global_grad_norm(optimizer);
  if (!std::isfinite(loss) || !std::isfinite(out.grad_norm)) {
    // Before optimizer.step(): AdamW would write the NaN into its moments and every weight, and
    // its per-parameter step count would move; none of that has happened yet.
    optimizer.zero_grad();
    FT_CHECK(options.on_nonfinite == NonFinitePolicy::Skip, "[train] step ", counters.step,
             ": non-finite ", std::isfinite(loss) ? "gradient" : "loss", " (loss ", loss, ", gradient norm ",
             out.grad_norm, ") and on_nonfinite is stop");
    ++counters.skipped;
    return out;
  }
  if (options.clip_grad_norm > 0 && out.grad_norm > options.clip_grad_norm) {
    const double scale = options.clip_grad_norm / (out.grad_norm + 1e-6);  // torch's clip_grad_norm_ epsilon
    for (auto& group : optimizer.param_groups()) {
      for (auto& p : group.params()) {
        if (p.grad().defined()) p.grad().mul_(scale);
      }
    }
  }
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
  optimizer.step();
  optimizer.zero_grad();
  ++counters.step;
  out.applied = true;
  return out;
}

}  // namespace ft::train
