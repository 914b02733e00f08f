// The trainer's building blocks: batch conversion, token-count normalisation across micro-batches,
// parameter groups, schedules, clipping and the non-finite guard.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <torch/optim/adamw.h>
#include <torch/csrc/autograd/function.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>
#include <set>
#include <unistd.h>

#include "ft/adapt/lora.h"
#include "ft/config/run_config.h"
#include "ft/data/token_store.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/train/batch.h"
#include "ft/train/optimizer.h"
#include "ft/train/run.h"
#include "ft/train/schedule.h"
#include "ft/train/step.h"
#include "ft/util/autocast.h"
#include "ft/util/error.h"
#include "test_util.h"

using namespace ft;

namespace {

io::ModelConfig tiny_config(bool qkv_bias = false) {
  io::ModelConfig c = test::tiny_config();
  c.qkv_bias = qkv_bias;
  return c;
}

// No q/k/v biases by default: the loss is invariant to k_proj.bias (softmax ignores a constant
// shift per query), so its gradient is rounding noise (~1e-9), and Adam's first step turns noise
// into ±lr whatever its size, which would make exact comparisons of updates meaningless.
model::CausalLM tiny_model(uint64_t seed = 0, bool qkv_bias = false) {
  model::CausalLM m(tiny_config(qkv_bias));
  init_weights(m, seed);
  return m;
}

// 8 packed-style rows of 16 tokens whose numbers of targets are very uneven, so that the 2-row
// micro-batches carry 2, 5, 16 and 29 targets: a per-micro-batch mean would weight the 2-target
// micro-batch like the 29-target one.
data::Batch uneven_batch() {
  const int64_t rows = 8, cols = 16;
  const int64_t targets_per_row[rows] = {1, 1, 2, 3, 7, 9, 15, 14};
  data::Batch b;
  b.rows = rows;
  b.cols = cols;
  uint64_t x = 12345;
  for (int64_t r = 0; r < rows; ++r) {
    // Two segments per row for rows ≥ 4, so positions restart and attention is block-diagonal.
    const int64_t split = r >= 4 ? 6 : cols;
    for (int64_t c = 0; c < cols; ++c) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const int64_t token = static_cast<int64_t>((x >> 33) % 97);
      b.input_ids.push_back(token);
      // Targets are the LAST targets_per_row[r] positions (position 0 is never a target).
      b.labels.push_back(c >= cols - targets_per_row[r] ? token : data::kIgnoreIndex);
      b.position_ids.push_back(c < split ? c : c - split);
      b.segment_ids.push_back(c < split ? 0 : 1);
      b.attention_mask.push_back(1);
    }
  }
  return b;
}

train::BatchTensors slice_rows(const train::BatchTensors& t, int64_t begin, int64_t end) {
  train::BatchTensors s;
  s.input_ids = t.input_ids.slice(0, begin, end);
  s.labels = t.labels.slice(0, begin, end);
  s.position_ids = t.position_ids.slice(0, begin, end);
  s.segment_ids = t.segment_ids.slice(0, begin, end);
  s.attention_mask = t.attention_mask.slice(0, begin, end);
  s.n_targets = train::count_targets(s.labels);
  return s;
}

std::vector<train::BatchTensors> split(const train::BatchTensors& t, int64_t micro) {
  std::vector<train::BatchTensors> v;
  for (int64_t r = 0; r < t.input_ids.size(0); r += micro) v.push_back(slice_rows(t, r, r + micro));
  return v;
}

std::vector<at::Tensor> grads(model::CausalLM& m) {
  std::vector<at::Tensor> g;
  for (const auto& p : m->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
  return g;
}

double max_rel_error(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, test::max_rel_error(a[i], b[i]));
  return worst;
}

std::vector<at::Tensor> params(model::CausalLM& m) {
  std::vector<at::Tensor> v;
  for (const auto& p : m->parameters()) v.push_back(p.detach().clone());
  return v;
}

// What naive accumulation does: a mean per micro-batch, divided by the number of micro-batches.
// It weights a 2-target micro-batch like a 29-target one. Only the negative control below uses it.
train::AccumulateResult accumulate_per_micro_batch_mean(model::CausalLM& m, const std::vector<train::BatchTensors>& mbs) {
  train::AccumulateResult r;
  for (const auto& mb : mbs) {
    model::ForwardOptions fo;
    fo.position_ids = mb.position_ids;
    fo.segment_ids = mb.segment_ids;
    at::Tensor mean = train::causal_lm_loss_sum(m->forward(mb.input_ids, fo), mb.labels) / mb.n_targets;
    at::Tensor scaled = mean / static_cast<double>(mbs.size());
    scaled.backward();
    r.loss += scaled.item<double>();
    r.n_targets += mb.n_targets;
  }
  return r;
}

struct AccumulationRun {
  std::vector<at::Tensor> first_grads, final_params;
  std::vector<double> losses;
};

// Two optimizer steps on the same data, so that AdamW's second moments (not just the sign of the
// first gradient) matter. In float64: the two summation orders then agree to ~1e-12 on any CPU.
// (In float32 they differed by 1.9e-5 relative on the GPU machine's CPU, and AdamW's per-element
// normalisation magnifies such rounding in the smallest gradients in proportion to lr.)
AccumulationRun run_two_steps(train::OptimizerKind kind, const std::vector<train::BatchTensors>& micro_batches,
                              bool naive = false) {
  model::CausalLM m = tiny_model();
  m->to(at::kDouble);
  train::OptimizerOptions oo;
  oo.kind = kind;
  oo.lr = kind == train::OptimizerKind::AdamW ? 1e-3 : 1.0;
  oo.weight_decay = 0.1;
  auto opt = train::make_optimizer(m, oo);
  train::StepCounters counters;
  AccumulationRun run;
  for (int step = 0; step < 2; ++step) {
    const train::AccumulateResult r =
        naive ? accumulate_per_micro_batch_mean(m, micro_batches) : train::accumulate_gradients(m, micro_batches);
    EXPECT_EQ(r.n_targets, 52);
    run.losses.push_back(r.loss);
    if (step == 0) run.first_grads = grads(m);
    EXPECT_TRUE(train::optimizer_step(*opt, r.loss, oo.lr, {}, counters).applied);
  }
  run.final_params = params(m);
  return run;
}

}  // namespace

TEST(TrainBatch, ToTensorsAndTargetCount) {
  data::Batch b = uneven_batch();
  train::BatchTensors t = train::to_tensors(b);
  EXPECT_EQ(t.input_ids.sizes(), (at::IntArrayRef{8, 16}));
  EXPECT_EQ(t.input_ids.scalar_type(), at::kLong);
  EXPECT_EQ(t.segment_ids.scalar_type(), at::kLong);
  EXPECT_EQ(t.n_targets, 1 + 1 + 2 + 3 + 7 + 9 + 15 + 14);
  EXPECT_EQ(t.segment_ids[5][10].item<int64_t>(), 1);
  EXPECT_EQ(t.position_ids[5][6].item<int64_t>(), 0);
  // The counts come from the host arrays and agree with the tensors': no device read needed.
  EXPECT_EQ(t.n_targets, train::count_targets(t.labels));
  EXPECT_EQ(t.n_tokens, 8 * 16);
  EXPECT_EQ(t.padding(), std::optional<bool>(false));
  // Pieces sum their rows' counts, padding included.
  b.attention_mask[3 * 16 + 15] = 0;
  b.attention_mask[6 * 16 + 2] = 0;
  const train::BatchTensors padded = train::to_tensors(b);
  EXPECT_EQ(padded.tokens(), padded.attention_mask.sum().item<int64_t>());
  EXPECT_EQ(padded.padding(), std::optional<bool>(true));
  for (const train::BatchTensors& p : train::split_rows(padded, 3)) {
    EXPECT_EQ(p.n_targets, train::count_targets(p.labels));
    EXPECT_EQ(p.n_tokens, p.attention_mask.sum().item<int64_t>());
    EXPECT_EQ(p.padding(), std::optional<bool>(!p.attention_mask.ne(0).all().item<bool>()));
  }
  // A hand-made batch (no host counts) is read from its tensors.
  train::BatchTensors hand;
  hand.attention_mask = padded.attention_mask;
  EXPECT_EQ(hand.padding(), std::nullopt);
  EXPECT_EQ(hand.tokens(), 8 * 16 - 2);
  // Without a mask every position is a token and there is no padding.
  train::BatchTensors bare;
  bare.input_ids = padded.input_ids;
  EXPECT_EQ(bare.padding(), std::optional<bool>(false));
  EXPECT_EQ(bare.tokens(), 8 * 16);
  b.attention_mask[3 * 16 + 15] = 1;
  b.attention_mask[6 * 16 + 2] = 1;

  b.labels.pop_back();
  try {
    train::to_tensors(b);
    ADD_FAILURE() << "expected an ft::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("labels has 127 values"), std::string::npos) << e.what();
  }
}

// A micro-batch may leave positions, segment ids and mask out (one document per row, no padding,
// default positions): the same loss and gradients as the batch that spells them out.
TEST(TrainBatch, OptionalInputsDefaultAsTheModelDoes) {
  data::Batch b = uneven_batch();
  for (int64_t i = 0; i < b.rows * b.cols; ++i) {
    b.position_ids[i] = i % b.cols;
    b.segment_ids[i] = 0;
  }
  const train::BatchTensors full = train::to_tensors(b);
  train::BatchTensors bare;
  bare.input_ids = full.input_ids;
  bare.labels = full.labels;
  bare.n_targets = full.n_targets;
  bare.n_tokens = full.n_tokens;
  auto run = [](const train::BatchTensors& batch) {
    model::CausalLM m = tiny_model();
    const train::AccumulateResult r = train::accumulate_gradients(m, {batch});
    return std::make_pair(r, grads(m));
  };
  const auto [a, ga] = run(full);
  const auto [c, gc] = run(bare);
  EXPECT_EQ(c.n_targets, a.n_targets);
  EXPECT_EQ(c.n_tokens, a.n_tokens);
  EXPECT_NEAR(c.loss, a.loss, 1e-6 * a.loss);
  EXPECT_LE(max_rel_error(gc, ga), 1e-5);
}

// Packed rows as variable-length sequences (train::varlen_offsets): every row's runs of equal
// segment ids, padding included, from the host batch, as offsets into the flattened rows; the
// pieces of split_rows keep their rows' runs.
TEST(TrainBatch, VarlenOffsetsFollowTheSegments) {
  data::Batch b = uneven_batch();
  for (int64_t c = 12; c < 16; ++c) {  // row 7 ends in padding
    b.segment_ids[7 * 16 + c] = -1;
    b.attention_mask[7 * 16 + c] = 0;
    b.labels[7 * 16 + c] = data::kIgnoreIndex;
  }
  const train::BatchTensors t = train::to_tensors(b);
  ASSERT_EQ(t.row_runs.size(), 8u);
  EXPECT_EQ(t.row_runs[0], (std::vector<int32_t>{16}));
  EXPECT_EQ(t.row_runs[5], (std::vector<int32_t>{6, 10}));
  EXPECT_EQ(t.row_runs[7], (std::vector<int32_t>{6, 6, 4}));
  // The offsets, against the starts read off the segment ids tensor: a row's first token, or a
  // token whose segment differs from the one before.
  auto expected = [](const train::BatchTensors& p) {
    const at::Tensor seg = p.segment_ids.reshape({-1});
    const int64_t cols = p.segment_ids.size(1);
    std::vector<int32_t> starts;
    for (int64_t i = 0; i < seg.numel(); ++i) {
      if (i % cols == 0 || seg[i].item<int64_t>() != seg[i - 1].item<int64_t>()) starts.push_back(static_cast<int32_t>(i));
    }
    starts.push_back(static_cast<int32_t>(seg.numel()));
    return starts;
  };
  auto values = [](const at::Tensor& cu) {
    EXPECT_EQ(cu.scalar_type(), at::kInt);
    return std::vector<int32_t>(cu.data_ptr<int32_t>(), cu.data_ptr<int32_t>() + cu.numel());
  };
  const auto [cu, longest] = train::varlen_offsets(t, at::kCPU);
  EXPECT_EQ(values(cu), expected(t));
  EXPECT_EQ(values(cu).size(), 4u + 3u * 2u + 3u + 1u);
  EXPECT_EQ(longest, 16);
  EXPECT_EQ(train::varlen_runs(t), 13);
  // Padded to a CUDA graph's fixed count with empty runs at the end.
  std::vector<int32_t> padded = expected(t);
  padded.resize(17, 8 * 16);
  EXPECT_EQ(values(train::varlen_offsets(t, at::kCPU, 16).first), padded);
  EXPECT_NE(test::error_of([&] { train::varlen_offsets(t, at::kCPU, 12); }).find("12 runs asked, the batch has 13"),
            std::string::npos);
  for (const train::BatchTensors& p : train::split_rows(t, 3)) {
    const auto [pc, pl] = train::varlen_offsets(p, at::kCPU);
    EXPECT_EQ(values(pc), expected(p));
    EXPECT_LE(pl, 16);
  }
  // A hand-made batch has no runs: no offsets (the model keeps the block-diagonal mask).
  EXPECT_FALSE(train::varlen_offsets(slice_rows(t, 0, 2), at::kCPU).first.defined());
}

// The returns of the autograd graph below `t` include a node named `name`.
bool graph_has(const at::Tensor& t, const std::string& name) {
  std::vector<torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    torch::autograd::Node* n = todo.back();
    todo.pop_back();
    if (n == nullptr || !seen.insert(n).second) continue;
    if (n->name() == name) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

// Variable-length flash attention over packed rows (CUDA, bf16 autocast) against SDPA with the
// block-diagonal mask: the same summed loss and gradients, with full attention and with a sliding
// window shorter than the documents, on rows with 1, 2 and 3 runs (padding as its own).
TEST(VarlenCuda, PackedRowsTrainAsWithTheBlockDiagonalMask) {
  FT_REQUIRE_CUDA();
  data::Batch b = uneven_batch();
  for (int64_t c = 12; c < 16; ++c) {
    b.segment_ids[7 * 16 + c] = -1;
    b.attention_mask[7 * 16 + c] = 0;
    b.labels[7 * 16 + c] = data::kIgnoreIndex;
  }
  const at::Device device(at::kCUDA);
  const train::BatchTensors packed = train::to_tensors(b, device);
  train::BatchTensors masked = packed;
  masked.row_runs.clear();  // no offsets: the mask path
  for (const int64_t window : {int64_t{0}, int64_t{5}}) {
    SCOPED_TRACE("window " + std::to_string(window));
    io::ModelConfig mc = tiny_config();
    mc.layer_window.assign(mc.num_hidden_layers, window);
    auto run = [&](const train::BatchTensors& batch, bool flash) {
      model::CausalLM m(mc);
      init_weights(m, 3);
      m->to(device);
      util::AutocastScope autocast(true, at::kCUDA);
      const at::Tensor loss = train::micro_batch_loss_sum(m, batch);
      EXPECT_EQ(graph_has(loss, "FlashAttentionBackward0"), flash);
      loss.backward();
      return std::make_pair(loss.item<double>(), grads(m));
    };
    const auto [loss_mask, g_mask] = run(masked, false);
    const auto [loss_flash, g_flash] = run(packed, true);
    EXPECT_NEAR(loss_flash, loss_mask, 1e-2 * std::abs(loss_mask));
    EXPECT_LE(max_rel_error(g_flash, g_mask), 5e-2);
  }
}

// gpt-oss's attention sinks through flash attention (kernels.flash_sinks) on CUDA: packed rows as
// variable-length runs, windowed and global layers, against the materialised path over the
// block-diagonal mask, under bf16 autocast; the sinks' own gradients too. (CPU:
// Model.SinkFlashAttentionMatchesTheMaterializedPath and ctest train_gpt_oss_flash_sinks_full_reference.)
TEST(VarlenCuda, AttentionSinksTrainThroughFlashAsMaterialized) {
  FT_REQUIRE_CUDA();
  data::Batch b = uneven_batch();
  const at::Device device(at::kCUDA);
  const train::BatchTensors packed = train::to_tensors(b, device);
  train::BatchTensors masked = packed;
  masked.row_runs.clear();  // no offsets: the mask path
  io::ModelConfig mc = test::tiny_config("gpt_oss");
  mc.layer_window.assign(mc.num_hidden_layers, 0);
  mc.layer_window[0] = 5;
  auto run = [&](const train::BatchTensors& batch, bool flash) {
    model::CausalLM m(mc);
    init_weights(m, 3);
    {
      at::NoGradGuard no_grad;  // sinks that matter: init_weights leaves them at 0
      for (auto& p : m->named_parameters()) {
        if (p.key().find("sinks") != std::string::npos) p.value().copy_(at::linspace(-2, 2, p.value().numel()));
      }
    }
    m->to(device);
    m->set_flash_sinks(flash);
    util::AutocastScope autocast(true, at::kCUDA);
    const at::Tensor loss = train::micro_batch_loss_sum(m, batch);
    loss.backward();
    std::vector<at::Tensor> sink_grads;
    for (auto& p : m->named_parameters()) {
      if (p.key().find("sinks") != std::string::npos) sink_grads.push_back(p.value().grad().clone());
    }
    return std::make_tuple(loss.item<double>(), grads(m), sink_grads);
  };
  const auto [loss_mask, g_mask, s_mask] = run(masked, false);
  const auto [loss_flash, g_flash, s_flash] = run(packed, true);
  EXPECT_NEAR(loss_flash, loss_mask, 1e-2 * std::abs(loss_mask));
  EXPECT_LE(max_rel_error(g_flash, g_mask), 5e-2);
  ASSERT_EQ(s_flash.size(), s_mask.size());
  for (size_t i = 0; i < s_flash.size(); ++i) EXPECT_LE(test::max_rel_error(s_flash[i], s_mask[i]), 5e-2) << "sinks " << i;
  // Rows of one document each, unpacked: the global layer's flash attention in the dense (B, T, H, D)
  // layout (the windowed layer has a mask, so it stays materialised).
  data::Batch whole = uneven_batch();
  for (size_t i = 0; i < whole.segment_ids.size(); ++i) {
    whole.segment_ids[i] = 0;
    whole.position_ids[i] = static_cast<int64_t>(i) % whole.cols;
  }
  train::BatchTensors rows = train::to_tensors(whole, device);
  rows.row_runs.clear();
  const auto [loss_rows, g_rows, s_rows] = run(rows, false);
  const auto [loss_dense, g_dense, s_dense] = run(rows, true);
  EXPECT_NEAR(loss_dense, loss_rows, 1e-2 * std::abs(loss_rows));
  EXPECT_LE(max_rel_error(g_dense, g_rows), 5e-2);
  for (size_t i = 0; i < s_dense.size(); ++i) EXPECT_LE(test::max_rel_error(s_dense[i], s_rows[i]), 5e-2) << "sinks " << i;
}

// model::chunked_lm_loss_sum against the whole logits' causal_lm_loss_sum, in float64: the loss and
// every gradient, for chunk sizes of 1 row, a ragged 7, exactly B·T and more; for a frozen head
// under LoRA (gradients reach the adapters through hidden), a trainable untied head, and a trainable
// tied embedding (its gradient from the head and from the lookup, summed); with ignored labels. And
// under bf16 autocast, where each chunk's logits are rounded as the whole logits are (the backward
// pass outside the autocast scope, as the trainer runs it).
TEST(TrainLoss, ChunkedEqualsTheWholeLogits) {
  const at::Tensor ids = at::arange(0, 22, at::kLong).remainder(97).mul(7).remainder(97).view({2, 11});
  at::Tensor labels = ids.clone();
  labels[0][3] = data::kIgnoreIndex;
  labels[1][7] = data::kIgnoreIndex;
  for (const std::string kind : {"lora", "untied head", "tied head"}) {
    for (const bool bf16 : {false, true}) {
      SCOPED_TRACE(kind + (bf16 ? ", bf16 autocast" : ", float64"));
      io::ModelConfig mc = tiny_config();
      mc.tie_word_embeddings = kind == "tied head";
      auto make = [&] {
        model::CausalLM m(mc);
        init_weights(m, 7);
        if (!bf16) m->to(at::kDouble);
        if (kind == "lora") {
          adapt::LoraOptions o;
          o.targets = {"all-linear"};
          o.r = 4;
          adapt::apply_lora(m, o);
          at::NoGradGuard no_grad;
          auto gen = at::make_generator<at::CPUGeneratorImpl>(3);  // the same B in every model made
          for (auto& item : m->named_parameters()) {
            if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 0.1, gen);
          }
        }
        return m;
      };
      auto run = [&](int64_t chunk) {
        model::CausalLM m = make();
        at::Tensor loss;
        {
          util::AutocastScope autocast(bf16, at::kCPU);
          if (chunk == 0) {
            loss = model::causal_lm_loss_sum(m->forward(ids), labels);
          } else {
            loss = model::chunked_lm_loss_sum(*m, m->hidden_states(ids), labels, chunk);
          }
        }
        loss.backward();  // outside the autocast scope: the recomputation restores the forward's state
        std::vector<at::Tensor> g;
        for (const auto& p : m->parameters()) {
          if (p.requires_grad()) g.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
        }
        return std::make_pair(loss.item<double>(), g);
      };
      const auto [whole, g_whole] = run(0);
      for (const int64_t chunk : {int64_t{1}, int64_t{7}, int64_t{22}, int64_t{64}}) {
        SCOPED_TRACE("chunk " + std::to_string(chunk));
        const auto [chunked, g_chunked] = run(chunk);
        EXPECT_NEAR(chunked, whole, (bf16 ? 1e-5 : 1e-13) * whole);
        ASSERT_EQ(g_chunked.size(), g_whole.size());
        // bf16: 3.9e-3 at worst (a chunk's GEMM rounds a few products differently); a recomputation
        // without the forward's autocast state gives 1.3e-2 to 2.1e-2.
        EXPECT_LE(max_rel_error(g_chunked, g_whole), bf16 ? 6e-3 : 1e-12);
      }
    }
  }
  model::CausalLM m = tiny_model();
  EXPECT_NE(test::error_of([&] { model::chunked_lm_loss_sum(*m, m->hidden_states(ids), labels, 0); })
                .find("chunk must be > 0"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { model::chunked_lm_loss_sum(*m, m->hidden_states(ids), labels.slice(1, 1), 4); })
                .find("disagree"),
            std::string::npos);
}

TEST(TrainLoss, SumOverTargetsIsTheHuggingFaceMean) {
  model::CausalLM m = tiny_model();
  train::BatchTensors t = train::to_tensors(uneven_batch());
  at::Tensor logits = m->forward(t.input_ids);
  const double sum = train::causal_lm_loss_sum(logits, t.labels).item<double>();
  const double mean = model::causal_lm_loss(logits, t.labels).item<double>();
  EXPECT_NEAR(sum / t.n_targets, mean, 1e-6 * mean);
}

// The heart of gradient accumulation: 1 × (batch 8) and 4 × (batch 2) give the same gradient, the
// same loss and the same parameters after optimizer steps, because both divide the summed token
// losses by the step's total target count.
TEST(TrainAccumulation, OneBatchOfEightEqualsFourMicroBatchesOfTwo) {
  train::BatchTensors whole = train::to_tensors(uneven_batch());
  const std::vector<train::BatchTensors> one = {whole};
  const std::vector<train::BatchTensors> four = split(whole, 2);
  ASSERT_EQ(four.size(), 4u);
  EXPECT_EQ(four[0].n_targets, 2);
  EXPECT_EQ(four[3].n_targets, 29);
  model::CausalLM fresh = tiny_model();
  const std::vector<at::Tensor> initial = params(fresh);

  for (train::OptimizerKind kind : {train::OptimizerKind::AdamW, train::OptimizerKind::SGD}) {
    SCOPED_TRACE(kind == train::OptimizerKind::AdamW ? "adamw" : "sgd");
    const AccumulationRun a = run_two_steps(kind, one), b = run_two_steps(kind, four);
    for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_NEAR(b.losses[i], a.losses[i], 1e-6 * a.losses[i]);
    EXPECT_LE(max_rel_error(b.first_grads, a.first_grads), 1e-9);
    EXPECT_LE(max_rel_error(b.final_params, a.final_params), 1e-9);
    // The updates are not vacuous: the weights moved far more than the tolerance...
    EXPECT_GT(max_rel_error(a.final_params, initial), 1e-3);
    // ...and the same runs with a per-micro-batch mean end far outside it (so this test fails if
    // accumulate_gradients normalised that way).
    const AccumulationRun naive = run_two_steps(kind, four, /*naive=*/true);
    EXPECT_GT(max_rel_error(naive.first_grads, a.first_grads), 1e-2);
    EXPECT_GT(max_rel_error(naive.final_params, a.final_params), 1e-4);
  }
}

// The routers' load-balancing loss in an accumulated step (ft/train/step.h): each micro-batch adds
// coef × its aux loss × its targets / N, with the padding of a padded micro-batch left out. Against
// that objective written out in float64 from model::load_balancing_loss over each micro-batch's
// unpadded rows; and the reported router_aux_loss is the targets-weighted mean of the micro-batches'.
TEST(TrainAccumulation, RouterAuxLossWeighsEachMicroBatchByItsTargets) {
  const io::ModelConfig c = test::tiny_config("mixtral");
  model::CausalLM m(c);
  init_weights(m, 6);
  m->to(at::kDouble);
  train::BatchTensors whole = train::to_tensors(uneven_batch());
  // The last row's final four tokens become padding (their labels were targets: now ignored).
  whole.attention_mask.index_put_({7, at::indexing::Slice(12, 16)}, 0);
  whole.segment_ids.index_put_({7, at::indexing::Slice(12, 16)}, -1);
  whole.labels.index_put_({7, at::indexing::Slice(12, 16)}, data::kIgnoreIndex);
  whole.n_targets = train::count_targets(whole.labels);
  whole.n_tokens = -1;
  const std::vector<train::BatchTensors> four = split(whole, 2);
  const double coef = 0.3;
  train::AccumulateHooks hooks;
  hooks.router_aux_loss_coef = coef;
  m->zero_grad();
  const train::AccumulateResult r = train::accumulate_gradients(m, four, hooks);
  const std::vector<at::Tensor> got = grads(m);
  ASSERT_TRUE(std::isfinite(r.router_aux_loss));

  // The objective by hand: each micro-batch's unpadded tokens routed alone.
  m->zero_grad();
  double aux_weighted = 0, ce = 0;
  at::Tensor objective = at::zeros({}, at::kDouble);
  for (const auto& mb : four) {
    std::vector<at::Tensor> router_logits;
    const at::Tensor ce_sum = train::micro_batch_loss_sum(m, mb, &router_logits);
    ASSERT_EQ(router_logits.size(), static_cast<size_t>(c.num_hidden_layers));
    const at::Tensor keep = mb.attention_mask.reshape({-1}).nonzero().squeeze(1);
    for (auto& l : router_logits) l = l.index_select(0, keep);
    const at::Tensor aux = model::load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok);
    aux_weighted += aux.item<double>() * static_cast<double>(mb.n_targets);
    ce += ce_sum.item<double>();
    objective = objective + ce_sum + coef * aux.to(at::kDouble) * static_cast<double>(mb.n_targets);
  }
  (objective / static_cast<double>(r.n_targets)).backward();
  EXPECT_EQ(r.n_targets, 48);
  EXPECT_NEAR(r.loss, ce / 48.0, 1e-9 * r.loss);
  EXPECT_NEAR(r.router_aux_loss, aux_weighted / 48.0, 1e-6 * r.router_aux_loss);
  EXPECT_LE(max_rel_error(got, grads(m)), 1e-6);
  // Not vacuous: without the term the gradients are elsewhere.
  m->zero_grad();
  const train::AccumulateResult plain = train::accumulate_gradients(m, four);
  EXPECT_TRUE(std::isnan(plain.router_aux_loss));
  EXPECT_GT(max_rel_error(got, grads(m)), 1e-3);
  // A dense model has no routers to balance.
  model::CausalLM dense = tiny_model();
  EXPECT_THROW(train::accumulate_gradients(dense, four, hooks), Error);
}

TEST(TrainOptimizer, NoDecayForNormsBiasesAndEmbeddings) {
  model::CausalLM m = tiny_model(0, /*qkv_bias=*/true);
  train::OptimizerOptions oo;
  oo.weight_decay = 0.1;
  const train::ParameterGroups g = train::group_parameters(m, oo);
  auto has = [](const std::vector<std::string>& v, const std::string& name) {
    return std::find(v.begin(), v.end(), name) != v.end();
  };
  EXPECT_TRUE(has(g.no_decay, "model.embed_tokens.weight"));
  EXPECT_TRUE(has(g.no_decay, "model.norm.weight"));
  EXPECT_TRUE(has(g.no_decay, "model.layers.0.input_layernorm.weight"));
  EXPECT_TRUE(has(g.no_decay, "model.layers.1.self_attn.q_proj.bias"));
  EXPECT_TRUE(has(g.decay, "model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(has(g.decay, "model.layers.1.mlp.down_proj.weight"));
  EXPECT_TRUE(has(g.decay, "lm_head.weight"));
  EXPECT_EQ(g.decay.size() + g.no_decay.size(), m->parameters().size());

  auto opt = train::make_optimizer(m, oo);
  ASSERT_EQ(opt->param_groups().size(), 2u);
  auto& decay = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options());
  auto& none = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options());
  EXPECT_DOUBLE_EQ(decay.weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(none.weight_decay(), 0.0);

  // Frozen parameters are in no group.
  m->model->embed_tokens->weight.requires_grad_(false);
  EXPECT_FALSE(has(train::group_parameters(m, oo).no_decay, "model.embed_tokens.weight"));
  oo.decay_all = true;
  EXPECT_TRUE(train::group_parameters(m, oo).no_decay.empty());
}

// Against the float64 formulas written out independently of the implementation.
TEST(TrainSchedule, MatchesFormulas) {
  const int64_t warmup = 10, total = 100;
  for (int64_t s = 0; s <= total + 5; ++s) {
    const double w = static_cast<double>(s) / warmup;
    const double p = static_cast<double>(s - warmup) / (total - warmup);
    const double cosine = s < warmup ? w : std::max(0.0, 0.5 * (1 + std::cos(std::numbers::pi * p)));
    const double linear = s < warmup ? w : std::max(0.0, static_cast<double>(total - s) / (total - warmup));
    const double constant = s < warmup ? w : 1.0;
    EXPECT_NEAR(train::lr_factor({train::ScheduleKind::Cosine, warmup, total}, s), cosine, 1e-15) << s;
    EXPECT_NEAR(train::lr_factor({train::ScheduleKind::Linear, warmup, total}, s), linear, 1e-15) << s;
    EXPECT_NEAR(train::lr_factor({train::ScheduleKind::Constant, warmup, total}, s), constant, 1e-15) << s;
  }
  EXPECT_DOUBLE_EQ(train::lr_factor({train::ScheduleKind::Cosine, 0, 10}, 0), 1.0);
  EXPECT_NEAR(train::lr_factor({train::ScheduleKind::Cosine, 0, 10}, 5), 0.5, 1e-15);
  EXPECT_DOUBLE_EQ(train::lr_factor({train::ScheduleKind::Linear, 0, 10}, 10), 0.0);
  EXPECT_THROW(train::lr_factor({train::ScheduleKind::Cosine, 10, 10}, 10), Error);
  EXPECT_THROW(train::parse_schedule_kind("cosin"), Error);
}

TEST(TrainOptimizer, ClipsByGlobalNorm) {
  model::CausalLM m = tiny_model();
  train::OptimizerOptions oo;
  oo.kind = train::OptimizerKind::SGD;
  oo.lr = 1.0;
  auto opt = train::make_optimizer(m, oo);
  train::accumulate_gradients(m, {train::to_tensors(uneven_batch())});
  const double norm = train::global_grad_norm(*opt);
  ASSERT_GT(norm, 0.5);
  const auto before = params(m);
  train::StepCounters c;
  train::StepOptions so;
  so.clip_grad_norm = 0.25;
  const train::StepOutcome out = train::optimizer_step(*opt, 1.0, 1.0, so, c);
  EXPECT_TRUE(out.applied);
  EXPECT_NEAR(out.grad_norm, norm, 1e-12);
  // Plain SGD with lr 1: the update IS the clipped gradient, whose global norm is the limit.
  double sq = 0;
  const auto after = params(m);
  for (size_t i = 0; i < after.size(); ++i) sq += (after[i] - before[i]).to(at::kDouble).pow(2).sum().item<double>();
  EXPECT_NEAR(std::sqrt(sq), 0.25, 1e-5);
}

// The global gradient norm is sqrt(Σ ‖g‖²) over every gradient the optimizer holds, whatever their
// dtypes (the norms are stacked per dtype before the float64 sum).
TEST(TrainOptimizer, GlobalNormCoversEveryGradientOfEveryDtype) {
  model::CausalLM m = tiny_model();
  auto opt = train::make_optimizer(m, {});
  double sq = 0;
  int64_t i = 0;
  for (auto& group : opt->param_groups()) {
    for (auto& p : group.params()) {
      const at::Tensor g = at::randn(p.sizes(), at::TensorOptions().dtype(i++ % 2 ? at::kDouble : at::kFloat));
      p.mutable_grad() = g;
      sq += g.to(at::kDouble).square().sum().item<double>();
    }
  }
  ASSERT_GT(i, 4);
  EXPECT_NEAR(train::global_grad_norm(*opt), std::sqrt(sq), 1e-6 * std::sqrt(sq));
}

// Steps inside one long autocast scope (as the trainer runs them) equal steps that each have their
// own scope: the optimizer step clears autocast's cache of bf16 weight copies, which would
// otherwise hold the first step's weights for every later forward pass (checked with CPU
// autocast; the trainer's is CUDA's, with the same cache).
TEST(TrainOptimizer, StepsUnderOneAutocastScopeSeeTheUpdatedWeights) {
  const std::vector<train::BatchTensors> batch = {train::to_tensors(uneven_batch())};
  train::OptimizerOptions oo;
  oo.lr = 1e-2;
  auto run = [&](bool one_scope) {
    model::CausalLM m = tiny_model();
    auto opt = train::make_optimizer(m, oo);
    train::StepCounters c;
    std::vector<double> losses;
    std::optional<util::AutocastScope> outer;
    if (one_scope) outer.emplace(true, at::kCPU);
    for (int i = 0; i < 3; ++i) {
      std::optional<util::AutocastScope> inner;
      if (!one_scope) inner.emplace(true, at::kCPU);
      const train::AccumulateResult r = train::accumulate_gradients(m, batch);
      losses.push_back(r.loss);
      EXPECT_TRUE(train::optimizer_step(*opt, r.loss, oo.lr, {}, c).applied);
    }
    return std::make_pair(losses, params(m));
  };
  const auto [losses_one, weights_one] = run(true);
  const auto [losses_each, weights_each] = run(false);
  ASSERT_EQ(losses_one.size(), 3u);
  EXPECT_NE(losses_one[1], losses_one[0]);  // training moved the weights
  for (size_t i = 0; i < losses_one.size(); ++i) EXPECT_EQ(losses_one[i], losses_each[i]) << "step " << i;
  ASSERT_EQ(weights_one.size(), weights_each.size());
  for (size_t i = 0; i < weights_one.size(); ++i) EXPECT_TRUE(weights_one[i].equal(weights_each[i])) << i;
}

// A NaN in one gradient element (or a non-finite loss) skips the step: weights, AdamW moments and
// per-parameter step counts, and the trainer's step counter are left exactly as they were.
TEST(TrainOptimizer, NonFiniteStepIsSkippedAndLeavesEverythingUntouched) {
  model::CausalLM m = tiny_model();
  train::OptimizerOptions oo;
  oo.lr = 1e-2;
  oo.weight_decay = 0.1;
  auto opt = train::make_optimizer(m, oo);
  const std::vector<train::BatchTensors> batch = {train::to_tensors(uneven_batch())};
  train::StepCounters c;
  // One real step first, so that the optimizer has moments to protect.
  train::optimizer_step(*opt, train::accumulate_gradients(m, batch).loss, oo.lr, {}, c);
  ASSERT_EQ(c.step, 1);

  auto snapshot_state = [&] {
    std::vector<at::Tensor> s;
    std::vector<int64_t> steps;
    for (const auto& p : m->parameters()) {
      auto& st = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(p.unsafeGetTensorImpl()));
      s.push_back(st.exp_avg().clone());
      s.push_back(st.exp_avg_sq().clone());
      steps.push_back(st.step());
    }
    return std::make_pair(s, steps);
  };
  auto equal = [](const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
    for (size_t i = 0; i < a.size(); ++i) {
      if (!at::equal(a[i], b[i])) return false;
    }
    return true;
  };

  for (const char* inject : {"nan_grad", "inf_grad", "nan_loss"}) {
    SCOPED_TRACE(inject);
    const auto weights = params(m);
    const auto state = snapshot_state();
    train::AccumulateResult r = train::accumulate_gradients(m, batch);
    at::Tensor g = m->model->layers[1]->as<model::DecoderLayer>()->mlp->up_proj->weight.grad();
    if (std::string(inject) == "nan_grad") g[3][4] = std::numeric_limits<float>::quiet_NaN();
    if (std::string(inject) == "inf_grad") g[0][0] = std::numeric_limits<float>::infinity();
    if (std::string(inject) == "nan_loss") r.loss = std::nan("");
    const int64_t skipped = c.skipped;
    const train::StepOutcome out = train::optimizer_step(*opt, r.loss, oo.lr, {}, c);
    EXPECT_FALSE(out.applied);
    EXPECT_EQ(c.step, 1);
    EXPECT_EQ(c.skipped, skipped + 1);
    EXPECT_TRUE(equal(params(m), weights));
    const auto after = snapshot_state();
    EXPECT_TRUE(equal(after.first, state.first));
    EXPECT_EQ(after.second, state.second);
    for (const auto& p : m->parameters()) EXPECT_TRUE(!p.grad().defined() || p.grad().abs().sum().item<double>() == 0);
  }

  // Under the stop policy the same injection is an error naming the step.
  train::accumulate_gradients(m, batch);
  m->lm_head->weight.grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
  train::StepOptions stop;
  stop.on_nonfinite = train::NonFinitePolicy::Stop;
  try {
    train::optimizer_step(*opt, 1.0, oo.lr, stop, c);
    ADD_FAILURE() << "expected an ft::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 1: non-finite gradient"), std::string::npos) << e.what();
  }
  // And a finite step afterwards proceeds normally.
  EXPECT_TRUE(train::optimizer_step(*opt, train::accumulate_gradients(m, batch).loss, oo.lr, {}, c).applied);
  EXPECT_EQ(c.step, 2);
}

// The whole recipe on a synthetic store whose documents follow a learnable rule (next = 3·t + 1 mod
// 97): the loss must fall well below chance in a few steps, every metrics line parses, evaluation
// runs every eval.every steps and at the end, and the saved checkpoint loads.
// A mixture of experts with model.router_aux_loss_coef: the run says so, every train line of
// metrics.jsonl carries the step's router_aux_loss (near top_k = 2 for balanced routers) beside the
// language-model loss, and the setting is part of the run's identity (in config.yaml). On a dense
// model the setting is an error naming it; 0 turns the loss off.
TEST(TrainRun, MixtureOfExpertsLogsTheRoutersAuxLoss) {
  const std::filesystem::path dir = test::scratch_dir("train_run_aux");
  std::ofstream(dir / "moe.json") << io::model_config_to_json(test::tiny_config("mixtral"));
  std::ofstream(dir / "dense.json") << io::model_config_to_json(tiny_config());
  test::write_rule_store((dir / "store.h5").string(), 40, 3, 20);
  config::RunConfig c;
  c.source = "test";
  c.model.config = (dir / "moe.json").string();
  c.model.router_aux_loss_coef = 0.05;
  c.data.train = {(dir / "store.h5").string()};
  c.data.seq_len = 32;
  c.data.batch_size = 2;
  c.data.grad_accum = 2;
  c.max_steps = 3;
  c.schedule.total_steps = 3;
  c.eval.held_out_docs = 0;
  c.output_dir = (dir / "run").string();
  std::FILE* log = std::tmpfile();
  train::run_training(c, log);
  std::rewind(log);
  std::string text(1 << 16, '\0');
  text.resize(std::fread(text.data(), 1, text.size(), log));
  std::fclose(log);
  EXPECT_NE(text.find("routers' load-balancing loss x 0.05 in the objective (model.router_aux_loss_coef; top 2 of 4"),
            std::string::npos)
      << text;
  std::ifstream metrics(dir / "run" / "metrics.jsonl");
  std::string line;
  int train_lines = 0;
  while (std::getline(metrics, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.at("type") != "train") continue;
    ++train_lines;
    const double aux = j.at("router_aux_loss").get<double>();
    EXPECT_GT(aux, 1.5);  // (top_k when perfectly balanced; 4 when every token picks the same two)
    EXPECT_LT(aux, 4.0);
  }
  EXPECT_EQ(train_lines, 3);
  std::ifstream yaml(dir / "run" / "config.yaml");
  EXPECT_NE(std::string(std::istreambuf_iterator<char>(yaml), {}).find("router_aux_loss_coef: 0.05"), std::string::npos);

  c.model.config = (dir / "dense.json").string();
  c.output_dir = (dir / "dense").string();
  std::FILE* quiet = std::tmpfile();
  EXPECT_NE(test::error_of([&] { train::run_training(c, quiet); })
                .find("model.router_aux_loss_coef weighs the routers' load-balancing loss, but " +
                      (dir / "dense.json").string() + " has no mixture-of-experts layers"),
            std::string::npos);
  c.model.router_aux_loss_coef = 0.0;  // off: fine on a dense model
  c.output_dir = (dir / "dense0").string();
  EXPECT_EQ(train::run_training(c, quiet).steps, 3);
  std::fclose(quiet);
  std::filesystem::remove_all(dir);
}

TEST(TrainRun, EndToEndOnASyntheticStore) {
  const std::filesystem::path dir = test::scratch_dir("train_run");
  std::ofstream(dir / "config.json") << io::model_config_to_json(tiny_config());
  test::write_rule_store((dir / "store.h5").string(), 80, 7, 36);
  config::RunConfig c;
  c.source = "test";
  c.model.config = (dir / "config.json").string();
  c.data.train = {(dir / "store.h5").string()};
  c.data.seq_len = 32;
  c.data.batch_size = 4;
  c.data.grad_accum = 2;
  c.optimizer.lr = 1e-2;
  c.schedule.name = "constant";
  c.max_steps = 15;
  c.schedule.total_steps = 15;
  c.eval.held_out_docs = 8;
  c.eval.every = 5;
  c.eval.batch_size = 4;
  c.output_dir = (dir / "run").string();
  std::FILE* log = std::getenv("LIBFT_TEST_VERBOSE") ? stderr : std::tmpfile();
  const train::RunSummary s = train::run_training(c, log);
  if (log != stderr) std::fclose(log);

  EXPECT_EQ(s.steps, 15);
  EXPECT_EQ(s.skipped, 0);
  EXPECT_NEAR(s.first_loss, std::log(97.0), 0.3);  // near chance at initialisation
  EXPECT_LT(s.last_loss, s.first_loss - 1.0) << s.first_loss << " -> " << s.last_loss;
  ASSERT_TRUE(s.final_eval_loss.count("held_out"));
  EXPECT_LT(s.final_eval_loss.at("held_out"), s.first_loss - 1.0);

  std::ifstream metrics(dir / "run" / "metrics.jsonl");
  std::string line;
  std::vector<int64_t> train_steps, eval_steps;
  while (std::getline(metrics, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);  // throws on a malformed line
    if (j.at("type") == "train") train_steps.push_back(j.at("step"));
    if (j.at("type") == "eval") {
      eval_steps.push_back(j.at("step"));
      EXPECT_NEAR(j.at("perplexity").get<double>(), std::exp(j.at("loss").get<double>()), 1e-9);
    }
  }
  EXPECT_EQ(train_steps.size(), 15u);
  EXPECT_EQ(eval_steps, (std::vector<int64_t>{5, 10, 15}));
  EXPECT_TRUE(std::filesystem::exists(dir / "run" / "config.yaml"));
  model::CausalLM trained = io::load_pretrained(s.final_dir);
  EXPECT_EQ(trained->config().vocab_size, 97);
  std::filesystem::remove_all(dir);
}
