#pragma once
// Forward and backward passes replayed as CUDA graphs (run config `cuda_graphs: true`).
//
// On a GPU, every ATen call of a training step costs host time: dispatch, a kernel launch, the
// caching allocator. A small model, or a large one split into short micro-batches, can spend more
// time issuing kernels than running them, most of all with adapters, whose rank-r products are many
// small operations. A CUDA graph records a pass's kernels once and replays them with one launch.
//
// Each micro-batch shape (rows, columns, whether it has padding) is captured once: two warm-up
// passes on a side stream first (lazy set-up such as cuBLAS workspaces must happen outside a
// capture), then the capture, with autocast's weight-cast cache off so that every replay casts the
// current weights. A replay copies the micro-batch into the graph's input tensors and sets the
// step's divisor 1/N on the device, so the loss and the gradient are accumulate_gradients': the
// same sum over the step's targets, divided once. The gradients are ADDED into the parameters'
// .grad, which must therefore stay allocated: the trainer zeroes them in place
// (StepOptions::zero_in_place). The graphs share one memory pool, which keeps their activations
// between steps.
//
// Not with: data parallelism (the gradient all-reduce hooks), activation checkpointing (its
// recomputation saves and restores generator states), before_forward hooks. The run config and
// the trainer check these.
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "ft/model/llama.h"
#include "ft/train/batch.h"
#include "ft/train/step.h"

namespace ft::train {

class GraphedPasses {
 public:
  /// For `model` on CUDA `device`; throws ft::Error on any other device, or in a build without CUDA.
  GraphedPasses(model::CausalLM& model, c10::Device device);
  ~GraphedPasses();
  GraphedPasses(const GraphedPasses&) = delete;
  GraphedPasses& operator=(const GraphedPasses&) = delete;

  /// As accumulate_gradients(model, passes): the same loss, target and token counts, and the same
  /// gradients added to .grad. A micro-batch whose padding is unknown (a hand-made BatchTensors
  /// without host counts) runs eagerly. position_ids, segment_ids and attention_mask may be left
  /// undefined (default positions, one document per row, no padding), as in model forward.
  AccumulateResult accumulate(const std::vector<BatchTensors>& passes);

  /// Shapes captured so far.
  size_t captured() const;

  /// Drops every captured graph and gives their memory back (the trainer calls it before retrying
  /// a step with a halved micro-batch, whose shape needs graphs of its own).
  void reset();

 private:
  struct Graph;
  Graph& graph_for(const BatchTensors& b);
  /// Makes grads_ the parameters' gradients again where something released or replaced them
  /// (released: zeroed; replaced: its values copied in).
  void attach_gradients();

  model::CausalLM model_;
  c10::Device device_;
  std::vector<at::Tensor> trainable_;
  /// The gradients the graphs add into, one per trainable parameter (defined from the first capture).
  std::vector<at::Tensor> grads_;
  at::Tensor inv_n_;  ///< float32 scalar on the device: 1 / the step's target count
  /// rows, columns, padding, and whether position_ids, segment_ids and attention_mask are given
  using Key = std::tuple<int64_t, int64_t, bool, bool, bool, bool, int64_t>;
  std::map<Key, std::unique_ptr<Graph>> graphs_;
  /// The memory pool every graph allocates from (at::cuda::MempoolId_t; {0, 0} until the first
  /// capture makes it).
  std::pair<unsigned long long, unsigned long long> pool_{0, 0};
};

}  // namespace ft::train
