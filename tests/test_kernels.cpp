// CUDA kernels against their LibTorch references; skipped where no GPU is visible.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <cstring>

#include <ATen/Parallel.h>

#include "ft/model/llama.h"
#include "test_util.h"
#include "ft/util/autocast.h"

#include "ft/adapt/nf4.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include "ft/kernels/nf4.h"
#include "ft/kernels/nf4_decode.h"
#include "ft/kernels/cross_entropy.h"
#include "ft/kernels/cross_entropy_thread.h"
#include "ft/kernels/lora_rows.h"
#include "ft/kernels/lora_rows_lane.h"
#include "ft/kernels/philox.h"
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include "ft/kernels/rmsnorm.h"
#include "ft/kernels/rope.h"
#include "ft/kernels/rope_thread.h"
#include "ft/kernels/rows.h"
#include "ft/kernels/swiglu.h"
#include "ft/kernels/swiglu_thread.h"
#include "ft/kernels/sum_float.h"
#include "ft/kernels/sum_float_thread.h"
#endif

using namespace ft;

namespace {

struct NormCase {
  std::vector<int64_t> shape;
  at::ScalarType x_dtype, w_dtype;
  double tol;  // max|a−b|/max|b| against the float64 evaluation of the reference formula
};

TEST(RMSNormKernel, MatchesReferenceOnRaggedShapes) {
#ifndef LIBFT_WITH_CUDA_KERNELS
  GTEST_SKIP() << "built without CUDA kernels";
#else
  FT_REQUIRE_CUDA();
  const std::vector<NormCase> table = {
      {{1, 1}, at::kFloat, at::kFloat, 1e-6},        {{3, 31}, at::kFloat, at::kFloat, 1e-6},
      {{2, 5, 33}, at::kFloat, at::kFloat, 1e-6},    {{7, 4096}, at::kFloat, at::kFloat, 1e-6},
      {{17, 4099}, at::kBFloat16, at::kBFloat16, 1e-2}, {{64, 2048}, at::kHalf, at::kHalf, 2e-3},
      {{9, 1000}, at::kBFloat16, at::kFloat, 1e-2},  {{0, 64}, at::kFloat, at::kFloat, 0},
  };
  for (const auto& c : table) {
    auto dev = at::TensorOptions().device(at::kCUDA);
    at::Tensor x = at::randn(c.shape, dev.dtype(at::kFloat)).mul_(3).to(c.x_dtype);
    const int64_t E = c.shape.back();
    at::Tensor w = (1 + 0.1 * at::randn({E}, dev.dtype(at::kFloat))).to(c.w_dtype);
    model::RMSNorm norm(E, 1e-5);
    norm->weight = w;
    at::Tensor expected = norm->reference(x);
    at::Tensor y = at::full_like(expected, std::numeric_limits<float>::quiet_NaN());  // poison
    y = kernels::rmsnorm_forward(x, w, 1e-5);
    ASSERT_EQ(y.scalar_type(), expected.scalar_type());
    ASSERT_EQ(y.sizes(), expected.sizes());
    if (y.numel() == 0) continue;
    EXPECT_TRUE(y.isfinite().all().item<bool>());
    EXPECT_LE(test::max_rel_error(y, expected), c.tol) << "shape " << at::IntArrayRef(c.shape);
  }
#endif
}

// The CUDA training path of RMSNorm (ATen's fused RMSNorm, with gradients) against the reference
// formula, float64 on the same inputs: outputs, dx and dweight, in float32 and bf16, ragged widths.
TEST(RMSNormKernel, TrainingPathMatchesTheReferenceWithGradients) {
  FT_REQUIRE_CUDA();
  for (const auto& [shape, dtype, tol] : std::vector<std::tuple<std::vector<int64_t>, at::ScalarType, double>>{
           {{3, 31}, at::kFloat, 1e-5}, {{2, 5, 2048}, at::kFloat, 1e-5}, {{17, 4099}, at::kBFloat16, 2e-2}}) {
    SCOPED_TRACE(at::IntArrayRef(shape));
    const auto dev = at::TensorOptions().device(at::kCUDA);
    const int64_t E = shape.back();
    const at::Tensor x0 = at::randn(shape, dev.dtype(at::kFloat)).mul_(3);
    const at::Tensor w0 = 1 + 0.1 * at::randn({E}, dev.dtype(at::kFloat));
    const at::Tensor dy = at::randn(shape, dev.dtype(at::kFloat));
    model::RMSNorm norm(E, 1e-5);
    norm->to(at::kCUDA);
    {
      at::NoGradGuard no_grad;
      norm->weight.set_data(w0.to(dtype));
    }
    const at::Tensor x = x0.to(dtype).requires_grad_();
    const at::Tensor y = norm->forward(x);
    ASSERT_EQ(y.scalar_type(), dtype);
    y.backward(dy.to(dtype));
    // The reference in float64 on the same (rounded) inputs.
    model::RMSNorm ref(E, 1e-5);
    ref->to(at::kCUDA, at::kDouble);
    {
      at::NoGradGuard no_grad;
      ref->weight.copy_(w0.to(dtype).to(at::kDouble));
    }
    const at::Tensor x64 = x.detach().to(at::kDouble).requires_grad_();
    const at::Tensor y64 = ref->reference(x64);
    y64.backward(dy.to(dtype).to(at::kDouble));
    EXPECT_LE(test::max_rel_error(y, y64), tol);
    EXPECT_LE(test::max_rel_error(x.grad(), x64.grad()), tol);
    EXPECT_LE(test::max_rel_error(norm->weight.grad(), ref->weight.grad()), tol);
  }
}

// The inference kernel serves eval mode only: a training-mode pass without gradients (activation
// checkpointing's first pass) takes ATen's RMSNorm, as the recomputation with gradients does, so
// that the recomputation replays it bit for bit.
TEST(RMSNormKernel, OnlyEvalModeTakesTheInferenceKernel) {
  FT_REQUIRE_CUDA();
  const auto dev = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  model::RMSNorm norm(2048, 1e-5);
  norm->to(at::kCUDA, at::kBFloat16);
  const at::Tensor x = at::randn({5, 2048}, dev);
  const at::Tensor with_grad = norm->forward(x).detach();
  at::NoGradGuard no_grad;
  {
    test::OpNames ops;
    EXPECT_TRUE(norm->forward(x).equal(with_grad));
    EXPECT_TRUE(ops.seen("aten::rms_norm"));
  }
  norm->eval();
  test::OpNames ops;
  EXPECT_LE(test::max_rel_error(norm->forward(x), with_grad), 1e-2);
  EXPECT_FALSE(ops.seen("aten::rms_norm"));
}

// NF4 dequantization on the GPU equals the tensor-op reference exactly (both form code × maximum in
// float32 and round once), for plain and double-quantized maxima, odd sizes and every output dtype;
// dequantize_nf4 uses the kernel for CUDA tensors.
TEST(NF4Kernel, EqualsTheReferenceExactly) {
#ifndef LIBFT_WITH_CUDA_KERNELS
  GTEST_SKIP() << "built without CUDA kernels";
#else
  FT_REQUIRE_CUDA();
  // The first three take the vectorized kernel (16 elements per thread), the others the scalar one.
  for (const auto& [shape, block, dq] : {std::tuple{std::vector<int64_t>{4096, 1024}, int64_t{64}, true},
                                         std::tuple{std::vector<int64_t>{16, 48}, int64_t{16}, false},
                                         std::tuple{std::vector<int64_t>{64, 40}, int64_t{32}, true},
                                         std::tuple{std::vector<int64_t>{8, 8}, int64_t{8}, false},
                                         std::tuple{std::vector<int64_t>{7, 9}, int64_t{32}, false},
                                         std::tuple{std::vector<int64_t>{1, 1}, int64_t{2}, false},
                                         std::tuple{std::vector<int64_t>{333, 129}, int64_t{64}, true}}) {
    const at::Tensor w = at::randn(shape, at::TensorOptions().device(at::kCUDA)) * 0.02;
    const adapt::NF4Tensor q = adapt::quantize_nf4(w, block, dq);
    for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const at::Tensor want = adapt::dequantize_nf4_ops(q, dtype);
      const at::Tensor got = kernels::nf4_dequantize(q.packed, adapt::nf4_absmax(q).to(at::kFloat).contiguous(), q.numel,
                                                     q.block, dtype);
      EXPECT_TRUE(got.view(want.sizes()).equal(want)) << at::IntArrayRef(shape) << " " << dtype;
      EXPECT_TRUE(adapt::dequantize_nf4(q, dtype).equal(want));
      // Codes that start one byte into their allocation (not 8-byte aligned): the scalar kernel.
      at::Tensor shifted = at::empty({q.packed.numel() + 1}, q.packed.options()).narrow(0, 1, q.packed.numel());
      shifted.copy_(q.packed);
      EXPECT_TRUE(kernels::nf4_dequantize(shifted, adapt::nf4_absmax(q).to(at::kFloat).contiguous(), q.numel, q.block, dtype)
                      .view(want.sizes())
                      .equal(want));
    }
  }
  EXPECT_THROW(kernels::nf4_dequantize(at::zeros({3}, at::TensorOptions().device(at::kCUDA).dtype(at::kByte)),
                                       at::ones({1}, at::TensorOptions().device(at::kCUDA)), 7, 64, at::kFloat),
               c10::Error);
  // Double-quantized maxima decoded inside the kernel (the path dequantize_nf4 takes for them).
  for (const auto& shape : {std::vector<int64_t>{1024, 1024}, std::vector<int64_t>{333, 129}}) {
    const adapt::NF4Tensor q = adapt::quantize_nf4(at::randn(shape, at::TensorOptions().device(at::kCUDA)), 64, true);
    const at::Tensor got = kernels::nf4_dequantize_double_quant(q.packed, q.absmax_q.contiguous(), q.absmax_scale, q.absmax_offset,
                                                                q.dq_block, q.numel, q.block, at::kBFloat16);
    EXPECT_TRUE(got.view(q.shape).equal(adapt::dequantize_nf4_ops(q, at::kBFloat16))) << at::IntArrayRef(shape);
  }
  // Into the first columns of a wider buffer (the extended GEMM's [W | B]): row strides that keep
  // 16-byte rows (vectorized kernel) and odd ones (scalar kernel); the other columns untouched.
  for (const auto& [rows, cols, extra, dq] : {std::tuple{int64_t{256}, int64_t{1024}, int64_t{16}, true},
                                              std::tuple{int64_t{64}, int64_t{160}, int64_t{8}, false},
                                              std::tuple{int64_t{64}, int64_t{160}, int64_t{4}, true},
                                              std::tuple{int64_t{33}, int64_t{1000}, int64_t{64}, true},
                                              std::tuple{int64_t{5}, int64_t{9}, int64_t{3}, false}}) {
    const adapt::NF4Tensor q = adapt::quantize_nf4(at::randn({rows, cols}, at::TensorOptions().device(at::kCUDA)), 32, dq);
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      at::Tensor buffer = at::full({rows, cols + extra}, 7.0, at::TensorOptions().device(at::kCUDA).dtype(dtype));
      const at::Tensor view = buffer.narrow(1, 0, cols);
      adapt::dequantize_nf4_into(q, view);
      const std::string where = std::to_string(rows) + "x" + std::to_string(cols) + " + " + std::to_string(extra);
      EXPECT_TRUE(view.equal(adapt::dequantize_nf4_ops(q, dtype))) << where << " " << dtype;
      EXPECT_TRUE(buffer.narrow(1, cols, extra).eq(7.0).all().item<bool>()) << where << " " << dtype;
    }
  }
  EXPECT_THROW(kernels::nf4_dequantize(at::zeros({8}, at::TensorOptions().device(at::kCUDA).dtype(at::kByte)),
                                       at::ones({1}, at::TensorOptions().device(at::kCUDA)), 16, 64, at::kFloat,
                                       at::empty({4, 8}, at::TensorOptions().device(at::kCUDA)).narrow(1, 0, 4).t()),
               c10::Error);  // a result without unit column stride
  const auto i8 = at::TensorOptions().device(at::kCUDA).dtype(at::kChar);
  EXPECT_THROW(kernels::nf4_dequantize_double_quant(at::zeros({32}, i8.dtype(at::kByte)), at::zeros({1}, i8),
                                                    at::ones({2}, i8.dtype(at::kFloat)), 0.0f, 256, 64, 64, at::kFloat),
               c10::Error);  // one block of maxima needs one scale, not two
#endif
}


// The vectorized kernel's decoding step (ft/kernels/nf4_decode.h), run on the host over a whole
// quantized tensor the way the kernel walks it (8 bytes, read as two little-endian words, to 16
// outputs, the double-quantized maxima decoded as the kernel decodes them), equals the tensor-op
// reference exactly for every output dtype. This checks the nibble
// and byte order on machines without a GPU; NF4Kernel.EqualsTheReferenceExactly runs the kernel.
#ifdef LIBFT_WITH_CUDA_KERNELS
template <typename T>
at::Tensor decode_on_host(const adapt::NF4Tensor& q, at::ScalarType dtype) {
  const at::Tensor absmax = adapt::nf4_absmax(q).to(at::kFloat).contiguous();
  const at::Tensor packed = q.packed.contiguous();
  at::Tensor out = at::empty({q.numel}, at::TensorOptions().dtype(dtype));
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  T* dst = reinterpret_cast<T*>(out.data_ptr());
  // The maxima as the kernel forms them: stored, or decoded from the double quantization inline.
  auto maximum = [&](int64_t k) {
    if (!q.double_quant) return absmax.data_ptr<float>()[k];
    return kernels::detail::nf4_double_quant_max(q.absmax_q.data_ptr<int8_t>()[k],
                                                 q.absmax_scale.data_ptr<float>()[k / q.dq_block], q.absmax_offset);
  };
  for (int64_t k = 0; k < absmax.numel(); ++k) EXPECT_EQ(maximum(k), absmax.data_ptr<float>()[k]) << "block " << k;
  for (int64_t g = 0; g < q.numel / 16; ++g) {
    uint32_t lo, hi;
    std::memcpy(&lo, bytes + 8 * g, 4);
    std::memcpy(&hi, bytes + 8 * g + 4, 4);
    kernels::detail::nf4_decode16(lo, hi, adapt::nf4_code().data(), maximum(g * 16 / q.block), dst + 16 * g);
  }
  return out.view(q.shape);
}

TEST(NF4Kernel, VectorDecodeEqualsTheReferenceOnTheHost) {
  for (const auto& [block, dq] : {std::pair{int64_t{16}, false}, std::pair{int64_t{64}, true}, std::pair{int64_t{32}, true}}) {
    const at::Tensor w = at::randn({48, 64 * 9}, at::kFloat) * 0.02;  // 432-1728 blocks: several dq scales
    const adapt::NF4Tensor q = adapt::quantize_nf4(w, block, dq);
    EXPECT_TRUE(decode_on_host<float>(q, at::kFloat).equal(adapt::dequantize_nf4_ops(q, at::kFloat)));
    EXPECT_TRUE(decode_on_host<c10::Half>(q, at::kHalf).equal(adapt::dequantize_nf4_ops(q, at::kHalf)));
    EXPECT_TRUE(decode_on_host<c10::BFloat16>(q, at::kBFloat16).equal(adapt::dequantize_nf4_ops(q, at::kBFloat16)));
  }
}
#endif


// ------------------------------------------------------------------------------------------------
// The LoRA row kernels (ft/kernels/lora_rows.h) against float64: xo = x cast exactly as
// at::Tensor::to casts, s = scale · xo aᵀ, dx = base + scale · ds a. Ragged row counts (odd: a warp's
// second row absent), widths that leave lanes idle in the last step (264 = 256 + 8), every rank,
// bf16 and fp16, and both layouts: separate tensors, and the extended GEMM's views into one
// (T, in + r) buffer. Outputs are poisoned (NaN) first, so an element left unwritten fails.
// With dropout: s = scale · h aᵀ with h = the mask's kept values of xo times 1/(1 − p), rounded as
// at::native_dropout rounds, and dx = base + m ⊙ (scale · ds a) / (1 − p); the reference mask is
// drawn from each element quad's Philox words (ft/kernels/philox.h, checked against its known answers),
// not through the kernels' 8-wide lane code.
#ifdef LIBFT_WITH_CUDA_KERNELS

// Philox4x32-10's published known-answer vectors (counter, key → output).
TEST(Philox, MatchesThePublishedKnownAnswers) {
  using kernels::detail::Philox4;
  struct Kat {
    Philox4 ctr;
    uint32_t key0, key1;
    Philox4 out;
  };
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Kat& k : kats) {
    const Philox4 got = kernels::detail::philox4x32_10(k.ctr, k.key0, k.key1);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got.w[i], k.out.w[i]) << "word " << i;
  }
}

// The dropout draws keep 1 − p of the elements (within 5 standard deviations), the 8-wide draw
// equals the element-wise one, and another offset or seed gives another mask.
TEST(Philox, DropoutDrawsKeepTheirShareAndDependOnSeedAndOffset) {
  using namespace kernels::detail;
  constexpr int64_t kN = 1 << 18;
  for (const double p : {0.05, 0.1, 0.5}) {
    const DropoutDraws d{1234, 8, dropout_threshold(p), dropout_inv_keep(p)};
    int64_t kept = 0, same_offset = 0, same_seed = 0;
    DropoutDraws other_offset = d, other_seed = d;
    other_offset.offset += 4;
    other_seed.seed += 1;
    for (int64_t e = 0; e < kN; e += 8) {
      bool keep[8];
      dropout_keeps8(d, static_cast<uint64_t>(e), keep);
      for (int k = 0; k < 8; ++k) {
        ASSERT_EQ(keep[k], dropout_keeps(d, static_cast<uint64_t>(e + k))) << e + k;
        kept += keep[k];
        same_offset += keep[k] == dropout_keeps(other_offset, static_cast<uint64_t>(e + k));
        same_seed += keep[k] == dropout_keeps(other_seed, static_cast<uint64_t>(e + k));
      }
    }
    const double n = kN, sd = std::sqrt(n * p * (1 - p));
    EXPECT_NEAR(static_cast<double>(kept), n * (1 - p), 5 * sd) << "p " << p;
    // Two independent masks agree on p² + (1 − p)² of the elements.
    const double agree = n * (p * p + (1 - p) * (1 - p)), agree_sd = std::sqrt(agree * (1 - agree / n));
    EXPECT_NEAR(static_cast<double>(same_offset), agree, 5 * agree_sd) << "p " << p;
    EXPECT_NEAR(static_cast<double>(same_seed), agree, 5 * agree_sd) << "p " << p;
  }
  EXPECT_EQ(dropout_threshold(0.0), 0u);
  EXPECT_EQ(dropout_threshold(0.5), 0x80000000u);
}

// dropout_inv_keep is the scale at::native_dropout's CUDA kernel multiplies kept values by (the kept
// ones of a tensor of ones), also for the p where float(1 / (1 − p)) differs from it in the last bit.
TEST(LoraRowsKernel, DropoutScaleIsAtens) {
  FT_REQUIRE_CUDA();
  for (const double p : {0.04, 0.1, 0.15, 0.45, 0.52}) {
    const at::Tensor y = std::get<0>(at::native_dropout(at::ones({4096}, at::TensorOptions().device(at::kCUDA)), p, true));
    const at::Tensor kept = y.masked_select(y.ne(0)).cpu();
    ASSERT_GT(kept.numel(), 0);
    EXPECT_TRUE(kept.eq(kernels::detail::dropout_inv_keep(p)).all().item<bool>())
        << "p " << p << ": ATen " << kept[0].item<float>() << ", dropout_inv_keep " << kernels::detail::dropout_inv_keep(p);
  }
}

struct RowsCase {
  int64_t rows, in, r;
  bool extended;
  at::ScalarType dtype;
};

std::vector<RowsCase> rows_cases(const std::vector<std::pair<int64_t, int64_t>>& shapes) {
  std::vector<RowsCase> out;
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (const int64_t r : {4, 8, 12, 16, 24, 32}) {  // 12, 24: grouped q, k, v of ranks 4 and 8
      for (const bool extended : {false, true}) {
        for (const auto& [rows, in] : shapes) out.push_back({rows, in, r, extended, dtype});
      }
    }
  }
  return out;
}

struct RowsOperands {
  at::Tensor x, a, xo, s, base, ds;
  double scale = 0.375;
  double p = 0;                          // dropout
  kernels::detail::DropoutDraws draws;   // the draws the kernels use (p > 0)
  std::string what;
};

RowsOperands rows_operands(const RowsCase& c, const at::Device device, double p = 0) {
  RowsOperands o;
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  o.x = at::randn({c.rows, c.in}, f32).mul_(2);
  o.a = (at::randn({c.r, c.in}, f32) / std::sqrt(static_cast<double>(c.in))).to(c.dtype);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (c.extended) {
    // The layout of the fused layer's [x | s S] and dY [W | B]: rows in + r wide, ld = in + r
    // rounded up to 8 elements (16-byte aligned rows for any r).
    const int64_t ld = (c.in + c.r + 7) / 8 * 8;
    const at::Tensor out = at::full({c.rows, ld}, nan, f32.dtype(c.dtype));
    o.xo = out.narrow(1, 0, c.in);
    o.s = out.narrow(1, c.in, c.r);
    const at::Tensor grad = at::randn({c.rows, ld}, f32).to(c.dtype);
    o.base = grad.narrow(1, 0, c.in);
    o.ds = grad.narrow(1, c.in, c.r);
  } else {
    o.xo = at::full({c.rows, c.in}, nan, f32.dtype(c.dtype));
    o.s = at::full({c.rows, c.r}, nan, f32.dtype(c.dtype));
    o.base = at::randn({c.rows, c.in}, f32).to(c.dtype);
    o.ds = at::randn({c.rows, c.r}, f32).to(c.dtype);
  }
  o.p = p;
  if (p > 0) {
    o.draws = {static_cast<uint64_t>(c.rows * 7919 + c.in), static_cast<uint64_t>(4 * c.r),
               kernels::detail::dropout_threshold(p), kernels::detail::dropout_inv_keep(p)};
  }
  o.what = std::string(c10::toString(c.dtype)) + ", rows " + std::to_string(c.rows) + ", in " + std::to_string(c.in) +
           ", r " + std::to_string(c.r) + (c.extended ? ", extended layout" : ", separate tensors") +
           (p > 0 ? ", dropout " + std::to_string(p) : "");
  return o;
}

// The mask of o's draws, (rows, in) bool on the CPU, from the Philox words of each element quad
// (philox.h's definition; not the kernels' 8-wide lane code), in parallel.
at::Tensor rows_keep_mask(const RowsOperands& o) {
  const int64_t n = o.x.numel();
  at::Tensor keep = at::empty({o.x.size(0), o.x.size(1)}, at::kBool);
  bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const auto w = kernels::detail::dropout_words(o.draws, static_cast<uint64_t>(q));
      for (int64_t i = 0; i < 4 && 4 * q + i < n; ++i) k[4 * q + i] = w.w[i] >= o.draws.threshold;
    }
  });
  return keep;
}

// The dropped copy as at::native_dropout computes it: float32 product, one rounding.
at::Tensor rows_dropped(const RowsOperands& o, const at::Tensor& xo, const at::Tensor& keep) {
  const at::Tensor scaled = (xo.to(at::kFloat) * o.draws.inv_keep).to(xo.scalar_type());
  return at::where(keep.to(xo.device()), scaled, at::zeros_like(scaled));
}

// The down and up outputs against float64 (dx: float32 accumulation of ≤ 40 terms). h: with
// dropout, the dropped copy that the backward kernel made (lora_dropout_rows), checked exactly.
void expect_rows_outputs(const RowsOperands& o, const at::Tensor& dx, const at::Tensor& h = {}) {
  SCOPED_TRACE(o.what);
  const at::Tensor xo_ref = o.x.to(o.a.scalar_type());
  EXPECT_TRUE(o.xo.equal(xo_ref));
  at::Tensor h_ref = xo_ref, keep64 = at::ones({1}, o.x.options().dtype(at::kDouble));
  if (o.p > 0) {
    const at::Tensor keep = rows_keep_mask(o);
    const double kept = keep.to(at::kDouble).mean().item<double>();
    if (keep.numel() > 2000) EXPECT_NEAR(kept, 1 - o.p, 0.05);  // the mask really drops
    h_ref = rows_dropped(o, xo_ref, keep);
    keep64 = keep.to(o.x.device()).to(at::kDouble) * (1 / (1 - o.p));
    if (h.defined()) {
      EXPECT_EQ(h.sizes(), h_ref.sizes());
      EXPECT_TRUE(h.equal(h_ref));
    }
  }
  const at::Tensor s_ref = h_ref.to(at::kDouble).mm(o.a.to(at::kDouble).t()) * o.scale;
  ASSERT_TRUE(o.s.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(o.s, s_ref), o.a.scalar_type() == at::kHalf ? 2e-3 : 1e-2);
  const at::Tensor dx_ref =
      o.base.to(at::kDouble) + o.ds.to(at::kDouble).mm(o.a.to(at::kDouble)) * o.scale * keep64;
  ASSERT_EQ(dx.scalar_type(), at::kFloat);
  ASSERT_EQ(dx.sizes(), o.base.sizes());
  ASSERT_TRUE(dx.isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(dx, dx_ref), 1e-5);
}

// The kernels' lanes run one after another on the host, the warp's sum in lane order, with one or
// two rows per warp; with dropout, the backward kernel's dropped copy into h.
template <typename T, int Rank, int Rows, bool Drop>
void rows_on_host(const RowsOperands& o, at::Tensor& dx, at::Tensor& h) {
  using namespace kernels::detail;
  const int64_t rows = o.x.size(0), in = o.x.size(1);
  const float* x = o.x.data_ptr<float>();
  T* xo = reinterpret_cast<T*>(o.xo.data_ptr());
  T* s = reinterpret_cast<T*>(o.s.data_ptr());
  const T* a = reinterpret_cast<const T*>(o.a.data_ptr());
  const T* base = reinterpret_cast<const T*>(o.base.data_ptr());
  const T* ds = reinterpret_cast<const T*>(o.ds.data_ptr());
  dx = at::full({rows, in}, std::numeric_limits<double>::quiet_NaN(), o.x.options());
  float* d = dx.data_ptr<float>();
  const auto scale = static_cast<float>(o.scale);
  for (int64_t row = 0; row < rows; row += Rows) {
    const int n = static_cast<int>(std::min<int64_t>(Rows, rows - row));
    float total[Rows][Rank] = {};
    for (int lane = 0; lane < kLoraLanes; ++lane) {
      float acc[Rows][Rank];
      lora_down_lane<T, Rank, Rows, Drop>(x + row * o.x.stride(0), o.x.stride(0), xo + row * o.xo.stride(0),
                                          o.xo.stride(0), a, in, n, lane, acc, o.draws, row);
      for (int i = 0; i < Rows; ++i) {
        for (int j = 0; j < Rank; ++j) total[i][j] += acc[i][j];
      }
    }
    for (int lane = 0; lane < kLoraLanes; ++lane) {
      lora_down_store<T, Rank, Rows>(total, scale, s + row * o.s.stride(0), o.s.stride(0), n, lane);
      lora_up_lane<T, Rank, Rows, Drop>(base + row * o.base.stride(0), o.base.stride(0), ds + row * o.ds.stride(0),
                                        o.ds.stride(0), a, in, scale, d + row * in, in, n, lane, o.draws, row);
    }
  }
  if (!Drop) return;
  h = at::full({rows, in}, std::numeric_limits<double>::quiet_NaN(), o.xo.options());
  T* hp = reinterpret_cast<T*>(h.data_ptr());
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < in; c += 8) lora_dropout8<T>(xo + row * o.xo.stride(0) + c, hp + row * in + c, o.draws, row, in, c);
  }
}

template <typename T, int Rows, bool Drop>
void rows_on_host(const RowsOperands& o, at::Tensor& dx, at::Tensor& h) {
  switch (o.a.size(0)) {
    case 4: return rows_on_host<T, 4, Rows, Drop>(o, dx, h);
    case 8: return rows_on_host<T, 8, Rows, Drop>(o, dx, h);
    case 12: return rows_on_host<T, 12, Rows, Drop>(o, dx, h);
    case 16: return rows_on_host<T, 16, Rows, Drop>(o, dx, h);
    case 24: return rows_on_host<T, 24, Rows, Drop>(o, dx, h);
    case 32: return rows_on_host<T, 32, Rows, Drop>(o, dx, h);
    default: FAIL() << "rank " << o.a.size(0);
  }
}

template <typename T, bool Drop>
void rows_on_host(const RowsOperands& o, int rows_per_warp, at::Tensor& dx, at::Tensor& h) {
  rows_per_warp == 1 ? rows_on_host<T, 1, Drop>(o, dx, h) : rows_on_host<T, 2, Drop>(o, dx, h);
}

TEST(LoraRowsKernel, LanesOnTheHostMatchTheFloat64Reference) {
  at::manual_seed(7);
  for (const double p : {0.0, 0.1}) {
    // 40 × 264: enough elements to see the dropout mask's share.
    for (const RowsCase& c : rows_cases({{1, 8}, {1, 264}, {1, 520}, {5, 8}, {5, 264}, {5, 520}, {40, 264}})) {
      for (const int rows_per_warp : {1, 2}) {
        const RowsOperands o = rows_operands(c, at::kCPU, p);
        at::Tensor dx, h;
        if (c.dtype == at::kBFloat16) {
          p > 0 ? rows_on_host<c10::BFloat16, true>(o, rows_per_warp, dx, h)
                : rows_on_host<c10::BFloat16, false>(o, rows_per_warp, dx, h);
        } else {
          p > 0 ? rows_on_host<c10::Half, true>(o, rows_per_warp, dx, h)
                : rows_on_host<c10::Half, false>(o, rows_per_warp, dx, h);
        }
        SCOPED_TRACE(std::to_string(rows_per_warp) + " rows per warp");
        expect_rows_outputs(o, dx, h);
        if (p > 0) ASSERT_TRUE(h.defined());
      }
    }
  }
}

TEST(LoraRowsKernel, MatchesTheFloat64ReferenceOnRaggedShapes) {
  FT_REQUIRE_CUDA();
  at::manual_seed(8);
  for (const double p : {0.0, 0.1}) {
    // 8193 rows: two rows per warp (the kernels take one below 8192).
    for (const RowsCase& c : rows_cases({{1, 8}, {1, 4096}, {17, 264}, {4099, 8}, {4099, 4096}, {8193, 264}})) {
      RowsOperands o = rows_operands(c, at::kCUDA, p);
      ASSERT_TRUE(kernels::lora_cast_down_fits(o.x, o.a, o.xo, o.s)) << o.what;
      ASSERT_TRUE(kernels::lora_up_add_fits(o.base, o.ds, o.a)) << o.what;
      const at::Tensor drawn = kernels::lora_cast_down(o.x, o.a, o.scale, o.xo, o.s, p);
      at::Tensor h;
      if (p > 0) {
        // The kernel's (seed, offset) from the default CUDA generator, recorded for the backward pass.
        ASSERT_TRUE(drawn.defined());
        const at::Tensor pair = drawn.cpu();
        o.draws.seed = static_cast<uint64_t>(pair[0].item<int64_t>());
        o.draws.offset = static_cast<uint64_t>(pair[1].item<int64_t>());
        h = kernels::lora_dropout_rows(o.xo, p, drawn);
      } else {
        EXPECT_FALSE(drawn.defined());
      }
      const at::Tensor dx = kernels::lora_up_add(o.base, o.ds, o.a, o.scale, p, drawn);
      expect_rows_outputs(o, dx, h);
    }
  }
}

// The draws come from the default CUDA generator: manual_seed reproduces them, and each call
// takes fresh ones.
TEST(LoraRowsKernel, DropoutDrawsFollowTheCudaGenerator) {
  FT_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor x = at::randn({64, 256}, cuda), a = at::randn({8, 256}, cuda.dtype(at::kBFloat16));
  auto run = [&] {
    const at::Tensor xo = at::empty({64, 256}, cuda.dtype(at::kBFloat16)), s = at::empty({64, 8}, cuda.dtype(at::kBFloat16));
    const at::Tensor drawn = kernels::lora_cast_down(x, a, 1.0, xo, s, 0.5);
    return std::pair{drawn.cpu(), s.cpu()};
  };
  at::manual_seed(99);
  const auto [d1, s1] = run();
  const auto [d2, s2] = run();
  at::manual_seed(99);
  const auto [d3, s3] = run();
  EXPECT_EQ(d1[0].item<int64_t>(), 99);
  EXPECT_TRUE(d1.equal(d3));
  EXPECT_TRUE(s1.equal(s3));
  EXPECT_FALSE(d1.equal(d2));
  EXPECT_FALSE(s1.equal(s2));
}

// Under CUDA graph capture the kernel reads the generator's (seed, offset) on the device: each
// replay draws a fresh mask, records the pair it used, and its s matches that pair's mask.
TEST(LoraRowsKernel, EachGraphReplayDrawsAFreshMask) {
  FT_REQUIRE_CUDA();
  at::manual_seed(5);
  RowsOperands o = rows_operands({40, 264, 8, false, at::kBFloat16}, at::kCUDA, 0.25);
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  at::Tensor drawn;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    kernels::lora_cast_down(o.x, o.a, o.scale, o.xo, o.s, o.p);  // warm-up, outside the graph
    graph.capture_begin();
    drawn = kernels::lora_cast_down(o.x, o.a, o.scale, o.xo, o.s, o.p);
    graph.capture_end();
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  std::vector<at::Tensor> outputs;
  for (int replay = 0; replay < 2; ++replay) {
    o.s.fill_(std::numeric_limits<double>::quiet_NaN());
    graph.replay();
    at::cuda::device_synchronize();
    const at::Tensor pair = drawn.cpu();
    pairs.emplace_back(pair[0].item<int64_t>(), pair[1].item<int64_t>());
    o.draws.seed = static_cast<uint64_t>(pairs.back().first);
    o.draws.offset = static_cast<uint64_t>(pairs.back().second);
    outputs.push_back(o.s.clone());
    SCOPED_TRACE("replay " + std::to_string(replay));
    const at::Tensor dx = kernels::lora_up_add(o.base, o.ds, o.a, o.scale, o.p, drawn);
    expect_rows_outputs(o, dx, kernels::lora_dropout_rows(o.xo, o.p, drawn));
  }
  EXPECT_EQ(pairs[0].first, 5);
  EXPECT_NE(pairs[0].second, pairs[1].second);
  EXPECT_FALSE(outputs[0].equal(outputs[1]));
}

TEST(LoraRowsKernel, DeclinesOperandsItCannotTake) {
  FT_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor x = at::randn({6, 64}, cuda), a = at::randn({16, 64}, cuda.dtype(at::kBFloat16));
  const at::Tensor xo = at::empty({6, 64}, cuda.dtype(at::kBFloat16)), s = at::empty({6, 16}, cuda.dtype(at::kBFloat16));
  EXPECT_TRUE(kernels::lora_cast_down_fits(x, a, xo, s));
  EXPECT_TRUE(kernels::lora_up_add_fits(xo, s, a));
  // Rank 64, a width that is not a multiple of 8, float16 input, mixed dtypes, an unaligned view.
  EXPECT_FALSE(kernels::lora_cast_down_fits(x, at::randn({64, 64}, cuda.dtype(at::kBFloat16)), xo,
                                            at::empty({6, 64}, cuda.dtype(at::kBFloat16))));
  EXPECT_FALSE(kernels::lora_cast_down_fits(x.narrow(1, 0, 60), a.narrow(1, 0, 60).contiguous(), xo.narrow(1, 0, 60), s));
  EXPECT_FALSE(kernels::lora_cast_down_fits(x.to(at::kHalf), a, xo, s));
  // S's rows overlapping (an expanded row): two warps would write one element.
  EXPECT_FALSE(kernels::lora_cast_down_fits(x, a, xo, at::empty({1, 16}, cuda.dtype(at::kBFloat16)).expand({6, 16})));
  EXPECT_FALSE(kernels::lora_up_add_fits(xo, s, a.to(at::kHalf)));
  EXPECT_FALSE(kernels::lora_up_add_fits(at::empty({6, 72}, cuda.dtype(at::kBFloat16)).narrow(1, 4, 64), s, a));
  EXPECT_THROW(kernels::lora_up_add(xo, s, a.to(at::kHalf), 1.0), c10::Error);
  // Dropout's backward kernels need the forward's draws, and a probability in (0, 1).
  EXPECT_THROW(kernels::lora_up_add(xo, s, a, 1.0, 0.1), c10::Error);
  EXPECT_THROW(kernels::lora_cast_down(x, a, 1.0, xo, s, 1.0), c10::Error);
  const at::Tensor drawn = kernels::lora_cast_down(x, a, 1.0, xo, s, 0.1);
  EXPECT_THROW(kernels::lora_dropout_rows(xo, 0.0, drawn), c10::Error);
  EXPECT_THROW(kernels::lora_dropout_rows(xo, 0.1, drawn.to(at::kInt)), c10::Error);
}
#endif


// ------------------------------------------------------------------------------------------------
// The fused cross-entropy (ft/kernels/cross_entropy.h) against float64: per-row log-sum-exp and loss,
// and the logits' gradient g (softmax − onehot). Logits of a wide range (±40, so that the running
// maximum is rescaled often), −∞ entries (masked words), an ignored row (loss 0, gradient exactly 0)
// and a target outside the vocabulary (NaN), for float32, bf16 and fp16, vocabularies that do and
// do not fill 16-byte vectors, one thread and many.
#ifdef LIBFT_WITH_CUDA_KERNELS
struct CeCase {
  at::Tensor logits, targets;
  int64_t ignore = -100;
};

CeCase ce_case(int64_t N, int64_t V, at::ScalarType dtype, const at::Device device) {
  CeCase c;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor x = at::randn({N, V}, f32) * 4;
  if (V > 3) {
    x.select(1, 1).fill_(-std::numeric_limits<float>::infinity());
    x.select(1, V - 2).mul_(10);  // ±40: the maximum moves late in the row
  }
  c.logits = x.to(dtype).to(device);
  c.targets = at::randint(0, V, {N}, at::TensorOptions().dtype(at::kLong));
  if (V > 3) c.targets.masked_fill_(c.targets.eq(1), 0);  // a masked word's loss is +∞ in both
  if (N > 2) c.targets[2] = c.ignore;
  if (N > 4) c.targets[4] = V;  // out of range: NaN
  c.targets = c.targets.to(device);
  return c;
}

// Float64 references on the logits as stored: lse (N), loss (N, NaN/0 as the kernels give them),
// and the gradient of g Σ loss.
struct CeReference {
  at::Tensor lse, loss, grad;
};

CeReference ce_reference(const CeCase& c, double g) {
  const at::Tensor x = c.logits.to(at::kDouble).cpu(), t = c.targets.cpu();
  CeReference r;
  r.lse = at::logsumexp(x, 1);
  r.loss = at::zeros_like(r.lse);
  r.grad = at::zeros_like(x);
  const int64_t V = x.size(1);
  for (int64_t i = 0; i < x.size(0); ++i) {
    const int64_t ti = t[i].item<int64_t>();
    if (ti == c.ignore) continue;
    if (ti < 0 || ti >= V) {
      r.loss[i] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    r.loss[i] = r.lse[i] - x[i][ti];
    r.grad[i] = (x[i] - r.lse[i]).exp() * g;
    r.grad[i][ti] -= g;
  }
  return r;
}

void expect_ce(const CeCase& c, const at::Tensor& lse, const at::Tensor& loss, const at::Tensor& grad, double g,
               const std::string& what) {
  SCOPED_TRACE(what);
  const CeReference r = ce_reference(c, g);
  const at::Tensor t = c.targets.cpu();
  const int64_t N = r.lse.size(0), V = c.logits.size(1);
  const at::Tensor valid = t.ne(c.ignore).logical_and(t.lt(V));
  EXPECT_LE(test::max_rel_error(lse.cpu(), r.lse), 1e-6);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t ti = t[i].item<int64_t>();
    if (ti == c.ignore) {
      EXPECT_EQ(loss[i].item<float>(), 0.0f) << "row " << i;
      EXPECT_TRUE(grad[i].eq(0).all().item<bool>()) << "row " << i;
    } else if (ti >= V) {
      EXPECT_TRUE(std::isnan(loss[i].item<float>())) << "row " << i;
    }
  }
  if (!valid.any().item<bool>()) return;
  EXPECT_LE(test::max_rel_error(loss.cpu().index({valid}), r.loss.index({valid})), 1e-5);
  const double tol = grad.scalar_type() == at::kFloat ? 1e-5 : grad.scalar_type() == at::kHalf ? 2e-3 : 1e-2;
  ASSERT_TRUE(grad.index({valid.to(grad.device())}).isfinite().all().item<bool>());
  EXPECT_LE(test::max_rel_error(grad.cpu().index({valid}), r.grad.index({valid})), tol);
}

template <typename T>
void ce_on_host(const CeCase& c, int threads, float g, at::Tensor& lse, at::Tensor& loss, at::Tensor& grad) {
  using namespace kernels::detail;
  const int64_t N = c.logits.size(0), V = c.logits.size(1);
  const bool vectors = V % kVec16<T> == 0;
  lse = at::empty({N}, at::kFloat);
  loss = at::empty({N}, at::kFloat);
  grad = at::full_like(c.logits, std::numeric_limits<double>::quiet_NaN());
  const T* x = reinterpret_cast<const T*>(c.logits.data_ptr());
  T* dx = reinterpret_cast<T*>(grad.data_ptr());
  for (int64_t i = 0; i < N; ++i) {
    MaxSum pair = max_sum_empty();
    for (int t = 0; t < threads; ++t) pair = max_sum_merge(pair, ce_row_partial(x + i * V, V, t, threads, vectors));
    const float l = max_sum_lse(pair);
    const int64_t target = c.targets[i].item<int64_t>();
    lse[i] = l;
    loss[i] = ce_row_loss(x + i * V, V, l, target, c.ignore);
    for (int t = 0; t < threads; ++t) {
      ce_row_grad(x + i * V, dx + i * V, V, t, threads, vectors, l, target, g, target == c.ignore);
    }
  }
}

TEST(CrossEntropyKernel, ThreadsOnTheHostMatchTheFloat64Reference) {
  at::manual_seed(11);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t V : {int64_t{1}, int64_t{7}, int64_t{97}, int64_t{128}, int64_t{4104}}) {
      for (const int threads : {1, 3, 256}) {
        const CeCase c = ce_case(6, V, dtype, at::kCPU);
        at::Tensor lse, loss, grad;
        const float g = 0.7f;
        if (dtype == at::kFloat) ce_on_host<float>(c, threads, g, lse, loss, grad);
        if (dtype == at::kBFloat16) ce_on_host<c10::BFloat16>(c, threads, g, lse, loss, grad);
        if (dtype == at::kHalf) ce_on_host<c10::Half>(c, threads, g, lse, loss, grad);
        expect_ce(c, lse, loss, grad, g,
                  std::string(c10::toString(dtype)) + ", V " + std::to_string(V) + ", " + std::to_string(threads) + " threads");
      }
    }
  }
}

TEST(CrossEntropyKernel, MatchesTheFloat64ReferenceOnCuda) {
  FT_REQUIRE_CUDA();
  at::manual_seed(12);
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& [N, V] : {std::pair{int64_t{1}, int64_t{97}}, std::pair{int64_t{37}, int64_t{4096}},
                               std::pair{int64_t{300}, int64_t{32000}}, std::pair{int64_t{9}, int64_t{128256}},
                               std::pair{int64_t{5}, int64_t{50257}}}) {
      const CeCase c = ce_case(N, V, dtype, at::kCUDA);
      ASSERT_TRUE(kernels::cross_entropy_fits(c.logits, c.targets));
      auto [loss, lse] = kernels::cross_entropy_forward(c.logits, c.targets, c.ignore);
      const at::Tensor g = at::full({}, 0.7, c.logits.options().dtype(at::kFloat));
      const at::Tensor grad = kernels::cross_entropy_backward(c.logits, c.targets, lse, g, c.ignore);
      ASSERT_EQ(grad.scalar_type(), dtype);
      expect_ce(c, lse, loss, grad.cpu(), 0.7,
                std::string(c10::toString(dtype)) + ", N " + std::to_string(N) + ", V " + std::to_string(V));
    }
  }
}

// model::cross_entropy_sum with the kernels against ATen's path, through autograd: the same summed
// loss and logits gradient (bf16 logits, as the output head gives them under autocast).
TEST(CrossEntropyKernel, FusedLossMatchesAtenThroughAutograd) {
  FT_REQUIRE_CUDA();
  at::manual_seed(13);
  const auto bf = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const at::Tensor base = (at::randn({64, 32000}, bf.dtype(at::kFloat)) * 3).to(at::kBFloat16);
  at::Tensor targets = at::randint(0, 32000, {64}, bf.dtype(at::kLong));
  targets.narrow(0, 0, 5).fill_(-100);
  auto run = [&](bool fused) {
    const at::Tensor x = base.clone().requires_grad_();
    const at::Tensor loss = model::cross_entropy_sum(x, targets, -100, fused);
    (loss * 0.5).backward();
    return std::make_pair(loss.detach(), x.grad());
  };
  const auto [fused_loss, fused_grad] = run(true);
  const auto [aten_loss, aten_grad] = run(false);
  EXPECT_EQ(fused_loss.scalar_type(), at::kFloat);
  EXPECT_LE(test::max_rel_error(fused_loss, aten_loss), 1e-5);
  EXPECT_EQ(fused_grad.scalar_type(), at::kBFloat16);
  EXPECT_LE(test::max_rel_error(fused_grad, aten_grad), 1e-2);
  EXPECT_TRUE(fused_grad.narrow(0, 0, 5).eq(0).all().item<bool>());
}
#endif


// ------------------------------------------------------------------------------------------------
// The fused rotary embedding (ft/kernels/rope.h) against the model's unfused formula: the forward
// values bit for bit (bf16 and fp16 projections with float32 tables, as under autocast, and a float32
// model), the input gradient against float64 (one rounding, where autograd's unfused pass rounds
// each term to the projection's dtype). The projection is a transposed view, as in the model.
#ifdef LIBFT_WITH_CUDA_KERNELS
struct RopeOperands {
  at::Tensor x, cos, sin;  // x (B, H, T, D) as a view of (B, T, H, D); tables (B, 1, T, D) float32
};

RopeOperands rope_operands(int64_t B, int64_t H, int64_t T, int64_t D, at::ScalarType dtype, const at::Device device) {
  RopeOperands o;
  o.x = (at::randn({B, T, H, D}) * 2).to(dtype).to(device).transpose(1, 2);
  const at::Tensor pos = at::arange(T, at::kFloat).unsqueeze(0).expand({B, T}) + at::arange(B, at::kFloat).unsqueeze(1) * 7;
  const at::Tensor inv = 1.0 / at::pow(10000.0, at::arange(0, D, 2, at::kFloat) / static_cast<double>(D));
  const at::Tensor freqs = pos.unsqueeze(-1) * inv;
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  o.cos = emb.cos().unsqueeze(1).to(device);
  o.sin = emb.sin().unsqueeze(1).to(device);
  return o;
}

at::Tensor rotate_half_ref(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

// The float64 input gradient of Σ (x cos + rotate_half(x) sin) ⊙ dy.
at::Tensor rope_grad64(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor d = dy.to(at::kDouble).cpu(), c = cos.to(at::kDouble).cpu(), s = sin.to(at::kDouble).cpu();
  const int64_t h = d.size(-1) / 2;
  const at::Tensor ds = d * s;
  return d * c + at::cat({ds.narrow(-1, h, h), -ds.narrow(-1, 0, h)}, -1);
}

TEST(RopeKernel, PairsOnTheHostEqualTheFormulaBitForBit) {
  at::manual_seed(21);
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const RopeOperands o = rope_operands(2, 3, 5, 8, dtype, at::kCPU);
    const at::Tensor want = (o.x * o.cos + rotate_half_ref(o.x) * o.sin).to(dtype);  // float32 math, as unfused
    const at::Tensor x = o.x.to(at::kFloat).contiguous(), c = o.cos.contiguous(), s = o.sin.contiguous();
    at::Tensor got = at::empty_like(x), dx = at::empty_like(x);
    const at::Tensor dy = at::randn(x.sizes()).to(dtype).to(at::kFloat);
    const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = 0; t < T; ++t) {
          const at::Tensor xr = x[b][h][t], cr = c[b][0][t], sr = s[b][0][t], dr = dy[b][h][t];
          for (int64_t i = 0; i < half; ++i) {
            float y1, y2, d1, d2;
            kernels::detail::rope_pair(xr[i].item<float>(), xr[i + half].item<float>(), cr[i].item<float>(),
                                       cr[i + half].item<float>(), sr[i].item<float>(), sr[i + half].item<float>(), y1, y2);
            kernels::detail::rope_pair_backward(dr[i].item<float>(), dr[i + half].item<float>(), cr[i].item<float>(),
                                                cr[i + half].item<float>(), sr[i].item<float>(),
                                                sr[i + half].item<float>(), d1, d2);
            got[b][h][t][i] = y1;
            got[b][h][t][i + half] = y2;
            dx[b][h][t][i] = d1;
            dx[b][h][t][i + half] = d2;
          }
        }
      }
    }
    EXPECT_TRUE(got.to(dtype).equal(want)) << c10::toString(dtype);
    EXPECT_LE(test::max_rel_error(dx, rope_grad64(dy, o.cos, o.sin)), 1e-6) << c10::toString(dtype);
  }
}

TEST(RopeKernel, MatchesTheFormulaOnCuda) {
  FT_REQUIRE_CUDA();
  at::manual_seed(22);
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const auto& [B, H, T, D] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 2},
                                     {2, 8, 37, 64}, {3, 4, 300, 128}, {1, 32, 2048, 64}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " " + std::to_string(B) + "x" + std::to_string(H) + "x" +
                   std::to_string(T) + "x" + std::to_string(D));
      const RopeOperands o = rope_operands(B, H, T, D, dtype, at::kCUDA);
      ASSERT_TRUE(kernels::rope_fits(o.x, o.cos, o.sin));
      const at::Tensor want = (o.x * o.cos + rotate_half_ref(o.x) * o.sin).to(dtype);
      const at::Tensor got = kernels::rope_forward(o.x, o.cos, o.sin);
      EXPECT_EQ(got.strides(), o.x.strides());  // the projection's layout kept
      EXPECT_TRUE(got.equal(want));
      const at::Tensor dy = at::randn(o.x.sizes(), o.x.options().dtype(at::kFloat)).to(dtype);
      const at::Tensor dx = kernels::rope_backward(dy, o.cos, o.sin, dtype, o.x.strides());
      EXPECT_EQ(dx.scalar_type(), dtype);
      EXPECT_EQ(dx.strides(), o.x.strides());
      const double tol = dtype == at::kFloat ? 1e-6 : dtype == at::kHalf ? 1e-3 : 8e-3;
      EXPECT_LE(test::max_rel_error(dx, rope_grad64(dy, o.cos, o.sin)), tol);
    }
  }
  // A table of one row broadcast over the batch, and operands the kernel declines.
  const RopeOperands o = rope_operands(3, 2, 9, 16, at::kBFloat16, at::kCUDA);
  const at::Tensor c1 = o.cos.narrow(0, 0, 1), s1 = o.sin.narrow(0, 0, 1);
  EXPECT_TRUE(kernels::rope_forward(o.x, c1, s1).equal((o.x * c1 + rotate_half_ref(o.x) * s1).to(at::kBFloat16)));
  EXPECT_FALSE(kernels::rope_fits(o.x, o.cos.to(at::kBFloat16), o.sin.to(at::kBFloat16)));  // bf16 tables
  EXPECT_FALSE(kernels::rope_fits(o.x.narrow(3, 0, 15), o.cos.narrow(3, 0, 15), o.sin.narrow(3, 0, 15)));  // odd D
}

// The model with fused_rope against the unfused formula on CUDA under bf16 autocast: the same
// logits bit for bit, and gradients of the projections within bf16 rounding.
TEST(RopeKernel, ModelWithFusedRopeMatchesTheFormula) {
  FT_REQUIRE_CUDA();
  io::ModelConfig mc = test::tiny_config();
  mc.head_dim = 16;
  model::CausalLM m(mc);
  model::init_weights(m, 3);
  m->to(at::kCUDA);
  const at::Tensor ids = at::randint(0, mc.vocab_size, {2, 33}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  auto run = [&](bool fused) {
    m->set_fused_rope(fused);
    m->zero_grad();
    at::Tensor logits;
    {
      util::AutocastScope autocast(true, at::kCUDA);
      logits = m->forward(ids);
    }
    model::causal_lm_loss(logits, ids).backward();
    return std::make_pair(logits.detach(), m->named_parameters()["model.layers.0.self_attn.q_proj.weight"].grad().clone());
  };
  const auto [fused_logits, fused_grad] = run(true);
  const auto [plain_logits, plain_grad] = run(false);
  EXPECT_TRUE(fused_logits.equal(plain_logits));
  EXPECT_LE(test::max_rel_error(fused_grad, plain_grad), 2e-2);
  m->set_fused_rope(false);
}
#endif


// ------------------------------------------------------------------------------------------------
// The fused SwiGLU (ft/kernels/swiglu.h) against float64 of the unfused pair's formula evaluated on
// its rounded intermediates, and on CUDA against at::silu(g) * u itself (forward and, through
// autograd, both gradients), for bf16, fp16 and float32, vector and odd-sized tensors.
#ifdef LIBFT_WITH_CUDA_KERNELS
template <typename T>
void swiglu_host_case(at::ScalarType dtype) {
  const int64_t n = 1031;
  const at::Tensor g = (at::randn({n}) * 4).to(dtype), u = at::randn({n}).to(dtype), dh = at::randn({n}).to(dtype);
  at::Tensor h = at::empty_like(g), dg = at::empty_like(g), du = at::empty_like(g);
  const T* gp = reinterpret_cast<const T*>(g.data_ptr());
  const T* up = reinterpret_cast<const T*>(u.data_ptr());
  const T* dp = reinterpret_cast<const T*>(dh.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    reinterpret_cast<T*>(h.data_ptr())[i] = kernels::detail::swiglu_forward(gp[i], up[i]);
    kernels::detail::swiglu_backward(dp[i], gp[i], up[i], reinterpret_cast<T*>(dg.data_ptr())[i],
                                     reinterpret_cast<T*>(du.data_ptr())[i]);
  }
  const at::Tensor g64 = g.to(at::kDouble), u64 = u.to(at::kDouble), d64 = dh.to(at::kDouble);
  const at::Tensor sig = at::sigmoid(g64), s64 = g64 * sig;
  const double tol = dtype == at::kFloat ? 1e-6 : dtype == at::kHalf ? 2e-3 : 1.6e-2;
  EXPECT_LE(test::max_rel_error(h, s64 * u64), tol) << c10::toString(dtype);
  EXPECT_LE(test::max_rel_error(du, d64 * s64), tol) << c10::toString(dtype);
  EXPECT_LE(test::max_rel_error(dg, d64 * u64 * sig * (1 + g64 * (1 - sig))), tol) << c10::toString(dtype);
}

TEST(SwigluKernel, ElementsOnTheHostMatchTheFloat64Reference) {
  at::manual_seed(31);
  swiglu_host_case<float>(at::kFloat);
  swiglu_host_case<c10::BFloat16>(at::kBFloat16);
  swiglu_host_case<c10::Half>(at::kHalf);
}

// Every thread of a row kernel's grid, walked on the host (ft/kernels/rows.h): every element of
// the rows is computed, with the per-element values bit for bit, and nothing outside the rows is
// written. Small grids (a few blocks) make the threads stride over rows and columns.
template <typename F>
void walk_grid(const kernels::detail::RowsGrid& g, int64_t threads, F&& thread) {
  for (int64_t by = 0; by < g.y; ++by)
    for (int64_t bx = 0; bx < g.x; ++bx)
      for (int64_t tx = 0; tx < threads; ++tx) thread(kernels::detail::ThreadAt{bx, by, g.x, g.y, tx, threads});
}

template <typename T>
void swiglu_rows_host_case(at::ScalarType dtype, int64_t rows, int64_t I, int64_t max_blocks) {
  using namespace kernels::detail;
  SCOPED_TRACE(std::string(c10::toString(dtype)) + " rows " + std::to_string(rows) + " I " + std::to_string(I) +
               " blocks " + std::to_string(max_blocks));
  const at::Tensor gu = (at::randn({rows, 2 * I}) * 4).to(dtype);  // [gate | up]: rows of stride 2·I
  const at::Tensor dh = at::randn({rows, I + 3}).to(dtype);          // rows of stride I + 3
  const at::Tensor gate = gu.narrow(1, 0, I), up = gu.narrow(1, I, I), d = dh.narrow(1, 0, I);
  const auto* g = reinterpret_cast<const T*>(gate.data_ptr());
  const auto* u = reinterpret_cast<const T*>(up.data_ptr());
  const auto* dp = reinterpret_cast<const T*>(d.data_ptr());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const bool vectors : {false, true}) {
    if (vectors && I % kVec16<T> != 0) continue;
    // Outputs with a padding column after each row (h), and the halves of one (rows, 2·I + 1) tensor.
    at::Tensor h = at::full({rows, I + 1}, nan, dtype), dgu = at::full({rows, 2 * I + 1}, nan, dtype);
    const int64_t items = vectors ? I / kVec16<T> : I;
    walk_grid(rows_grid(rows, items, 256, max_blocks), 256, [&](const ThreadAt& th) {
      swiglu_forward_rows(th, g, 2 * I, u, 2 * I, reinterpret_cast<T*>(h.data_ptr()), I + 1, rows, I, vectors);
      swiglu_backward_rows(th, dp, I + 3, g, 2 * I, u, 2 * I, reinterpret_cast<T*>(dgu.data_ptr()), 2 * I + 1,
                           reinterpret_cast<T*>(dgu.data_ptr()) + I, 2 * I + 1, rows, I, vectors);
    });
    at::Tensor want_h = at::empty({rows, I}, dtype), want_dg = at::empty({rows, I}, dtype), want_du = at::empty({rows, I}, dtype);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < I; ++c) {
        auto* wh = reinterpret_cast<T*>(want_h.data_ptr()) + r * I + c;
        *wh = swiglu_forward(g[r * 2 * I + c], u[r * 2 * I + c]);
        swiglu_backward(dp[r * (I + 3) + c], g[r * 2 * I + c], u[r * 2 * I + c],
                        reinterpret_cast<T*>(want_dg.data_ptr())[r * I + c], reinterpret_cast<T*>(want_du.data_ptr())[r * I + c]);
      }
    }
    EXPECT_TRUE(h.narrow(1, 0, I).equal(want_h)) << "vectors " << vectors;
    EXPECT_TRUE(dgu.narrow(1, 0, I).equal(want_dg)) << "vectors " << vectors;
    EXPECT_TRUE(dgu.narrow(1, I, I).equal(want_du)) << "vectors " << vectors;
    EXPECT_TRUE(h.narrow(1, I, 1).isnan().all().item<bool>()) << "written past a row";
    EXPECT_TRUE(dgu.narrow(1, 2 * I, 1).isnan().all().item<bool>()) << "written past a row";
  }
}

TEST(SwigluKernel, RowThreadsOnTheHostComputeEveryElement) {
  at::manual_seed(34);
  for (const int64_t max_blocks : {1, 3, 2112}) {
    swiglu_rows_host_case<c10::BFloat16>(at::kBFloat16, 37, 40, max_blocks);
    swiglu_rows_host_case<c10::BFloat16>(at::kBFloat16, 5, 37, max_blocks);    // odd width: one at a time
    swiglu_rows_host_case<c10::BFloat16>(at::kBFloat16, 3, 4096, max_blocks);  // more columns than a block's threads
    swiglu_rows_host_case<float>(at::kFloat, 9, 44, max_blocks);
  }
  // The grid: y within CUDA's limit, x and y within the block budget, at least one block each way.
  const auto g = kernels::detail::rows_grid(1 << 20, 1 << 10, 256);
  EXPECT_EQ(g.x, 4);
  EXPECT_EQ(g.y, 528);
  EXPECT_EQ(kernels::detail::rows_grid(1 << 20, 1, 256, 1 << 20).y, 65535);
  EXPECT_EQ(kernels::detail::rows_grid(0, 0, 256).x, 1);
  EXPECT_EQ(kernels::detail::rows_grid(0, 0, 256).y, 1);
}

TEST(SwigluKernel, MatchesTheUnfusedPairOnCuda) {
  FT_REQUIRE_CUDA();
  at::manual_seed(32);
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{1, 1, 7}, {2, 33, 688}, {1, 2048, 8192}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " " + std::to_string(shape[1]) + "x" + std::to_string(shape[2]));
      const auto opts = at::TensorOptions().device(at::kCUDA);
      const at::Tensor g0 = (at::randn(shape, opts) * 4).to(dtype), u0 = at::randn(shape, opts).to(dtype);
      const at::Tensor dh = at::randn(shape, opts).to(dtype);
      ASSERT_TRUE(kernels::swiglu_fits(g0, u0));
      const at::Tensor g = g0.clone().requires_grad_(), u = u0.clone().requires_grad_();
      const at::Tensor want = at::silu(g) * u;
      const auto grads = torch::autograd::grad({want}, {g, u}, {dh});
      const at::Tensor got = kernels::swiglu_forward(g0, u0);
      const auto [dg, du] = kernels::swiglu_backward(dh, g0, u0);
      const double tol = dtype == at::kFloat ? 1e-6 : dtype == at::kHalf ? 2e-3 : 1.6e-2;
      EXPECT_LE(test::max_rel_error(got, want), tol);
      EXPECT_LE(test::max_rel_error(dg, grads[0]), tol);
      EXPECT_LE(test::max_rel_error(du, grads[1]), tol);
      // The same rounding points as the unfused pair: equal in all but a few elements (libdevice's
      // exp against ATen's build of the same formula).
      const double equal = got.eq(want).to(at::kDouble).mean().item<double>();
      std::printf("swiglu %s %lldx%lld: %.4f of the outputs equal the unfused pair's bit for bit\n",
                  c10::toString(dtype), static_cast<long long>(shape[1]), static_cast<long long>(shape[2]), equal);
      EXPECT_GT(equal, 0.99);
    }
  }
  // Not rows: the last dimension strided.
  EXPECT_FALSE(kernels::swiglu_fits(at::randn({4, 8}, at::kCUDA), at::randn({8, 4}, at::kCUDA).t()));
}

// The halves of a packed [gate | up] (grouped projections' output) through the kernel in place:
// forward and gradient equal, bit for bit, the kernel's on contiguous copies of the halves, on both
// its paths (16-byte vectors, and one element at a time where an odd offset misaligns them); the
// gradient comes back as one (…, 2·I) tensor. And model::swiglu_packed with the kernel against
// ATen's chain, within bf16 bounds.
TEST(SwigluKernel, PackedHalvesMatchTheSeparateKernelOnCuda) {
  FT_REQUIRE_CUDA();
  at::manual_seed(33);
  for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{1, 1, 7}, {2, 33, 688}, {1, 2048, 4096}}) {
      for (const int64_t offset : {0, 1}) {
        const int64_t I = shape[2];
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " " + std::to_string(shape[1]) + "x" + std::to_string(I) +
                     " offset " + std::to_string(offset));
        const auto opts = at::TensorOptions().device(at::kCUDA);
        // [pad | gate | up] rows: with offset 1 the halves start one element in (no 16-byte vectors).
        const at::Tensor wide = (at::randn({shape[0], shape[1], offset + 2 * I}, opts) * 4).to(dtype);
        const at::Tensor gu = wide.narrow(-1, offset, 2 * I);
        const at::Tensor gate = gu.narrow(-1, 0, I), up = gu.narrow(-1, I, I);
        const at::Tensor dh = at::randn({shape[0], shape[1], I}, opts).to(dtype);
        ASSERT_TRUE(kernels::swiglu_fits(gate, up));
        const at::Tensor want = kernels::swiglu_forward(gate.contiguous(), up.contiguous());
        const auto [dg, du] = kernels::swiglu_backward(dh, gate.contiguous(), up.contiguous());
        EXPECT_TRUE(kernels::swiglu_forward(gate, up).equal(want));
        at::Tensor d = at::full({shape[0], shape[1], 2 * I}, std::numeric_limits<double>::quiet_NaN(), opts.dtype(dtype));
        kernels::swiglu_backward_out(dh, gate, up, d.narrow(-1, 0, I), d.narrow(-1, I, I));
        EXPECT_TRUE(d.narrow(-1, 0, I).equal(dg));
        EXPECT_TRUE(d.narrow(-1, I, I).equal(du));
        if (offset != 0) continue;
        // Through the model's packed node, which writes the gradient's halves in place.
        const at::Tensor leaf = gu.detach().clone().requires_grad_();
        const at::Tensor h = model::swiglu_packed(leaf, /*fused_kernel=*/true);
        h.backward(dh);
        EXPECT_TRUE(h.equal(want));
        EXPECT_TRUE(leaf.grad().equal(at::cat({dg, du}, -1)));
        const at::Tensor ref_in = gu.detach().clone().requires_grad_();
        const at::Tensor ref = model::swiglu_packed(ref_in);
        ref.backward(dh);
        const double tol = dtype == at::kFloat ? 1e-6 : dtype == at::kHalf ? 2e-3 : 1.6e-2;
        EXPECT_LE(test::max_rel_error(h, ref), tol);
        EXPECT_LE(test::max_rel_error(leaf.grad(), ref_in.grad()), tol);
      }
    }
  }
  // The output gradient's halves must be rows shaped like gate.
  const at::Tensor g = at::randn({4, 8}, at::kCUDA);
  EXPECT_THROW(kernels::swiglu_backward_out(g, g, g, at::empty({8, 4}, at::kCUDA).t(), at::empty_like(g)), c10::Error);
}

TEST(RowsView, StridesOfRowsAndOfWhatIsNot) {
  using kernels::detail::as_rows;
  kernels::detail::RowsView v;
  const auto rows = [&](const at::Tensor& t) { return as_rows(t.sizes().vec(), t.strides().vec(), v); };
  const at::Tensor packed = at::zeros({3, 5, 2 * 7});
  ASSERT_TRUE(rows(packed.narrow(-1, 7, 7)));  // a half of [gate | up]
  EXPECT_EQ(v.rows, 15);
  EXPECT_EQ(v.cols, 7);
  EXPECT_EQ(v.ld, 14);
  ASSERT_TRUE(rows(at::zeros({3, 5, 7})));
  EXPECT_EQ(v.ld, 7);
  ASSERT_TRUE(rows(at::zeros({9})));
  EXPECT_EQ(v.rows, 1);
  EXPECT_EQ(v.ld, 9);
  ASSERT_TRUE(rows(at::zeros({3, 1, 5, 7}).narrow(-1, 0, 3)));  // a size-1 dimension's stride does not matter
  EXPECT_EQ(v.rows, 15);
  EXPECT_EQ(v.ld, 7);
  ASSERT_TRUE(rows(at::zeros({1, 4, 7}).expand({1, 4, 7})));
  EXPECT_FALSE(rows(at::zeros({7, 5}).t()));                    // the last dimension strided
  EXPECT_FALSE(rows(at::zeros({4, 6, 7}).narrow(1, 0, 3)));     // rows of two strides
  EXPECT_FALSE(rows(at::zeros({4, 7}).expand({3, 4, 7})));      // repeated rows (stride 0)
  EXPECT_FALSE(rows(at::zeros({1, 7}).expand({4, 7})));         // overlapping rows
  ASSERT_TRUE(rows(at::zeros({0, 7})));
  EXPECT_EQ(v.rows, 0);
}
#endif

}  // namespace

// ------------------------------------------------------------------------------------------------
// The float32 sum of compute-dtype gradients (ft/kernels/sum_float.h) against ATen's chain
// float32(g₀) + g₁ + … bit for bit: 1 to 4 inputs, bf16 and fp16, element counts with a tail after
// the 8-wide steps, and (on the GPU) unaligned inputs, which take the one-element path.
#ifdef LIBFT_WITH_CUDA_KERNELS
namespace {

at::Tensor sum_chain(const std::vector<at::Tensor>& grads) {
  at::Tensor sum = grads[0].to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  for (size_t k = 1; k < grads.size(); ++k) sum.add_(grads[k]);
  return sum;
}

std::vector<at::Tensor> sum_inputs(int n, int64_t numel, at::ScalarType dtype, const at::Device& device, int64_t offset = 0) {
  std::vector<at::Tensor> out;
  for (int k = 0; k < n; ++k) {
    // Values of mixed magnitude, so that the order of the additions shows in the roundings.
    const at::Tensor t = (at::randn({numel + offset}) * std::pow(10.0, k % 3 - 1)).to(dtype).to(device);
    out.push_back(t.narrow(0, offset, numel));
  }
  return out;
}

template <typename T, int N>
at::Tensor sum_on_host(const std::vector<at::Tensor>& grads) {
  using namespace kernels::detail;
  const int64_t numel = grads[0].numel();
  at::Tensor out = at::full({numel}, std::numeric_limits<double>::quiet_NaN(), at::kFloat);
  const T* in[kSumMaxInputs] = {};
  for (size_t k = 0; k < grads.size(); ++k) in[k] = reinterpret_cast<const T*>(grads[k].data_ptr());
  int64_t i = 0;
  for (; i + 8 <= numel; i += 8) sum_to_float8<T, N>(in, i, out.data_ptr<float>());
  for (; i < numel; ++i) out.data_ptr<float>()[i] = sum_to_float1<T, N>(in, i);
  return out;
}

template <typename T>
at::Tensor sum_on_host(const std::vector<at::Tensor>& grads) {
  switch (grads.size()) {
    case 1: return sum_on_host<T, 1>(grads);
    case 2: return sum_on_host<T, 2>(grads);
    case 3: return sum_on_host<T, 3>(grads);
    default: return sum_on_host<T, 4>(grads);
  }
}

}  // namespace

TEST(SumFloatKernel, ThreadsOnTheHostEqualAtensChain) {
  at::manual_seed(17);
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (int n = 1; n <= 4; ++n) {
      for (const int64_t numel : {1, 8, 13, 4099}) {
        const auto grads = sum_inputs(n, numel, dtype, at::kCPU);
        const at::Tensor got = dtype == at::kBFloat16 ? sum_on_host<c10::BFloat16>(grads) : sum_on_host<c10::Half>(grads);
        EXPECT_TRUE(got.equal(sum_chain(grads))) << c10::toString(dtype) << ", " << n << " inputs, " << numel;
      }
    }
  }
}

// The kernel's threads walked on the host over rows of their own strides (the extended GEMM's
// input gradient: the first `in` columns of (T, in + r)), bit for bit ATen's chain, with 16-byte
// steps and without, on small grids that make the threads stride over rows and columns.
TEST(SumFloatKernel, RowThreadsOnTheHostEqualAtensChain) {
  using namespace kernels::detail;
  at::manual_seed(19);
  for (const int64_t cols : {48, 44, 45}) {
    for (const int64_t max_blocks : {1, 3, 2112}) {
      std::vector<at::Tensor> grads;
      const int64_t rows = 21, lds[3] = {cols + 8, cols + 16, cols + 3};
      for (int k = 0; k < 3; ++k) grads.push_back((at::randn({rows, lds[k]}) * std::pow(10.0, k - 1)).to(at::kBFloat16).narrow(1, 0, cols));
      for (const bool vectors : {false, true}) {
        // With 16-byte steps only the first two inputs (on the device the launcher takes those
        // steps only where every row stays aligned; the host walk checks the indexing).
        const int n = vectors ? 2 : 3;
        const c10::BFloat16* in[kSumMaxInputs] = {};
        int64_t ld[kSumMaxInputs] = {};
        for (int k = 0; k < n; ++k) in[k] = reinterpret_cast<const c10::BFloat16*>(grads[k].data_ptr()), ld[k] = lds[k];
        at::Tensor out = at::full({rows, cols}, std::numeric_limits<double>::quiet_NaN(), at::kFloat);
        walk_grid(rows_grid(rows, vectors ? cols / 8 : cols, 256, max_blocks), 256, [&](const ThreadAt& th) {
          if (n == 2) sum_to_float_rows<c10::BFloat16, 2>(th, in, ld, out.data_ptr<float>(), rows, cols, vectors);
          else sum_to_float_rows<c10::BFloat16, 3>(th, in, ld, out.data_ptr<float>(), rows, cols, vectors);
        });
        const std::vector<at::Tensor> used(grads.begin(), grads.begin() + n);
        EXPECT_TRUE(out.equal(sum_chain(used))) << "cols " << cols << ", blocks " << max_blocks << ", vectors " << vectors;
      }
    }
  }
}

TEST(SumFloatKernel, EqualsAtensChainOnTheGpu) {
  FT_REQUIRE_CUDA();
  at::manual_seed(18);
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (int n = 1; n <= 4; ++n) {
      for (const int64_t numel : {1, 13, 4099, 1 << 22}) {
        for (const int64_t offset : {0, 1}) {  // 1: not 16-byte aligned
          const auto grads = sum_inputs(n, numel, dtype, at::kCUDA, offset);
          ASSERT_TRUE(kernels::sum_to_float_fits(grads));
          const at::Tensor got = kernels::sum_to_float(grads);
          EXPECT_EQ(got.scalar_type(), at::kFloat);
          EXPECT_TRUE(got.equal(sum_chain(grads))) << c10::toString(dtype) << ", " << n << " inputs, " << numel
                                                   << ", offset " << offset;
        }
      }
    }
  }
  // Rows of their own strides, as the extended GEMM's input gradient ((T, in) of a (T, in + r)
  // tensor): vectors where every stride is a multiple of 8 (in + 16), one element at a time where
  // one is not (in + 4 + 1), contiguous inputs mixed in, and a 3-D view.
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (const int64_t in : {256, 250}) {
      for (const int64_t pad : {16, 5}) {
        std::vector<at::Tensor> grads;
        for (int k = 0; k < 3; ++k) {
          const int64_t ld = k == 1 ? in : in + pad;
          const at::Tensor full = (at::randn({33, ld}) * std::pow(10.0, k - 1)).to(dtype).to(at::kCUDA);
          grads.push_back(full.narrow(1, 0, in));
        }
        ASSERT_TRUE(kernels::sum_to_float_fits(grads));
        EXPECT_TRUE(kernels::sum_to_float(grads).equal(sum_chain(grads)))
            << c10::toString(dtype) << ", in " << in << ", pad " << pad;
      }
    }
    const at::Tensor wide = at::randn({3, 11, 2 * 64}).to(dtype).to(at::kCUDA);
    const std::vector<at::Tensor> halves = {wide.narrow(-1, 0, 64), wide.narrow(-1, 64, 64)};
    EXPECT_TRUE(kernels::sum_to_float(halves).equal(sum_chain(halves)));
  }
  const at::Tensor a = at::randn({4, 6}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  EXPECT_FALSE(kernels::sum_to_float_fits({a, a.t().contiguous().t()}));  // shape ok, the last dimension strided
  EXPECT_FALSE(kernels::sum_to_float_fits({a, a.to(at::kHalf)}));
  EXPECT_FALSE(kernels::sum_to_float_fits({a, a, a, a, a}));
  EXPECT_FALSE(kernels::sum_to_float_fits({a.to(at::kFloat)}));
}
#endif
