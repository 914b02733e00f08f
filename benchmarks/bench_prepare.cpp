// ft prepare's throughput against raw sentencepiece encoding of the same text, side by side.
//
//   build/benchmarks/bench_prepare --benchmark_repetitions=10 --benchmark_enable_random_interleaving=true
//
// Random interleaving runs the repetitions of the benchmarks in a shuffled order, so that a slow
// moment of a shared machine lands on both sides instead of on whichever ran then (the overhead is
// a difference of two 300 ms figures, and that noise was ±3%).
//
// Text: the fortune files that Debian's fortunes package ships (2.6 MB, ~15k documents).
//   BM_RawEncode/N: Tokenizer::encode on each document, already split and in memory, on N threads
//                   (the floor).
//   BM_Prepare/N:   the whole pipeline with N tokenizer threads: read + split + UTF-8 checks on the
//                   calling thread, tokenize on N, HDF5 store + SHA-256 on the calling thread.
// Both count MB/s of input text; BM_Prepare/2 against BM_RawEncode/2 is the pipeline's overhead
// when it uses both cores.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "ft/data/prepare.h"
#include "ft/data/tokenizer.h"

namespace fs = std::filesystem;

namespace {

struct Corpus {
  std::vector<std::string> files;
  std::vector<std::string> documents;
  int64_t bytes = 0;
  fs::path dir;
  std::unique_ptr<ft::data::Tokenizer> tokenizer;
};

Corpus& corpus() {
  static Corpus c = [] {
    Corpus c;
    const char* env = std::getenv("LIBFT_FORTUNES");
    const fs::path dir = env && *env ? env : "/usr/share/games/fortunes";
    if (!fs::is_directory(dir)) return c;
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.is_regular_file() && !e.path().has_extension()) c.files.push_back(e.path().string());
    }
    std::sort(c.files.begin(), c.files.end());
    for (const auto& f : c.files) {
      std::ifstream in(f);
      std::string line, doc;
      c.bytes += static_cast<int64_t>(fs::file_size(f));
      while (std::getline(in, line)) {
        if (line == "%") {
          if (!doc.empty()) c.documents.push_back(doc);
          doc.clear();
        } else {
          doc += doc.empty() ? line : "\n" + line;
        }
      }
      if (!doc.empty()) c.documents.push_back(doc);
    }
    c.dir = fs::temp_directory_path() / ("libft_bench_prepare_" + std::to_string(::getpid()));
    fs::create_directories(c.dir);
    ft::data::TrainTokenizerOptions t;
    t.inputs = c.files;
    t.model_prefix = (c.dir / "tokenizer").string();
    t.vocab_size = 4096;
    c.tokenizer = std::make_unique<ft::data::Tokenizer>(ft::data::Tokenizer::load(ft::data::Tokenizer::train(t)));
    return c;
  }();
  return c;
}

// Argument: threads, each encoding an interleaved share of the documents.
void BM_RawEncode(benchmark::State& state) {
  Corpus& c = corpus();
  if (c.files.empty()) return state.SkipWithError("no fortune files (scripts/setup.sh installs them)");
  const auto threads = static_cast<size_t>(state.range(0));
  for (auto _ : state) {
    std::vector<int64_t> tokens(threads, 0);
    auto work = [&](size_t t) {
      for (size_t i = t; i < c.documents.size(); i += threads)
        tokens[t] += static_cast<int64_t>(c.tokenizer->encode(c.documents[i]).size());
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& p : pool) p.join();
    benchmark::DoNotOptimize(tokens);
  }
  state.counters["MB/s"] = benchmark::Counter(c.bytes / 1e6, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_RawEncode)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

// Argument: tokenizer threads.
void BM_Prepare(benchmark::State& state) {
  Corpus& c = corpus();
  if (c.files.empty()) return state.SkipWithError("no fortune files (scripts/setup.sh installs them)");
  ft::data::PrepareOptions o;
  o.inputs = c.files;
  o.output = (c.dir / "store.h5").string();
  o.records.format = ft::data::RecordFormat::text;
  o.records.split = ft::data::TextSplit::separator;
  o.policy.on_error = ft::data::ErrorPolicy::OnError::skip;
  o.policy.max_bad_fraction = 0.01;
  o.progress = nullptr;
  o.tokenize.threads = static_cast<int>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(ft::data::prepare_token_store(o, *c.tokenizer));
  state.counters["MB/s"] = benchmark::Counter(c.bytes / 1e6, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Prepare)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::error_code ec;
  fs::remove_all(corpus().dir, ec);
}
