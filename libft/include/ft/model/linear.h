#pragma once
// The linear layer of libft's models: y = x Wᵀ + b with Hugging Face's parameter names ("weight",
// "bias"), plus one hook for an adapter (adapt/lora.h) that changes the layer's output. Adapters
// register their own modules on the layer (LoRA: "lora_A", "lora_B"), so that their parameter
// names are PEFT's ("model.layers.0.self_attn.q_proj.lora_A.weight").
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <vector>

#include "ft/adapt/nf4.h"

namespace ft::model {

/// Something that turns a linear layer's output into the adapted output.
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  /// x: the layer's input (…, in); base: x Wᵀ + b (…, out) → the adapted output (…, out).
  virtual at::Tensor apply(const at::Tensor& x, const at::Tensor& base) = 0;
  /// The whole adapted layer from its input, when the adapter computes it better than apply() on
  /// the base output (LoRA's fused training path); an undefined tensor falls back to apply().
  virtual at::Tensor forward(const at::Tensor& /*x*/) { return {}; }
  /// Whether forward() wants the input in float32 under autocast (it folds work into the cast: the
  /// LoRA row kernels, the extended GEMM), so that the model does not cast it beforehand.
  virtual bool wants_float_input() const { return false; }
  /// The outputs of `members`, layers that all read x (q, k and v; gate and up; this adapter's
  /// layer among them), computed together (LoRA's grouped projections), or empty: then each layer
  /// runs its own forward(). `split`: one output per member (column views of one tensor), else the
  /// one tensor, (…, Σ out), the members' outputs side by side.
  virtual std::vector<at::Tensor> forward_group(const std::vector<class LinearImpl*>& /*members*/,
                                                const at::Tensor& /*x*/, bool /*split*/) {
    return {};
  }
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias);
  at::Tensor forward(const at::Tensor& x);

  /// The adapter consulted by forward(), or null. Not owned by the module tree: its parameters
  /// must be registered on this module by whoever attaches it.
  void set_adapter(std::shared_ptr<LinearAdapter> adapter) { adapter_ = std::move(adapter); }
  LinearAdapter* adapter() const { return adapter_.get(); }
  /// LinearAdapter::wants_float_input of the adapter, if any.
  bool wants_float_input() const { return adapter_ && adapter_->wants_float_input(); }

  /// QLoRA's frozen base: replaces the weight by its NF4 codes (adapt/nf4.h). The "weight"
  /// parameter is then an empty, frozen placeholder and forward() dequantizes on the fly (to the
  /// input's dtype). Irreversible.
  void quantize_nf4(int64_t block = 64, bool double_quant = true);
  const adapt::NF4Tensor* nf4() const { return nf4_.get(); }
  /// The weight as a dense tensor of `dtype`: the parameter, or the dequantized NF4 codes.
  at::Tensor dense_weight(at::ScalarType dtype) const;
  /// dense_weight(out's dtype) written into `out` (out_features, in_features), which may be a
  /// strided view: the NF4 codes are decoded straight into it (adapt::dequantize_nf4_into).
  void dense_weight_into(const at::Tensor& out) const;

  /// Module::to, plus the NF4 codes and maxima, which are not parameters or buffers: they follow
  /// the module to a device and keep their own dtypes under a dtype change (so a base quantized on
  /// the CPU can be moved to the GPU with the rest of the model).
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  int64_t in_features, out_features;
  at::Tensor weight;  ///< (out, in); empty once quantized
  at::Tensor bias;    ///< (out) or undefined

 private:
  void move_nf4(const torch::Device& device, bool non_blocking);
  std::shared_ptr<LinearAdapter> adapter_;
  std::shared_ptr<adapt::NF4Tensor> nf4_;
};
TORCH_MODULE(Linear);

/// The outputs of layers that all read x, from the first of them with an adapter if that adapter
/// computes them together (LinearAdapter::forward_group), else empty.
std::vector<at::Tensor> forward_group(const std::vector<LinearImpl*>& members, const at::Tensor& x, bool split = true);

}  // namespace ft::model
