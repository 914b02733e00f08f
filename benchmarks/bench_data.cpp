// Data pipeline throughput: token store writing, opening (checksum verification), and packed
// batches of 8 × 1024 read through the Batcher. Torch-free (links ft_data only).
//
// The setup writes one store of ~10M tokens (documents of 16–4096 tokens, log-uniform lengths;
// token ids drawn log-uniformly from a 32000-token vocabulary, a rough stand-in for the skew of
// real text; the first third of each document not trainable, like an instruction prompt) into
// $LIBFT_BENCH_TMP (default: the system temp directory) and deletes it at exit.
//
//   bench_data --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "ft/data/batcher.h"
#include "ft/data/token_store.h"

namespace {

namespace fs = std::filesystem;
using namespace ft::data;

constexpr int64_t kTargetTokens = 10'000'000;
constexpr int32_t kVocab = 32000;
constexpr const char* kFingerprint = "bench-tokenizer";

struct Fixture {
  fs::path dir;
  std::string path;
  double write_seconds = 0;
  TokenStoreInfo info;

  Fixture() {
    const char* env = std::getenv("LIBFT_BENCH_TMP");
    dir = (env && *env ? fs::path(env) : fs::temp_directory_path()) /
          ("libft_bench_data." + std::to_string(::getpid()));
    fs::create_directories(dir);
    path = (dir / "bench.h5").string();
    const auto t0 = std::chrono::steady_clock::now();
    info = write(path, kTargetTokens, 1);
    write_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "[bench_data] wrote %lld tokens in %lld documents (%.1f MB, %.2f bytes/token) in %.2f s\n",
                 static_cast<long long>(info.n_tokens), static_cast<long long>(info.n_docs),
                 static_cast<double>(fs::file_size(path)) / 1e6,
                 static_cast<double>(fs::file_size(path)) / static_cast<double>(info.n_tokens), write_seconds);
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  static TokenStoreInfo write(const std::string& path, int64_t target_tokens, uint32_t seed) {
    TokenStoreWriteOptions o;
    o.tokenizer_fingerprint = kFingerprint;
    o.vocab_size = kVocab;
    TokenStoreWriter w(path, o);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    Example e;
    int64_t total = 0;
    while (total < target_tokens) {
      const auto len = static_cast<int64_t>(std::exp(std::log(16.0) + u(rng) * (std::log(4096.0) - std::log(16.0))));
      e.tokens.resize(static_cast<size_t>(len));
      e.trainable.resize(static_cast<size_t>(len));
      for (int64_t i = 0; i < len; ++i) {
        e.tokens[static_cast<size_t>(i)] = static_cast<int32_t>(std::exp(u(rng) * std::log(double(kVocab)))) - 1;
        e.trainable[static_cast<size_t>(i)] = i >= len / 3;
      }
      w.append(e);
      total += len;
    }
    return w.finish();
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

/// Packed 8 × 1024 batches; arg 0: shuffle, arg 1: chunk cache MiB.
void BM_PackedBatches(benchmark::State& state) {
  const bool shuffle = state.range(0) != 0;
  TokenStoreReadOptions ro;
  ro.cache_bytes = static_cast<size_t>(state.range(1)) << 20;
  auto store = TokenStoreReader::open(fixture().path, kFingerprint, ro);
  BatcherOptions o;
  o.seq_len = 1024;
  o.batch_size = 8;
  o.shuffle = shuffle;
  Batcher b({{store}}, o);
  int64_t tokens = 0;
  for (auto _ : state) {
    auto batch = b.next();
    benchmark::DoNotOptimize(batch->input_ids.data());
    tokens += batch->rows * batch->cols;
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["epochs"] = static_cast<double>(b.state().streams[0].epoch) +
                             static_cast<double>(b.state().streams[0].cursor) / static_cast<double>(b.rows_in_epoch(0));
}
BENCHMARK(BM_PackedBatches)
    ->ArgNames({"shuffle", "cacheMiB"})
    ->Args({1, 128})  // default cache: the decoded store fits, after the first touch of each chunk
    ->Args({0, 128})  // store order: each chunk inflated once per epoch
    ->Args({1, 4})    // a cache far smaller than the store: random documents inflate their chunks again
    ->MinTime(2.0)
    ->Unit(benchmark::kMicrosecond);

/// The first ~1200 batches (≈ one epoch of the 10M tokens) of a fresh reader: every chunk is
/// inflated on first touch (the OS page cache is warm: the file was just written).
BENCHMARK(BM_PackedBatches)
    ->Name("BM_PackedBatchesFirstEpoch")
    ->ArgNames({"shuffle", "cacheMiB"})
    ->Args({1, 128})
    ->Iterations(1200)
    ->Unit(benchmark::kMicrosecond);

/// Four ranks reading their shares of the same global batches (each rank plans every row).
void BM_PackedBatchesRank(benchmark::State& state) {
  auto store = TokenStoreReader::open(fixture().path, kFingerprint);
  BatcherOptions o;
  o.seq_len = 1024;
  o.batch_size = 8;
  o.world = 4;
  o.rank = 1;
  Batcher b({{store}}, o);
  int64_t tokens = 0;
  for (auto _ : state) {
    auto batch = b.next();
    benchmark::DoNotOptimize(batch->input_ids.data());
    tokens += batch->rows * batch->cols;
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PackedBatchesRank)->MinTime(1.0)->Unit(benchmark::kMicrosecond);

/// Opening = SHA-256 of the whole file + HDF5 open + doc_offsets.
void BM_OpenVerify(benchmark::State& state) {
  const auto bytes = static_cast<double>(fs::file_size(fixture().path));
  for (auto _ : state) benchmark::DoNotOptimize(TokenStoreReader::open(fixture().path, kFingerprint));
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_OpenVerify)->Unit(benchmark::kMillisecond)->MinTime(1.0);

/// Writing (generation of the random documents included), from the setup's one run.
void BM_WriteStore(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(fixture().info.n_tokens);
  state.counters["tokens/s"] = static_cast<double>(fixture().info.n_tokens) / fixture().write_seconds;
  state.counters["write_s"] = fixture().write_seconds;
}
BENCHMARK(BM_WriteStore)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
