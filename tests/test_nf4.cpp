// NF4: the code book against its definition, quantization against an independent PyTorch
// reference (tests/python/nf4_reference.py, in LIBFT_NF4_REF), error bounds, double quantization,
// memory, odd shapes.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/function.h>

#include <cstdlib>
#include <filesystem>

#include "ft/adapt/nf4.h"
#include "ft/model/linear.h"
#include "ft/util/error.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "test_util.h"

using namespace ft;

namespace {

at::Tensor gaussian(std::vector<int64_t> shape, uint64_t seed, double std = 0.02) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::empty(shape, at::kFloat).normal_(0.0, std, gen);
}

// Half the gap between the code values around each index: the largest error nearest-rounding allows.
at::Tensor half_gap(const at::Tensor& idx) {
  const auto& c = adapt::nf4_code();
  std::vector<float> h(16);
  for (int i = 0; i < 16; ++i) {
    const float lo = i > 0 ? c[i] - c[i - 1] : 0.0f, hi = i < 15 ? c[i + 1] - c[i] : 0.0f;
    h[static_cast<size_t>(i)] = 0.5f * std::max(lo, hi);
  }
  return at::tensor(h).index_select(0, idx.to(at::kLong));
}

at::Tensor unpack(const adapt::NF4Tensor& q) {
  return at::stack({q.packed.bitwise_right_shift(4), q.packed.bitwise_and(15)}, 1).reshape({-1}).narrow(0, 0, q.numel);
}

}  // namespace

TEST(NF4, MatchesTheIndependentReference) {
  const char* path = std::getenv("LIBFT_NF4_REF");
  if (!path || !std::filesystem::exists(path)) GTEST_SKIP() << "LIBFT_NF4_REF unset (ctest's nf4_reference writes it)";
  auto f = io::SafetensorsFile::open(path);
  const at::Tensor code = io::read_tensor(*f, f->at("code"));
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(adapt::nf4_code()[i], code[i].item<float>(), 2.5e-7) << i;  // bitsandbytes' table vs ndtri in float64: within 1 float32 ulp
  const at::Tensor w = io::read_tensor(*f, f->at("w"));
  const adapt::NF4Tensor q = adapt::quantize_nf4(w);
  EXPECT_TRUE(unpack(q).equal(io::read_tensor(*f, f->at("idx"))));
  EXPECT_TRUE(q.absmax.equal(io::read_tensor(*f, f->at("absmax"))));
  EXPECT_LE(test::max_rel_error(adapt::dequantize_nf4(q), io::read_tensor(*f, f->at("deq"))), 2.5e-7);
}

TEST(NF4, ErrorWithinTheFormatsBoundOnGaussianWeights) {
  const at::Tensor w = gaussian({256, 384}, 1);
  const adapt::NF4Tensor q = adapt::quantize_nf4(w);
  const at::Tensor deq = adapt::dequantize_nf4(q);
  ASSERT_EQ(deq.sizes(), w.sizes());
  const at::Tensor idx = unpack(q);
  const at::Tensor scale = q.absmax.repeat_interleave(64);
  const at::Tensor err = (deq - w).abs().reshape({-1});
  EXPECT_TRUE((err <= half_gap(idx) * scale * (1 + 1e-6) + 1e-12).all().item<bool>());
  EXPECT_LE(err.max().item<double>(), 0.1386 * q.absmax.max().item<double>());
  // Every block's maximum is represented exactly (code ±1).
  EXPECT_LE((deq.reshape({-1, 64}).abs().amax(1) - q.absmax).abs().max().item<double>(), 1e-9);
  const double rms = (deq - w).pow(2).mean().sqrt().item<double>() / w.std().item<double>();
  std::printf("NF4 relative RMS error on N(0, 0.02) weights, block 64: %.4f\n", rms);
  EXPECT_LT(rms, 0.11);
  EXPECT_EQ(q.bytes(), 256 * 384 / 2 + 4 * (256 * 384 / 64));  // 4.5 bits per weight
}

TEST(NF4, DoubleQuantizationOfTheBlockMaxima) {
  const at::Tensor w = gaussian({512, 300}, 2);  // 2400 blocks: 9 groups of 256 with a short last one
  const adapt::NF4Tensor plain = adapt::quantize_nf4(w);
  const adapt::NF4Tensor dq = adapt::quantize_nf4(w, 64, /*double_quant=*/true);
  ASSERT_TRUE(dq.double_quant);
  EXPECT_EQ(dq.absmax_q.numel(), 2400);
  EXPECT_EQ(dq.absmax_scale.numel(), 10);
  // Each maximum within half a step of its group's scale.
  const at::Tensor c = adapt::nf4_absmax(dq), step = dq.absmax_scale.repeat_interleave(256).narrow(0, 0, 2400);
  EXPECT_TRUE(((c - plain.absmax).abs() <= step * 0.5 * (1 + 1e-5) + 1e-9).all().item<bool>());
  const double bits = 8.0 * static_cast<double>(dq.bytes()) / static_cast<double>(w.numel());
  EXPECT_LT(bits, 4.14);
  EXPECT_GT(bits, 4.12);
  const double rms_plain = (adapt::dequantize_nf4(plain) - w).pow(2).mean().sqrt().item<double>();
  const double rms_dq = (adapt::dequantize_nf4(dq) - w).pow(2).mean().sqrt().item<double>();
  std::printf("NF4 RMS error: %.3e plain, %.3e double-quantized (%.3f bits per weight)\n", rms_plain, rms_dq, bits);
  EXPECT_LT(rms_dq, rms_plain * 1.02);
}

TEST(NF4, BytesFormulaMatchesTheQuantizedTensor) {
  for (const int64_t n : {63, 64, 4096, 64 * 257, 100001}) {
    for (const bool dq : {false, true}) {
      const adapt::NF4Tensor q = adapt::quantize_nf4(gaussian({n}, 4), 64, dq);
      EXPECT_EQ(adapt::nf4_bytes(n, 64, dq), q.bytes()) << n << " " << dq;
    }
  }
}

// The CPU decoding loop and the tensor-op reference give the same values, odd sizes included.
TEST(NF4, CpuLoopEqualsTheTensorOpPath) {
  for (const auto& [shape, block, dq] : {std::tuple{std::vector<int64_t>{64, 96}, int64_t{64}, true},
                                         std::tuple{std::vector<int64_t>{7, 9}, int64_t{32}, false},
                                         std::tuple{std::vector<int64_t>{1, 1}, int64_t{2}, false}}) {
    const adapt::NF4Tensor q = adapt::quantize_nf4(gaussian(shape, 9), block, dq);
    EXPECT_TRUE(adapt::dequantize_nf4(q).equal(adapt::dequantize_nf4_ops(q)));
    EXPECT_TRUE(adapt::dequantize_nf4(q, at::kBFloat16).equal(adapt::dequantize_nf4_ops(q, at::kBFloat16)));
  }
}

// dequantize_nf4_into writes the values dequantize_nf4 returns into a strided view (the first
// `in` columns of the extended GEMM's (out, in + r) buffer), leaving the other columns untouched;
// a result of the wrong shape is refused.
TEST(NF4, DequantizesIntoAStridedView) {
  for (const auto& [shape, block, dq] : {std::tuple{std::vector<int64_t>{64, 96}, int64_t{64}, true},
                                         std::tuple{std::vector<int64_t>{7, 9}, int64_t{32}, false}}) {
    const adapt::NF4Tensor q = adapt::quantize_nf4(gaussian(shape, 11), block, dq);
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      at::Tensor buffer = at::full({shape[0], shape[1] + 8}, 7.0, at::TensorOptions().dtype(dtype));
      adapt::dequantize_nf4_into(q, buffer.narrow(1, 0, shape[1]));
      EXPECT_TRUE(buffer.narrow(1, 0, shape[1]).equal(adapt::dequantize_nf4(q, dtype)));
      EXPECT_TRUE(buffer.narrow(1, shape[1], 8).eq(7.0).all().item<bool>());
    }
  }
  const adapt::NF4Tensor q = adapt::quantize_nf4(gaussian({8, 16}, 1), 64);
  EXPECT_THROW(adapt::dequantize_nf4_into(q, at::empty({16, 8})), Error);
}

TEST(NF4, OddShapesAndDtypes) {
  const at::Tensor w = gaussian({7, 9}, 3);  // 63 elements: one full block, a padded one, an odd count
  const adapt::NF4Tensor q = adapt::quantize_nf4(w, 32);
  EXPECT_EQ(q.packed.numel(), 32);
  const at::Tensor deq = adapt::dequantize_nf4(q, at::kBFloat16);
  EXPECT_EQ(deq.scalar_type(), at::kBFloat16);
  EXPECT_EQ(deq.sizes(), w.sizes());
  EXPECT_LE((deq.to(at::kFloat) - w).abs().max().item<double>(), 0.1386 * w.abs().max().item<double>() + 1e-3);
  const adapt::NF4Tensor from_bf16 = adapt::quantize_nf4(w.to(at::kBFloat16));
  EXPECT_EQ(from_bf16.numel, 63);
  EXPECT_THROW(adapt::quantize_nf4(w, 63), Error);
  EXPECT_THROW(adapt::quantize_nf4(at::ones({4}, at::kLong)), Error);
  // Zeros stay zero (a block of zeros has maximum 0).
  EXPECT_EQ(adapt::dequantize_nf4(adapt::quantize_nf4(at::zeros({128}))).abs().sum().item<double>(), 0.0);
}

// An NF4 linear layer in training keeps no dense weight for the backward pass (its node saves the
// codes and dequantizes again) and gives the gradient of the dequantized weight's product.
TEST(NF4, LinearBackwardDequantizesAgain) {
  model::Linear layer(24, 10, /*bias=*/true);
  {
    at::NoGradGuard no_grad;
    layer->weight.copy_(gaussian({10, 24}, 5, 0.1));
    layer->bias.copy_(gaussian({10}, 6, 0.1));
  }
  layer->quantize_nf4(8, /*double_quant=*/true);
  layer->bias.set_requires_grad(false);
  const at::Tensor x = gaussian({3, 4, 24}, 7, 1.0).requires_grad_(true);
  const at::Tensor g = gaussian({3, 4, 10}, 8, 1.0);
  const at::Tensor y = layer(x);
  ASSERT_NE(y.grad_fn(), nullptr);
  EXPECT_NE(y.grad_fn()->name().find("Add"), std::string::npos);  // x Wᵀ + b
  EXPECT_NE(y.grad_fn()->next_edges()[0].function->name().find("NF4Matmul"), std::string::npos);
  (y * g).sum().backward();
  const at::Tensor w = adapt::dequantize_nf4(*layer->nf4()).to(at::kDouble);
  EXPECT_LE(test::max_rel_error(y, at::matmul(x.to(at::kDouble), w.t()) + layer->bias.to(at::kDouble)), 1e-6);
  EXPECT_LE(test::max_rel_error(x.grad(), at::matmul(g.to(at::kDouble), w)), 1e-6);
}

// A quantized layer's codes and maxima are not parameters or buffers, yet they follow the module:
// to(dtype) leaves them as they are (uint8 codes, float32 maxima) while the rest converts, and
// to(device) moves them (checked on CUDA where a GPU is visible), so a base quantized on the CPU
// runs on the GPU.
TEST(NF4, CodesFollowTheModuleAndKeepTheirDtypes) {
  for (const bool dq : {false, true}) {
    model::Linear lin(64, 32, true);
    lin->quantize_nf4(64, dq);
    const at::Tensor x = at::randn({3, 64});
    const at::Tensor before = lin->forward(x);
    lin->to(at::kDouble);
    const adapt::NF4Tensor& q = *lin->nf4();
    EXPECT_EQ(q.packed.scalar_type(), at::kByte);
    EXPECT_EQ((dq ? q.absmax_scale : q.absmax).scalar_type(), at::kFloat);
    EXPECT_EQ(lin->bias.scalar_type(), at::kDouble);
    // The same dequantized weight, now in float64: the products agree to float32 rounding.
    EXPECT_LE(test::max_rel_error(lin->forward(x.to(at::kDouble)), before), 1e-6);
    lin->to(at::kFloat);
    if (at::hasCUDA()) {
      lin->to(at::Device(at::kCUDA));
      EXPECT_TRUE(lin->nf4()->packed.is_cuda());
      EXPECT_TRUE((dq ? lin->nf4()->absmax_q : lin->nf4()->absmax).is_cuda());
      EXPECT_LE(test::max_rel_error(lin->forward(x.cuda()).cpu(), before), 1e-5);
    }
  }
}
