// The fused CPU ops (ft/model/cpu_ops.h), the caching CPU allocator (ft/util/cpu_cache.h) and the
// fused AdamW against float64 references and the ATen compositions they replace.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/autograd.h>
#include <torch/optim/adamw.h>

#include <atomic>
#include <thread>
#include <vector>

#include "ft/model/cpu_ops.h"
#include "ft/model/llama.h"
#include "ft/train/optimizer.h"
#include "ft/util/cpu_cache.h"
#include "test_util.h"

using namespace ft;

namespace {

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item<double>();
}

at::Tensor rms_reference(const at::Tensor& x, const at::Tensor& w, double eps) {
  return w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
}

at::Tensor rotate_half(const at::Tensor& x) {
  auto h = x.chunk(2, -1);
  return at::cat({-h[1], h[0]}, -1);
}

at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + rotate_half(x) * sin;
}

// (B, 1, T, D) tables as the model builds them: the same frequencies twice along D.
std::pair<at::Tensor, at::Tensor> rope_tables(int64_t B, int64_t T, int64_t D, at::ScalarType dtype) {
  at::Tensor pos = at::arange(T, at::kFloat).unsqueeze(0).expand({B, T}) + at::arange(B, at::kFloat).unsqueeze(1) * 3;
  at::Tensor inv = 1.0 / at::pow(10000.0, at::arange(0, D, 2, at::kFloat) / static_cast<double>(D));
  at::Tensor f = pos.unsqueeze(-1) * inv;
  at::Tensor emb = at::cat({f, f}, -1);
  return {emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)};
}

}  // namespace

TEST(CpuOps, FusedRMSNormMatchesFloat64ForwardAndBackward) {
  at::manual_seed(0);
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{2, 5, 7}, {3, 256}, {1, 33}, {129, 64}}) {
    const int64_t D = shape.back();
    at::Tensor x64 = at::randn(shape, at::kDouble) * 3 + 0.5;
    at::Tensor w64 = at::randn({D}, at::kDouble);
    at::Tensor dy64 = at::randn(shape, at::kDouble);
    // float64 reference through autograd
    at::Tensor xr = x64.clone().requires_grad_(), wr = w64.clone().requires_grad_();
    at::Tensor yr = rms_reference(xr, wr, 1e-5);
    yr.backward(dy64);
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      ASSERT_TRUE(model::rms_norm_fusable(x64.to(dtype), w64.to(dtype)));
      at::Tensor x = x64.to(dtype).clone().requires_grad_(), w = w64.to(dtype).clone().requires_grad_();
      at::Tensor y = model::fused_rms_norm(x, w, 1e-5);
      y.backward(dy64.to(dtype));
      const double tol = dtype == at::kDouble ? 1e-12 : 2e-6;
      EXPECT_LT(max_rel(y, yr), tol) << shape << " " << dtype;
      EXPECT_LT(max_rel(x.grad(), xr.grad()), tol * 5) << shape << " " << dtype;
      EXPECT_LT(max_rel(w.grad(), wr.grad()), tol * 5) << shape << " " << dtype;
    }
  }
  // Only the gradients asked for: a frozen norm gain, and an input that needs none.
  at::Tensor x = at::randn({4, 16}).requires_grad_(), w = at::randn({16});
  model::fused_rms_norm(x, w, 1e-6).sum().backward();
  EXPECT_TRUE(x.grad().defined());
  at::Tensor x2 = at::randn({4, 16}), w2 = at::randn({16}).requires_grad_();
  model::fused_rms_norm(x2, w2, 1e-6).sum().backward();
  EXPECT_LT(max_rel(w2.grad(), (x2 * at::rsqrt(x2.pow(2).mean(-1, true) + 1e-6)).sum(0)), 1e-6);
  // A non-contiguous input (a transposed view) is read correctly.
  at::Tensor t = at::randn({16, 6}).t();
  at::Tensor w3 = at::randn({16});
  EXPECT_LT(max_rel(model::fused_rms_norm(t, w3, 1e-5), rms_reference(t, w3, 1e-5)), 2e-6);
  // Not fusable: mixed dtypes, integer tensors, a weight of the wrong length.
  EXPECT_FALSE(model::rms_norm_fusable(at::randn({2, 4}), at::randn({4}, at::kDouble)));
  EXPECT_FALSE(model::rms_norm_fusable(at::ones({2, 4}, at::kLong), at::ones({4}, at::kLong)));
  EXPECT_FALSE(model::rms_norm_fusable(at::randn({2, 4}), at::randn({5})));
}

TEST(CpuOps, FusedRopeMatchesTheReferenceOnQProjLayouts) {
  at::manual_seed(1);
  for (const int64_t D : {2, 8, 34, 64}) {
    const int64_t B = 2, H = 3, T = 5;
    // q as the attention makes it: (B, T, H, D) in memory, viewed as (B, H, T, D).
    at::Tensor base = at::randn({B, T, H, D}, at::kDouble);
    auto [cos, sin] = rope_tables(B, T, D, at::kDouble);
    at::Tensor dy = at::randn({B, H, T, D}, at::kDouble);
    const double scale = 0.375;  // the attention's 1/√D folded into the queries' rotation
    at::Tensor xr = base.clone().requires_grad_();
    (rope_reference(xr.transpose(1, 2), cos, sin) * scale).backward(dy);
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const bool contiguous : {false, true}) {
        at::Tensor xb = base.to(dtype).clone().requires_grad_();
        at::Tensor x = xb.transpose(1, 2);
        ASSERT_TRUE(model::rope_fusable(x, cos.to(dtype), sin.to(dtype)));
        at::Tensor y = model::fused_rope(x, cos.to(dtype), sin.to(dtype), contiguous, scale);
        EXPECT_EQ(y.is_contiguous(), contiguous);
        // The gradient comes back in x's layout ((B, T, H, D) in memory), whatever y's layout.
        at::Tensor gx = torch::autograd::grad({y}, {x}, {dy.to(dtype)}, /*retain_graph=*/true)[0];
        EXPECT_EQ(gx.strides(), x.strides()) << D << " " << contiguous;
        y.backward(dy.to(dtype));
        const double tol = dtype == at::kDouble ? 1e-14 : 1e-6;
        EXPECT_LT(max_rel(y, rope_reference(base.transpose(1, 2), cos, sin) * scale), tol) << D << " " << dtype;
        EXPECT_LT(max_rel(xb.grad(), xr.grad()), tol) << D << " " << dtype;
      }
    }
  }
  at::Tensor x = at::randn({1, 2, 3, 5});  // odd D
  auto [c, s] = rope_tables(1, 3, 4, at::kFloat);
  EXPECT_FALSE(model::rope_fusable(x, c, s));
  at::Tensor x4 = at::randn({1, 2, 3, 4});
  EXPECT_FALSE(model::rope_fusable(x4, c.clone().requires_grad_(), s));  // tables that train
  EXPECT_FALSE(model::rope_fusable(x4, c.to(at::kDouble), s.to(at::kDouble)));  // dtype mismatch
}

TEST(CpuOps, GroupedAttentionMatchesFloat64SDPAWithPackedMasksAndGQA) {
  at::manual_seed(2);
  for (const auto& [H, G] : std::vector<std::pair<int64_t, int64_t>>{{4, 4}, {4, 2}, {8, 2}}) {
    for (const bool shared_mask : {false, true}) {
      const int64_t B = 3, T = 11, D = 8;
      at::Tensor q64 = at::randn({B, H, T, D}, at::kDouble), k64 = at::randn({B, G, T, D}, at::kDouble),
                 v64 = at::randn({B, G, T, D}, at::kDouble), dy = at::randn({B, H, T, D}, at::kDouble);
      // Packed documents: causal within each document only; every query sees at least itself.
      at::Tensor seg = std::get<0>(at::randint(0, 3, {shared_mask ? 1 : B, T}, at::kLong).sort(-1));
      at::Tensor mask = (seg.unsqueeze(2) == seg.unsqueeze(1)).logical_and(at::ones({T, T}, at::kBool).tril()).unsqueeze(1);
      at::Tensor qr = q64.clone().requires_grad_(), kr = k64.clone().requires_grad_(), vr = v64.clone().requires_grad_();
      at::Tensor yr = at::scaled_dot_product_attention(qr, kr, vr, mask, 0.0, false, std::nullopt, /*enable_gqa=*/H != G);
      yr.backward(dy);
      for (const auto dtype : {at::kFloat, at::kDouble}) {
        at::Tensor q = q64.to(dtype).clone().requires_grad_(), k = k64.to(dtype).clone().requires_grad_(),
                   v = v64.to(dtype).clone().requires_grad_();
        ASSERT_TRUE(model::grouped_attention_fits(q, k, v, mask));
        at::Tensor bias = model::grouped_attention_bias(mask, G, H / G, dtype);
        at::Tensor y = model::grouped_attention(q, k, v, bias, 1.0 / std::sqrt(static_cast<double>(D)));
        ASSERT_EQ(y.sizes(), yr.sizes());
        y.backward(dy.to(dtype));
        const double tol = dtype == at::kDouble ? 1e-12 : 2e-6;
        EXPECT_LT(max_rel(y, yr), tol) << H << "/" << G << " " << dtype;
        EXPECT_LT(max_rel(q.grad(), qr.grad()), tol * 5) << H << "/" << G << " " << dtype;
        EXPECT_LT(max_rel(k.grad(), kr.grad()), tol * 5) << H << "/" << G << " " << dtype;
        EXPECT_LT(max_rel(v.grad(), vr.grad()), tol * 5) << H << "/" << G << " " << dtype;
      }
    }
  }
  at::Tensor q = at::randn({1, 2, 600, 4}), kv = at::randn({1, 2, 600, 4});
  at::Tensor long_mask = at::ones({600, 600}, at::kBool).tril().view({1, 1, 600, 600});
  EXPECT_FALSE(model::grouped_attention_fits(q, kv, kv, long_mask));  // T > 512: SDPA's flash kernel
  at::Tensor q3 = at::randn({1, 3, 8, 4}), kv2 = at::randn({1, 2, 8, 4});
  EXPECT_FALSE(model::grouped_attention_fits(q3, kv2, kv2, at::ones({1, 1, 8, 8}, at::kBool)));  // 3 heads on 2 groups
  EXPECT_FALSE(model::grouped_attention_fits(q3, kv2, kv2, at::Tensor()));                       // no mask
}

TEST(CpuOps, PackedDocumentsThroughGroupedAttentionEqualSeparateCausalPasses) {
  // The whole decoder in float64 with packed documents takes the grouped attention path (a mask);
  // each document alone takes SDPA's plain causal path (no mask). Both must give the same logits.
  // (HFParity compares the fused RMSNorm and RoPE with transformers itself.)
  const auto c = test::tiny_config();  // 4 heads on 2 key/value heads
  model::CausalLM m(c);
  m->to(at::kDouble);
  const int64_t B = 2, T = 9;
  at::Tensor ids = at::randint(0, c.vocab_size, {B, T}, at::kLong);
  at::Tensor seg = at::tensor({0, 0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 1, 1, 1, 1}, at::kLong).view({B, T});
  // Positions restart in each document, so both passes read the same rotary tables.
  at::Tensor pos = at::tensor({0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 3}, at::kLong).view({B, T});
  model::ForwardOptions fo;
  fo.segment_ids = seg;
  fo.position_ids = pos;
  at::Tensor packed = m->forward(ids, fo);
  for (int64_t b = 0; b < B; ++b) {
    int64_t start = 0;
    while (start < T) {
      int64_t end = start;
      while (end < T && seg[b][end].item<int64_t>() == seg[b][start].item<int64_t>()) ++end;
      at::Tensor alone = m->forward(ids.slice(0, b, b + 1).slice(1, start, end));
      EXPECT_LT(max_rel(packed.slice(0, b, b + 1).slice(1, start, end), alone), 1e-12) << b << " " << start;
      start = end;
    }
  }
}

TEST(CpuOps, OneDnnLinearMatchesFloat64ForwardAndBackward) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "libtorch built without oneDNN: linear() is at::linear";
  at::manual_seed(3);
  struct Case {
    std::vector<int64_t> x;
    int64_t n;
    bool bias, transposed_x;
  };
  for (const Case& c : {Case{{2, 5, 16}, 7, false, false}, Case{{2, 5, 16}, 7, true, false}, Case{{33, 64}, 130, true, false},
                        Case{{64, 33}, 5, false, true}}) {
    const int64_t K = c.x.back();
    at::Tensor x64 = at::randn(c.x, at::kDouble), w64 = at::randn({c.n, K}, at::kDouble), b64 = at::randn({c.n}, at::kDouble);
    if (c.transposed_x) x64 = at::randn({K, c.x[0]}, at::kDouble).t();  // a non-contiguous input
    std::vector<int64_t> ys = c.x;
    ys.back() = c.n;
    at::Tensor dy = at::randn(ys, at::kDouble);
    at::Tensor xr = x64.clone().requires_grad_(), wr = w64.clone().requires_grad_(), br = b64.clone().requires_grad_();
    at::linear(xr, wr, c.bias ? std::optional<at::Tensor>(br) : std::nullopt).backward(dy);
    at::Tensor x = x64.to(at::kFloat).requires_grad_(), w = w64.to(at::kFloat).requires_grad_(),
               b = b64.to(at::kFloat).requires_grad_();
    ASSERT_TRUE(model::onednn_linear_fits(x, w, c.bias ? b : at::Tensor()));
    at::Tensor y = model::linear(x, w, c.bias ? b : at::Tensor());
    ASSERT_EQ(y.sizes(), at::IntArrayRef(ys));
    y.backward(dy.to(at::kFloat));
    EXPECT_LT(max_rel(y, at::linear(x64, w64, c.bias ? std::optional<at::Tensor>(b64) : std::nullopt)), 1e-5) << c.x;
    EXPECT_LT(max_rel(x.grad(), xr.grad()), 1e-5) << c.x;
    EXPECT_LT(max_rel(w.grad(), wr.grad()), 1e-5) << c.x;
    EXPECT_EQ(w.grad().strides(), w.strides());  // the parameter's layout: accumulated without a copy
    if (c.bias) EXPECT_LT(max_rel(b.grad(), br.grad()), 1e-5) << c.x;
    if (!c.bias) EXPECT_FALSE(b.grad().defined());
  }
  // A frozen weight gets no gradient, and an input without one gets none either.
  at::Tensor x = at::randn({4, 8}).requires_grad_(), w = at::randn({3, 8});
  model::linear(x, w).sum().backward();
  EXPECT_TRUE(x.grad().defined());
  EXPECT_FALSE(w.grad().defined());
  at::Tensor x2 = at::randn({4, 8}), w2 = at::randn({3, 8}).requires_grad_();
  model::linear(x2, w2).sum().backward();
  EXPECT_LT(max_rel(w2.grad(), at::ones({4, 3}).t().mm(x2)), 1e-6);
  // float64 (the reference runs) stays on at::linear, with the same result.
  at::Tensor xd = at::randn({3, 8}, at::kDouble), wd = at::randn({2, 8}, at::kDouble);
  EXPECT_FALSE(model::onednn_linear_fits(xd, wd, at::Tensor()));
  EXPECT_TRUE(model::linear(xd, wd).equal(at::linear(xd, wd)));
  // Without gradients: a bᵀ with b a transposed view (dY W in a backward pass), and with a bias.
  at::Tensor a = at::randn({9, 12}), m = at::randn({12, 5}), bias = at::randn({5});
  EXPECT_LT(max_rel(model::linear(a, m.t()), a.to(at::kDouble).mm(m.to(at::kDouble))), 1e-6);
  EXPECT_LT(max_rel(model::linear(a, m.t(), bias), a.to(at::kDouble).mm(m.to(at::kDouble)) + bias.to(at::kDouble)), 1e-6);
}

TEST(CpuCache, ReusesFreedBlocksAndKeepsItsCap) {
  util::CpuCacheOptions o;
  o.min_block_bytes = 1 << 20;
  o.max_cached_bytes = 8 << 20;
  ASSERT_TRUE(util::install_cpu_cache(o));
  util::trim_cpu_cache();
  const auto before = util::cpu_cache_stats();
  void* first = nullptr;
  {
    at::Tensor a = at::empty({1 << 20}, at::kFloat);  // 4 MiB
    first = a.data_ptr();
  }
  EXPECT_EQ(util::cpu_cache_stats().cached_bytes, std::size_t{4} << 20);
  {
    at::Tensor b = at::empty({(1 << 20) - 100}, at::kFloat);  // a little smaller: same 64 KiB-rounded block
    EXPECT_EQ(b.data_ptr(), first);
    b.fill_(1.5);
    EXPECT_EQ(b.sum().item<double>(), 1.5 * ((1 << 20) - 100));
  }
  auto after = util::cpu_cache_stats();
  EXPECT_EQ(after.hits - before.hits, 1);
  EXPECT_EQ(after.misses - before.misses, 1);
  {
    std::vector<at::Tensor> many;
    for (int i = 0; i < 4; ++i) many.push_back(at::empty({1 << 20}, at::kFloat));  // 16 MiB live
  }
  EXPECT_LE(util::cpu_cache_stats().cached_bytes, o.max_cached_bytes);  // the cap: at most 8 MiB kept
  {
    at::Tensor small = at::empty({16}, at::kFloat);  // below min_block_bytes: not pooled
    EXPECT_EQ(util::cpu_cache_stats().live_bytes, 0u);
  }
  // raw_allocate / raw_deallocate go through the same pool.
  c10::Allocator* alloc = c10::GetCPUAllocator();
  void* raw = alloc->raw_allocate(2 << 20);
  EXPECT_GE(util::cpu_cache_stats().live_bytes, std::size_t{2} << 20);
  alloc->raw_deallocate(raw);
  EXPECT_EQ(util::cpu_cache_stats().live_bytes, 0u);
  util::trim_cpu_cache();
  EXPECT_EQ(util::cpu_cache_stats().cached_bytes, 0u);
  util::install_cpu_cache();  // back to the defaults for the rest of the process
}

TEST(CpuCache, ThreadsNeverShareALiveBlock) {
  util::CpuCacheOptions o;
  o.min_block_bytes = 256 << 10;
  ASSERT_TRUE(util::install_cpu_cache(o));
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 200; ++i) {
        const int64_t n = (64 << 10) + ((i * 7919 + t * 104729) % 5) * (32 << 10);  // 256-640 KiB, a few sizes
        at::Tensor a = at::empty({n}, at::kFloat);
        a.fill_(static_cast<float>(t * 1000 + i));
        std::this_thread::yield();
        if (a.min().item<float>() != a.max().item<float>() || a[0].item<float>() != static_cast<float>(t * 1000 + i)) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(util::cpu_cache_stats().live_bytes, 0u);
  EXPECT_GT(util::cpu_cache_stats().hits, 0);
}

TEST(FusedAdamW, MatchesTorchOptimAdamWOverStepsWithDecay) {
  // make_optimizer's AdamW (ATen's fused kernel) against torch::optim::AdamW's chain, float64, with
  // weight decay on the matrices, a parameter without gradient in one step, and a restored state.
  const auto c = test::tiny_config();
  model::CausalLM a(c), b(c);
  a->to(at::kDouble);
  b->to(at::kDouble);
  {
    at::NoGradGuard g;
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) pb[i].copy_(pa[i]);
  }
  train::OptimizerOptions oo;
  oo.lr = 1e-2;
  oo.weight_decay = 0.1;
  oo.beta2 = 0.95;
  auto fused = train::make_optimizer(a, oo);
  ASSERT_NE(dynamic_cast<torch::optim::AdamW*>(fused.get()), nullptr);
  const train::ParameterGroups names = train::group_parameters(b, oo);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto params = b->named_parameters();
  for (const auto& [keys, decay] : {std::pair{names.decay, oo.weight_decay}, std::pair{names.no_decay, 0.0}}) {
    std::vector<at::Tensor> v;
    for (const auto& k : keys) v.push_back(params[k]);
    auto opts = std::make_unique<torch::optim::AdamWOptions>(oo.lr);
    opts->betas({oo.beta1, oo.beta2}).eps(oo.eps).weight_decay(decay);
    groups.emplace_back(v, std::move(opts));
  }
  torch::optim::AdamW plain(std::move(groups), torch::optim::AdamWOptions(oo.lr));
  at::Tensor ids = at::randint(0, c.vocab_size, {2, 7}, at::kLong);
  for (int step = 0; step < 5; ++step) {
    for (auto* m : {&a, &b}) {
      at::Tensor loss = model::causal_lm_loss((*m)->forward(ids), ids);
      loss.backward();
    }
    if (step == 2) {  // a parameter without a gradient this step: neither optimizer moves it
      a->named_parameters()["model.norm.weight"].mutable_grad().reset();
      b->named_parameters()["model.norm.weight"].mutable_grad().reset();
    }
    fused->step();
    plain.step();
    fused->zero_grad();
    plain.zero_grad();
  }
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& item : pa) {
    EXPECT_LT(max_rel(item.value(), pb[item.key()]), 1e-12) << item.key();
    const auto& sa = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(item.value().unsafeGetTensorImpl()));
    const auto& sb = static_cast<torch::optim::AdamWParamState&>(*plain.state().at(pb[item.key()].unsafeGetTensorImpl()));
    EXPECT_EQ(sa.step(), sb.step()) << item.key();
    EXPECT_LT(max_rel(sa.exp_avg_sq(), sb.exp_avg_sq()), 1e-12) << item.key();
  }
}
