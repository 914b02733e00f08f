// Model and kernel throughput, side by side in one run (Google Benchmark).
//
//   build/benchmarks/bench_model                       # everything visible on this machine
//   build/benchmarks/bench_model --benchmark_filter=RMSNorm
//
// RMSNorm: the fused CUDA kernel beside the LibTorch reference, in GB/s (bytes read + written).
// NF4Dequant: QLoRA's dequantization of a 4096 × 11008 weight (a Llama-7B MLP matrix) to bf16: the
// CUDA kernel beside the tensor-op reference, and on the CPU the decoding loop beside the reference,
// in GB/s of output written.
// Forward: tokens/s of a forward pass of configs/models/*.json-sized models with random weights.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include "ft/model/llama.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include <c10/cuda/CUDAFunctions.h>

#include "ft/kernels/rmsnorm.h"
#endif

#include "ft/adapt/nf4.h"

namespace {

using namespace ft;

void sync(const at::Device& d) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (d.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)d;
#endif
}

io::ModelConfig bench_config(int64_t hidden, int64_t layers) {
  io::ModelConfig c;
  c.vocab_size = 32000;
  c.hidden_size = hidden;
  c.intermediate_size = hidden * 8 / 3 / 64 * 64;
  c.num_hidden_layers = layers;
  c.num_attention_heads = hidden / 64;
  c.num_key_value_heads = std::max<int64_t>(1, hidden / 256);
  c.head_dim = 64;
  c.layer_window.assign(layers, 0);
  return c;
}

// Arguments: device (0 cpu, 1 cuda), hidden size, layers, tokens per sequence, dtype (0 f32, 1 bf16).
void BM_Forward(benchmark::State& state) {
  const bool cuda = state.range(0) == 1;
  if (cuda && !at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const at::Device dev = cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  const auto dtype = state.range(4) == 1 ? at::kBFloat16 : at::kFloat;
  model::CausalLM m(bench_config(state.range(1), state.range(2)));
  m->to(dev, dtype);
  m->eval();
  at::NoGradGuard no_grad;
  const int64_t T = state.range(3);
  at::Tensor ids = at::randint(0, 32000, {1, T}, at::TensorOptions().dtype(at::kLong).device(dev));
  for (int i = 0; i < 2; ++i) m->forward(ids);
  sync(dev);
  for (auto _ : state) {
    benchmark::DoNotOptimize(m->forward(ids));
    sync(dev);
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Forward)->Args({0, 256, 4, 256, 0})->Args({1, 2048, 16, 2048, 1})->Unit(benchmark::kMillisecond)->UseRealTime();

#ifdef LIBFT_WITH_CUDA_KERNELS
// Arguments: rows, hidden, fused (1) or reference (0). bf16 activations and weights.
void BM_RMSNorm(benchmark::State& state) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t R = state.range(0), E = state.range(1);
  auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::Tensor x = at::randn({R, E}, opts), w = at::ones({E}, opts);
  model::RMSNorm norm(E, 1e-5);
  norm->weight = w;
  auto run = [&] { return state.range(2) ? kernels::rmsnorm_forward(x, w, 1e-5) : norm->reference(x); };
  for (int i = 0; i < 3; ++i) run();
  c10::cuda::device_synchronize();
  for (auto _ : state) {
    benchmark::DoNotOptimize(run());
    c10::cuda::device_synchronize();
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * R * E * 2, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_RMSNorm)->ArgsProduct({{8192}, {4096}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();
#endif

// Arguments: device (0 cpu, 1 cuda), kernel/loop (1) or tensor-op reference (0).
void BM_NF4Dequant(benchmark::State& state) {
  const at::Device device = state.range(0) ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (device.is_cuda() && !at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t rows = device.is_cuda() ? 4096 : 1024, cols = 11008;
  const adapt::NF4Tensor q = adapt::quantize_nf4(at::randn({rows, cols}, at::TensorOptions().device(device)) * 0.02, 64, true);
  auto run = [&] { return state.range(1) ? adapt::dequantize_nf4(q, at::kBFloat16) : adapt::dequantize_nf4_ops(q, at::kBFloat16); };
  for (int i = 0; i < 2; ++i) run();
  sync(device);
  for (auto _ : state) {
    benchmark::DoNotOptimize(run());
    sync(device);
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * rows * cols, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_NF4Dequant)->ArgsProduct({{0, 1}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
