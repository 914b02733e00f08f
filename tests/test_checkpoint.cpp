// Checkpoint directories (manifest, verification, fallback, pruning, stale cleanup), adaptation
// modes (full, freeze), and the trainer's resume, callbacks, best tracking and early stopping
// through the C++ API. The process-level kills and crashes are tests/python/kill_resume.py's.
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <regex>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <ATen/autocast_mode.h>

#include "ft/adapt/lora.h"
#include "ft/adapt/mode.h"
#include "ft/config/run_config.h"
#include "ft/data/token_store.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/train/checkpoint.h"
#include "ft/train/graphs.h"
#include "ft/train/optimizer.h"
#include "ft/train/run.h"
#include "ft/train/step.h"
#include "ft/util/autocast.h"
#include "ft/util/cpu_cache.h"
#include "ft/util/error.h"
#include "ft/util/event_log.h"
#include "test_util.h"
#include "train_util.h"

using namespace ft;
using test::metric_lines;
using test::Quiet;
using test::synthetic_run;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) { return test::scratch_dir(name); }

void write_file(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

using test::read_file;

std::string save_two(train::CheckpointDir& dir) {
  dir.save(10, [](const std::string& d) {
    write_file(fs::path(d) / "a.bin", "first checkpoint, file a");
    write_file(fs::path(d) / "b.json", "{\"x\": 1}");
  });
  return dir.save(20, [](const std::string& d) {
    write_file(fs::path(d) / "a.bin", "second checkpoint, file a");
    write_file(fs::path(d) / "b.json", "{\"x\": 2}");
  });
}

std::string latest_with_log(const train::CheckpointDir& dir, std::string& log_text) {
  std::FILE* log = std::tmpfile();
  const auto latest = dir.latest_valid(false, log);
  std::rewind(log);
  char buf[4096];
  const size_t n = std::fread(buf, 1, sizeof buf, log);
  std::fclose(log);
  log_text.assign(buf, n);
  return latest.value_or("");
}

}  // namespace

TEST(CheckpointDir, SavesCompleteDirectoriesWithAManifest) {
  const fs::path root = scratch("ckpt_save");
  train::CheckpointDir dir((root / "checkpoints").string());
  const std::string newest = save_two(dir);
  EXPECT_EQ(newest, dir.path(20));
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{10, 20}));
  const auto entries = train::CheckpointDir::verify(newest);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].name, "a.bin");
  EXPECT_EQ(entries[0].bytes, 25u);
  EXPECT_EQ(entries[0].sha256, data::sha256_file((fs::path(newest) / "a.bin").string()));
  const nlohmann::json m = nlohmann::json::parse(read_file(fs::path(newest) / "manifest.json"));
  EXPECT_EQ(m.at("step"), 20);
  EXPECT_EQ(m.at("format"), "libft-checkpoint");
  EXPECT_FALSE(fs::exists(dir.path(20) + ".tmp"));
  std::string log;
  EXPECT_EQ(latest_with_log(dir, log), newest);
  EXPECT_TRUE(log.empty()) << log;
  fs::remove_all(root);
}

// A damaged newest checkpoint is named and skipped; strict mode refuses to fall back.
TEST(CheckpointDir, DamagedNewestFallsBackOrStopsWhenStrict) {
  struct Case {
    const char* what;
    std::function<void(const fs::path&)> damage;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"truncated", [](const fs::path& d) { fs::resize_file(d / "a.bin", 5); }, "a.bin: 5 bytes, the manifest says 25"},
      {"bit flip",
       [](const fs::path& d) {
         std::string s = read_file(d / "a.bin");
         s[3] ^= 0x01;
         write_file(d / "a.bin", s);
       },
       "a.bin: SHA-256 differs"},
      {"missing file", [](const fs::path& d) { fs::remove(d / "b.json"); }, "b.json: missing"},
      {"no manifest", [](const fs::path& d) { fs::remove(d / "manifest.json"); }, "no manifest.json"},
      {"corrupt manifest", [](const fs::path& d) { write_file(d / "manifest.json", "{\"format\": "); }, "not valid JSON"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const fs::path root = scratch("ckpt_damage");
    train::CheckpointDir dir((root / "checkpoints").string());
    save_two(dir);
    c.damage(dir.path(20));
    std::string log;
    EXPECT_EQ(latest_with_log(dir, log), dir.path(10));
    EXPECT_NE(log.find(c.expect), std::string::npos) << log;
    EXPECT_NE(log.find("step-00000020"), std::string::npos) << log;
    try {
      dir.latest_valid(true, nullptr);
      ADD_FAILURE() << "strict mode fell back";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("checkpoint.strict"), std::string::npos) << e.what();
    }
    fs::remove_all(root);
  }
}

TEST(CheckpointDir, PruneKeepsTheNewestAndProtectedSteps) {
  const fs::path root = scratch("ckpt_prune");
  train::CheckpointDir dir((root / "checkpoints").string());
  for (int64_t s : {5, 10, 15, 20, 25}) {
    dir.save(s, [](const std::string& d) { write_file(fs::path(d) / "x", "x"); });
  }
  EXPECT_EQ(dir.prune(2, {10}), (std::vector<int64_t>{5, 15}));
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{10, 20, 25}));
  EXPECT_EQ(dir.prune(1), (std::vector<int64_t>{10, 20}));
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{25}));
  fs::remove_all(root);
}

// A save whose files cannot be written (a full disk) removes its unfinished directory and throws
// the writer's error; the checkpoints before it stay intact.
TEST(CheckpointDir, AFailedWriteRemovesItsUnfinishedDirectory) {
  const fs::path root = scratch("ckpt_failed");
  train::CheckpointDir dir((root / "checkpoints").string());
  save_two(dir);
  const std::string e = test::error_of([&] {
    dir.save(30, [](const std::string& d) {
      write_file(fs::path(d) / "a.bin", "half of it");
      FT_FAIL("[safetensors] ", d, "/b.safetensors: write failed: No space left on device");
    });
  });
  EXPECT_NE(e.find("No space left on device"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir.path(30) + ".tmp"));
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{10, 20}));
  EXPECT_NO_THROW(train::CheckpointDir::verify(dir.path(20)));
  fs::remove_all(root);
}

// Leftovers of interrupted saves: .tmp directories go; an .old directory (a replacement that
// crashed between its two renames) comes back when its step-N is missing.
TEST(CheckpointDir, CleansStaleDirectoriesAndRestoresAnInterruptedReplacement) {
  const fs::path root = scratch("ckpt_stale");
  train::CheckpointDir dir((root / "checkpoints").string());
  save_two(dir);
  fs::create_directories(dir.path(30) + ".tmp");
  write_file(fs::path(dir.path(30) + ".tmp") / "a.bin", "partial");
  fs::rename(dir.path(20), dir.path(20) + ".old");
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{10}));
  EXPECT_EQ(dir.clean_stale(), 1);
  EXPECT_EQ(dir.steps(), (std::vector<int64_t>{10, 20}));
  EXPECT_FALSE(fs::exists(dir.path(30) + ".tmp"));
  EXPECT_NO_THROW(train::CheckpointDir::verify(dir.path(20)));
  // Saving a step again replaces it, complete.
  dir.save(20, [](const std::string& d) { write_file(fs::path(d) / "c", "replacement"); });
  EXPECT_EQ(train::CheckpointDir::verify(dir.path(20)).size(), 1u);
  EXPECT_FALSE(fs::exists(dir.path(20) + ".old"));
  fs::remove_all(root);
}

// --- modes ----------------------------------------------------------------------------------------

TEST(Modes, GlobMatch) {
  EXPECT_TRUE(adapt::glob_match("*.mlp.*", "model.layers.0.mlp.up_proj.weight"));
  EXPECT_TRUE(adapt::glob_match("model.layers.?.self_attn.*", "model.layers.1.self_attn.q_proj.weight"));
  EXPECT_FALSE(adapt::glob_match("model.layers.?.self_attn.*", "model.layers.10.self_attn.q_proj.weight"));
  EXPECT_TRUE(adapt::glob_match("*", ""));
  EXPECT_FALSE(adapt::glob_match("a*b", "acbd"));
  EXPECT_TRUE(adapt::glob_match("a*b*c", "axxbyyc"));
}

TEST(Modes, LayerRanges) {
  using R = std::pair<int64_t, int64_t>;
  EXPECT_EQ(config::parse_layer_range("3"), R(3, 3));
  EXPECT_EQ(config::parse_layer_range("0-5"), R(0, 5));
  EXPECT_EQ(config::parse_layer_range("-1"), R(-1, -1));
  EXPECT_EQ(config::parse_layer_range("-3--1"), R(-3, -1));
  EXPECT_FALSE(config::parse_layer_range("a-b"));
  EXPECT_FALSE(config::parse_layer_range("1-"));
  EXPECT_FALSE(config::parse_layer_range(""));
}

TEST(Modes, FreezeSelectsBlocksPatternsEmbeddingsHeadAndNorm) {
  io::ModelConfig mc = test::tiny_config();
  mc.num_hidden_layers = 4;
  mc.layer_window.assign(4, 0);
  model::CausalLM m(mc);
  auto frozen = [&](config::FreezeSection f) { return adapt::frozen_parameter_names(m, f); };
  auto count_prefix = [](const std::vector<std::string>& names, const std::string& prefix) {
    return std::count_if(names.begin(), names.end(), [&](const std::string& n) { return n.rfind(prefix, 0) == 0; });
  };
  const int64_t per_block = static_cast<int64_t>(m->model->layers[0]->named_parameters().size());

  config::FreezeSection f;
  f.embeddings = false;
  f.layers = {"0-1", "-1"};
  auto names = frozen(f);
  EXPECT_EQ(count_prefix(names, "model.layers.0."), per_block);
  EXPECT_EQ(count_prefix(names, "model.layers.1."), per_block);
  EXPECT_EQ(count_prefix(names, "model.layers.2."), 0);
  EXPECT_EQ(count_prefix(names, "model.layers.3."), per_block);
  EXPECT_EQ(count_prefix(names, "model.embed_tokens"), 0);

  f = {};
  f.train_last = 1;  // embeddings frozen by default
  names = frozen(f);
  EXPECT_EQ(static_cast<int64_t>(names.size()), 3 * per_block + 1);
  EXPECT_EQ(count_prefix(names, "model.layers.3."), 0);
  EXPECT_EQ(count_prefix(names, "model.embed_tokens."), 1);

  f = {};
  f.embeddings = false;
  f.lm_head = true;
  f.norm = true;
  f.patterns = {"*.mlp.*"};
  names = frozen(f);
  EXPECT_EQ(count_prefix(names, "lm_head."), 1);
  EXPECT_EQ(count_prefix(names, "model.norm."), 1);
  EXPECT_EQ(static_cast<int64_t>(names.size()), 2 + 4 * 3);  // 3 MLP matrices per block

  auto error_of = [&](config::FreezeSection bad) {
    try {
      frozen(bad);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  f = {};
  f.layers = {"4"};
  EXPECT_NE(error_of(f).find("outside the model's blocks 0..3"), std::string::npos) << error_of(f);
  f = {};
  f.train_last = 5;
  EXPECT_NE(error_of(f).find("the model has 4"), std::string::npos) << error_of(f);
  f = {};
  f.patterns = {"*.mpl.*"};
  EXPECT_NE(error_of(f).find("'*.mpl.*' matches no parameter"), std::string::npos) << error_of(f);

  mc.tie_word_embeddings = true;
  model::CausalLM tied(mc);
  f = {};  // embeddings frozen, lm_head not: one tensor
  try {
    adapt::frozen_parameter_names(tied, f);
    ADD_FAILURE() << "expected an error for tied embeddings";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ties lm_head"), std::string::npos) << e.what();
  }
}

// lora.group_projections with DoRA: DoRA layers never group (set_lora_group_projections declines
// them), and the run's log says so instead of "grouped projections".
TEST(Modes, LoraDescribesDoraLayersAsUngrouped) {
  for (const bool dora : {false, true}) {
    SCOPED_TRACE(dora ? "DoRA" : "LoRA");
    config::RunConfig c;
    c.mode = "lora";
    c.lora.dora = dora;
    c.lora.group_projections = true;
    const auto mode = adapt::make_mode(c);
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 3);
    mode->apply(m);
    const std::string d = mode->describe(m);
    if (dora) {
      EXPECT_NE(d.find("DoRA r"), std::string::npos) << d;
      EXPECT_EQ(d.find("grouped projections"), std::string::npos) << d;
      EXPECT_NE(d.find("projections ungrouped: DoRA layers run one node each"), std::string::npos) << d;
    } else {
      EXPECT_NE(d.find("(fused, grouped projections)"), std::string::npos) << d;
    }
  }
}

// A freeze-mode step changes exactly the trainable tensors; the frozen ones stay bit-identical and
// have no gradient and no optimizer state.
TEST(Modes, FrozenParametersDoNotMove) {
  config::RunConfig c;
  c.mode = "freeze";
  c.freeze.layers = {"0"};
  c.freeze.embeddings = true;
  const auto mode = adapt::make_mode(c);
  EXPECT_EQ(mode->name(), "freeze");
  // Only the adapter modes leave the base out of their result (and so may store it in bf16).
  EXPECT_TRUE(mode->exports_base());
  for (const std::string name : {"full", "lora", "qlora", "prefix"}) {
    config::RunConfig other;
    other.mode = name;
    EXPECT_EQ(adapt::make_mode(other)->exports_base(), name == "full") << name;
  }
  torch::manual_seed(0);
  model::CausalLM m(test::tiny_config());
  model::init_weights(m, 3);
  mode->apply(m);
  std::map<std::string, at::Tensor> before;
  for (const auto& item : m->named_parameters()) before[item.key()] = item.value().detach().clone();
  const adapt::TrainableCounts counts = adapt::count_trainable(m);
  EXPECT_GT(counts.frozen, 0);
  EXPECT_GT(counts.trainable, 0);
  EXPECT_NE(mode->describe(m).find("frozen"), std::string::npos);
  EXPECT_EQ(mode->state(m).size(), static_cast<size_t>(counts.trainable_tensors));

  train::OptimizerOptions oo;
  oo.lr = 1e-2;
  auto opt = train::make_optimizer(m, oo);
  data::Batch b;
  b.rows = 2;
  b.cols = 8;
  for (int64_t i = 0; i < 16; ++i) {
    b.input_ids.push_back((i * 7) % 97);
    b.labels.push_back((i * 7) % 97);
    b.position_ids.push_back(i % 8);
    b.segment_ids.push_back(0);
    b.attention_mask.push_back(1);
  }
  const auto bt = train::to_tensors(b);
  train::StepCounters counters;
  const auto r = train::accumulate_gradients(m, {bt});
  ASSERT_TRUE(train::optimizer_step(*opt, r.loss, oo.lr, {}, counters).applied);
  for (const auto& item : m->named_parameters()) {
    const bool frozen = item.key().rfind("model.layers.0.", 0) == 0 || item.key().rfind("model.embed_tokens.", 0) == 0;
    EXPECT_EQ(!item.value().requires_grad(), frozen) << item.key();
    EXPECT_EQ(item.value().equal(before[item.key()]), frozen) << item.key();
    if (frozen) EXPECT_FALSE(item.value().grad().defined()) << item.key();
  }
  try {
    config::RunConfig bad;
    bad.mode = "lora2";
    adapt::make_mode(bad);
    ADD_FAILURE() << "expected an unknown-mode error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("freeze, full"), std::string::npos) << e.what();
  }
}

// --- the trainer through the C++ API ---------------------------------------------------------------

namespace {


class StopAt : public train::Callbacks {
 public:
  explicit StopAt(int64_t step) : step_(step) {}
  train::Action on_step(const train::StepInfo& s) override {
    steps.push_back(s.step);
    return s.step == step_ ? train::Action::Stop : train::Action::Continue;
  }
  train::Action on_eval(const train::EvalInfo& e) override {
    evals.push_back(e.step);
    return train::Action::Continue;
  }
  void on_checkpoint(int64_t step, const std::string&) override { saved.push_back(step); }
  void on_end(const train::RunSummary& s) override { ended = static_cast<int>(s.stop); }
  std::vector<int64_t> steps, evals, saved;
  int ended = -1;

 private:
  int64_t step_;
};

}  // namespace

// A run stopped by a callback and resumed in a second call ends bit-identical to one uninterrupted
// run, in full and in freeze mode (where the checkpoint holds only the trainable tensors).
TEST(TrainResume, StopAndResumeIsBitIdentical) {
  for (const std::string mode : {"full", "freeze", "lora", "dora", "saved", "qlora", "prefix"}) {
    SCOPED_TRACE(mode);
    const fs::path dir = scratch("train_resume");
    config::RunConfig c = synthetic_run(dir);
    c.mode = mode == "dora" || mode == "saved" ? "lora" : mode;  // qlora: LoRA on the NF4-quantized base
    c.lora.dora = mode == "dora";
    if (mode == "saved") c.lora.modules_to_save = {"lm_head"};  // trained in full beside the adapters
    c.prefix.num_virtual_tokens = 4;
    c.prefix.projection = true;  // the checkpoint must hold the MLP, not only the table
    if (c.mode == "freeze") c.freeze.layers = {"1"};
    if (c.mode == "lora") c.lora.dropout = 0.1;  // dropout draws from the RNG: the resume must restore it
    Quiet q;

    config::RunConfig ref = c;
    ref.output_dir = (dir / "ref").string();
    train::RunOptions ro;
    ro.log = q.f;
    const train::RunSummary whole = train::run_training(ref, ro);
    EXPECT_EQ(whole.steps, 12);
    EXPECT_EQ(whole.stop, train::StopReason::MaxSteps);

    StopAt stop(5);
    ro.callbacks = &stop;
    const train::RunSummary first = train::run_training(c, ro);
    EXPECT_EQ(first.steps, 5);
    EXPECT_EQ(first.stop, train::StopReason::Callback);
    EXPECT_EQ(stop.ended, static_cast<int>(train::StopReason::Callback));
    EXPECT_EQ(stop.steps, (std::vector<int64_t>{1, 2, 3, 4, 5}));
    EXPECT_EQ(stop.evals, (std::vector<int64_t>{4}));
    EXPECT_EQ(stop.saved.back(), 5);
    EXPECT_EQ(first.last_checkpoint, (dir / "run" / "checkpoints" / "step-00000005").string());

    // The checkpoint holds the mode's tensors only.
    auto weights = io::SafetensorsFile::open(first.last_checkpoint + "/model.safetensors");
    int in_block1 = 0;
    for (const auto& t : weights->tensors()) in_block1 += t.name.rfind("model.layers.1.", 0) == 0;
    // A block: 7 matrices and 2 norms (full); none (freeze: block 1 frozen); q and v's A and B (lora).
    EXPECT_EQ(in_block1, mode == "full" ? 9 : mode == "lora" || mode == "saved" || mode == "qlora" ? 4 : mode == "dora" ? 6 : 0);

    StopAt observe(-1);
    ro.callbacks = &observe;
    const train::RunSummary second = train::run_training(c, ro);
    EXPECT_EQ(second.resumed_from, 5);
    EXPECT_EQ(second.steps, 12);
    EXPECT_EQ(observe.steps.front(), 6);
    EXPECT_EQ(second.first_loss, whole.first_loss);
    EXPECT_EQ(second.last_loss, whole.last_loss);
    EXPECT_EQ(second.final_eval_loss, whole.final_eval_loss);
    EXPECT_TRUE(metric_lines(dir / "run") == metric_lines(dir / "ref"));
    const char* weights_file =
        c.mode == "lora" || c.mode == "qlora" || c.mode == "prefix" ? "adapter_model.safetensors" : "model.safetensors";
    if (mode == "prefix") EXPECT_EQ(weights->tensors().size(), 5u);  // embedding and the MLP's two layers
    EXPECT_TRUE(read_file(dir / "run" / "final" / weights_file) == read_file(dir / "ref" / "final" / weights_file));
    if (mode == "saved") {  // the head trains: the checkpoint and the final adapter hold it, and it moved
      ASSERT_NE(weights->find("lm_head.weight"), nullptr);
      auto adapter = io::SafetensorsFile::open((dir / "run" / "final" / weights_file).string());
      ASSERT_NE(adapter->find("base_model.model.lm_head.weight"), nullptr);
      EXPECT_FALSE(io::read_tensor(*adapter, adapter->at("base_model.model.lm_head.weight"))
                       .equal(io::read_tensor(*weights, weights->at("lm_head.weight"))));
    }
    fs::remove_all(dir);
  }
}

TEST(TrainResume, RefusesAnotherRunsCheckpointsAndResumeNever) {
  const fs::path dir = scratch("train_identity");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 3;
  c.schedule.total_steps = 3;
  c.eval.every = 0;
  Quiet q;
  train::run_training(c, q.f);
  const std::string config_yaml = read_file(dir / "run" / "config.yaml");
  config::RunConfig other = c;
  other.data.seq_len = 16;
  try {
    train::run_training(other, q.f);
    ADD_FAILURE() << "resumed another run's checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("another 'data'"), std::string::npos) << e.what();
    // Only advice that works: resume: never would refuse this output_dir too (its checkpoints).
    EXPECT_EQ(std::string(e.what()).find("resume: never"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("give it another output_dir"), std::string::npos) << e.what();
  }
  other = c;
  other.checkpoint.resume = "never";
  try {
    train::run_training(other, q.f);
    ADD_FAILURE() << "resume: never ignored existing checkpoints";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("resume is 'never'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("use a new output_dir"), std::string::npos) << e.what();
  }
  // A max_steps below the checkpoint's step (3) would write final/ from step 3 as a 2-step run.
  other = c;
  other.max_steps = 2;
  try {
    train::run_training(other, q.f);
    ADD_FAILURE() << "resumed past max_steps";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is at step 3, past max_steps 2: give max_steps of at least 3"),
              std::string::npos) << e.what();
  }
  // The refused runs left the resolved config of the run that owns the directory as it was.
  EXPECT_EQ(read_file(dir / "run" / "config.yaml"), config_yaml);
  other = c;
  other.output_dir = (dir / "empty").string();
  other.checkpoint.resume = "required";
  EXPECT_THROW(train::run_training(other, q.f), Error);
  fs::remove_all(dir);
}

// Checkpoints that are all damaged stop the run (it would otherwise train from step 0 and overwrite
// metrics.jsonl and final/); with one intact checkpoint left it falls back to it.
TEST(TrainResume, AllCheckpointsDamagedStopsTheRun) {
  const fs::path dir = scratch("train_all_damaged");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 6;
  c.schedule.total_steps = 6;
  c.eval.every = 0;
  Quiet q;
  train::run_training(c, q.f);
  const fs::path run(c.output_dir);
  const std::string metrics = read_file(run / "metrics.jsonl");
  const std::string final_weights = read_file(run / "final" / "model.safetensors");
  train::CheckpointDir checkpoints((run / "checkpoints").string());
  ASSERT_EQ(checkpoints.steps(), (std::vector<int64_t>{3, 6}));
  for (const int64_t s : checkpoints.steps()) fs::resize_file(fs::path(checkpoints.path(s)) / "trainer_state.json", 0);
  config::RunConfig again = c;
  again.max_steps = 4;
  again.schedule.total_steps = 4;
  try {
    train::run_training(again, q.f);
    ADD_FAILURE() << "trained from step 0 over damaged checkpoints";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("holds 2 checkpoints and none is intact"), std::string::npos) << what;
    EXPECT_NE(what.find((run / "checkpoints").string()), std::string::npos) << what;
    EXPECT_NE(what.find("use a new output_dir"), std::string::npos) << what;
  }
  EXPECT_TRUE(read_file(run / "metrics.jsonl") == metrics) << "metrics.jsonl changed";
  EXPECT_TRUE(read_file(run / "final" / "model.safetensors") == final_weights) << "final/ was overwritten";
  fs::remove_all(dir);
}

// A finished run that kept no checkpoint (checkpoint.every: 0) has only final/ and metrics.jsonl. A run
// with another config in that output_dir would train from step 0 and overwrite both, so it stops and
// names the line of config.yaml that differs; the same config trains again (ft bench's reruns), to
// the same weights; a run killed before any checkpoint (no final/) starts over as before.
TEST(TrainResume, AFinishedRunWithoutCheckpointsIsNotOverwritten) {
  const fs::path dir = scratch("train_no_checkpoints");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 3;
  c.schedule.total_steps = 3;
  c.eval.every = 0;
  c.checkpoint.every = 0;
  Quiet q;
  train::run_training(c, q.f);
  const fs::path run(c.output_dir);
  ASSERT_FALSE(fs::exists(run / "checkpoints") && !fs::is_empty(run / "checkpoints"));
  const std::string metrics = read_file(run / "metrics.jsonl");
  const auto lines = metric_lines(run);
  const std::string config_yaml = read_file(run / "config.yaml");
  const std::string final_weights = read_file(run / "final" / "model.safetensors");
  for (const bool resume_never : {false, true}) {
    SCOPED_TRACE(resume_never);
    config::RunConfig other = c;
    other.optimizer.lr = c.optimizer.lr * 2;
    if (resume_never) other.checkpoint.resume = "never";
    try {
      train::run_training(other, q.f);
      ADD_FAILURE() << "overwrote a finished run's final/";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find((run / "final").string() + " holds the model of a finished run that kept no checkpoint"),
                std::string::npos) << what;
      EXPECT_NE(what.find((run / "config.yaml").string() + " line "), std::string::npos) << what;
      EXPECT_NE(what.find("lr: "), std::string::npos) << what;
      EXPECT_NE(what.find("Use a new output_dir, or move that final/ away"), std::string::npos) << what;
    }
    EXPECT_TRUE(read_file(run / "metrics.jsonl") == metrics) << "metrics.jsonl changed";
    EXPECT_TRUE(read_file(run / "config.yaml") == config_yaml) << "config.yaml changed";
    EXPECT_TRUE(read_file(run / "final" / "model.safetensors") == final_weights) << "final/ was overwritten";
  }
  // Without its config.yaml, the run that wrote final/ is unknown: refused too.
  fs::rename(run / "config.yaml", run / "config.yaml.aside");
  EXPECT_THROW(train::run_training(c, q.f), Error);
  fs::rename(run / "config.yaml.aside", run / "config.yaml");
  // The same config: trained again, to the same result.
  const train::RunSummary again = train::run_training(c, q.f);
  EXPECT_EQ(again.steps, 3);
  EXPECT_TRUE(metric_lines(run) == lines) << "a rerun of the same config gave other metrics";
  EXPECT_TRUE(read_file(run / "final" / "model.safetensors") == final_weights);
  // No final/: what is there is a run killed before its first checkpoint, and it starts over.
  fs::remove_all(run / "final");
  config::RunConfig other = c;
  other.optimizer.lr = c.optimizer.lr * 2;
  EXPECT_EQ(train::run_training(other, q.f).steps, 3);
  EXPECT_FALSE(read_file(run / "final" / "model.safetensors") == final_weights);
  fs::remove_all(dir);
}

// Early stopping after `patience` evaluations without improvement; the best evaluation's checkpoint
// survives keep_last pruning.
TEST(TrainResume, EarlyStoppingKeepsTheBestCheckpoint) {
  const fs::path dir = scratch("train_early");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 40;
  c.schedule.total_steps = 40;
  c.eval.every = 2;
  c.eval.patience = 2;
  c.eval.min_delta = 1e9;  // nothing after the first evaluation counts as an improvement
  c.checkpoint.every = 1;
  c.checkpoint.keep_last = 1;
  Quiet q;
  const train::RunSummary s = train::run_training(c, q.f);
  EXPECT_EQ(s.stop, train::StopReason::EarlyStopping);
  EXPECT_EQ(s.steps, 6);  // evaluations at 2 (best), 4, 6 → two without improvement
  EXPECT_EQ(s.best_step, 2);
  train::CheckpointDir ckpts((dir / "run" / "checkpoints").string());
  EXPECT_EQ(ckpts.steps(), (std::vector<int64_t>{2, 6}));
  EXPECT_TRUE(fs::exists(dir / "run" / "final" / "model.safetensors"));
  fs::remove_all(dir);
}

// A CPU run pools its large buffers (ft/util/cpu_cache.h) and hands the idle ones back at the end.
TEST(TrainResume, ACpuRunLeavesNoIdleBlocksInThePool) {
  if (!util::install_cpu_cache()) GTEST_SKIP() << "the pool is off (AddressSanitizer or LIBFT_CPU_CACHE=0)";
  { at::Tensor big = at::empty({1 << 20}, at::kFloat); }  // 4 MiB, now idle in the pool
  ASSERT_GE(util::cpu_cache_stats().cached_bytes, std::size_t{4} << 20);
  const fs::path dir = scratch("train_pool");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 2;
  c.schedule.total_steps = 2;
  Quiet q;
  train::run_training(c, q.f);
  EXPECT_TRUE(util::cpu_cache_stats().installed);
  EXPECT_EQ(util::cpu_cache_stats().cached_bytes, 0u);
  fs::remove_all(dir);
}

// --- signals -----------------------------------------------------------------------------------------

// With handle_signals (ft train's setting), SIGTERM during a run stops it after the step with a
// checkpoint, and the handler is installed to run on an alternate signal stack: oneDNN's JIT GEMM
// points the stack pointer into a heap buffer while it runs, so a handler on the interrupted stack
// would write its frame into the heap (train/run.cpp, SignalScope). After the run the previous
// disposition and alternate stack are back.
TEST(TrainSignals, SigtermStopsWithACheckpointAndIsHandledOnAnAlternateStack) {
  const fs::path dir = scratch("train_signals");
  config::RunConfig c = synthetic_run(dir);
  c.eval.every = 0;
  struct RaiseAt : train::Callbacks {
    bool onstack = false, altstack = false;
    train::Action on_step(const train::StepInfo& s) override {
      if (s.step != 2) return train::Action::Continue;
      struct sigaction sa {};
      sigaction(SIGTERM, nullptr, &sa);
      onstack = (sa.sa_flags & SA_ONSTACK) != 0 && sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN;
      stack_t st{};
      altstack = sigaltstack(nullptr, &st) == 0 && (st.ss_flags & SS_DISABLE) == 0 && st.ss_size >= 16384;
      std::raise(SIGTERM);  // handled: sets the flag the loop checks after this step
      return train::Action::Continue;
    }
  } cb;
  struct sigaction before {};
  sigaction(SIGTERM, nullptr, &before);
  Quiet q;
  train::RunOptions ro;
  ro.log = q.f;
  ro.callbacks = &cb;
  ro.handle_signals = true;
  const train::RunSummary s = train::run_training(c, ro);
  EXPECT_TRUE(cb.onstack);
  EXPECT_TRUE(cb.altstack);
  EXPECT_EQ(s.stop, train::StopReason::Signal);
  EXPECT_EQ(s.signal, SIGTERM);
  EXPECT_EQ(s.steps, 2);
  EXPECT_FALSE(s.last_checkpoint.empty());
  struct sigaction after {};
  sigaction(SIGTERM, nullptr, &after);
  EXPECT_EQ(after.sa_handler, before.sa_handler);
  stack_t st{};
  ASSERT_EQ(sigaltstack(nullptr, &st), 0);
  EXPECT_NE(st.ss_flags & SS_DISABLE, 0);  // the test process had none before the run
  fs::remove_all(dir);
}

// --- activation checkpointing ------------------------------------------------------------------------

// Recomputing blocks in the backward pass gives the gradients of the plain graph, for every
// parameter, also when the first block's input needs no gradient (frozen embeddings) and with
// packed segments and padding in the batch. Under bf16 autocast (the CPU's here) the recomputation
// runs under the forward pass's autocast state although backward() is called outside the scope:
// recomputed in float32, the gradients would be off by bf16's rounding (~1e-2).
TEST(ActivationCheckpointing, SameGradientsAsThePlainGraph) {
  for (const auto& [freeze_embeddings, autocast] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true}}) {
    SCOPED_TRACE(std::string(freeze_embeddings ? "frozen embeddings" : "all trainable") + (autocast ? ", bf16 autocast" : ""));
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 5);
    if (freeze_embeddings) m->model->embed_tokens->weight.set_requires_grad(false);
    const at::Tensor ids = at::randint(0, 97, {2, 12}, at::kLong);
    const at::Tensor segments = at::tensor({0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, -1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1},
                                           at::kLong).view({2, 12});
    const at::Tensor positions = at::tensor({0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5},
                                            at::kLong).view({2, 12});
    model::ForwardOptions fo;
    fo.segment_ids = segments;
    fo.position_ids = positions;
    fo.attention_mask = (segments >= 0).to(at::kLong);
    auto grads = [&](bool ckpt) {
      m->set_gradient_checkpointing(ckpt);
      m->zero_grad();
      at::Tensor loss;
      {
        util::AutocastScope scope(autocast, at::kCPU);
        loss = model::causal_lm_loss(m->forward(ids, fo), ids);
      }
      loss.backward();
      std::map<std::string, at::Tensor> g;
      for (const auto& item : m->named_parameters()) {
        if (item.value().requires_grad()) g[item.key()] = item.value().grad().clone();
      }
      return g;
    };
    const auto plain = grads(false);
    const auto ckpt = grads(true);
    ASSERT_EQ(plain.size(), ckpt.size());
    for (const auto& [name, g] : plain) {
      ASSERT_TRUE(ckpt.at(name).defined()) << name;
      EXPECT_LE(test::max_rel_error(ckpt.at(name), g), 1e-6) << name;
      EXPECT_GT(g.abs().max().item<double>(), 0.0) << name;
    }
    // Without gradients the flag changes nothing.
    at::NoGradGuard no_grad;
    m->set_gradient_checkpointing(true);
    const at::Tensor a = m->forward(ids, fo);
    m->set_gradient_checkpointing(false);
    EXPECT_TRUE(a.equal(m->forward(ids, fo)));
  }
}

// Dropout inside a checkpointed block: the recomputation draws the masks that the forward pass
// drew (the generators' states are replayed, and both passes take the same LoRA path), so the loss
// and every gradient equal those of the plain graph under the same seed. LoRA's fused node (its own
// dropout noise on the CPU; on CUDA ATen's dropout kernel, or the row kernels' Philox draws) and
// DoRA's fused node with dropout, in float32 and under bf16 autocast.
void check_dropout_recomputed(const c10::Device device) {
  struct Variant {
    bool dora, autocast, row_kernels;
  };
  std::vector<Variant> variants = {{false, false, false}, {false, true, false}, {true, false, false}, {true, true, false}};
  if (device.is_cuda()) variants.push_back({false, true, true});
  for (const Variant& v : variants) {
    SCOPED_TRACE(std::string(v.dora ? "DoRA" : "LoRA") + (v.autocast ? ", bf16 autocast" : "") +
                 (v.row_kernels ? ", row kernels" : "") + " on " + device.str());
    model::CausalLM m(test::tiny_config());
    model::init_weights(m, 6);
    adapt::LoraOptions o;
    o.targets = {"all-linear"};
    o.r = 4;
    o.dropout = 0.3;
    o.dora = v.dora;
    adapt::apply_lora(m, o);
    {
      at::NoGradGuard no_grad;
      for (const auto& item : m->named_parameters()) {
        if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 0.5);
      }
    }
    m->to(device);
    if (v.autocast && device.is_cuda()) ASSERT_GT(adapt::store_frozen_linears(m, at::kBFloat16), 0);
    adapt::set_lora_row_kernels(m, v.row_kernels);
    m->train();
    const at::Tensor ids = at::randint(0, 97, {2, 16}, at::kLong).to(device);
    auto run = [&](bool ckpt, uint64_t seed) {
      m->set_gradient_checkpointing(ckpt);
      m->zero_grad();
      at::manual_seed(seed);
      at::Tensor loss;
      {
        util::AutocastScope scope(v.autocast, device.type());
        loss = model::causal_lm_loss(m->forward(ids), ids);
      }
      at::manual_seed(1234);  // the generators move on before the backward pass, as in training
      (void)at::rand({5}, at::TensorOptions().device(device));
      loss.backward();
      std::map<std::string, at::Tensor> g;
      for (const auto& item : m->named_parameters()) {
        if (item.value().requires_grad()) g[item.key()] = item.value().grad().clone();
      }
      return std::make_pair(loss.item<double>(), g);
    };
    const auto [plain_loss, plain] = run(false, 77);
    const auto [ckpt_loss, ckpt] = run(true, 77);
    EXPECT_NE(run(false, 78).first, plain_loss);  // the masks matter: another seed, another loss
    EXPECT_NEAR(ckpt_loss, plain_loss, 1e-6 * std::abs(plain_loss));
    ASSERT_EQ(plain.size(), ckpt.size());
    for (const auto& [name, g] : plain) EXPECT_LE(test::max_rel_error(ckpt.at(name), g), v.autocast ? 1e-5 : 1e-6) << name;
    m->set_gradient_checkpointing(false);
  }
}

TEST(ActivationCheckpointing, DropoutDrawsTheSameMasksWhenRecomputed) { check_dropout_recomputed(c10::Device(c10::kCPU)); }

TEST(TrainCuda, CheckpointedDropoutDrawsTheSameMasks) {
  FT_REQUIRE_CUDA();
  check_dropout_recomputed(c10::Device(c10::kCUDA, 0));
}

// --- out of memory ---------------------------------------------------------------------------------

// An out-of-memory error in a forward pass (injected through before_forward) stops the run with a
// message saying what to change, or, under on_oom: halve, splits the micro-batches and retries the
// same step: the same data and the same token-normalised update, so the losses follow the
// uninterrupted run's to float rounding, and the split persists in the checkpoint.
TEST(TrainOutOfMemory, StopsWithAdviceOrHalvesTheMicroBatch) {
  const fs::path dir = scratch("train_oom");
  config::RunConfig c = synthetic_run(dir);
  c.max_steps = 6;
  c.schedule.total_steps = 6;
  c.eval.every = 0;
  Quiet q;
  config::RunConfig ref = c;
  ref.output_dir = (dir / "ref").string();
  train::run_training(ref, q.f);

  train::RunOptions ro;
  ro.log = q.f;
  int64_t largest = 0;
  ro.before_forward = [&](const train::BatchTensors& b) {
    if (b.input_ids.size(0) > 1) TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory (injected)");
    largest = std::max(largest, b.input_ids.size(0));
  };
  try {
    train::run_training(c, ro);
    ADD_FAILURE() << "expected an out-of-memory error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("step 1: out of memory on cpu in a forward/backward pass of 2 × 24 tokens"), std::string::npos)
        << what;
    EXPECT_NE(what.find("on_oom: halve"), std::string::npos) << what;
  }
  fs::remove_all(dir / "run");
  c.on_oom = "halve";
  const train::RunSummary s = train::run_training(c, ro);
  EXPECT_EQ(s.steps, 6);
  EXPECT_EQ(largest, 1);
  const auto got = metric_lines(dir / "run"), want = metric_lines(dir / "ref");
  std::vector<nlohmann::json> got_train, want_train;
  int ooms = 0;
  for (const auto& j : got) {
    if (j.at("type") == "train") got_train.push_back(j);
    if (j.at("type") == "oom") {
      ++ooms;
      EXPECT_EQ(j.at("rows"), 1);
    }
  }
  for (const auto& j : want) {
    if (j.at("type") == "train") want_train.push_back(j);
  }
  EXPECT_EQ(ooms, 1);
  ASSERT_EQ(got_train.size(), want_train.size());
  for (size_t i = 0; i < got_train.size(); ++i) {
    EXPECT_EQ(got_train[i].at("targets"), want_train[i].at("targets"));
    EXPECT_EQ(got_train[i].at("data"), want_train[i].at("data"));
    EXPECT_NEAR(got_train[i].at("loss").get<double>(), want_train[i].at("loss").get<double>(),
                1e-5 * want_train[i].at("loss").get<double>());
  }
  const nlohmann::json state = nlohmann::json::parse(read_file(fs::path(s.last_checkpoint) / "trainer_state.json"));
  EXPECT_EQ(state.at("micro_batch_rows"), 1);
  fs::remove_all(dir);
}

// --- event log -----------------------------------------------------------------------------------------

TEST(EventLog, Crc32cCheckValues) {
  // The CRC-32C check value (RFC 3720 B.4) and an all-zero 32-byte block.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  // Incremental updates agree with one pass.
  EXPECT_EQ(crc32c("6789", 4, crc32c("12345", 5)), 0xE3069283u);
}

// --- CUDA (skipped without a GPU; run by scripts/gpu-check.sh) -------------------------------------------

#ifdef LIBFT_WITH_CUDA_KERNELS
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

// A bfloat16-autocast run learns the synthetic rule, and a resumed run continues from its
// checkpoint; on the GPU it records device memory.
void bf16_run_learns_and_resumes(const std::string& device) {
  const fs::path dir = scratch("train_bf16_" + device);
  config::RunConfig c = synthetic_run(dir);
  c.device = device;
  c.dtype = "bfloat16";
  c.max_steps = 16;
  c.schedule.total_steps = 16;
  Quiet q;
  StopAt stop(8);
  train::RunOptions ro;
  ro.log = q.f;
  ro.callbacks = &stop;
  EXPECT_EQ(train::run_training(c, ro).steps, 8);
  ro.callbacks = nullptr;
  const train::RunSummary s = train::run_training(c, ro);
  EXPECT_EQ(s.resumed_from, 8);
  EXPECT_EQ(s.steps, 16);
  EXPECT_EQ(s.skipped, 0);
  EXPECT_LT(s.last_loss, s.first_loss - 1.0) << s.first_loss << " -> " << s.last_loss;
  if (device == "cuda") {
    const auto lines = metric_lines(dir / "run");
    bool memory = false;
    for (const auto& j : lines) memory |= j.contains("peak_device_mib") && j.at("peak_device_mib").get<double>() > 0;
    EXPECT_TRUE(memory);
  }
  fs::remove_all(dir);
}

TEST(TrainBf16, CpuAutocastRunLearnsAndResumes) { bf16_run_learns_and_resumes("cpu"); }

// Device names: a CUDA device always carries its index ("cuda" and "auto" give the current one), so
// the allocator statistics and generators the trainer reads per device get a real one; bad names and
// CUDA on a machine without it are errors that say who asked.
TEST(TrainDevice, NamesResolveToIndexedDevices) {
  EXPECT_EQ(train::resolve_device("cpu"), c10::Device(c10::kCPU));
  EXPECT_NE(test::error_of([] { train::resolve_device("gpu0"); }).find("[train] device: 'gpu0' is not a device"), std::string::npos);
  EXPECT_NE(test::error_of([] { train::resolve_device("tpu", "--device"); }).find("--device: 'tpu' is not a device"), std::string::npos);
  if (!at::hasCUDA()) {
    EXPECT_EQ(train::resolve_device("auto"), c10::Device(c10::kCPU));
    EXPECT_NE(test::error_of([] { train::resolve_device("cuda"); }).find("cuda: CUDA is not available"), std::string::npos);
    return;
  }
  for (const std::string name : {"cuda", "auto"}) {
    const c10::Device d = train::resolve_device(name);
    EXPECT_TRUE(d.is_cuda() && d.has_index() && d.index() >= 0) << name << " -> " << d;
  }
  EXPECT_EQ(train::resolve_device("cuda:0"), c10::Device(c10::kCUDA, 0));
}

TEST(TrainCuda, Bf16AutocastRunLearnsAndResumes) {
  FT_REQUIRE_CUDA();
  bf16_run_learns_and_resumes("cuda");
}

// A run of `c` stopped after `stop_at` steps (with a checkpoint) and resumed to its end, both logged
// to one file: the two summaries and the log's text.
struct StopResume {
  train::RunSummary stopped, resumed;
  std::string log;
};
StopResume stop_and_resume(const config::RunConfig& c, int64_t stop_at, const fs::path& log_path) {
  StopResume out;
  std::FILE* log = std::fopen(log_path.c_str(), "w");
  EXPECT_NE(log, nullptr);
  StopAt stop(stop_at);
  train::RunOptions ro;
  ro.log = log;
  ro.callbacks = &stop;
  out.stopped = train::run_training(c, ro);
  ro.callbacks = nullptr;
  out.resumed = train::run_training(c, ro);
  std::fclose(log);
  std::ifstream in(log_path);
  out.log.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return out;
}

// CUDA graphs are refused off CUDA, saying why: by the graphs themselves, and by a run whose device
// "auto" resolves to the CPU on a machine without CUDA.
TEST(TrainGraphs, RefusedWithoutACudaDevice) {
  model::CausalLM m(test::tiny_config());
  EXPECT_NE(test::error_of([&] { train::GraphedPasses g(m, c10::Device(c10::kCPU)); }).find("cuda_graphs needs"),
            std::string::npos);
  if (at::hasCUDA()) return;
  const fs::path dir = scratch("train_graphs_cpu");
  config::RunConfig c = synthetic_run(dir);
  c.device = "auto";
  c.cuda_graphs = true;
  Quiet q;
  train::RunOptions ro;
  ro.log = q.f;
  const std::string e = test::error_of([&] { train::run_training(c, ro); });
  EXPECT_NE(e.find("cuda_graphs needs"), std::string::npos) << e;
  fs::remove_all(dir);
}

// Replayed CUDA graphs train as the eager passes do: the same per-step losses for full fine-tuning
// and LoRA, in float32 and under bf16 autocast, with two micro-batches per step (the divisor set on
// the device before the replays), evaluations and checkpoints between steps, and a resume (which
// captures again).
TEST(TrainCuda, CudaGraphsTrainAsTheEagerPasses) {
  FT_REQUIRE_CUDA();
  for (const std::string mode : {"full", "lora"}) {
    for (const std::string dtype : {"float32", "bfloat16"}) {
      SCOPED_TRACE(mode + " in " + dtype);
      auto run = [&](bool graphs) {
        const fs::path dir = scratch("train_graphs_" + mode + "_" + dtype + (graphs ? "_graphs" : "_eager"));
        config::RunConfig c = synthetic_run(dir);
        c.mode = mode;
        if (mode == "lora") c.lora.targets = {"all-linear"};
        c.device = "cuda";
        c.dtype = dtype;
        c.cuda_graphs = graphs;
        const StopResume r = stop_and_resume(c, 5, dir / "log.txt");
        EXPECT_EQ(r.stopped.steps, 5);
        EXPECT_EQ(r.resumed.steps, 12);
        std::vector<double> losses;
        for (const auto& j : metric_lines(dir / "run")) {
          if (j.at("type") == "train") losses.push_back(j.at("loss").get<double>());
        }
        fs::remove_all(dir);
        return std::make_pair(losses, r.log);
      };
      const auto [eager, eager_log] = run(false);
      const auto [graphed, graphed_log] = run(true);
      ASSERT_EQ(graphed.size(), eager.size());
      ASSERT_GE(eager.size(), 10u);
      for (size_t i = 0; i < eager.size(); ++i) EXPECT_NEAR(graphed[i], eager[i], 1e-4 * std::abs(eager[i])) << i;
      EXPECT_LT(graphed.back(), graphed.front() - 0.5);
      // One shape; a graph per padding case and, in bf16 (variable-length attention over the packed
      // documents), per power-of-two bucket of the documents' count: a handful, not one per step.
      std::smatch captured;
      ASSERT_TRUE(std::regex_search(graphed_log, captured, std::regex("CUDA graphs: ([0-9]+) captured"))) << graphed_log;
      EXPECT_LE(std::stoi(captured[1].str()), dtype == "float32" ? 2 : 8) << graphed_log;
      EXPECT_EQ(eager_log.find("CUDA graphs"), std::string::npos);
    }
  }
}

// A LoRA run (and a QLoRA one) on `device` stops at step 8 and resumes to 16, learns, and exports an
// adapter that checks clean against a fresh float32 model on the CPU. Under bf16 autocast the
// trainer stores the frozen linear weights in bf16 (QLoRA: those it did not quantize, the output
// head) and says so; the adapters stay float32.
void lora_run_resumes(const std::string& device, const std::string& dtype) {
  for (const std::string mode : {"lora", "qlora"}) {
    SCOPED_TRACE(mode + " on " + device + " in " + dtype);
    const fs::path dir = scratch("train_lora_" + device + "_" + mode);
    config::RunConfig c = synthetic_run(dir);
    c.mode = mode;
    c.lora.targets = {"all-linear"};
    c.device = device;
    c.dtype = dtype;
    c.max_steps = 16;
    c.schedule.total_steps = 16;
    const StopResume r = stop_and_resume(c, 8, dir / "log.txt");
    EXPECT_EQ(r.stopped.steps, 8);
    const train::RunSummary& s = r.resumed;
    const std::string& text = r.log;
    EXPECT_EQ(s.resumed_from, 8);
    EXPECT_EQ(s.steps, 16);
    EXPECT_EQ(s.skipped, 0);
    EXPECT_LT(s.last_loss, s.first_loss) << s.first_loss << " -> " << s.last_loss;
    const bool bf16_base = text.find("frozen linear weights stored in bfloat16") != std::string::npos;
    EXPECT_EQ(bf16_base, dtype == "bfloat16") << text;  // QLoRA: the output head (not quantized)
    model::CausalLM fresh(test::tiny_config());
    const auto problems = adapt::check_peft_adapter(fresh, s.final_dir);
    EXPECT_TRUE(problems.empty()) << (problems.empty() ? "" : problems.front());
    const auto adapter = io::SafetensorsFile::open((fs::path(s.final_dir) / "adapter_model.safetensors").string());
    ASSERT_FALSE(adapter->tensors().empty());
    for (const auto& t : adapter->tensors()) EXPECT_EQ(t.dtype, io::DType::F32) << t.name;
    fs::remove_all(dir);
  }
}

TEST(TrainLora, RunResumesAndExportsAnAdapter) {
  lora_run_resumes("cpu", "float32");
  lora_run_resumes("cpu", "bfloat16");  // CPU autocast: the frozen base in bf16, as on CUDA
}

TEST(TrainCuda, LoraBf16RunResumesAndExportsAnAdapter) {
  FT_REQUIRE_CUDA();
  lora_run_resumes("cuda", "bfloat16");
}

#ifdef LIBFT_WITH_CUDA_KERNELS
// Activation checkpointing lowers the peak memory of a training forward/backward pass and keeps its
// gradients (bf16 autocast, so the recomputation must run under autocast too).
TEST(TrainCuda, ActivationCheckpointingLowersPeakMemory) {
  FT_REQUIRE_CUDA();
  io::ModelConfig mc = test::tiny_config();
  mc.hidden_size = 512;
  mc.intermediate_size = 1536;
  mc.num_hidden_layers = 8;
  mc.num_attention_heads = 8;
  mc.num_key_value_heads = 4;
  mc.head_dim = 64;
  mc.layer_window.assign(8, 0);
  model::CausalLM m(mc);
  model::init_weights(m, 1);
  m->to(at::kCUDA);
  const at::Tensor ids = at::randint(0, 97, {8, 512}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  auto run = [&](bool ckpt) {
    m->set_gradient_checkpointing(ckpt);
    m->zero_grad();
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    const int64_t before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
    {
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::Tensor loss = model::causal_lm_loss(m->forward(ids), ids);
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
      loss.backward();
    }
    c10::cuda::device_synchronize();
    const int64_t peak = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak;
    std::map<std::string, at::Tensor> g;
    for (const auto& item : m->named_parameters()) g[item.key()] = item.value().grad().clone();
    return std::make_pair(peak - before, g);
  };
  const auto plain = run(false);
  const auto ckpt = run(true);
  std::printf("activation memory: %.1f MiB plain, %.1f MiB with checkpointing\n", plain.first / 1048576.0,
              ckpt.first / 1048576.0);
  EXPECT_LT(ckpt.first, plain.first * 7 / 10);
  for (const auto& [name, g] : plain.second) EXPECT_LE(test::max_rel_error(ckpt.second.at(name), g), 2e-2) << name;
}
#endif

// loss_chunk: a run whose loss goes through the output head a few rows at a time trains as the run
// that takes the whole logits (float32: the same losses and evaluations up to the float32 sum's
// order), for LoRA (frozen head) and full fine-tuning (the head's gradient summed over the chunks).
TEST(TrainLossChunk, TrainsAsTheWholeLogits) {
  for (const std::string mode : {"lora", "full"}) {
    SCOPED_TRACE(mode);
    const fs::path dir = scratch("train_loss_chunk_" + mode);
    config::RunConfig c = synthetic_run(dir);
    c.mode = mode;
    if (mode == "lora") c.lora.targets = {"all-linear"};
    Quiet q;
    train::run_training(c, q.f);
    config::RunConfig cc = c;
    cc.loss_chunk = 5;  // 2 rows × 24 tokens per micro-batch: 10 chunks, the last one ragged
    cc.output_dir = (dir / "chunked").string();
    train::run_training(cc, q.f);
    const auto a = metric_lines(dir / "run"), b = metric_lines(dir / "chunked");
    ASSERT_EQ(a.size(), b.size());
    int compared = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].contains("loss")) continue;
      EXPECT_NEAR(b[i].at("loss").get<double>(), a[i].at("loss").get<double>(), 2e-6 * a[i].at("loss").get<double>()) << i;
      ++compared;
    }
    EXPECT_GE(compared, 12);
    fs::remove_all(dir);
  }
}

// The LoRA layer's execution paths (lora.fused, lora.extended_gemm, lora.row_kernels,
// lora.grad_splits, lora.group_projections) train as the default fused path does: the same loss at every step within `tol` (relative), and the run's log
// names the path it took. On the CPU in float32 the extended GEMM and the row kernels do not apply
// (no autocast cast to fold into; no CUDA), so there the unfused chain is the comparison. With
// mode "qlora" (CUDA): the NF4 base's split GEMMs against its extended GEMM (W decoded into a
// [W | B] buffer of each pass's own), without and with the row kernels.
void lora_paths_train_alike(const std::string& device, const std::string& dtype, double tol,
                            const std::string& mode = "lora") {
  struct Path {
    const char* name;
    bool fused, extended, row_kernels;
    int64_t grad_splits;
    const char* described;
    bool grouped = false;
  };
  std::vector<Path> paths = {{"default", true, false, false, 1, "(fused)"},
                             {"unfused", false, false, false, 1, "(unfused)"},
                             {"grad_splits", true, false, false, 4, "(fused, adapter gradients in 4 token chunks)"},
                             {"grouped", true, false, false, 1, "(fused, grouped projections)", true}};
  if (device == "cuda") {
    paths.push_back({"extended", true, true, false, 1, "(fused, extended GEMM)"});
    paths.push_back({"row_kernels", true, false, true, 1, "(fused, row kernels)"});
    paths.push_back({"both", true, true, true, 1, "(fused, extended GEMM, row kernels)"});
    paths.push_back({"all", true, true, true, 4, "(fused, extended GEMM, row kernels, adapter gradients in 4 token chunks)"});
    paths.push_back({"all_grouped", true, true, true, 4,
                     "(fused, extended GEMM, row kernels, adapter gradients in 4 token chunks, grouped projections)",
                     true});
  }
  if (mode == "qlora") {
    const Path extended = {"extended", true, true, false, 1, "(fused, extended GEMM)"};
    const Path grouped = {"extended_grouped", true, true, false, 1, "(fused, extended GEMM, grouped projections)", true};
    if (device == "cuda") {
      paths = {paths[0], extended, {"both", true, true, true, 1, "(fused, extended GEMM, row kernels)"}, grouped};
    } else {
      paths = {paths[0], extended, grouped};  // (CPU bf16 autocast: the extended GEMM applies, the row kernels do not)
    }
  }
  const fs::path dir = scratch("train_" + mode + "_paths_" + device);
  config::RunConfig c = synthetic_run(dir);
  c.mode = mode;
  c.lora.targets = {"all-linear"};
  c.device = device;
  c.dtype = dtype;
  c.eval.every = 0;
  std::vector<std::vector<nlohmann::json>> metrics;
  for (const Path& p : paths) {
    config::RunConfig pc = c;
    pc.lora.fused = p.fused;
    pc.lora.extended_gemm = p.extended;
    pc.lora.row_kernels = p.row_kernels;
    pc.lora.grad_splits = p.grad_splits;
    pc.lora.group_projections = p.grouped;
    pc.output_dir = (dir / p.name).string();
    const fs::path log_path = dir / (std::string(p.name) + ".log");
    std::FILE* log = std::fopen(log_path.c_str(), "w");
    ASSERT_NE(log, nullptr);
    train::RunOptions ro;
    ro.log = log;
    train::run_training(pc, ro);
    std::fclose(log);
    std::ifstream in(log_path);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find(std::string("on 14 layers ") + p.described), std::string::npos) << p.name << "\n" << text;
    metrics.push_back(metric_lines(dir / p.name));
  }
  for (size_t k = 1; k < paths.size(); ++k) {
    ASSERT_EQ(metrics[k].size(), metrics[0].size()) << paths[k].name;
    const test::LossComparison d = test::compare_train_losses(metrics[0], metrics[k]);
    std::printf("LoRA path %s against the default on %s in %s: largest relative loss difference %.2e\n",
                paths[k].name, device.c_str(), dtype.c_str(), d.worst);
    EXPECT_EQ(d.steps, 12) << paths[k].name;
    EXPECT_LT(d.worst, tol) << paths[k].name;
  }
  fs::remove_all(dir);
}

TEST(TrainLoraPaths, FusedAndUnfusedTrainAlikeOnTheCpu) { lora_paths_train_alike("cpu", "float32", 1e-4); }

TEST(TrainLoraPaths, QloraExtendedGemmTrainsAsTheSplitGemmsInCpuBf16) {
  lora_paths_train_alike("cpu", "bfloat16", 1e-3, "qlora");
}

TEST(TrainCuda, LoraPathsTrainAlikeInBf16) {
  FT_REQUIRE_CUDA();
  lora_paths_train_alike("cuda", "bfloat16", 2e-2);
}

TEST(TrainCuda, QloraPathsTrainAlikeInBf16) {
  FT_REQUIRE_CUDA();
  lora_paths_train_alike("cuda", "bfloat16", 2e-2, "qlora");
}

// LoRA dropout inside the row kernels (lora.row_kernels, with the extended GEMM), bf16 on CUDA: a
// run stopped at step 5 and resumed draws the same masks as the uninterrupted run (the checkpoint
// restores the CUDA generator the kernels draw from), so the losses agree; with CUDA graphs (the
// kernels read the generator's state on the device at each replay) it learns as well. The masks
// differ from ATen's dropout kernel's, so the ATen path is compared in distribution only: the final
// losses within 10% (a sanity bound; the layer tests check the values against float64).
TEST(TrainCuda, RowKernelDropoutResumesAndLearns) {
  FT_REQUIRE_CUDA();
  auto run = [](const std::string& name, bool row_kernels, bool graphs, int64_t stop_at) {
    const fs::path dir = scratch("train_row_dropout_" + name);
    config::RunConfig c = synthetic_run(dir);
    c.mode = "lora";
    c.lora.targets = {"all-linear"};
    c.lora.dropout = 0.1;
    c.lora.extended_gemm = row_kernels;
    c.lora.row_kernels = row_kernels;
    c.device = "cuda";
    c.dtype = "bfloat16";
    c.cuda_graphs = graphs;
    std::vector<double> losses;
    std::string log;
    if (stop_at > 0) {
      const StopResume r = stop_and_resume(c, stop_at, dir / "log.txt");
      EXPECT_EQ(r.resumed.resumed_from, stop_at) << name;
      log = r.log;
    } else {
      const fs::path log_path = dir / "log.txt";
      std::FILE* f = std::fopen(log_path.c_str(), "w");
      EXPECT_NE(f, nullptr);
      train::RunOptions ro;
      ro.log = f;
      EXPECT_EQ(train::run_training(c, ro).steps, 12) << name;
      std::fclose(f);
      std::ifstream in(log_path);
      log.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    if (row_kernels) EXPECT_NE(log.find("(fused, extended GEMM, row kernels)"), std::string::npos) << name << "\n" << log;
    for (const auto& j : metric_lines(dir / "run")) {
      if (j.at("type") == "train") losses.push_back(j.at("loss").get<double>());
    }
    fs::remove_all(dir);
    return losses;
  };
  const auto whole = run("whole", true, false, -1), resumed = run("resumed", true, false, 5);
  const auto graphed = run("graphs", true, true, -1), aten = run("aten", false, false, -1);
  ASSERT_EQ(whole.size(), 12u);
  ASSERT_EQ(resumed.size(), whole.size());
  for (size_t i = 0; i < whole.size(); ++i) EXPECT_NEAR(resumed[i], whole[i], 1e-4 * std::abs(whole[i])) << i;
  EXPECT_LT(whole.back(), whole.front() - 0.5);
  ASSERT_EQ(graphed.size(), whole.size());
  EXPECT_LT(graphed.back(), graphed.front() - 0.5);
  ASSERT_EQ(aten.size(), whole.size());
  EXPECT_NEAR(whole.back(), aten.back(), 0.1 * aten.back());
  EXPECT_NEAR(graphed.back(), aten.back(), 0.1 * aten.back());
}

// The fused CUDA kernels of the model (kernels.loss, kernels.rope, kernels.swiglu), in bf16
// autocast, train as the unfused passes do: the loss with the whole logits and chunked (each
// chunk's loss recomputed in the backward pass through the kernels), the rotary embedding, SwiGLU,
// and all three.
TEST(TrainCuda, FusedKernelsTrainAsTheUnfusedPasses) {
  FT_REQUIRE_CUDA();
  struct Variant {
    const char* name;
    int64_t chunk;
    bool loss, rope, swiglu;
  };
  for (const Variant& v : {Variant{"loss", 0, true, false, false}, Variant{"chunked_loss", 5, true, false, false},
                           Variant{"rope", 0, false, true, false}, Variant{"swiglu", 0, false, false, true},
                           Variant{"all", 0, true, true, true}}) {
    const fs::path dir = scratch(std::string("train_fused_") + v.name);
    config::RunConfig c = synthetic_run(dir);
    c.device = "cuda";
    c.dtype = "bfloat16";
    c.eval.every = 0;
    c.loss_chunk = v.chunk;
    Quiet q;
    train::run_training(c, q.f);
    config::RunConfig fc = c;
    fc.kernels.loss = v.loss;
    fc.kernels.rope = v.rope;
    fc.kernels.swiglu = v.swiglu;
    fc.output_dir = (dir / "fused").string();
    train::run_training(fc, q.f);
    const auto a = metric_lines(dir / "run"), b = metric_lines(dir / "fused");
    ASSERT_EQ(a.size(), b.size());
    const double worst = test::compare_train_losses(a, b).worst;
    std::printf("fused %s against the unfused passes: largest relative loss difference %.2e\n", v.name, worst);
    EXPECT_LT(worst, 1e-2) << v.name;
    fs::remove_all(dir);
  }
}

// QLoRA: the same LoRA run on the NF4-quantized base follows the full-precision LoRA run closely
// (the base differs by the quantization error only). Tolerance: 2e-3 relative per step over 12
// steps on the synthetic store (measured on the jargon config: 6.4e-4 over 30 steps).
TEST(TrainQlora, TracksTheFullPrecisionLoraRun) {
  const fs::path dir = scratch("train_qlora");
  config::RunConfig c = synthetic_run(dir);
  c.mode = "lora";
  c.lora.targets = {"all-linear"};
  c.eval.every = 0;
  Quiet q;
  train::run_training(c, q.f);
  config::RunConfig qc = c;
  qc.mode = "qlora";
  qc.output_dir = (dir / "qlora").string();
  train::run_training(qc, q.f);
  const auto a = metric_lines(dir / "run"), b = metric_lines(dir / "qlora");
  ASSERT_EQ(a.size(), b.size());
  const double worst = test::compare_train_losses(a, b).worst;
  std::printf("QLoRA vs LoRA: largest relative loss difference %.2e\n", worst);
  EXPECT_LT(worst, 2e-3);
  EXPECT_GT(worst, 0.0);  // the base really is quantized
  fs::remove_all(dir);
}
