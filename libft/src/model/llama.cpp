#include "ft/model/llama.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numbers>
#include <string>

#include "ft/model/cpu_ops.h"
#include "ft/util/autocast.h"
#include "ft/util/error.h"
#include "ft/util/rng.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/cross_entropy.h"
#include "ft/kernels/rmsnorm.h"
#include "ft/kernels/sum_float.h"
#include "ft/kernels/rope.h"
#include "ft/kernels/swiglu.h"
#endif

namespace ft::model {
namespace {

// at::gelu's approximation for a GELU activation ("tanh" or "none"); "" for silu.
std::string gelu_approximation(io::Activation act) {
  return act == io::Activation::GeluTanh ? "tanh" : act == io::Activation::Gelu ? "none" : "";
}

#ifdef LIBFT_WITH_CUDA_KERNELS
// The rotary embedding through the fused CUDA kernel (CausalLMImpl::set_fused_rope): the tables are
// constants (no gradient); the input's gradient comes back in its dtype and layout.
struct RopeCuda : public torch::autograd::Function<RopeCuda> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["dtype"] = x.scalar_type();
    ctx->saved_data["strides"] = x.strides().vec();
    return kernels::rope_forward(x, cos, sin);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {kernels::rope_backward(grads[0], saved[0], saved[1], ctx->saved_data["dtype"].toScalarType(),
                                   ctx->saved_data["strides"].toIntVector()),
            at::Tensor(), at::Tensor()};
  }
};

// silu(gate) ⊙ up through the fused CUDA kernel (CausalLMImpl::set_fused_swiglu): gate and up kept,
// silu(gate) recomputed in the backward pass.
struct SwigluCuda : public torch::autograd::Function<SwigluCuda> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return kernels::swiglu_forward(gate, up);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dgate, dup] = kernels::swiglu_backward(grads[0], saved[0], saved[1]);
    return {dgate, dup};
  }
};
#endif

// swiglu_packed: silu(gate) ⊙ up on the halves of [gate | up], its gradient written as one tensor.
// The forward and backward operations are the ones autograd runs for at::silu(gate) * up (silu, mul;
// mul's two gradients, silu_backward), so the results are the same bit for bit. With `kernel` (the
// fused CUDA SwiGLU, which reads the halves in place and writes the gradient's halves) where it takes
// the operands, they are the kernel's on separate gate and up.
// With `gelu` (Gemma's GeGLU): gelu_tanh(gate) ⊙ up, likewise with gelu's operations, and no kernel.
struct SwigluPacked : public torch::autograd::Function<SwigluPacked> {
  // `gelu`: "" for silu, else at::gelu's approximation ("tanh" or "none").
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate_up, bool kernel,
                            const std::string& gelu) {
    const int64_t half = gate_up.size(-1) / 2;
    const at::Tensor gate = gate_up.narrow(-1, 0, half), up = gate_up.narrow(-1, half, half);
    ctx->save_for_backward({gate_up});
    ctx->saved_data["gelu"] = gelu;
    if (!gelu.empty()) {
      ctx->saved_data["kernel"] = false;
      return at::gelu(gate, gelu) * up;
    }
#ifdef LIBFT_WITH_CUDA_KERNELS
    kernel = kernel && kernels::swiglu_fits(gate, up);
    ctx->saved_data["kernel"] = kernel;
    if (kernel) return kernels::swiglu_forward(gate, up);
#else
    (void)kernel;
#endif
    return at::silu(gate) * up;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor gate_up = ctx->get_saved_variables()[0];
    const int64_t half = gate_up.size(-1) / 2;
    const at::Tensor gate = gate_up.narrow(-1, 0, half), up = gate_up.narrow(-1, half, half);
    const at::Tensor& dh = grads[0];
#ifdef LIBFT_WITH_CUDA_KERNELS
    if (ctx->saved_data["kernel"].toBool()) {
      at::Tensor d = at::empty(gate_up.sizes(), gate_up.options().memory_format(at::MemoryFormat::Contiguous));
      kernels::swiglu_backward_out(dh, gate, up, d.narrow(-1, 0, half), d.narrow(-1, half, half));
      return {d, at::Tensor(), at::Tensor()};
    }
#endif
    at::Tensor d = at::empty(gate_up.sizes(), gate_up.options().dtype(at::result_type(dh, gate_up)));
    at::Tensor d_gate = d.narrow(-1, 0, half), d_up = d.narrow(-1, half, half);
    if (const std::string gelu = ctx->saved_data["gelu"].toStringRef(); !gelu.empty()) {
      at::mul_out(d_up, dh, at::gelu(gate, gelu));
      at::gelu_backward_out(d_gate, dh * up, gate, gelu);
    } else {
      at::mul_out(d_up, dh, at::silu(gate));
      at::silu_backward_out(d_gate, dh * up, gate);
    }
    return {d, at::Tensor(), at::Tensor()};
  }
};

// x cast to autocast's dtype once for n projections (CausalLMImpl::set_shared_input_cast): n
// outputs sharing one copy (distinct tensors, so that each consumer has its own autograd edge);
// the backward pass sums their gradients, in the compute dtype, into x's dtype in one place.
struct SharedInputCast : public torch::autograd::Function<SharedInputCast> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t n,
                                                at::ScalarType ct) {
    ctx->saved_data["dtype"] = x.scalar_type();
    const at::Tensor y = x.to(ct);
    torch::autograd::variable_list out = {y};
    for (int64_t i = 1; i < n; ++i) out.push_back(y.detach());
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
#ifdef LIBFT_WITH_CUDA_KERNELS
    // On CUDA one pass: kernels/sum_float.cu, the chain below bit for bit.
    std::vector<at::Tensor> defined;
    for (const auto& g : grads) {
      if (g.defined()) defined.push_back(g);
    }
    if (dtype == at::kFloat && kernels::sum_to_float_fits(defined)) return {kernels::sum_to_float(defined), {}, {}};
#endif
    at::Tensor sum;  // a fresh tensor of x's dtype (the gradients the engine hands over stay untouched)
    for (const auto& g : grads) {
      if (!g.defined()) continue;
      if (!sum.defined()) {
        sum = g.to(dtype, /*non_blocking=*/false, /*copy=*/true);
      } else {
        sum.add_(g);  // float32 += the compute dtype's values, promoted in the kernel
      }
    }
    return {sum, at::Tensor(), at::Tensor()};
  }
};

// The inputs of projections that all read x: x itself for each, or (under autocast, with x in
// float32 and no reader wanting it so) one cast shared by all (SharedInputCast; without gradients
// simply the one cast).
std::vector<at::Tensor> projection_inputs(const at::Tensor& x, std::initializer_list<const LinearImpl*> readers,
                                          bool shared) {
  const auto n = static_cast<int64_t>(readers.size());
  const auto type = x.device().type();
  bool cast = shared && x.scalar_type() == at::kFloat && at::autocast::is_autocast_enabled(type) &&
              at::autocast::get_autocast_dtype(type) != at::kFloat;
  for (const LinearImpl* r : readers) cast = cast && !r->wants_float_input();
  if (!cast) return std::vector<at::Tensor>(readers.size(), x);
  const at::ScalarType ct = at::autocast::get_autocast_dtype(type);
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return std::vector<at::Tensor>(readers.size(), x.to(ct));
  return SharedInputCast::apply(x, n, ct);
}

at::Tensor rotate_half(const at::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

Linear linear(int64_t in, int64_t out, bool bias) { return Linear(in, out, bias); }

// Activation (gradient) checkpointing of one decoder block. The forward pass runs without a graph
// and keeps only the block's inputs; the backward node runs the block again with gradients enabled
// and differentiates that fresh graph with respect to the inputs and the block's trainable
// parameters, handing all of them to the engine (so parameter gradients accumulate through the
// normal path, and a block whose input needs no gradient, after frozen embeddings, still trains).
// The inputs are the hidden states and any extra tensors the block reads that may need gradients
// (a prefix's keys and values, made outside the block). The autocast state of the forward pass is
// restored for the recomputation, which runs on the engine's thread, where autocast (thread-local)
// would otherwise be off. So are the random generators' states: the recomputation replays the
// forward pass's draws (dropout), as PyTorch's checkpoint does with preserve_rng_state. (CUDA graph
// capture and checkpointing exclude each other, see the run config: a captured generator's
// offsets live on the device.) The block returns its hidden states, and after them any other
// outputs whose gradients count (a mixture-of-experts layer's router logits, for the load-balancing
// loss), each an output of the backward node.
using BlockFn = std::function<std::vector<at::Tensor>(const at::Tensor&, const std::vector<at::Tensor>&)>;


class CheckpointBackward final : public torch::autograd::Node {
 public:
  BlockFn fn;
  std::vector<at::Tensor> inputs;  // hidden states first, then the extras, detached
  std::vector<bool> input_requires_grad;
  std::vector<at::Tensor> params;
  at::Tensor rng;  // the generators' states before the forward pass (util::generator_states)
  // Autocast's thread-local state at the forward pass, for the CPU and for CUDA.
  struct Autocast {
    bool enabled[2] = {false, false};
    at::ScalarType dtype[2] = {at::kBFloat16, at::kBFloat16};
    static constexpr at::DeviceType kTypes[2] = {at::kCPU, at::kCUDA};
    static Autocast current() {
      Autocast a;
      for (int i = 0; i < 2; ++i) {
        a.enabled[i] = at::autocast::is_autocast_enabled(kTypes[i]);
        a.dtype[i] = at::autocast::get_autocast_dtype(kTypes[i]);
      }
      return a;
    }
    void apply() const {
      for (int i = 0; i < 2; ++i) {
        at::autocast::set_autocast_enabled(kTypes[i], enabled[i]);
        at::autocast::set_autocast_dtype(kTypes[i], dtype[i]);
      }
    }
  } autocast;

  std::string name() const override { return "ft::CheckpointBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(inputs.size() + params.size());
    if (std::none_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.defined(); })) return out;
    at::AutoGradMode enable(true);
    const c10::Device device = inputs[0].device();
    struct Restore {
      Autocast previous;
      at::Tensor generators;
      c10::Device device;
      ~Restore() {
        previous.apply();
        // The run's random stream goes on as if nothing was recomputed.
        util::set_generator_states(generators, device, "[checkpointing]");
      }
    } restore{Autocast::current(), util::generator_states(device), device};
    autocast.apply();
    util::set_generator_states(rng, device, "[checkpointing]");
    std::vector<at::Tensor> fresh;
    std::vector<at::Tensor> wrt;
    for (size_t i = 0; i < inputs.size(); ++i) {
      fresh.push_back(inputs[i].defined() ? inputs[i].detach().requires_grad_(input_requires_grad[i]) : at::Tensor());
      if (input_requires_grad[i]) wrt.push_back(fresh.back());
    }
    const std::vector<at::Tensor> ys = fn(fresh[0], std::vector<at::Tensor>(fresh.begin() + 1, fresh.end()));
    FT_CHECK(ys.size() == grads.size(), "[checkpointing] the recomputed block returned ", ys.size(),
             " outputs, its first pass ", grads.size());
    std::vector<at::Tensor> outputs, output_grads;  // those that an incoming gradient reaches
    for (size_t i = 0; i < ys.size(); ++i) {
      if (!grads[i].defined() || !ys[i].requires_grad()) continue;
      outputs.push_back(ys[i]);
      output_grads.push_back(grads[i]);
    }
    if (outputs.empty()) return out;
    for (const auto& p : params) wrt.push_back(p);
    const auto g = torch::autograd::grad(outputs, wrt, output_grads, /*retain_graph=*/false, /*create_graph=*/false,
                                         /*allow_unused=*/true);
    size_t k = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (input_requires_grad[i]) out[i] = g[k++];
    }
    for (size_t i = 0; i < params.size(); ++i) out[inputs.size() + i] = g[k++];
    return out;
  }

  void release_variables() override {
    inputs.clear();
    fn = nullptr;
  }
};

std::vector<at::Tensor> checkpointed(const BlockFn& fn, const at::Tensor& x, const std::vector<at::Tensor>& extras,
                                     torch::nn::Module& block) {
  std::vector<at::Tensor> params;
  for (const auto& p : block.parameters()) {
    if (p.requires_grad()) params.push_back(p);
  }
  bool any_input_grad = x.requires_grad();
  for (const auto& e : extras) any_input_grad = any_input_grad || (e.defined() && e.requires_grad());
  if (!at::GradMode::is_enabled() || (!any_input_grad && params.empty())) return fn(x, extras);
  at::Tensor rng = util::generator_states(x.device());
  std::vector<at::Tensor> ys;
  {
    at::NoGradGuard no_grad;
    ys = fn(x, extras);
  }
  auto node = std::shared_ptr<CheckpointBackward>(new CheckpointBackward(), torch::autograd::deleteNode);
  node->rng = std::move(rng);
  node->set_next_edges(torch::autograd::collect_next_edges(x, extras, params));
  node->fn = fn;
  node->inputs.push_back(x.detach());
  node->input_requires_grad.push_back(x.requires_grad());
  for (const auto& e : extras) {
    node->inputs.push_back(e.defined() ? e.detach() : at::Tensor());
    node->input_requires_grad.push_back(e.defined() && e.requires_grad());
  }
  node->params = std::move(params);
  node->autocast = CheckpointBackward::Autocast::current();
  for (auto& y : ys) torch::autograd::create_gradient_edge(y, node);  // outputs 0, 1, ... in order
  return ys;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, bool unit_offset_, bool float_product_)
    : eps(eps_), unit_offset(unit_offset_), float_product(float_product_) {
  weight = register_parameter("weight", unit_offset ? at::zeros({dim}) : at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  if (unit_offset || float_product) {
    // Gemma: x̂ · (1 + w). Where x and w are float32 (or float64) the product is the same whether
    // the cast comes before or after it, so the fused forms take (1 + w) as their weight; in a
    // lower precision only the reference rounds where Gemma does.
    const bool wide = (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                      x.scalar_type() == weight.scalar_type();
    const at::Tensor w = unit_offset ? weight + 1.0 : weight;
    if (wide && x.is_cuda()) {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
      return at::rms_norm(x, {x.size(-1)}, w, eps);
    }
    if (wide && rms_norm_fusable(x, weight)) return fused_rms_norm(x, w, eps);
    return reference(x);
  }
#ifdef LIBFT_WITH_CUDA_KERNELS
  // libft's kernel has no backward: it serves inference (generation, evaluation), in eval mode only:
  // activation checkpointing's first pass of a training step also runs without gradients, and its
  // recomputation (with gradients) takes ATen's RMSNorm, whose reduction order differs, so that the
  // first pass must take it too for the recomputation to replay it exactly.
  if (x.is_cuda() && !is_training() && !at::GradMode::is_enabled() && x.is_contiguous()) {
    return kernels::rmsnorm_forward(x, weight, eps);
  }
#endif
  // Training on CUDA: ATen's fused RMSNorm (_fused_rms_norm: one kernel forward, one backward, the
  // statistics in float32) instead of the reference's chain of about eight kernels forward and ten
  // backward, each a launch and a pass over x. The same formula; where x and the weight differ in
  // dtype (the reference promotes), the reference.
  if (x.is_cuda() && x.scalar_type() == weight.scalar_type() && x.scalar_type() != at::kDouble) {
    // In x's dtype whatever autocast's lists say, as the reference computes (float32 statistics).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
    return at::rms_norm(x, {x.size(-1)}, weight, eps);
  }
  if (rms_norm_fusable(x, weight)) return fused_rms_norm(x, weight, eps);
  return reference(x);
}

at::Tensor RMSNormImpl::reference(const at::Tensor& x) {
  // float32 statistics as HF computes them; float64 models (reference tests) stay in float64.
  const at::ScalarType wide = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor h = x.to(wide);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  if (unit_offset) return (h * (weight.to(wide) + 1.0)).to(x.scalar_type());
  if (float_product) return (weight.to(wide) * h).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

// ------------------------------------------------------------------------------------------------
at::Tensor rope_inv_freq(const ModelConfig& c, bool long_factors) {
  return rope_inv_freq(c.rope, c.rotary_dim(), long_factors);
}

at::Tensor rope_inv_freq(const io::RopeConfig& rope, int64_t dim, bool long_factors) {
  at::Tensor exponents = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim);
  at::Tensor inv_freq = 1.0 / at::pow(rope.theta, exponents);
  switch (rope.type) {
    case io::RopeType::Default: return inv_freq;
    case io::RopeType::Linear: return inv_freq / rope.factor;
    case io::RopeType::Llama3: {
      // Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
      const double old_len = static_cast<double>(rope.original_max_position_embeddings);
      const double low_wavelen = old_len / rope.low_freq_factor;
      const double high_wavelen = old_len / rope.high_freq_factor;
      at::Tensor wavelen = 2 * std::numbers::pi / inv_freq;
      at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq);
      at::Tensor smooth = (old_len / wavelen - rope.low_freq_factor) /
                          (rope.high_freq_factor - rope.low_freq_factor);
      at::Tensor smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled;
      at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
      return at::where(medium, smoothed, scaled);
    }
    case io::RopeType::LongRope: {
      // Phi-3: each frequency's own divisor, short or long (transformers' float32 arithmetic).
      const std::vector<double>& f = long_factors ? rope.long_factor : rope.short_factor;
      FT_CHECK(static_cast<int64_t>(f.size()) == dim / 2, "[model] longrope needs ", dim / 2, " factors, got ",
               f.size());
      return 1.0 / (at::tensor(f, at::kDouble).to(at::kFloat) * at::pow(rope.theta, exponents));
    }
    case io::RopeType::Yarn: {
      // YaRN: frequencies that turn more than beta_fast times over the original context keep their
      // own, those turning fewer than beta_slow times are divided by `factor`, and a linear ramp
      // over the dimensions between blends the two (transformers' float32 arithmetic; the ramp's
      // ends in double, as Python's math computes them).
      const double d = static_cast<double>(dim);
      const double original = static_cast<double>(rope.original_max_position_embeddings);
      auto correction_dim = [&](double rotations) {
        return d * std::log(original / (rotations * 2 * std::numbers::pi)) / (2 * std::log(rope.theta));
      };
      double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
      if (rope.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, d - 1);
      if (low == high) high += 0.001;  // (transformers' guard against a zero-width ramp)
      at::Tensor pos_freqs = at::pow(rope.theta, exponents);
      at::Tensor extrapolation = 1.0 / pos_freqs;
      at::Tensor interpolation = 1.0 / (rope.factor * pos_freqs);
      at::Tensor ramp = ((at::arange(dim / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
      at::Tensor keep = 1 - ramp;  // the share of each frequency's own (extrapolated) value
      return interpolation * (1 - keep) + extrapolation * keep;
    }
  }
  FT_FAIL("[model] unknown rope type");
}

// ------------------------------------------------------------------------------------------------
AttentionImpl::AttentionImpl(const ModelConfig& c, int64_t window_, bool rope)
    : heads(c.num_attention_heads),
      kv_heads(c.num_key_value_heads),
      head_dim(c.head_dim),
      window(window_),
      rotary_dim(c.rotary_dim()),
      use_rope(rope),
      scale(c.attention_scale()),
      default_scale(c.attention_multiplier <= 0 &&
                    (c.query_pre_attn_scalar <= 0 || c.query_pre_attn_scalar == static_cast<double>(c.head_dim))),
      softcap(c.attn_logit_softcapping),
      dropout(c.attention_dropout),
      clip_qkv(c.clip_qkv) {
  if (c.packed_projections()) {
    qkv_proj = register_module("qkv_proj", linear(c.hidden_size, (heads + 2 * kv_heads) * head_dim, c.qkv_bias));
  } else {
    q_proj = register_module("q_proj", linear(c.hidden_size, heads * head_dim, c.qkv_bias));
    k_proj = register_module("k_proj", linear(c.hidden_size, kv_heads * head_dim, c.qkv_bias));
    v_proj = register_module("v_proj", linear(c.hidden_size, kv_heads * head_dim, c.qkv_bias));
  }
  o_proj = register_module("o_proj", linear(heads * head_dim, c.hidden_size, c.o_bias));
  if (c.qk_norm_full_width()) {  // OLMo 2 and OLMoE: over all the queries, all the keys
    qk_norm_full_width = true;
    // (OLMo 2's norms take the weight's product in float32, OLMoE's in the input's dtype, as Llama's)
    q_norm = register_module("q_norm", RMSNorm(heads * head_dim, c.rms_norm_eps, false, c.olmo()));
    k_norm = register_module("k_norm", RMSNorm(kv_heads * head_dim, c.rms_norm_eps, false, c.olmo()));
  } else if (c.qk_norm()) {
    q_norm = register_module("q_norm", RMSNorm(head_dim, c.rms_norm_eps, c.norm_unit_offset()));
    k_norm = register_module("k_norm", RMSNorm(head_dim, c.rms_norm_eps, c.norm_unit_offset()));
  }
  if (c.attention_sinks()) sinks = register_parameter("sinks", at::zeros({heads}));
}

namespace {
// Attention whose scores are materialised (materialized_attention below: Gemma 2's soft-capped
// scores, gpt-oss's attention sinks) as an autograd function that keeps only q, k, v, the sinks
// and the mask: the (B, H, T, S) scores, probabilities and their casts, which autograd would keep
// for every layer (transformers' eager attention does: about 0.25 GiB per layer of gemma-2-2b at
// 2048 tokens), are recomputed in the backward pass, a block of query rows at a time.
struct MaterializedAttention : public torch::autograd::Function<MaterializedAttention> {
  // (The mask travels here, not as an input: autograd's functions take no undefined inputs. The
  // sinks are an input, for their gradient: an empty tensor where there are none.)
  struct Args {
    at::Tensor mask;
    bool causal;
    double scale, cap;  // cap 0: none
    int64_t rows;  // query rows per block
  };

  // Block [t0, t1) of the query rows: the keys each row may not see (undefined: none).
  static at::Tensor hidden(const at::Tensor& mask, bool causal, int64_t t0, int64_t t1, int64_t S,
                           const at::TensorOptions& o) {
    if (mask.defined()) return mask.slice(2, t0, t1).logical_not();
    if (!causal) return {};
    const auto idx = o.dtype(at::kLong);
    return at::arange(0, S, idx).view({1, S}) > at::arange(t0, t1, idx).view({t1 - t0, 1});
  }

  struct Probabilities {
    at::Tensor t;       // the soft-capped scores' tanh (undefined without a cap)
    at::Tensor p;       // (B, H, rows, S), float32 (float64 for float64 models)
    at::Tensor p_sink;  // (B, H, rows): the sinks' share (undefined without sinks)
  };

  // One block's probabilities, as the forward pass made them.
  static Probabilities probabilities(const at::Tensor& qb, const at::Tensor& keys, const at::Tensor& sinks,
                                     const at::Tensor& hide, const Args& a) {
    // (in transformers' order: each step rounds to the scores' dtype as it does there)
    Probabilities out;
    at::Tensor scores = at::matmul(qb, keys.transpose(2, 3)) * a.scale;
    if (a.cap > 0) {
      out.t = at::tanh(scores / a.cap);
      scores = out.t * a.cap;
    }
    if (hide.defined()) scores.masked_fill_(hide, -std::numeric_limits<double>::infinity());
    const at::ScalarType wide = qb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    if (sinks.numel() == 0) {
      out.p = at::softmax(scores, -1, wide);
      return out;
    }
    const int64_t B = qb.size(0), H = qb.size(1), rows = qb.size(2), S = keys.size(2);
    const at::Tensor sink = sinks.to(scores.scalar_type()).view({1, H, 1, 1}).expand({B, H, rows, 1});
    const at::Tensor p = at::softmax(at::cat({scores, sink}, -1), -1, wide);
    out.p = p.narrow(-1, 0, S);
    out.p_sink = p.select(-1, S);
    return out;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& sinks, const Args& a) {
    // In autocast's dtype where it is on (the matmuls' dtype in transformers), with autocast off
    // inside: every op below runs in the dtype written.
    const at::ScalarType ct = util::compute_dtype(q);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor qc = q.to(ct), kc = k.to(ct), vc = v.to(ct);
    const int64_t rep = q.size(1) / k.size(1), T = q.size(2), S = k.size(2);
    const at::Tensor keys = rep == 1 ? kc : kc.repeat_interleave(rep, 1);
    const at::Tensor values = rep == 1 ? vc : vc.repeat_interleave(rep, 1);
    std::vector<at::Tensor> out;
    for (int64_t t0 = 0; t0 < T; t0 += a.rows) {
      const int64_t t1 = std::min(T, t0 + a.rows);
      const at::Tensor hide = hidden(a.mask, a.causal, t0, t1, S, q.options());
      const at::Tensor p = probabilities(qc.slice(2, t0, t1), keys, sinks, hide, a).p;
      out.push_back(at::matmul(p.to(ct), values));
    }
    ctx->save_for_backward({qc, kc, vc, sinks});
    ctx->saved_data["mask"] = a.mask;
    ctx->saved_data["causal"] = a.causal;
    ctx->saved_data["scale"] = a.scale;
    ctx->saved_data["cap"] = a.cap;
    ctx->saved_data["rows"] = a.rows;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(q.scalar_type()),
                                                     static_cast<int64_t>(k.scalar_type()),
                                                     static_cast<int64_t>(v.scalar_type())};
    return out.size() == 1 ? out[0] : at::cat(out, 2);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &sinks = saved[3];
    const at::IValue& saved_mask = ctx->saved_data["mask"];
    const at::Tensor mask = saved_mask.isTensor() ? saved_mask.toTensor() : at::Tensor();
    const Args a{mask, ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                 ctx->saved_data["cap"].toDouble(), ctx->saved_data["rows"].toInt()};
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const at::ScalarType ct = q.scalar_type();
    const int64_t B = q.size(0), H = q.size(1), G = k.size(1), rep = H / G, T = q.size(2), S = k.size(2),
                  D = q.size(3);
    const at::Tensor keys = rep == 1 ? k : k.repeat_interleave(rep, 1);
    const at::Tensor values = rep == 1 ? v : v.repeat_interleave(rep, 1);
    const at::Tensor dout = grads[0].to(ct);
    at::Tensor dq = at::empty_like(q), dkeys = at::zeros_like(keys), dvalues = at::zeros_like(values);
    at::Tensor dsinks;
    for (int64_t t0 = 0; t0 < T; t0 += a.rows) {
      const int64_t t1 = std::min(T, t0 + a.rows);
      const at::Tensor qb = q.slice(2, t0, t1), dob = dout.slice(2, t0, t1);
      const at::Tensor hide = hidden(mask, a.causal, t0, t1, S, q.options());
      const Probabilities pr = probabilities(qb, keys, sinks, hide, a);
      const at::Tensor& p = pr.p;
      const at::Tensor pc = p.to(ct);
      dvalues.add_(at::matmul(pc.transpose(2, 3), dob));
      // Back through the cast to ct and the wide softmax, to the scores' dtype (zero where masked,
      // as p is). With sinks, the dropped sink column has no gradient of its own: each score's is
      // still p · (dp − Σ p·dp) over the kept columns (what _softmax_backward_data computes, the
      // kept p summing to less than one), and the sink's −p_sink · Σ p·dp.
      const at::Tensor dp = at::matmul(dob, values.transpose(2, 3)).to(p.scalar_type());
      if (pr.p_sink.defined()) {
        const at::Tensor dsink = -(pr.p_sink * (p * dp).sum(-1)).sum(at::IntArrayRef{0, 2});  // (H)
        dsinks = dsinks.defined() ? dsinks + dsink : dsink;
      }
      const at::Tensor dscores_capped = at::_softmax_backward_data(dp, p, -1, p.scalar_type()).to(ct);
      // The cap (cap · tanh(s / cap): the two factors of cap cancel) and the scale.
      const at::Tensor dscores = (a.cap > 0 ? at::tanh_backward(dscores_capped, pr.t) : dscores_capped).mul_(a.scale);
      dq.slice(2, t0, t1).copy_(at::matmul(dscores, keys));
      dkeys.add_(at::matmul(dscores.transpose(2, 3), qb));
    }
    at::Tensor dk = rep == 1 ? dkeys : dkeys.view({B, G, rep, S, D}).sum(2);
    at::Tensor dv = rep == 1 ? dvalues : dvalues.view({B, G, rep, S, D}).sum(2);
    auto as = [&](const at::Tensor& g, int i) { return g.to(static_cast<at::ScalarType>(dtypes[i])); };
    return {as(dq, 0), as(dk, 1), as(dv, 2), dsinks.defined() ? dsinks.to(sinks.scalar_type()) : at::Tensor(),
            at::Tensor()};
  }
};

// gpt-oss's sinks on flash attention's log-sum-exp (sink_flash_attention in llama.h). The heads are
// dim 1 of the CPU kernel's (B, H, T) lse and (B, H, T, D) output; on CUDA they are dim −2 of the
// output ((B, T, H, D) or (N, H, D)) and of the lse ((B, H, T) or (H, N)).
struct SinkFlashAttention : public torch::autograd::Function<SinkFlashAttention> {
  struct Args {
    at::Tensor mask;        // CPU: additive (B or 1, 1, T, S) in the compute dtype, or undefined
    at::Tensor cu_seqlens;  // CUDA: packed runs, or undefined
    int64_t max_seqlen;
    bool causal;
    double scale;
    int64_t window;  // CUDA: keys within `window` positions; 0: all
  };

  // g = sigmoid(lse − sink), laid out as the output's rows (without its last dimension).
  static at::Tensor gate(const at::Tensor& lse, const at::Tensor& sinks, bool cuda) {
    const int64_t H = sinks.size(0);
    const at::ScalarType wide = lse.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const bool packed = lse.dim() == 2;  // CUDA's (H, N)
    const at::Tensor s = sinks.to(wide).view(packed ? std::vector<int64_t>{H, 1} : std::vector<int64_t>{1, H, 1});
    const at::Tensor g = at::sigmoid(lse.to(wide) - s);
    return cuda ? g.transpose(-1, -2) : g;
  }

  static std::optional<int64_t> left(const Args& a) { return a.window > 0 ? std::optional<int64_t>(a.window - 1) : std::nullopt; }
  static std::optional<int64_t> right(const Args& a) { return a.window > 0 ? std::optional<int64_t>(0) : std::nullopt; }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& sinks, const Args& a) {
    const bool cuda = q.is_cuda();
    const at::ScalarType ct = util::compute_dtype(q);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor qc = q.to(ct), kc = k.to(ct), vc = v.to(ct);
    at::Tensor out, lse, rng, unused;
    if (cuda) {
      const std::optional<at::Tensor> cu = a.cu_seqlens.defined() ? std::optional<at::Tensor>(a.cu_seqlens) : std::nullopt;
      const int64_t max_q = a.cu_seqlens.defined() ? a.max_seqlen : q.size(1), max_k = a.cu_seqlens.defined() ? a.max_seqlen : k.size(1);
      std::tie(out, lse, rng, unused, std::ignore) = at::_flash_attention_forward(
          qc, kc, vc, cu, cu, max_q, max_k, 0.0, a.causal, /*return_debug_mask=*/false, a.scale, left(a), right(a));
      FT_CHECK(lse.dim() == (a.cu_seqlens.defined() ? 2 : 3) && lse.size(a.cu_seqlens.defined() ? 0 : 1) == q.size(-2),
               "[model] sink_flash_attention: flash attention's log-sum-exp has an unexpected shape ", lse.sizes());
    } else {
      const int64_t rep = q.size(1) / k.size(1);
      const at::Tensor keys = rep == 1 ? kc : kc.repeat_interleave(rep, 1);
      const at::Tensor values = rep == 1 ? vc : vc.repeat_interleave(rep, 1);
      std::optional<at::Tensor> mask;
      if (a.mask.defined()) mask = a.mask;
      std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(qc, keys, values, 0.0, a.causal, mask, a.scale);
    }
    const at::Tensor g = gate(lse, sinks, cuda);
    ctx->save_for_backward({qc, kc, vc, sinks, out, lse, rng, unused});
    ctx->saved_data["mask"] = a.mask;
    ctx->saved_data["cu_seqlens"] = a.cu_seqlens;
    ctx->saved_data["max_seqlen"] = a.max_seqlen;
    ctx->saved_data["causal"] = a.causal;
    ctx->saved_data["scale"] = a.scale;
    ctx->saved_data["window"] = a.window;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(q.scalar_type()),
                                                     static_cast<int64_t>(k.scalar_type()),
                                                     static_cast<int64_t>(v.scalar_type())};
    return (out.to(g.scalar_type()) * g.unsqueeze(-1)).to(ct);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &sinks = saved[3], &out = saved[4], &lse = saved[5];
    auto tensor_of = [&](const char* key) {
      const at::IValue& x = ctx->saved_data[key];
      return x.isTensor() ? x.toTensor() : at::Tensor();
    };
    const Args a{tensor_of("mask"),
                 tensor_of("cu_seqlens"),
                 ctx->saved_data["max_seqlen"].toInt(),
                 ctx->saved_data["causal"].toBool(),
                 ctx->saved_data["scale"].toDouble(),
                 ctx->saved_data["window"].toInt()};
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const bool cuda = q.is_cuda();
    const at::ScalarType ct = q.scalar_type();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor g = gate(lse, sinks, cuda);  // the rows' layout
    const at::Tensor dy = grads[0].to(g.scalar_type());
    const at::Tensor o = out.to(g.scalar_type());
    const at::Tensor gy = (dy * g.unsqueeze(-1)).to(ct), go = (o * g.unsqueeze(-1)).to(ct);
    at::Tensor dq, dk, dv;
    if (cuda) {
      const int64_t max_q = a.cu_seqlens.defined() ? a.max_seqlen : q.size(1), max_k = a.cu_seqlens.defined() ? a.max_seqlen : k.size(1);
      std::tie(dq, dk, dv) = at::_flash_attention_backward(gy, q, k, v, go, lse, a.cu_seqlens, a.cu_seqlens, max_q, max_k, 0.0,
                                                           a.causal, saved[6], saved[7], a.scale, left(a), right(a));
    } else {
      const int64_t B = q.size(0), G = k.size(1), rep = q.size(1) / G, S = k.size(2), D = q.size(3);
      const at::Tensor keys = rep == 1 ? k : k.repeat_interleave(rep, 1);
      const at::Tensor values = rep == 1 ? v : v.repeat_interleave(rep, 1);
      std::optional<at::Tensor> mask;
      if (a.mask.defined()) mask = a.mask;
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(gy, q, keys, values, go, lse, 0.0,
                                                                                   a.causal, mask, a.scale);
      if (rep > 1) {
        dk = dk.view({B, G, rep, S, D}).sum(2);
        dv = dv.view({B, G, rep, S, D}).sum(2);
      }
    }
    // dsink: −Σ (Σ dy·o) · g(1 − g) over every row of its head.
    const int64_t H = sinks.size(0);
    at::Tensor term = (dy * o).sum(-1) * g * (1 - g);  // the rows' layout
    if (!cuda) term = term.transpose(1, 2);           // heads last
    const at::Tensor dsinks = -term.reshape({-1, H}).sum(0);
    auto as = [&](const at::Tensor& t, int i) { return t.to(static_cast<at::ScalarType>(dtypes[i])); };
    return {as(dq, 0), as(dk, 1), as(dv, 2), dsinks.to(sinks.scalar_type()), at::Tensor()};
  }
};

// Whether this layer's rotary embedding takes the fused CUDA kernel: asked for, float32 tables (so
// the kernel's float32 arithmetic is the formula's), and no KV cache (whose keys keep the formula's
// dtype).
bool fused_rope_fits(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor* cache_k) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  return in.fused_rope && cache_k == nullptr && kernels::rope_fits(q, cos, sin) && kernels::rope_fits(k, cos, sin);
#else
  (void)in, (void)q, (void)k, (void)cos, (void)sin, (void)cache_k;
  return false;
#endif
}
}  // namespace

at::Tensor swiglu_packed(const at::Tensor& gate_up, bool fused_kernel, io::Activation act) {
  FT_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "[model] swiglu_packed: needs [gate | up] (…, 2·I), got ",
           gate_up.sizes());
  const std::string gelu = gelu_approximation(act);
  return SwigluPacked::apply(gate_up, fused_kernel && gelu.empty() && gate_up.is_cuda(), gelu);
}

at::Tensor materialized_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                  bool causal, double scale, double cap, const at::Tensor& sinks, int64_t max_scores) {
  FT_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3) &&
               k.size(1) > 0 && q.size(1) % k.size(1) == 0,
           "[model] attention: q (B, H, T, D) and k, v (B, G, S, D) with G dividing H, got ", q.sizes(), ", ",
           k.sizes(), ", ", v.sizes());
  FT_CHECK(!mask.defined() || (mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(2) == q.size(2) &&
                               mask.size(3) == k.size(2)),
           "[model] attention: the mask must be (B or 1, 1, T, S) bool, got ", mask.sizes());
  FT_CHECK(!causal || mask.defined() || q.size(2) == k.size(2), "[model] attention: causal needs T = S");
  FT_CHECK(cap >= 0 && max_scores > 0, "[model] attention: cap must be >= 0 and max_scores > 0");
  FT_CHECK(!sinks.defined() || (sinks.dim() == 1 && sinks.size(0) == q.size(1)), "[model] attention: the sinks must be (H) = (",
           q.size(1), "), got ", sinks.sizes());
  const int64_t per_row = std::max<int64_t>(1, q.size(0) * q.size(1) * k.size(2));
  const int64_t rows = std::clamp<int64_t>(max_scores / per_row, 1, std::max<int64_t>(1, q.size(2)));
  const at::Tensor sink_input = sinks.defined() ? sinks : at::empty({0}, q.options());
  return MaterializedAttention::apply(q, k, v, sink_input, MaterializedAttention::Args{mask, causal, scale, cap, rows});
}

at::Tensor sink_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                bool causal, double scale, const at::Tensor& sinks, int64_t window,
                                const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  const bool cuda = q.is_cuda();
  const int64_t dims = cuda && cu_seqlens.defined() ? 3 : 4;
  FT_CHECK(q.dim() == dims && k.dim() == dims && v.sizes() == k.sizes() && q.size(-1) == k.size(-1),
           "[model] sink_flash_attention: q, k, v of ", dims, " dimensions with k's shape v's, got ", q.sizes(), ", ",
           k.sizes(), ", ", v.sizes());
  const int64_t head_dim = cuda ? q.dim() - 2 : 1;  // where the heads are
  const int64_t H = q.size(head_dim), G = k.size(head_dim);
  FT_CHECK(G > 0 && H % G == 0, "[model] sink_flash_attention: ", G, " key/value heads do not divide ", H, " query heads");
  FT_CHECK(sinks.defined() && sinks.dim() == 1 && sinks.size(0) == H, "[model] sink_flash_attention: the sinks must be (H) = (",
           H, "), got ", sinks.defined() ? sinks.sizes() : at::IntArrayRef{});
  SinkFlashAttention::Args a{at::Tensor(), cu_seqlens, max_seqlen, causal, scale, window};
  if (cuda) {
    FT_CHECK(!mask.defined(), "[model] sink_flash_attention: CUDA's flash attention takes no mask (pack the rows)");
    const at::ScalarType ct = util::compute_dtype(q);
    FT_CHECK(ct == at::kBFloat16 || ct == at::kHalf, "[model] sink_flash_attention: CUDA needs bf16 or fp16, got ", ct);
    FT_CHECK(!cu_seqlens.defined() || (max_seqlen > 0 && causal),
             "[model] sink_flash_attention: packed runs are causal and need their longest length");
  } else {
    FT_CHECK(window == 0 && !cu_seqlens.defined(),
             "[model] sink_flash_attention: on the CPU windows and padding come in the mask");
    FT_CHECK(!mask.defined() || (mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(2) == q.size(2) &&
                                 mask.size(3) == k.size(2)),
             "[model] sink_flash_attention: the mask must be (B or 1, 1, T, S) bool, got ", mask.sizes());
    FT_CHECK(!causal || mask.defined() || q.size(2) == k.size(2), "[model] sink_flash_attention: causal needs T = S");
    if (mask.defined()) {
      // The kernel takes an additive mask. A row that sees no key comes out 0 with a log-sum-exp of
      // 0, as materialized_attention's does (only its sink left, which carries no value), and its
      // gradients are 0.
      a.mask = at::zeros(mask.sizes(), q.options().dtype(util::compute_dtype(q)))
                   .masked_fill_(mask.logical_not(), -std::numeric_limits<double>::infinity());
      a.causal = false;
    }
  }
  return SinkFlashAttention::apply(q, k, v, sinks, a);
}

at::Tensor softcapped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                bool causal, double scale, double cap, int64_t max_scores) {
  FT_CHECK(cap > 0, "[model] softcapped_attention: cap must be > 0");
  return materialized_attention(q, k, v, mask, causal, scale, cap, at::Tensor(), max_scores);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const AttentionInputs& in, at::Tensor* cache_k,
                                  at::Tensor* cache_v, const at::Tensor& prefix_k, const at::Tensor& prefix_v) {
  const int64_t B = x.size(0), T = x.size(1);
  std::vector<at::Tensor> qkv;
  if (qkv_proj) {
    // Phi-3: one projection, [q | k | v] along its output.
    qkv = qkv_proj(x).split_with_sizes({heads * head_dim, kv_heads * head_dim, kv_heads * head_dim}, -1);
  } else {
    // One node for the three (LoRA's grouped projections: column views of one output), or each its own.
    qkv = forward_group({q_proj.get(), k_proj.get(), v_proj.get()}, x);
  }
  if (qkv.empty()) {
    const auto xs = projection_inputs(x, {q_proj.get(), k_proj.get(), v_proj.get()}, shared_input_cast);
    qkv = {q_proj(xs[0]), k_proj(xs[1]), v_proj(xs[2])};
  }
  if (q_norm && qk_norm_full_width) {  // OLMo 2 and OLMoE: before the split into heads
    qkv[0] = q_norm(qkv[0]);
    qkv[1] = k_norm(qkv[1]);
  }
  if (clip_qkv > 0) {  // OLMoE's clip_qkv, after the norms
    for (auto& t : qkv) t = t.clamp(-clip_qkv, clip_qkv);
  }
  at::Tensor q = qkv[0].view({B, T, heads, head_dim});
  at::Tensor k = qkv[1].view({B, T, kv_heads, head_dim});
  if (q_norm && !qk_norm_full_width) {  // Qwen3: over each head's D values, before the rotary embedding (the cache keeps normed keys)
    q = q_norm(q);
    k = k_norm(k);
  }
  q = q.transpose(1, 2);  // (B, H, T, D)
  k = k.transpose(1, 2);  // (B, G, T, D)
  at::Tensor v = qkv[2].view({B, T, kv_heads, head_dim}).transpose(1, 2);  // (B, G, T, D)
  // (B, 1, T, D); Gemma 3's sliding-window layers have tables of their own
  const bool own_tables = window > 0 && in.sliding_cos.defined();
  at::Tensor cos = (own_tables ? in.sliding_cos : in.cos).unsqueeze(1);
  at::Tensor sin = (own_tables ? in.sliding_sin : in.sin).unsqueeze(1);
  // Short packed sequences on the CPU: the grouped GEMM path below, which wants q and k contiguous
  // as (B, H, T, D), and the fused rotary embedding writes them so.
  const at::Tensor& mask = in.masks.at(window);
  // Dropout on the attention probabilities in training mode (SDPA's and flash attention's own).
  const double dropout_p = is_training() ? dropout : 0.0;
  const bool grouped = !materialized() && dropout_p == 0 && cache_k == nullptr && !prefix_k.defined() && grouped_attention_fits(q, k, v, mask);
  bool q_scaled = false;
  if (!use_rope) {
    // SmolLM3's NoPE layers: positions reach attention through causality alone.
  } else if (rotary_dim < head_dim) {
    // Phi-4-mini's partial rotary embedding: the first rotary_dim dimensions turn, the rest pass
    // through, as transformers computes it.
    auto turn = [&](const at::Tensor& t) {
      const at::Tensor r = t.narrow(-1, 0, rotary_dim);
      return at::cat({r * cos + rotate_half(r) * sin, t.narrow(-1, rotary_dim, head_dim - rotary_dim)}, -1);
    };
    q = turn(q);
    k = turn(k);
  } else if (rope_fusable(q, cos, sin) && rope_fusable(k, cos, sin)) {
    q_scaled = grouped;  // the grouped path takes its 1/√D here, in the queries' rotation
    q = fused_rope(q, cos, sin, grouped, q_scaled ? scale : 1.0);
    k = fused_rope(k, cos, sin, grouped);
  } else if (fused_rope_fits(in, q, k, cos, sin, cache_k)) {
#ifdef LIBFT_WITH_CUDA_KERNELS
    q = RopeCuda::apply(q, cos, sin);
    k = RopeCuda::apply(k, cos, sin);
#endif
  } else {
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
  }
  if (cache_k != nullptr) {
    if (cache_k->defined()) {
      // A prefix put into the cache keeps its parameters' dtype; new keys may be autocast's.
      k = at::cat({cache_k->to(k.scalar_type()), k}, 2);  // (B, G, S, D)
      v = at::cat({cache_v->to(v.scalar_type()), v}, 2);
    }
    *cache_k = k;
    *cache_v = v;
  } else if (prefix_k.defined()) {
    k = at::cat({prefix_k.to(k.scalar_type()).unsqueeze(0).expand({B, -1, -1, -1}), k}, 2);  // (B, G, P+T, D)
    v = at::cat({prefix_v.to(v.scalar_type()).unsqueeze(0).expand({B, -1, -1, -1}), v}, 2);
  }
  at::Tensor out;
  // (CausalLMImpl::hidden_states sets no variable-length runs for a soft-capping model: it has masks.)
  const bool sink_flash = sinks.defined() && softcap == 0 && flash_sinks && dropout_p == 0 && cache_k == nullptr &&
                          !prefix_k.defined();
  FT_CHECK(!materialized() || sink_flash || !in.cu_seqlens.defined(),
           "[model] soft-capped attention and materialised attention sinks have no variable-length form");
  if (in.cu_seqlens.defined() && cache_k == nullptr && !prefix_k.defined()) {
    // Packed rows on CUDA: flash attention over each run of the flattened (B·T, heads, D) tokens,
    // causal within it (and windowed: a key within `window` positions, as the masks below say). In
    // v's dtype (the projections' bf16 or fp16): under autocast the rotary products come out in
    // float32, and SDPA would cast them back just so.
    auto flat = [&](const at::Tensor& t, int64_t h) {
      return t.transpose(1, 2).reshape({B * T, h, head_dim}).to(v.scalar_type());
    };
    if (sink_flash) {
      out = sink_flash_attention(flat(q, heads), flat(k, kv_heads), flat(v, kv_heads), {}, true, scale, sinks, window,
                                 in.cu_seqlens, in.max_seqlen);
      return o_proj(out.view({B, T, heads * head_dim}));
    }
    std::optional<int64_t> left, right;
    if (window > 0) {
      left = window - 1;
      right = 0;
    }
    out = std::get<0>(at::_flash_attention_forward(flat(q, heads), flat(k, kv_heads), flat(v, kv_heads), in.cu_seqlens,
                                                   in.cu_seqlens, in.max_seqlen, in.max_seqlen, dropout_p,
                                                   /*is_causal=*/true, /*return_debug_mask=*/false, scale, left, right));
    return o_proj(out.view({B, T, heads * head_dim}));
  }
  const at::ScalarType ct = util::compute_dtype(q);
  if (sink_flash && !q.is_cuda()) {
    out = sink_flash_attention(q, k, v, mask, !mask.defined() && in.causal, scale, sinks);
  } else if (sink_flash && !mask.defined() && in.causal && q.size(2) == k.size(2) &&
             (ct == at::kBFloat16 || ct == at::kHalf)) {
    // CUDA, rows without padding: flash attention's (B, T, H, D) layout, windowed in the kernel.
    out = sink_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, true, scale, sinks, window)
              .transpose(1, 2);
  } else if (materialized()) {
    FT_CHECK(dropout_p == 0, "[model] attention dropout with soft-capped attention scores or attention sinks is not supported");
    out = materialized_attention(q, k, v, mask, !mask.defined() && in.causal, scale, softcap, sinks);
  } else if (grouped) {
    at::Tensor& bias = in.grouped_bias[window];
    if (!bias.defined()) bias = grouped_attention_bias(mask, kv_heads, heads / kv_heads, q.scalar_type());
    out = grouped_attention(q, k, v, bias, q_scaled ? 1.0 : scale);
  } else {
    std::optional<at::Tensor> attn_mask;
    if (mask.defined()) attn_mask = mask;
    out = at::scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, !mask.defined() && in.causal,
                                           default_scale ? std::nullopt : std::optional<double>(scale),
                                           /*enable_gqa=*/kv_heads != heads);
  }
  out = out.transpose(1, 2).reshape({B, T, heads * head_dim});
  return o_proj(out);
}

// ------------------------------------------------------------------------------------------------
MLPImpl::MLPImpl(const ModelConfig& c) : act(c.hidden_act) {
  if (c.packed_projections()) {
    gate_up_proj = register_module("gate_up_proj", linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias));
  } else {
    gate_proj = register_module("gate_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
  }
  down_proj = register_module("down_proj", linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
}

MLPImpl::MLPImpl(const ModelConfig& c, int64_t intermediate) : act(c.hidden_act) {
  const bool mixtral = c.mixtral();
  const bool bias = c.gpt_oss();  // (gpt-oss's experts have biases)
  gate_proj = register_module(mixtral ? "w1" : "gate_proj", linear(c.hidden_size, intermediate, bias));
  up_proj = register_module(mixtral ? "w3" : "up_proj", linear(c.hidden_size, intermediate, bias));
  down_proj = register_module(mixtral ? "w2" : "down_proj", linear(intermediate, c.hidden_size, bias));
  glu_limit = c.swiglu_limit;
}

// ------------------------------------------------------------------------------------------------
SparseMoeImpl::SparseMoeImpl(const ModelConfig& c)
    : top_k(c.num_experts_per_tok), normalize(c.norm_topk_prob), float_weights(c.mixtral()), softmax_top_k(c.gpt_oss()) {
  gate = register_module(c.gpt_oss() ? "router" : "gate", linear(c.hidden_size, c.num_experts, c.gpt_oss()));
  experts = register_module("experts", torch::nn::ModuleList());
  for (int64_t e = 0; e < c.num_experts; ++e) experts->push_back(MLP(c, c.moe_intermediate_size));
  if (c.shared_expert_intermediate_size > 0) {
    shared_expert = register_module("shared_expert", MLP(c, c.shared_expert_intermediate_size));
    shared_expert_gate = register_module("shared_expert_gate", linear(c.hidden_size, 1, false));
  }
}

at::Tensor SparseMoeImpl::forward(const at::Tensor& x, at::Tensor* router_logits) {
  const int64_t E = static_cast<int64_t>(experts->size());
  const at::Tensor h = x.reshape({-1, x.size(-1)});  // (N, hidden)
  const at::Tensor logits = gate(h);                 // (N, E)
  if (router_logits) *router_logits = logits;
  at::Tensor weights, chosen;  // (N, k) each
  if (softmax_top_k) {  // gpt-oss: the top k logits, then their softmax, in the logits' dtype
    std::tie(weights, chosen) = at::topk(logits, top_k, -1);
    weights = at::softmax(weights, -1, weights.scalar_type());
  } else {
    std::tie(weights, chosen) = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
    if (normalize) weights = weights / weights.sum(-1, /*keepdim=*/true);
    if (!float_weights) weights = weights.to(logits.scalar_type());
  }
  // The (token, slot) pairs grouped by expert: a stable sort of the flattened choices keeps each
  // expert's tokens in order; one copy of the counts to the host sizes the groups.
  const at::Tensor flat = chosen.reshape({-1});
  const at::Tensor order = std::get<1>(at::sort(flat, std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(flat, {}, E).to(at::kCPU);
  const at::Tensor tokens = order.div(top_k, "floor");
  const at::Tensor routed = h.index_select(0, tokens);
  const at::Tensor routed_weights = weights.reshape({-1}).index_select(0, order).unsqueeze(1);
  at::Tensor out = at::zeros_like(h);
  const int64_t* n = counts.data_ptr<int64_t>();
  int64_t start = 0;
  // In a pass that records gradients an expert that no token chose still runs, on no rows: its
  // weights get a zero gradient, and AdamW moves them by their momentum as it moves transformers 5's
  // fused 3-D expert weights, whose every slice has a gradient.
  const bool every_expert = at::GradMode::is_enabled() && is_training();
  for (int64_t e = 0; e < E; ++e) {
    if (n[e] == 0 && !every_expert) continue;
    const at::Tensor y = experts[e]->as<MLPImpl>()->forward(routed.narrow(0, start, n[e]));
    out.index_add_(0, tokens.narrow(0, start, n[e]), (y * routed_weights.narrow(0, start, n[e])).to(out.scalar_type()));
    start += n[e];
  }
  if (shared_expert) out = out + at::sigmoid(shared_expert_gate(h)) * shared_expert(h);  // (Qwen2-MoE's order)
  return out.view(x.sizes());
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  if (glu_limit > 0) {
    // gpt-oss's clamped activation (GptOssExperts._apply_gate), gate and up from one node where
    // LoRA groups the two projections.
    std::vector<at::Tensor> gate_up = forward_group({gate_proj.get(), up_proj.get()}, x, /*split=*/true);
    if (gate_up.empty()) {
      const auto xs = projection_inputs(x, {gate_proj.get(), up_proj.get()}, shared_input_cast);
      gate_up = {gate_proj(xs[0]), up_proj(xs[1])};
    }
    const at::Tensor gate = gate_up[0].clamp_max(glu_limit);
    const at::Tensor up = gate_up[1].clamp(-glu_limit, glu_limit);
    return down_proj((up + 1) * (gate * at::sigmoid(gate * 1.702)));
  }
  // Phi-3: [gate | up] from one projection, as grouped projections make it.
  if (gate_up_proj) return down_proj(swiglu_packed(gate_up_proj(x), fused_swiglu, act));
  // One node for both (LoRA's grouped projections: [gate | up] as one output, whose halves the CUDA
  // SwiGLU kernel reads in place), or each its own.
  const std::vector<at::Tensor> gate_up = forward_group({gate_proj.get(), up_proj.get()}, x, /*split=*/false);
  if (!gate_up.empty()) return down_proj(swiglu_packed(gate_up[0], fused_swiglu, act));
  const auto xs = projection_inputs(x, {gate_proj.get(), up_proj.get()}, shared_input_cast);
  if (act != io::Activation::Silu) {
    const at::Tensor gate = gate_proj(xs[0]);
    return down_proj(at::gelu(gate, gelu_approximation(act)) * up_proj(xs[1]));
  }
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (fused_swiglu && x.is_cuda()) {
    const at::Tensor gate = gate_proj(xs[0]), up = up_proj(xs[1]);
    return down_proj(kernels::swiglu_fits(gate, up) ? SwigluCuda::apply(gate, up) : at::silu(gate) * up);
  }
#endif
  // gate before up, as written (the operands of * have no order in C++): their dropout masks are
  // drawn in this order, as the grouped node draws them and as Python evaluates HF's MLP.
  const at::Tensor gate = gate_proj(xs[0]);
  return down_proj(at::silu(gate) * up_proj(xs[1]));
}

// ------------------------------------------------------------------------------------------------
DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, int64_t layer)
    : residual_multiplier(c.residual_multiplier), residual_dropout(c.residual_dropout) {
  self_attn = register_module("self_attn", Attention(c, c.layer_window.at(layer), c.rope_in_layer(layer)));
  if (c.moe_in_layer(layer)) {
    moe = register_module(c.mixtral() ? "block_sparse_moe" : "mlp", SparseMoe(c));
  } else {
    mlp = register_module("mlp", MLP(c));
  }
  const bool offset = c.norm_unit_offset();
  if (c.olmo()) {  // norms on the sublayers' outputs only
    post_attention_layernorm =
        register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, false, true));
    post_feedforward_layernorm =
        register_module("post_feedforward_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, false, true));
    return;
  }
  // (gpt-oss's norms take the weight's product in float32, as OLMo's)
  const bool float_product = c.norm_float_product();
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, offset, float_product));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, offset, float_product));
  if (c.sandwich_norms()) {
    pre_feedforward_layernorm =
        register_module("pre_feedforward_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, offset));
    post_feedforward_layernorm =
        register_module("post_feedforward_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, offset));
  }
}

at::Tensor DecoderLayerImpl::forward(const at::Tensor& x, const AttentionInputs& in, at::Tensor* cache_k,
                                     at::Tensor* cache_v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                     at::Tensor* router_logits) {
  if (!input_layernorm) {  // OLMo 2: each sublayer's output normed, then added
    at::Tensor h = x + post_attention_layernorm(self_attn(x, in, cache_k, cache_v, prefix_k, prefix_v));
    return h + post_feedforward_layernorm(feed_forward(h, router_logits));
  }
  if (pre_feedforward_layernorm) {  // Gemma 2 and 3: norms around both sublayers' outputs too
    at::Tensor h =
        x + post_attention_layernorm(self_attn(input_layernorm(x), in, cache_k, cache_v, prefix_k, prefix_v));
    return h + post_feedforward_layernorm(feed_forward(pre_feedforward_layernorm(h), router_logits));
  }
  // A sublayer's output as it joins the residual stream, in transformers' order: times Granite's
  // multiplier, then through Phi-3's resid_pdrop in training mode (each a no-op elsewhere).
  auto joining = [&](at::Tensor y) {
    if (residual_multiplier != 1) y = y * residual_multiplier;
    if (residual_dropout > 0 && is_training()) y = at::dropout(y, residual_dropout, /*train=*/true);
    return y;
  };
  at::Tensor h = x + joining(self_attn(input_layernorm(x), in, cache_k, cache_v, prefix_k, prefix_v));
  return h + joining(feed_forward(post_attention_layernorm(h), router_logits));
}

std::vector<MLPImpl*> DecoderLayerImpl::mlps() {
  if (mlp) return {mlp.get()};
  std::vector<MLPImpl*> out;
  for (const auto& e : *moe->experts) out.push_back(e->as<MLPImpl>());
  if (moe->shared_expert) out.push_back(moe->shared_expert.get());
  return out;
}

// ------------------------------------------------------------------------------------------------
DecoderImpl::DecoderImpl(const ModelConfig& c) {
  // transformers builds every family's embedding as nn.Embedding(vocab, hidden, padding_idx =
  // pad_token_id): the padding token's row gets no gradient, so full fine-tuning leaves it as it is
  // (Phi-3's pad is its <|endoftext|>, which documents end with; OLMoE's its <|padding|>). A
  // negative id counts from the end, as in PyTorch. An id outside the vocabulary (a real config
  // shrunk for a test; transformers' nn.Embedding would refuse it) leaves every row trainable.
  torch::nn::EmbeddingOptions embedding(c.vocab_size, c.hidden_size);
  if (c.pad_token_id && *c.pad_token_id >= -c.vocab_size && *c.pad_token_id < c.vocab_size) {
    embedding.padding_idx(*c.pad_token_id);
  }
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(embedding));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(DecoderLayer(c, i));
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_unit_offset(), c.norm_float_product()));
}

namespace {

// The model's parameters are created in float32 on the CPU (then initialised or loaded, and moved):
// more bytes than the machine has would end the process inside LibTorch's allocator (a fatal log,
// not an exception), so that case is an error here.
void check_fits_in_memory(const ModelConfig& c) {
  const double params = c.parameter_estimate();
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return;
  const double memory = static_cast<double>(pages) * static_cast<double>(page);
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  FT_CHECK(params * 4 <= memory, "[model] the config's sizes make about ", params, " parameters, ", params * 4 / kGiB,
           " GiB in float32, more than this machine's ", memory / kGiB, " GiB of memory: check vocab_size (",
           c.vocab_size, "), hidden_size (", c.hidden_size, "), intermediate_size (", c.intermediate_size,
           ") and num_hidden_layers (", c.num_hidden_layers, ")");
}

}  // namespace

CausalLMImpl::CausalLMImpl(ModelConfig config) : config_(std::move(config)) {
  config_.validate("model config");
  check_fits_in_memory(config_);
  model = register_module("model", Decoder(config_));
  if (!config_.tie_word_embeddings) {
    lm_head = register_module("lm_head", linear(config_.hidden_size, config_.vocab_size, false));
  }
  inv_freq_ = rope_inv_freq(config_);
  if (config_.rope.type == io::RopeType::LongRope) long_inv_freq_ = rope_inv_freq(config_, /*long_factors=*/true);
  if (config_.sliding_rope) sliding_inv_freq_ = rope_inv_freq(*config_.sliding_rope, config_.rotary_dim());
}

// ------------------------------------------------------------------------------------------------
PrefixEncoderImpl::PrefixEncoderImpl(const ModelConfig& c, int64_t virtual_tokens_, bool projection_,
                                     int64_t encoder_hidden)
    : virtual_tokens(virtual_tokens_),
      layers(c.num_hidden_layers),
      kv_heads(c.num_key_value_heads),
      head_dim(c.head_dim),
      projection(projection_) {
  FT_CHECK(virtual_tokens > 0, "[prefix] num_virtual_tokens must be > 0, got ", virtual_tokens);
  const int64_t token_dim = kv_heads * head_dim;
  const int64_t width = layers * 2 * token_dim;
  if (!projection) {
    embedding = register_module("embedding", torch::nn::Embedding(virtual_tokens, width));
    return;
  }
  FT_CHECK(encoder_hidden > 0, "[prefix] encoder_hidden_size must be > 0, got ", encoder_hidden);
  embedding = register_module("embedding", torch::nn::Embedding(virtual_tokens, token_dim));
  transform = register_module("transform", torch::nn::ModuleList());
  transform->push_back(torch::nn::Linear(token_dim, encoder_hidden));
  transform->push_back(torch::nn::Tanh());
  transform->push_back(torch::nn::Linear(encoder_hidden, width));
}

at::Tensor PrefixEncoderImpl::table() {
  at::Tensor t = embedding->weight;
  if (!projection) return t;
  t = transform[0]->as<torch::nn::Linear>()->forward(t).tanh();
  return transform[2]->as<torch::nn::Linear>()->forward(t);
}

std::vector<at::Tensor> PrefixEncoderImpl::keys_values() {
  // (P, 2L, G, D) → (2L, G, P, D), as PEFT's view + permute.
  at::Tensor kv = table().view({virtual_tokens, 2 * layers, kv_heads, head_dim}).permute({1, 2, 0, 3});
  return kv.unbind(0);
}

void CausalLMImpl::untie_embeddings() {
  if (!config_.tie_word_embeddings) return;
  FT_CHECK(!lm_head, "[model] a tied model has no lm_head module to replace");
  const at::Tensor& e = model->embed_tokens->weight;
  Linear head = linear(config_.hidden_size, config_.vocab_size, false);
  {
    at::NoGradGuard no_grad;
    head->weight.set_data(e.detach().clone());
  }
  head->weight.set_requires_grad(e.requires_grad());
  lm_head = register_module("lm_head", head);
  config_.tie_word_embeddings = false;
}

void CausalLMImpl::set_prefix(PrefixEncoder encoder) {
  FT_CHECK(!prefix_encoder, "[model] the model already has a prefix");
  FT_CHECK(encoder->layers == config_.num_hidden_layers && encoder->kv_heads == config_.num_key_value_heads &&
               encoder->head_dim == config_.head_dim,
           "[model] the prefix is for ", encoder->layers, " layers of ", encoder->kv_heads, " key/value heads of ",
           encoder->head_dim, ", the model has ", config_.num_hidden_layers, " of ", config_.num_key_value_heads, " of ",
           config_.head_dim);
  prefix_encoder = register_module("prefix_encoder", std::move(encoder));
}

at::Tensor CausalLMImpl::hidden_states(const at::Tensor& input_ids, const ForwardOptions& opt) {
  FT_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong, "[model] input_ids must be (B, T) int64, got ",
           input_ids.sizes(), " ", input_ids.scalar_type());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t L = config_.num_hidden_layers;
  KVCache* cache = opt.cache;
  // A prefix (prefix tuning) acts as P cached tokens: put into an empty cache, or passed to every
  // layer when there is no cache.
  const int64_t P = prefix_encoder ? prefix_encoder->virtual_tokens : 0;
  std::vector<at::Tensor> prefix_kv;
  if (cache) {
    cache->keys.resize(L);
    cache->values.resize(L);
    if (P > 0 && cache->length() == 0) {
      prefix_kv = prefix_encoder->keys_values();
      for (int64_t i = 0; i < L; ++i) {
        cache->keys[i] = prefix_kv[2 * i].unsqueeze(0).expand({B, -1, -1, -1});
        cache->values[i] = prefix_kv[2 * i + 1].unsqueeze(0).expand({B, -1, -1, -1});
      }
      cache->prefix = P;
      prefix_kv.clear();
    }
    FT_CHECK(cache->prefix == P, "[model] the KV cache holds a prefix of ", cache->prefix,
             " entries, but the model's prefix has ", P, " (a cache belongs to one model)");
  } else if (P > 0) {
    prefix_kv = prefix_encoder->keys_values();
  }
  const int64_t past = cache ? cache->length() : P;  // keys before the new tokens
  const int64_t past_tokens = past - P;              // of which are tokens (not a prefix)
  const int64_t S = past + T;
  const auto device = input_ids.device();
  at::Tensor x = embed(input_ids);

  at::Tensor positions = opt.position_ids;
  if (!positions.defined()) {
    positions = at::arange(past, S, at::TensorOptions().dtype(at::kLong).device(device)).expand({B, T});
  } else if (P > 0) {
    positions = positions + P;
  }
  FT_CHECK(positions.sizes() == input_ids.sizes(), "[model] position_ids ", positions.sizes(),
           " must match input_ids ", input_ids.sizes());
  AttentionInputs in;
  in.fused_rope = fused_rope_;
  // longrope (Phi-3's long-context models): the long factors where the largest position + 1
  // exceeds the original context, for this pass's every token, as transformers decides.
  bool long_factors = false;
  if (long_inv_freq_.defined()) {
    int64_t max_position = S - 1;  // the default positions' (the prefix's included, as PEFT counts them)
    if (opt.position_ids.defined()) {
      max_position = opt.max_position ? *opt.max_position + P : positions.max().item<int64_t>();
    }
    long_factors = long_rope(max_position);
  }
  const at::Tensor& freq = long_factors ? on_device(long_inv_freq_, long_inv_freq_device_, device)
                                        : on_device(inv_freq_, inv_freq_device_, device);
  std::tie(in.cos, in.sin) = rope_tables(positions, freq, x.scalar_type(), config_.rope.attention_factor);
  if (sliding_inv_freq_.defined()) {
    std::tie(in.sliding_cos, in.sliding_sin) =
        rope_tables(positions, on_device(sliding_inv_freq_, sliding_inv_freq_device_, device), x.scalar_type(),
                    config_.sliding_rope->attention_factor);
  }
  in.past = past;

  FT_CHECK(!opt.segment_ids.defined() || opt.segment_ids.sizes() == input_ids.sizes(), "[model] segment_ids ",
           opt.segment_ids.sizes(), " must match input_ids ", input_ids.sizes());
  // Packed rows on CUDA in a flash dtype: variable-length attention (ForwardOptions::cu_seqlens).
  // (Not for soft-capped attention scores, Gemma 2's, which flash attention does not compute, nor
  // for attention sinks unless they go through flash attention's log-sum-exp.)
  if (opt.cu_seqlens.defined() && opt.segment_ids.defined() && device.is_cuda() && !cache && P == 0 &&
      config_.attn_logit_softcapping == 0 && (!config_.attention_sinks() || flash_sinks_)) {
    const at::ScalarType qt = util::compute_dtype(x);  // the projections' (x is on the CUDA device)
    const int64_t D = config_.head_dim;
    if ((qt == at::kBFloat16 || qt == at::kHalf) && D % 8 == 0 && D <= 256) {
      FT_CHECK(opt.cu_seqlens.dim() == 1 && opt.cu_seqlens.size(0) >= 2 && opt.cu_seqlens.scalar_type() == at::kInt &&
                   opt.cu_seqlens.device() == device,
               "[model] cu_seqlens must be int32 (runs + 1) on ", device, ", got ", opt.cu_seqlens.sizes(), " ",
               opt.cu_seqlens.scalar_type(), " on ", opt.cu_seqlens.device());
      FT_CHECK(opt.max_seqlen >= 1 && opt.max_seqlen <= T, "[model] max_seqlen must be in [1, ", T, "], got ",
               opt.max_seqlen);
      in.cu_seqlens = opt.cu_seqlens;
      in.max_seqlen = opt.max_seqlen;
      in.causal = true;
      for (const auto& layer_window : config_.layer_window) in.masks[layer_window] = at::Tensor();
    }
  }
  at::Tensor key_valid;  // (B, S)
  if (opt.attention_mask.defined()) {
    FT_CHECK(opt.attention_mask.dim() == 2 && opt.attention_mask.size(0) == B &&
                 opt.attention_mask.size(1) == past_tokens + T,
             "[model] attention_mask must be (B, cached + new tokens) = (", B, ", ", past_tokens + T, "), got ",
             opt.attention_mask.sizes());
    // Whether there is padding at all: the caller's word, or the mask's (a read that, for a mask on
    // the device, makes the host wait for the device's queue).
    // (Variable-length attention needs no key mask: padding is a run of its own.)
    const bool padding = !in.cu_seqlens.defined() &&
                         (opt.padding.has_value() ? *opt.padding : !opt.attention_mask.ne(0).all().item<bool>());
    if (padding) {
      const at::Tensor valid = opt.attention_mask.to(device).to(at::kBool);
      key_valid = P > 0 ? at::cat({at::ones({B, P}, valid.options()), valid}, 1) : valid;
    }
  }
  at::Tensor same_segment;  // (B, 1, T, S): true where query and key are in the same document
  if (opt.segment_ids.defined() && !in.cu_seqlens.defined()) {
    FT_CHECK(past_tokens == 0, "[model] segment_ids (packed documents) cannot be combined with a KV cache");
    at::Tensor seg = opt.segment_ids.to(device);
    same_segment = (seg.unsqueeze(2) == seg.unsqueeze(1)).unsqueeze(1);
    // Every document sees the whole prefix.
    if (P > 0) same_segment = at::cat({at::ones({B, 1, T, P}, same_segment.options()), same_segment}, 3);
  }
  // One boolean mask (B, 1, T, S) per distinct attention window; undefined where plain causal
  // attention (SDPA's is_causal, or no mask for a single new token) is exact.
  in.causal = past == 0 && T > 1;
  for (const auto& layer_window : config_.layer_window) {
    if (in.masks.count(layer_window)) continue;  // (or variable-length attention: no masks)
    const bool window_bites = layer_window > 0 && S > layer_window;
    if (!key_valid.defined() && !same_segment.defined() && !window_bites && (past == 0 || T == 1)) {
      in.masks[layer_window] = at::Tensor();
      continue;
    }
    auto opts = at::TensorOptions().dtype(at::kLong).device(device);
    at::Tensor q_idx = at::arange(past, S, opts).view({T, 1});
    at::Tensor k_idx = at::arange(0, S, opts).view({1, S});
    at::Tensor allowed = k_idx <= q_idx;
    if (window_bites) allowed = allowed.logical_and(q_idx - k_idx < layer_window);
    allowed = allowed.view({1, 1, T, S});
    if (same_segment.defined()) allowed = allowed.logical_and(same_segment);
    if (key_valid.defined()) {
      allowed = allowed.logical_and(key_valid.view({B, 1, 1, S}));
      // A padding query may see no key at all; let it see itself so SDPA yields finite values
      // (its output is never used, but NaNs would leak through 0 × NaN in later layers).
      allowed = allowed.logical_or((k_idx == q_idx).view({1, 1, T, S}));
    }
    in.masks[layer_window] = allowed;
  }

  for (int64_t i = 0; i < L; ++i) {
    auto layer = model->layers->ptr<DecoderLayerImpl>(i);
    if (gradient_checkpointing_ && !cache) {
      // The prefix's keys and values are inputs of the checkpointed block, so their gradients reach
      // the prefix through the recomputation.
      std::vector<at::Tensor> extras;
      if (!prefix_kv.empty()) extras = {prefix_kv[2 * i], prefix_kv[2 * i + 1]};
      // A router's logits are the block's second output, so that the load-balancing loss's
      // gradient reaches the router and the block's input through the recomputation.
      const bool route = opt.router_logits && layer->moe;
      std::vector<at::Tensor> ys = checkpointed(
          [layer, in, route](const at::Tensor& h, const std::vector<at::Tensor>& e) {
            at::Tensor logits;
            at::Tensor y = layer->forward(h, in, nullptr, nullptr, e.empty() ? at::Tensor() : e[0],
                                          e.empty() ? at::Tensor() : e[1], route ? &logits : nullptr);
            return route ? std::vector<at::Tensor>{y, logits} : std::vector<at::Tensor>{y};
          },
          x, extras, *layer);
      x = ys[0];
      if (route) opt.router_logits->push_back(ys[1]);
      continue;
    }
    at::Tensor logits;
    at::Tensor* route = opt.router_logits && layer->moe ? &logits : nullptr;
    if (cache) {
      x = layer->forward(x, in, &cache->keys[i], &cache->values[i], {}, {}, route);
    } else if (!prefix_kv.empty()) {
      x = layer->forward(x, in, nullptr, nullptr, prefix_kv[2 * i], prefix_kv[2 * i + 1], route);
    } else {
      x = layer->forward(x, in, nullptr, nullptr, {}, {}, route);
    }
    if (route) opt.router_logits->push_back(logits);
  }
  return model->norm(x);
}

std::pair<at::Tensor, at::Tensor> CausalLMImpl::rope_tables(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                             at::ScalarType dtype, double scale) {
  // Rotary tables in float32, then in the activations' dtype, as HF does.
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // (B, T, D/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  if (scale != 1.0) return {(emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)};
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

bool CausalLMImpl::long_rope(int64_t max_position) const {
  return config_.rope.type == io::RopeType::LongRope && max_position + 1 > config_.rope.original_max_position_embeddings;
}

at::Tensor CausalLMImpl::embed(const at::Tensor& input_ids) {
  at::Tensor x = model->embed_tokens(input_ids);
  if (config_.embedding_multiplier != 1) return x * config_.embedding_multiplier;  // Granite
  if (!config_.scaled_embeddings()) return x;
  // Gemma: × √E as a float32 rounded to the weights' dtype (HF's embed_scale buffer .to(dtype)).
  const auto scale = static_cast<float>(std::sqrt(static_cast<double>(config_.hidden_size)));
  return x * at::scalar_tensor(scale, at::kFloat).to(model->embed_tokens->weight.scalar_type());
}

const at::Tensor& CausalLMImpl::on_device(const at::Tensor& host, at::Tensor& copy, const c10::Device& device) {
  if (device.is_cpu()) return host;
  if (!copy.defined() || copy.device() != device) copy = host.to(device);
  return copy;
}

at::Tensor CausalLMImpl::logits(const at::Tensor& hidden) {
  at::Tensor out = lm_head ? lm_head(hidden) : model::linear(hidden, model->embed_tokens->weight);
  if (config_.final_logit_softcapping > 0) {  // Gemma 2's and 3's option, in HF's order of operations
    const double cap = config_.final_logit_softcapping;
    out = at::tanh(out / cap) * cap;
  }
  if (config_.logits_scaling != 1) out = out / config_.logits_scaling;  // Granite
  return out;
}

at::Tensor CausalLMImpl::forward(const at::Tensor& input_ids, const ForwardOptions& options) {
  return logits(hidden_states(input_ids, options));
}

// ------------------------------------------------------------------------------------------------
void init_weights(CausalLM& m, uint64_t seed) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double std = m->config().initializer_range;
  for (auto& item : m->named_parameters()) {
    at::Tensor p = item.value();
    const std::string& name = item.key();
    at::Tensor fresh = at::empty(p.sizes(), at::kFloat);
    if (name.ends_with("norm.weight")) fresh.fill_(m->config().norm_unit_offset() ? 0.0 : 1.0);
    else if (name.ends_with(".bias")) fresh.zero_();
    else fresh.normal_(0.0, std, gen);
    p.copy_(fresh);
  }
}

namespace {

// labels (B, T) → the flattened targets of the shifted loss: position j scores labels[j + 1], a
// row's last position nothing (ignore_index).
at::Tensor shifted_targets(const at::Tensor& labels, int64_t ignore_index, const c10::Device& device) {
  return at::cat({labels.slice(1, 1), at::full({labels.size(0), 1}, ignore_index, labels.options())}, 1)
      .reshape({-1})
      .to(device);
}

#ifdef LIBFT_WITH_CUDA_KERNELS
// The fused cross-entropy (cross_entropy_sum): the kernels' per-row losses summed; the row's
// log-sum-exp and the logits themselves (which exist anyway, in their own dtype) kept for the
// backward pass, instead of a float32 log-softmax of them.
struct FusedCrossEntropy : public torch::autograd::Function<FusedCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t ignore_index) {
    auto [loss, lse] = kernels::cross_entropy_forward(logits, targets, ignore_index);
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss.sum();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor scale = grads[0].to(at::kFloat);
    return {kernels::cross_entropy_backward(saved[0], saved[1], saved[2], scale,
                                            ctx->saved_data["ignore_index"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};
#endif

}  // namespace

at::Tensor cross_entropy_sum(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, bool fused) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (fused && kernels::cross_entropy_fits(logits, targets)) return FusedCrossEntropy::apply(logits, targets, ignore_index);
#else
  (void)fused;
#endif
  return at::cross_entropy_loss(logits.to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), targets, {},
                                at::Reduction::Sum, ignore_index);
}

namespace {

// HF's shift: logits[:, :-1] predict labels[:, 1:]. float32 (float64 for float64 models) whatever
// the logits' dtype.
at::Tensor shifted_cross_entropy(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                 at::Reduction::Reduction reduction, bool fused = false) {
  FT_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
               logits.size(1) == labels.size(1),
           "[loss] logits (B, T, V) and labels (B, T) disagree: ", logits.sizes(), " vs ", labels.sizes());
  // The labels move instead of the logits: position j is scored against labels[j + 1] and the last
  // position against nothing (ignore_index). The logits stay contiguous, so neither the forward
  // nor the backward pass copies the (B, T, V) tensor, and the sum is the same.
  const int64_t V = logits.size(2);
  if (reduction == at::Reduction::Sum) {
    return cross_entropy_sum(logits.reshape({-1, V}), shifted_targets(labels, ignore_index, logits.device()),
                             ignore_index, fused);
  }
  at::Tensor flat_logits = logits.reshape({-1, V}).to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return at::cross_entropy_loss(flat_logits, shifted_targets(labels, ignore_index, logits.device()), {}, reduction,
                                ignore_index);
}

// The summed shifted loss of one chunk of rows (N, E) of the final hidden states against their
// targets (N): its logits through the head, scored in float32 (float64 for a float64 model).
at::Tensor chunk_loss_sum(CausalLMImpl& model, const at::Tensor& hidden, const at::Tensor& targets,
                          int64_t ignore_index) {
  return cross_entropy_sum(model.logits(hidden), targets, ignore_index, model.fused_loss());
}

// The backward pass of chunked_lm_loss_sum: each chunk's logits and loss again, differentiated
// with respect to its rows of hidden and the head's trainable parameters (CheckpointBackward's way,
// with the forward pass's autocast state).
class ChunkedLossBackward final : public torch::autograd::Node {
 public:
  CausalLMImpl* model = nullptr;
  at::Tensor hidden;  // (N, E), detached
  std::vector<int64_t> hidden_sizes;
  bool hidden_requires_grad = false;
  at::Tensor targets;  // (N)
  int64_t chunk = 0, ignore_index = -100;
  std::vector<at::Tensor> params;
  CheckpointBackward::Autocast autocast;

  std::string name() const override { return "ft::ChunkedLossBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(1 + params.size());
    if (!grads[0].defined()) return out;
    at::AutoGradMode enable(true);
    struct Restore {
      CheckpointBackward::Autocast previous = CheckpointBackward::Autocast::current();
      ~Restore() { previous.apply(); }
    } restore;
    autocast.apply();
    const int64_t n = hidden.size(0);
    at::Tensor dh = hidden_requires_grad ? at::empty_like(hidden) : at::Tensor();
    for (int64_t i = 0; i < n; i += chunk) {
      const int64_t j = std::min(n, i + chunk);
      const at::Tensor h = hidden.slice(0, i, j).detach().requires_grad_(hidden_requires_grad);
      const at::Tensor loss = chunk_loss_sum(*model, h, targets.slice(0, i, j), ignore_index);
      std::vector<at::Tensor> wrt;
      if (hidden_requires_grad) wrt.push_back(h);
      for (const auto& p : params) wrt.push_back(p);
      const auto g = torch::autograd::grad({loss}, wrt, {grads[0].to(loss.scalar_type())}, /*retain_graph=*/false,
                                           /*create_graph=*/false, /*allow_unused=*/true);
      size_t k = 0;
      if (hidden_requires_grad) dh.slice(0, i, j).copy_(g[k++]);
      for (size_t p = 0; p < params.size(); ++p, ++k) {
        if (!g[k].defined()) continue;
        out[1 + p] = out[1 + p].defined() ? out[1 + p] + g[k] : g[k];
      }
    }
    if (hidden_requires_grad) out[0] = dh.view(hidden_sizes);
    return out;
  }

  void release_variables() override {
    hidden = at::Tensor();
    targets = at::Tensor();
  }
};

}  // namespace

at::Tensor chunked_lm_loss_sum(CausalLMImpl& model, const at::Tensor& hidden, const at::Tensor& labels, int64_t chunk,
                               int64_t ignore_index) {
  FT_CHECK(chunk > 0, "[loss] chunk must be > 0 rows, got ", chunk);
  FT_CHECK(hidden.dim() == 3 && labels.dim() == 2 && hidden.size(0) == labels.size(0) && hidden.size(1) == labels.size(1),
           "[loss] hidden (B, T, E) and labels (B, T) disagree: ", hidden.sizes(), " vs ", labels.sizes());
  const at::Tensor flat = hidden.reshape({-1, hidden.size(2)});
  const at::Tensor targets = shifted_targets(labels, ignore_index, hidden.device());
  at::Tensor total;
  {
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < flat.size(0); i += chunk) {
      const int64_t j = std::min(flat.size(0), i + chunk);
      const at::Tensor loss = chunk_loss_sum(model, flat.slice(0, i, j), targets.slice(0, i, j), ignore_index);
      total = total.defined() ? total + loss : loss;
    }
  }
  std::vector<at::Tensor> params;
  torch::nn::Module& head = model.lm_head ? static_cast<torch::nn::Module&>(*model.lm_head)
                                          : static_cast<torch::nn::Module&>(*model.model->embed_tokens);
  for (const auto& p : head.parameters()) {
    if (p.requires_grad()) params.push_back(p);
  }
  if (!at::GradMode::is_enabled() || (!hidden.requires_grad() && params.empty())) return total;
  auto node = std::shared_ptr<ChunkedLossBackward>(new ChunkedLossBackward(), torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(hidden, params));
  node->model = &model;
  node->hidden = flat.detach();
  node->hidden_sizes = hidden.sizes().vec();
  node->hidden_requires_grad = hidden.requires_grad();
  node->targets = targets;
  node->chunk = chunk;
  node->ignore_index = ignore_index;
  node->params = std::move(params);
  node->autocast = CheckpointBackward::Autocast::current();
  torch::autograd::create_gradient_edge(total, std::move(node));
  return total;
}

void CausalLMImpl::set_shared_input_cast(bool on) {
  shared_input_cast_ = on;
  for (const auto& layer : *model->layers) {
    auto* l = layer->as<DecoderLayerImpl>();
    l->self_attn->shared_input_cast = on;
    for (MLPImpl* m : l->mlps()) m->shared_input_cast = on;
  }
}

void CausalLMImpl::set_flash_sinks(bool on) {
  flash_sinks_ = on;
  for (const auto& layer : *model->layers) layer->as<DecoderLayerImpl>()->self_attn->flash_sinks = on;
}

void CausalLMImpl::set_fused_swiglu(bool on) {
  fused_swiglu_ = on;
  for (const auto& layer : *model->layers) {
    for (MLPImpl* m : layer->as<DecoderLayerImpl>()->mlps()) m->fused_swiglu = on;
  }
}

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  return shifted_cross_entropy(logits, labels, ignore_index, at::Reduction::Mean);
}

at::Tensor causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, bool fused) {
  return shifted_cross_entropy(logits, labels, ignore_index, at::Reduction::Sum, fused);
}

at::Tensor load_balancing_loss(const std::vector<at::Tensor>& router_logits, int64_t num_experts, int64_t top_k,
                               const at::Tensor& token_mask) {
  FT_CHECK(!router_logits.empty(), "[model] the load-balancing loss needs the router logits of at least one layer");
  FT_CHECK(top_k >= 1 && top_k <= num_experts, "[model] load-balancing loss: top_k ", top_k, " with ", num_experts,
           " experts");
  const c10::Device device = router_logits.front().device();
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor mask;  // (N, 1) float32, where given
  if (token_mask.defined()) mask = token_mask.reshape({-1, 1}).to(f32);
  // Choice counts and probability sums per expert, over every layer's rows (transformers sums them
  // layer by layer and divides once).
  at::Tensor choices = at::zeros({num_experts}, f32), probability = at::zeros({num_experts}, f32);
  at::Tensor rows = at::zeros({}, f32);
  for (size_t l = 0; l < router_logits.size(); ++l) {
    const at::Tensor& logits = router_logits[l];
    FT_CHECK(logits.dim() == 2 && logits.size(1) == num_experts, "[model] load-balancing loss: layer ", l,
             "'s router logits are ", logits.sizes(), ", expected (tokens, ", num_experts, ")");
    FT_CHECK(!mask.defined() || mask.size(0) == logits.size(0), "[model] load-balancing loss: ", logits.size(0),
             " router rows against a token mask of ", mask.size(0));
    const at::Tensor p = at::softmax(logits, -1, at::kFloat);  // (N, E)
    const at::Tensor chosen = std::get<1>(at::topk(p, top_k, -1)).reshape({-1});
    at::Tensor weight = mask.defined() ? mask.expand({mask.size(0), top_k}).reshape({-1}) : at::ones({chosen.size(0)}, f32);
    choices = choices + at::zeros({num_experts}, f32).scatter_add_(0, chosen, weight);
    probability = probability + (mask.defined() ? p * mask : p).sum(0);
    rows = rows + (mask.defined() ? mask.sum() : at::full({}, static_cast<double>(logits.size(0)), f32));
  }
  return (choices / rows * (probability / rows)).sum() * static_cast<double>(num_experts);
}

}  // namespace ft::model
