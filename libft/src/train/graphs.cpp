#include "ft/train/graphs.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include "ft/util/error.h"

#ifdef LIBFT_WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ft::train {

#ifdef LIBFT_WITH_CUDA_KERNELS

// One captured pass: its input tensors (the graph reads them at every replay), its loss sum (the
// graph writes it) and the graph.
struct GraphedPasses::Graph {
  BatchTensors input;
  at::Tensor loss_sum;
  at::cuda::CUDAGraph graph;
};

namespace {

// `to` waits for what `from` has queued so far.
void wait_for(const c10::cuda::CUDAStream& to, const c10::cuda::CUDAStream& from) {
  at::cuda::CUDAEvent event;
  event.record(from);
  event.block(to);
}

// A defined tensor's own copy; an undefined one stays undefined (an input the pass goes without).
at::Tensor own(const at::Tensor& t) { return t.defined() ? t.clone() : at::Tensor(); }

// The runs of variable-length attention a graph for `b` holds: b's count of documents (and padding
// runs) rounded up to a power of two, or 0 for a batch without them (the model's mask path).
int64_t run_slots(const BatchTensors& b) {
  const int64_t n = varlen_runs(b);
  if (n == 0 || !b.input_ids.is_cuda()) return 0;
  int64_t slots = 1;
  while (slots < n) slots *= 2;
  return slots;
}

// Copies `from` into the graph's input `to`, both defined or both not (the graph's key says which).
void refill(at::Tensor& to, const at::Tensor& from) {
  if (to.defined()) to.copy_(from);
}

}  // namespace

GraphedPasses::GraphedPasses(model::CausalLM& model, c10::Device device) : model_(model), device_(device) {
  FT_CHECK(device.is_cuda(), "[train] cuda_graphs needs a CUDA device (device is ", device.str(), ")");
  // A captured pass keeps the rotary frequencies of its capture; longrope's depend on each batch.
  FT_CHECK(model_->config().rope.type != io::RopeType::LongRope, "[train] cuda_graphs is not supported with a "
           "longrope rotary embedding (", model_->config().model_type, "): its frequencies depend on each batch's "
           "largest position");
  // A mixture of experts sizes each expert's batch by its routing, on the host, pass by pass.
  FT_CHECK(model_->config().num_experts == 0, "[train] cuda_graphs is not supported with a mixture of experts (",
           model_->config().model_type, "): each pass routes a different number of tokens to each expert");
  for (const at::Tensor& p : model_->parameters()) {
    if (p.requires_grad()) trainable_.push_back(p);
  }
  FT_CHECK(!trainable_.empty(), "[train] cuda_graphs: the model has nothing to train");
  inv_n_ = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
}

GraphedPasses::~GraphedPasses() = default;

size_t GraphedPasses::captured() const { return graphs_.size(); }

void GraphedPasses::reset() {
  graphs_.clear();  // the last graph using the shared pool gives its memory back
  pool_ = {0, 0};
}

GraphedPasses::Graph& GraphedPasses::graph_for(const BatchTensors& b) {
  // What decides the captured kernels: the shape, the padding, and which optional inputs exist.
  // Packed rows' documents (variable-length attention): a fixed number of runs per graph, the
  // batch's count rounded up to a power of two (empty runs pad it), so that batches of one shape
  // share a few graphs; the offsets are refilled before each replay.
  const Key key{b.input_ids.size(0), b.input_ids.size(1), *b.padding(), b.position_ids.defined(),
                b.segment_ids.defined(), b.attention_mask.defined(), run_slots(b)};
  auto& slot = graphs_[key];
  if (slot) return *slot;
  auto g = std::make_unique<Graph>();
  // The graph's inputs: tensors of its own, holding this micro-batch (the warm-up passes use it).
  g->input.input_ids = b.input_ids.clone();
  g->input.labels = b.labels.clone();
  g->input.position_ids = own(b.position_ids);
  g->input.segment_ids = own(b.segment_ids);
  g->input.attention_mask = own(b.attention_mask);
  g->input.n_targets = b.n_targets;
  g->input.n_tokens = b.n_tokens;
  // Variable-length attention: offsets of std::get<6>(key) runs, refilled at every replay, and
  // the row length as the longest run (flash attention sizes its grid by it, so it must not change).
  // The bound costs grid blocks that exit at once, not memory: torch 2.11 keeps the log-sum-exp
  // unpadded, (heads, tokens) (its meta function for _flash_attention_forward), and the backward
  // pass sizes its accumulators by tokens + 128 per run, never by the longest run.
  if (std::get<6>(key) > 0) {
    g->input.cu_seqlens = varlen_offsets(b, device_, std::get<6>(key)).first.clone();
    g->input.max_seqlen = b.input_ids.size(1);
  }
  // The backward pass adds into .grad in place only where a gradient exists: make every one exist,
  // so that the captured additions write into the tensors the optimizer reads.
  if (grads_.empty()) {
    at::NoGradGuard no_grad;
    for (at::Tensor& p : trainable_) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads_.push_back(p.grad());
    }
  }
  attach_gradients();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
  wait_for(side, current);
  {
    c10::cuda::CUDAStreamGuard guard(side);
    // Warm-up: gradients through autograd::grad, so .grad is left alone.
    for (int i = 0; i < 2; ++i) {
      const at::Tensor loss = micro_batch_loss_sum(model_, g->input) * inv_n_;
      torch::autograd::grad({loss}, trainable_, {}, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    }
    at::autocast::clear_cache();
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    bool capturing = false;
    // End a failed capture first (a stream left capturing fails every later CUDA call) and forget
    // the graph (captured() counts the ones that replay).
    auto abandon = [&] {
      if (capturing) {
        try {
          g->graph.capture_end();
        } catch (const std::exception&) {  // the capture is invalid: ending it is all that is wanted
        }
      }
      at::autocast::set_autocast_cache_enabled(cache);
      graphs_.erase(key);
    };
    try {
      // Every shape's graph allocates from one memory pool: replays run one at a time on one
      // stream, and what outlives a replay (the loss sum, read at once; the gradients, outside the
      // pool) stays allocated, so one shape's activations may reuse another's memory. A pool per
      // graph would hold every shape's working set at once.
      g->graph.capture_begin(at::cuda::MempoolId_t{pool_.first, pool_.second});
      capturing = true;
      g->loss_sum = micro_batch_loss_sum(model_, g->input);
      (g->loss_sum * inv_n_).backward();
      capturing = false;  // capture_end ends the capture even when it throws
      g->graph.capture_end();
      if (pool_.first == 0 && pool_.second == 0) {
        const at::cuda::MempoolId_t id = g->graph.pool();
        pool_ = {id.first, id.second};
      }
      // Only the storage is wanted: the autograd graph of the captured pass need not stay alive.
      g->loss_sum = g->loss_sum.detach();
    } catch (const c10::OutOfMemoryError&) {
      // Out of memory: the trainer's on_oom handling (halving the micro-batch) takes it from here.
      abandon();
      throw;
    } catch (const std::exception& e) {
      // A pass that cannot be captured: say which pass and what to do.
      abandon();
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      FT_FAIL("[train] cuda_graphs: the forward and backward pass of a ", std::get<0>(key), " x ", std::get<1>(key),
              " micro-batch could not be captured as a CUDA graph (", what, "); run without cuda_graphs");
    }
    at::autocast::set_autocast_cache_enabled(cache);
  }
  wait_for(current, side);
  slot = std::move(g);
  return *slot;
}

void GraphedPasses::attach_gradients() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < grads_.size(); ++i) {
    at::Tensor& p = trainable_[i];
    if (p.grad().defined() && p.grad().is_same(grads_[i])) continue;
    if (p.grad().defined()) {
      grads_[i].copy_(p.grad());
    } else {
      grads_[i].zero_();
    }
    p.mutable_grad() = grads_[i];
  }
}

AccumulateResult GraphedPasses::accumulate(const std::vector<BatchTensors>& passes) {
  FT_CHECK(!passes.empty(), "[train] an optimizer step needs at least one micro-batch");
  AccumulateResult r;
  for (const BatchTensors& b : passes) {
    r.n_targets += b.n_targets;
    r.n_tokens += b.tokens();
  }
  if (r.n_targets == 0) return r;
  const double inv_n = 1.0 / static_cast<double>(r.n_targets);
  attach_gradients();
  inv_n_.fill_(inv_n);  // float32, as the eager pass's product with the double inv_n computes it
  at::Tensor loss_sum;
  for (const BatchTensors& b : passes) {
    if (b.n_targets == 0) continue;
    at::Tensor s64;
    if (!b.padding().has_value()) {  // shape known, padding not: the eager pass
      const at::Tensor sum = micro_batch_loss_sum(model_, b);
      s64 = sum.detach().to(at::kDouble);
      (sum * inv_n).backward();
    } else {
      Graph& g = graph_for(b);
      g.input.input_ids.copy_(b.input_ids);
      g.input.labels.copy_(b.labels);
      refill(g.input.position_ids, b.position_ids);
      refill(g.input.segment_ids, b.segment_ids);
      refill(g.input.attention_mask, b.attention_mask);
      if (g.input.cu_seqlens.defined()) g.input.cu_seqlens.copy_(varlen_offsets(b, device_, g.input.cu_seqlens.size(0) - 1).first);
      g.graph.replay();
      s64 = g.loss_sum.to(at::kDouble);
    }
    loss_sum = loss_sum.defined() ? loss_sum + s64 : s64;
  }
  r.loss = loss_sum.item<double>() * inv_n;
  return r;
}

#else  // a build without CUDA: the constructor says so

struct GraphedPasses::Graph {};

GraphedPasses::GraphedPasses(model::CausalLM& model, c10::Device device) : model_(model), device_(device) {
  FT_FAIL("[train] cuda_graphs needs libft built with CUDA (this build has no CUDA kernels)");
}
GraphedPasses::~GraphedPasses() = default;
size_t GraphedPasses::captured() const { return 0; }
void GraphedPasses::reset() {}
GraphedPasses::Graph& GraphedPasses::graph_for(const BatchTensors&) { FT_FAIL("[train] built without CUDA"); }
AccumulateResult GraphedPasses::accumulate(const std::vector<BatchTensors>&) { FT_FAIL("[train] built without CUDA"); }

#endif

}  // namespace ft::train
