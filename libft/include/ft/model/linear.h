#pragma once
// The linear layer of libft's models: y = x Wᵀ + b with Hugging Face's parameter names ("weight",
// "bias"), plus one hook for an adapter (adapt/lora.h) that changes the layer's output. Adapters
// register their own modules on the layer (LoRA: "lora_A", "lora_B"), so that their parameter
// names are PEFT's ("model.layers.0.self_attn.q_proj.lora_A.weight").
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>

namespace ft::model {

/// Something that turns a linear layer's output into the adapted output.
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  /// x: the layer's input (…, in); base: x Wᵀ + b (…, out) → the adapted output (…, out).
  virtual at::Tensor apply(const at::Tensor& x, const at::Tensor& base) = 0;
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias);
  at::Tensor forward(const at::Tensor& x);

  /// The adapter consulted by forward(), or null. Not owned by the module tree: its parameters
  /// must be registered on this module by whoever attaches it.
  void set_adapter(std::shared_ptr<LinearAdapter> adapter) { adapter_ = std::move(adapter); }
  LinearAdapter* adapter() const { return adapter_.get(); }

  int64_t in_features, out_features;
  at::Tensor weight;  ///< (out, in)
  at::Tensor bias;    ///< (out) or undefined

 private:
  std::shared_ptr<LinearAdapter> adapter_;
};
TORCH_MODULE(Linear);

}  // namespace ft::model
