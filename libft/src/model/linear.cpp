#include "ft/model/linear.h"

#include <ATen/ATen.h>

namespace ft::model {

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
  const at::Tensor w = nf4_ ? adapt::dequantize_nf4(*nf4_, x.scalar_type()) : weight;
  at::Tensor y = at::linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
  return adapter_ ? adapter_->apply(x, y) : y;
}

void LinearImpl::quantize_nf4(int64_t block, bool double_quant) {
  if (nf4_) return;
  nf4_ = std::make_shared<adapt::NF4Tensor>(adapt::quantize_nf4(weight, block, double_quant));
  at::NoGradGuard no_grad;
  weight.set_requires_grad(false);
  weight.set_data(at::empty({0}, weight.options()));
}

at::Tensor LinearImpl::dense_weight(at::ScalarType dtype) const {
  return nf4_ ? adapt::dequantize_nf4(*nf4_, dtype) : weight.to(dtype);
}

}  // namespace ft::model
