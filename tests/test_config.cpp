// Run configs: what a good file gives, and that every kind of mistake is reported with its place,
// all at once.
#include <gtest/gtest.h>

#include "ft/config/run_config.h"
#include "ft/util/error.h"

using namespace ft;

namespace {

const char* kGood = R"(# a comment
model:
  config: configs/models/tiny-llama.json
  init_seed: 3
tokenizer: runs/default/tokenizer
data:
  train: [runs/default/fortunes.h5]
  seq_len: 128
  batch_size: 4
  grad_accum: 2
  shuffle: false
  seed: 7
optimizer:
  name: adamw
  lr: 1.0e-3
  betas: [0.9, 0.95]
  weight_decay: 0.1
  eps: 1e-8
schedule:
  name: linear
  warmup_steps: 5
max_steps: 50
clip_grad_norm: 0.5
eval:
  held_out_docs: 100
  every: 10
log_every: 2
output_dir: runs/tiny
on_nonfinite: stop
)";

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    config::parse_run_config(yaml, "run.yaml", overrides);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an ft::Error for:\n" << yaml;
  return "";
}

std::string replace(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return s.replace(at, from.size(), to);
}

}  // namespace

TEST(RunConfig, ParsesEveryField) {
  const config::RunConfig c = config::parse_run_config(kGood, "run.yaml");
  EXPECT_EQ(c.model.config, "configs/models/tiny-llama.json");
  EXPECT_EQ(c.model.init_seed, 3u);
  EXPECT_EQ(c.tokenizer, "runs/default/tokenizer");
  EXPECT_EQ(c.data.train, (std::vector<std::string>{"runs/default/fortunes.h5"}));
  EXPECT_EQ(c.data.seq_len, 128);
  EXPECT_EQ(c.data.batch_size, 4);
  EXPECT_EQ(c.data.grad_accum, 2);
  EXPECT_FALSE(c.data.shuffle);
  EXPECT_EQ(c.data.seed, 7u);
  EXPECT_EQ(c.optimizer.name, "adamw");
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.optimizer.beta2, 0.95);
  EXPECT_DOUBLE_EQ(c.optimizer.weight_decay, 0.1);
  EXPECT_EQ(c.schedule.name, "linear");
  EXPECT_EQ(c.schedule.warmup_steps, 5);
  EXPECT_EQ(c.schedule.total_steps, 50);  // defaults to max_steps
  EXPECT_EQ(c.max_steps, 50);
  EXPECT_DOUBLE_EQ(c.clip_grad_norm, 0.5);
  EXPECT_EQ(c.eval.held_out_docs, 100);
  EXPECT_EQ(c.eval.every, 10);
  EXPECT_EQ(c.eval.batch_size, 4);  // defaults to data.batch_size
  EXPECT_EQ(c.log_every, 2);
  EXPECT_EQ(c.output_dir, "runs/tiny");
  EXPECT_EQ(c.on_nonfinite, "stop");
  EXPECT_EQ(c.dtype, "float32");
}

TEST(RunConfig, ResolvedYamlParsesBackToTheSame) {
  const config::RunConfig c = config::parse_run_config(kGood, "run.yaml");
  const std::string text = config::to_yaml(c);
  const config::RunConfig again = config::parse_run_config(text, "resolved.yaml");
  EXPECT_EQ(config::to_yaml(again), text);
  EXPECT_DOUBLE_EQ(again.optimizer.lr, c.optimizer.lr);
  EXPECT_EQ(again.data.train, c.data.train);
}

TEST(RunConfig, OverridesApplyBeforeValidation) {
  const config::RunConfig c =
      config::parse_run_config(kGood, "run.yaml", {"max_steps=20", "optimizer.lr=0.01", "data.train=[a.h5, b.h5]"});
  EXPECT_EQ(c.max_steps, 20);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.01);
  EXPECT_EQ(c.data.train, (std::vector<std::string>{"a.h5", "b.h5"}));
  // An overridden value with a wrong type is named by its override, not by a line of the file.
  const std::string e = error_of(kGood, {"data.batch_size=many"});
  EXPECT_NE(e.find("override 'data.batch_size=many': 'data.batch_size' must be an integer, got 'many'"),
            std::string::npos) << e;
  EXPECT_NE(error_of(kGood, {"max_steps"}).find("expected section.key=value"), std::string::npos);
  EXPECT_NE(error_of(kGood, {"optimizer.lr.x=1"}).find("'optimizer.lr' is not a section"), std::string::npos);
  EXPECT_NE(error_of(kGood, {"optimizer.lrr=1"}).find("did you mean 'lr'?"), std::string::npos);
}

// Overrides get the blame for what they wrote: the latest of two overrides of a key, a key or section
// that only an override adds; a value that cannot be read gets one error, not a second one for the
// default it leaves behind.
TEST(RunConfig, OverrideErrorsNameTheOverride) {
  std::string e = error_of(kGood, {"max_steps=2", "max_steps=20.5"});
  EXPECT_NE(e.find("override 'max_steps=20.5': 'max_steps' must be an integer, got '20.5'"), std::string::npos) << e;
  EXPECT_EQ(e.find("max_steps=2'"), std::string::npos) << e;
  EXPECT_EQ(e.find("must be > 0"), std::string::npos) << e;
  EXPECT_NE(e.find("1 error"), std::string::npos) << e;
  e = error_of(kGood, {"optimizer.lrr=1"});
  EXPECT_NE(e.find("override 'optimizer.lrr=1': unknown key 'optimizer.lrr'; did you mean 'lr'?"), std::string::npos) << e;
  e = error_of(kGood, {"optimiser.lr=1"});
  EXPECT_NE(e.find("override 'optimiser.lr=1': unknown key 'optimiser'"), std::string::npos) << e;
  // The file's own mistakes keep their lines.
  e = error_of(replace(kGood, "max_steps: 50", "max_steps: abc"));
  EXPECT_NE(e.find("run.yaml: 1 error"), std::string::npos) << e;
}

TEST(RunConfig, UnknownKeysAreErrorsWithTheirPlaceAndASuggestion) {
  const std::string e = error_of(replace(kGood, "  weight_decay: 0.1", "  weight_decy: 0.1"));
  EXPECT_NE(e.find("run.yaml:17:3: unknown key 'optimizer.weight_decy'; did you mean 'weight_decay'?"),
            std::string::npos) << e;
  const std::string top = error_of(replace(kGood, "log_every: 2", "banana: 2"));
  EXPECT_NE(top.find("run.yaml:27:1: unknown key 'banana'; known keys: model, tokenizer"), std::string::npos) << top;
}

TEST(RunConfig, DuplicateKeysAreErrors) {
  // yaml-cpp keeps the first of two equal keys and drops the second without a word.
  const std::string e = error_of(replace(kGood, "  seq_len: 128", "  seq_len: 128\n  seq_len: 256"));
  EXPECT_NE(e.find("run.yaml:9:3: duplicate key 'data.seq_len'"), std::string::npos) << e;
  std::string twice = kGood;
  twice += "max_steps: 60\n";
  const std::string top = error_of(twice);
  EXPECT_NE(top.find("duplicate key 'max_steps'"), std::string::npos) << top;
}

TEST(RunConfig, WrongTypesAndRangesAreErrors) {
  std::string y = kGood;
  y = replace(y, "seq_len: 128", "seq_len: 12.5");
  y = replace(y, "shuffle: false", "shuffle: maybe");
  y = replace(y, "lr: 1.0e-3", "lr: fast");
  y = replace(y, "betas: [0.9, 0.95]", "betas: [0.9, 1.5]");
  y = replace(y, "seed: 7", "seed: -7");
  y = replace(y, "name: linear", "name: cosin");
  y = replace(y, "clip_grad_norm: 0.5", "clip_grad_norm: -1");
  y = replace(y, "  every: 10", "  every: [10]");
  y = replace(y, "on_nonfinite: stop", "on_nonfinite: ignore");
  const std::string e = error_of(y);
  // Every error of the file at once, each with line and column.
  EXPECT_NE(e.find("run.yaml: 9 errors"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:8:12: 'data.seq_len' must be an integer, got '12.5'"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:11:12: 'data.shuffle' must be true or false, got 'maybe'"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:12:9: 'data.seed' must be a non-negative integer, got '-7'"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:15:7: 'optimizer.lr' must be a number, got 'fast'"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:16:16: 'optimizer.betas' must be in [0, 1), got 1.5"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:20:9: 'schedule.name' must be one of constant, linear, cosine, got 'cosin'"),
            std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:23:17: 'clip_grad_norm' must be >= 0, got -1"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:26:10: 'eval.every' must be an integer"), std::string::npos) << e;
  EXPECT_NE(e.find("run.yaml:29:15: 'on_nonfinite' must be one of skip, stop, got 'ignore'"), std::string::npos) << e;
}

TEST(RunConfig, MissingAndContradictorySettingsAreErrors) {
  const std::string empty = error_of("");
  EXPECT_NE(empty.find("'model' is required"), std::string::npos) << empty;
  EXPECT_NE(empty.find("'data' is required"), std::string::npos) << empty;
  EXPECT_NE(empty.find("'max_steps' is required"), std::string::npos) << empty;
  EXPECT_NE(empty.find("'output_dir' is required"), std::string::npos) << empty;

  EXPECT_NE(error_of("just text").find("run.yaml:1:1: a run config must be a mapping"), std::string::npos);

  const std::string both = error_of(replace(kGood, "  init_seed: 3", "  checkpoint: runs/ckpt"));
  EXPECT_NE(both.find("run.yaml:3:3: 'model' needs exactly one of 'checkpoint'"), std::string::npos) << both;
  const std::string warm = error_of(replace(kGood, "warmup_steps: 5", "warmup_steps: 50"));
  EXPECT_NE(warm.find("'schedule.warmup_steps' (50) must be below the schedule's total steps (50)"),
            std::string::npos) << warm;
  const std::string sgd = error_of(replace(kGood, "name: adamw", "name: sgd"));
  EXPECT_NE(sgd.find("run.yaml:16:10: 'optimizer.betas' only applies to adamw"), std::string::npos) << sgd;
  const std::string notmap = error_of(replace(kGood, "schedule:\n  name: linear\n  warmup_steps: 5", "schedule: cosine"));
  EXPECT_NE(notmap.find("'schedule' must be a mapping"), std::string::npos) << notmap;
  // CUDA graphs: on CUDA only, and not with activation checkpointing; both read back when valid.
  const std::string graphs_cpu = error_of(std::string(kGood) + "cuda_graphs: true\n");
  EXPECT_NE(graphs_cpu.find("run.yaml:30:14: 'cuda_graphs' needs a CUDA device (device is cpu)"), std::string::npos)
      << graphs_cpu;
  const std::string graphs_ckpt =
      error_of(std::string(kGood) + "device: cuda\ncuda_graphs: true\nactivation_checkpointing: true\n");
  EXPECT_NE(graphs_ckpt.find("'cuda_graphs' and 'activation_checkpointing' exclude each other"), std::string::npos)
      << graphs_ckpt;
  const config::RunConfig graphs = config::parse_run_config(std::string(kGood) + "device: cuda\n", "run.yaml",
                                                            {"cuda_graphs=true"});
  EXPECT_TRUE(graphs.cuda_graphs);
  EXPECT_NE(config::to_yaml(graphs).find("cuda_graphs: true"), std::string::npos);
  // loss_chunk: token rows, 0 (off) or more; read back.
  const std::string chunk = error_of(std::string(kGood) + "loss_chunk: -4\n");
  EXPECT_NE(chunk.find("run.yaml:30:13: 'loss_chunk' must be >= 0 token rows"), std::string::npos) << chunk;
  const config::RunConfig chunked = config::parse_run_config(std::string(kGood), "run.yaml", {"loss_chunk=1024"});
  EXPECT_EQ(chunked.loss_chunk, 1024);
  EXPECT_NE(config::to_yaml(chunked).find("loss_chunk: 1024"), std::string::npos);
  // kernels: booleans, off by default, read back; unknown kernels are errors.
  EXPECT_FALSE(chunked.kernels.loss || chunked.kernels.rope || chunked.kernels.swiglu);
  const config::RunConfig fused =
      config::parse_run_config(std::string(kGood), "run.yaml", {"kernels.loss=true", "kernels.swiglu=true"});
  EXPECT_TRUE(fused.kernels.loss);
  EXPECT_FALSE(fused.kernels.rope);
  EXPECT_TRUE(fused.kernels.swiglu);
  const config::RunConfig back = config::parse_run_config(config::to_yaml(fused), "resolved");
  EXPECT_TRUE(back.kernels.loss && !back.kernels.rope && back.kernels.swiglu);
  EXPECT_NE(error_of(std::string(kGood) + "kernels:\n  loss: maybe\n").find("kernels.loss"), std::string::npos);
  const std::string unknown = error_of(std::string(kGood) + "kernels:\n  ropes: true\n");
  EXPECT_NE(unknown.find("unknown key 'kernels.ropes'"), std::string::npos) << unknown;
  EXPECT_NE(error_of(std::string(kGood) + "fused_loss: maybe\n").find("fused_loss"), std::string::npos);
}

// model.router_aux_loss_coef: unset by default (the model's config.json decides), a number >= 0,
// written back when set.
TEST(RunConfig, RouterAuxLossCoefficient) {
  const config::RunConfig plain = config::parse_run_config(kGood, "run.yaml");
  EXPECT_FALSE(plain.model.router_aux_loss_coef.has_value());
  EXPECT_EQ(config::to_yaml(plain).find("router_aux_loss_coef"), std::string::npos);
  const config::RunConfig set = config::parse_run_config(kGood, "run.yaml", {"model.router_aux_loss_coef=0.02"});
  ASSERT_TRUE(set.model.router_aux_loss_coef.has_value());
  EXPECT_DOUBLE_EQ(*set.model.router_aux_loss_coef, 0.02);
  const config::RunConfig back = config::parse_run_config(config::to_yaml(set), "resolved");
  ASSERT_TRUE(back.model.router_aux_loss_coef.has_value());
  EXPECT_DOUBLE_EQ(*back.model.router_aux_loss_coef, 0.02);
  const config::RunConfig off = config::parse_run_config(kGood, "run.yaml", {"model.router_aux_loss_coef=0"});
  EXPECT_EQ(off.model.router_aux_loss_coef, 0.0);
  const std::string negative = error_of(replace(kGood, "  init_seed: 3", "  init_seed: 3\n  router_aux_loss_coef: -0.1"));
  EXPECT_NE(negative.find("run.yaml:5:25: 'model.router_aux_loss_coef' must be >= 0"), std::string::npos) << negative;
  const std::string word = error_of(kGood, {"model.router_aux_loss_coef=lots"});
  EXPECT_NE(word.find("'model.router_aux_loss_coef' must be a number"), std::string::npos) << word;
}

TEST(RunConfig, SyntaxErrorsNameTheLine) {
  const std::string e = error_of(replace(kGood, "  batch_size: 4", "  batch_size: [4"));
  EXPECT_NE(e.find("[config] run.yaml:"), std::string::npos) << e;
  EXPECT_NE(e.find("YAML syntax error"), std::string::npos) << e;
}

TEST(RunConfig, ModeFreezeCheckpointAndEarlyStopping) {
  std::string y = kGood;
  y += "mode: freeze\nfreeze:\n  layers: [0, \"2-3\", -1]\n  patterns: [\"*.mlp.*\"]\n  embeddings: false\n"
       "  lm_head: true\ncheckpoint:\n  every: 25\n  keep_last: 3\n  resume: required\n  strict: true\n";
  y = replace(y, "  every: 10\n", "  every: 10\n  patience: 3\n  min_delta: 0.01\n  at_start: true\n");
  const config::RunConfig c = config::parse_run_config(y, "run.yaml");
  EXPECT_EQ(c.mode, "freeze");
  EXPECT_EQ(c.freeze.layers, (std::vector<std::string>{"0", "2-3", "-1"}));
  EXPECT_EQ(c.freeze.patterns, (std::vector<std::string>{"*.mlp.*"}));
  EXPECT_FALSE(c.freeze.embeddings);
  EXPECT_TRUE(c.freeze.lm_head);
  EXPECT_FALSE(c.freeze.norm);
  EXPECT_EQ(c.checkpoint.every, 25);
  EXPECT_EQ(c.checkpoint.keep_last, 3);
  EXPECT_EQ(c.checkpoint.resume, "required");
  EXPECT_TRUE(c.checkpoint.strict);
  EXPECT_EQ(c.eval.patience, 3);
  EXPECT_EQ(c.eval.min_delta, 0.01);
  EXPECT_TRUE(c.eval.at_start);
  // The resolved YAML reads back to the same values.
  const config::RunConfig back = config::parse_run_config(config::to_yaml(c), "resolved");
  EXPECT_EQ(config::to_yaml(back), config::to_yaml(c));
  EXPECT_EQ(back.freeze.layers, c.freeze.layers);

  // Defaults: full mode, no periodic checkpoints, resume auto.
  const config::RunConfig d = config::parse_run_config(kGood, "run.yaml");
  EXPECT_EQ(d.mode, "full");
  EXPECT_EQ(d.checkpoint.every, 0);
  EXPECT_EQ(d.checkpoint.resume, "auto");

  std::string bad = kGood;
  bad += "mode: frozen\nfreeze:\n  layers: [\"1-x\"]\n  train_last: 2\n  embedding: true\ncheckpoint:\n  resume: maybe\n"
         "  keep_last: 0\n";
  const std::string e = error_of(bad);
  EXPECT_NE(e.find("'mode' must be one of full, freeze, lora, qlora, prefix, got 'frozen'"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'freeze.embedding'; did you mean 'embeddings'?"), std::string::npos) << e;
  EXPECT_NE(e.find("'freeze.train_last' and 'freeze.layers' exclude each other"), std::string::npos) << e;
  EXPECT_NE(e.find("got '1-x'"), std::string::npos) << e;
  EXPECT_NE(e.find("'freeze' only applies with 'mode: freeze'"), std::string::npos) << e;
  EXPECT_NE(e.find("'checkpoint.resume' must be one of auto, never, required, got 'maybe'"), std::string::npos) << e;
  EXPECT_NE(e.find("'checkpoint.keep_last' must be > 0"), std::string::npos) << e;
}

TEST(RunConfig, PrefixSection) {
  std::string y = kGood;
  y += "mode: prefix\nprefix:\n  num_virtual_tokens: 12\n  projection: true\n  encoder_hidden_size: 64\n  init: zero\n"
       "  seed: 3\n";
  const config::RunConfig c = config::parse_run_config(y, "run.yaml");
  EXPECT_EQ(c.mode, "prefix");
  EXPECT_EQ(c.prefix.num_virtual_tokens, 12);
  EXPECT_TRUE(c.prefix.projection);
  EXPECT_EQ(c.prefix.encoder_hidden_size, 64);
  EXPECT_EQ(c.prefix.init, "zero");
  EXPECT_EQ(c.prefix.seed, 3u);
  const config::RunConfig back = config::parse_run_config(config::to_yaml(c), "resolved");
  EXPECT_EQ(config::to_yaml(back), config::to_yaml(c));

  std::string bad = kGood;
  bad += "mode: prefix\nprefix:\n  num_virtual_tokens: 0\n  encoder_hidden_size: 8\n  init: xavier\n  tokens: 3\n";
  std::string e = error_of(bad);
  EXPECT_NE(e.find("'prefix.num_virtual_tokens' must be > 0"), std::string::npos) << e;
  EXPECT_NE(e.find("'prefix.encoder_hidden_size' only applies with 'prefix.projection: true'"), std::string::npos) << e;
  EXPECT_NE(e.find("'prefix.init' must be one of normal, zero"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'prefix.tokens'"), std::string::npos) << e;
  bad = std::string(kGood) + "mode: lora\nprefix:\n  num_virtual_tokens: 4\n";
  e = error_of(bad);
  EXPECT_NE(e.find("'prefix' only applies with 'mode: prefix'"), std::string::npos) << e;
  bad = std::string(kGood) + "mode: prefix\nprefix:\n  init_from: some/adapter\n  num_virtual_tokens: 4\n";
  e = error_of(bad);
  EXPECT_NE(e.find("'prefix.num_virtual_tokens' comes from the adapter of 'prefix.init_from'"), std::string::npos) << e;
}

TEST(RunConfig, EwcAndReplaySections) {
  std::string y = std::string(kGood) + "ewc:\n  state: runs/general.ewc.h5\n  lambda: 250\nreplay:\n  stores: [general.h5]\n"
                  "  ratio: 0.2\n";
  const config::RunConfig c = config::parse_run_config(y, "run.yaml");
  EXPECT_EQ(c.ewc.state, "runs/general.ewc.h5");
  EXPECT_EQ(c.ewc.lambda, 250.0);
  EXPECT_EQ(c.replay.stores, (std::vector<std::string>{"general.h5"}));
  EXPECT_EQ(c.replay.ratio, 0.2);
  const config::RunConfig back = config::parse_run_config(config::to_yaml(c), "resolved");
  EXPECT_EQ(config::to_yaml(back), config::to_yaml(c));

  std::string bad = std::string(kGood) + "mode: prefix\newc:\n  lambda: -1\n  fisher: x\nreplay:\n  stores: []\n  ratio: 1.5\n";
  const std::string e = error_of(bad);
  EXPECT_NE(e.find("'ewc.state' is required"), std::string::npos) << e;
  EXPECT_NE(e.find("'ewc.lambda' must be >= 0"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'ewc.fisher'"), std::string::npos) << e;
  EXPECT_NE(e.find("'ewc' does not apply with 'mode: prefix'"), std::string::npos) << e;
  EXPECT_NE(e.find("'replay.stores' needs at least one token store"), std::string::npos) << e;
  EXPECT_NE(e.find("'replay.ratio' must be in (0, 1), got 1.5"), std::string::npos) << e;
}

TEST(RunConfig, LoraSection) {
  std::string y = kGood;
  y += "mode: lora\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.05\n  targets: [all-linear]\n  rslora: true\n"
       "  init: gaussian\n  rank_pattern: {down_proj: 2, \"mlp\\\\..*\": 3}\n  alpha_pattern: {o_proj: 1.5}\n"
       "  extended_gemm: true\n  row_kernels: true\n  grad_splits: 4\n  group_projections: true\n"
       "  modules_to_save: [lm_head, embed_tokens]\n  layers_to_transform: [0, 2]\n  layers_pattern: [layers]\n"
       "  exclude_modules: [o_proj, model.layers.1.mlp.up_proj]\n  bias: lora_only\n";
  const config::RunConfig c = config::parse_run_config(y, "run.yaml");
  EXPECT_EQ(c.lora.r, 4);
  EXPECT_EQ(c.lora.bias, "lora_only");
  EXPECT_EQ(c.lora.exclude_modules, (std::vector<std::string>{"o_proj", "model.layers.1.mlp.up_proj"}));
  EXPECT_EQ(c.lora.modules_to_save, (std::vector<std::string>{"lm_head", "embed_tokens"}));
  EXPECT_EQ(c.lora.layers_to_transform, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(c.lora.layers_pattern, (std::vector<std::string>{"layers"}));
  EXPECT_TRUE(c.lora.group_projections);
  EXPECT_EQ(c.lora.grad_splits, 4);
  EXPECT_TRUE(c.lora.fused);  // the default
  EXPECT_TRUE(c.lora.extended_gemm);
  EXPECT_TRUE(c.lora.row_kernels);
  EXPECT_EQ(c.lora.targets, (std::vector<std::string>{"all-linear"}));
  EXPECT_TRUE(c.lora.rslora);
  EXPECT_EQ(c.lora.init, "gaussian");
  ASSERT_EQ(c.lora.rank_pattern.size(), 2u);
  EXPECT_EQ(c.lora.rank_pattern[0], (std::pair<std::string, int64_t>{"down_proj", 2}));  // file order kept
  EXPECT_EQ(c.lora.rank_pattern[1].first, "mlp\\..*");
  EXPECT_EQ(c.lora.alpha_pattern[0].second, 1.5);
  const config::RunConfig back = config::parse_run_config(config::to_yaml(c), "resolved");
  EXPECT_EQ(config::to_yaml(back), config::to_yaml(c));

  std::string bad = kGood;
  bad += "mode: lora\nlora:\n  r: 0\n  dropout: 1.5\n  init: xavier\n  rank_pattern: [1, 2]\n  alphaa: 3\n  grad_splits: 0\n"
         "  modules_to_save: [lm_head, \"\"]\n  layers_pattern: [\"(\"]\n  bias: some\n";
  const std::string e = error_of(bad);
  EXPECT_NE(e.find("'lora.bias' must be one of none, all, lora_only, got 'some'"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.r' must be > 0"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.dropout' must be in [0, 1)"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.init' must be one of kaiming, gaussian"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.rank_pattern' must map module patterns"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'alpha'?"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.grad_splits' must be in [1, 64], got 0"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.modules_to_save' entries must be module names, not empty"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.layers_pattern' entry '(' is not a regular expression"), std::string::npos) << e;
  EXPECT_NE(e.find("'lora.layers_pattern' only applies with 'lora.layers_to_transform'"), std::string::npos) << e;
  // Pattern keys are regular expressions, checked with the config (not when the model loads).
  const std::string e3 = error_of(std::string(kGood) + "mode: lora\nlora:\n  rank_pattern: {\"(\": 4, o_proj: 2}\n"
                                  "  alpha_pattern: {\"q[\": 2}\n");
  EXPECT_NE(e3.find("run.yaml:32:18: 'lora.rank_pattern' key '(' is not a regular expression"), std::string::npos) << e3;
  EXPECT_NE(e3.find("run.yaml:33:19: 'lora.alpha_pattern' key 'q[' is not a regular expression"), std::string::npos) << e3;
  EXPECT_NE(e3.find("run.yaml: 2 errors"), std::string::npos) << e3;
  const std::string e4 = error_of(std::string(kGood) + "mode: lora\n", {"lora.rank_pattern={'(': 4}"});
  EXPECT_NE(e4.find("override 'lora.rank_pattern={'(': 4}': 'lora.rank_pattern' key '(' is not a regular expression"),
            std::string::npos) << e4;
  const std::string e2 =
      error_of(std::string(kGood) + "mode: lora\nlora:\n  fused: false\n  row_kernels: true\n  group_projections: true\n");
  EXPECT_NE(e2.find("'lora.row_kernels' is a path of the fused layer; it needs 'lora.fused: true'"), std::string::npos) << e2;
  EXPECT_NE(e2.find("'lora.group_projections' is a path of the fused layer; it needs 'lora.fused: true'"),
            std::string::npos)
      << e2;
  const config::RunConfig plain = config::parse_run_config(std::string(kGood) + "mode: lora\nlora:\n  fused: false\n", "run.yaml");
  EXPECT_FALSE(plain.lora.fused);
  EXPECT_FALSE(config::parse_run_config(config::to_yaml(plain), "resolved").lora.fused);
}
