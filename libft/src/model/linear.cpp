#include "ft/model/linear.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "ft/model/cpu_ops.h"

namespace ft::model {
namespace {

// x Wᵀ for an NF4-stored W that keeps no dense copy for the backward pass: the forward pass
// dequantizes W, multiplies and drops it; the backward pass dequantizes it again for dX = dY W (as
// bitsandbytes' 4-bit matmul does). Left to plain autograd, the dequantized W of every layer would
// stay alive from the forward to the backward pass, and a QLoRA run would hold the whole base in
// its compute dtype after all. W is frozen, so there is no gradient for it.
struct NF4Matmul : public torch::autograd::Function<NF4Matmul> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const adapt::NF4Tensor& q) {
    ctx->saved_data["packed"] = q.packed;
    ctx->saved_data["absmax"] = q.absmax.defined() ? q.absmax : at::Tensor();
    ctx->saved_data["absmax_q"] = q.absmax_q.defined() ? q.absmax_q : at::Tensor();
    ctx->saved_data["absmax_scale"] = q.absmax_scale.defined() ? q.absmax_scale : at::Tensor();
    ctx->saved_data["shape"] = q.shape;
    ctx->saved_data["block"] = q.block;
    ctx->saved_data["double_quant"] = q.double_quant;
    ctx->saved_data["dq_block"] = q.dq_block;
    ctx->saved_data["absmax_offset"] = static_cast<double>(q.absmax_offset);
    ctx->saved_data["dtype"] = x.scalar_type();
    return model::linear(x, adapt::dequantize_nf4(q, x.scalar_type()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    adapt::NF4Tensor q;
    q.packed = ctx->saved_data["packed"].toTensor();
    q.absmax = ctx->saved_data["absmax"].toTensor();
    q.absmax_q = ctx->saved_data["absmax_q"].toTensor();
    q.absmax_scale = ctx->saved_data["absmax_scale"].toTensor();
    q.shape = ctx->saved_data["shape"].toIntVector();
    q.numel = 1;
    for (int64_t d : q.shape) q.numel *= d;
    q.block = ctx->saved_data["block"].toInt();
    q.double_quant = ctx->saved_data["double_quant"].toBool();
    q.dq_block = ctx->saved_data["dq_block"].toInt();
    q.absmax_offset = static_cast<float>(ctx->saved_data["absmax_offset"].toDouble());
    const at::Tensor w = adapt::dequantize_nf4(q, ctx->saved_data["dtype"].toScalarType());
    return {model::linear(grads[0], w.t()), at::Tensor()};  // dY W
  }
};

}  // namespace

LinearImpl::LinearImpl(int64_t in, int64_t out, bool with_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", at::empty({out, in}));
  if (with_bias) bias = register_parameter("bias", at::zeros({out}));
  // torch.nn.Linear's default initialisation (kaiming-uniform, a = √5: bound 1/√in), so that a
  // model built without init_weights or a checkpoint is still sane.
  at::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight.uniform_(-bound, bound);
  if (with_bias) bias.uniform_(-bound, bound);
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  if (adapter_) {
    if (at::Tensor y = adapter_->forward(x); y.defined()) return y;
  }
  at::Tensor y;
  if (nf4_ && at::GradMode::is_enabled() && x.requires_grad()) {
    y = NF4Matmul::apply(x, *nf4_);
    if (bias.defined()) y = y + bias;
  } else {
    const at::Tensor w = nf4_ ? adapt::dequantize_nf4(*nf4_, x.scalar_type()) : weight;
    y = model::linear(x, w, bias);  // oneDNN on float32 CPU tensors (ft/model/cpu_ops.h)
  }
  return adapter_ ? adapter_->apply(x, y) : y;
}

void LinearImpl::quantize_nf4(int64_t block, bool double_quant) {
  if (nf4_) return;
  nf4_ = std::make_shared<adapt::NF4Tensor>(adapt::quantize_nf4(weight, block, double_quant));
  at::NoGradGuard no_grad;
  weight.set_requires_grad(false);
  weight.set_data(at::empty({0}, weight.options()));
}

void LinearImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  move_nf4(device, non_blocking);
}

void LinearImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  move_nf4(device, non_blocking);
}

void LinearImpl::move_nf4(const torch::Device& device, bool non_blocking) {
  if (!nf4_) return;
  auto move = [&](at::Tensor& t) {
    if (t.defined()) t = t.to(device, /*non_blocking=*/non_blocking);
  };
  move(nf4_->packed);
  move(nf4_->absmax);
  move(nf4_->absmax_q);
  move(nf4_->absmax_scale);
}

at::Tensor LinearImpl::dense_weight(at::ScalarType dtype) const {
  return nf4_ ? adapt::dequantize_nf4(*nf4_, dtype) : weight.to(dtype);
}

void LinearImpl::dense_weight_into(const at::Tensor& out) const {
  if (nf4_) {
    adapt::dequantize_nf4_into(*nf4_, out);
  } else {
    out.copy_(weight);
  }
}

std::vector<at::Tensor> forward_group(const std::vector<LinearImpl*>& members, const at::Tensor& x, bool split) {
  for (LinearImpl* m : members) {
    if (m->adapter() != nullptr) return m->adapter()->forward_group(members, x, split);
  }
  return {};
}

}  // namespace ft::model
