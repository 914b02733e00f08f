// EWC (ft/train/ewc.h) and replay: the Fisher against finite differences, the penalty's gradients
// against autograd of its formula (full weights and LoRA's scale · B A), files, online
// accumulation, and runs (lambda 0 changes nothing; a large lambda holds the weights; replay mixes
// its store at the ratio and keeps the held-out set to the target stores).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "ft/adapt/lora.h"
#include "ft/data/array_file.h"
#include "ft/data/token_store.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/train/batch.h"
#include "ft/train/ewc.h"
#include "ft/train/run.h"
#include "ft/util/error.h"
#include "test_util.h"
#include "train_util.h"

using namespace ft;
namespace fs = std::filesystem;

namespace {

model::CausalLM tiny_model(uint64_t seed, at::ScalarType dtype = at::kFloat) {
  model::CausalLM m(test::tiny_config());
  model::init_weights(m, seed);
  m->to(dtype);
  return m;
}

data::Batcher row_batcher(const std::string& store, int64_t seq_len) {
  data::BatcherOptions o;
  o.seq_len = seq_len;
  o.batch_size = 1;
  o.max_epochs = 1;
  o.seed = 3;
  return data::Batcher({data::BatcherSource{data::TokenStoreReader::open(store, "synthetic"), 1.0}}, o);
}

double row_loss(model::CausalLM& m, const train::BatchTensors& b) {
  model::ForwardOptions fo;
  fo.position_ids = b.position_ids;
  fo.segment_ids = b.segment_ids;
  fo.attention_mask = b.attention_mask;
  return (train::causal_lm_loss_sum(m->forward(b.input_ids, fo).to(at::kDouble), b.labels) /
          static_cast<double>(b.n_targets))
      .item<double>();
}

using test::error_of;

}  // namespace

// F_i = mean over rows of (∂ℓ/∂θ_i)², checked entry by entry against central differences of each
// row's mean log-likelihood in float64, for entries of every kind of tensor.
TEST(Ewc, FisherMatchesFiniteDifferences) {
  const fs::path dir = test::scratch_dir("ewc_fisher");
  test::write_rule_store((dir / "store.h5").string(), 20, 5, 12);
  model::CausalLM m = tiny_model(2, at::kDouble);
  data::Batcher rows = row_batcher((dir / "store.h5").string(), 16);
  const train::EwcState s = train::estimate_fisher(m, rows, 4);
  EXPECT_EQ(s.samples, 4);
  EXPECT_EQ(s.names.size(), m->named_parameters().size());
  for (const auto& item : m->named_parameters()) EXPECT_FALSE(item.value().grad().defined()) << item.key();

  std::vector<train::BatchTensors> batches;
  data::Batcher again = row_batcher((dir / "store.h5").string(), 16);
  while (batches.size() < 4) batches.push_back(train::to_tensors(*again.next()));
  at::NoGradGuard no_grad;
  m->eval();
  auto params = m->named_parameters();
  const int64_t token = batches[0].input_ids[0][3].item<int64_t>();  // an embedding row the rows use
  const std::vector<std::pair<std::string, int64_t>> entries = {
      {"model.embed_tokens.weight", token * 32 + 5}, {"model.layers.0.self_attn.q_proj.weight", 17},
      {"model.layers.0.self_attn.k_proj.weight", 100}, {"model.layers.1.mlp.down_proj.weight", 333},
      {"model.layers.1.input_layernorm.weight", 7}, {"model.norm.weight", 30}, {"lm_head.weight", 32 * 40 + 2}};
  for (const auto& [name, index] : entries) {
    at::Tensor flat = params[name].view({-1});
    const double h = 1e-5, saved = flat[index].item<double>();
    double fisher = 0.0;
    for (const auto& b : batches) {
      flat[index] = saved + h;
      const double up = row_loss(m, b);
      flat[index] = saved - h;
      const double down = row_loss(m, b);
      flat[index] = saved;
      const double g = (up - down) / (2 * h);
      fisher += g * g / static_cast<double>(batches.size());
    }
    const double got = s.fisher.at(name).view({-1})[index].item<double>();
    EXPECT_GT(fisher, 0.0) << name;
    EXPECT_NEAR(got, fisher, 1e-4 * fisher + 1e-12) << name << "[" << index << "]";
    EXPECT_EQ(s.anchor.at(name).view({-1})[index].item<double>(), static_cast<float>(saved)) << name;
  }
  fs::remove_all(dir);
}

// The penalty's value and the gradients it adds equal autograd of (λ/2) Σ F (θ − θ*)² on full
// weights, and of (λ/2) Σ F_W ⊙ (s B A)² on LoRA's factors.
TEST(Ewc, PenaltyGradientsMatchAutogradOfTheFormula) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const double lambda = 3.5;
  {
    model::CausalLM m = tiny_model(1);
    train::EwcState s;
    for (const auto& item : m->named_parameters()) {
      s.names.push_back(item.key());
      s.fisher[item.key()] = at::empty(item.value().sizes()).uniform_(0.0, 2.0, gen);
      s.anchor[item.key()] = item.value().detach() + at::empty(item.value().sizes()).normal_(0.0, 0.05, gen);
    }
    train::EwcPenalty penalty(m, s, lambda);
    const double value = penalty.apply(true);
    double want = 0.0;
    for (const auto& item : m->named_parameters()) {
      at::Tensor theta = item.value().detach().to(at::kDouble).requires_grad_(true);
      at::Tensor p = 0.5 * lambda * (s.fisher[item.key()].to(at::kDouble) * (theta - s.anchor[item.key()].to(at::kDouble)).pow(2)).sum();
      p.backward();
      want += p.item<double>();
      EXPECT_LE(test::max_rel_error(item.value().grad(), theta.grad()), 1e-5) << item.key();
    }
    EXPECT_NEAR(value, want, 1e-5 * want);
  }
  {
    model::CausalLM m = tiny_model(1);
    train::EwcState s;
    for (const auto& item : m->named_parameters()) {
      s.names.push_back(item.key());
      s.fisher[item.key()] = at::empty(item.value().sizes()).uniform_(0.0, 2.0, gen);
      s.anchor[item.key()] = item.value().detach().clone();
    }
    adapt::LoraOptions o;
    o.targets = {"q_proj", "down_proj"};
    o.rank_pattern = {{"down_proj", 2}};
    const auto layers = adapt::apply_lora(m, o);
    auto params = m->named_parameters();
    {
      at::NoGradGuard no_grad;
      for (const auto& l : layers) params[l.module + ".lora_B.weight"].normal_(0.0, 0.3, gen);
    }
    train::EwcPenalty penalty(m, s, lambda);
    EXPECT_NE(penalty.describe().find("4 LoRA layers"), std::string::npos) << penalty.describe();
    const double value = penalty.apply(true);
    double want = 0.0;
    for (const auto& l : layers) {
      at::Tensor a = params[l.module + ".lora_A.weight"].detach().to(at::kDouble).requires_grad_(true);
      at::Tensor b = params[l.module + ".lora_B.weight"].detach().to(at::kDouble).requires_grad_(true);
      at::Tensor p = 0.5 * lambda * (s.fisher[l.module + ".weight"].to(at::kDouble) * (at::matmul(b, a) * l.scale).pow(2)).sum();
      p.backward();
      want += p.item<double>();
      EXPECT_LE(test::max_rel_error(params[l.module + ".lora_A.weight"].grad(), a.grad()), 1e-5) << l.module;
      EXPECT_LE(test::max_rel_error(params[l.module + ".lora_B.weight"].grad(), b.grad()), 1e-5) << l.module;
    }
    EXPECT_GT(want, 0.0);
    EXPECT_NEAR(value, want, 1e-5 * want);
  }
}

// Files round-trip exactly; online EWC folds γ·F_previous + F_new with the new anchor; a state for
// another model, a damaged file and an unsupported mode are errors that say so.
TEST(Ewc, FilesOnlineAccumulationAndErrors) {
  const fs::path dir = test::scratch_dir("ewc_files");
  test::write_rule_store((dir / "store.h5").string(), 20, 5, 12);
  model::CausalLM m = tiny_model(2);
  data::Batcher rows = row_batcher((dir / "store.h5").string(), 16);
  const train::EwcState s1 = train::estimate_fisher(m, rows, 3);
  train::save_ewc(s1, (dir / "ewc.h5").string());
  const train::EwcState back = train::load_ewc((dir / "ewc.h5").string());
  EXPECT_EQ(back.names, s1.names);
  for (const auto& n : s1.names) {
    EXPECT_TRUE(back.fisher.at(n).equal(s1.fisher.at(n))) << n;
    EXPECT_TRUE(back.anchor.at(n).equal(s1.anchor.at(n))) << n;
  }
  EXPECT_EQ(back.samples, 3);
  EXPECT_EQ(data::inspect_array_file((dir / "ewc.h5").string(), "ewc").attrs.at("tasks"), "1");

  model::CausalLM m2 = tiny_model(9);
  data::Batcher rows2 = row_batcher((dir / "store.h5").string(), 16);
  const train::EwcState s2 = train::estimate_fisher(m2, rows2, 3);
  const train::EwcState online = train::accumulate_online(back, s2, 0.5);
  EXPECT_EQ(online.tasks, 2);
  const std::string w = "model.layers.0.mlp.up_proj.weight";
  EXPECT_TRUE(online.fisher.at(w).allclose(s1.fisher.at(w) * 0.5 + s2.fisher.at(w)));
  EXPECT_TRUE(online.anchor.at(w).equal(s2.anchor.at(w)));

  // Another model (a wider one): every tensor it lacks or has in another shape is named.
  io::ModelConfig wide = test::tiny_config();
  wide.intermediate_size = 64;
  model::CausalLM other(wide);
  const std::string e = error_of([&] { train::EwcPenalty(other, back, 1.0); });
  EXPECT_NE(e.find("'model.layers.0.mlp.up_proj.weight' has shape [48, 32] in the EWC state, [64, 32] in the model"),
            std::string::npos) << e;
  // A LoRA run on another base than the anchor's.
  model::CausalLM lora = tiny_model(9);
  adapt::apply_lora(lora, adapt::LoraOptions{});
  EXPECT_NE(error_of([&] { train::EwcPenalty(lora, back, 1.0); }).find("differs from this run's base weights"),
            std::string::npos);
  // A flipped byte in the middle of the file (the arrays' data): the checksum names the array.
  {
    std::fstream f(dir / "ewc.h5", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    const auto size = static_cast<std::streamoff>(f.tellg());
    for (std::streamoff at = size / 2; at < size / 2 + 64; ++at) {
      f.seekg(at);
      char c = 0;
      f.read(&c, 1);
      f.seekp(at);
      c = static_cast<char>(c ^ 0x5a);
      f.write(&c, 1);
    }
  }
  const std::string damaged = error_of([&] { train::load_ewc((dir / "ewc.h5").string()); });
  EXPECT_NE(damaged.find((dir / "ewc.h5").string()), std::string::npos) << damaged;
  EXPECT_NE(damaged.find("[arrays]"), std::string::npos) << damaged;
  const std::string store = error_of([&] { train::load_ewc((dir / "store.h5").string()); });
  EXPECT_NE(store.find("not a libft array file"), std::string::npos) << store;
  fs::remove_all(dir);
}

// Through the trainer: lambda 0 computes the penalty but changes nothing (metrics and final weights
// bit-identical to the run without EWC); a large lambda keeps the weights much nearer the anchor.
TEST(TrainEwc, LambdaZeroChangesNothingAndALargeLambdaHoldsTheWeights) {
  const fs::path dir = test::scratch_dir("train_ewc");
  config::RunConfig c = test::synthetic_run(dir);
  c.checkpoint.every = 0;
  test::Quiet q;
  // The Fisher of the run's initial model (config + init seed) on the same store.
  {
    model::CausalLM m(io::load_model_config(c.model.config));
    model::init_weights(m, c.model.init_seed);
    data::Batcher rows = row_batcher(c.data.train[0], 24);
    train::save_ewc(train::estimate_fisher(m, rows, 8), (dir / "ewc.h5").string());
  }
  train::run_training(c, q.f);
  config::RunConfig zero = c;
  zero.output_dir = (dir / "zero").string();
  zero.ewc.state = (dir / "ewc.h5").string();
  zero.ewc.lambda = 0.0;
  train::run_training(zero, q.f);
  auto plain = test::metric_lines(dir / "run"), with = test::metric_lines(dir / "zero");
  ASSERT_EQ(plain.size(), with.size());
  int penalties = 0;
  for (auto& j : with) penalties += j.erase("ewc_penalty") == 1 && j.at("type") == "train";
  EXPECT_EQ(penalties, 12);
  EXPECT_TRUE(plain == with);
  EXPECT_TRUE(test::read_file(dir / "run" / "final" / "model.safetensors") == test::read_file(dir / "zero" / "final" / "model.safetensors"));

  // Distance from the anchor, weighted by the Fisher, with and without a strong penalty.
  config::RunConfig strong = zero;
  strong.output_dir = (dir / "strong").string();
  strong.ewc.lambda = 1e5;
  train::run_training(strong, q.f);
  const train::EwcState s = train::load_ewc((dir / "ewc.h5").string());
  auto drift = [&](const fs::path& run) {
    model::CausalLM m = io::load_pretrained((run / "final").string());
    double d = 0.0;
    for (const auto& item : m->named_parameters())
      d += (s.fisher.at(item.key()) * (item.value().detach() - s.anchor.at(item.key())).pow(2)).sum().item<double>();
    return d;
  };
  const double free_drift = drift(dir / "run"), held_drift = drift(dir / "strong");
  std::printf("Fisher-weighted drift from the anchor: %.3e without EWC, %.3e with lambda 1e5\n", free_drift, held_drift);
  EXPECT_LT(held_drift, 0.2 * free_drift);
  fs::remove_all(dir);
}

// Replay: rows come from the replay store at the configured ratio (the stream each row came from
// is in the batch), deterministic; the held-out set is drawn from the target store only.
TEST(TrainReplay, MixesTheReplayStoreAtTheRatio) {
  const fs::path dir = test::scratch_dir("train_replay");
  config::RunConfig c = test::synthetic_run(dir);
  test::write_rule_store((dir / "general.h5").string(), 80, 23, 30);
  c.replay.stores = {(dir / "general.h5").string()};
  c.replay.ratio = 0.25;
  data::Batcher a = train::training_batcher(c), b = train::training_batcher(c);
  int64_t rows = 0, replayed = 0;
  for (int i = 0; i < 200; ++i) {
    const data::Batch x = *a.next(), y = *b.next();
    EXPECT_EQ(x.input_ids, y.input_ids);
    for (const auto& r : x.row_info) {
      ++rows;
      replayed += r.stream == 1;
    }
  }
  const double share = static_cast<double>(replayed) / static_cast<double>(rows);
  std::printf("replay share over %lld rows: %.3f (configured 0.25)\n", static_cast<long long>(rows), share);
  EXPECT_NEAR(share, 0.25, 0.05);

  // With replay.held_out_docs, the documents a run on the general store alone holds out (what
  // eval.stores: [general.h5@10] evaluates) are never replayed.
  c.replay.held_out_docs = 10;
  std::set<int64_t> held;
  {
    data::BatcherOptions o;
    o.seq_len = 1000;
    o.batch_size = 1;
    o.max_epochs = 1;
    o.shuffle = false;
    o.split = data::Split::Eval;
    o.eval.count = 10;
    data::Batcher eval({data::BatcherSource{data::TokenStoreReader::open((dir / "general.h5").string(), "synthetic"), 1.0}}, o);
    while (auto batch = eval.next())
      for (const auto& r : batch->row_info)
        for (const auto& seg : r.segments) held.insert(seg.doc);
  }
  ASSERT_EQ(held.size(), 10u);
  data::Batcher kept = train::training_batcher(c);
  std::set<int64_t> replayed_docs;
  for (int i = 0; i < 300; ++i)
    for (const auto& r : kept.next()->row_info)
      for (const auto& seg : r.segments)
        if (seg.source == 1) replayed_docs.insert(seg.doc);
  EXPECT_GT(replayed_docs.size(), 50u);
  for (int64_t d : held) EXPECT_FALSE(replayed_docs.count(d)) << "held-out document " << d << " was replayed";

  c.checkpoint.every = 0;
  c.eval.stores = {(dir / "general.h5").string() + "@10"};
  test::Quiet q;
  const train::RunSummary s = train::run_training(c, q.f);
  EXPECT_TRUE(s.final_eval_loss.count("general"));
  EXPECT_EQ(s.steps, 12);
  EXPECT_TRUE(s.final_eval_loss.count("held_out"));
  // The resolved config keeps the replay section.
  std::ifstream in(fs::path(c.output_dir) / "config.yaml");
  const std::string yaml((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(yaml.find("ratio: 0.25"), std::string::npos) << yaml;
  fs::remove_all(dir);
}

// A run with EWC and replay stopped after step 5 and resumed ends bit-identical to an uninterrupted
// one: metrics (losses, penalties, the data hash of every step, so the replay draws too) and weights.
TEST(TrainEwc, StopAndResumeWithEwcAndReplayIsBitIdentical) {
  struct StopAt : train::Callbacks {
    train::Action on_step(const train::StepInfo& s) override {
      return s.step == 5 ? train::Action::Stop : train::Action::Continue;
    }
  };
  const fs::path dir = test::scratch_dir("train_ewc_resume");
  config::RunConfig c = test::synthetic_run(dir);
  test::write_rule_store((dir / "general.h5").string(), 80, 23, 30);
  {
    model::CausalLM m(io::load_model_config(c.model.config));
    model::init_weights(m, c.model.init_seed);
    data::Batcher rows = row_batcher((dir / "general.h5").string(), 24);
    train::save_ewc(train::estimate_fisher(m, rows, 8), (dir / "ewc.h5").string());
  }
  c.ewc.state = (dir / "ewc.h5").string();
  c.ewc.lambda = 100.0;
  c.replay.stores = {(dir / "general.h5").string()};
  c.replay.ratio = 0.3;
  c.replay.held_out_docs = 5;
  test::Quiet q;
  config::RunConfig ref = c;
  ref.output_dir = (dir / "ref").string();
  train::run_training(ref, q.f);
  StopAt stop;
  train::RunOptions ro;
  ro.log = q.f;
  ro.callbacks = &stop;
  EXPECT_EQ(train::run_training(c, ro).steps, 5);
  ro.callbacks = nullptr;
  const train::RunSummary second = train::run_training(c, ro);
  EXPECT_EQ(second.resumed_from, 5);
  EXPECT_EQ(second.steps, 12);
  const auto a = test::metric_lines(dir / "ref"), b = test::metric_lines(dir / "run");
  EXPECT_TRUE(a == b);
  EXPECT_GT(a.at(3).value("ewc_penalty", 0.0), 0.0);
  EXPECT_TRUE(test::read_file(dir / "ref" / "final" / "model.safetensors") == test::read_file(dir / "run" / "final" / "model.safetensors"));
  fs::remove_all(dir);
}

// EWC through the trainer with adapters: LoRA and QLoRA runs take the base model's Fisher (the
// penalty on scale · B A; an NF4 base is its anchor up to quantization), log a growing penalty and
// train finitely; a strong lambda keeps the adapters' ΔW smaller than a weak one.
TEST(TrainEwc, LoraAndQloraRunsWithEwc) {
  const fs::path dir = test::scratch_dir("train_ewc_lora");
  config::RunConfig c = test::synthetic_run(dir);
  c.checkpoint.every = 0;
  c.lora.targets = {"all-linear"};
  {
    model::CausalLM m(io::load_model_config(c.model.config));
    model::init_weights(m, c.model.init_seed);
    io::save_pretrained(m, (dir / "base").string());
    data::Batcher rows = row_batcher(c.data.train[0], 24);
    train::save_ewc(train::estimate_fisher(m, rows, 8), (dir / "ewc.h5").string());
  }
  c.model.config.clear();
  c.model.checkpoint = (dir / "base").string();
  c.ewc.state = (dir / "ewc.h5").string();
  test::Quiet q;
  for (const std::string mode : {"lora", "qlora"}) {
    SCOPED_TRACE(mode);
    double delta_norm[2] = {0, 0};
    for (int strong = 0; strong < 2; ++strong) {
      config::RunConfig r = c;
      r.mode = mode;
      r.ewc.lambda = strong ? 1e6 : 1.0;
      r.output_dir = (dir / (mode + std::to_string(strong))).string();
      const train::RunSummary s = train::run_training(r, q.f);
      EXPECT_EQ(s.steps, 12);
      const auto lines = test::metric_lines(r.output_dir);
      double last_penalty = -1;
      for (const auto& j : lines) {
        if (j.at("type") != "train") continue;
        ASSERT_TRUE(j.contains("ewc_penalty"));
        EXPECT_TRUE(std::isfinite(j.at("loss").get<double>()));
        last_penalty = j.at("ewc_penalty").get<double>();
      }
      EXPECT_GT(last_penalty, 0.0);
      // ||scale · B A|| over the adapted layers, from the saved PEFT adapter.
      auto file = io::SafetensorsFile::open((fs::path(r.output_dir) / "final" / "adapter_model.safetensors").string());
      for (const auto& info : file->tensors()) {
        if (info.name.find("lora_A") == std::string::npos) continue;
        const std::string b_name = info.name.substr(0, info.name.find("lora_A")) + "lora_B.weight";
        const at::Tensor a = io::read_tensor(*file, info), b = io::read_tensor(*file, *file->find(b_name));
        delta_norm[strong] += at::matmul(b, a).pow(2).sum().item<double>();
      }
    }
    std::printf("%s: sum ||B A||^2 %.3e with lambda 1, %.3e with lambda 1e6\n", mode.c_str(), delta_norm[0], delta_norm[1]);
    EXPECT_LT(delta_norm[1], 0.5 * delta_norm[0]);
  }
  fs::remove_all(dir);
}
