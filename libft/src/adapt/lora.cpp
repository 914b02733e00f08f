#include "ft/adapt/lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <tuple>
#include <utility>

#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/model/cpu_ops.h"
#include "ft/util/autocast.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/lora_rows.h"
#endif

namespace fs = std::filesystem;

namespace ft::adapt {

namespace {

constexpr const char* kPeftPrefix = "base_model.model.";

// An adapter PEFT made on an image-text model (Gemma3ForConditionalGeneration) names its layers
// language_model.* and vision_tower.*, which libft's text model has not: the reason, rather than a
// list of missing and unexpected tensors. Empty when the file names no such part.
std::string image_text_adapter(const io::SafetensorsFile& file) {
  for (const auto& info : file.tensors()) {
    for (const char* part : {".language_model.", ".vision_tower.", ".multi_modal_projector."}) {
      if (info.name.find(part) != std::string::npos) {
        return file.path() + " was made on an image-text model (its tensor '" + info.name +
               "' names " + std::string(part).substr(1, std::string(part).size() - 2) +
               "): libft reads adapters of the language model as a text model (Gemma3ForCausalLM), whose layers "
               "are model.layers.*";
      }
    }
  }
  return "";
}

// x2 Wᵀ (+ bias) + S Bᵀ, (T, out), for the fused layers (S: (T, r), the adapter scale already in it,
// where it costs a pass over T·r elements instead of T·out). On float32 CPU tensors the frozen
// base product goes through oneDNN (ft/model/cpu_ops.h) and the low-rank term is added in place.
// Everywhere else (cuBLAS on CUDA) the low-rank term comes first, (T, r)·(r, out) with the bias, and
// the base GEMM accumulates onto it (beta = 1): the output then takes one memory-bound pass (the
// rank-r GEMM's write) and the base GEMM reads it in its epilogue, instead of a second memory-bound
// read-modify-write of the output after the base GEMM.
at::Tensor base_plus_low_rank(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& s_low,
                              const at::Tensor& bc) {
  if (model::onednn_linear_fits(x2, w, bias)) {
    at::Tensor y = model::linear(x2, w, bias);
    return y.addmm_(s_low, bc.t());
  }
  at::Tensor y = bias.defined() ? at::addmm(bias, s_low, bc.t()) : at::mm(s_low, bc.t());
  return y.addmm_(x2, w.t());
}

// out = scale · a b, for the (T, r) products that carry the adapter scale: s S = s h Aᵀ and its
// gradient s dZ B (scaled there, T·r elements, rather than on a (T, out) or (T, in) product). The
// scale is the GEMM's alpha (beta 0: out's old values are ignored, NaN included), applied to the
// float32 accumulator: one kernel and one rounding instead of a product and a separate multiply.
at::Tensor& scaled_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  return scale == 1.0 ? at::mm_out(out, a, b) : at::addmm_out(out, out, a, b, /*beta=*/0.0, /*alpha=*/scale);
}

at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scale) {
  if (scale == 1.0) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return scaled_mm_out(out, a, b, scale);
}

// scale · a b in `out` (the adapters' dtype), for the gradients of A and B. On CUDA with bf16/fp16
// operands and a float32 result the GEMM writes float32 itself (cuBLAS accumulates in float32
// anyway): no bf16 rounding of the gradient and no cast kernel after it. (ATen's out-dtype addmm
// wants a `self` of the operands' dtype even with beta 0, where it is only broadcast, never read.)
at::Tensor mm_as(const at::Tensor& a, const at::Tensor& b, at::ScalarType out, double scale = 1.0) {
  const bool half = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  if (a.is_cuda() && half && out == at::kFloat) {
    if (scale == 1.0) return at::mm(a, b, out);
    at::Tensor result = at::empty({a.size(0), b.size(1)}, a.options().dtype(out));
    return at::addmm_out(result, at::empty({}, a.options()), a, b, out, /*beta=*/0.0, /*alpha=*/scale);
  }
  return scaled_mm(a, b, scale).to(out);
}

// An adapter gradient, scale · a b in `out` (a: (M, K), b: (K, N), K = the tokens), with the
// reduction over K split into `splits` equal chunks (set_lora_grad_splits): one batched GEMM gives
// the chunks' partial products in float32 and a sum adds them in a fixed order (deterministic, no
// atomics). dA and dB have few output tiles (r × in, out × r), so a single GEMM over a few thousand
// tokens leaves most of an H100's SMs idle; the batch gives each chunk its own tiles. On CUDA the
// half-precision operands go to the GEMM as they are (float32 accumulation and output); elsewhere
// they are promoted to float32 first (the CPU has no mixed-dtype batched GEMM). Falls back to one
// GEMM where K does not split evenly.
at::Tensor grad_mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out, double scale, int64_t splits) {
  const int64_t k = a.size(1);
  if (splits <= 1 || k % splits != 0 || k < 2 * splits) return mm_as(a, b, out, scale);
  const at::Tensor a3 = a.unflatten(1, {splits, k / splits}).permute({1, 0, 2});  // (splits, M, K / splits)
  const at::Tensor b3 = b.unflatten(0, {splits, k / splits});                     // (splits, K / splits, N)
  const bool half = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  at::Tensor parts;
  if (a.is_cuda() && half) {
    parts = at::bmm(a3, b3, at::kFloat);
  } else {
    const at::ScalarType acc = at::promote_types(a.scalar_type(), at::kFloat);
    parts = at::bmm(a3.to(acc), b3.to(acc));
  }
  at::Tensor sum = parts.sum(0);
  if (scale != 1.0) sum.mul_(scale);
  return sum.to(out);
}

// One cast shared by the fused nodes that read the same input. Under autocast q, k and v (and gate
// and up) each get RMSNorm's one float32 output, and each node would write, and keep for its
// backward pass, its own compute-dtype copy of it: three identical (T, in) copies per attention
// block. The last copy a node made is remembered per thread, weakly (the input's and the copy's
// TensorImpl and version counters, so nothing is kept alive and a changed or freed tensor is never
// matched): a later node with the same input, unchanged since, takes that copy while some node
// still holds it (with ATen's dropout a node keeps the dropped copy instead, and the cast is gone by
// the next node). The copy is a node's internal operand, outside the autograd graph, so the results
// are those of separate casts bit for bit. (The extended GEMM writes its copy into its own
// [x | s S] buffer, and the row kernels' dropout needs the float32 input: those make their own.)
class CastShare {
 public:
  static at::Tensor find(const at::Tensor& x, at::ScalarType ct) {
    auto& e = entry();
    if (!e || e->ct != ct || e->x_version != x._version()) return {};
    const auto xi = e->x.lock();
    if (xi.get() != x.unsafeGetTensorImpl()) return {};
    auto x2 = e->x2.lock();
    if (!x2 || static_cast<int64_t>(x2->version_counter().current_version()) != e->x2_version) return {};
    return at::Tensor(std::move(x2));
  }
  static void remember(const at::Tensor& x, const at::Tensor& x2) {
    entry() = Entry{Weak(x.getIntrusivePtr()), Weak(x2.getIntrusivePtr()), x._version(), x2._version(), x2.scalar_type()};
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak x, x2;
    int64_t x_version, x2_version;  // as Tensor::_version() gives them
    at::ScalarType ct;
  };
  static std::optional<Entry>& entry() {
    thread_local std::optional<Entry> e;
    return e;
  }
};

// The fused nodes' dropout outside the row kernels: {h = drop(x2), keep}, keep being what
// dropout_backward needs: on CUDA at::native_dropout's own kernel and its bool mask; on the CPU the
// scaled noise of lora_dropout_noise (at::dropout's serial Bernoulli draws cost a third of a step).
std::pair<at::Tensor, at::Tensor> aten_dropout(const at::Tensor& x2, double p) {
  if (x2.is_cuda()) {
    auto [dropped, mask] = at::native_dropout(x2, p, /*train=*/true);
    return {dropped, mask};
  }
  at::Tensor noise = lora_dropout_noise(x2, p);
  return {x2 * noise, noise};
}

// drop'(t) for aten_dropout's keep (in place on the CPU).
at::Tensor dropout_backward(at::Tensor t, const at::Tensor& keep, double p) {
  if (keep.scalar_type() == at::kBool) return at::native_dropout_backward(t, keep, 1.0 / (1.0 - p));
  return t.mul_(keep);
}

// drop'(scale · dS A), (T, in): the low-rank term of the input gradient, through dropout's backward
// when p > 0 (keep: aten_dropout's).
at::Tensor low_rank_input_grad(const at::Tensor& ds, const at::Tensor& ac, const at::Tensor& keep, double p,
                               double scale = 1.0) {
  at::Tensor t = scaled_mm(ds, ac, scale);
  return p == 0 ? t : dropout_backward(t, keep, p);
}

// The row kernels (set_lora_row_kernels) where they take the operands (CUDA, float32 x under
// bf16/fp16 autocast, r ≤ 32, aligned widths), else false / undefined and the caller takes the ATen
// path. row_cast_down: x2 = x in the compute dtype and s_low = s drop(x) Aᵀ in one pass, allocating
// x2 (T, in) and s_low (T, r) unless they are given (the extended GEMM's views). With dropout p > 0
// the kernel draws the mask itself and `drawn` receives its (seed, offset), from which the backward
// kernels redraw it: neither the dropped copy of x nor the mask is kept between the passes.
bool row_cast_down(const at::Tensor& x_in, const at::Tensor& ac, double scale, at::ScalarType ct, at::Tensor& x2,
                   at::Tensor& s_low, double p, at::Tensor& drawn) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (!x_in.is_cuda() || x_in.scalar_type() != at::kFloat || ct == at::kFloat) return false;
  const at::Tensor xo = x2.defined() ? x2 : at::empty(x_in.sizes(), x_in.options().dtype(ct));
  const at::Tensor so = s_low.defined() ? s_low : at::empty({x_in.size(0), ac.size(0)}, x_in.options().dtype(ct));
  if (!kernels::lora_cast_down_fits(x_in, ac, xo, so)) return false;
  RECORD_FUNCTION("ft::lora_cast_down", std::vector<c10::IValue>());  // named in profiles
  drawn = kernels::lora_cast_down(x_in, ac, scale, xo, so, p);
  x2 = xo;
  s_low = so;
  return true;
#else
  (void)x_in, (void)ac, (void)scale, (void)ct, (void)x2, (void)s_low, (void)p, (void)drawn;
  return false;
#endif
}

// row_up_add: float32(base) + scale · drop'(ds A), (T, in), written once (drawn: row_cast_down's
// dropout draws, undefined without dropout). Undefined where the kernel declines the operands, which
// with dropout cannot happen: the backward pass's operands have the layout the forward pass's had.
at::Tensor row_up_add(const at::Tensor& base, const at::Tensor& ds, const at::Tensor& ac, double scale, double p = 0.0,
                      const at::Tensor& drawn = {}) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (drawn.defined() || kernels::lora_up_add_fits(base, ds, ac)) {
    RECORD_FUNCTION("ft::lora_up_add", std::vector<c10::IValue>());
    return kernels::lora_up_add(base, ds, ac, scale, drawn.defined() ? p : 0.0, drawn);
  }
#else
  (void)base, (void)ds, (void)ac, (void)scale, (void)drawn, (void)p;
#endif
  return {};
}

// The dropped copy of x2 that row_cast_down's s S read, for dA = dSᵀ h (x2 itself without dropout).
at::Tensor dropped_input(const at::Tensor& x2, const at::Tensor& drawn, double p) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (drawn.defined()) {
    RECORD_FUNCTION("ft::lora_dropout_rows", std::vector<c10::IValue>());
    return kernels::lora_dropout_rows(x2, p, drawn);
  }
#else
  (void)drawn, (void)p;
#endif
  return x2;
}

// dZ W + drop'(dS A), (T, in), in base_plus_low_rank's order. With `row_kernels` (CUDA):
// float32(dZ W) + drop'(dS A) through row_up_add, the sum written once; `drawn`: the row kernels'
// dropout draws (then the mask in `keep` is not used).
at::Tensor input_grad(const at::Tensor& dz, const at::Tensor& w, const at::Tensor& ds, const at::Tensor& ac,
                      const at::Tensor& keep, double p, bool row_kernels = false, const at::Tensor& drawn = {}) {
  if (row_kernels && (p == 0 || drawn.defined()) && dz.is_cuda()) {
    at::Tensor base = at::mm(dz, w);
    at::Tensor dx = row_up_add(base, ds, ac, 1.0, p, drawn);
    return dx.defined() ? dx : base.addmm_(ds, ac);
  }
  if (model::onednn_linear_fits(dz, w.t(), {})) {
    at::Tensor dx = model::linear(dz, w.t());
    return p == 0 ? dx.addmm_(ds, ac) : dx.add_(low_rank_input_grad(ds, ac, keep, p));
  }
  at::Tensor dx = low_rank_input_grad(ds, ac, keep, p);
  return dx.addmm_(dz, w);
}

// What both fused nodes record besides their saved tensors (the layer outlives the graph, one
// step, so the backward pass reaches W through it; A's and B's dtype, since the nodes save their
// compute-dtype copies), and y (T, out) shaped like x with out features.
at::Tensor finish_forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y,
                          const void* layer, double scale, at::ScalarType adapter_dtype) {
  ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["x_dtype"] = x.scalar_type();
  ctx->saved_data["x_sizes"] = x.sizes().vec();
  ctx->saved_data["adapter_dtype"] = adapter_dtype;
  std::vector<int64_t> y_sizes = x.sizes().vec();
  y_sizes.back() = y.size(-1);
  return y.view(y_sizes);
}

// dx (T, in) back in x's shape and dtype.
at::Tensor as_input_grad(torch::autograd::AutogradContext* ctx, const at::Tensor& dx) {
  return dx.view(ctx->saved_data["x_sizes"].toIntVector()).to(ctx->saved_data["x_dtype"].toScalarType());
}

// The frozen base a fused LoRA node multiplies, W (out, in) and its bias: one linear layer's, or
// those of a group of layers that read the same input, stacked by rows (GroupBase).
class FrozenBase {
 public:
  virtual ~FrozenBase() = default;
  /// NF4: W is decoded at every use.
  virtual bool quantized() const = 0;
  /// The bias in `ct`, or undefined.
  virtual at::Tensor bias(at::ScalarType ct) const = 0;
  virtual at::Tensor dense_weight(at::ScalarType ct) const = 0;
  /// dense_weight(out's dtype) written into `out` (out, in), which may be a strided view.
  virtual void dense_weight_into(const at::Tensor& out) const = 0;
};

class LayerBase final : public FrozenBase {
 public:
  explicit LayerBase(model::LinearImpl* layer) : layer_(layer) {}
  bool quantized() const override { return layer_->nf4() != nullptr; }
  at::Tensor bias(at::ScalarType ct) const override {
    return layer_->bias.defined() ? layer_->bias.to(ct) : at::Tensor();
  }
  at::Tensor dense_weight(at::ScalarType ct) const override { return layer_->dense_weight(ct); }
  void dense_weight_into(const at::Tensor& out) const override { layer_->dense_weight_into(out); }

 private:
  model::LinearImpl* layer_;
};

// The extended GEMM's buffers ([x | s S], [W | B], dY [W | B]): (rows, in + r) views whose rows lie
// ld = in + r rounded up to 8 elements apart, so that every row starts 16-byte aligned for any r
// (r = 4, or a group's summed rank 12: the row kernels and NF4's vector stores need it, and cuBLAS
// prefers leading dimensions that are multiples of 8). The padding columns are never read.
int64_t extended_ld(int64_t in, int64_t r) { return (in + r + 7) / 8 * 8; }

at::Tensor extended_buffer(int64_t rows, int64_t in, int64_t r, const at::TensorOptions& options, bool zeros = false) {
  const std::vector<int64_t> size = {rows, extended_ld(in, r)};
  return (zeros ? at::zeros(size, options) : at::empty(size, options)).narrow(1, 0, in + r);
}

// A pass's own [W | ·] buffer for an NF4 base, (out, in + r) of `options`: W decoded straight into
// its first `in` columns (the kernel writes the strided rows), the last r left for B.
at::Tensor decoded_extended(const FrozenBase& base, int64_t out, int64_t in, int64_t r,
                            const at::TensorOptions& options) {
  at::Tensor ext = extended_buffer(out, in, r, options);
  base.dense_weight_into(ext.narrow(1, 0, in));
  return ext;
}

// Layers that read the same input (q, k and v; gate and up), as one base (set_lora_group_projections):
// W = [W_1; W_2; …] (Σ out, in) and the biases likewise (zeros for a member without one). Dense
// weights live in one buffer (stack()): each member's "weight" parameter becomes a view of its rows
// (the same values, the base still stored once), so that one GEMM reads them all with no copy per
// pass. The buffer's last `extra` columns are the extended GEMM's B block.
class GroupBase final : public FrozenBase {
 public:
  explicit GroupBase(std::vector<model::LinearImpl*> members) : members(std::move(members)) {
    for (const model::LinearImpl* m : this->members) out_total += m->out_features;
  }
  int64_t in() const { return members[0]->in_features; }
  bool quantized() const override { return members[0]->nf4() != nullptr; }
  at::Tensor bias(at::ScalarType ct) const override {
    const model::LinearImpl* with = nullptr;  // a member with a bias (its device for the zeros)
    for (const model::LinearImpl* m : members) with = with != nullptr || !m->bias.defined() ? with : m;
    if (with == nullptr) return {};
    std::vector<at::Tensor> parts;
    for (const model::LinearImpl* m : members) {
      parts.push_back(m->bias.defined() ? m->bias.to(ct) : at::zeros({m->out_features}, with->bias.options().dtype(ct)));
    }
    return at::cat(parts);
  }
  at::Tensor dense_weight(at::ScalarType ct) const override {
    if (stacked()) return buffer.narrow(1, 0, in()).to(ct);
    const model::LinearImpl* m0 = members[0];
    const auto device = m0->nf4() != nullptr ? m0->nf4()->packed.device() : m0->weight.device();
    at::Tensor w = at::empty({out_total, in()}, at::TensorOptions().dtype(ct).device(device));
    dense_weight_into(w);
    return w;
  }
  void dense_weight_into(const at::Tensor& out) const override {
    int64_t row = 0;
    for (const model::LinearImpl* m : members) {
      m->dense_weight_into(out.narrow(0, row, m->out_features));
      row += m->out_features;
    }
  }
  /// Whether every member's weight is its rows of `buffer` (not after a move, a conversion, a load
  /// that replaced it, or a member's own extended buffer).
  bool stacked() const {
    if (!buffer.defined()) return false;
    int64_t row = 0;
    for (const model::LinearImpl* m : members) {
      const at::Tensor& w = m->weight;
      const at::Tensor rows = buffer.narrow(0, row, m->out_features).narrow(1, 0, in());
      if (!w.defined() || w.data_ptr() != rows.data_ptr() || w.sizes() != rows.sizes() || w.strides() != rows.strides() ||
          w.scalar_type() != buffer.scalar_type() || w.device() != buffer.device())
        return false;
      row += m->out_features;
    }
    return true;
  }
  /// The buffer (Σ out, in + extra), the members' weights made views of it where they are not yet (one
  /// copy). extra < 0: any width will do (the split GEMMs read the first `in` columns).
  const at::Tensor& stack(int64_t extra) {
    if (stacked() && (extra < 0 || buffer.size(1) == in() + extra)) return buffer;
    at::NoGradGuard no_grad;
    at::Tensor b = extra < 0 ? at::zeros({out_total, in()}, members[0]->weight.options())
                             : extended_buffer(out_total, in(), extra, members[0]->weight.options(), /*zeros=*/true);
    int64_t row = 0;
    for (model::LinearImpl* m : members) {
      at::Tensor rows = b.narrow(0, row, m->out_features).narrow(1, 0, in());
      rows.copy_(m->weight);
      m->weight.set_data(rows);
      row += m->out_features;
    }
    buffer = b;
    return buffer;
  }
  /// Gives each member's weight contiguous storage of its own again (if it is still in the buffer).
  void unstack() {
    at::NoGradGuard no_grad;
    if (stacked()) {
      for (model::LinearImpl* m : members) m->weight.set_data(m->weight.clone(at::MemoryFormat::Contiguous));
    }
    buffer = at::Tensor();
  }

  std::vector<model::LinearImpl*> members;
  int64_t out_total = 0;
  at::Tensor buffer;  ///< the stacked weights (and B block), or undefined
};

// The fused LoRA layer (see set_lora_fused in the header). Computes in the autocast dtype when
// autocast is on for the input's device (bf16 on CUDA), else in the input's dtype; returns A's and
// B's gradients in their own dtype. `w_ext_or_null`: the layer's [W | B] buffer
// (set_lora_extended_gemm), or null for the split GEMMs (not an undefined tensor: autograd
// functions take defined tensors only). For an NF4 base that buffer is this pass's own (W decoded
// into it): it is not kept for the backward pass, which decodes W into a new one, as the split
// path decodes W again. `blocks`: the ranks of the adapters whose A are stacked in `a` (grouped
// projections; empty for one layer). With dropout each block draws a mask of its own, in order, as
// separate layers do: S = [drop_1(x) A_1ᵀ | drop_2(x) A_2ᵀ | …], dA_i = dS_iᵀ drop_i(x) and
// dx = dy W + Σ_i drop_i'(dS_i A_i); the dropped copies are kept, one per block (the row kernels,
// which draw one mask, are not used then).
struct FusedLora : public torch::autograd::Function<FusedLora> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor* w_ext_or_null, const FrozenBase* layer,
                            double scale, double p, bool row_kernels, int64_t grad_splits,
                            const std::vector<int64_t>& blocks) {
    const bool per_block = p > 0 && blocks.size() > 1;
    if (per_block) row_kernels = false;
    const at::Tensor w_ext = w_ext_or_null != nullptr ? *w_ext_or_null : at::Tensor();
    const at::ScalarType ct = util::compute_dtype(x);
    const int64_t in = x.size(-1), r = a.size(0);
    const at::Tensor x_in = x.reshape({-1, in});
    const at::Tensor ac = a.to(ct);
    // Extended: the cast writes x into the first `in` columns of xs = [x | s S], (T, in + r).
    at::Tensor xs, x2, s_low;  // x2: x in the compute dtype; s_low: s S = s drop(x) Aᵀ (T, r)
    if (w_ext.defined()) {
      xs = extended_buffer(x_in.size(0), in, r, x.options().dtype(ct));
      x2 = xs.narrow(1, 0, in);
      s_low = xs.narrow(1, in, r);
    }
    // The cast another node made of this input (CastShare; split layout; not with the row kernels'
    // dropout, which reads the float32 input), else the row kernel (set_lora_row_kernels): the cast
    // and s S (dropout included) in one pass over x, else the cast alone.
    at::Tensor drawn;  // with dropout in the row kernel: its (seed, offset), to redraw the mask
    bool lowered = false;
    if (!xs.defined() && (!row_kernels || p == 0)) x2 = CastShare::find(x, ct);
    const bool shared = !xs.defined() && x2.defined();
    if (!shared) {
      lowered = row_kernels && row_cast_down(x_in, ac, scale, ct, x2, s_low, p, drawn);
      if (!lowered) {
        if (xs.defined()) {
          x2.copy_(x_in);
        } else {
          x2 = x_in.to(ct);
        }
      }
      if (!xs.defined()) CastShare::remember(x, x2);
    }
    at::Tensor h = x2, keep;  // keep: CPU: the scaled noise; CUDA: the mask; row kernels: `drawn`
    std::vector<at::Tensor> more;  // per block: (h, keep) of the blocks after the first
    if (lowered) {
      keep = drawn;  // h stays x2: the backward pass redraws drop(x2) where it needs it (dA)
    } else if (p > 0) {
      std::tie(h, keep) = aten_dropout(x2, p);
      for (std::size_t i = 1; per_block && i < blocks.size(); ++i) {
        auto [hi, ki] = aten_dropout(x2, p);
        more.push_back(hi);
        more.push_back(ki);
      }
    }
    // s S = s drop(x) Aᵀ into `out` (T, r), block by block with their own dropped copies.
    auto low_rank_into = [&](at::Tensor out) {
      if (!per_block) {
        scaled_mm_out(out, h, ac.t(), scale);
        return;
      }
      int64_t col = 0;
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        at::Tensor block = out.narrow(1, col, blocks[i]);
        scaled_mm_out(block, i == 0 ? h : more[2 * (i - 1)], ac.narrow(0, col, blocks[i]).t(), scale);
        col += blocks[i];
      }
    };
    const at::Tensor bias = layer->bias(ct);
    at::Tensor y, bc;  // B in the compute dtype
    if (xs.defined()) {
      // s S into xs's last r columns, B (cast) into w_ext's, then one GEMM over K = in + r:
      // y = [x | s S] [W | B]ᵀ (+ b). No (T, out) low-rank product is written or read back.
      if (!lowered) low_rank_into(s_low);
      // Named in profiles and tests; a user scope, so that benchmarks counting ATen calls count the
      // ones inside it.
      RECORD_USER_SCOPE("ft::lora_extended_gemm");
      bc = w_ext.narrow(1, in, r);
      bc.copy_(b);
      y = bias.defined() ? at::addmm(bias, xs, w_ext.t()) : at::mm(xs, w_ext.t());
      // With dropout the backward pass needs h, not x: s S alone is kept, so that xs is freed here
      // (the row kernels keep x2, a view of xs, and redraw h from it).
      if (p > 0 && !lowered) s_low = s_low.clone();
    } else {
      if (!lowered) {
        s_low = at::empty({x2.size(0), r}, x2.options());
        low_rank_into(s_low);
      }
      bc = b.to(ct);
      y = base_plus_low_rank(x2, layer->dense_weight(ct), bias, s_low, bc);
    }
    // A and B in the compute dtype are saved, not cast again in the backward pass (on CUDA, each
    // cast is a launch and the layer's small GEMMs are launch-bound at a few thousand tokens). The
    // extended path's B is a view of w_ext, held in saved_data: nothing writes it again before this
    // pass's backward (the next forward does, after the optimizer step).
    // ext: 0 split GEMMs, 1 the layer's persistent [W | B] (kept in saved_data), 2 this pass's
    // decoded [W | B] (NF4: only B is kept, a copy, so that the buffer is freed here).
    const int64_t ext = !xs.defined() ? 0 : layer->quantized() ? 2 : 1;
    if (ext == 2) bc = bc.clone();
    std::vector<at::Tensor> saved = {h, s_low, ac, ext == 1 ? at::Tensor() : bc, keep};
    saved.insert(saved.end(), more.begin(), more.end());
    ctx->save_for_backward(saved);
    if (per_block) ctx->saved_data["blocks"] = blocks;
    if (ext == 1) ctx->saved_data["w_ext"] = w_ext;
    ctx->saved_data["ext"] = ext;
    ctx->saved_data["p"] = p;
    ctx->saved_data["row_kernels"] = row_kernels;
    ctx->saved_data["grad_splits"] = grad_splits;
    return finish_forward(ctx, x, y, layer, scale, a.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &s_low = saved[1], &ac = saved[2], &keep = saved[4];
    const int64_t r = ac.size(0), in = ac.size(1);
    const auto* layer = reinterpret_cast<const FrozenBase*>(ctx->saved_data["layer"].toInt());
    // The extended path's [W | B] (out, in + r), or undefined (split path: B saved, W from the
    // layer). NF4: W decoded again into a new buffer, where dx is wanted (dA and dB do not read W).
    const int64_t ext = ctx->saved_data["ext"].toInt();
    at::Tensor w_ext;
    if (ext == 1) {
      w_ext = ctx->saved_data["w_ext"].toTensor();
    } else if (ext == 2 && ctx->needs_input_grad(0)) {
      w_ext = decoded_extended(*layer, saved[3].size(0), in, r, saved[3].options());
      w_ext.narrow(1, in, r).copy_(saved[3]);
    }
    const at::Tensor bc = ext == 1 ? w_ext.narrow(1, in, r) : saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    // The row kernels' dropout draws (keep's slot holds their (seed, offset) instead of a mask): h is
    // x2 then, and the dropped copy is made for dA alone.
    const at::Tensor drawn = keep.defined() && keep.scalar_type() == at::kLong ? keep : at::Tensor();
    // The row kernel adds the low-rank term while converting dx to float32 (x's dtype under autocast).
    const bool row_kernels = ctx->saved_data["row_kernels"].toBool() && (p == 0 || drawn.defined()) &&
                             ctx->saved_data["x_dtype"].toScalarType() == at::kFloat;
    const auto ct = ac.scalar_type();
    const auto adt = ctx->saved_data["adapter_dtype"].toScalarType();
    const int64_t splits = ctx->saved_data["grad_splits"].toInt();
    const at::Tensor dy = grads[0].reshape({-1, bc.size(0)}).to(ct);
    const at::Tensor db = grad_mm(dy.t(), s_low, adt, 1.0, splits);  // dYᵀ (s S), (out, r)
    at::Tensor dx, da;
    if (ctx->saved_data.count("blocks") != 0) {
      // Grouped projections with a mask per block: dS = s dY B as one product, then per block
      // dA_i = dS_iᵀ drop_i(x) and the input gradient's drop_i'(dS_i A_i).
      const std::vector<int64_t> blocks = ctx->saved_data["blocks"].toIntVector();
      at::Tensor dxs, ds;  // ds: dY B, times `sc`
      double sc = scale;
      if (w_ext.defined() && ctx->needs_input_grad(0)) {
        dxs = at::mm(dy, w_ext);  // [dY W | dY B]
        ds = dxs.narrow(1, in, r);
      } else {
        ds = scaled_mm(dy, bc, scale);
        sc = 1.0;
        if (ctx->needs_input_grad(0)) dxs = at::mm(dy, layer->dense_weight(ct));
      }
      da = at::empty({r, in}, ac.options().dtype(adt));
      at::Tensor base = ctx->needs_input_grad(0) ? dxs.narrow(1, 0, in) : at::Tensor();
      int64_t col = 0;
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        const at::Tensor& hi = i == 0 ? h : saved[5 + 2 * (i - 1)];
        const at::Tensor& ki = i == 0 ? keep : saved[6 + 2 * (i - 1)];
        const at::Tensor dsi = ds.narrow(1, col, blocks[i]);
        da.narrow(0, col, blocks[i]).copy_(grad_mm(dsi.t(), hi, adt, sc, splits));
        if (base.defined()) base.add_(low_rank_input_grad(dsi, ac.narrow(0, col, blocks[i]), ki, p, sc));
        col += blocks[i];
      }
      if (base.defined()) dx = as_input_grad(ctx, base);
    } else if (w_ext.defined() && ctx->needs_input_grad(0)) {
      // One GEMM over N = in + r reads dY once for both products: dY [W | B] = [dY W | dY B]. Then
      // dA = s (dY B)ᵀ h, and the low-rank term is added onto dY W (GEMM alphas carry s).
      at::Tensor dxs = extended_buffer(dy.size(0), in, r, w_ext.options());
      at::mm_out(dxs, dy, w_ext);
      const at::Tensor dyb = dxs.narrow(1, in, r);
      da = grad_mm(dyb.t(), dropped_input(h, drawn, p), adt, scale, splits);
      at::Tensor base = dxs.narrow(1, 0, in);
      // float32(dY W) + drop'(s (dY B) A), written once
      if (row_kernels) dx = row_up_add(base, dyb, ac, scale, p, drawn);
      if (!dx.defined() && p == 0) dx = base.addmm_(dyb, ac, /*beta=*/1.0, /*alpha=*/scale);
      if (!dx.defined()) dx = base.add_(low_rank_input_grad(dyb, ac, keep, p, scale));
      dx = as_input_grad(ctx, dx);
    } else {
      const at::Tensor ds = scaled_mm(dy, bc, scale);  // s dY B, (T, r)
      da = grad_mm(ds.t(), dropped_input(h, drawn, p), adt, 1.0, splits);  // (r, in)
      if (ctx->needs_input_grad(0)) {
        // dY W + drop'(dS A)
        dx = as_input_grad(ctx, input_grad(dy, layer->dense_weight(ct), ds, ac, keep, p, row_kernels, drawn));
      }
    }
    return {dx, da, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// DoRA's fused training path: y = b + c ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) with c = m / n and n = ||W + s B A||
// per output row, a constant (as PEFT and LoraAdapter::apply treat it). Backward: dZ = dy ⊙ c;
// dm = Σ_rows dy ⊙ Z / n; dS = s dZ B; dB = s dZᵀ S; dA = dSᵀ x; dx = dZ W + dS A. Saves x, s S,
// Z = x Wᵀ + s S Bᵀ (which dm needs) and c. PEFT's chain makes x Wᵀ, B(A(x)), its scaled copy, the
// two products with c and their sum as separate (…, out) tensors, and differentiates each.
//
// With dropout p > 0, PEFT multiplies W by both x and its dropped-out copy h (the base layer reads x,
// the DoRA term h): y = x Wᵀ + b + (c − 1) ⊙ (h Wᵀ) + c ⊙ s (h Aᵀ) Bᵀ. With Z = h Wᵀ + s S Bᵀ
// (S = h Aᵀ) that is y = (x − h) Wᵀ + c ⊙ Z + b: two GEMMs with W, as PEFT's, and (c − 1) never
// formed in the compute dtype (where c ≈ 1 it would round away). Backward: dZ = dy ⊙ c,
// dm = Σ_rows dy ⊙ Z / n, dS = s dZ B, dB = s dZᵀ S, dA = dSᵀ h, and
// dx = dy W + drop'((dy ⊙ (c − 1)) W + dS A), with c − 1 formed in float32 from m / n. Saves h (and
// the mask), s S, Z and c instead of PEFT's chain's products. The row kernels are not used with
// dropout here (h itself is a GEMM operand).
struct FusedDora : public torch::autograd::Function<FusedDora> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& magnitude, const at::Tensor& norm,
                            const at::Tensor* w_or_null, model::LinearImpl* layer, double scale, double p,
                            bool row_kernels, int64_t grad_splits) {
    const at::ScalarType ct = util::compute_dtype(x);
    const int64_t in = x.size(-1);
    const at::Tensor x_in = x.reshape({-1, in});
    const at::Tensor ac = a.to(ct), bc = b.to(ct);
    // x in the compute dtype: another node's cast of this input (CastShare), or the row kernel
    // (set_lora_row_kernels: the cast and s x Aᵀ in one pass over x; without dropout), or the cast.
    at::Tensor x2 = CastShare::find(x, ct), s_low;  // s_low: s h Aᵀ
    const bool lowered_ok = row_kernels && p == 0;
    if (!x2.defined()) {
      at::Tensor no_draws;
      if (!(lowered_ok && row_cast_down(x_in, ac, scale, ct, x2, s_low, 0.0, no_draws))) x2 = x_in.to(ct);
      CastShare::remember(x, x2);
    }
    at::Tensor h = x2, keep;  // keep: CPU: the scaled noise; CUDA: the mask
    if (p > 0) std::tie(h, keep) = aten_dropout(x2, p);
    if (!s_low.defined()) s_low = scaled_mm(h, ac.t(), scale);
    // W in the compute dtype: given (an NF4 base, decoded once for the row norms and these GEMMs)
    // or the layer's.
    const at::Tensor w = w_or_null != nullptr ? *w_or_null : layer->dense_weight(ct);
    const at::Tensor z = base_plus_low_rank(h, w, at::Tensor(), s_low, bc);
    const at::Tensor c = (magnitude.detach() / norm).to(ct);
    at::Tensor y = z * c;
    if (layer->bias.defined()) y.add_(layer->bias.to(ct));
    if (p > 0) y.addmm_(x2 - h, w.t());  // (x − h) Wᵀ: the base layer's x Wᵀ less the h Wᵀ inside Z
    ctx->save_for_backward({h, s_low, z, ac, bc, c, magnitude, norm, keep});
    ctx->saved_data["p"] = p;
    ctx->saved_data["row_kernels"] = row_kernels;
    ctx->saved_data["grad_splits"] = grad_splits;
    return finish_forward(ctx, x, y, layer, scale, a.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &s_low = saved[1], &z = saved[2], &ac = saved[3], &bc = saved[4], &c = saved[5],
                     &magnitude = saved[6], &norm = saved[7], &keep = saved[8];
    auto* layer = reinterpret_cast<model::LinearImpl*>(ctx->saved_data["layer"].toInt());
    const double scale = ctx->saved_data["scale"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    const at::ScalarType ct = z.scalar_type();
    const auto adt = ctx->saved_data["adapter_dtype"].toScalarType();
    const at::Tensor dy = grads[0].reshape({-1, bc.size(0)}).to(ct);
    const at::Tensor dz = dy * c;
    // dm in the magnitude's precision (float32 at least), summed over the rows.
    const at::ScalarType mt = at::promote_types(magnitude.scalar_type(), at::kFloat);
    const at::Tensor dm = ((dy.to(mt) * z.to(mt)).sum(0) / norm.to(mt)).to(magnitude.scalar_type());
    const at::Tensor ds = scaled_mm(dz, bc, scale);  // s dZ B
    const int64_t splits = ctx->saved_data["grad_splits"].toInt();
    const at::Tensor db = grad_mm(dz.t(), s_low, adt, 1.0, splits);  // dZᵀ (s S)
    const at::Tensor da = grad_mm(ds.t(), h, adt, 1.0, splits);
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor w = layer->dense_weight(ct);
      if (p > 0) {
        // dy W + drop'((dy ⊙ (c − 1)) W + dS A), c − 1 from m / n in float32.
        const at::Tensor c1 = (magnitude.detach().to(mt) / norm.to(mt) - 1.0).to(ct);
        const at::Tensor inner = dropout_backward(at::mm(dy * c1, w).addmm_(ds, ac), keep, p);
        dx = as_input_grad(ctx, inner.addmm_(dy, w));
      } else {
        // The row kernel adds dS A while converting dx to float32 (x's dtype under autocast).
        const bool row_kernels =
            ctx->saved_data["row_kernels"].toBool() && ctx->saved_data["x_dtype"].toScalarType() == at::kFloat;
        dx = as_input_grad(ctx, input_grad(dz, w, ds, ac, at::Tensor(), 0.0, row_kernels));
      }
    }
    return {dx, da, db, dm, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class LoraAdapter final : public model::LinearAdapter {
 public:
  LoraAdapter(model::LinearImpl* owner, torch::nn::Linear a, torch::nn::Linear b, LoraLayer info, double dropout)
      : owner_(owner), A(std::move(a)), B(std::move(b)), info(std::move(info)), dropout_(dropout) {}

  // The fused node in training, also without gradients: activation checkpointing's forward pass
  // runs without them, and its recomputation (with them) must take the same path to draw the same
  // dropout masks.
  at::Tensor forward(const at::Tensor& x) override {
    if (!fused || merged || !owner_->is_training()) return {};
    // (The fused node treats the base's bias as frozen: a trained one (LoraOptions::bias) takes the
    // chain, whose linear layer gives it its gradient.)
    if (owner_->bias.defined() && owner_->bias.requires_grad()) return {};
    // Autocast aside, the unfused path computes in A's dtype; the fused one needs x to match it.
    if (!at::autocast::is_autocast_enabled(x.device().type()) && x.scalar_type() != A->weight.scalar_type()) return {};
    if (magnitude.defined()) {
      // An NF4 base decoded once, for the row norms and both of the node's forward GEMMs.
      const at::Tensor w_nf4 = owner_->nf4() != nullptr ? owner_->dense_weight(util::compute_dtype(x)) : at::Tensor();
      return FusedDora::apply(x, A->weight, B->weight, magnitude, training_row_norm(w_nf4),
                              w_nf4.defined() ? &w_nf4 : nullptr, owner_, info.scale,
                              dropout_, row_kernels, grad_splits);
    }
    const at::Tensor w_ext = extended_weight(x);
    return FusedLora::apply(x, A->weight, B->weight, w_ext.defined() ? &w_ext : nullptr, &base_, info.scale, dropout_,
                            row_kernels, grad_splits, std::vector<int64_t>());
  }

  // set_lora_group_projections: `members` (this adapter's layer among them) as one fused node over
  // their stacked weights, where all of them can take it: each is LoRA-adapted on the fused path
  // (not merged, no DoRA, the same dropout and path options) or frozen without an adapter, and they
  // share the input width, the weights' storage kind, dtype and device. The node is FusedLora's with
  // A = [A_1; A_2; …] (R, in), B block-diagonal (Σ out, R), block i = B_i · s_i / s, and W, b
  // stacked (GroupBase): y = x Wᵀ + b + s (x Aᵀ) Bᵀ gives every member's output in one GEMM (the
  // extended GEMM's [x | s S] [W | B]ᵀ too), and dx = dy W + s (dy B) A every member's input gradient
  // in one, with dy the members' output gradients side by side. A member without an adapter has a
  // zero block row. dB comes out whole (Σ out, R), the blocks off the diagonal computed and dropped.
  // With dropout each adapter's block of S has a mask of its own (FusedLora's `blocks`), drawn in the
  // members' order, as separate layers draw them.
  std::vector<at::Tensor> forward_group(const std::vector<model::LinearImpl*>& members, const at::Tensor& x,
                                        bool split) override {
    if (!group || !fused || merged || !owner_->is_training() || members.size() < 2) return {};
    if (!at::autocast::is_autocast_enabled(x.device().type()) && x.scalar_type() != A->weight.scalar_type()) return {};
    const model::LinearImpl* first = members[0];
    const bool nf4 = first->nf4() != nullptr;
    std::vector<LoraAdapter*> lora(members.size(), nullptr);
    for (std::size_t i = 0; i < members.size(); ++i) {
      const model::LinearImpl* m = members[i];
      if (m->in_features != first->in_features || (m->nf4() != nullptr) != nf4) return {};
      if (nf4) {
        if (m->nf4()->shape.size() != 2 || m->nf4()->packed.device() != x.device()) return {};
      } else {
        const at::Tensor& w = m->weight;
        if (!w.defined() || w.dim() != 2 || w.layout() != at::kStrided || w.requires_grad() ||
            w.scalar_type() != first->weight.scalar_type() || w.device() != x.device())
          return {};
      }
      if (m->bias.defined() && (m->bias.requires_grad() || m->bias.device() != x.device())) return {};
      if (m->adapter() == nullptr) continue;
      auto* a = dynamic_cast<LoraAdapter*>(m->adapter());
      if (a == nullptr || !a->group || !a->fused || a->merged || a->magnitude.defined() || a->dropout_ != dropout_ ||
          a->extend != extend || a->row_kernels != row_kernels || a->grad_splits != grad_splits ||
          a->A->weight.scalar_type() != A->weight.scalar_type())
        return {};
      lora[i] = a;
    }
    GroupBase* base = nullptr;
    for (const auto& g : groups_) {
      if (g->members == members) base = g.get();
    }
    if (base == nullptr) base = groups_.emplace_back(std::make_unique<GroupBase>(members)).get();
    // A stacked, B block-diagonal, through autograd (A's and B's gradients are slices of the node's).
    std::vector<at::Tensor> as;
    std::vector<int64_t> blocks;  // the adapters' ranks, in order
    for (const LoraAdapter* a : lora) {
      if (a != nullptr) blocks.push_back(a->info.r);
    }
    const int64_t rank = std::accumulate(blocks.begin(), blocks.end(), int64_t{0});
    std::vector<at::Tensor> b_rows;
    int64_t col = 0;
    for (std::size_t i = 0; i < members.size(); ++i) {
      const LoraAdapter* a = lora[i];
      if (a == nullptr) {
        b_rows.push_back(at::zeros({members[i]->out_features, rank}, B->weight.options()));
        continue;
      }
      as.push_back(a->A->weight);
      at::Tensor bi = a->B->weight;
      if (a->info.scale != info.scale) bi = bi * (a->info.scale / info.scale);
      b_rows.push_back(at::constant_pad_nd(bi, {col, rank - col - a->info.r}));
      col += a->info.r;
    }
    const at::Tensor a_cat = at::cat(as), b_diag = at::cat(b_rows);
    // The extended GEMM's [W | B] (as LoraAdapter::extended_weight decides), else W stacked for the
    // split GEMMs.
    const at::ScalarType ct = util::compute_dtype(x);
    at::Tensor w_ext;
    if (extend && x.scalar_type() != ct) {
      if (nf4) {
        w_ext = decoded_extended(*base, base->out_total, base->in(), rank, x.options().dtype(ct));
      } else if (first->weight.scalar_type() == ct) {
        w_ext = base->stack(rank);
      }
    }
    if (!w_ext.defined() && !nf4) base->stack(-1);
    // Named in profiles and tests.
    RECORD_USER_SCOPE("ft::lora_grouped_projections");
    const at::Tensor y = FusedLora::apply(x, a_cat, b_diag, w_ext.defined() ? &w_ext : nullptr,
                                          static_cast<const FrozenBase*>(base), info.scale, dropout_, row_kernels,
                                          grad_splits, blocks);
    if (!split) return {y};
    std::vector<int64_t> sizes;
    for (const model::LinearImpl* m : members) sizes.push_back(m->out_features);
    return at::split_with_sizes(y, sizes, -1);
  }

  // The float32 input under autocast in training, not the model's shared cast of it
  // (set_shared_input_cast): where the fused path folds work into its own cast (the extended GEMM,
  // the row kernels), and where PEFT's chain runs (it reads x twice, through the base and through
  // A, so that a compute-dtype x would have its two gradients summed in the compute dtype; and it
  // drops out the float32 input, as PEFT does).
  bool wants_float_input() const override {
    if (merged || !owner_->is_training()) return false;
    return !fused || extend || row_kernels;
  }

  at::Tensor apply(const at::Tensor& x, const at::Tensor& base) override {
    if (merged) return base;
    at::Tensor h = x.to(A->weight.scalar_type());
    const bool drop = dropout_ > 0 && owner_->is_training();
    if (drop) h = at::dropout(h, dropout_, /*train=*/true);
    if (!magnitude.defined()) return base + (B(A(h)) * info.scale).to(base.scalar_type());
    // DoRA, as PEFT computes it: the adapted weight's row norms are treated as constants (DoRA
    // paper, section 4.3); base_nb is x Wᵀ without the bias (of the dropped-out input in training).
    const at::Tensor scale_rows = (magnitude / row_norm(/*detach=*/true)).view({1, -1});
    at::Tensor base_nb;
    if (drop) {
      base_nb = at::linear(h, owner_->dense_weight(h.scalar_type()));
    } else {
      base_nb = owner_->bias.defined() ? base - owner_->bias : base;
      base_nb = base_nb.to(h.scalar_type());
    }
    const at::Tensor dora = (scale_rows - 1) * base_nb + scale_rows * B(A(h)) * info.scale;
    return base + dora.to(base.scalar_type());
  }

  /// The [W | B] buffer (out, in + r) of the extended GEMM (set_lora_extended_gemm), or undefined
  /// where this call takes the split GEMMs: extension off, a non-2-D weight, a dense weight not
  /// stored in the compute dtype, or an input already in it (the cast that writes [x | s S] is then a
  /// copy the split path does not make). Built on first use: W is copied into the buffer's first
  /// `in` columns and the "weight" parameter becomes a view of them (same values, no second copy of
  /// the base); rebuilt if the weight was replaced since (moved, converted, loaded anew).
  /// An NF4 base (QLoRA) gets a buffer of this call's own instead: W is decoded at every pass
  /// anyway, and decoding it into the first `in` columns of an (out, in + r) buffer costs what
  /// decoding it into an (out, in) one costs, so QLoRA's forward pass is one GEMM too.
  at::Tensor extended_weight(const at::Tensor& x) {
    if (!extend) return {};
    const at::ScalarType ct = util::compute_dtype(x);
    if (x.scalar_type() == ct) return {};
    const int64_t in = owner_->in_features, r = info.r;
    if (const adapt::NF4Tensor* q = owner_->nf4(); q != nullptr) {
      if (q->shape.size() != 2 || q->packed.device() != x.device()) return {};
      return decoded_extended(base_, owner_->out_features, in, r, x.options().dtype(ct));
    }
    at::Tensor& w = owner_->weight;
    if (!w.defined() || w.dim() != 2 || w.scalar_type() != ct || w.layout() != at::kStrided || w.device() != x.device())
      return {};
    if (w_ext.defined() && w.data_ptr() == w_ext.data_ptr() && w.stride(0) == extended_ld(in, r) && w.stride(1) == 1 &&
        w.size(1) == in && w_ext.device() == w.device() && w_ext.scalar_type() == ct)
      return w_ext;
    at::NoGradGuard no_grad;
    at::Tensor ext = extended_buffer(owner_->out_features, in, r, w.options(), /*zeros=*/true);
    ext.narrow(1, 0, in).copy_(w);
    w.set_data(ext.narrow(1, 0, in));
    w_ext = ext;
    return w_ext;
  }

  /// ||W + scale · B A|| per output row (float32, or float64 for a float64 base).
  at::Tensor row_norm(bool detach) const {
    const auto type = owner_->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor lora = at::matmul(B->weight.to(type), A->weight.to(type));
    if (detach) lora = lora.detach();
    return at::linalg_vector_norm(owner_->dense_weight(type).detach() + lora * info.scale, 2, {1}).detach();
  }

  /// row_norm(true) for the fused node through dora_row_norm (no W + s B A formed), with ||W_i||²
  /// computed once, until W changes (merged, loaded, moved, replaced). `decoded`: an NF4 base's W,
  /// decoded by the caller (which uses it for its GEMMs too).
  at::Tensor training_row_norm(const at::Tensor& decoded) {
    const auto type = owner_->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::NoGradGuard no_grad;
    const adapt::NF4Tensor* q = owner_->nf4();
    const at::Tensor w = q != nullptr ? decoded : owner_->weight;
    const void* key = q != nullptr ? q->packed.data_ptr() : w.data_ptr();
    const int64_t version = q != nullptr ? q->packed._version() : w._version();
    if (!w_sq.defined() || w_sq_key != key || w_sq_version != version || w_sq.device() != w.device() ||
        w_sq.scalar_type() != type) {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      w_sq = w.to(type).pow(2).sum(1);
      w_sq_key = key;
      w_sq_version = version;
    }
    return dora_row_norm(w, A->weight.detach(), B->weight.detach(), info.scale, w_sq);
  }

  /// scale · B A, in float32 (float64 for a float64 base), shaped like the base weight.
  at::Tensor delta() const {
    const auto type = owner_->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::matmul(B->weight.to(type), A->weight.to(type)) * info.scale;
  }

  model::LinearImpl* owner_;
  torch::nn::Linear A, B;
  at::Tensor magnitude;  ///< DoRA's lora_magnitude_vector (out), or undefined for plain LoRA
  at::Tensor dora_factor;  ///< m / ||W + ΔW|| at merge time, to unmerge exactly
  LoraLayer info;
  double dropout_;
  bool merged = false;
  bool fused = true;
  bool extend = false;  ///< set_lora_extended_gemm
  bool row_kernels = false;  ///< set_lora_row_kernels
  int64_t grad_splits = 1;   ///< set_lora_grad_splits
  bool group = false;        ///< set_lora_group_projections
  LayerBase base_{owner_};   ///< the fused node's frozen base: this layer
  std::vector<std::unique_ptr<GroupBase>> groups_;  ///< the groups led by this adapter (forward_group)
  at::Tensor w_ext;     ///< [W | B] in the compute dtype, (out, in + r); W's storage once built
  at::Tensor w_sq;      ///< ||W_i||² per row for training_row_norm, and what it was computed from
  const void* w_sq_key = nullptr;
  int64_t w_sq_version = -1;
};

/// The layer index PEFT reads from a module name for layers_to_transform: the number after the
/// first "<pattern>." (any pattern of layers_pattern; with none, after any first dotted segment),
/// or -1.
int64_t layer_index(const std::string& name, const std::vector<std::string>& layers_pattern) {
  std::smatch m;
  if (layers_pattern.empty()) {
    if (std::regex_search(name, m, std::regex(R"(^.*?\.[^.]*\.(\d+)\.)"))) return std::stoll(m[1].str());
    return -1;
  }
  for (const auto& p : layers_pattern) {
    if (std::regex_search(name, m, std::regex("^(?:.*?\\.)?" + p + "\\.(\\d+)\\."))) return std::stoll(m[1].str());
  }
  return -1;
}

/// Throws ft::Error naming `what` unless `p` is a regular expression.
void check_regex(const std::string& what, const std::string& p) {
  try {
    std::regex check(p);
  } catch (const std::regex_error& e) {
    FT_FAIL("[lora] ", what, " '", p, "' is not a regular expression (PEFT reads it as one): ", e.what());
  }
}

/// PEFT's check_target_module_exists for a list of names (or its regex form): a module that
/// modules_to_save names (or one inside it) is never a target; a listed name matched exactly is;
/// one matched as a suffix (or by all-linear) only in the layers of layers_to_transform, if given.
// EXPERT PARAMETERS. transformers 5 keeps a sparse layer's experts as two 3-D parameters,
// model.layers.N.mlp.experts.gate_up_proj (E, 2I, H: each expert's gate rows, then its up rows) and
// .down_proj (E, H, I), registered in that order; PEFT's target_parameters adapts each with one
// ParamWrapper: lora_A (E·r, in) whose rows e·r + j are expert e's A, lora_B (out, r·E) whose
// columns j·E + e are its B, and the two wrappers on one module nest (the first-registered
// parameter's inside, under ".base_layer"). libft keeps each expert's projections as linear layers
// (Mixtral's block_sparse_moe.experts.e.w1/w3/w2, the others' mlp.experts.e.gate/up/down_proj): an
// adapted gate_up_proj is an adapter on each expert's gate and up layers, sharing A and splitting B's
// rows, so the same ΔW exactly. gpt-oss's gate_up_proj (E, H, 2I, multiplied from the left, which
// PEFT reads through the module's is_transposed: A (E·r, H) and B (2I, r·E) all the same)
// interleaves gate and up, so B's gate rows are 2j and its up rows 2j + 1 (gate_up_rows).
// A router's model.layers.N.mlp.gate.weight (E, H), a 2-D parameter
// of a TopKRouter module there (PEFT's all-linear on Mixtral, Qwen3-MoE and OLMoE ends up adapting it
// so), is an ordinary LoRA on libft's router layer.
struct ExpertProjection {
  std::string module;  ///< PEFT's module: model.layers.N.mlp.experts (or .mlp.gate, a router)
  std::string key;     ///< PEFT's parameter: module + ".gate_up_proj", ".down_proj" (or ".weight")
  int64_t expert = 0;
  int part = 0;  ///< 0 gate, 1 up (the gate_up_proj rows [0, I) and [I, 2I)), 2 down, 3 the router
};

std::optional<ExpertProjection> expert_projection(const std::string& name) {
  static const std::regex re(R"(model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj))");
  static const std::regex router(R"(model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate)");
  std::smatch m;
  if (std::regex_match(name, m, router)) {
    ExpertProjection p;
    p.module = "model.layers." + m[1].str() + ".mlp.gate";
    p.key = p.module + ".weight";
    p.part = 3;
    return p;
  }
  if (!std::regex_match(name, m, re)) return std::nullopt;
  ExpertProjection p;
  p.module = "model.layers." + m[1].str() + ".mlp.experts";
  p.expert = std::stoll(m[2].str());
  const std::string proj = m[3].str();
  p.part = proj == "w1" || proj == "gate_proj" ? 0 : proj == "w3" || proj == "up_proj" ? 1 : 2;
  p.key = p.module + (p.part == 2 ? ".down_proj" : ".gate_up_proj");
  return p;
}

// The rows of a gate_up_proj adapter's B (2I, r) that belong to gate (part 0) or up (part 1): the
// first or second half, or (gpt-oss, `interleaved`) the even or odd rows.
at::Tensor gate_up_rows(const at::Tensor& b, int part, bool interleaved) {
  const int64_t rows = b.size(0) / 2;
  return interleaved ? b.slice(0, part, 2 * rows, 2) : b.narrow(0, part * rows, rows);
}

// Whether `name` is one expert's projection in a mixture of experts: its own linear layer here, a
// slice of a 3-D parameter in transformers 5.
bool is_expert_projection(const std::string& name) {
  const auto p = expert_projection(name);
  return p && p->part < 3;
}

bool is_target(const std::string& name, const LoraOptions& o, bool is_head) {
  if (!o.exclude_regex.empty() && std::regex_match(name, std::regex(o.exclude_regex))) return false;
  for (const auto& e : o.exclude_modules) {
    if (name == e || name.ends_with("." + e)) return false;
  }
  for (const auto& m : o.modules_to_save) {
    if (std::regex_match(name, std::regex("(.*\\.)?(" + m + ")(\\..*)?"))) return false;
  }
  if (!o.target_regex.empty()) return std::regex_match(name, std::regex(o.target_regex));
  bool suffix = false;
  for (const auto& t : o.targets) {
    if (t == "all-linear") {
      // libft's all-linear: every expert, no router. PEFT's on transformers 5's modules: every
      // nn.Linear, which the experts (3-D parameters) and the routers (TopKRouter modules) are not,
      // but Qwen2-MoE's shared_expert_gate is.
      suffix |= !is_head && (o.all_linear_as_peft ? !is_expert_projection(name) &&
                                                        (!is_router(name) || name.ends_with("shared_expert_gate"))
                                                  : !is_router(name));
      continue;
    }
    if (name == t) return true;
    suffix |= name.ends_with("." + t);
  }
  if (!suffix || o.layers_to_transform.empty()) return suffix;
  const int64_t layer = layer_index(name, o.layers_pattern);
  return std::find(o.layers_to_transform.begin(), o.layers_to_transform.end(), layer) != o.layers_to_transform.end();
}

LoraOptions single_target(const std::string& t) {
  LoraOptions o;
  o.targets = {t};
  return o;
}

/// PEFT's get_pattern_key: the first pattern p with re.match(r"(.*\.)?(p)$", name).
template <typename T>
const T* pattern_value(const std::vector<std::pair<std::string, T>>& patterns, const std::string& name) {
  for (const auto& [p, v] : patterns) {
    if (std::regex_match(name, std::regex("(.*\\.)?(" + p + ")"))) return &v;
  }
  return nullptr;
}

// PEFT's matching of target_parameters: the whole name, or a suffix after a dot.
bool parameter_targeted(const LoraOptions& o, const std::string& key) {
  for (const auto& t : o.target_parameters) {
    if (key == t || key.ends_with("." + t)) return true;
  }
  return false;
}

// The expert projection `name` is, where target_parameters adapts its parameter.
std::optional<ExpertProjection> targeted_expert(const LoraOptions& o, const std::string& name) {
  if (o.target_parameters.empty()) return std::nullopt;
  auto p = expert_projection(name);
  if (!p || !parameter_targeted(o, p->key)) return std::nullopt;
  return p;
}

// PEFT's key of a parameter adapter's tensor ("lora_A" or "lora_B"): nested under one ".base_layer"
// when the module's down_proj is adapted too (gate_up_proj, registered first, is then the inner one).
std::string parameter_tensor_key(const ExpertProjection& p, bool down_adapted_too, const char* which) {
  return std::string(kPeftPrefix) + p.module + (p.part < 2 && down_adapted_too ? ".base_layer" : "") + "." + which +
         ".weight";
}

void check_target_parameters(const std::vector<std::string>& entries, const std::string& where) {
  for (const auto& t : entries) {
    // (as PEFT matches them: the whole name or a suffix after a dot; PEFT's own conversion writes the
    // bare "gate_up_proj", "down_proj" and "gate.weight")
    auto names = [&](const std::string& tail) { return t == tail || t.ends_with("." + tail); };
    FT_CHECK(names("gate_up_proj") || names("down_proj") || names("gate.weight"),
             "[lora] ", where, ": target_parameters entry '", t,
             "' is not supported: libft adapts transformers 5's expert weights (mlp.experts.gate_up_proj, "
             "mlp.experts.down_proj) and routers (mlp.gate.weight), no other parameter");
  }
}

std::vector<std::pair<std::string, LoraAdapter*>> adapters(model::CausalLM& model) {
  std::vector<std::pair<std::string, LoraAdapter*>> v;
  for (const auto& item : model->named_modules()) {
    auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
    if (lin == nullptr) continue;
    if (auto* a = dynamic_cast<LoraAdapter*>(lin->adapter())) v.emplace_back(item.key(), a);
  }
  return v;
}

// BIASES. The base's biases that LoraOptions::bias trains, under PEFT's keys (an adapted layer's
// bias sits in its base_layer there): every linear layer's for "all" (PEFT's
// mark_only_lora_as_trainable: each parameter named *bias*), but those of the modules that
// modules_to_save trains in full (saved with their module); the layers in `adapted` for
// "lora_only".
std::vector<std::pair<std::string, at::Tensor>> trained_biases(model::CausalLM& model, const LoraOptions& o,
                                                               const std::set<std::string>& adapted) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (o.bias == "none") return out;
  FT_CHECK(o.bias == "all" || o.bias == "lora_only", "[lora] bias must be none, all or lora_only, got '", o.bias, "'");
  FT_CHECK(o.target_parameters.empty(), "[lora] bias = ", o.bias,
           " with target_parameters (PEFT's expert adapters) is not supported");
  // (PEFT's all would train gpt-oss's fused expert biases, gate_up_proj_bias and down_proj_bias,
  // under keys of its 3-D parameters)
  FT_CHECK(o.bias != "all" || !model->config().gpt_oss(), "[lora] bias = all on gpt_oss (whose experts' biases "
           "PEFT keeps as 3-D parameters) is not supported; lora_only is");
  std::set<std::string> full;
  for (const auto& [name, p] : modules_to_save_parameters(model, o.modules_to_save)) full.insert(name);
  for (const auto& item : model->named_modules()) {
    auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
    if (lin == nullptr || !lin->bias.defined() || full.count(item.key() + ".bias")) continue;
    const bool is_adapted = adapted.count(item.key()) > 0;
    if (o.bias == "lora_only" && !is_adapted) continue;
    out.emplace_back(kPeftPrefix + item.key() + (is_adapted ? ".base_layer.bias" : ".bias"), lin->bias);
  }
  return out;
}

std::set<std::string> adapted_names(model::CausalLM& model) {
  std::set<std::string> names;
  for (const auto& [name, a] : adapters(model)) names.insert(name);
  return names;
}

}  // namespace

bool is_router(const std::string& name) {
  return name.ends_with("block_sparse_moe.gate") || name.ends_with("mlp.gate") || name.ends_with("mlp.shared_expert_gate") ||
         name.ends_with("mlp.router");
}

std::vector<std::pair<std::string, at::Tensor>> modules_to_save_parameters(model::CausalLM& model,
                                                                         const std::vector<std::string>& entries) {
  std::vector<std::pair<std::string, at::Tensor>> params;
  if (entries.empty()) return params;
  // A module inside an adapter (q_proj.lora_A) is the adapter's, not the base's.
  auto in_adapter = [](const std::string& name) {
    for (const char* part : {".lora_A", ".lora_B", ".lora_magnitude_vector"}) {
      const size_t at = name.find(part);
      if (at != std::string::npos && (at + std::strlen(part) == name.size() || name[at + std::strlen(part)] == '.'))
        return true;
    }
    return false;
  };
  std::vector<std::string> matched;
  for (const std::string& entry : entries) {
    FT_CHECK(!entry.empty(), "[lora] modules_to_save: an entry is empty");
    check_regex("modules_to_save:", entry);  // as PEFT keeps it out of the targets
    bool hit = false;
    for (const auto& item : model->named_modules("", false)) {
      const std::string& name = item.key();
      if (name.empty() || in_adapter(name) || !name.ends_with(entry)) continue;
      hit = true;
      if (std::find(matched.begin(), matched.end(), name) == matched.end()) matched.push_back(name);
    }
    FT_CHECK(hit, "[lora] modules_to_save: '", entry, "' matches no module of the model (a module matches when its ",
             "name ends with it: lm_head, model.embed_tokens, model.norm)");
  }
  auto under = [](const std::string& name, const std::string& module) {
    return name.size() > module.size() && name.compare(0, module.size(), module) == 0 && name[module.size()] == '.';
  };
  for (const std::string& m : matched) {
    FT_CHECK(!(model->config().tie_word_embeddings && (m == "model.embed_tokens" || under("model.embed_tokens", m))),
             "[lora] modules_to_save: ", m, " holds the embeddings, which this model ties to its output head: ",
             "untie them first (untie_for_modules_to_save)");
    for (const auto& item : model->named_modules("", false)) {
      auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
      if (lin != nullptr && (item.key() == m || under(item.key(), m)))
        FT_CHECK(lin->nf4() == nullptr, "[lora] modules_to_save: ", item.key(), " is stored in NF4 (QLoRA) and cannot ",
                 "train in full");
    }
  }
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    if (in_adapter(name)) continue;
    for (const std::string& m : matched) {
      if (under(name, m)) {
        params.emplace_back(name, item.value());
        break;
      }
    }
  }
  return params;
}

bool untie_for_modules_to_save(model::CausalLM& model, const std::vector<std::string>& entries) {
  if (!model->config().tie_word_embeddings) return false;
  for (const std::string& e : entries) {
    if (!e.empty() && (std::string_view("lm_head").ends_with(e) || std::string_view("model.embed_tokens").ends_with(e))) {
      model->untie_embeddings();
      return true;
    }
  }
  return false;
}

namespace {
// What the first decoder layer's linear layers are called, for messages about targets that match
// nothing: "(layer 0's linear layers: self_attn.q_proj, ...)", and for a model whose projections
// are packed (Phi-3) what they pack.
std::string layer_names_hint(model::CausalLM& model) {
  const std::string prefix = "model.layers.0.";
  std::string names;
  for (const auto& item : model->named_modules("", false)) {
    if (dynamic_cast<model::LinearImpl*>(item.value().get()) == nullptr || !item.key().starts_with(prefix)) continue;
    names += (names.empty() ? "" : ", ") + item.key().substr(prefix.size());
  }
  std::string hint = " (layer 0's linear layers: " + names + ")";
  if (model->config().packed_projections()) {
    hint += "; " + model->config().model_type +
            " packs q, k and v into qkv_proj and gate and up into gate_up_proj, which are adapted whole, as PEFT does";
  }
  return hint;
}
}  // namespace

std::vector<LoraLayer> apply_lora(model::CausalLM& model, const LoraOptions& o) {
  FT_CHECK(o.r > 0, "[lora] r must be > 0, got ", o.r);
  FT_CHECK(std::isfinite(o.alpha) && o.alpha > 0, "[lora] alpha must be > 0, got ", o.alpha);
  FT_CHECK(o.dropout >= 0 && o.dropout < 1, "[lora] dropout must be in [0, 1), got ", o.dropout);
  FT_CHECK(o.init == "kaiming" || o.init == "gaussian", "[lora] init must be kaiming or gaussian, got '", o.init, "'");
  FT_CHECK(!o.targets.empty() || !o.target_regex.empty() || !o.target_parameters.empty(), "[lora] no target modules");
  check_target_parameters(o.target_parameters, "options");
  FT_CHECK(adapters(model).empty(), "[lora] the model already has LoRA adapters");
  for (const auto& p : o.layers_pattern) check_regex("layers_pattern", p);
  if (!o.exclude_regex.empty()) check_regex("exclude_modules", o.exclude_regex);
  for (const auto& e : o.exclude_modules) FT_CHECK(!e.empty(), "[lora] exclude_modules: an empty entry");
  for (const int64_t l : o.layers_to_transform) FT_CHECK(l >= 0, "[lora] layers_to_transform holds ", l, "; layers count from 0");
  untie_for_modules_to_save(model, o.modules_to_save);
  const auto saved = modules_to_save_parameters(model, o.modules_to_save);
  for (auto& p : model->parameters()) p.set_requires_grad(false);

  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  std::vector<LoraLayer> layers;
  std::set<std::string> used_targets;
  std::set<std::string> hit_parameters;
  // (gate_up key, expert) → the gate's layer and its A module, which the up layer's adapter shares
  std::map<std::pair<std::string, int64_t>, std::pair<std::string, torch::nn::Linear>> shared_a;
  for (const auto& item : model->named_modules()) {
    auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
    const std::string& name = item.key();
    if (lin == nullptr) continue;
    // An expert projection whose 3-D parameter target_parameters names: rank and alpha by that
    // parameter's name, as PEFT looks them up.
    const std::optional<ExpertProjection> expert = targeted_expert(o, name);
    if (!expert && !is_target(name, o, name == "lm_head")) continue;
    if (expert) hit_parameters.insert(expert->key);
    LoraLayer info;
    info.module = name;
    const std::string& pattern_name = expert ? expert->key : name;
    const int64_t* r = pattern_value(o.rank_pattern, pattern_name);
    const double* alpha = pattern_value(o.alpha_pattern, pattern_name);
    info.r = r ? *r : o.r;
    info.alpha = alpha ? *alpha : o.alpha;
    FT_CHECK(info.r > 0, "[lora] rank_pattern gives ", name, " rank ", info.r);
    info.scale = o.rslora ? info.alpha / std::sqrt(static_cast<double>(info.r)) : info.alpha / static_cast<double>(info.r);

    const auto device = lin->weight.device();
    torch::nn::Linear a(torch::nn::LinearOptions(lin->in_features, info.r).bias(false));
    torch::nn::Linear b(torch::nn::LinearOptions(info.r, lin->out_features).bias(false));
    {
      at::NoGradGuard no_grad;
      at::Tensor wa = at::empty({info.r, lin->in_features}, at::kFloat);
      if (o.init == "kaiming") {
        const double bound = 1.0 / std::sqrt(static_cast<double>(lin->in_features));  // a = √5
        wa.uniform_(-bound, bound, gen);
      } else {
        wa.normal_(0.0, 1.0 / static_cast<double>(info.r), gen);
      }
      a->weight.copy_(wa);
      b->weight.zero_();
    }
    // gate_up_proj's one A serves an expert's gate and up layers alike: the up layer's adapter
    // computes with the gate layer's A module (registered there only), so that one parameter gets
    // both layers' gradients, as PEFT's one A does.
    info.a_owner = name;
    bool tied = false;
    if (expert && expert->part < 2) {
      auto [it, fresh] = shared_a.try_emplace({expert->key, expert->expert}, name, a);
      if (!fresh && it->second.second->weight.size(0) == info.r) {
        a = it->second.second;
        info.a_owner = it->second.first;
        tied = true;
      }
    }
    // Adapters stay float32 on a 16-bit base (as PEFT keeps them), float64 on a float64 base.
    const auto adapter_type = lin->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    if (!tied) a->to(device, adapter_type);
    b->to(device, adapter_type);
    if (!tied) lin->register_module("lora_A", a);
    lin->register_module("lora_B", b);
    auto adapter = std::make_shared<LoraAdapter>(lin, a, b, info, o.dropout);
    if (o.dora) {
      // m starts as the row norms of W + scale · B A (= ||W|| rows, B being zero): the model
      // starts as the base.
      // A module holding "weight", as PEFT's DoraLinearLayer does: parameter
      // "<layer>.lora_magnitude_vector.weight", saved under PEFT's key "<layer>.lora_magnitude_vector".
      auto holder = std::make_shared<torch::nn::Module>();
      adapter->magnitude = holder->register_parameter("weight", adapter->row_norm(true).to(adapter_type));
      lin->register_module("lora_magnitude_vector", holder);
    }
    lin->set_adapter(adapter);
    layers.push_back(info);
  }
  for (const auto& t : o.target_parameters) {
    bool hit = false;
    for (const auto& key : hit_parameters) hit |= key == t || key.ends_with("." + t);
    FT_CHECK(hit, "[lora] target_parameters entry '", t, "' names no expert weights of the model (",
             model->config().num_experts > 0 ? "model.layers.N.mlp.experts.gate_up_proj or .down_proj"
                                             : "it has no mixture of experts",
             ")");
  }
  FT_CHECK(!layers.empty(), "[lora] no linear layer matches the targets (",
           o.target_regex.empty() ? "" : "regex " + o.target_regex,
           [&] {
             std::string s;
             for (const auto& t : o.targets) s += (s.empty() ? "" : ", ") + t;
             return o.target_regex.empty() ? s : std::string();
           }(),
           ")", layer_names_hint(model));
  if (o.target_regex.empty()) {
    for (const auto& t : o.targets) {
      if (t == "all-linear") continue;
      // By name alone: a target that modules_to_save or layers_to_transform leaves out still exists.
      bool hit = false;
      for (const auto& item : model->named_modules("", false)) {
        if (dynamic_cast<model::LinearImpl*>(item.value().get()) != nullptr)
          hit |= is_target(item.key(), single_target(t), false);
      }
      FT_CHECK(hit, "[lora] target '", t, "' matches no linear layer of the model", layer_names_hint(model));
    }
  }
  // An exclusion that names no linear layer is most likely a misspelt one (PEFT would ignore it).
  for (const auto& e : o.exclude_modules) {
    bool hit = false;
    for (const auto& item : model->named_modules("", false)) {
      hit |= dynamic_cast<model::LinearImpl*>(item.value().get()) != nullptr &&
             (item.key() == e || item.key().ends_with("." + e));
    }
    FT_CHECK(hit, "[lora] exclude_modules entry '", e, "' names no linear layer of the model");
  }
  // The modules trained in full: none may be, or hold, an adapted layer (PEFT refuses it too).
  for (const auto& [name, p] : saved) {
    for (const auto& l : layers) {
      FT_CHECK(name != l.module + ".weight" && name != l.module + ".bias" && name.rfind(l.module + ".", 0) != 0,
               "[lora] modules_to_save: ", name, " belongs to ", l.module, ", which is also a LoRA target; a module ",
               "trains either in full or through an adapter");
    }
    p.set_requires_grad(true);
  }
  for (auto& [key, b] : trained_biases(model, o, adapted_names(model))) b.set_requires_grad(true);
  return layers;
}

std::vector<LoraLayer> lora_layers(model::CausalLM& model) {
  std::vector<LoraLayer> v;
  for (const auto& [name, a] : adapters(model)) v.push_back(a->info);
  return v;
}

void merge_lora(model::CausalLM& model) {
  const auto all = adapters(model);
  FT_CHECK(!all.empty(), "[lora] the model has no LoRA adapter to merge");
  for (const auto& [name, a] : all) {
    FT_CHECK(a->owner_->nf4() == nullptr, "[lora] ", name, " has an NF4 (QLoRA) base: merge the adapter into the "
             "original 16/32-bit checkpoint instead (ft merge BASE ADAPTER)");
  }
  at::NoGradGuard no_grad;
  for (const auto& [name, a] : all) {
    FT_CHECK(!a->merged, "[lora] ", name, " is already merged");
    const at::Tensor delta = a->delta();
    if (a->magnitude.defined()) {
      // DoRA: W' = (m / ||W + ΔW||) ⊙ (W + ΔW), row by row (PEFT's merge).
      const at::Tensor adapted = a->owner_->weight.to(delta.scalar_type()) + delta;
      a->dora_factor = (a->magnitude.to(delta.scalar_type()) / at::linalg_vector_norm(adapted, 2, {1})).view({-1, 1});
      a->owner_->weight.copy_((a->dora_factor * adapted).to(a->owner_->weight.scalar_type()));
    } else {
      a->owner_->weight.add_(delta.to(a->owner_->weight.scalar_type()));
    }
    a->merged = true;
  }
}

void unmerge_lora(model::CausalLM& model) {
  at::NoGradGuard no_grad;
  for (const auto& [name, a] : adapters(model)) {
    FT_CHECK(a->merged, "[lora] ", name, " is not merged");
    if (a->magnitude.defined()) {
      const at::Tensor w = a->owner_->weight.to(a->dora_factor.scalar_type()) / a->dora_factor - a->delta();
      a->owner_->weight.copy_(w.to(a->owner_->weight.scalar_type()));
    } else {
      a->owner_->weight.sub_(a->delta().to(a->owner_->weight.scalar_type()));
    }
    a->merged = false;
  }
}

bool lora_merged(model::CausalLM& model) {
  const auto all = adapters(model);
  return !all.empty() && all.front().second->merged;
}

void set_lora_dropout(model::CausalLM& model, double dropout) {
  FT_CHECK(dropout >= 0 && dropout < 1, "[lora] dropout must be in [0, 1), got ", dropout);
  for (const auto& [name, a] : adapters(model)) a->dropout_ = dropout;
}

at::Tensor lora_dropout_noise(const at::Tensor& x, double p) {
  FT_CHECK(p >= 0 && p < 1, "[lora] dropout must be in [0, 1), got ", p);
  FT_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "[lora] dropout noise is for CPU float tensors");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  uint64_t seed = 0;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
  }
  const uint64_t threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));  // drop when u < threshold
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "lora_dropout_noise", [&] {
    scalar_t* d = out.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(1.0 / (1.0 - p));
    const scalar_t zero = static_cast<scalar_t>(0);
    at::parallel_for(0, (n + 1) / 2, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;  // SplitMix64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        d[2 * i] = (z & 0xffffffffull) >= threshold ? keep : zero;
        if (2 * i + 1 < n) d[2 * i + 1] = (z >> 32) >= threshold ? keep : zero;
      }
    });
  });
  return out;
}

at::Tensor dora_row_norm(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double scale,
                         const at::Tensor& w_sq) {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // autocast would round to bf16
  const auto type = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor af = a.to(type), bf = b.to(type);
  at::Tensor wa;  // W Aᵀ, (out, r), in `type`
  if (w.scalar_type() == type) {
    wa = at::mm(w, af.t());
  } else if (w.is_cuda() && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) && type == at::kFloat) {
    // A ≈ hi + lo, both in W's dtype: one GEMM over [hi; lo] with float32 accumulation and output
    // reads W once as stored (no float32 copy of W) and keeps A's precision within 2⁻¹⁶.
    const int64_t r = af.size(0);
    const at::Tensor hi = af.to(w.scalar_type()), lo = (af - hi.to(type)).to(w.scalar_type());
    const at::Tensor both = at::mm(w, at::cat({hi, lo}).t(), at::kFloat);  // (out, 2r)
    wa = both.narrow(1, 0, r) + both.narrow(1, r, r);
  } else {
    wa = at::mm(w.to(type), af.t());
  }
  const at::Tensor sq = w_sq.defined() ? w_sq : w.to(type).pow(2).sum(1);
  const at::Tensor cross = (bf * wa).sum(1), quad = (at::mm(bf, at::mm(af, af.t())) * bf).sum(1);
  return (sq + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min(0).sqrt();
}

void set_lora_fused(model::CausalLM& model, bool fused) {
  for (const auto& [name, a] : adapters(model)) a->fused = fused;
}

void set_lora_extended_gemm(model::CausalLM& model, bool on) {
  at::NoGradGuard no_grad;
  for (const auto& [name, a] : adapters(model)) {
    a->extend = on;
    if (on || !a->w_ext.defined()) continue;
    // Off: the weight gets its own contiguous storage back (if it still lives in the buffer).
    at::Tensor& w = a->owner_->weight;
    if (w.defined() && w.data_ptr() == a->w_ext.data_ptr()) w.set_data(w.contiguous());
    a->w_ext = at::Tensor();
  }
}

at::Tensor adapter_grad_mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out, double scale, int64_t splits) {
  return grad_mm(a, b, out, scale, splits);
}

void set_lora_grad_splits(model::CausalLM& model, int64_t splits) {
  FT_CHECK(splits >= 1 && splits <= 64, "[lora] grad_splits must be in [1, 64], got ", splits);
  for (const auto& [name, a] : adapters(model)) a->grad_splits = splits;
}

void set_lora_group_projections(model::CausalLM& model, bool on) {
  for (const auto& [name, a] : adapters(model)) {
    a->group = on;
    if (on) continue;
    // Off: each weight gets its own contiguous storage back (if it still lives in a group's buffer).
    for (const auto& g : a->groups_) g->unstack();
    a->groups_.clear();
  }
}

void set_lora_row_kernels(model::CausalLM& model, bool on) {
  for (const auto& [name, a] : adapters(model)) a->row_kernels = on;
}

void merge_and_unload_lora(model::CausalLM& model) {
  if (!lora_merged(model)) merge_lora(model);
  for (const auto& [name, a] : adapters(model)) {
    model::LinearImpl* lin = a->owner_;
    if (lin->named_children().contains("lora_A")) lin->unregister_module("lora_A");  // (a tied up projection's is its gate's)
    lin->unregister_module("lora_B");
    if (a->magnitude.defined()) lin->unregister_module("lora_magnitude_vector");
    lin->set_adapter(nullptr);  // destroys `a`
  }
}

void save_peft_adapter(model::CausalLM& model, const LoraOptions& o, const std::string& dir,
                       const std::string& base_model) {
  const auto all = adapters(model);
  FT_CHECK(!all.empty(), "[lora] the model has no LoRA adapter to save");
  const bool interleaved = model->config().gpt_oss();  // (gpt-oss's gate_up_proj: gate_up_rows)
  std::vector<at::Tensor> keep;
  std::vector<io::TensorWrite> writes;
  // Expert projections go out as PEFT's target_parameters (EXPERT PARAMETERS): by PEFT module, part
  // (gate, up, down) and expert.
  std::map<std::string, std::array<std::map<int64_t, LoraAdapter*>, 3>> expert_adapters;
  std::set<std::string> module_targets;  // the other adapted layers' last name components
  std::vector<std::pair<ExpertProjection, LoraAdapter*>> routers;  // routers, as their weight parameters
  // A layer's A and B under PEFT's keys <module>.lora_A.weight and .lora_B.weight.
  auto write_pair = [&](const std::string& module, const LoraAdapter* a) {
    keep.push_back(a->A->weight.detach().to(at::kCPU).contiguous());
    writes.push_back(io::tensor_write(kPeftPrefix + module + ".lora_A.weight", keep.back()));
    keep.push_back(a->B->weight.detach().to(at::kCPU).contiguous());
    writes.push_back(io::tensor_write(kPeftPrefix + module + ".lora_B.weight", keep.back()));
  };
  for (const auto& [name, a] : all) {
    if (const auto e = expert_projection(name)) {
      FT_CHECK(!a->magnitude.defined(), "[lora] ", name,
               ": DoRA on an expert cannot be saved in PEFT's form for transformers 5's expert weights "
               "(target_parameters), which has no DoRA");
      if (e->part == 3) {
        routers.emplace_back(*e, a);
      } else {
        expert_adapters[e->module][static_cast<size_t>(e->part)][e->expert] = a;
      }
      continue;
    }
    module_targets.insert(name.substr(name.rfind('.') + 1));
    write_pair(name, a);
    if (a->magnitude.defined()) {
      keep.push_back(a->magnitude.detach().to(at::kCPU).contiguous());
      writes.push_back(io::tensor_write(kPeftPrefix + name + ".lora_magnitude_vector", keep.back()));
    }
  }
  for (const auto& [name, p] : modules_to_save_parameters(model, o.modules_to_save)) {
    keep.push_back(p.detach().to(at::kCPU).contiguous());
    writes.push_back(io::tensor_write(kPeftPrefix + name, keep.back()));
  }
  for (const auto& [key, b] : trained_biases(model, o, adapted_names(model))) {
    keep.push_back(b.detach().to(at::kCPU).contiguous());
    writes.push_back(io::tensor_write(key, keep.back()));
  }
  nlohmann::ordered_json rank = nlohmann::ordered_json::object(), alpha = nlohmann::ordered_json::object();
  // Each expert parameter's rank and alpha by its whole name, first: PEFT takes the first pattern
  // that matches, and a pattern such as "down_proj" would match the experts' too.
  const int64_t n_experts = model->config().num_experts;
  std::vector<std::string> target_parameters;
  for (const auto& item : expert_adapters) {
    // (named references, not structured bindings: the lambdas below capture them)
    const std::string& module = item.first;
    const auto& parts = item.second;
    const bool down_too = !parts[2].empty();
    // One part's adapters: every expert's, at one rank and scale (PEFT's A and B are per parameter).
    auto uniform = [&](size_t part) {
      if (parts[part].empty()) return;
      FT_CHECK(static_cast<int64_t>(parts[part].size()) == n_experts, "[lora] ", module, ": adapters on ",
               parts[part].size(), " of ", n_experts, " experts' ", part == 0 ? "gate" : part == 1 ? "up" : "down",
               " projections; PEFT's target_parameters adapts every expert of a parameter");
      const LoraAdapter* first = parts[part].begin()->second;
      for (const auto& [e, a] : parts[part]) {
        FT_CHECK(a->info.r == first->info.r && a->info.scale == first->info.scale, "[lora] ", module,
                 ": the experts' adapters differ in rank or scale; PEFT's target_parameters gives them one");
      }
    };
    for (size_t part = 0; part < 3; ++part) uniform(part);
    // Writes one parameter's stacked A (E·r, in) and B (out, r·E) from each expert's A_e and B_e, at
    // scale s: PEFT's rank_pattern and alpha_pattern give it r and alpha = s·r (rsLoRA: s·√r).
    auto write = [&](const std::string& param, const std::vector<at::Tensor>& a_e, const std::vector<at::Tensor>& b_e,
                     double scale) {
      const int64_t r = a_e.front().size(0);
      const std::string key = module + "." + param;
      ExpertProjection p;
      p.module = module;
      p.part = param == "down_proj" ? 2 : 0;
      keep.push_back(at::cat(a_e, 0).contiguous());
      writes.push_back(io::tensor_write(parameter_tensor_key(p, down_too, "lora_A"), keep.back()));
      keep.push_back(at::stack(b_e, 2).reshape({b_e.front().size(0), r * n_experts}).contiguous());
      writes.push_back(io::tensor_write(parameter_tensor_key(p, down_too, "lora_B"), keep.back()));
      target_parameters.push_back(key);
      rank[key] = r;
      alpha[key] = o.rslora ? scale * std::sqrt(static_cast<double>(r)) : scale * static_cast<double>(r);
    };
    auto a_of = [](const LoraAdapter* a) { return a->A->weight.detach().to(at::kCPU); };
    auto b_of = [](const LoraAdapter* a) { return a->B->weight.detach().to(at::kCPU); };
    if (!parts[0].empty() || !parts[1].empty()) {
      const LoraAdapter* g0 = parts[0].empty() ? nullptr : parts[0].begin()->second;
      const LoraAdapter* u0 = parts[1].empty() ? nullptr : parts[1].begin()->second;
      // gate and up with one A per expert (as PEFT made them, or loaded): gate_up_proj at their rank;
      // otherwise at the sum of their ranks, A stacked and B block-diagonal (the same ΔW).
      bool shared = g0 && u0 && g0->info.r == u0->info.r && g0->info.scale == u0->info.scale;
      for (int64_t e = 0; shared && e < n_experts; ++e) shared = at::equal(a_of(parts[0].at(e)), a_of(parts[1].at(e)));
      const double scale = g0 ? g0->info.scale : u0->info.scale;
      std::vector<at::Tensor> a_e, b_e;
      for (int64_t e = 0; e < n_experts; ++e) {
        const LoraAdapter* g = g0 ? parts[0].at(e) : nullptr;
        const LoraAdapter* u = u0 ? parts[1].at(e) : nullptr;
        if (shared) {
          a_e.push_back(a_of(g));
          const at::Tensor bg = b_of(g);
          at::Tensor b = at::empty({2 * bg.size(0), bg.size(1)}, bg.options());
          gate_up_rows(b, 0, interleaved).copy_(bg);
          gate_up_rows(b, 1, interleaved).copy_(b_of(u));
          b_e.push_back(b);
          continue;
        }
        const int64_t rows = (g ? g : u)->owner_->out_features, in = (g ? g : u)->owner_->in_features;
        const int64_t rg = g ? g->info.r : 0, ru = u ? u->info.r : 0;
        const auto dtype = (g ? g : u)->A->weight.scalar_type();
        at::Tensor a = at::zeros({rg + ru, in}, dtype), b = at::zeros({2 * rows, rg + ru}, dtype);
        if (g) {
          a.narrow(0, 0, rg).copy_(a_of(g));
          gate_up_rows(b, 0, interleaved).narrow(1, 0, rg).copy_(b_of(g) * (g->info.scale / scale));
        }
        if (u) {
          a.narrow(0, rg, ru).copy_(a_of(u));
          gate_up_rows(b, 1, interleaved).narrow(1, rg, ru).copy_(b_of(u) * (u->info.scale / scale));
        }
        a_e.push_back(a);
        b_e.push_back(b);
      }
      write("gate_up_proj", a_e, b_e, scale);
    }
    if (down_too) {
      std::vector<at::Tensor> a_e, b_e;
      for (int64_t e = 0; e < n_experts; ++e) {
        a_e.push_back(a_of(parts[2].at(e)));
        b_e.push_back(b_of(parts[2].at(e)));
      }
      write("down_proj", a_e, b_e, parts[2].begin()->second->info.scale);
    }
  }
  for (const auto& [e, a] : routers) {
    write_pair(e.module, a);
    target_parameters.push_back(e.key);
    rank[e.key] = a->info.r;
    alpha[e.key] = a->info.alpha;
  }
  for (const auto& [p, v] : o.rank_pattern) {
    if (!rank.contains(p)) rank[p] = v;
  }
  for (const auto& [p, v] : o.alpha_pattern) {
    if (!alpha.contains(p)) alpha[p] = v;
  }
  nlohmann::ordered_json targets = o.target_regex.empty() ? nlohmann::ordered_json(o.targets)
                                                          : nlohmann::ordered_json(o.target_regex);
  if (o.target_regex.empty() && o.targets.size() == 1 && o.targets[0] == "all-linear") targets = "all-linear";
  if (n_experts > 0 && o.target_regex.empty()) {
    // The experts went into target_parameters; the other adapted layers by name (libft's
    // all-linear leaves routers out, PEFT's would take Qwen2-MoE's shared_expert_gate).
    targets = module_targets.empty() ? nlohmann::ordered_json(nullptr)
                                     : nlohmann::ordered_json(std::vector<std::string>(module_targets.begin(), module_targets.end()));
  }
  const nlohmann::ordered_json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(base_model)},
      {"r", o.r},
      {"lora_alpha", o.alpha},
      // (PEFT's parameter adapters refuse dropout, a training setting: 0 where experts are adapted)
      {"lora_dropout", expert_adapters.empty() && routers.empty() ? o.dropout : 0.0},
      {"target_modules", targets},
      {"target_parameters", target_parameters.empty() ? nlohmann::ordered_json(nullptr)
                                                      : nlohmann::ordered_json(target_parameters)},
      {"rank_pattern", rank},
      {"alpha_pattern", alpha},
      {"use_rslora", o.rslora},
      {"use_dora", o.dora},
      {"bias", o.bias},
      {"fan_in_fan_out", false},
      {"init_lora_weights", o.init == "gaussian" ? nlohmann::ordered_json("gaussian") : nlohmann::ordered_json(true)},
      {"modules_to_save", o.modules_to_save.empty() ? nlohmann::ordered_json(nullptr)
                                                    : nlohmann::ordered_json(o.modules_to_save)},
      {"exclude_modules", !o.exclude_regex.empty()     ? nlohmann::ordered_json(o.exclude_regex)
                          : o.exclude_modules.empty() ? nlohmann::ordered_json(nullptr)
                                                      : nlohmann::ordered_json(o.exclude_modules)},
      {"layers_to_transform", o.layers_to_transform.empty() ? nlohmann::ordered_json(nullptr)
                                                            : nlohmann::ordered_json(o.layers_to_transform)},
      {"layers_pattern", o.layers_pattern.empty() ? nlohmann::ordered_json(nullptr)
                                                  : nlohmann::ordered_json(o.layers_pattern)},
      {"inference_mode", true},
      {"revision", nullptr},
  };
  fs::create_directories(dir);
  const std::string text = config.dump(2) + "\n";
  io::write_file_atomic((fs::path(dir) / "adapter_config.json").string(),
                        std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  io::write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), writes);
}

LoraOptions read_peft_lora_config(const std::string& path) {
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[lora] ", path, ": not valid JSON: ", e.what());
  }
  FT_CHECK(j.is_object(), "[lora] ", path, ": not a JSON object");
  LoraOptions o;
  try {
    FT_CHECK(j.value("peft_type", "") == "LORA", "[lora] ", path, ": peft_type is ", j.value("peft_type", "missing"),
             "; libft reads LORA adapters (DoRA included) and PREFIX_TUNING adapters");
    o.r = j.at("r").get<int64_t>();
    o.alpha = j.at("lora_alpha").get<double>();
    if (j.contains("lora_dropout") && !j["lora_dropout"].is_null()) o.dropout = j["lora_dropout"].get<double>();
    if (j.contains("target_parameters") && !j["target_parameters"].is_null()) {
      o.target_parameters = j["target_parameters"].get<std::vector<std::string>>();
      check_target_parameters(o.target_parameters, path);
    }
    FT_CHECK(o.target_parameters.empty() || !j.value("use_dora", false), "[lora] ", path,
             ": use_dora with target_parameters (PEFT refuses it too)");
    if (j.contains("bias") && !j["bias"].is_null()) {
      o.bias = j["bias"].get<std::string>();
      FT_CHECK(o.bias == "none" || o.bias == "all" || o.bias == "lora_only", "[lora] ", path, ": bias = \"", o.bias,
               "\" is not one of none, all, lora_only");
      FT_CHECK(o.bias == "none" || o.target_parameters.empty(), "[lora] ", path, ": bias = \"", o.bias,
               "\" with target_parameters is not supported");
    }
    const auto& t = j.at("target_modules");
    if (t.is_null() && !o.target_parameters.empty()) {
      o.targets.clear();  // the expert parameters alone
    } else if (t.is_string()) {
      const std::string s = t.get<std::string>();
      if (s == "all-linear") o.targets = {s}, o.all_linear_as_peft = true;
      else o.target_regex = s, o.targets.clear();
    } else {
      o.targets = t.get<std::vector<std::string>>();
    }
    if (j.contains("use_rslora") && !j["use_rslora"].is_null()) o.rslora = j["use_rslora"].get<bool>();
    if (j.contains("use_dora") && !j["use_dora"].is_null()) o.dora = j["use_dora"].get<bool>();
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (!j.contains(key) || j[key].is_null()) continue;
      for (const auto& [p, v] : j[key].items()) {
        if (std::string(key) == "rank_pattern") o.rank_pattern.emplace_back(p, v.get<int64_t>());
        else o.alpha_pattern.emplace_back(p, v.get<double>());
      }
    }
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null())
      o.modules_to_save = j["modules_to_save"].get<std::vector<std::string>>();
    if (j.contains("exclude_modules") && !j["exclude_modules"].is_null()) {  // a list, or one regular expression
      const auto& e = j["exclude_modules"];
      if (e.is_string()) o.exclude_regex = e.get<std::string>();
      else o.exclude_modules = e.get<std::vector<std::string>>();
    }
    // PEFT takes an int or a list for layers_to_transform, a string or a list for layers_pattern.
    if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null()) {
      const auto& l = j["layers_to_transform"];
      o.layers_to_transform = l.is_array() ? l.get<std::vector<int64_t>>() : std::vector<int64_t>{l.get<int64_t>()};
    }
    if (j.contains("layers_pattern") && !j["layers_pattern"].is_null()) {
      const auto& l = j["layers_pattern"];
      o.layers_pattern = l.is_array() ? l.get<std::vector<std::string>>() : std::vector<std::string>{l.get<std::string>()};
      if (o.layers_pattern.size() == 1 && o.layers_pattern[0].empty()) o.layers_pattern.clear();
    }
    // Options that change what the adapter computes must be at their defaults: refusing beats
    // computing something else.
    const std::map<std::string, nlohmann::ordered_json> required = {
        {"fan_in_fan_out", false}, {"lora_bias", false}};
    for (const auto& [key, want] : required) {
      if (j.contains(key) && !j[key].is_null() && j[key] != want)
        FT_FAIL("[lora] ", path, ": ", key, " = ", j[key].dump(), " is not supported (only ", want.dump(), ")");
    }
    const std::set<std::string> understood = {
        "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern",
        "alpha_pattern", "bias", "fan_in_fan_out", "use_dora", "lora_bias", "init_lora_weights", "inference_mode",
        "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters",
        "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size"};
    for (const auto& [key, value] : j.items()) {
      if (understood.count(key)) continue;
      // Anything else is accepted only unset (null, false, empty): newer PEFT versions add options
      // whose defaults change nothing.
      const bool unset = value.is_null() || value == false || (value.is_object() && value.empty()) ||
                         (value.is_array() && value.empty());
      FT_CHECK(unset, "[lora] ", path, ": option '", key, "' = ", value.dump(), " is not supported");
    }
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[lora] ", path, ": malformed adapter config: ", e.what());
  }
  return o;
}

std::vector<std::string> check_peft_adapter(model::CausalLM& model, const std::string& dir) {
  std::vector<std::string> problems;
  LoraOptions o;
  try {
    o = read_peft_lora_config((fs::path(dir) / "adapter_config.json").string());
  } catch (const Error& e) {
    problems.push_back(e.what());
    return problems;
  }
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  std::shared_ptr<io::SafetensorsFile> file;
  try {
    file = io::SafetensorsFile::open(path);
  } catch (const Error& e) {
    problems.push_back(e.what());
    return problems;
  }
  if (const std::string image_text = image_text_adapter(*file); !image_text.empty()) {
    problems.push_back(image_text);
    return problems;
  }
  // Expected tensors, from the model's linear layers and the config.
  std::map<std::string, std::vector<int64_t>> expected;
  std::set<std::string> hit_targets;
  std::set<std::string> targeted;  // the layers the config adapts (for bias = lora_only)
  for (const auto& item : model->named_modules()) {
    auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
    const std::string& name = item.key();
    if (lin == nullptr) continue;
    for (const auto& t : o.targets) {
      if (is_target(name, single_target(t), name == "lm_head")) hit_targets.insert(t);
    }
    if (const auto expert = targeted_expert(o, name)) {
      // (E·r, in) and (out, r·E) for the whole 3-D parameter; gate_up_proj's rows are 2I.
      const int64_t* r = pattern_value(o.rank_pattern, expert->key);
      if (expert->part == 3) {  // a router: one (r, H) A and (E, r) B
        expected[parameter_tensor_key(*expert, false, "lora_A")] = {r ? *r : o.r, lin->in_features};
        expected[parameter_tensor_key(*expert, false, "lora_B")] = {lin->out_features, r ? *r : o.r};
        continue;
      }
      const int64_t rank = (r ? *r : o.r) * model->config().num_experts;
      const bool down_too = parameter_targeted(o, expert->module + ".down_proj");
      const int64_t out = expert->part == 2 ? lin->out_features : 2 * lin->out_features;
      expected[parameter_tensor_key(*expert, down_too, "lora_A")] = {rank, lin->in_features};
      expected[parameter_tensor_key(*expert, down_too, "lora_B")] = {out, rank};
      continue;
    }
    if (!is_target(name, o, name == "lm_head")) continue;
    targeted.insert(name);
    const int64_t* r = pattern_value(o.rank_pattern, name);
    const int64_t rank = r ? *r : o.r;
    expected[kPeftPrefix + name + ".lora_A.weight"] = {rank, lin->in_features};
    expected[kPeftPrefix + name + ".lora_B.weight"] = {lin->out_features, rank};
    if (o.dora) expected[kPeftPrefix + name + ".lora_magnitude_vector"] = {lin->out_features};
  }
  try {
    untie_for_modules_to_save(model, o.modules_to_save);  // as loading would: lm_head.weight is then expected
    for (const auto& [name, p] : modules_to_save_parameters(model, o.modules_to_save)) {
      for (const auto& [key, shape] : expected) {
        if (key.rfind(kPeftPrefix + name.substr(0, name.rfind('.')) + ".lora_", 0) == 0) {
          problems.push_back("modules_to_save: " + name + " belongs to a layer that is also a LoRA target");
          break;
        }
      }
      expected[kPeftPrefix + name] = p.sizes().vec();
    }
    for (const auto& [key, b] : trained_biases(model, o, targeted)) expected[key] = b.sizes().vec();
  } catch (const Error& e) {
    problems.push_back(e.what());
  }
  for (const auto& t : o.target_parameters) {
    bool hit = false;
    for (const auto& item : model->named_modules()) {
      if (auto e = expert_projection(item.key())) hit |= e->key == t || e->key.ends_with("." + t);
    }
    if (!hit) problems.push_back("target_parameters entry '" + t + "' names no expert weights of the model");
  }
  if (o.target_regex.empty()) {
    for (const auto& t : o.targets) {
      if (!hit_targets.count(t)) {
        problems.push_back("target '" + t + "' matches no linear layer of the model" + layer_names_hint(model));
      }
    }
  } else if (expected.empty()) {
    problems.push_back("target regex '" + o.target_regex + "' matches no linear layer of the model");
  }
  for (const auto& [key, shape] : expected) {
    const io::TensorInfo* info = file->find(key);
    if (info == nullptr) {
      problems.push_back(path + ": tensor '" + key + "' is missing");
      continue;
    }
    if (info->shape != shape) {
      problems.push_back(detail::concat(path, ": tensor '", key, "' has shape ", at::IntArrayRef(info->shape),
                                        ", the model needs ", at::IntArrayRef(shape)));
    }
    if (const std::string why = io::float_tensor_problem(*file, *info); !why.empty())
      problems.push_back(path + ": tensor '" + key + "' " + why);
  }
  for (const auto& info : file->tensors()) {
    if (!expected.count(info.name)) {
      problems.push_back(path + ": tensor '" + info.name + "' belongs to no adapted layer of this model");
    }
  }
  return problems;
}

LoraOptions load_peft_adapter(model::CausalLM& model, const std::string& dir) {
  const LoraOptions o = read_peft_lora_config((fs::path(dir) / "adapter_config.json").string());
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  auto file = io::SafetensorsFile::open(path);
  const std::string image_text = image_text_adapter(*file);
  FT_CHECK(image_text.empty(), "[lora] ", image_text);
  apply_lora(model, o);
  std::set<std::string> expected;
  at::NoGradGuard no_grad;
  // An expert parameter's (E·r, in) A and (out, r·E) B, read once for its experts' layers.
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> stacks;
  const int64_t experts = model->config().num_experts;
  auto read_checked = [&](const std::string& key, std::vector<int64_t> shape, const std::string& what) {
    expected.insert(key);
    const io::TensorInfo* info = file->find(key);
    FT_CHECK(info != nullptr, "[lora] ", path, ": tensor '", key, "' is missing (the config targets ", what, ")");
    at::Tensor t = io::read_tensor(*file, *info);
    FT_CHECK(t.sizes() == at::IntArrayRef(shape), "[lora] ", path, ": tensor '", key, "' has shape ", t.sizes(),
             ", the model needs ", at::IntArrayRef(shape), " (", what, ")");
    return t;
  };
  for (const auto& [name, a] : adapters(model)) {
    if (const auto expert = targeted_expert(o, name); expert && expert->part == 3) {
      const std::string what = expert->key + ", a router";
      a->A->weight.copy_(read_checked(parameter_tensor_key(*expert, false, "lora_A"), a->A->weight.sizes().vec(), what)
                             .to(a->A->weight.dtype()));
      a->B->weight.copy_(read_checked(parameter_tensor_key(*expert, false, "lora_B"), a->B->weight.sizes().vec(), what)
                             .to(a->B->weight.dtype()));
      continue;
    }
    if (const auto expert = targeted_expert(o, name)) {
      const int64_t r = a->info.r, in = a->owner_->in_features, rows = a->owner_->out_features;
      const int64_t out = expert->part == 2 ? rows : 2 * rows;
      auto it = stacks.find(expert->key);
      if (it == stacks.end()) {
        const bool down_too = parameter_targeted(o, expert->module + ".down_proj");
        const std::string what = detail::concat(expert->key, ", rank ", r, " for each of ", experts, " experts");
        at::Tensor sa = read_checked(parameter_tensor_key(*expert, down_too, "lora_A"), {experts * r, in}, what);
        at::Tensor sb = read_checked(parameter_tensor_key(*expert, down_too, "lora_B"), {out, r * experts}, what);
        it = stacks.emplace(expert->key, std::make_pair(sa.view({experts, r, in}), sb.view({out, r, experts}))).first;
      }
      const at::Tensor b = it->second.second.select(2, expert->expert);  // (out, r)
      a->A->weight.copy_(it->second.first[expert->expert].to(a->A->weight.dtype()));
      a->B->weight.copy_((expert->part == 2 ? b : gate_up_rows(b, expert->part, model->config().gpt_oss()))
                             .to(a->B->weight.dtype()));
      continue;
    }
    for (const auto& [suffix, w] : {std::pair<const char*, at::Tensor>{".lora_A.weight", a->A->weight},
                                    std::pair<const char*, at::Tensor>{".lora_B.weight", a->B->weight}}) {
      const std::string key = kPeftPrefix + name + suffix;
      expected.insert(key);
      const io::TensorInfo* info = file->find(key);
      FT_CHECK(info != nullptr, "[lora] ", path, ": tensor '", key, "' is missing (the config targets ", name, ")");
      at::Tensor t = io::read_tensor(*file, *info);
      FT_CHECK(t.sizes() == w.sizes(), "[lora] ", path, ": tensor '", key, "' has shape ", t.sizes(), ", the model needs ",
               w.sizes(), " (rank ", a->info.r, " on a ", a->owner_->out_features, " × ", a->owner_->in_features,
               " layer)");
      w.copy_(t.to(w.dtype()));
    }
    if (a->magnitude.defined()) {
      const std::string key = kPeftPrefix + name + ".lora_magnitude_vector";
      expected.insert(key);
      const io::TensorInfo* info = file->find(key);
      FT_CHECK(info != nullptr, "[lora] ", path, ": tensor '", key, "' is missing (use_dora is set)");
      at::Tensor t = io::read_tensor(*file, *info);
      FT_CHECK(t.sizes() == a->magnitude.sizes(), "[lora] ", path, ": tensor '", key, "' has shape ", t.sizes(),
               ", the model needs ", a->magnitude.sizes());
      a->magnitude.copy_(t.to(a->magnitude.dtype()));
    }
  }
  // A parameter trained in full (modules_to_save) or a trained bias: its tensor, checked, into `p`.
  auto load_into = [&](const std::string& key, at::Tensor& p, const std::string& why) {
    expected.insert(key);
    const io::TensorInfo* info = file->find(key);
    FT_CHECK(info != nullptr, "[lora] ", path, ": tensor '", key, "' is missing (", why, ")");
    at::Tensor t = io::read_tensor(*file, *info);
    FT_CHECK(t.sizes() == p.sizes(), "[lora] ", path, ": tensor '", key, "' has shape ", t.sizes(), ", the model needs ",
             p.sizes());
    FT_CHECK(t.isfinite().all().item<bool>(), "[lora] ", path, ": tensor '", key, "' holds NaN or Inf");
    p.copy_(t.to(p.dtype()));
  };
  for (auto& [name, p] : modules_to_save_parameters(model, o.modules_to_save)) {
    load_into(kPeftPrefix + name, p, "modules_to_save names its module");
  }
  for (auto& [key, b] : trained_biases(model, o, adapted_names(model))) {
    load_into(key, b, "the config's bias = " + o.bias + " trains it");
  }
  for (const auto& info : file->tensors()) {
    FT_CHECK(expected.count(info.name), "[lora] ", path, ": tensor '", info.name,
             "' belongs to no adapted layer of this model (a different base or config?)");
  }
  return o;
}

}  // namespace ft::adapt
