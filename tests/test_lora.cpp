// LoRA: the adapted forward pass against its formula, merge/unmerge, targets and patterns, PEFT
// files (strict loading), and interop with Python PEFT (PeftInterop.*, with the files of
// tests/python/peft_interop.py in LIBFT_PEFT_DIR).
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/function.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "ft/adapt/lora.h"
#include "ft/adapt/mode.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/util/autocast.h"
#include "ft/util/error.h"
#include "test_util.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/philox.h"
#endif

using namespace ft;
namespace fs = std::filesystem;

namespace {

model::CausalLM base_model(at::ScalarType dtype = at::kFloat) {
  model::CausalLM m(test::tiny_config());
  model::init_weights(m, 11);
  m->to(dtype);
  m->eval();
  return m;
}

// Counts the casts (aten::_to_copy) of float32 tensors of `numel` elements (the activations, not
// the adapters' weights) while it lives, and the row kernel's casts (ft::lora_cast_down: x to the
// compute dtype and s x Aᵀ in one pass; CUDA with set_lora_row_kernels), which make no _to_copy.
class CastCounter {
 public:
  explicit CastCounter(int64_t numel) {
    numel_() = numel;
    count_() = 0;
    handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(&CastCounter::enter).needsInputs(true));
  }
  ~CastCounter() { at::removeCallback(handle_); }
  CastCounter(const CastCounter&) = delete;
  CastCounter& operator=(const CastCounter&) = delete;
  int64_t count() const { return count_(); }

 private:
  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction& fn) {
    const std::string name = fn.name();
    if (name == "ft::lora_cast_down") ++count_();
    if (name != "aten::_to_copy") return nullptr;
    const auto inputs = fn.inputs();
    if (!inputs.empty() && inputs[0].isTensor()) {
      const at::Tensor& t = inputs[0].toTensor();
      if (t.scalar_type() == at::kFloat && t.numel() == numel_()) ++count_();
    }
    return nullptr;
  }
  static int64_t& numel_() {
    thread_local int64_t n = 0;
    return n;
  }
  static int64_t& count_() {
    thread_local int64_t c = 0;
    return c;
  }
  at::CallbackHandle handle_;
};

const at::Tensor& ids() {
  static const at::Tensor t = at::arange(0, 22, at::kLong).remainder(97).mul(7).remainder(97).view({2, 11});
  return t;
}

// Non-zero B everywhere (PEFT and libft both start B at zero, which would test nothing), and the
// modules trained in full (modules_to_save) moved away from the base's values.
void randomize_b(model::CausalLM& m, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (const auto& item : m->named_parameters()) {
    const bool b = item.key().find("lora_B") != std::string::npos;
    if (!b && (!item.value().requires_grad() || item.key().find(".lora_") != std::string::npos)) continue;
    at::Tensor r = at::empty(item.value().sizes(), at::kFloat).normal_(0.0, 0.1, gen);
    if (b) item.value().copy_(r.to(item.value().dtype()));
    else item.value().add_(r.to(item.value().dtype()));
  }
}

// Copies of the gradients of every trainable parameter, by name.
std::map<std::string, at::Tensor> trainable_grads(model::CausalLM& m) {
  std::map<std::string, at::Tensor> g;
  for (const auto& item : m->named_parameters()) {
    if (item.value().requires_grad()) g[item.key()] = item.value().grad().clone();
  }
  return g;
}

using test::error_of;

fs::path scratch(const std::string& name) { return test::scratch_dir(name); }


// Fills the CUDA caching allocator's free blocks with NaN, so that a result the code under test
// forgets to write (in part) shows up as NaN instead of as a stale right answer: large blocks
// through one 256 MiB tensor, the small pool (blocks under 1 MiB) through 64 half-megabyte ones.
void poison_cuda_allocator() {
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  { const at::Tensor big = at::full({64 << 20}, nan, opts); }
  std::vector<at::Tensor> small;
  for (int i = 0; i < 64; ++i) small.push_back(at::full({128 << 10}, nan, opts));
}

// The fused LoRA layer in bf16 on `device` against the float64 formula y = x Wᵀ + s·((x ⊙ m) Aᵀ) Bᵀ
// and its gradients dx = dy W + ((dy B)s A) ⊙ m, dA = ((dy B)s)ᵀ (x ⊙ m), dB = s dyᵀ ((x ⊙ m) Aᵀ),
// evaluated on the bf16-rounded operands the products see. Widths that are not multiples of any
// tile (160 → 1000 → 160), the token counts `tokens`, r ∈ {4, 8, 16, 64}, dropout 0 and 0.1 (the
// reference redraws the mask from the same generator state: at::native_dropout's on CUDA, the
// row kernels' Philox draws (ft/kernels/philox.h) where they run, lora_dropout_noise on the CPU),
// and four bases: float32 weights under bf16 autocast, the frozen
// weights stored in bf16 (as the trainer stores them), the same through the extended GEMM
// (set_lora_extended_gemm: y = [x | s S] [W | B]ᵀ), NF4, and a model that is bf16 throughout (no
// autocast); DoRA without dropout on each base too (y = c ⊙ Z, and the magnitudes' gradient).
// Bound: 2e-2 of the largest reference value (bf16 results; S and dS are rounded to bf16 between
// the products). The low-rank term is made about as large as the base term, so dropping or
// mis-scaling it fails. On CUDA the allocator is poisoned before each pass.
void check_fused_lora_bf16(const at::Device device, const std::vector<int64_t>& tokens) {
  enum Base { kF32Autocast, kBf16Stored, kExtended, kNf4, kPureBf16, kRowKernels, kExtendedRowKernels, kNf4Extended,
              kNf4ExtendedRowKernels };
  const char* base_names[] = {"float32 base, autocast",
                              "bf16-stored base, autocast",
                              "bf16-stored base, autocast, extended GEMM",
                              "NF4 base, autocast",
                              "bf16 model",
                              "bf16-stored base, autocast, row kernels",
                              "bf16-stored base, autocast, extended GEMM, row kernels",
                              "NF4 base, autocast, extended GEMM",
                              "NF4 base, autocast, extended GEMM, row kernels"};
  std::vector<Base> bases = {kF32Autocast, kBf16Stored, kExtended, kNf4, kPureBf16, kNf4Extended};
  if (device.is_cuda()) bases.insert(bases.end(), {kRowKernels, kExtendedRowKernels, kNf4ExtendedRowKernels});  // CUDA-only kernels
  io::ModelConfig mc = test::tiny_config();
  mc.hidden_size = 160;
  mc.intermediate_size = 1000;
  mc.num_hidden_layers = 1;
  mc.num_attention_heads = 5;
  mc.num_key_value_heads = 5;
  mc.head_dim = 32;
  mc.layer_window.assign(1, 0);
  int64_t seed = 0;
  for (const int64_t r : {4, 8, 16, 64}) {
    for (const Base base : bases) {
      const bool nf4 = base == kNf4 || base == kNf4Extended || base == kNf4ExtendedRowKernels;
      const bool extended = base == kExtended || base == kExtendedRowKernels || base == kNf4Extended ||
                            base == kNf4ExtendedRowKernels;
      const bool row_kernels = base == kRowKernels || base == kExtendedRowKernels || base == kNf4ExtendedRowKernels;
      for (const auto& [p, dora] :
           {std::pair{0.0, false}, std::pair{0.1, false}, std::pair{0.0, true}, std::pair{0.1, true}}) {
        model::CausalLM m(mc);
        model::init_weights(m, static_cast<uint64_t>(++seed));
        if (nf4) {
          for (const auto& item : m->named_modules()) {
            auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
            if (lin != nullptr && item.key() != "lm_head") lin->quantize_nf4(64, true);
          }
        }
        adapt::LoraOptions o;
        o.targets = {"gate_proj", "down_proj"};
        o.r = r;
        o.alpha = static_cast<double>(r);  // scale 1
        o.dropout = p;
        o.dora = dora;
        const auto layers = adapt::apply_lora(m, o);
        ASSERT_EQ(layers.size(), 2u);
        {
          at::NoGradGuard no_grad;
          for (const auto& item : m->named_parameters()) {
            if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 1.0);
            // DoRA's magnitudes start at the row norms (c = 1): move them.
            if (item.key().find("lora_magnitude_vector") != std::string::npos) item.value().mul_(1.0 + 0.5 * at::rand_like(item.value()));
          }
        }
        m->to(device);
        if (base == kPureBf16) m->to(at::kBFloat16);
        if (base == kBf16Stored || ((extended || row_kernels) && !nf4)) ASSERT_GT(adapt::store_frozen_linears(m, at::kBFloat16), 0);
        adapt::set_lora_fused(m, true);
        adapt::set_lora_extended_gemm(m, extended);
        adapt::set_lora_row_kernels(m, row_kernels);
        // The row kernels run where they take the operands: r ≤ 32 (the extended layout's rows are
        // 16-byte aligned for any r: their stride is in + r rounded up to 8), with dropout too (but
        // not in DoRA's node, where the dropped copy is a GEMM operand).
        const bool kernels_expected = row_kernels && r <= 32 && !(dora && p > 0);
        m->train();
        auto params = m->named_parameters();
        auto modules = m->named_modules();
        for (const int64_t T : tokens) {
          for (const auto& layer : layers) {
            SCOPED_TRACE(layer.module + ", r " + std::to_string(r) + ", " + base_names[base] + ", dropout " +
                         std::to_string(p) + (dora ? ", DoRA" : "") + ", T " + std::to_string(T));
            auto* lin = dynamic_cast<model::LinearImpl*>(modules[layer.module].get());
            ASSERT_NE(lin, nullptr);
            at::Tensor a = params[layer.module + ".lora_A.weight"], b = params[layer.module + ".lora_B.weight"];
            at::Tensor mag = dora ? params[layer.module + ".lora_magnitude_vector.weight"] : at::Tensor();
            a.mutable_grad() = at::Tensor();
            b.mutable_grad() = at::Tensor();
            if (dora) mag.mutable_grad() = at::Tensor();
            const auto xt = at::TensorOptions().device(device).dtype(base == kPureBf16 ? at::kBFloat16 : at::kFloat);
            const at::Tensor x = at::randn({T, lin->in_features}, xt).requires_grad_();
            const at::Tensor dy = at::randn({T, lin->out_features}, xt.dtype(at::kBFloat16));
            if (device.is_cuda()) poison_cuda_allocator();
            at::manual_seed(1000 + seed);
            test::OpNames ops;
            at::Tensor y;
            {
              util::AutocastScope autocast(base != kPureBf16, device.type());
              y = lin->forward(x);
            }
            ASSERT_NE(y.grad_fn(), nullptr);
            EXPECT_NE(y.grad_fn()->name().find(dora ? "FusedDora" : "FusedLora"), std::string::npos) << y.grad_fn()->name();
            EXPECT_EQ(y.scalar_type(), at::kBFloat16);
            // The extended GEMM is really taken: W became a view of the (out, in + r) buffer, rows
            // in + r rounded up to 8 apart (an NF4 base decodes W into a buffer of each pass's own;
            // its weight is an empty placeholder).
            if (!nf4) {
              const int64_t w_stride = lin->weight.stride(0);
              EXPECT_EQ(w_stride, extended && !dora ? (lin->in_features + r + 7) / 8 * 8 : lin->in_features);
            }
            if (device.is_cuda()) poison_cuda_allocator();
            y.backward(dy);
            EXPECT_TRUE(ops.seen("aten::mm") || ops.seen("aten::addmm"));  // the recorder works
            EXPECT_EQ(ops.seen("ft::lora_extended_gemm"), extended && !dora);
            EXPECT_EQ(ops.seen("ft::lora_cast_down"), kernels_expected);
            EXPECT_EQ(ops.seen("ft::lora_up_add"), kernels_expected);
            EXPECT_EQ(ops.seen("ft::lora_dropout_rows"), kernels_expected && p > 0);
            EXPECT_EQ(ops.seen("aten::native_dropout"), device.is_cuda() && p > 0 && !kernels_expected);

            // The float64 reference on the operands as the products see them.
            auto r64 = [](const at::Tensor& t) { return t.detach().to(at::kBFloat16).to(at::kDouble); };
            at::Tensor keep = at::ones({T, lin->in_features}, x.options().dtype(at::kDouble));
            if (p > 0 && kernels_expected) {
#ifdef LIBFT_WITH_CUDA_KERNELS
              // The kernel's first draw after manual_seed: (seed, offset 0).
              const kernels::detail::DropoutDraws d{static_cast<uint64_t>(1000 + seed), 0,
                                                     kernels::detail::dropout_threshold(p), 1.0f};
              at::Tensor k = at::empty({T, lin->in_features}, at::kDouble);
              double* kp = k.data_ptr<double>();
              for (int64_t e = 0; e < k.numel(); ++e) kp[e] = kernels::detail::dropout_keeps(d, e) ? 1.0 / (1.0 - p) : 0.0;
              keep = k.to(device);
#endif
            } else if (p > 0) {
              at::manual_seed(1000 + seed);
              const at::Tensor xb = x.detach().to(at::kBFloat16);
              keep = device.is_cuda() ? std::get<1>(at::native_dropout(xb, p, true)).to(at::kDouble) / (1.0 - p)
                                      : adapt::lora_dropout_noise(xb, p).to(at::kDouble);
            }
            const at::Tensor x64 = r64(x), w64 = lin->dense_weight(at::kBFloat16).to(at::kDouble), a64 = r64(a),
                             b64 = r64(b), dy64 = dy.to(at::kDouble);
            const double s = layer.scale;
            // PEFT's DoRA with dropout: y = x Wᵀ + (c − 1) ⊙ h Wᵀ + c ⊙ s S Bᵀ = (x − h) Wᵀ + c ⊙ Z with
            // Z = h Wᵀ + s S Bᵀ (LoRA: c = 1; no dropout: h = x).
            const at::Tensor h = x64 * keep, S = h.mm(a64.t()), lora = S.mm(b64.t()) * s;
            const at::Tensor z64 = h.mm(w64.t()) + lora;
            // DoRA: c = m / ||W + s B A|| per output row (the norm from the stored weights, a
            // constant), y = c ⊙ Z, dZ = dy ⊙ c, dm = Σ_rows dy ⊙ Z / norm.
            at::Tensor c64 = at::ones({lin->out_features}, z64.options()), norm64;
            if (dora) {
              const at::Tensor wf = lin->dense_weight(at::kFloat).to(at::kDouble);
              norm64 = at::linalg_vector_norm(wf + s * b.detach().to(at::kDouble).mm(a.detach().to(at::kDouble)), 2, {1});
              c64 = mag.detach().to(at::kDouble) / norm64;
            }
            const at::Tensor y64 = (x64 - h).mm(w64.t()) + z64 * c64, dz64 = dy64 * c64;
            const at::Tensor dS = dz64.mm(b64) * s;
            const at::Tensor dx64 = dy64.mm(w64) + ((dz64 - dy64).mm(w64) + dS.mm(a64)) * keep, da64 = dS.t().mm(h),
                             db64 = dz64.t().mm(S) * s;
            EXPECT_GT(lora.abs().max().item<double>(), 0.2 * z64.abs().max().item<double>());
            std::vector<std::tuple<const char*, at::Tensor, at::Tensor>> checks = {
                {"y", y, y64}, {"dx", x.grad(), dx64}, {"dA", a.grad(), da64}, {"dB", b.grad(), db64}};
            if (dora) {
              EXPECT_GT((c64 - 1).abs().max().item<double>(), 0.1);  // the magnitudes matter
              checks.emplace_back("dm", mag.grad(), (dy64 * z64).sum(0) / norm64);
            }
            for (const auto& [name, got, want] : checks) {
              ASSERT_TRUE(got.defined()) << name;
              ASSERT_EQ(got.sizes(), want.sizes()) << name;
              EXPECT_TRUE(got.isfinite().all().item<bool>()) << name;
              EXPECT_LE(test::max_rel_error(got, want), 2e-2) << name;
            }
            EXPECT_EQ(x.grad().scalar_type(), x.scalar_type());
            EXPECT_EQ(a.grad().scalar_type(), a.scalar_type());
          }
        }
      }
    }
  }
}

}  // namespace

TEST(Lora, ZeroBLeavesTheBaseExactlyAndOnlyAdaptersTrain) {
  model::CausalLM m = base_model();
  const at::Tensor before = m->forward(ids());
  adapt::LoraOptions o;
  o.targets = {"q_proj", "v_proj", "down_proj"};
  const auto layers = adapt::apply_lora(m, o);
  ASSERT_EQ(layers.size(), 6u);  // 2 blocks × 3
  EXPECT_EQ(layers[0].module, "model.layers.0.self_attn.q_proj");
  EXPECT_DOUBLE_EQ(layers[0].scale, 2.0);  // 16 / 8
  EXPECT_TRUE(m->forward(ids()).equal(before));
  for (const auto& item : m->named_parameters()) {
    const bool lora = item.key().find(".lora_") != std::string::npos;
    EXPECT_EQ(item.value().requires_grad(), lora) << item.key();
  }
  EXPECT_TRUE(m->named_parameters().contains("model.layers.1.mlp.down_proj.lora_A.weight"));
  EXPECT_EQ(m->named_parameters()["model.layers.1.mlp.down_proj.lora_A.weight"].sizes(), at::IntArrayRef({8, 48}));
  EXPECT_EQ(m->named_parameters()["model.layers.1.mlp.down_proj.lora_B.weight"].sizes(), at::IntArrayRef({32, 8}));
  EXPECT_NE(error_of([&] { adapt::apply_lora(m, o); }).find("already has LoRA"), std::string::npos);
}

// In float64: the adapted model equals the base with W + scale·B·A, merged equals unmerged, and
// unmerging restores the base weights.
TEST(Lora, ForwardMergeAndUnmergeFollowTheFormula) {
  model::CausalLM m = base_model(at::kDouble);
  std::map<std::string, at::Tensor> base_w;
  for (const auto& item : m->named_parameters()) base_w[item.key()] = item.value().detach().clone();
  adapt::LoraOptions o;
  o.targets = {"all-linear"};
  o.r = 4;
  o.alpha = 6;
  o.rank_pattern = {{"down_proj", 2}, {"mlp\\..*", 3}};
  o.alpha_pattern = {{"layers\\.1\\.self_attn\\.o_proj", 1.5}};
  const auto layers = adapt::apply_lora(m, o);
  ASSERT_EQ(layers.size(), 14u);  // 7 projections × 2 blocks; never lm_head
  for (const auto& l : layers) {
    EXPECT_EQ(l.module.find("lm_head"), std::string::npos);
    const bool down = l.module.ends_with("down_proj"), mlp = l.module.find(".mlp.") != std::string::npos;
    EXPECT_EQ(l.r, down ? 2 : mlp ? 3 : 4) << l.module;  // the first matching pattern wins
    const double alpha = l.module == "model.layers.1.self_attn.o_proj" ? 1.5 : 6.0;
    EXPECT_DOUBLE_EQ(l.scale, alpha / static_cast<double>(l.r)) << l.module;
  }
  randomize_b(m, 3);
  const at::Tensor adapted = m->forward(ids());

  model::CausalLM manual = base_model(at::kDouble);
  {
    at::NoGradGuard no_grad;
    auto params = manual->named_parameters();
    auto lp = m->named_parameters();
    for (const auto& l : layers) {
      const at::Tensor a = lp[l.module + ".lora_A.weight"], b = lp[l.module + ".lora_B.weight"];
      params[l.module + ".weight"].add_(at::matmul(b, a) * l.scale);
    }
  }
  EXPECT_LE(test::max_rel_error(adapted, manual->forward(ids())), 1e-12);
  EXPECT_GT(test::max_rel_error(adapted, base_model(at::kDouble)->forward(ids())), 1e-3);

  adapt::merge_lora(m);
  EXPECT_TRUE(adapt::lora_merged(m));
  EXPECT_LE(test::max_rel_error(m->forward(ids()), adapted), 1e-12);
  EXPECT_NE(error_of([&] { adapt::merge_lora(m); }).find("already merged"), std::string::npos);
  adapt::unmerge_lora(m);
  for (const auto& item : m->named_parameters()) {
    if (base_w.count(item.key())) EXPECT_LE(test::max_rel_error(item.value(), base_w[item.key()]), 1e-14) << item.key();
  }
  EXPECT_LE(test::max_rel_error(m->forward(ids()), adapted), 1e-12);

  // rsLoRA scales by alpha / √r.
  model::CausalLM rs = base_model();
  o = {};
  o.rslora = true;
  o.r = 16;
  o.alpha = 8;
  EXPECT_DOUBLE_EQ(adapt::apply_lora(rs, o)[0].scale, 2.0);
  // merge_and_unload leaves a plain model with the adapted logits.
  randomize_b(rs, 4);
  const at::Tensor rs_logits = rs->forward(ids());
  adapt::merge_and_unload_lora(rs);
  EXPECT_TRUE(adapt::lora_layers(rs).empty());
  for (const auto& item : rs->named_parameters()) EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key();
  EXPECT_LE(test::max_rel_error(rs->forward(ids()), rs_logits), 1e-5);
}

TEST(Lora, InitialisationsAndBadOptions) {
  model::CausalLM m = base_model();
  adapt::LoraOptions o;
  o.targets = {"up_proj"};
  o.r = 16;
  adapt::apply_lora(m, o);
  const at::Tensor a = m->named_parameters()["model.layers.0.mlp.up_proj.lora_A.weight"];
  const double bound = 1.0 / std::sqrt(32.0);  // kaiming-uniform, a = √5, fan_in 32
  EXPECT_LE(a.abs().max().item<double>(), bound);
  EXPECT_GT(a.abs().max().item<double>(), 0.9 * bound);
  EXPECT_EQ(m->named_parameters()["model.layers.0.mlp.up_proj.lora_B.weight"].abs().sum().item<double>(), 0.0);

  model::CausalLM g = base_model();
  o.init = "gaussian";
  adapt::apply_lora(g, o);
  const double std = g->named_parameters()["model.layers.0.mlp.up_proj.lora_A.weight"].std().item<double>();
  EXPECT_NEAR(std, 1.0 / 16, 0.2 / 16);  // N(0, 1/r)

  auto fails = [](adapt::LoraOptions bad) {
    model::CausalLM fresh = base_model();
    return error_of([&] { adapt::apply_lora(fresh, bad); });
  };
  adapt::LoraOptions bad;
  bad.targets = {"q_proj", "qproj"};
  EXPECT_NE(fails(bad).find("target 'qproj' matches no linear layer"), std::string::npos) << fails(bad);
  bad = {};
  bad.targets = {"embed_tokens"};
  EXPECT_NE(fails(bad).find("no linear layer matches"), std::string::npos) << fails(bad);
  bad = {};
  bad.r = 0;
  EXPECT_NE(fails(bad).find("r must be > 0"), std::string::npos);
  bad = {};
  bad.target_regex = "model\\.layers\\.0\\..*_proj";
  model::CausalLM rx = base_model();
  EXPECT_EQ(adapt::apply_lora(rx, bad).size(), 7u);
}

// libft's own PEFT files read back exactly; every kind of mismatch is an error naming the tensor.
TEST(Lora, PeftFilesRoundTripAndLoadStrictly) {
  const fs::path dir = scratch("lora_files");
  model::CausalLM m = base_model();
  adapt::LoraOptions o;
  o.targets = {"q_proj", "o_proj"};
  o.rank_pattern = {{"o_proj", 2}};
  adapt::apply_lora(m, o);
  randomize_b(m, 5);
  const at::Tensor logits = m->forward(ids());
  adapt::save_peft_adapter(m, o, (dir / "adapter").string(), "some/base");
  auto file = io::SafetensorsFile::open((dir / "adapter" / "adapter_model.safetensors").string());
  EXPECT_EQ(file->tensors().size(), 8u);
  EXPECT_NE(file->find("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"), nullptr);

  model::CausalLM loaded = base_model();
  const adapt::LoraOptions back = adapt::load_peft_adapter(loaded, (dir / "adapter").string());
  EXPECT_EQ(back.targets, o.targets);
  EXPECT_EQ(back.rank_pattern, o.rank_pattern);
  EXPECT_TRUE(loaded->forward(ids()).equal(logits));

  // A config option libft does not implement.
  auto config = nlohmann::json::parse(std::ifstream(dir / "adapter" / "adapter_config.json"));
  fs::copy(dir / "adapter", dir / "dora");
  config["lora_bias"] = true;
  std::ofstream(dir / "dora" / "adapter_config.json") << config.dump();
  model::CausalLM m2 = base_model();
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(m2, (dir / "dora").string()); }).find("lora_bias = true is not supported"),
            std::string::npos);
  config["lora_bias"] = false;
  config["modules_to_save"] = {"lm_head"};
  std::ofstream(dir / "dora" / "adapter_config.json") << config.dump();
  model::CausalLM m3 = base_model();
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(m3, (dir / "dora").string()); })
                .find("'base_model.model.lm_head.weight' is missing (modules_to_save names its module)"),
            std::string::npos);

  // A config that targets more than the file holds: the missing tensor is named.
  config["modules_to_save"] = nullptr;
  config["target_modules"] = {"q_proj", "o_proj", "v_proj"};
  std::ofstream(dir / "dora" / "adapter_config.json") << config.dump();
  model::CausalLM m4 = base_model();
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(m4, (dir / "dora").string()); })
                .find("'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' is missing"),
            std::string::npos);
  // A rank that disagrees with the tensors.
  config["target_modules"] = {"q_proj", "o_proj"};
  config["rank_pattern"] = nlohmann::json::object();
  std::ofstream(dir / "dora" / "adapter_config.json") << config.dump();
  model::CausalLM m5 = base_model();
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(m5, (dir / "dora").string()); }).find("has shape [2, 32]"),
            std::string::npos);
  // A base of another width.
  io::ModelConfig wide = test::tiny_config();
  wide.hidden_size = 40;
  wide.head_dim = 10;
  model::CausalLM other(wide);
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(other, (dir / "adapter").string()); }).find("has shape"),
            std::string::npos);
  fs::remove_all(dir);
}

// modules_to_save (PEFT's): lm_head and the embeddings train in full beside the adapters, the
// adapter file holds their whole weights, and loading it onto a fresh base gives the same logits;
// what PEFT's suffix rule matches, and each refusal, with the module named.
TEST(Lora, ModulesToSaveTrainInFullAndTravelInTheAdapter) {
  const fs::path dir = scratch("lora_modules_to_save");
  model::CausalLM m = base_model();
  adapt::LoraOptions o;
  o.targets = {"q_proj", "v_proj"};
  o.modules_to_save = {"lm_head", "embed_tokens"};
  adapt::apply_lora(m, o);
  std::vector<std::string> full;
  for (const auto& item : m->named_parameters()) {
    if (item.value().requires_grad() && item.key().find(".lora_") == std::string::npos) full.push_back(item.key());
  }
  EXPECT_EQ(full, (std::vector<std::string>{"model.embed_tokens.weight", "lm_head.weight"}));
  model::CausalLM base = base_model();
  const at::Tensor base_logits = base->forward(ids());
  randomize_b(m, 12);
  const at::Tensor logits = m->forward(ids());
  EXPECT_FALSE(m->lm_head->weight.equal(base->lm_head->weight));
  EXPECT_GT(test::max_rel_error(logits, base_logits), 1e-2);
  adapt::save_peft_adapter(m, o, (dir / "adapter").string());
  auto file = io::SafetensorsFile::open((dir / "adapter" / "adapter_model.safetensors").string());
  EXPECT_EQ(file->tensors().size(), 10u);  // 2 layers × q, v × A, B, and the two full weights
  EXPECT_TRUE(io::read_tensor(*file, file->at("base_model.model.lm_head.weight")).equal(m->lm_head->weight));
  const auto config = nlohmann::json::parse(std::ifstream(dir / "adapter" / "adapter_config.json"));
  EXPECT_EQ(config.at("modules_to_save"), nlohmann::json({"lm_head", "embed_tokens"}));

  model::CausalLM loaded = base_model();
  EXPECT_TRUE(adapt::check_peft_adapter(loaded, (dir / "adapter").string()).empty());
  EXPECT_EQ(adapt::load_peft_adapter(loaded, (dir / "adapter").string()).modules_to_save, o.modules_to_save);
  EXPECT_TRUE(loaded->forward(ids()).equal(logits));
  EXPECT_TRUE(loaded->lm_head->weight.requires_grad());  // they train on when the adapter is trained further
  adapt::merge_and_unload_lora(loaded);
  EXPECT_LE(test::max_rel_error(loaded->forward(ids()), logits), 1e-5);

  // PEFT's suffix rule: "norm" is every norm (the final one and two per block), "layers.1" a block.
  {
    model::CausalLM x = base_model();
    EXPECT_EQ(adapt::modules_to_save_parameters(x, {"norm"}).size(), 5u);
    size_t in_block = 0;
    for (const auto& [name, p] : adapt::modules_to_save_parameters(x, {"layers.1"}))
      in_block += name.rfind("model.layers.1.", 0) == 0;
    EXPECT_EQ(in_block, 9u);  // 7 matrices and 2 norms
  }
  auto refused = [&](const adapt::LoraOptions& bad, model::CausalLM x) { return error_of([&] { adapt::apply_lora(x, bad); }); };
  adapt::LoraOptions bad = o;
  bad.modules_to_save = {"lm_head", "score"};
  EXPECT_NE(refused(bad, base_model()).find("modules_to_save: 'score' matches no module"), std::string::npos);
  // PEFT matches modules_to_save as a suffix but keeps targets out only where the entry is a whole
  // name segment: "_proj" would train q_proj in full and adapt it at once.
  bad.modules_to_save = {"_proj"};
  EXPECT_NE(refused(bad, base_model()).find("modules_to_save: model.layers.0.self_attn.q_proj.weight belongs to "
                                            "model.layers.0.self_attn.q_proj, which is also a LoRA target"),
            std::string::npos);
  {
    // A whole name is kept out of the targets instead: lm_head trains in full, unadapted.
    model::CausalLM x = base_model();
    bad = o;
    bad.targets = {"q_proj", "lm_head"};
    EXPECT_EQ(adapt::apply_lora(x, bad).size(), 2u);
    EXPECT_TRUE(x->lm_head->weight.requires_grad());
  }
  {
    // A tied model is untied first, as PEFT does: the named one trains, the other keeps the base's
    // weights; the logits start as the base's, and the merged checkpoint is untied.
    io::ModelConfig tied_config = test::tiny_config();
    tied_config.tie_word_embeddings = true;
    model::CausalLM t(tied_config);
    model::init_weights(t, 11);
    t->eval();
    const at::Tensor tied_logits = t->forward(ids());
    adapt::LoraOptions e = o;
    e.modules_to_save = {"embed_tokens"};
    adapt::apply_lora(t, e);
    EXPECT_FALSE(t->config().tie_word_embeddings);
    ASSERT_TRUE(t->lm_head);
    EXPECT_FALSE(t->lm_head->weight.requires_grad());
    EXPECT_TRUE(t->model->embed_tokens->weight.requires_grad());
    EXPECT_TRUE(t->forward(ids()).equal(tied_logits));
    randomize_b(t, 13);
    const at::Tensor adapted = t->forward(ids());
    adapt::save_peft_adapter(t, e, (dir / "tied").string());
    model::CausalLM t2(tied_config);
    model::init_weights(t2, 11);
    t2->eval();
    EXPECT_TRUE(adapt::check_peft_adapter(t2, (dir / "tied").string()).empty());
    model::CausalLM t3(tied_config);
    model::init_weights(t3, 11);
    t3->eval();
    adapt::load_peft_adapter(t3, (dir / "tied").string());
    EXPECT_TRUE(t3->forward(ids()).equal(adapted));
    adapt::merge_and_unload_lora(t3);
    io::save_pretrained(t3, (dir / "tied_merged").string());
    model::CausalLM back = io::load_pretrained((dir / "tied_merged").string());
    EXPECT_FALSE(back->config().tie_word_embeddings);
    EXPECT_LE(test::max_rel_error(back->forward(ids()), adapted), 1e-5);
  }
  {
    model::CausalLM q = base_model();
    for (const auto& item : q->named_modules()) {
      if (item.key() == "model.layers.0.mlp.down_proj") dynamic_cast<model::LinearImpl&>(*item.value()).quantize_nf4();
    }
    bad = o;
    bad.modules_to_save = {"down_proj"};
    EXPECT_NE(refused(bad, q).find("model.layers.0.mlp.down_proj is stored in NF4"), std::string::npos);
  }
  // A file without one of the full weights, or with a misshapen one, is named.
  fs::copy(dir / "adapter", dir / "cut", fs::copy_options::recursive);
  {
    std::vector<at::Tensor> keep;
    std::vector<io::TensorWrite> writes;
    for (const auto& info : file->tensors()) {
      if (info.name == "base_model.model.model.embed_tokens.weight") continue;
      keep.push_back(io::read_tensor(*file, info));
      if (info.name == "base_model.model.lm_head.weight") keep.back() = keep.back().narrow(0, 0, 5).contiguous();
      writes.push_back(io::tensor_write(info.name, keep.back()));
    }
    io::write_safetensors((dir / "cut" / "adapter_model.safetensors").string(), writes);
  }
  model::CausalLM cut = base_model();
  const auto problems = adapt::check_peft_adapter(cut, (dir / "cut").string());
  ASSERT_EQ(problems.size(), 2u);
  EXPECT_NE(problems[0].find("'base_model.model.lm_head.weight' has shape [5, 32]"), std::string::npos) << problems[0];
  EXPECT_NE(problems[1].find("'base_model.model.model.embed_tokens.weight' is missing"), std::string::npos) << problems[1];
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(cut, (dir / "cut").string()); })
                .find("'base_model.model.model.embed_tokens.weight' is missing (modules_to_save names its module)"),
            std::string::npos);
  fs::remove_all(dir);
}

namespace {
// The modules apply_lora adapts in a fresh base_model() under `o`, in model order.
std::vector<std::string> adapted(const adapt::LoraOptions& o) {
  model::CausalLM m = base_model();
  std::vector<std::string> names;
  for (const auto& l : adapt::apply_lora(m, o)) names.push_back(l.module);
  return names;
}
}  // namespace

// PEFT's narrowing of the targets: layers_to_transform keeps the suffix matches in the listed layers
// (the index after "<layers_pattern>.", or after the first dotted segment), an exactly named module
// is adapted wherever it is, and a module that modules_to_save names is never a target. The options
// travel in the adapter config (PEFT's int and string forms read too).
TEST(Lora, LayersToTransformAndModulesToSaveNarrowTheTargets) {
  adapt::LoraOptions o;
  o.targets = {"q_proj", "v_proj"};
  o.layers_to_transform = {1};
  const std::vector<std::string> layer1 = {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"};
  EXPECT_EQ(adapted(o), layer1);
  o.layers_pattern = {"layers"};
  EXPECT_EQ(adapted(o), layer1);
  o.layers_pattern = {"blocks"};  // no index found: nothing matches
  EXPECT_NE(error_of([&] { adapted(o); }).find("no linear layer matches the targets"), std::string::npos);
  o.layers_pattern = {};
  o.targets = {"model.layers.0.self_attn.q_proj", "v_proj"};  // an exact name is not narrowed
  EXPECT_EQ(adapted(o), (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}));

  adapt::LoraOptions x;
  x.targets = {"q_proj", "up_proj"};
  x.modules_to_save = {"mlp.up_proj"};  // trained in full, so never a target
  EXPECT_EQ(adapted(x), (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}));
  x.targets = {"up_proj"};  // the target exists, modules_to_save takes all of it
  EXPECT_NE(error_of([&] { adapted(x); }).find("no linear layer matches the targets"), std::string::npos);
  x.modules_to_save = {"mlp.up_proj("};
  EXPECT_NE(error_of([&] { adapted(x); }).find("'mlp.up_proj(' is not a regular expression"), std::string::npos);

  const fs::path dir = scratch("lora_layers");
  model::CausalLM m = base_model();
  o.targets = {"q_proj", "v_proj"};
  o.layers_to_transform = {1};
  o.layers_pattern = {"layers"};
  o.modules_to_save = {"mlp.up_proj"};
  adapt::apply_lora(m, o);
  randomize_b(m, 14);
  const at::Tensor logits = m->forward(ids());
  adapt::save_peft_adapter(m, o, dir.string());
  auto config = nlohmann::json::parse(std::ifstream(dir / "adapter_config.json"));
  EXPECT_EQ(config.at("layers_to_transform"), nlohmann::json({1}));
  EXPECT_EQ(config.at("layers_pattern"), nlohmann::json({"layers"}));
  model::CausalLM loaded = base_model();
  const adapt::LoraOptions back = adapt::load_peft_adapter(loaded, dir.string());
  EXPECT_EQ(back.layers_to_transform, o.layers_to_transform);
  EXPECT_TRUE(loaded->forward(ids()).equal(logits));
  config["layers_to_transform"] = 1;  // PEFT's int and string forms
  config["layers_pattern"] = "layers";
  std::ofstream(dir / "adapter_config.json") << config.dump();
  const adapt::LoraOptions forms = adapt::read_peft_lora_config((dir / "adapter_config.json").string());
  EXPECT_EQ(forms.layers_to_transform, (std::vector<int64_t>{1}));
  EXPECT_EQ(forms.layers_pattern, (std::vector<std::string>{"layers"}));
  fs::remove_all(dir);
}

// PEFT's exclude_modules: a list leaves out modules by exact name or "."-suffix, a string is a
// regular expression over the whole name; both travel in adapter_config.json. An entry naming no
// linear layer (a misspelling, most likely) and an invalid expression are errors.
TEST(Lora, ExcludeModulesLeaveLayersOut) {
  adapt::LoraOptions o;
  o.targets = {"all-linear"};
  o.exclude_modules = {"mlp.down_proj", "model.layers.0.self_attn.q_proj", "k_proj", "up_proj", "gate_proj"};
  EXPECT_EQ(adapted(o), (std::vector<std::string>{"model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                                  "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                                  "model.layers.1.self_attn.o_proj"}));
  o.exclude_modules = {"self_attn.qproj"};
  EXPECT_NE(error_of([&] { adapted(o); }).find("exclude_modules entry 'self_attn.qproj' names no linear layer"),
            std::string::npos);
  o.exclude_modules = {};
  o.exclude_regex = R"(.*layers\.1\..*|.*mlp\..*)";
  EXPECT_EQ(adapted(o), (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                                  "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"}));
  o.exclude_regex = "(";
  EXPECT_NE(error_of([&] { adapted(o); }).find("'(' is not a regular expression"), std::string::npos);
  o.targets = {"q_proj"};
  o.exclude_regex = ".*q_proj";  // everything excluded
  EXPECT_NE(error_of([&] { adapted(o); }).find("no linear layer matches the targets"), std::string::npos);

  const fs::path dir = scratch("lora_exclude");
  for (bool regex : {false, true}) {
    adapt::LoraOptions s;
    s.targets = {"all-linear"};
    if (regex) s.exclude_regex = R"(.*\.0\.mlp\..*)";
    else s.exclude_modules = {"o_proj"};
    model::CausalLM m = base_model();
    adapt::apply_lora(m, s);
    randomize_b(m, 15);
    const at::Tensor logits = m->forward(ids());
    adapt::save_peft_adapter(m, s, dir.string());
    const auto config = nlohmann::json::parse(std::ifstream(dir / "adapter_config.json"));
    EXPECT_EQ(config.at("exclude_modules"), regex ? nlohmann::json(s.exclude_regex) : nlohmann::json({"o_proj"}));
    model::CausalLM loaded = base_model();
    const adapt::LoraOptions back = adapt::load_peft_adapter(loaded, dir.string());
    EXPECT_EQ(back.exclude_modules, s.exclude_modules);
    EXPECT_EQ(back.exclude_regex, s.exclude_regex);
    EXPECT_TRUE(loaded->forward(ids()).equal(logits));
  }
  fs::remove_all(dir);
}

// --- against Python PEFT (files from tests/python/peft_interop.py make) ------------------------------

namespace {

const char* peft_dir() {
  const char* d = std::getenv("LIBFT_PEFT_DIR");
  return d && *d && fs::exists(fs::path(d) / "peft_logits.safetensors") ? d : nullptr;
}

// The base an adapter of peft_interop.py adapts: "tied" has a tied head (BASES there).
std::string base_of(const std::string& name) {
  return name == "tied"     ? "base_tied"
         : name == "qwen3"  ? "base_qwen3"
         : name == "gemma3" ? "base_gemma3"
         : name == "gemma2" ? "base_gemma2"
         : name.starts_with("phi3") ? "base_phi3"
         : name == "olmo2"  ? "base_olmo2"
         : name.starts_with("mixtral") ? "base_mixtral"
         : name.starts_with("qwen3_moe") ? "base_qwen3_moe"
         : name.starts_with("qwen2_moe") ? "base_qwen2_moe"
         : name.starts_with("gpt_oss")   ? "base_gpt_oss"
         : name.starts_with("bias_")     ? "base_bias"
                            : "base";
}

}  // namespace

TEST(PeftInterop, LibftLoadsPeftAdaptersWithTheSameLogits) {
  const char* d = peft_dir();
  if (!d) GTEST_SKIP() << "LIBFT_PEFT_DIR has no PEFT files (ctest's peft_make writes them)";
  auto ref = io::SafetensorsFile::open((fs::path(d) / "peft_logits.safetensors").string());
  const at::Tensor input = io::read_tensor(*ref, ref->at("input_ids"));
  for (const char* name : {"lists", "rslora", "dora", "saved", "tied", "layers", "exclude", "exclude_re", "qwen3", "gemma3",
                           "gemma2", "phi3", "phi3_dora", "olmo2", "mixtral", "mixtral_experts", "qwen3_moe_experts",
                           "qwen3_moe_all_linear", "qwen2_moe_all_linear", "gpt_oss_experts", "bias_all",
                           "bias_lora_only"}) {
    SCOPED_TRACE(name);
    model::CausalLM m = io::load_pretrained((fs::path(d) / base_of(name)).string());
    m->eval();
    const at::Tensor base = m->forward(input);
    adapt::load_peft_adapter(m, (fs::path(d) / (std::string("peft_") + name)).string());
    const at::Tensor want = io::read_tensor(*ref, ref->at(std::string("logits_") + name));
    const at::Tensor got = m->forward(input);
    EXPECT_LE(test::max_rel_error(got, want), 1e-4);
    EXPECT_GT(test::max_rel_error(base, want), 1e-2);  // the adapter matters
    if (std::string(name).ends_with("_experts") || std::string(name) == "qwen3_moe_all_linear") {
      // Saved again: PEFT's own tensors and ranks (gate and up still share each expert's A).
      const fs::path again = fs::path(d) / (std::string("resaved_") + name);
      const adapt::LoraOptions o =
          adapt::read_peft_lora_config((fs::path(d) / (std::string("peft_") + name) / "adapter_config.json").string());
      adapt::save_peft_adapter(m, o, again.string());
      auto mine = io::SafetensorsFile::open((again / "adapter_model.safetensors").string());
      auto theirs = io::SafetensorsFile::open((fs::path(d) / (std::string("peft_") + name) / "adapter_model.safetensors").string());
      ASSERT_EQ(mine->tensors().size(), theirs->tensors().size());
      for (const auto& info : theirs->tensors()) {
        const io::TensorInfo* other = mine->find(info.name);
        ASSERT_NE(other, nullptr) << info.name;
        EXPECT_TRUE(at::equal(io::read_tensor(*mine, *other), io::read_tensor(*theirs, info))) << info.name;
      }
      const auto back = adapt::read_peft_lora_config((again / "adapter_config.json").string());
      // (by whole name: mixtral_experts 2 layers × 2; qwen3_moe_experts 1; qwen3_moe_all_linear 1 × 2 and its router)
      EXPECT_EQ(back.target_parameters.size(), std::string(name) == "mixtral_experts" || std::string(name) == "gpt_oss_experts" ? 4u
                                               : std::string(name) == "qwen3_moe_experts" ? 1u : 3u);
    }
    adapt::merge_lora(m);
    EXPECT_LE(test::max_rel_error(m->forward(input), want), 1e-4);
  }
}

// libft makes its own adapters (same configs, its own B values) and saves them with its logits;
// tests/python/peft_interop.py verify loads them with PEFT.
TEST(PeftInterop, LibftSavesAdaptersForPeft) {
  const char* d = peft_dir();
  if (!d) GTEST_SKIP() << "LIBFT_PEFT_DIR has no PEFT files (ctest's peft_make writes them)";
  auto ref = io::SafetensorsFile::open((fs::path(d) / "peft_logits.safetensors").string());
  const at::Tensor input = io::read_tensor(*ref, ref->at("input_ids"));
  std::vector<at::Tensor> keep{input};
  std::vector<io::TensorWrite> writes{io::tensor_write("input_ids", keep[0])};
  for (const char* name : {"lists", "rslora", "dora", "saved", "tied", "layers", "exclude", "exclude_re", "qwen3", "gemma3",
                           "gemma2", "phi3", "phi3_dora", "olmo2", "mixtral", "mixtral_experts", "qwen3_moe_experts",
                           "qwen3_moe_all_linear", "qwen2_moe_all_linear", "gpt_oss_experts", "bias_all",
                           "bias_lora_only"}) {
    const adapt::LoraOptions o =
        adapt::read_peft_lora_config((fs::path(d) / (std::string("peft_") + name) / "adapter_config.json").string());
    model::CausalLM m = io::load_pretrained((fs::path(d) / base_of(name)).string());
    m->eval();
    adapt::apply_lora(m, o);
    randomize_b(m, 9);
    if (o.bias != "none") {  // the biases that bias = all/lora_only trains, away from the base's
      at::NoGradGuard no_grad;
      int64_t trained = 0;
      for (const auto& item : m->named_parameters()) {
        if (!item.key().ends_with(".bias") || !item.value().requires_grad()) continue;
        item.value().add_(at::randn_like(item.value()) * 0.5);
        ++trained;
      }
      // (bias_all: q, k, v, o, gate, up, down in each of 2 layers; bias_lora_only: q and up)
      EXPECT_EQ(trained, o.bias == "all" ? 14 : 4) << name;
    }
    if (std::string(name) == "mixtral_experts" || std::string(name) == "gpt_oss_experts") {
      // Each expert's gate and up adapters with A of their own, as training leaves them: saved as
      // gate_up_proj at twice the rank (gpt-oss's B rows interleaved).
      at::NoGradGuard no_grad;
      for (const auto& item : m->named_parameters()) {
        if (item.key().find("experts.") != std::string::npos && (item.key().find(".w3.lora_A") != std::string::npos ||
                                                                 item.key().find(".up_proj.lora_A") != std::string::npos))
          item.value().add_(at::randn_like(item.value()) * 0.1);
      }
    }
    keep.push_back(m->forward(input).detach().contiguous());
    writes.push_back(io::tensor_write(std::string("logits_") + name, keep.back()));
    adapt::save_peft_adapter(m, o, (fs::path(d) / (std::string("libft_") + name)).string(), base_of(name));
  }
  io::write_safetensors((fs::path(d) / "libft_logits.safetensors").string(), writes);
}

// check_peft_adapter lists every problem at once instead of stopping at the first.
TEST(Lora, CheckAdapterReportsEveryProblem) {
  const fs::path dir = scratch("lora_check");
  model::CausalLM m = base_model();
  adapt::LoraOptions o;
  o.targets = {"q_proj", "v_proj"};
  adapt::apply_lora(m, o);
  adapt::save_peft_adapter(m, o, (dir / "good").string());
  model::CausalLM base = base_model();
  EXPECT_TRUE(adapt::check_peft_adapter(base, (dir / "good").string()).empty());

  // Rewrite the adapter: one tensor missing, one misshapen, one with a NaN, one extra; and a
  // config target that matches nothing.
  auto file = io::SafetensorsFile::open((dir / "good" / "adapter_model.safetensors").string());
  std::vector<at::Tensor> keep;
  std::vector<io::TensorWrite> writes;
  for (const auto& info : file->tensors()) {
    at::Tensor t = io::read_tensor(*file, info);
    if (info.name.find("layers.0.self_attn.q_proj.lora_A") != std::string::npos) continue;          // missing
    if (info.name.find("layers.1.self_attn.q_proj.lora_A") != std::string::npos) t = t.narrow(0, 0, 4);  // shape
    if (info.name.find("layers.1.self_attn.v_proj.lora_B") != std::string::npos) t[0][0] = NAN;
    keep.push_back(t.contiguous());
    writes.push_back(io::tensor_write(info.name, keep.back()));
  }
  keep.push_back(at::zeros({8, 32}));
  writes.push_back(io::tensor_write("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", keep.back()));
  fs::create_directories(dir / "bad");
  io::write_safetensors((dir / "bad" / "adapter_model.safetensors").string(), writes);
  auto config = nlohmann::json::parse(std::ifstream(dir / "good" / "adapter_config.json"));
  config["target_modules"] = {"q_proj", "v_proj", "x_proj"};
  std::ofstream(dir / "bad" / "adapter_config.json") << config.dump();
  const auto problems = adapt::check_peft_adapter(base, (dir / "bad").string());
  std::string all;
  for (const auto& p : problems) all += p + "\n";
  EXPECT_EQ(problems.size(), 5u) << all;
  EXPECT_NE(all.find("target 'x_proj' matches no linear layer"), std::string::npos) << all;
  EXPECT_NE(all.find("layers.0.self_attn.q_proj.lora_A.weight' is missing"), std::string::npos) << all;
  EXPECT_NE(all.find("layers.1.self_attn.q_proj.lora_A.weight' has shape [4, 32], the model needs [8, 32]"),
            std::string::npos) << all;
  EXPECT_NE(all.find("layers.1.self_attn.v_proj.lora_B.weight' holds NaN or Inf"), std::string::npos) << all;
  EXPECT_NE(all.find("k_proj.lora_A.weight' belongs to no adapted layer"), std::string::npos) << all;

  // An adapter PEFT made on Gemma 3's image-text model (its layers under model.language_model.*):
  // the reason, once, instead of every tensor missing and unexpected.
  keep.clear();
  writes.clear();
  for (const auto& info : file->tensors()) {
    keep.push_back(io::read_tensor(*file, info));
    const std::string prefix = "base_model.model.model.";  // → base_model.model.model.language_model.
    ASSERT_TRUE(info.name.starts_with(prefix)) << info.name;
    const std::string name = prefix + "language_model." + info.name.substr(prefix.size());
    writes.push_back(io::tensor_write(name, keep.back()));
  }
  fs::create_directories(dir / "image_text");
  io::write_safetensors((dir / "image_text" / "adapter_model.safetensors").string(), writes);
  fs::copy_file(dir / "good" / "adapter_config.json", dir / "image_text" / "adapter_config.json");
  const auto image_text = adapt::check_peft_adapter(base, (dir / "image_text").string());
  ASSERT_EQ(image_text.size(), 1u);
  EXPECT_NE(image_text[0].find("was made on an image-text model (its tensor 'base_model.model.model.language_model."),
            std::string::npos) << image_text[0];
  EXPECT_NE(image_text[0].find("names language_model)"), std::string::npos) << image_text[0];
  EXPECT_NE(error_of([&] { adapt::load_peft_adapter(base, (dir / "image_text").string()); }).find("image-text model"),
            std::string::npos);
  fs::remove_all(dir);
}

// DoRA in float64: the adapted layer computes x (m ⊙ (W + ΔW) / ||W + ΔW||_row)ᵀ + b, merging gives
// that weight, unmerging restores W, and a fresh DoRA adapter leaves the base unchanged.
// PEFT's bias option: lora_only trains the adapted layers' biases, all every linear layer's; the
// fused node (which takes the base's bias as frozen) steps aside for a layer whose bias trains, so
// that the bias gets its gradient, the same as on the unfused chain.
TEST(Lora, BiasOptionTrainsTheBasesBiases) {
  io::ModelConfig c = test::tiny_config();
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  for (const std::string bias : {"lora_only", "all"}) {
    SCOPED_TRACE(bias);
    model::CausalLM m(c);
    model::init_weights(m, 3);
    adapt::LoraOptions o;
    o.targets = {"q_proj", "up_proj"};
    o.bias = bias;
    adapt::apply_lora(m, o);
    auto params = m->named_parameters();
    EXPECT_TRUE(params["model.layers.0.self_attn.q_proj.bias"].requires_grad());
    EXPECT_TRUE(params["model.layers.1.mlp.up_proj.bias"].requires_grad());
    EXPECT_EQ(params["model.layers.0.self_attn.k_proj.bias"].requires_grad(), bias == "all");
    EXPECT_EQ(params["model.layers.1.mlp.down_proj.bias"].requires_grad(), bias == "all");
    EXPECT_FALSE(params["model.layers.0.self_attn.q_proj.weight"].requires_grad());
    m->train();
    const at::Tensor ids = at::randint(0, c.vocab_size, {2, 6}, at::kLong);
    auto grads = [&](bool fused) {
      adapt::set_lora_fused(m, fused);
      m->zero_grad();
      model::causal_lm_loss(m->forward(ids), ids).backward();
      return std::make_pair(params["model.layers.0.self_attn.q_proj.bias"].grad().clone(),
                            params["model.layers.0.self_attn.q_proj.lora_A.weight"].grad().clone());
    };
    const auto fused = grads(true), chain = grads(false);
    ASSERT_TRUE(fused.first.defined());
    EXPECT_GT(fused.first.abs().max().item<double>(), 0.0);
    EXPECT_LE(test::max_rel_error(fused.first, chain.first), 1e-6);
    EXPECT_LE(test::max_rel_error(fused.second, chain.second), 1e-6);
  }
  model::CausalLM m(c);
  adapt::LoraOptions o;
  o.bias = "some";
  EXPECT_NE(test::error_of([&] { adapt::apply_lora(m, o); }).find("bias must be none, all or lora_only"), std::string::npos);
}

TEST(Lora, DoraFollowsItsFormula) {
  io::ModelConfig mc = test::tiny_config();
  mc.mlp_bias = true;  // DoRA rescales x Wᵀ, not the bias
  model::CausalLM m(mc);
  model::init_weights(m, 2);
  {
    at::NoGradGuard no_grad;
    for (const auto& item : m->named_parameters()) {
      if (item.key().ends_with(".bias")) item.value().normal_(0.0, 0.1);
    }
  }
  m->to(at::kDouble);
  m->eval();
  const at::Tensor base = m->forward(ids());
  std::map<std::string, at::Tensor> base_w;
  for (const auto& item : m->named_parameters()) base_w[item.key()] = item.value().detach().clone();
  adapt::LoraOptions o;
  o.targets = {"q_proj", "up_proj"};
  o.dora = true;
  const auto layers = adapt::apply_lora(m, o);
  EXPECT_LE(test::max_rel_error(m->forward(ids()), base), 1e-14);  // m = ||W|| and B = 0
  randomize_b(m, 6);
  {
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
    for (const auto& item : m->named_parameters()) {
      if (item.key().ends_with("lora_magnitude_vector.weight"))
        item.value().mul_(1 + 0.2 * at::empty(item.value().sizes(), at::kDouble).normal_(0, 1, gen));
    }
  }
  EXPECT_TRUE(m->named_parameters()["model.layers.0.mlp.up_proj.lora_magnitude_vector.weight"].requires_grad());
  const at::Tensor adapted = m->forward(ids());

  model::CausalLM manual(mc);
  {
    at::NoGradGuard no_grad;
    auto params = manual->named_parameters();
    for (auto& [k, v] : base_w) params[k].set_data(v.clone());
    auto lp = m->named_parameters();
    for (const auto& l : layers) {
      const at::Tensor w = base_w[l.module + ".weight"] +
                           at::matmul(lp[l.module + ".lora_B.weight"], lp[l.module + ".lora_A.weight"]) * l.scale;
      const at::Tensor mag = lp[l.module + ".lora_magnitude_vector.weight"];
      params[l.module + ".weight"].copy_(w * (mag / at::linalg_vector_norm(w, 2, {1})).view({-1, 1}));
    }
  }
  manual->eval();
  EXPECT_LE(test::max_rel_error(adapted, manual->forward(ids())), 1e-12);
  EXPECT_GT(test::max_rel_error(adapted, base), 1e-3);
  adapt::merge_lora(m);
  EXPECT_LE(test::max_rel_error(m->forward(ids()), adapted), 1e-12);
  adapt::unmerge_lora(m);
  for (const auto& [k, v] : base_w) EXPECT_LE(test::max_rel_error(m->named_parameters()[k], v), 1e-13) << k;
}

// The fused training path (adapt::set_lora_fused) against the plain autograd chain: the same loss and
// the same gradients of every adapter (and so of the input gradients that reach earlier layers), in
// float64 on a dense base and in float32 on an NF4 base, with biases; evaluation keeps the unfused
// path bit for bit. (Dropout draws its noise differently on the two paths on the CPU; the next test
// checks the fused path's dropout against its formula.)
namespace {
// The linear layers of `m` but the head in NF4 (blocks of 16, double-quantized maxima).
void quantize_base_nf4(model::CausalLM& m) {
  for (const auto& item : m->named_modules()) {
    if (auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get()); lin && item.key() != "lm_head")
      lin->quantize_nf4(16, true);
  }
}

// One training pass through the fused LoRA node (`fused`) or PEFT's autograd chain, under one seed
// (the same dropout draws on both paths): the loss and the trainable parameters' gradients.
std::pair<double, std::map<std::string, at::Tensor>> lora_pass(model::CausalLM& m, bool fused) {
  adapt::set_lora_fused(m, fused);
  for (auto& p : m->parameters()) p.mutable_grad() = at::Tensor();
  at::manual_seed(42);
  const at::Tensor logits = m->forward(ids());
  const at::Tensor loss =
      at::cross_entropy_loss(logits.view({-1, logits.size(-1)}).to(at::kDouble), ids().roll(-1, 1).reshape({-1}));
  loss.backward();
  return {loss.item<double>(), trainable_grads(m)};
}
}  // namespace

TEST(LoraFused, SameLossAndGradientsAsTheAutogradChain) {
  struct Case {
    double dropout;
    bool nf4;
    at::ScalarType dtype;
    double tol;
    bool dora = false;
  };
  for (const Case k : {Case{0.0, false, at::kDouble, 1e-12}, Case{0.0, true, at::kFloat, 2e-5},
                       Case{0.0, false, at::kDouble, 1e-12, true}, Case{0.0, true, at::kFloat, 2e-5, true}}) {
    io::ModelConfig mc = test::tiny_config();
    mc.qkv_bias = true;  // q/k/v biases: the fused GEMM starts from the bias
    model::CausalLM m(mc);
    model::init_weights(m, 11);
    m->to(k.dtype);
    if (k.nf4) quantize_base_nf4(m);
    adapt::LoraOptions o;
    o.targets = {"all-linear"};
    o.r = 4;
    o.dropout = k.dropout;
    o.dora = k.dora;
    adapt::apply_lora(m, o);
    randomize_b(m, 3);
    if (k.dora) {  // magnitudes away from the initial row norms, so that c = m / n is not 1
      at::NoGradGuard no_grad;
      for (const auto& item : m->named_parameters()) {
        if (item.key().find("lora_magnitude_vector") != std::string::npos) item.value().mul_(1.0 + 0.3 * at::rand_like(item.value()));
      }
    }
    m->train();
    const auto [loss_plain, g_plain] = lora_pass(m, false);
    const auto [loss_fused, g_fused] = lora_pass(m, true);
    SCOPED_TRACE("dropout " + std::to_string(k.dropout) + (k.nf4 ? ", NF4" : ", dense") + (k.dora ? ", DoRA" : ""));
    EXPECT_NEAR(loss_fused, loss_plain, k.tol * std::abs(loss_plain));
    ASSERT_EQ(g_plain.size(), g_fused.size());
    ASSERT_EQ(g_plain.size(), (k.dora ? 3u : 2u) * 7u * 2u);  // A and B (and m) of 7 linears in 2 blocks
    for (const auto& [name, g] : g_plain) {
      ASSERT_TRUE(g.defined()) << name;
      EXPECT_LE(test::max_rel_error(g_fused.at(name), g), k.tol) << name;
    }
    // Evaluation: the unfused path whatever the switch, so adapters keep PEFT's logits exactly.
    m->eval();
    adapt::set_lora_fused(m, true);
    const at::Tensor a = m->forward(ids());
    adapt::set_lora_fused(m, false);
    EXPECT_TRUE(a.equal(m->forward(ids())));
  }
}

// Phi-3's packed projections are adapted whole, as PEFT adapts them: all-linear finds four layers
// per block, the fused node (dense and NF4 bases, LoRA and DoRA) gives the autograd chain's loss and
// gradients, grouping has nothing to group, and targets naming the unpacked layers are refused
// with the names the model has.
TEST(Lora, PackedProjectionsAreAdaptedWhole) {
  io::ModelConfig mc = test::tiny_config("phi3");
  {
    model::CausalLM m(mc);
    adapt::LoraOptions o;  // PEFT's q_proj and v_proj
    const std::string e = error_of([&] { adapt::apply_lora(m, o); });
    EXPECT_NE(e.find("no linear layer matches the targets (q_proj, v_proj) (layer 0's linear layers: "
                     "self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj); phi3 packs q, k and v "
                     "into qkv_proj"),
              std::string::npos)
        << e;
    o.targets = {"qkv_proj", "gate_proj"};
    EXPECT_NE(error_of([&] { adapt::apply_lora(m, o); }).find("target 'gate_proj' matches no linear layer of the model"),
              std::string::npos);
  }
  for (const bool nf4 : {false, true}) {
    for (const bool dora : {false, true}) {
      SCOPED_TRACE(std::string(nf4 ? "NF4" : "dense") + (dora ? ", DoRA" : ", LoRA"));
      model::CausalLM m(mc);
      model::init_weights(m, 12);
      const at::ScalarType dtype = nf4 ? at::kFloat : at::kDouble;
      m->to(dtype);
      if (nf4) quantize_base_nf4(m);
      adapt::LoraOptions o;
      o.targets = {"all-linear"};
      o.r = 4;
      o.dora = dora;
      const auto layers = adapt::apply_lora(m, o);
      ASSERT_EQ(layers.size(), 8u);
      EXPECT_EQ(layers[0].module, "model.layers.0.self_attn.qkv_proj");
      randomize_b(m, 4);
      adapt::set_lora_group_projections(m, true);  // nothing to group: the packed layers stay one node each
      m->train();
      test::OpNames ops;
      const auto [loss_plain, g_plain] = lora_pass(m, false);
      const auto [loss_fused, g_fused] = lora_pass(m, true);
      EXPECT_FALSE(ops.seen("ft::lora_grouped_projections"));
      const double tol = nf4 ? 2e-5 : 1e-12;
      EXPECT_NEAR(loss_fused, loss_plain, tol * std::abs(loss_plain));
      ASSERT_EQ(g_plain.size(), (dora ? 3u : 2u) * 4u * 2u);
      for (const auto& [name, g] : g_plain) EXPECT_LE(test::max_rel_error(g_fused.at(name), g), tol) << name;
    }
  }
}

// The adapter modes' frozen base in bf16 (store_frozen_linears, which the trainer calls under CUDA
// bf16 autocast): only the frozen linear weights change dtype, and under autocast (here the CPU's)
// the losses and every gradient, on the fused and the unfused path, are bit-identical to those of
// the float32 base, because autocast casts each weight to bf16 before its product anyway.
TEST(LoraFused, FrozenBaseInBf16ComputesWhatAutocastComputes) {
  io::ModelConfig mc = test::tiny_config();
  mc.qkv_bias = true;
  auto make = [&] {
    model::CausalLM m(mc);
    model::init_weights(m, 4);
    adapt::LoraOptions o;
    o.targets = {"q_proj", "v_proj", "down_proj"};  // adapted and plain frozen layers both
    o.r = 4;
    adapt::apply_lora(m, o);
    randomize_b(m, 6);
    m->train();
    return m;
  };
  model::CausalLM ref = make(), half = make();
  std::map<std::string, at::ScalarType> before;
  int64_t frozen_linear_elements = 0;
  for (const auto& item : half->named_parameters()) {
    before[item.key()] = item.value().scalar_type();
    const bool linear_weight = item.key().find("_proj.weight") != std::string::npos || item.key() == "lm_head.weight";
    if (linear_weight && !item.value().requires_grad()) frozen_linear_elements += item.value().numel();
  }
  ASSERT_GT(frozen_linear_elements, 0);
  EXPECT_EQ(adapt::store_frozen_linears(half, at::kBFloat16), 2 * frozen_linear_elements);  // 4 → 2 bytes each
  EXPECT_EQ(adapt::store_frozen_linears(half, at::kBFloat16), 0);  // already done
  for (const auto& item : half->named_parameters()) {
    const bool linear_weight = item.key().find("_proj.weight") != std::string::npos || item.key() == "lm_head.weight";
    const bool lora = item.key().find("lora_") != std::string::npos;
    const at::ScalarType want = linear_weight && !lora ? at::kBFloat16 : before.at(item.key());
    EXPECT_EQ(item.value().scalar_type(), want) << item.key();
  }
  for (const bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "unfused");
    auto run = [&](model::CausalLM& m) {
      adapt::set_lora_fused(m, fused);
      for (auto& p : m->parameters()) p.mutable_grad() = at::Tensor();
      at::Tensor loss;
      {
        util::AutocastScope autocast(true, at::kCPU);
        const at::Tensor logits = m->forward(ids());
        EXPECT_EQ(logits.scalar_type(), at::kBFloat16);  // autocast is really on
        loss = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}).to(at::kFloat), ids().roll(-1, 1).reshape({-1}));
      }
      loss.backward();
      return std::make_pair(loss.item<float>(), trainable_grads(m));
    };
    const auto [loss_ref, g_ref] = run(ref);
    const auto [loss_half, g_half] = run(half);
    EXPECT_EQ(loss_half, loss_ref);
    ASSERT_EQ(g_ref.size(), 3u * 2u * 2u);
    for (const auto& [name, g] : g_ref) EXPECT_TRUE(g_half.at(name).equal(g)) << name;
  }
}

// The extended GEMM (set_lora_extended_gemm) in a whole model under CPU bf16 autocast with the
// frozen base stored in bf16, against the split GEMMs: three SGD steps on the adapters give the
// same losses within bf16 rounding, the first step's gradients are within bf16 bounds of the
// float64 model's (the same bf16-valued weights, no autocast), the frozen weights keep their
// values (they only moved into the [W | B] buffers), and a merged extended model saves the
// checkpoint of what it computes. o_proj's and down_proj's inputs are already bf16 under
// autocast, so those layers keep the split GEMMs in the same model.
TEST(LoraFused, ExtendedGemmTrainsAsTheSplitGemmsAndKeepsTheBase) {
  io::ModelConfig mc = test::tiny_config();
  mc.mlp_bias = true;  // the extended GEMM (up_proj) starts from the bias too
  auto make = [&](bool extended) {
    model::CausalLM m(mc);
    model::init_weights(m, 5);
    adapt::LoraOptions o;
    o.targets = {"q_proj", "v_proj", "o_proj", "down_proj", "up_proj"};
    o.r = 4;
    adapt::apply_lora(m, o);
    randomize_b(m, 8);
    adapt::store_frozen_linears(m, at::kBFloat16);
    adapt::set_lora_extended_gemm(m, extended);
    m->train();
    return m;
  };
  model::CausalLM split = make(false), ext = make(true), ref = make(false);
  ref->to(at::kDouble);  // the same (bf16-valued) base and adapters, in float64 without autocast
  std::map<std::string, at::Tensor> frozen;
  for (const auto& item : ext->named_parameters()) {
    if (!item.value().requires_grad()) frozen[item.key()] = item.value().detach().clone();
  }
  auto step = [&](model::CausalLM& m, double lr) {
    for (auto& p : m->parameters()) p.mutable_grad() = at::Tensor();
    at::Tensor loss;
    {
      util::AutocastScope autocast(lr > 0, at::kCPU);
      const at::Tensor logits = m->forward(ids());
      loss = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}).to(at::kDouble), ids().roll(-1, 1).reshape({-1}));
    }
    loss.backward();
    auto grads = trainable_grads(m);
    at::NoGradGuard no_grad;
    for (auto& p : m->parameters()) {
      if (p.requires_grad()) p.sub_(p.grad(), lr);
    }
    return std::make_pair(loss.item<double>(), grads);
  };
  const auto [loss_ref, g_ref] = step(ref, 0.0);
  double worst_split = 0, worst_ext = 0;
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE("step " + std::to_string(i));
    const auto [loss_split, g_split] = step(split, 0.05);
    const auto [loss_ext, g_ext] = step(ext, 0.05);
    EXPECT_NEAR(loss_ext, loss_split, 1e-2 * std::abs(loss_split));
    ASSERT_EQ(g_split.size(), g_ext.size());
    for (const auto& [name, g] : g_split) {
      if (i == 0) {
        worst_split = std::max(worst_split, test::max_rel_error(g, g_ref.at(name)));
        worst_ext = std::max(worst_ext, test::max_rel_error(g_ext.at(name), g_ref.at(name)));
      }
    }
  }
  // Against float64, the extended GEMM is the more accurate (measured: worst 4.4% against 7.3% for
  // the split GEMMs, whose s S Bᵀ is rounded to bf16 before the base product is added to it).
  EXPECT_LE(worst_ext, 0.06);
  EXPECT_LE(worst_split, 0.1);
  // The extension is really taken where it applies, and only there; the base is unchanged.
  auto modules = ext->named_modules();
  auto stride = [&](const std::string& name) {
    return dynamic_cast<model::LinearImpl*>(modules["model.layers.0." + name].get())->weight.stride(0);
  };
  // Rows in + r = hidden + 4 wide, hidden + 8 apart (16-byte aligned).
  EXPECT_EQ(stride("self_attn.q_proj"), mc.hidden_size + 8);
  EXPECT_EQ(stride("mlp.up_proj"), mc.hidden_size + 8);
  EXPECT_EQ(stride("mlp.down_proj"), mc.intermediate_size);  // input (silu(gate) · up) already bf16
  EXPECT_EQ(stride("self_attn.o_proj"), mc.num_attention_heads * mc.head_dim);
  EXPECT_EQ(stride("self_attn.k_proj"), mc.hidden_size);  // not adapted
  for (const auto& item : ext->named_parameters()) {
    if (frozen.count(item.key())) EXPECT_TRUE(item.value().equal(frozen.at(item.key()))) << item.key();
  }
  // Off again: contiguous weights of their own, the same values.
  adapt::set_lora_extended_gemm(ext, false);
  EXPECT_EQ(stride("self_attn.q_proj"), mc.hidden_size);
  for (const auto& item : ext->named_parameters()) {
    if (frozen.count(item.key())) EXPECT_TRUE(item.value().equal(frozen.at(item.key()))) << item.key();
  }
  // Merged into the strided weights and saved: the checkpoint loads with the in-memory model's logits.
  adapt::set_lora_extended_gemm(ext, true);
  ASSERT_NO_THROW(step(ext, 0.05));  // the weights are views of the buffers again
  EXPECT_EQ(stride("self_attn.q_proj"), mc.hidden_size + 8);
  adapt::merge_and_unload_lora(ext);
  const fs::path dir = scratch("extended_gemm_merged");
  io::save_pretrained(ext, dir.string());
  model::CausalLM loaded = io::load_pretrained(dir.string());
  loaded->eval();
  ext->eval();
  at::NoGradGuard no_grad;
  util::AutocastScope autocast(true, at::kCPU);
  EXPECT_TRUE(loaded->forward(ids()).equal(ext->forward(ids())));
}

// The fused layer in bf16 against float64, on the CPU (CPU autocast; the same code as on CUDA but
// for the dropout draws), and on CUDA where a GPU is visible (scripts/gpu-check.sh), with token
// counts that are not multiples of any tile.
TEST(LoraFused, Bf16MatchesFloat64ReferenceOnCpu) { check_fused_lora_bf16(at::kCPU, {1, 37, 300}); }

TEST(LoraCuda, FusedLayerMatchesFloat64Reference) {
  FT_REQUIRE_CUDA();
  check_fused_lora_bf16(at::kCUDA, {1, 37, 2053});
}

// Split-K adapter gradients (set_lora_grad_splits): dA and dB from partial GEMMs over token chunks
// equal one GEMM's, in float64 on the CPU (to 1e-12) and under bf16 autocast on CUDA (float32
// partials, another summation order: to 1e-5), for LoRA with both GEMM layouts and DoRA; dx does
// not change at all. A token count the splits do not divide takes one GEMM (no batched GEMM runs).
void check_grad_splits(const at::Device device) {
  const bool cuda = device.is_cuda();
  for (const bool dora : {false, true}) {
    for (const bool extended : {false, true}) {
      if (dora && extended) continue;  // DoRA keeps the split layout
      model::CausalLM m(test::tiny_config());
      model::init_weights(m, 21);
      adapt::LoraOptions o;
      o.targets = {"q_proj", "down_proj"};
      o.r = 8;
      o.dora = dora;
      adapt::apply_lora(m, o);
      randomize_b(m, 3);
      m->to(device);
      if (!cuda) m->to(at::kDouble);
      if (cuda) ASSERT_GT(adapt::store_frozen_linears(m, at::kBFloat16), 0);
      adapt::set_lora_extended_gemm(m, extended);
      m->train();
      for (const int64_t tokens : {48, 46}) {
        SCOPED_TRACE(std::string(dora ? "DoRA" : "LoRA") + (extended ? ", extended GEMM" : "") + ", " +
                     std::to_string(tokens) + " tokens on " + device.str());
        const at::Tensor ids = at::arange(tokens, at::TensorOptions().dtype(at::kLong)).remainder(97).mul(13).remainder(97)
                                   .view({2, tokens / 2}).to(device);
        auto grads = [&](int64_t splits, bool& batched) {
          adapt::set_lora_grad_splits(m, splits);
          m->zero_grad();
          test::OpNames ops;
          {
            util::AutocastScope autocast(cuda, device.type());
            m->forward(ids).to(at::kFloat).pow(2).mean().backward();
          }
          batched = ops.seen("aten::bmm");
          std::map<std::string, at::Tensor> out;
          for (const auto& item : m->named_parameters()) {
            if (item.value().requires_grad()) out[item.key()] = item.value().grad().detach().clone();
          }
          return out;
        };
        bool batched_one = true, batched_split = false;
        const auto one = grads(1, batched_one), split = grads(4, batched_split);
        EXPECT_FALSE(batched_one);
        EXPECT_EQ(batched_split, tokens % 4 == 0);
        ASSERT_EQ(one.size(), split.size());
        ASSERT_FALSE(one.empty());
        for (const auto& [name, g] : one) {
          ASSERT_TRUE(split.at(name).isfinite().all().item<bool>()) << name;
          EXPECT_GT(g.abs().max().item<double>(), 0.0) << name;
          EXPECT_LE(test::max_rel_error(split.at(name), g), cuda ? 1e-5 : 1e-12) << name;
        }
      }
    }
  }
}

// adapt::dora_row_norm (the row norms ||W + s B A|| of DoRA's fused node, from ||W||² and two
// (out, r) products) against the formed W + s B A in float64, for W in float64, float32 and bf16
// (on CUDA a bf16 W takes the GEMM against A split into two bf16 halves) with a low-rank term about
// as large as W, so that both correction terms matter; and with ||W||² given.
void check_dora_row_norm_formula(const at::Device device) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor w0 = at::empty({96, 160}, at::kDouble).normal_(0, 1, gen);
  const at::Tensor a = at::empty({8, 160}, at::kFloat).normal_(0, 0.3, gen).to(device);
  const at::Tensor b = at::empty({96, 8}, at::kFloat).normal_(0, 0.3, gen).to(device);
  const double s = 2.0;
  for (const auto& [dtype, tol] : {std::pair{at::kDouble, 1e-12}, std::pair{at::kFloat, 1e-6}, std::pair{at::kBFloat16, 1e-5}}) {
    SCOPED_TRACE(std::string(c10::toString(dtype)) + " on " + device.str());
    const at::Tensor w = w0.to(dtype).to(device);
    const at::Tensor want =
        at::linalg_vector_norm(w.to(at::kDouble) + s * b.to(at::kDouble).mm(a.to(at::kDouble)), 2, {1});
    // Under autocast too: the products must not be rounded to bf16.
    util::AutocastScope autocast(true, device.type());
    const at::Tensor got = adapt::dora_row_norm(w, a, b, s);
    EXPECT_EQ(got.scalar_type(), dtype == at::kDouble ? at::kDouble : at::kFloat);
    EXPECT_LE(test::max_rel_error(got, want), tol);
    const at::Tensor w_sq = w.to(at::kDouble).pow(2).sum(1).to(got.scalar_type());
    EXPECT_LE(test::max_rel_error(adapt::dora_row_norm(w, a, b, s, w_sq), want), tol);
    // Both correction terms matter here.
    EXPECT_GT(test::max_rel_error(w_sq.to(at::kDouble).sqrt(), want), 0.1);
  }
}

TEST(LoraFused, DoraRowNormFormula) { check_dora_row_norm_formula(at::kCPU); }

TEST(LoraCuda, DoraRowNormFormula) {
  FT_REQUIRE_CUDA();
  check_dora_row_norm_formula(at::kCUDA);
}

// DoRA's fused node (its row norms from adapt::dora_row_norm, ||W||² kept per base) gives the
// unfused path's output, which forms W + s B A, in float64 to 1e-12: at first, after the base
// changes in place, and after it is replaced (the kept ||W||² must follow both).
TEST(LoraFused, DoraRowNormFollowsTheBase) {
  model::CausalLM m = base_model(at::kDouble);
  adapt::LoraOptions o;
  o.targets = {"up_proj"};
  o.r = 4;
  o.dora = true;
  const auto layers = adapt::apply_lora(m, o);
  randomize_b(m, 21);
  m->train();
  auto* lin = dynamic_cast<model::LinearImpl*>(m->named_modules()[layers[0].module].get());
  ASSERT_NE(lin, nullptr);
  const at::Tensor x = at::randn({3, 5, lin->in_features}, at::kDouble);
  auto compare = [&](const char* when) {
    adapt::set_lora_fused(m, true);
    const at::Tensor fused = lin->forward(x.clone().requires_grad_());
    EXPECT_NE(fused.grad_fn()->name().find("FusedDora"), std::string::npos) << when;
    adapt::set_lora_fused(m, false);
    const at::Tensor chain = lin->forward(x.clone().requires_grad_());
    EXPECT_LE(test::max_rel_error(fused, chain), 1e-12) << when;
    return fused.detach();
  };
  const at::Tensor before = compare("first");
  {
    at::NoGradGuard no_grad;
    lin->weight.mul_(1.5);
  }
  EXPECT_GT(test::max_rel_error(compare("after an in-place change"), before), 1e-3);
  {
    at::NoGradGuard no_grad;
    lin->weight.set_data(lin->weight.flip(1).clone());
  }
  compare("after a replacement");
}

TEST(LoraFused, GradSplitsGiveOneGemmsGradients) { check_grad_splits(at::kCPU); }

TEST(LoraCuda, GradSplitsGiveOneGemmsGradients) {
  FT_REQUIRE_CUDA();
  check_grad_splits(at::kCUDA);
}

// The fused nodes that read one input share its cast (q, k and v of an attention block under
// autocast): the same outputs and gradients, bit for bit, as three separate inputs with the same
// values, with two casts of x fewer (none with dropout: the nodes keep the dropped copies, and the
// cast is freed before the next node runs); an input changed in place is cast anew. LoRA with the
// split layout (with and without dropout) and DoRA, on the CPU under bf16 autocast (the path CUDA
// takes; there the row kernels too, in the GPU check).
void check_cast_share(const at::Device device) {
  struct Variant {
    bool dora;
    double p;
    bool row_kernels;
  };
  std::vector<Variant> variants = {{false, 0.0, false}, {false, 0.2, false}, {true, 0.0, false}};
  if (device.is_cuda()) variants.insert(variants.end(), {{false, 0.0, true}, {true, 0.0, true}});
  for (const Variant& v : variants) {
    SCOPED_TRACE(std::string(v.dora ? "DoRA" : "LoRA") + ", dropout " + std::to_string(v.p) +
                 (v.row_kernels ? ", row kernels" : "") + " on " + device.str());
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 9);
    adapt::LoraOptions o;
    o.targets = {"q_proj", "k_proj", "v_proj"};
    o.r = 8;
    o.dropout = v.p;
    o.dora = v.dora;
    adapt::apply_lora(m, o);
    randomize_b(m, 4);
    m->to(device);
    ASSERT_GT(adapt::store_frozen_linears(m, at::kBFloat16), 0);
    adapt::set_lora_row_kernels(m, v.row_kernels);
    m->train();
    auto modules = m->named_modules();
    std::vector<model::LinearImpl*> proj;
    for (const char* name : {"q_proj", "k_proj", "v_proj"}) {
      proj.push_back(dynamic_cast<model::LinearImpl*>(modules[std::string("model.layers.0.self_attn.") + name].get()));
      ASSERT_NE(proj.back(), nullptr);
    }
    const int64_t hidden = test::tiny_config().hidden_size;
    const at::Tensor x0 = at::randn({2, 8, hidden}, at::TensorOptions().device(device));
    // shared: one input for the three; else a clone each. Returns the outputs, the gradients of the
    // adapters and of x (summed over the three inputs), and the number of casts.
    auto run = [&](bool shared) {
      m->zero_grad();
      std::vector<at::Tensor> xs;
      const at::Tensor one = x0.clone().requires_grad_();
      for (int i = 0; i < 3; ++i) xs.push_back(shared ? one : x0.clone().requires_grad_());
      at::manual_seed(31);
      CastCounter casts(x0.numel());
      std::vector<at::Tensor> ys;
      {
        util::AutocastScope autocast(true, device.type());
        for (int i = 0; i < 3; ++i) ys.push_back(proj[i]->forward(xs[i]));
      }
      const int64_t n = casts.count();
      at::Tensor loss = ys[0].to(at::kFloat).pow(2).sum() + ys[1].to(at::kFloat).sum() * 0.5 + ys[2].to(at::kFloat).pow(3).sum();
      loss.backward();
      std::vector<at::Tensor> out = {ys[0], ys[1], ys[2]};
      for (const auto& item : m->named_parameters()) {  // layer 0's adapters (layer 1's did not run)
        if (item.value().grad().defined()) out.push_back(item.value().grad().clone());
      }
      EXPECT_EQ(out.size(), 3u + (v.dora ? 9u : 6u));
      at::Tensor dx = xs[0].grad().clone();
      if (!shared) dx = dx + xs[1].grad() + xs[2].grad();
      out.push_back(dx);
      return std::make_pair(out, n);
    };
    const auto [separate, separate_casts] = run(false);
    const auto [shared, shared_casts] = run(true);
    // k and v reuse q's cast of x; not with dropout, where a node keeps the dropped copy instead of
    // the cast, which is then freed before the next node runs.
    EXPECT_EQ(separate_casts - shared_casts, v.p == 0 ? 2 : 0) << separate_casts << " " << shared_casts;
    ASSERT_EQ(separate.size(), shared.size());
    for (size_t i = 0; i + 1 < separate.size(); ++i) EXPECT_TRUE(shared[i].equal(separate[i])) << i;
    EXPECT_LE(test::max_rel_error(shared.back(), separate.back()), 1e-6);  // dx: the engine's order of the sum
    // An input changed in place since is cast anew.
    {
      const at::Tensor x = x0.clone().requires_grad_(false);
      util::AutocastScope autocast(true, device.type());
      const at::Tensor y1 = proj[1]->forward(x);
      x.mul_(2);
      CastCounter casts(x0.numel());
      const at::Tensor y2 = proj[1]->forward(x);
      EXPECT_EQ(casts.count(), 1);
      EXPECT_FALSE(y2.equal(y1));
    }
  }
}

TEST(LoraFused, NodesReadingOneInputShareItsCast) { check_cast_share(at::kCPU); }

TEST(LoraCuda, NodesReadingOneInputShareItsCast) {
  FT_REQUIRE_CUDA();
  check_cast_share(at::kCUDA);
}

// The model's shared input cast (CausalLMImpl::set_shared_input_cast) under bf16 autocast: q, k, v
// and gate, up read one cast of the normed hidden state. The logits equal those of per-projection
// casts bit for bit and the gradients to 1e-6 (the three input gradients summed in another order),
// for full fine-tuning, LoRA (fused, with dropout), DoRA (with and without dropout) and QLoRA. Full
// fine-tuning and the fused nodes with dropout cast it 2 times per block instead of 5 (the fused
// nodes without dropout already share theirs). The groups whose adapters want the float32 input
// (the extended GEMM; PEFT's chain, LoRA unfused) keep their own casts.
void check_shared_input_cast(const at::Device device) {
  struct Variant {
    const char* name;
    bool lora, fused, dora, nf4, extended;
    double dropout;
    bool shares;  // whether the model's cast applies
  };
  const std::vector<Variant> variants = {
      {"full fine-tuning", false, true, false, false, false, 0.0, true},
      {"LoRA, fused", true, true, false, false, false, 0.0, true},
      {"LoRA, fused, dropout", true, true, false, false, false, 0.2, true},
      {"DoRA, fused", true, true, true, false, false, 0.0, true},
      {"QLoRA", true, true, false, true, false, 0.0, true},
      {"LoRA, extended GEMM", true, true, false, false, true, 0.0, false},
      {"LoRA, unfused", true, false, false, false, false, 0.0, false},
      {"DoRA, fused, dropout", true, true, true, false, false, 0.2, true},
  };
  const io::ModelConfig mc = test::tiny_config();
  for (const Variant& v : variants) {
    SCOPED_TRACE(std::string(v.name) + " on " + device.str());
    model::CausalLM m(mc);
    model::init_weights(m, 12);
    if (v.nf4) {
      for (const auto& item : m->named_modules()) {
        auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
        if (lin != nullptr && item.key() != "lm_head") lin->quantize_nf4(32, true);
      }
    }
    if (v.lora) {
      adapt::LoraOptions o;
      o.targets = {"all-linear"};
      o.r = 4;
      o.dropout = v.dropout;
      o.dora = v.dora;
      adapt::apply_lora(m, o);
      randomize_b(m, 5);
    }
    m->to(device);
    if (v.lora) {
      adapt::store_frozen_linears(m, at::kBFloat16);
      adapt::set_lora_fused(m, v.fused);
      adapt::set_lora_extended_gemm(m, v.extended);
    }
    m->train();
    const at::Tensor ids = at::arange(24, at::TensorOptions().dtype(at::kLong)).remainder(97).mul(5).remainder(97)
                               .view({2, 12}).to(device);
    auto run = [&](bool shared) {
      m->set_shared_input_cast(shared);
      m->zero_grad();
      at::manual_seed(3);
      CastCounter casts(2 * 12 * mc.hidden_size);
      at::Tensor logits;
      {
        util::AutocastScope autocast(true, device.type());
        logits = m->forward(ids);
      }
      const int64_t n = casts.count();
      model::causal_lm_loss(logits.to(at::kFloat), ids).backward();
      std::map<std::string, at::Tensor> g;
      for (const auto& item : m->named_parameters()) {
        if (item.value().grad().defined()) g[item.key()] = item.value().grad().clone();
      }
      return std::make_tuple(logits.detach().clone(), g, n);
    };
    const auto [logits_each, grads_each, casts_each] = run(false);
    const auto [logits_shared, grads_shared, casts_shared] = run(true);
    EXPECT_TRUE(logits_shared.equal(logits_each));
    ASSERT_EQ(grads_shared.size(), grads_each.size());
    ASSERT_FALSE(grads_each.empty());
    for (const auto& [name, g] : grads_each) {
      EXPECT_LE(test::max_rel_error(grads_shared.at(name), g), 1e-6) << name;
    }
    // Three casts fewer per block, where the fused nodes did not already share theirs (they do
    // without dropout: CastShare). Both counts include the casts outside the blocks (the head's input).
    const int64_t layers = mc.num_hidden_layers;
    const bool nodes_shared = v.lora && v.fused && v.dropout == 0;
    EXPECT_EQ(casts_each - casts_shared, v.shares && !nodes_shared ? 3 * layers : 0);
  }
}

TEST(SharedInputCast, KeepsTheResultsWithFewerCasts) { check_shared_input_cast(at::kCPU); }

TEST(SharedInputCastCuda, KeepsTheResultsWithFewerCasts) {
  FT_REQUIRE_CUDA();
  check_shared_input_cast(at::kCUDA);
}

// One fused layer with dropout against the formula y = x Wᵀ + b + s·((x ⊙ noise) Aᵀ) Bᵀ differentiated
// by autograd in float64, with the noise drawn again from the same generator state.
TEST(LoraFused, DropoutFollowsItsFormula) {
  for (const bool dora : {false, true}) {
    SCOPED_TRACE(dora ? "DoRA" : "LoRA");
    io::ModelConfig mc = test::tiny_config();
    mc.qkv_bias = true;
    model::CausalLM m(mc);
    model::init_weights(m, 5);
    m->to(at::kDouble);
    adapt::LoraOptions o;
    o.targets = {"q_proj"};
    o.r = 4;
    o.dropout = 0.25;
    o.dora = dora;
    const auto layers = adapt::apply_lora(m, o);
    randomize_b(m, 8);
    const std::string name = "model.layers.0.self_attn.q_proj";
    auto params = m->named_parameters();
    at::Tensor a = params[name + ".lora_A.weight"], b = params[name + ".lora_B.weight"];
    at::Tensor mag = dora ? params[name + ".lora_magnitude_vector.weight"] : at::Tensor();
    if (dora) {  // magnitudes away from the row norms, so that c = m / n is not 1
      at::NoGradGuard no_grad;
      mag.mul_(1.0 + 0.3 * at::rand_like(mag));
    }
    m->train();
    auto* lin = dynamic_cast<model::LinearImpl*>(m->named_modules()[name].get());
    ASSERT_NE(lin, nullptr);
    const at::Tensor x = at::randn({2, 5, 32}, at::kDouble).requires_grad_();
    const at::Tensor dy = at::randn({2, 5, 32}, at::kDouble);
    at::manual_seed(9);
    const at::Tensor y = lin->forward(x);
    EXPECT_NE(y.grad_fn()->name().find(dora ? "FusedDora" : "FusedLora"), std::string::npos) << y.grad_fn()->name();
    y.backward(dy);
    at::manual_seed(9);
    const at::Tensor noise = adapt::lora_dropout_noise(x.detach().reshape({-1, 32}), 0.25).view({2, 5, 32});
    const at::Tensor xr = x.detach().clone().requires_grad_(), ar = a.detach().clone().requires_grad_(),
                     br = b.detach().clone().requires_grad_();
    const double s = layers[0].scale;
    const at::Tensor h = xr * noise;
    at::Tensor yr, mr;
    if (!dora) {
      yr = at::linear(xr, lin->weight, lin->bias) + s * at::linear(at::linear(h, ar), br);
    } else {
      // PEFT's DoRA with dropout: the base layer reads x, the DoRA term h; c = m / ||W + s B A||_row,
      // the norm a constant.
      mr = mag.detach().clone().requires_grad_();
      const at::Tensor norm = at::linalg_vector_norm(lin->weight + s * br.detach().mm(ar.detach()), 2, {1});
      const at::Tensor c = mr / norm;
      yr = at::linear(xr, lin->weight, lin->bias) + (c - 1) * at::linear(h, lin->weight) +
           c * s * at::linear(at::linear(h, ar), br);
    }
    yr.backward(dy);
    EXPECT_LE(test::max_rel_error(y, yr), 1e-13);
    EXPECT_LE(test::max_rel_error(a.grad(), ar.grad()), 1e-13);
    EXPECT_LE(test::max_rel_error(b.grad(), br.grad()), 1e-13);
    EXPECT_LE(test::max_rel_error(x.grad(), xr.grad()), 1e-13);
    if (dora) EXPECT_LE(test::max_rel_error(mag.grad(), mr.grad()), 1e-13);
    // Some inputs were dropped, and not all.
    const double kept = noise.ne(0).to(at::kDouble).mean().item<double>();
    EXPECT_GT(kept, 0.5);
    EXPECT_LT(kept, 0.95);
  }
}

// The noise: values 0 and 1/(1 − p) only, the keep rate within 5 standard deviations of 1 − p over a
// million elements, independent neighbours, and reproduced by the generator's state (and only by it).
TEST(LoraFused, DropoutNoiseStatistics) {
  for (const double p : {0.05, 0.5}) {
    const at::Tensor x = at::empty({1000, 1001}, at::kFloat);  // odd size: the last element of a pair
    at::manual_seed(3);
    const at::Tensor n1 = adapt::lora_dropout_noise(x, p);
    const at::Tensor n2 = adapt::lora_dropout_noise(x, p);
    at::manual_seed(3);
    const at::Tensor n3 = adapt::lora_dropout_noise(x, p);
    EXPECT_TRUE(n1.equal(n3));
    EXPECT_FALSE(n1.equal(n2));
    const at::Tensor kept = n1.ne(0);
    EXPECT_TRUE((n1.eq(0) | n1.eq(static_cast<float>(1.0 / (1.0 - p)))).all().item<bool>());
    const double n = static_cast<double>(x.numel()), q = 1.0 - p;
    const double rate = kept.to(at::kDouble).mean().item<double>();
    EXPECT_LT(std::abs(rate - q), 5.0 * std::sqrt(p * q / n)) << "p " << p;
    // Pairs of neighbours (the two halves of one hash, and across hashes) are kept together at q².
    const at::Tensor flat = kept.reshape({-1}).to(at::kDouble);
    for (const int64_t shift : {1, 2}) {
      const int64_t m = flat.numel() - shift;
      const double both = (flat.narrow(0, 0, m) * flat.narrow(0, shift, m)).mean().item<double>();
      EXPECT_LT(std::abs(both - q * q), 5.0 * std::sqrt(q * q * (1 - q * q) / static_cast<double>(m))) << "shift " << shift;
    }
  }
}

// Grouped projections (set_lora_group_projections): q, k and v (gate and up) as one fused node over
// stacked weights, against the same model with a node per layer, in float64 on the CPU: logits and
// every adapter gradient to 1e-12, for PEFT's default targets (q and v adapted, k frozen inside the
// group) on a model with q/k/v biases, and for all-linear with other ranks and alphas per layer
// (block i of B carries s_i / s), with grouped-query attention (k and v narrower than q), and with
// dropout (a mask per adapter, drawn in the layers' order: the masks separate layers draw). The
// grouped node is really taken (its profile scope), the weights really are rows of one buffer,
// the frozen values do not change, and off again each weight has storage of its own.
TEST(LoraGroup, GroupedProjectionsComputeWhatSeparateLayersCompute) {
  struct Case {
    const char* name;
    const char* model_type;
    std::vector<std::string> targets;
    std::vector<std::pair<std::string, int64_t>> ranks;
    std::vector<std::pair<std::string, double>> alphas;
    bool mlp_bias;
    double dropout = 0.0;
  };
  const std::vector<Case> cases = {
      {"q and v (k frozen in the group), q/k/v biases", "qwen2", {"q_proj", "v_proj"}, {}, {}, false},
      {"all-linear, ranks and alphas per layer", "llama", {"all-linear"}, {{"k_proj", 2}, {"up_proj", 3}},
       {{"v_proj", 5.0}, {"gate_proj", 7.0}}, true},
      {"gate only (up frozen in the group)", "llama", {"gate_proj", "k_proj"}, {}, {}, false},
      {"all-linear, dropout 0.1 (a mask per adapter)", "llama", {"all-linear"}, {{"k_proj", 2}}, {}, false, 0.1},
      {"q and v, dropout 0.2", "qwen2", {"q_proj", "v_proj"}, {}, {}, false, 0.2},
      // Qwen3's q/k norms read column views of the grouped output.
      {"all-linear, qwen3 (q and k normed per head)", "qwen3", {"all-linear"}, {{"q_proj", 2}}, {}, false},
      // Gemma 3's tanh-GELU gate through the packed [gate | up] node, with dropout.
      {"all-linear, gemma3 (GeGLU), dropout 0.1", "gemma3_text", {"all-linear"}, {{"up_proj", 2}}, {}, false, 0.1},
      // Gemma 1's exact GELU gate; Gemma 2's soft-capped scores.
      {"all-linear, gemma (exact GELU)", "gemma", {"all-linear"}, {{"gate_proj", 3}}, {}, false},
      {"all-linear, gemma2 (soft-capped scores), dropout 0.1", "gemma2", {"all-linear"}, {}, {}, false, 0.1}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    io::ModelConfig mc = test::tiny_config(c.model_type);
    mc.qkv_bias = mc.model_type == "qwen2";
    mc.mlp_bias = c.mlp_bias;
    auto make = [&](bool grouped) {
      model::CausalLM m(mc);
      model::init_weights(m, 31);
      {
        at::NoGradGuard no_grad;  // biases that count (the initialisation zeroes them)
        auto gen = at::make_generator<at::CPUGeneratorImpl>(77);
        for (const auto& item : m->named_parameters()) {
          const std::string& key = item.key();
          if (key.size() > 5 && key.substr(key.size() - 5) == ".bias") item.value().normal_(0.0, 0.5, gen);
        }
      }
      adapt::LoraOptions o;
      o.targets = c.targets;
      o.r = 4;
      o.rank_pattern = c.ranks;
      o.alpha_pattern = c.alphas;
      o.dropout = c.dropout;
      adapt::apply_lora(m, o);
      randomize_b(m, 9);
      m->to(at::kDouble);
      adapt::set_lora_group_projections(m, grouped);
      m->train();
      return m;
    };
    model::CausalLM separate = make(false), grouped = make(true);
    std::map<std::string, at::Tensor> frozen;
    for (const auto& item : grouped->named_parameters()) {
      if (!item.value().requires_grad()) frozen[item.key()] = item.value().detach().clone();
    }
    const at::Tensor probe = at::randn({2, 11, mc.vocab_size}, at::kDouble);
    auto run = [&](model::CausalLM& m, bool expect_grouped) {
      for (auto& p : m->parameters()) p.mutable_grad() = at::Tensor();
      test::OpNames ops;
      at::manual_seed(123);  // the same dropout masks, drawn in the same order
      const at::Tensor logits = m->forward(ids());
      (logits * probe).sum().backward();
      EXPECT_EQ(ops.seen("ft::lora_grouped_projections"), expect_grouped);
      return std::make_pair(logits.detach(), trainable_grads(m));
    };
    const auto [y_sep, g_sep] = run(separate, false);
    const auto [y_grp, g_grp] = run(grouped, true);
    EXPECT_LE(test::max_rel_error(y_grp, y_sep), 1e-12);
    ASSERT_EQ(g_grp.size(), g_sep.size());
    for (const auto& [name, g] : g_sep) {
      ASSERT_TRUE(g_grp.at(name).defined()) << name;
      EXPECT_GT(g.abs().max().item<double>(), 0) << name;  // every adapter is reached
      EXPECT_LE(test::max_rel_error(g_grp.at(name), g), 1e-12) << name;
    }
    // The weights of a group are rows of one buffer, in order; the frozen values are unchanged.
    auto modules = grouped->named_modules();
    auto weight = [&](const std::string& name) -> at::Tensor& {
      return dynamic_cast<model::LinearImpl*>(modules["model.layers.1." + name].get())->weight;
    };
    auto next_rows = [](const at::Tensor& a, const at::Tensor& b) {
      return b.is_alias_of(a) && static_cast<const char*>(b.data_ptr()) ==
                                     static_cast<const char*>(a.data_ptr()) + a.size(0) * a.stride(0) * a.element_size();
    };
    EXPECT_TRUE(next_rows(weight("self_attn.q_proj"), weight("self_attn.k_proj")));
    EXPECT_TRUE(next_rows(weight("self_attn.k_proj"), weight("self_attn.v_proj")));
    EXPECT_EQ(next_rows(weight("mlp.gate_proj"), weight("mlp.up_proj")), c.targets[0] != "q_proj");
    EXPECT_FALSE(weight("self_attn.v_proj").is_alias_of(weight("self_attn.o_proj")));
    for (const auto& item : grouped->named_parameters()) {
      if (frozen.count(item.key())) EXPECT_TRUE(item.value().equal(frozen.at(item.key()))) << item.key();
    }
    // A second pass (the buffer is kept, not rebuilt) and the same again.
    const void* buffer = weight("self_attn.q_proj").data_ptr();
    const auto [y_grp2, g_grp2] = run(grouped, true);
    EXPECT_TRUE(y_grp2.equal(y_grp));
    EXPECT_EQ(weight("self_attn.q_proj").data_ptr(), buffer);
    // Off: storage of their own, the same values, the per-layer nodes.
    adapt::set_lora_group_projections(grouped, false);
    EXPECT_FALSE(weight("self_attn.q_proj").is_alias_of(weight("self_attn.k_proj")));
    EXPECT_TRUE(weight("self_attn.k_proj").is_contiguous());
    for (const auto& item : grouped->named_parameters()) {
      if (frozen.count(item.key())) EXPECT_TRUE(item.value().equal(frozen.at(item.key()))) << item.key();
    }
    const auto [y_off, g_off] = run(grouped, false);
    EXPECT_LE(test::max_rel_error(y_off, y_sep), 1e-12);
    // With activation checkpointing (each block's forward pass run again in the backward pass, with
    // the random state restored): the same gradients, the same masks.
    adapt::set_lora_group_projections(grouped, true);
    grouped->set_gradient_checkpointing(true);
    const auto [y_ckpt, g_ckpt] = run(grouped, true);
    EXPECT_LE(test::max_rel_error(y_ckpt, y_sep), 1e-12);
    for (const auto& [name, g] : g_sep) EXPECT_LE(test::max_rel_error(g_ckpt.at(name), g), 1e-12) << name;
  }
}

// Grouped projections under bf16 autocast (on the CPU, and on CUDA where a GPU is visible), through
// the split GEMMs and the extended GEMM ([x | s S] [W | B]ᵀ with B block-diagonal), on a bf16-stored
// base and an NF4 one, and on CUDA with the row kernels too (R = 4 + 4 + 8 = 16 for q, k, v, and
// with every rank 8, R = 24, where both groups of each block must take the kernels): three
// SGD steps give the separate layers' losses within bf16 rounding, and the first step's adapter
// gradients are within bf16 bounds of theirs (a misplaced block or scale is off by its whole size).
// The extended group's weights are rows of one (Σ out, in + R) buffer.
void check_grouped_bf16(const at::Device device) {
  for (const bool nf4 : {false, true}) {
    for (const bool extended : {false, true}) {
      for (const bool row_kernels : {false, true}) {
       for (const double dropout : {0.0, 0.1}) {
        for (const bool rank8 : {false, true}) {
        if (row_kernels && !device.is_cuda()) continue;
        if (rank8 && !row_kernels) continue;
        // (With dropout a group draws a mask per adapter through ATen, while separate layers would
        // draw theirs inside the row kernels: other masks, nothing to compare.)
        if (row_kernels && dropout > 0) continue;
        SCOPED_TRACE(std::string(nf4 ? "NF4" : "bf16-stored") + " base" + (extended ? ", extended GEMM" : "") +
                     (row_kernels ? ", row kernels" : "") + (dropout > 0 ? ", dropout 0.1" : "") +
                     (rank8 ? ", every rank 8" : "") + " on " +
                     device.str());
        io::ModelConfig mc = test::tiny_config();
        mc.hidden_size = 64;  // NF4 blocks of 64
        mc.intermediate_size = 128;
        auto make = [&](bool grouped) {
          model::CausalLM m(mc);
          model::init_weights(m, 41);
          if (nf4) {
            for (const auto& item : m->named_modules()) {
              auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
              if (lin != nullptr && item.key() != "lm_head") lin->quantize_nf4(64, true);
            }
          }
          adapt::LoraOptions o;
          o.targets = {"all-linear"};
          o.r = rank8 ? 8 : 4;
          if (!rank8) o.rank_pattern = {{"v_proj", 8}};
          o.dropout = dropout;
          adapt::apply_lora(m, o);
          randomize_b(m, 12);
          m->to(device);
          if (!nf4) adapt::store_frozen_linears(m, at::kBFloat16);
          adapt::set_lora_extended_gemm(m, extended);
          adapt::set_lora_row_kernels(m, row_kernels);
          adapt::set_lora_group_projections(m, grouped);
          m->train();
          return m;
        };
        model::CausalLM separate = make(false), grouped = make(true);
        const at::Tensor tokens = ids().to(device);
        auto step = [&](model::CausalLM& m, bool expect_grouped) {
          for (auto& p : m->parameters()) p.mutable_grad() = at::Tensor();
          test::OpNames ops;
          at::Tensor loss;
          {
            util::AutocastScope autocast(true, device.type());
            at::manual_seed(7);  // the same dropout masks, drawn in the same order
            const at::Tensor logits = m->forward(tokens);
            loss = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}).to(at::kFloat),
                                          tokens.roll(-1, 1).reshape({-1}));
          }
          loss.backward();
          EXPECT_EQ(ops.seen("ft::lora_grouped_projections"), expect_grouped);
          EXPECT_EQ(ops.seen("ft::lora_extended_gemm"), extended);
          if (row_kernels) EXPECT_TRUE(ops.seen("ft::lora_cast_down"));
          // Grouped, both groups of every block (q, k, v and gate, up) run the row kernels.
          if (row_kernels && expect_grouped) EXPECT_EQ(ops.count("ft::lora_cast_down"), 2 * mc.num_hidden_layers);
          auto grads = trainable_grads(m);
          at::NoGradGuard no_grad;
          for (auto& p : m->parameters()) {
            if (p.requires_grad()) p.sub_(p.grad(), 0.05);
          }
          return std::make_pair(loss.item<double>(), grads);
        };
        for (int i = 0; i < 3; ++i) {
          SCOPED_TRACE("step " + std::to_string(i));
          const auto [loss_sep, g_sep] = step(separate, false);
          const auto [loss_grp, g_grp] = step(grouped, true);
          EXPECT_NEAR(loss_grp, loss_sep, 1e-2 * std::abs(loss_sep));
          if (i > 0) continue;
          for (const auto& [name, g] : g_sep) EXPECT_LE(test::max_rel_error(g_grp.at(name), g), 0.05) << name;
        }
        if (!nf4) {
          auto modules = grouped->named_modules();
          const at::Tensor& q = dynamic_cast<model::LinearImpl*>(modules["model.layers.0.self_attn.q_proj"].get())->weight;
          EXPECT_EQ(q.stride(0), extended ? mc.hidden_size + (rank8 ? 24 : 4 + 4 + 8) : mc.hidden_size);
        }
        }
       }
      }
    }
  }
}

TEST(LoraGroup, GroupedProjectionsTrainAsSeparateLayersInBf16) { check_grouped_bf16(at::kCPU); }

TEST(LoraCuda, GroupedProjectionsTrainAsSeparateLayersInBf16) {
  FT_REQUIRE_CUDA();
  check_grouped_bf16(at::kCUDA);
}

// Where a member cannot take the grouped node, each layer runs its own (the same results as
// without grouping): DoRA, evaluation; and a grouped model merges, converts and saves as a separate
// one does.
TEST(LoraGroup, DeclinesWhereItDoesNotApplyAndMergesAndConverts) {
  {
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 3);
    adapt::LoraOptions o;
    o.targets = {"all-linear"};
    o.dora = true;
    adapt::apply_lora(m, o);
    adapt::set_lora_group_projections(m, true);
    m->train();
    test::OpNames ops;
    m->forward(ids()).sum().backward();
    EXPECT_FALSE(ops.seen("ft::lora_grouped_projections"));
  }
  auto make = [](bool grouped) {
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 4);
    adapt::LoraOptions o;
    o.targets = {"q_proj", "k_proj", "v_proj", "up_proj"};
    adapt::apply_lora(m, o);
    randomize_b(m, 5);
    m->to(at::kDouble);
    adapt::set_lora_group_projections(m, grouped);
    m->train();
    m->forward(ids()).sum().backward();  // grouped: the weights move into the buffers
    return m;
  };
  model::CausalLM separate = make(false), grouped = make(true);
  {
    test::OpNames ops;
    grouped->eval();
    at::NoGradGuard no_grad;
    // (not bit for bit: a weight that is rows of a buffer may start at another alignment)
    EXPECT_LE(test::max_rel_error(grouped->forward(ids()), separate->forward(ids())), 1e-12);
    EXPECT_FALSE(ops.seen("ft::lora_grouped_projections"));  // evaluation keeps PEFT's path
  }
  // Converted: the weights leave the buffers; the next training pass stacks them again.
  grouped->to(at::kFloat);
  separate->to(at::kFloat);
  grouped->train();
  separate->train();
  {
    test::OpNames ops;
    const at::Tensor y = grouped->forward(ids());
    EXPECT_TRUE(ops.seen("ft::lora_grouped_projections"));
    EXPECT_LE(test::max_rel_error(y.detach(), separate->forward(ids()).detach()), 1e-5);
  }
  // Merged into the stacked weights and saved: the checkpoint is the separate model's merged one.
  adapt::merge_and_unload_lora(grouped);
  adapt::merge_and_unload_lora(separate);
  const fs::path dir = scratch("grouped_merged");
  io::save_pretrained(grouped, dir.string());
  model::CausalLM loaded = io::load_pretrained(dir.string());
  loaded->eval();
  separate->eval();
  at::NoGradGuard no_grad;
  EXPECT_TRUE(loaded->forward(ids()).equal(separate->forward(ids())));
}

// PEFT's target_parameters on transformers 5's 3-D expert weights: each expert's gate and up layers
// take one adapter of gate_up_proj (the same A, B's rows split), down_proj its own, at the rank that
// rank_pattern gives the parameter's name; routers and attention stay as they are. Saved and read
// back, the model computes the same; entries other than the two expert weights, or naming nothing,
// and adapters on only some experts are errors that say so.
TEST(Lora, ExpertParametersShareAAcrossGateAndUp) {
  const io::ModelConfig mc = test::tiny_config("mixtral");
  adapt::LoraOptions o;
  o.targets.clear();
  o.target_parameters = {"mlp.experts.gate_up_proj", "experts.down_proj"};
  o.r = 3;
  o.rank_pattern = {{"model.layers.1.mlp.experts.down_proj", 5}};
  model::CausalLM m(mc);
  model::init_weights(m, 2);
  const auto layers = adapt::apply_lora(m, o);
  EXPECT_EQ(layers.size(), static_cast<size_t>(2 * mc.num_experts * 3));
  EXPECT_EQ(layers[1].module, "model.layers.0.block_sparse_moe.experts.0.w3");
  EXPECT_EQ(layers[1].a_owner, "model.layers.0.block_sparse_moe.experts.0.w1");
  EXPECT_EQ(layers[2].a_owner, layers[2].module);
  auto params = m->named_parameters();
  for (int64_t e = 0; e < mc.num_experts; ++e) {
    const std::string p = "model.layers.0.block_sparse_moe.experts." + std::to_string(e);
    // One A for both, as PEFT's gate_up_proj adapter has: the gate layer's parameter, which the up
    // layer's adapter computes with (and trains through).
    EXPECT_TRUE(params.contains(p + ".w1.lora_A.weight")) << e;
    EXPECT_FALSE(params.contains(p + ".w3.lora_A.weight")) << e;
    EXPECT_EQ(params["model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".w2.lora_A.weight"].size(0), 5);
  }
  EXPECT_FALSE(params.contains("model.layers.0.block_sparse_moe.gate.lora_A.weight"));
  EXPECT_FALSE(params.contains("model.layers.0.self_attn.q_proj.lora_A.weight"));
  randomize_b(m, 5);
  m->eval();
  at::manual_seed(1);
  const at::Tensor ids = at::randint(0, mc.vocab_size, {2, 9}, at::kLong);
  const at::Tensor want = m->forward(ids);
  const fs::path dir = scratch("lora_expert_parameters");
  adapt::save_peft_adapter(m, o, (dir / "a").string());
  const auto config = nlohmann::json::parse(std::ifstream(dir / "a" / "adapter_config.json"));
  EXPECT_TRUE(config["target_modules"].is_null());
  EXPECT_EQ(config["target_parameters"].size(), 4u);
  EXPECT_EQ(config["rank_pattern"]["model.layers.1.mlp.experts.down_proj"], 5);
  EXPECT_EQ(config["lora_dropout"], 0.0);
  auto file = io::SafetensorsFile::open((dir / "a" / "adapter_model.safetensors").string());
  EXPECT_EQ(file->at("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight").shape,
            (std::vector<int64_t>{mc.num_experts * 3, mc.hidden_size}));
  EXPECT_EQ(file->at("base_model.model.model.layers.1.mlp.experts.lora_B.weight").shape,
            (std::vector<int64_t>{mc.hidden_size, 5 * mc.num_experts}));
  model::CausalLM back(mc);
  model::init_weights(back, 2);
  EXPECT_TRUE(adapt::check_peft_adapter(back, (dir / "a").string()).empty());
  adapt::load_peft_adapter(back, (dir / "a").string());
  back->eval();
  EXPECT_LE(test::max_rel_error(back->forward(ids), want), 1e-6);

  adapt::LoraOptions bad = o;
  bad.target_parameters = {"self_attn.q_proj.weight"};
  model::CausalLM m2(mc);
  EXPECT_NE(test::error_of([&] { adapt::apply_lora(m2, bad); }).find("target_parameters entry 'self_attn.q_proj.weight' is not supported"),
            std::string::npos);
  model::CausalLM dense(test::tiny_config());
  bad.target_parameters = {"experts.down_proj"};
  EXPECT_NE(test::error_of([&] { adapt::apply_lora(dense, bad); }).find("it has no mixture of experts"), std::string::npos);
  // Adapters on some experts only (a module list): PEFT's form has one A and B per parameter.
  adapt::LoraOptions some;
  some.targets = {"experts.0.w2", "experts.1.w2"};
  model::CausalLM m3(mc);
  adapt::apply_lora(m3, some);
  EXPECT_NE(test::error_of([&] { adapt::save_peft_adapter(m3, some, (dir / "b").string()); })
                .find("adapters on 2 of 4 experts' down projections"),
            std::string::npos);
}

// A mixture of experts under all-linear: the attention's projections and every expert's, never a
// router; QLoRA stores the experts
// in NF4 and keeps the routers as they were. A training pass reaches the adapters of the experts
// that tokens chose.
TEST(Lora, MixtureOfExpertsAdaptsExpertsNotRouters) {
  auto router = [](const std::string& name) { return name.ends_with(".gate") || name.ends_with(".shared_expert_gate"); };
  for (const std::string type : {"mixtral", "qwen3_moe", "qwen2_moe", "olmoe"}) {
    SCOPED_TRACE(type);
    const io::ModelConfig mc = test::tiny_config(type);
    config::RunConfig c;
    c.mode = "qlora";
    c.lora.targets = {"all-linear"};
    c.lora.r = 4;
    const auto mode = adapt::make_mode(c);
    model::CausalLM m(mc);
    model::init_weights(m, 3);
    mode->apply(m);
    std::set<std::string> adapted;
    for (const auto& layer : adapt::lora_layers(m)) adapted.insert(layer.module);
    // mixtral: 2 layers of 4 attention + 4 experts × 3; qwen3_moe: 4 + 5 × 3, then 4 + 3 (dense);
    // qwen2_moe: 2 layers of 4 + 4 experts × 3 + the shared expert's 3; olmoe: as mixtral.
    EXPECT_EQ(adapted.size(), type == "mixtral" || type == "olmoe" ? 32u : type == "qwen3_moe" ? 26u : 38u);
    const std::string expert = type == "mixtral"   ? "model.layers.1.block_sparse_moe.experts.3.w2"
                               : type == "qwen3_moe" ? "model.layers.0.mlp.experts.4.down_proj"
                               : type == "olmoe"     ? "model.layers.1.mlp.experts.3.up_proj"
                                                     : "model.layers.1.mlp.shared_expert.down_proj";
    EXPECT_TRUE(adapted.count(expert)) << expert;
    for (const auto& name : adapted) EXPECT_FALSE(router(name)) << name;
    for (const auto& item : m->named_modules()) {
      auto* lin = dynamic_cast<model::LinearImpl*>(item.value().get());
      if (lin == nullptr || item.key() == "lm_head") continue;
      EXPECT_EQ(lin->nf4() == nullptr, router(item.key())) << item.key();
    }
    randomize_b(m, 4);
    m->train();
    at::manual_seed(2);
    const at::Tensor ids = at::randint(0, mc.vocab_size, {2, 24}, at::kLong);
    model::causal_lm_loss(m->forward(ids), ids).backward();
    int64_t with_grad = 0;
    for (const auto& item : m->named_parameters()) {
      const at::Tensor& g = item.value().grad();
      if (item.key().find("experts.") != std::string::npos && item.key().find("lora_B") != std::string::npos) {
        with_grad += g.defined() && g.abs().sum().item<double>() > 0 ? 1 : 0;
      }
    }
    EXPECT_GT(with_grad, 0);
  }
}
