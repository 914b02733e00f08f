#include "ft/train/optimizer.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <map>
#include <tuple>

#include "ft/util/error.h"

namespace ft::train {

namespace {

bool exempt_from_decay(const std::string& name, const at::Tensor& p) {
  // 1-D parameters are norm gains and biases; embeddings are looked up, not multiplied.
  return p.dim() < 2 || name.find("embed_tokens") != std::string::npos;
}

// AdamW through ATen's fused kernel (_fused_adamw_, CPU and CUDA): one pass over each parameter,
// its gradient and its two moments, where torch::optim::AdamW's chain makes eight passes and two
// temporaries (on the bundled model's CPU step that was 4% of the time). The arithmetic is
// torch.optim.AdamW's, rounding order aside, and the state is the same AdamWParamState, so
// checkpoints, the EWC and DP code, and dynamic_cast<torch::optim::AdamW*> see no difference.
class FusedAdamW final : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  torch::Tensor step(LossClosure closure = nullptr) override {
    at::Tensor loss;
    if (closure) {
      at::AutoGradMode enable(true);
      loss = closure();
    }
    at::NoGradGuard no_grad;
    for (auto& group : param_groups()) {
      auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
      FT_CHECK(!o.amsgrad(), "[optimizer] adamw: amsgrad is not supported");
      // The kernel takes one device and dtype per call.
      struct Lists {
        std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
        std::vector<float> steps;
      };
      std::map<std::tuple<int, int, int>, Lists> by_kind;
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        FT_CHECK(!p.grad().is_sparse(), "[optimizer] adamw: sparse gradients are not supported");
        auto& slot = state()[p.unsafeGetTensorImpl()];
        if (!slot) {
          auto st = std::make_unique<torch::optim::AdamWParamState>();
          st->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
          st->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
          slot = std::move(st);
        }
        auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
        st.step(st.step() + 1);
        Lists& l = by_kind[{static_cast<int>(p.device().type()), p.device().index(), static_cast<int>(p.scalar_type())}];
        l.params.push_back(p);
        l.grads.push_back(p.grad().is_contiguous() ? p.grad() : p.grad().contiguous());
        l.exp_avgs.push_back(st.exp_avg());
        l.exp_avg_sqs.push_back(st.exp_avg_sq());
        l.steps.push_back(static_cast<float>(st.step()));
      }
      for (auto& [kind, l] : by_kind) {
        // One small tensor of step counts (on the parameters' device, where the kernel reads them).
        const at::Tensor steps = at::tensor(l.steps, at::kFloat).to(l.params[0].device());
        std::vector<at::Tensor> step_list = steps.unbind(0);
        at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, {}, step_list, o.lr(), std::get<0>(o.betas()),
                          std::get<1>(o.betas()), o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false);
      }
    }
    return loss;
  }
};

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
    return std::make_unique<FusedAdamW>(std::move(groups), torch::optim::AdamWOptions(o.lr));
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

namespace {

std::vector<at::Tensor> defined_grads(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> grads;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      if (p.grad().defined()) grads.push_back(p.grad());
    }
  }
  return grads;
}

}  // namespace

double global_grad_norm(const torch::optim::Optimizer& optimizer) {
  const std::vector<at::Tensor> grads = defined_grads(optimizer);
  if (grads.empty()) return 0.0;
  // One read of each gradient (a norm in its own dtype, with ATen's cascaded sums), then the
  // squares summed in float64: torch.nn.utils.clip_grad_norm_'s figure, without the float64 copies.
  std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  // One stack per dtype, then float64: the same values as casting each norm, in a few launches
  // instead of one per tensor (a LoRA model has hundreds of adapter tensors).
  std::map<at::ScalarType, std::vector<at::Tensor>> by_dtype;
  for (auto& n : norms) by_dtype[n.scalar_type()].push_back(std::move(n));
  std::vector<at::Tensor> stacked;
  for (auto& [dtype, list] : by_dtype) stacked.push_back(at::stack(list).to(at::kDouble));
  const at::Tensor all = stacked.size() == 1 ? stacked[0] : at::cat(stacked);
  return all.square().sum().sqrt().item<double>();  // one device sync per step
}

StepOutcome optimizer_step(torch::optim::Optimizer& optimizer, double loss, double lr, const StepOptions& options,
                           StepCounters& counters) {
  StepOutcome out;
  out.grad_norm = global_grad_norm(optimizer);
  if (!std::isfinite(loss) || !std::isfinite(out.grad_norm)) {
    // Before optimizer.step(): AdamW would write the NaN into its moments and every weight, and
    // its per-parameter step count would move; none of that has happened yet.
    optimizer.zero_grad(/*set_to_none=*/!options.zero_in_place);
    FT_CHECK(options.on_nonfinite == NonFinitePolicy::Skip, "[train] step ", counters.step,
             ": non-finite ", std::isfinite(loss) ? "gradient" : "loss", " (loss ", loss, ", gradient norm ",
             out.grad_norm, ") and on_nonfinite is stop");
    ++counters.skipped;
    return out;
  }
  if (options.clip_grad_norm > 0 && out.grad_norm > options.clip_grad_norm) {
    const double scale = options.clip_grad_norm / (out.grad_norm + 1e-6);  // torch's clip_grad_norm_ epsilon
    std::vector<at::Tensor> grads = defined_grads(optimizer);
    at::_foreach_mul_(grads, scale);
  }
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
  optimizer.step();
  // Autocast caches its bf16 copy of each float32 weight that trains, keyed by the tensor and
  // kept until the cache is cleared (Python's torch.autocast clears it when its region ends).
  // The weights just changed in place: without this, a training loop inside one long autocast
  // scope would run every later forward pass on the first step's weights.
  at::autocast::clear_cache();
  optimizer.zero_grad(/*set_to_none=*/!options.zero_in_place);
  ++counters.step;
  out.applied = true;
  return out;
}

}  // namespace ft::train
