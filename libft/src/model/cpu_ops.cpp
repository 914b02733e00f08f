#include "ft/model/cpu_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ft/util/error.h"

namespace ft::model {
namespace {

// The row loops are plain C++ that GCC vectorizes; target_clones adds AVX2 and AVX-512 versions
// picked at load time (the default build targets baseline x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FT_CLONES
#endif

// ---- RMSNorm -------------------------------------------------------------------------------------
// Rows [r0, r1) of x (R, D) → y, and 1/rms per row.
#define FT_RMS_FORWARD(T)                                                                                        \
  FT_CLONES void rms_forward_rows(const T* x, const T* w, T* y, double* rstd, int64_t r0, int64_t r1, int64_t D, \
                                  double eps) {                                                                  \
    for (int64_t r = r0; r < r1; ++r) {                                                                          \
      const T* xr = x + r * D;                                                                                   \
      double ss = 0.0;                                                                                           \
      _Pragma("omp simd reduction(+ : ss)") for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * double(xr[i]); \
      const double rs = 1.0 / std::sqrt(ss / double(D) + eps);                                                   \
      rstd[r] = rs;                                                                                              \
      const T s = T(rs);                                                                                         \
      T* yr = y + r * D;                                                                                         \
      for (int64_t i = 0; i < D; ++i) yr[i] = w[i] * (xr[i] * s);                                                \
    }                                                                                                            \
  }
FT_RMS_FORWARD(float)
FT_RMS_FORWARD(double)

// dx = rstd * (g - x̂ * mean(g * x̂)) with g = dy * w and x̂ = x * rstd; dw += Σ_rows dy * x̂ (in dw_acc).
#define FT_RMS_BACKWARD(T)                                                                                       \
  FT_CLONES void rms_backward_rows(const T* x, const T* w, const T* dy, const double* rstd, T* dx, double* dw_acc, \
                                   int64_t r0, int64_t r1, int64_t D) {                                          \
    for (int64_t r = r0; r < r1; ++r) {                                                                          \
      const T* xr = x + r * D;                                                                                   \
      const T* dyr = dy + r * D;                                                                                 \
      const T s = T(rstd[r]);                                                                                    \
      if (dx != nullptr) {                                                                                       \
        double dot = 0.0;                                                                                        \
        _Pragma("omp simd reduction(+ : dot)") for (int64_t i = 0; i < D; ++i) dot +=                            \
            double(dyr[i] * w[i]) * double(xr[i] * s);                                                           \
        const T c = T(dot / double(D));                                                                          \
        T* dxr = dx + r * D;                                                                                     \
        for (int64_t i = 0; i < D; ++i) dxr[i] = s * (dyr[i] * w[i] - (xr[i] * s) * c);                          \
      }                                                                                                          \
      if (dw_acc != nullptr) {                                                                                   \
        for (int64_t i = 0; i < D; ++i) dw_acc[i] += double(dyr[i] * (xr[i] * s));                               \
      }                                                                                                          \
    }                                                                                                            \
  }
FT_RMS_BACKWARD(float)
FT_RMS_BACKWARD(double)

int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1)); }

class RMSNormFn : public torch::autograd::Function<RMSNormFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in,
                            double eps) {
    const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
    const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
    at::Tensor y = at::empty_like(x);
    at::Tensor rstd = at::empty({R}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ft_rms_norm", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      double* rp = rstd.mutable_data_ptr<double>();
      at::parallel_for(0, R, grain_rows(D), [&](int64_t r0, int64_t r1) { rms_forward_rows(xp, wp, yp, rp, r0, r1, D, eps); });
    });
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor dy = grads[0].contiguous();
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
    at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
    // One float64 accumulator row per thread for dw, summed afterwards.
    at::Tensor dw_parts = need_dw ? at::zeros({at::get_num_threads(), D}, x.options().dtype(at::kDouble)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ft_rms_norm_backward", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const double* rp = rstd.const_data_ptr<double>();
      scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
      double* parts = need_dw ? dw_parts.mutable_data_ptr<double>() : nullptr;
      at::parallel_for(0, R, grain_rows(D), [&](int64_t r0, int64_t r1) {
        double* acc = parts != nullptr ? parts + at::get_thread_num() * D : nullptr;
        rms_backward_rows(xp, wp, dyp, rp, dxp, acc, r0, r1, D);
      });
    });
    at::Tensor dw = need_dw ? dw_parts.sum(0).to(w.scalar_type()) : at::Tensor();
    return {dx, dw, at::Tensor()};
  }
};

// ---- rotary embeddings -----------------------------------------------------------------------------
// One (b, h, t) row of D: out[i] = x[i] c[i] - x[i+h] s[i], out[i+h] = x[i+h] c[i+h] + x[i] s[i+h];
// the backward (sign = -1) is the same map with sin negated.
#define FT_ROPE_ROW(T)                                                                                   \
  FT_CLONES void rope_row(const T* x, const T* c, const T* s, T* out, int64_t half, T sign, T scale) { \
    for (int64_t i = 0; i < half; ++i) {                                                               \
      out[i] = scale * (x[i] * c[i] - sign * x[i + half] * s[i]);                                      \
      out[i + half] = scale * (x[i + half] * c[i + half] + sign * x[i] * s[i + half]);                 \
    }                                                                                                  \
  }
FT_ROPE_ROW(float)
FT_ROPE_ROW(double)

// out = scale · rope(x) (sign 1), or the transposed map applied to a gradient (sign -1), into a
// fresh tensor with `strides` (empty: contiguous).
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, double sign, double scale,
                      at::IntArrayRef strides) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  at::Tensor out = strides.empty() ? at::empty(x.sizes(), x.options()) : at::empty_strided(x.sizes(), strides, x.options());
  const auto xs = x.strides(), os = out.strides(), cs = cos.strides();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ft_rope", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(H * D, 1)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const int64_t b = i / T, t = i % T;
                         const scalar_t* c = cp + b * cs[0] + t * cs[2];
                         const scalar_t* s = sp + b * cs[0] + t * cs[2];
                         for (int64_t h = 0; h < H; ++h) {
                           rope_row(xp + b * xs[0] + h * xs[1] + t * xs[2], c, s, op + b * os[0] + h * os[1] + t * os[2],
                                    D / 2, static_cast<scalar_t>(sign), static_cast<scalar_t>(scale));
                         }
                       }
                     });
  });
  return out;
}

class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, bool contiguous, double scale) {
    ctx->save_for_backward({cos, sin});
    // The gradient goes back in x's own layout (q from q_proj is (B, T, H, D) in memory), so the
    // view that made x takes it without a copy.
    const bool dense = x.is_non_overlapping_and_dense();
    ctx->saved_data["strides"] = dense ? x.strides().vec() : std::vector<int64_t>{};
    ctx->saved_data["scale"] = scale;
    return rope_apply(x, cos, sin, 1.0, scale, contiguous || !dense ? at::IntArrayRef{} : x.strides());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor g = grads[0];
    if (g.stride(3) != 1) g = g.contiguous();
    const std::vector<int64_t> strides = ctx->saved_data["strides"].toIntVector();
    return {rope_apply(g, saved[0], saved[1], -1.0, ctx->saved_data["scale"].toDouble(), strides), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- oneDNN linear -----------------------------------------------------------------------------------
// mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm) = X Wᵀ + B for dense CPU tensors.
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

const c10::TypedOperatorHandle<LinearPointwise>* linear_pointwise() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle) return std::nullopt;
    return handle->typed<LinearPointwise>();
  }();
  return op ? &*op : nullptr;
}

// The backward products hand oneDNN transposed views (Wᵀ for dX, dYᵀ and Xᵀ for dW), which its GEMM
// reads in place. (A heap corruption in data-parallel SIGTERM runs, first blamed on the views and
// worked around with contiguous copies that cost an eighth of the step, came from signal handling
// inside oneDNN's JIT GEMM: see SignalScope in train/run.cpp.)
at::Tensor lp(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt) {
  return linear_pointwise()->call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(),
                                  std::nullopt);
}

// x (..., K) → (..., N) = x Wᵀ (+ b), without autograd.
at::Tensor lp_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return lp(x.reshape({-1, x.size(-1)}), w, b).view(sizes);
}

class OneDnnLinearFn : public torch::autograd::Function<OneDnnLinearFn> {
 public:
  // b: the bias, or an empty placeholder with has_bias false (a custom Function's tensor inputs must
  // be defined).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& b, bool has_bias) {
    const int64_t K = x.size(-1), N = w.size(0);
    at::Tensor x2 = x.reshape({-1, K});
    if (!x2.is_contiguous()) x2 = x2.contiguous();
    at::Tensor y = lp(x2, w, has_bias ? std::optional<at::Tensor>(b) : std::nullopt);
    ctx->save_for_backward({x2, w});
    ctx->saved_data["bias"] = has_bias;
    std::vector<int64_t> out_sizes = x.sizes().vec();
    out_sizes.back() = N;
    return y.view(out_sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &w = saved[1];
    const int64_t N = w.size(0);
    at::Tensor dy2 = grads[0].reshape({-1, N});
    if (!dy2.is_contiguous()) dy2 = dy2.contiguous();
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = lp_rows(grads[0], w.t());  // dY W
    if (ctx->needs_input_grad(1)) dw = lp(dy2.t(), x2.t());  // dYᵀ X, (N, K) like W
    if (ctx->needs_input_grad(2) && ctx->saved_data["bias"].toBool()) db = dy2.sum(0);
    return {dx, dw, db, at::Tensor()};
  }
};

bool cpu_float(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
         !t.is_sparse() && t.layout() == at::kStrided;
}

}  // namespace

bool rms_norm_fusable(const at::Tensor& x, const at::Tensor& weight) {
  return cpu_float(x) && cpu_float(weight) && x.scalar_type() == weight.scalar_type() && x.dim() >= 1 &&
         weight.dim() == 1 && x.size(-1) == weight.size(0) && x.numel() > 0;
}

at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  FT_CHECK(rms_norm_fusable(x, weight), "[model] fused_rms_norm: needs CPU float32/float64 x (..., D) and weight (D)");
  return RMSNormFn::apply(x, weight, eps);
}

bool rope_fusable(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!cpu_float(x) || !cpu_float(cos) || !cpu_float(sin)) return false;
  if (x.dim() != 4 || cos.dim() != 4 || cos.sizes() != sin.sizes() || cos.strides() != sin.strides()) return false;
  if (cos.scalar_type() != x.scalar_type() || sin.scalar_type() != x.scalar_type()) return false;
  if (cos.requires_grad() || sin.requires_grad()) return false;
  const int64_t D = x.size(3);
  return D % 2 == 0 && x.stride(3) == 1 && cos.stride(3) == 1 && cos.size(0) == x.size(0) && cos.size(1) == 1 &&
         cos.size(2) == x.size(2) && cos.size(3) == D && x.numel() > 0;
}

at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool contiguous, double scale) {
  FT_CHECK(rope_fusable(x, cos, sin), "[model] fused_rope: needs CPU float32/float64 x (B, H, T, D) with unit "
                                      "last stride and cos/sin (B, 1, T, D) without gradients");
  return RopeFn::apply(x, cos, sin, contiguous, scale);
}

bool onednn_linear_fits(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  auto f32 = [](const at::Tensor& t) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
           !t.is_quantized();
  };
  if (!f32(x) || !f32(weight) || (bias.defined() && !f32(bias))) return false;
  // Under CPU autocast at::linear computes in the autocast dtype; the oneDNN op is not on
  // autocast's lists and would stay float32.
  if (at::autocast::is_autocast_enabled(at::kCPU)) return false;
  if (weight.dim() != 2 || x.dim() < 1 || x.size(-1) != weight.size(1) || weight.numel() == 0 || x.numel() == 0) return false;
  if (bias.defined() && (bias.dim() != 1 || bias.size(0) != weight.size(0))) return false;
  return linear_pointwise() != nullptr;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!onednn_linear_fits(x, weight, bias)) {
    return at::linear(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
  }
  const bool track = at::GradMode::is_enabled() &&
                     (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  // Nothing to differentiate (evaluation, or a product inside a custom node's forward or backward):
  // the plain product, without an autograd node.
  if (!track) return lp_rows(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
  return OneDnnLinearFn::apply(x, weight, bias.defined() ? bias : at::empty({0}, weight.options()), bias.defined());
}

bool grouped_attention_fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  if (!cpu_float(q) || !cpu_float(k) || !cpu_float(v) || !mask.defined() || !mask.device().is_cpu()) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || mask.dim() != 4 || mask.scalar_type() != at::kBool) return false;
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type()) return false;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k.size(1);
  if (G == 0 || H % G != 0 || k.sizes() != v.sizes() || k.size(0) != B || k.size(2) != T || k.size(3) != D) return false;
  if ((mask.size(0) != B && mask.size(0) != 1) || mask.size(1) != 1 || mask.size(2) != T || mask.size(3) != T) return false;
  return T <= 512 && B * H * T * T <= (int64_t{1} << 23);
}

at::Tensor grouped_attention_bias(const at::Tensor& mask, int64_t groups, int64_t rep, at::ScalarType dtype) {
  const int64_t Bm = mask.size(0), T = mask.size(2), S = mask.size(3);
  at::Tensor bias = at::zeros(mask.sizes(), mask.options().dtype(dtype))
                        .masked_fill_(mask.logical_not(), -std::numeric_limits<double>::infinity());
  // (Bm, 1, T, S) → (Bm, G, r, T, S) → (Bm·G, r·T, S): every stacked query row gets its own row of the mask.
  return bias.unsqueeze(2).expand({Bm, groups, rep, T, S}).reshape({Bm * groups, rep * T, S});
}

at::Tensor grouped_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                             double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), G = k.size(1), r = H / G;
  const at::Tensor qg = q.contiguous().view({B * G, r * T, D});
  const at::Tensor kg = k.contiguous().view({B * G, T, D});
  const at::Tensor vg = v.contiguous().view({B * G, T, D});
  // A bias made for one batch row is shared by all of them.
  const at::Tensor b = bias.size(0) == B * G ? bias : bias.view({1, G, r * T, T}).expand({B, G, r * T, T}).reshape({B * G, r * T, T});
  at::Tensor scores = at::baddbmm(b, qg, kg.transpose(1, 2), /*beta=*/1.0, /*alpha=*/scale);
  return at::bmm(at::softmax(scores, -1), vg).view({B, H, T, D});
}

}  // namespace ft::model
