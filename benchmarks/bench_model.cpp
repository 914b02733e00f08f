// Model and kernel throughput, side by side in one run (Google Benchmark).
//
//   build/benchmarks/bench_model                       # everything visible on this machine
//   build/benchmarks/bench_model --benchmark_filter=RMSNorm
//
// RMSNorm: the fused CUDA kernel beside the LibTorch reference, in GB/s (bytes read + written).
// NF4Dequant: QLoRA's dequantization of a 4096 × 11008 weight (a Llama-7B MLP matrix) to bf16: the
// CUDA kernel beside the tensor-op reference, and on the CPU the decoding loop beside the reference,
// in GB/s of bytes read plus written.
// Forward: tokens/s of a forward pass of configs/models/*.json-sized models with random weights.
// LoraLinear: forward + backward of one adapted linear layer, the frozen layer alone beside the
// PEFT-style autograd chain and libft's fused path (adapt::set_lora_fused); CPU at the bundled
// model's widths in float32, CUDA at Llama-7B/8B widths in bf16 autocast with the frozen weights
// stored in bf16 (as the trainer stores them; adapt::store_frozen_linears).
// LoraStep: forward + loss + backward of the bundled model (configs/models/tiny-llama.json) with LoRA
// r 8 on every linear layer and dropout 0.05, unfused beside fused, tokens/s.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include "ft/model/llama.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ft/kernels/lora_rows.h"
#include "ft/kernels/rmsnorm.h"
#include "ft/kernels/rope.h"
#include "ft/kernels/swiglu.h"
#endif

#include "ft/adapt/lora.h"
#include "ft/adapt/mode.h"
#include "ft/adapt/nf4.h"
#include "ft/model/linear.h"
#include "ft/train/graphs.h"
#include "ft/train/optimizer.h"
#include "ft/train/step.h"
#include "ft/util/autocast.h"

namespace {

using namespace ft;

// ATen operator calls (outermost ones: an op that another op calls is not counted) between
// construction and ops(), on every thread, the autograd engine's too. On CUDA each such call costs
// host time (dispatch, launch), which is what a small layer's step is made of. With the environment
// variable LIBFT_BENCH_LIST_OPS set, each one's name goes to stderr.
class OpCounter {
 public:
  OpCounter()
      : handle_(at::addGlobalCallback(
            at::RecordFunctionCallback(&OpCounter::enter, &OpCounter::leave).scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}))) {
    count_ = 0;
  }
  ~OpCounter() { at::removeCallback(handle_); }
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;
  int64_t ops() const { return count_; }

 private:
  static bool transparent(const at::RecordFunction& fn) {
    return fn.scope() == at::RecordScope::BACKWARD_FUNCTION ||
           std::string_view(fn.name()).rfind("autograd::engine::evaluate_function", 0) == 0;
  }
  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction& fn) {
    if (transparent(fn)) return nullptr;  // an autograd node: count the ops inside it
    if (depth_++ == 0) {
      ++count_;
      static const bool list = std::getenv("LIBFT_BENCH_LIST_OPS") != nullptr;
      if (list) std::fprintf(stderr, "[op] %s\n", fn.name());
    }
    return nullptr;
  }
  static void leave(const at::RecordFunction& fn, at::ObserverContext*) {
    if (!transparent(fn)) --depth_;
  }
  static inline std::atomic<int64_t> count_{0};
  static inline thread_local int depth_ = 0;
  at::CallbackHandle handle_;
};

void sync(const at::Device& d) {
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (d.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)d;
#endif
}

// Timed iterations of the CUDA rows. A fixed count, not Google Benchmark's minimum time: to choose an
// iteration count it calls a row's function several times, repeating the set-up each time (building
// a layer's weights on the CPU, warm-up steps, a CUDA graph's capture), which cost the GPU check
// more than the timed steps. A step of the 1.24B model takes 0.1-0.4 s, a layer 0.1-5 ms.
constexpr int kCudaIterations = 100, kStepIterations = 8;

// A row's body behind an exception guard: a failed check or CUDA running out of memory skips that
// row with its message, where an escaping exception would end the process and lose every later row.
// (The guard also covers an exception inside the timed loop: a skipped row may stop its loop early.)
void guarded(benchmark::State& state, void (*body)(benchmark::State&)) {
  try {
    body(state);
  } catch (const std::exception& e) {
    state.SkipWithError((std::string("exception: ") + e.what()).substr(0, 400).c_str());
  }
}
// FT_GUARDED_BENCHMARK(BM_Name) { ... } defines BM_Name (the row name Google Benchmark shows) as its
// body run through guarded().
#define FT_GUARDED_BENCHMARK(name)                                 \
  void name##_body(benchmark::State& state);                       \
  void name(benchmark::State& state) { guarded(state, &name##_body); } \
  void name##_body(benchmark::State& state)

// With LIBFT_BENCH_PROFILE=DIR, one step of the benchmarks that call this is traced by PyTorch's
// Kineto profiler: ATen calls on every host thread (the autograd engine's too) and, on CUDA, the
// kernels through CUPTI. The trace goes to DIR/<benchmark>.json (Perfetto, chrome://tracing), and
// one line on stderr says where the step's time went: its wall time, the kernels' summed time
// (GPU busy), and each host thread's span from its first ATen call to its last. A step whose
// kernels take much less than its wall time, while a thread's span covers it, waits on the host.
// With LIBFT_BENCH_PROFILE_ONLY set too, profile_step returns true after the trace and the row skips
// its timing: the GPU check traces in a process of its own, so that the profiler (CUPTI) is never
// active in a process whose rows are timed.
#ifdef LIBFT_WITH_CUDA_KERNELS
// `step` captured as a CUDA graph: warm-up steps on a side stream first (cuBLAS workspaces and other
// lazy set-up must happen outside a capture), then the capture, with autocast's cast cache off so
// that every replay casts the current weights. Throws where the capture fails.
std::unique_ptr<at::cuda::CUDAGraph> capture_graph(const std::function<void()>& step) {
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  side.synchronize();
  current.synchronize();
  {
    c10::cuda::CUDAStreamGuard guard(side);
    for (int i = 0; i < 3; ++i) step();
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    bool capturing = false;
    try {
      graph->capture_begin();
      capturing = true;
      step();
      capturing = false;  // capture_end ends the capture even when it throws
      graph->capture_end();
    } catch (...) {
      if (capturing) {  // a stream left capturing fails every later CUDA call
        try {
          graph->capture_end();
        } catch (...) {
        }
      }
      at::autocast::set_autocast_cache_enabled(cache);
      throw;
    }
    at::autocast::set_autocast_cache_enabled(cache);
  }
  side.synchronize();
  return graph;
}
#endif

// `name` and the first `args` arguments of `state`, joined by '_' (Google Benchmark 1.7 has no State::name()).
std::string row_name(const char* name, const benchmark::State& state, int args) {
  std::string out = name;
  for (int i = 0; i < args; ++i) out += "_" + std::to_string(state.range(i));
  return out;
}

bool profile_step(const std::string& name, const std::function<void()>& step, const at::Device& device) {
  const char* dir = std::getenv("LIBFT_BENCH_PROFILE");
  static const bool only = std::getenv("LIBFT_BENCH_PROFILE_ONLY") != nullptr;
  static std::set<std::string> done;  // Google Benchmark may run a row's function more than once: trace it once
  if (dir == nullptr) return false;
  if (!done.insert(name).second) return only;
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  step();
  sync(device);
  const double wall_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  const std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();
  double kernel_us = 0;
  int kernels = 0, host_ops = 0;
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> spans;  // thread: first start, last end (ns)
  for (const prof::KinetoEvent& e : result->events()) {
    if (e.deviceType() == c10::DeviceType::CUDA) {
      kernel_us += static_cast<double>(e.durationNs()) / 1e3;
      ++kernels;
    } else if (e.deviceType() == c10::DeviceType::CPU) {
      ++host_ops;
      auto [it, fresh] = spans.try_emplace(e.startThreadId(), e.startNs(), e.endNs());
      if (!fresh) it->second = {std::min(it->second.first, e.startNs()), std::max(it->second.second, e.endNs())};
    }
  }
  const std::string path = std::string(dir) + "/" + name + ".json";
  result->save(path);
  std::string threads;
  for (const auto& [tid, span] : spans) {
    threads += " " + std::to_string(static_cast<int64_t>((span.second - span.first) / 1000)) + " us";
  }
  std::fprintf(stderr, "[profile] %s: wall %.0f us; %d device events, %.0f us; %d host events, spans by thread:%s; %s\n",
               name.c_str(), wall_us, kernels, kernel_us, host_ops, threads.c_str(), path.c_str());
  return only;
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

// A Llama-shaped config with tied embeddings and full attention in every layer.
io::ModelConfig llama_config(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads,
                             int64_t kv_heads, int64_t head_dim) {
  io::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.tie_word_embeddings = true;
  c.layer_window.assign(static_cast<size_t>(layers), 0);
  return c;
}

// Arguments: device (0 cpu, 1 cuda), hidden size, layers, tokens per sequence, dtype (0 f32, 1 bf16).
FT_GUARDED_BENCHMARK(BM_Forward) {
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
BENCHMARK(BM_Forward)->Args({0, 256, 4, 256, 0})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Forward)->Args({1, 2048, 16, 2048, 1})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kCudaIterations / 5);

// Gemma 2's soft-capped attention, forward and backward: 0, the eager chain transformers writes,
// run by autograd (which keeps the scores, their tanh and the float32 probabilities of every
// layer for the backward pass); 1, model::softcapped_attention, which keeps q, k and v and
// recomputes the scores in blocks of query rows. CPU: float32, 8 query and 4 key/value heads of 64,
// 512 tokens; CUDA: bf16, gemma-2-2b's heads (8 and 4 of 256), 2048 tokens, and "saved MiB": what
// the forward pass leaves allocated for the backward pass, beyond its output.
FT_GUARDED_BENCHMARK(BM_SoftcappedAttention) {
  const int path = static_cast<int>(state.range(0));
  const bool cuda = state.range(1) == 1;
  if (cuda && !at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t B = 1, H = 8, G = 4, T = cuda ? 2048 : 512, D = cuda ? 256 : 64;
  const auto opts = at::TensorOptions().device(cuda ? at::kCUDA : at::kCPU).dtype(cuda ? at::kBFloat16 : at::kFloat);
  const at::Tensor q = at::randn({B, H, T, D}, opts).requires_grad_(), k = at::randn({B, G, T, D}, opts).requires_grad_();
  const at::Tensor v = at::randn({B, G, T, D}, opts).requires_grad_(), dout = at::randn({B, H, T, D}, opts);
  const double scale = 1.0 / std::sqrt(256.0), cap = 50.0;
  auto forward = [&] {
    if (path == 1) return model::softcapped_attention(q, k, v, at::Tensor(), /*causal=*/true, scale, cap);
    at::Tensor s = at::matmul(q, k.repeat_interleave(H / G, 1).transpose(2, 3)) * scale;
    s = at::tanh(s / cap) * cap;
    s = s.masked_fill(at::ones({T, T}, opts.dtype(at::kBool)).triu(1), -std::numeric_limits<double>::infinity());
    return at::matmul(at::softmax(s, -1, at::kFloat).to(q.scalar_type()), v.repeat_interleave(H / G, 1));
  };
  double saved_mib = -1;
  for (int i = 0; i < 2; ++i) {
#ifdef LIBFT_WITH_CUDA_KERNELS
    namespace alloc = c10::cuda::CUDACachingAllocator;
    sync(q.device());
    const int64_t before = cuda ? alloc::getDeviceStats(0).allocated_bytes[0].current : 0;
    at::Tensor out = forward();
    sync(q.device());
    if (cuda) {
      saved_mib = static_cast<double>(alloc::getDeviceStats(0).allocated_bytes[0].current - before -
                                      static_cast<int64_t>(out.nbytes())) / (1 << 20);
    }
#else
    at::Tensor out = forward();
#endif
    torch::autograd::backward({out}, {dout});
  }
  sync(q.device());
  for (auto _ : state) {
    torch::autograd::backward({forward()}, {dout});
    sync(q.device());
  }
  state.SetLabel(path == 0 ? "eager chain (autograd)" : "libft, recomputed in the backward pass");
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B * T), benchmark::Counter::kIsIterationInvariantRate);
  if (saved_mib >= 0) state.counters["saved MiB"] = saved_mib;
}
BENCHMARK(BM_SoftcappedAttention)->ArgsProduct({{0, 1}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SoftcappedAttention)->ArgsProduct({{0, 1}, {1}})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kCudaIterations);

#ifdef LIBFT_WITH_CUDA_KERNELS
// Arguments: rows, hidden, fused (1) or reference (0). bf16 activations and weights.
FT_GUARDED_BENCHMARK(BM_RMSNorm) {
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

// One attention layer's forward and backward on packed rows, CUDA bf16, Llama-3.2-1B's heads (32
// query, 8 key/value, head_dim 64): 4 rows of 2048 tokens, each packed with documents of 16 to
// 1024 tokens (a fixed draw). Path 0: SDPA with the (B, 1, T, T) block-diagonal causal mask, as the
// model ran packed rows before ForwardOptions::cu_seqlens (the mask built once per forward, not
// timed); 1: variable-length flash attention over the documents (what the trainer now passes);
// 2: plain causal SDPA over whole rows, which ignores the documents (the bound, not a valid
// packed computation).
FT_GUARDED_BENCHMARK(BM_PackedAttentionCuda) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int path = static_cast<int>(state.range(0));
  const int64_t B = 4, T = 2048, H = 32, G = 8, D = 64;
  const auto bf = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  std::vector<int32_t> offsets{0};
  std::vector<int64_t> seg;
  uint64_t x = 99;
  int64_t longest = 0;
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t c = 0, doc = 0; c < T; ++doc) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const int64_t len = std::min<int64_t>(T - c, 16 + static_cast<int64_t>((x >> 33) % 1009));
      for (int64_t i = 0; i < len; ++i) seg.push_back(doc);
      c += len;
      longest = std::max(longest, len);
      offsets.push_back(static_cast<int32_t>(r * T + c));
    }
  }
  const at::Tensor cu = at::tensor(offsets, at::TensorOptions().dtype(at::kInt)).to(at::kCUDA);
  const at::Tensor segments = at::tensor(seg, at::TensorOptions().dtype(at::kLong)).view({B, T}).to(at::kCUDA);
  const at::Tensor idx = at::arange(T, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  const at::Tensor mask = (idx.view({1, T}) <= idx.view({T, 1})).view({1, 1, T, T})
                              .logical_and((segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1));
  // (B, T, heads, D) as the projections give them.
  const at::Tensor q = at::randn({B, T, H, D}, bf).requires_grad_(), k = at::randn({B, T, G, D}, bf).requires_grad_();
  const at::Tensor v = at::randn({B, T, G, D}, bf).requires_grad_(), dout = at::randn({B, T, H, D}, bf);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto step = [&] {
    at::Tensor out;
    if (path == 1) {
      out = std::get<0>(at::_flash_attention_forward(q.view({B * T, H, D}), k.view({B * T, G, D}), v.view({B * T, G, D}),
                                                     cu, cu, longest, longest, 0.0, true, false, scale))
                .view({B, T, H, D});
    } else {
      std::optional<at::Tensor> m;
      if (path == 0) m = mask;
      out = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, 0.0,
                                             path == 2, scale, /*enable_gqa=*/true)
                .transpose(1, 2);
    }
    torch::autograd::backward({out}, {dout});
  };
  try {
    for (int i = 0; i < 2; ++i) step();
  } catch (const std::exception& e) {
    return state.SkipWithError((std::string("attention failed: ") + e.what()).substr(0, 400).c_str());
  }
  sync(at::kCUDA);
  for (auto _ : state) {
    step();
    sync(at::kCUDA);
  }
  state.SetLabel(path == 0 ? "SDPA, block-diagonal mask" : path == 1 ? "flash, variable length" : "SDPA causal, whole rows");
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B * T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_PackedAttentionCuda)->DenseRange(0, 2)->Unit(benchmark::kMicrosecond)->UseRealTime();
#endif

// Arguments: device (0 cpu, 1 cuda), kernel/loop (1) or tensor-op reference (0).
FT_GUARDED_BENCHMARK(BM_NF4Dequant) {
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
  // Bytes read (codes and maxima: q.bytes(), 0.516 per weight) plus written (2 per bf16 weight), the
  // measure BM_DeviceCopy uses.
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(q.bytes()) + 2.0 * rows * cols,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_NF4Dequant)->ArgsProduct({{0}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_NF4Dequant)->ArgsProduct({{1}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);

// DoRA's row norms ||W + s B A|| of one gate_proj-shaped layer (4096 → 14336 on CUDA with W stored in
// bf16, as the trainer stores a frozen base under autocast; 1024 → 3584 in float32 on the CPU), r 16:
// impl 0 forms W + s B A in float32 as PEFT's get_weight_norm does (and libft did until 2026-11-27);
// impl 1 adapt::dora_row_norm (one (out, r) GEMM over W as stored, ||W||² given, as the adapter keeps
// it). Arguments: device (0 cpu, 1 cuda), impl.
FT_GUARDED_BENCHMARK(BM_DoraRowNorm) {
  const at::Device device = state.range(0) ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (device.is_cuda() && !at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t out = device.is_cuda() ? 14336 : 3584, in = device.is_cuda() ? 4096 : 1024, r = 16;
  const auto f32 = at::TensorOptions().device(device);
  const at::Tensor w = (at::randn({out, in}, f32) * 0.02).to(device.is_cuda() ? at::kBFloat16 : at::kFloat);
  const at::Tensor a = at::randn({r, in}, f32) * 0.02, b = at::randn({out, r}, f32) * 0.02;
  const at::Tensor w_sq = w.to(at::kFloat).pow(2).sum(1);
  auto run = [&] {
    if (state.range(1) == 1) return adapt::dora_row_norm(w, a, b, 2.0, w_sq);
    return at::linalg_vector_norm(w.to(at::kFloat) + at::matmul(b, a) * 2.0, 2, {1});
  };
  for (int i = 0; i < 2; ++i) run();
  sync(device);
  for (auto _ : state) {
    benchmark::DoNotOptimize(run());
    sync(device);
  }
}
BENCHMARK(BM_DoraRowNorm)->ArgsProduct({{0}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_DoraRowNorm)->ArgsProduct({{1}, {0, 1}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);

// The yardstick for NF4Dequant on CUDA: a device-to-device copy of the bf16 output's size, in GB/s of
// bytes read plus written (NF4Dequant's target: at least 75% of this).
FT_GUARDED_BENCHMARK(BM_DeviceCopy) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const at::Tensor src = at::randn({4096, 11008}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  at::Tensor dst = at::empty_like(src);
  dst.copy_(src);
  sync(src.device());
  for (auto _ : state) {
    dst.copy_(src);
    sync(src.device());
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * 2.0 * static_cast<double>(src.numel()),
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DeviceCopy)->Unit(benchmark::kMicrosecond)->UseRealTime();

// One decoder block of `hidden`/`inter` widths, LoRA of rank r on the layer `target` (unless
// mode 0), and that layer.
struct LoraBench {
  model::CausalLM m{nullptr};
  model::LinearImpl* layer = nullptr;
  LoraBench(int64_t hidden, int64_t inter, const std::string& target, int64_t r, int mode, const at::Device& d,
            bool bf16_base, double dropout = 0.0) {
    io::ModelConfig c = bench_config(hidden, 1);
    c.vocab_size = 256;
    c.intermediate_size = inter;
    // Only the measured layer needs its real shape. The block's other matrices stay small, so that
    // building the model on the CPU takes a fraction of a second per benchmark row.
    if (target == "self_attn.o_proj") {
      c.intermediate_size = 64;
    } else {
      c.num_attention_heads = 1;
      c.num_key_value_heads = 1;
    }
    m = model::CausalLM(c);
    if (mode == 3 || mode >= 7) {  // QLoRA: the layer's weight in NF4 (blocks of 64, double-quantized scales)
      for (const auto& item : m->named_modules()) {
        if (item.key() == "model.layers.0." + target) dynamic_cast<model::LinearImpl*>(item.value().get())->quantize_nf4();
      }
    }
    if (mode == 0) {
      for (auto& p : m->parameters()) p.set_requires_grad(false);  // the frozen base alone
    } else {
      adapt::LoraOptions o;
      o.targets = {target};
      o.r = r;
      o.dropout = dropout;
      adapt::apply_lora(m, o);
      adapt::set_lora_fused(m, mode >= 2);
      adapt::set_lora_extended_gemm(m, mode == 4 || mode == 6 || mode >= 7);
      adapt::set_lora_row_kernels(m, mode == 5 || mode == 6 || mode == 8);
      at::NoGradGuard no_grad;
      for (auto& p : m->parameters()) {
        if (p.requires_grad()) p.normal_(0.0, 0.02);  // a nonzero B
      }
    }
    m->to(d);
    if (bf16_base) adapt::store_frozen_linears(m, at::kBFloat16);  // as the trainer stores a frozen base under autocast
    m->train();
    for (const auto& item : m->named_modules()) {
      if (item.key() == "model.layers.0." + target) layer = dynamic_cast<model::LinearImpl*>(item.value().get());
    }
  }
};

// Arguments: device (0 cpu in float32, 1 cuda in bf16 autocast, 2 cpu in bf16 autocast), mode (0 frozen
// linear alone, 1 LoRA unfused, 2 LoRA fused, 3 QLoRA fused: NF4 base, 4 LoRA fused with the extended
// GEMM, adapt::set_lora_extended_gemm, 5 and 6: 2 and 4 with the row kernels, adapt::set_lora_row_kernels
// (CUDA), 7 and 8: QLoRA as 4 and 6, the NF4 codes decoded into [W | B]; the input is float32, as
// RMSNorm's output under autocast), layer (0 o_proj: h→h,
// 1 gate_proj: h→inter, 2 down_proj: inter→h), rank, tokens, graph (1: replayed as a CUDA graph).
// "ops" counts the outermost ATen calls of one step (OpCounter), each a host-side cost on CUDA.
// BM_LoraLinearDropout: the same with LoRA dropout 0.1 (ATen's dropout kernel on the fused ATen
// path; inside the row kernels, with the mask redrawn in the backward pass, in modes 5 and 6).
void lora_linear(benchmark::State& state, double dropout, const char* name) {
  // Device 2: the CPU under bf16 autocast, the CUDA path's operations at the CPU's widths (for "ops").
  const at::Device device = state.range(0) == 1 ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const bool autocast_on = state.range(0) > 0;
  if (device.is_cuda() && !at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t hidden = device.is_cuda() ? 4096 : 256, inter = device.is_cuda() ? 14336 : 688;
  const char* targets[] = {"self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"};
  const int which = static_cast<int>(state.range(2));
  LoraBench b(hidden, inter, targets[which], state.range(3), static_cast<int>(state.range(1)), device, autocast_on,
              dropout);
  const int64_t in = which == 2 ? inter : hidden, out = which == 1 ? inter : hidden, tokens = state.range(4);
  const at::Tensor x = at::randn({tokens, in}, at::TensorOptions().device(device)).requires_grad_();
  const at::Tensor dy = at::randn({tokens, out}, at::TensorOptions().device(device).dtype(autocast_on ? at::kBFloat16 : at::kFloat));
  std::function<void()> step = [&] {
    at::Tensor y;
    {
      ft::util::AutocastScope autocast(autocast_on, device.type());
      y = b.layer->forward(x);
    }
    torch::autograd::backward({y}, {dy.to(y.scalar_type())});
  };
  for (int i = 0; i < 3; ++i) step();
  sync(device);
  {
    OpCounter counter;
    step();
    state.counters["ops"] = static_cast<double>(counter.ops());
  }
#ifdef LIBFT_WITH_CUDA_KERNELS
  // Graph 1: the step replayed as a CUDA graph (the gradients of x, A and B accumulate in place at
  // every replay, as they do eagerly): the layer's GPU time without the host's per-operation cost.
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  if (state.range(5) == 1) {
    try {
      graph = capture_graph(step);
    } catch (const std::exception& e) {
      return state.SkipWithError((std::string("CUDA graph capture failed: ") + e.what()).substr(0, 400).c_str());
    }
    step = [&] { graph->replay(); };
  }
#endif
  if (profile_step(row_name(name, state, 6), step, device)) return state.SkipWithError("traced only (LIBFT_BENCH_PROFILE_ONLY)");
  for (auto _ : state) {
    step();
    sync(device);
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
}
FT_GUARDED_BENCHMARK(BM_LoraLinear) { lora_linear(state, 0.0, "BM_LoraLinear"); }
FT_GUARDED_BENCHMARK(BM_LoraLinearDropout) { lora_linear(state, 0.1, "BM_LoraLinearDropout"); }
BENCHMARK(BM_LoraLinear)->ArgsProduct({{0}, {0, 1, 2}, {0, 1, 2}, {8}, {512}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_LoraLinear)->ArgsProduct({{2}, {0, 1, 2, 3, 4}, {0}, {16}, {512}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime();
// The CUDA rows a layer and token count at a time, all modes together (a run cut short by a time
// limit keeps whole comparisons), in the order of the targets: o_proj, gate_proj, down_proj.
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {0}, {16}, {2048}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {0}, {16}, {8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {1}, {16}, {2048}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {1}, {16}, {8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {2}, {16}, {2048}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {2}, {16}, {8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
#ifdef LIBFT_WITH_CUDA_KERNELS
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {0, 1, 2, 3, 4, 5, 6}, {0, 1, 2}, {16}, {2048}, {1}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
#endif
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {1, 2, 4, 5, 6}, {2}, {8}, {8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {1, 2, 4}, {2}, {64}, {8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
// QLoRA through the extended GEMM (modes 7 and 8), beside LoRA's extended rows (4 and 6) of the same
// shapes: issue 7's QLoRA target (<= 1.15x the bf16 LoRA linear at T >= 4096) once the extended
// GEMM is the default. The CPU row gives the path's operation count.
BENCHMARK(BM_LoraLinear)->ArgsProduct({{1}, {7, 8}, {0, 1, 2}, {16}, {2048, 8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);
BENCHMARK(BM_LoraLinear)->ArgsProduct({{2}, {7}, {0}, {16}, {512}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime();
// Dropout 0.1: o_proj, the LoRA modes (not the bare layer, which has no dropout; not QLoRA).
BENCHMARK(BM_LoraLinearDropout)->ArgsProduct({{2}, {2, 4}, {0}, {16}, {512}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_LoraLinearDropout)->ArgsProduct({{1}, {1, 2, 4, 5, 6}, {0}, {16}, {2048, 8192}, {0}})->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations);

// The operations of one LoRA linear's forward and backward on CUDA, one at a time (bf16, in the order
// and with the shapes that the fused path issues them; x: (T, in), W: (out, in), A: (r, in),
// B: (out, r)), to see where a LoRA layer's time over the bare layer goes. Arguments: operation (see
// kLoraOps), layer (0 o_proj 4096→4096, 1 gate_proj 4096→14336), rank, tokens. Each iteration issues
// the operation 10 times and synchronizes once; "per_op" is the time of one.
const char* const kLoraOps[] = {"x W^T (base forward)", "dy W (base input grad)", "S = x A^T", "Y = s S B^T",
                                "Y += x W^T (beta 1)", "dS = s dy B", "dB = dy^T S", "dA = dS^T x",
                                "dXl = dS A", "dXl += dy W (beta 1)", "x to bf16 (from f32)", "dx to f32",
                                "dropout(x), p 0.1", "Y = [x|sS] [W|B]^T (extended, K = in + r)",
                                "S = x A^T into [x|sS] (strided)", "x to bf16 into [x|sS] (strided)",
                                "dXl += dy W, W strided in [W|B] (beta 1)",
                                "[dy W | dy B] = dy [W|B] (extended, N = in + r)",
                                "dx += s (dy B) A, dx strided in [dx|dyB] (beta 1)",
                                "row kernel: x f32 -> [x|sS] bf16 with S = x A^T (one pass)",
                                "row kernel: dx f32 = [dy W|dy B] bf16 -> dyW + s (dy B) A (one pass)",
                                "dB = dy^T S, float32 out (the fused path's GEMM)",
                                "dB = dy^T S, split-K 4 (lora.grad_splits)", "dB = dy^T S, split-K 8",
                                "dA = dS^T x, float32 out (the fused path's GEMM)",
                                "dA = dS^T x, split-K 4 (lora.grad_splits)", "dA = dS^T x, split-K 8",
                                "row kernel, dropout 0.1: x f32 -> [x|sS] with S = drop(x) A^T",
                                "row kernel, dropout 0.1: dx f32 = dyW + drop'(s (dy B) A)",
                                "row kernel, dropout 0.1: drop(x) again for dA"};
FT_GUARDED_BENCHMARK(BM_LoraOp) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int op = static_cast<int>(state.range(0));
  const int64_t in = 4096, out = state.range(1) == 0 ? 4096 : 14336, r = state.range(2), T = state.range(3);
  const auto bf = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const at::Tensor x = at::randn({T, in}, bf), w = at::randn({out, in}, bf) * 0.02, a = at::randn({r, in}, bf) * 0.02;
  const at::Tensor b = at::randn({out, r}, bf) * 0.02, dy = at::randn({T, out}, bf), s_low = at::randn({T, r}, bf);
  const at::Tensor ds = at::randn({T, r}, bf), x32 = x.to(at::kFloat);
  // The extended GEMM's operands (adapt::set_lora_extended_gemm): [x | s S] (T, in + r), [W | B] (out, in + r).
  const at::Tensor xs = at::randn({T, in + r}, bf), ws = at::randn({out, in + r}, bf) * 0.02;
  at::Tensor y = at::empty({T, out}, bf), dx = at::empty({T, in}, bf);
  at::Tensor drawn;  // the row kernels' dropout draws (ops 28, 29)
#ifdef LIBFT_WITH_CUDA_KERNELS
  if (op >= 28) drawn = ft::kernels::lora_cast_down(x32, a, 2.0, xs.narrow(1, 0, in), xs.narrow(1, in, r), 0.1);
#endif
  double flops = 0, bytes = 0;
  auto run = [&] {
    switch (op) {
      case 0: at::mm_out(y, x, w.t()); flops = 2.0 * T * in * out; break;
      case 1: at::mm_out(dx, dy, w); flops = 2.0 * T * in * out; break;
      case 2: (void)at::mm(x, a.t()); flops = 2.0 * T * in * r; break;
      case 3: at::mm_out(y, s_low, b.t()); flops = 2.0 * T * r * out; break;  // s is in s_low (T, r)
      case 4: y.addmm_(x, w.t()); flops = 2.0 * T * in * out; break;
      case 5: (void)at::mm(dy, b).mul_(2.0); flops = 2.0 * T * r * out; break;
      case 6: (void)at::mm(dy.t(), s_low); flops = 2.0 * T * r * out; break;
      case 7: (void)at::mm(ds.t(), x); flops = 2.0 * T * r * in; break;
      case 8: at::mm_out(dx, ds, a); flops = 2.0 * T * r * in; break;
      case 9: dx.addmm_(dy, w); flops = 2.0 * T * in * out; break;
      case 10: (void)x32.to(at::kBFloat16); break;
      case 11: (void)dx.to(at::kFloat); break;
      case 12: (void)at::native_dropout(x, 0.1, true); break;
      case 13: at::mm_out(y, xs, ws.t()); flops = 2.0 * T * (in + r) * out; break;
      case 14: {
        at::Tensor into = xs.narrow(1, in, r);
        at::mm_out(into, xs.narrow(1, 0, in), a.t());
        flops = 2.0 * T * in * r;
        break;
      }
      case 15: xs.narrow(1, 0, in).copy_(x32); break;
      case 16: dx.addmm_(dy, ws.narrow(1, 0, in)); flops = 2.0 * T * in * out; break;
      case 17: (void)at::mm(dy, ws); flops = 2.0 * T * out * (in + r); break;
      case 18: {
        at::Tensor base = xs.narrow(1, 0, in);  // (T, in) with the extended row stride, as dx is
        base.addmm_(xs.narrow(1, in, r), a, 1.0, 2.0);
        flops = 2.0 * T * r * in;
        break;
      }
#ifdef LIBFT_WITH_CUDA_KERNELS
      case 19:  // ft/kernels/lora_rows.h, as the extended path calls them
        ft::kernels::lora_cast_down(x32, a, 2.0, xs.narrow(1, 0, in), xs.narrow(1, in, r));
        bytes = T * in * 6.0 + T * r * 2.0;
        break;
      case 20:
        (void)ft::kernels::lora_up_add(xs.narrow(1, 0, in), xs.narrow(1, in, r), a, 2.0);
        bytes = T * in * 6.0 + T * r * 2.0;
        break;
      case 27:
        (void)ft::kernels::lora_cast_down(x32, a, 2.0, xs.narrow(1, 0, in), xs.narrow(1, in, r), 0.1);
        bytes = T * in * 6.0 + T * r * 2.0;
        break;
      case 28:
        (void)ft::kernels::lora_up_add(xs.narrow(1, 0, in), xs.narrow(1, in, r), a, 2.0, 0.1, drawn);
        bytes = T * in * 6.0 + T * r * 2.0;
        break;
      case 29:
        (void)ft::kernels::lora_dropout_rows(xs.narrow(1, 0, in), 0.1, drawn);
        bytes = T * in * 4.0;
        break;
#endif
      // The adapter gradients as the fused backward pass computes them (adapt::adapter_grad_mm):
      // one GEMM with a float32 result, or split-K over 4 or 8 token chunks.
      case 21: case 22: case 23:
        (void)adapt::adapter_grad_mm(dy.t(), s_low, at::kFloat, 1.0, op == 21 ? 1 : op == 22 ? 4 : 8);
        flops = 2.0 * T * r * out;
        bytes = 2.0 * T * (out + r);
        break;
      case 24: case 25: case 26:
        (void)adapt::adapter_grad_mm(ds.t(), x, at::kFloat, 1.0, op == 24 ? 1 : op == 25 ? 4 : 8);
        flops = 2.0 * T * r * in;
        bytes = 2.0 * T * (in + r);
        break;
    }
  };
  for (int i = 0; i < 3; ++i) run();
  sync(at::kCUDA);
  for (auto _ : state) {
    for (int i = 0; i < 10; ++i) run();
    sync(at::kCUDA);
  }
  state.SetLabel(kLoraOps[op]);
  state.counters["per_op"] = benchmark::Counter(10, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  if (flops > 0) state.counters["TFLOP/s"] = benchmark::Counter(10 * flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  if (bytes > 0) state.counters["GB/s"] = benchmark::Counter(10 * bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_LoraOp)->ArgsProduct({benchmark::CreateDenseRange(0, 20, 1), {0, 1}, {16}, {2048, 8192}})
    ->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations / 2);
BENCHMARK(BM_LoraOp)->ArgsProduct({benchmark::CreateDenseRange(21, 29, 1), {0, 1}, {16}, {2048, 8192}})
    ->Unit(benchmark::kMicrosecond)->UseRealTime()->Iterations(kCudaIterations / 2);

#ifdef LIBFT_WITH_CUDA_KERNELS
// The output head's loss, forward and backward, on bf16 logits (as the head gives them under
// autocast): ATen's cross-entropy on the logits cast to float32 (impl 0: the trainer without
// fused_loss) against the fused kernels (impl 1, model::cross_entropy_sum). Arguments: impl, rows,
// vocabulary. "GB/s": the fused path's minimum traffic (2 bytes per logit read forward, 2 read and
// 2 written backward) over the time, for both rows; "peak_GiB": the caching allocator's peak above
// the logits during a step.
FT_GUARDED_BENCHMARK(BM_CrossEntropyCuda) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const bool fused = state.range(0) == 1;
  const int64_t N = state.range(1), V = state.range(2);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor logits = (at::randn({N, V}, cuda) * 3).to(at::kBFloat16).requires_grad_();
  const at::Tensor targets = at::randint(0, V, {N}, cuda.dtype(at::kLong));
  auto step = [&] {
    const at::Tensor loss = ft::model::cross_entropy_sum(logits, targets, -100, fused);
    (void)torch::autograd::grad({loss}, {logits});
  };
  for (int i = 0; i < 2; ++i) step();
  sync(at::kCUDA);
  if (profile_step(row_name("BM_CrossEntropyCuda", state, 3), step, at::kCUDA)) return state.SkipWithError("traced only (LIBFT_BENCH_PROFILE_ONLY)");
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  const auto base = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device()).allocated_bytes[0].current;
  for (auto _ : state) {
    step();
    sync(at::kCUDA);
  }
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  state.counters["peak_GiB"] = static_cast<double>(stats.allocated_bytes[0].peak - base) / (1024.0 * 1024.0 * 1024.0);
  state.counters["GB/s"] = benchmark::Counter(6.0 * static_cast<double>(N * V) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_CrossEntropyCuda)->ArgsProduct({{0, 1}, {2048, 8192}, {128256}})->Unit(benchmark::kMicrosecond)->UseRealTime();

// The rotary embedding of one layer's queries and keys, forward and backward, on bf16 projections
// with float32 tables (as under autocast): the model's unfused formula (impl 0) against the fused
// kernel (impl 1, model::CausalLMImpl::set_fused_rope). The Llama-3.2-1B shape: 32 query and 8 key
// heads of 64 at 2048 tokens per row. Arguments: impl, rows. "GB/s": the fused path's minimum
// traffic (2 bytes read and 2 written per element each way) over the time, for both rows.
FT_GUARDED_BENCHMARK(BM_RopeCuda) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const bool fused = state.range(0) == 1;
  const int64_t B = state.range(1), T = 2048, D = 64;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor q = at::randn({B, T, 32, D}, cuda).to(at::kBFloat16).transpose(1, 2).requires_grad_();
  const at::Tensor k = at::randn({B, T, 8, D}, cuda).to(at::kBFloat16).transpose(1, 2).requires_grad_();
  const at::Tensor freqs = at::arange(T, cuda.dtype(at::kFloat)).unsqueeze(-1) *
                           (1.0 / at::pow(500000.0, at::arange(0, D, 2, cuda.dtype(at::kFloat)) / static_cast<double>(D)));
  const at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(0).expand({B, T, D}).contiguous();
  const at::Tensor cos = emb.cos().unsqueeze(1), sin = emb.sin().unsqueeze(1);
  const at::Tensor dq = at::randn(q.sizes(), cuda).to(at::kBFloat16), dk = at::randn(k.sizes(), cuda).to(at::kBFloat16);
  auto rotate_half = [](const at::Tensor& x) {
    const int64_t h = x.size(-1) / 2;
    return at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
  };
  auto step = [&] {
    at::Tensor qr, kr;
    if (fused) {
      qr = ft::kernels::rope_forward(q.detach(), cos, sin);
      kr = ft::kernels::rope_forward(k.detach(), cos, sin);
      (void)ft::kernels::rope_backward(dq, cos, sin, at::kBFloat16, q.strides());
      (void)ft::kernels::rope_backward(dk, cos, sin, at::kBFloat16, k.strides());
    } else {
      // As attention consumes them: the float32 result cast to bf16 (SDPA's autocast cast).
      qr = (q * cos + rotate_half(q) * sin).to(at::kBFloat16);
      kr = (k * cos + rotate_half(k) * sin).to(at::kBFloat16);
      (void)torch::autograd::grad({qr, kr}, {q, k}, {dq, dk});
    }
  };
  for (int i = 0; i < 2; ++i) step();
  sync(at::kCUDA);
  for (auto _ : state) {
    step();
    sync(at::kCUDA);
  }
  state.counters["GB/s"] = benchmark::Counter(8.0 * static_cast<double>(q.numel() + k.numel()) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_RopeCuda)->ArgsProduct({{0, 1}, {1, 4}})->Unit(benchmark::kMicrosecond)->UseRealTime();

// SwiGLU of one MLP, forward and backward, bf16 (the Llama-3.2-1B width, 8192): at::silu(g) * u
// through autograd (impl 0) against the fused kernel (impl 1, model::CausalLMImpl::set_fused_swiglu);
// then the halves of one packed [gate | up] (grouped projections' output, model::swiglu_packed)
// through ATen's chain (impl 2) and through the kernel in place (impl 3). Arguments: impl, tokens.
// "GB/s": the fused path's minimum traffic (16 bytes per element: 6 forward, 10 backward) over the
// time, for every row.
FT_GUARDED_BENCHMARK(BM_SwigluCuda) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const int64_t impl = state.range(0);
  const auto bf = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  const int64_t tokens = state.range(1), width = 8192;
  const at::Tensor g = at::randn({tokens, width}, bf).requires_grad_(), u = at::randn({tokens, width}, bf).requires_grad_();
  const at::Tensor gu = at::randn({tokens, 2 * width}, bf).requires_grad_();
  const at::Tensor dh = at::randn({tokens, width}, bf);
  auto step = [&] {
    if (impl == 1) {
      (void)ft::kernels::swiglu_forward(g.detach(), u.detach());
      (void)ft::kernels::swiglu_backward(dh, g.detach(), u.detach());
    } else if (impl >= 2) {
      (void)torch::autograd::grad({model::swiglu_packed(gu, /*fused_kernel=*/impl == 3)}, {gu}, {dh});
    } else {
      (void)torch::autograd::grad({at::silu(g) * u}, {g, u}, {dh});
    }
  };
  for (int i = 0; i < 2; ++i) step();
  sync(at::kCUDA);
  for (auto _ : state) {
    step();
    sync(at::kCUDA);
  }
  state.counters["GB/s"] = benchmark::Counter(16.0 * static_cast<double>(tokens * width) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SwigluCuda)->ArgsProduct({{0, 1, 2, 3}, {2048, 8192}})->Unit(benchmark::kMicrosecond)->UseRealTime();
#endif

// Arguments: fused (0/1), dropout in percent, DoRA (0/1), grouped projections (0/1,
// adapt::set_lora_group_projections: q/k/v and gate/up as one node each where none has dropout).
void BM_LoraStep(benchmark::State& state) {
  const io::ModelConfig c = llama_config(4096, 256, 688, 4, 8, 4, 32);  // configs/models/tiny-llama.json
  model::CausalLM m(c);
  model::init_weights(m, 0);
  adapt::LoraOptions o;
  o.targets = {"all-linear"};
  o.dropout = static_cast<double>(state.range(1)) / 100.0;
  o.dora = state.range(2) == 1;
  adapt::apply_lora(m, o);
  adapt::set_lora_fused(m, state.range(0) == 1);
  adapt::set_lora_group_projections(m, state.range(3) == 1);
  m->train();
  const at::Tensor ids = at::randint(0, c.vocab_size, {4, 128}, at::kLong);
  auto step = [&] {
    const at::Tensor logits = m->forward(ids);
    at::cross_entropy_loss(logits.view({-1, c.vocab_size}), ids.view({-1})).backward();
  };
  for (int i = 0; i < 2; ++i) step();
  {
    OpCounter ops;  // the outermost ATen calls of one step (each a launch or more on CUDA)
    step();
    state.counters["ops"] = static_cast<double>(ops.ops());
  }
  for (auto _ : state) step();
  state.counters["tokens/s"] = benchmark::Counter(512.0, benchmark::Counter::kIsIterationInvariantRate);
}
#ifdef LIBFT_WITH_CUDA_KERNELS
// BM_LoraStepCuda's model: Llama-3.2-1B-shaped (hidden 2048, 16 layers, MLP 8192, 32 heads, 8
// key/value heads, vocabulary 128256, tied embeddings; 1.24B parameters), LoRA r 16 (alpha 32) on
// every linear layer, the frozen base stored in bf16 as the trainer stores it under bf16 autocast.
// Built once for all rows (building and initialising it on the CPU takes longer than a row's
// measurement) and never destroyed (CUDA may be shut down before static destructors run).
model::CausalLM& lora_step_model() {
  static auto* m = [] {
    auto* built = new model::CausalLM(llama_config(128256, 2048, 8192, 16, 32, 8, 64));
    // init_weights' distribution (normal, std 0.02; norms 1), drawn on the GPU: on the CPU it took
    // 15-20 s of the GPU check per process.
    (*built)->to(at::Device(at::kCUDA));
    {
      at::NoGradGuard no_grad;
      for (const auto& item : (*built)->named_parameters()) {
        if (!item.key().ends_with("norm.weight")) item.value().normal_(0.0, 0.02);
      }
    }
    adapt::LoraOptions o;
    o.targets = {"all-linear"};
    o.r = 16;
    o.alpha = 32;
    adapt::apply_lora(*built, o);
    (*built)->to(at::Device(at::kCUDA));
    adapt::store_frozen_linears(*built, at::kBFloat16);
    (*built)->train();
    return built;
  }();
  return *m;
}

// A LoRA training step of that model on CUDA in bf16 autocast: `batch` sequences of 2048 tokens, no
// dropout, through the trainer's own functions: train::accumulate_gradients (forward, summed token
// loss, backward), or train::GraphedPasses for a graph row, then train::optimizer_step (the
// non-finite check, ATen's fused AdamW) on the adapters. Arguments: fused (0 unfused, 1 fused, 2 fused
// with the extended GEMM where it applies: q, k, v, gate and up, whose input is RMSNorm's float32
// output; 3 and 4: 1 and 2 with the row kernels, adapt::set_lora_row_kernels; 5: 4 with the adapter
// gradients split over 4 token chunks, adapt::set_lora_grad_splits; 6: 1 without the model's shared
// input cast, CausalLMImpl::set_shared_input_cast; 7: 1 and 8: 4 with q/k/v and gate/up grouped,
// adapt::set_lora_group_projections), batch, graph (1: cuda_graphs: true, the forward and backward pass captured once and
// replayed: no per-operation host cost), loss chunk (token rows through the output head at a time,
// loss_chunk; 0: the whole (B·T, 128256) logits), fused model kernels (1: kernels.loss, .rope and
// .swiglu). "peak_GiB": the caching allocator's peak during
// the measured steps. MFU counts 4N + 12·L·d·T FLOPs per token (frozen base: forward 2N,
// input gradients 2N, attention 12·L·d·T; no recomputation) against the H100 SXM's 989 TFLOP/s
// dense bf16.
FT_GUARDED_BENCHMARK(BM_LoraStepCuda) {
  if (!at::hasCUDA()) return state.SkipWithError("no CUDA device");
  const at::Device device(at::kCUDA);
  const bool graphed = state.range(2) == 1;
  const int64_t batch = state.range(1), T = 2048;
  model::CausalLM& m = lora_step_model();
  // The blocks that earlier rows cached (on other streams: each graph row warms up on a pool stream)
  // go back to the device first, so that a capture cannot run out of memory on account of them
  // (the caching allocator does not free cached blocks while a capture is under way).
  c10::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  const io::ModelConfig& c = m->config();
  const int64_t kind = state.range(0);
  adapt::set_lora_fused(m, kind >= 1);
  adapt::set_lora_extended_gemm(m, kind == 2 || kind == 4 || kind == 5 || kind == 8);
  adapt::set_lora_row_kernels(m, (kind >= 3 && kind <= 5) || kind == 8);
  adapt::set_lora_grad_splits(m, kind == 5 ? 4 : 1);
  adapt::set_lora_group_projections(m, kind >= 7);
  m->set_shared_input_cast(kind != 6);
  m->set_loss_chunk(state.range(3));
  m->set_fused_loss(state.range(4) == 1);
  m->set_fused_rope(state.range(4) == 1);
  m->set_fused_swiglu(state.range(4) == 1);
  struct ResetLoss {
    model::CausalLM& m;
    ~ResetLoss() {
      m->set_loss_chunk(0);
      m->set_fused_loss(false);
      m->set_fused_rope(false);
      m->set_fused_swiglu(false);
    }
  } reset_loss{m};
  double n_params = 0;
  for (const auto& p : m->parameters()) n_params += static_cast<double>(p.numel());
  train::OptimizerOptions oo;
  oo.lr = 1e-4;
  const auto opt = train::make_optimizer(m, oo);  // the trainer's: ATen's fused AdamW per parameter group
  train::StepCounters counters;
  // One micro-batch of `batch` single-document rows, counted on the host as to_tensors() counts
  // them: no mask, default positions, causal attention.
  train::BatchTensors b;
  b.input_ids = at::randint(0, c.vocab_size, {batch, T}, at::TensorOptions().dtype(at::kLong).device(device));
  b.labels = b.input_ids;
  b.n_targets = batch * (T - 1);
  b.n_tokens = batch * T;
  // The trainer's step: accumulate_gradients (eager) or train::GraphedPasses (cuda_graphs: true),
  // then optimizer_step (the loss read once, the gradient norm checked, the update).
  std::unique_ptr<train::GraphedPasses> graphs;
  train::StepOptions so;
  if (graphed) {
    graphs = std::make_unique<train::GraphedPasses>(m, device);
    so.zero_in_place = true;
  }
  ft::util::AutocastScope autocast(true);  // the whole loop, as in the trainer
  const std::function<void()> step = [&] {
    const train::AccumulateResult r = graphs ? graphs->accumulate({b}) : train::accumulate_gradients(m, {b});
    train::optimizer_step(*opt, r.loss, oo.lr, so, counters);
  };
  try {
    step();  // a graph row captures here
  } catch (const std::exception& e) {
    return state.SkipWithError((std::string("first step failed: ") + e.what()).substr(0, 400).c_str());
  }
  for (int i = 0; i < 3; ++i) step();
  sync(device);
  if (profile_step(row_name("BM_LoraStepCuda", state, 5), step, device)) return state.SkipWithError("traced only (LIBFT_BENCH_PROFILE_ONLY)");
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  for (auto _ : state) {
    step();
    sync(device);
  }
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  state.counters["peak_GiB"] = static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024.0 * 1024.0);
  const double tokens = static_cast<double>(batch * T);
  const double flops_per_token = 4.0 * n_params + 12.0 * c.num_hidden_layers * c.hidden_size * T;
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["MFU%"] = benchmark::Counter(100.0 * flops_per_token * tokens / 989e12, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_LoraStepCuda)->ArgsProduct({{0, 1, 2, 3, 4}, {1, 4}, {0}, {0}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->Args({1, 4, 0, 1024, 0})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->ArgsProduct({{1, 2, 3, 4}, {1, 4}, {1}, {0}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->ArgsProduct({{1, 4}, {4}, {0, 1}, {0}, {1}})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->Args({5, 4, 0, 0, 1})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->Args({6, 4, 0, 0, 0})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->Args({7, 4, 0, 0, 0})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
BENCHMARK(BM_LoraStepCuda)->ArgsProduct({{8}, {4}, {0}, {0}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(kStepIterations);
#endif

BENCHMARK(BM_LoraStep)->ArgsProduct({{0, 1}, {0, 5}, {0}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_LoraStep)->ArgsProduct({{0, 1}, {5}, {1}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_LoraStep)->ArgsProduct({{1}, {0, 5}, {0}, {1}})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

}  // namespace

BENCHMARK_MAIN();
