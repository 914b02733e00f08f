#pragma once
// A data::Batch (plain row-major arrays from the batcher) as tensors on a device, and the summed
// token loss that the trainer normalises itself.
//
// Why a SUM and not a mean: with gradient accumulation, a per-micro-batch mean weights each
// micro-batch equally whatever its number of supervised tokens, so 1 × (batch 8) and 4 × (batch 2)
// give different updates when sequences carry different numbers of targets (the bug that hit
// transformers, axolotl and Unsloth). The trainer sums per-token losses and divides by the target
// count of the whole optimizer step, counted once before any backward pass (see step.h).
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "ft/data/batcher.h"

namespace ft::train {

/// One micro-batch, (B, T) each.
struct BatchTensors {
  at::Tensor input_ids;       ///< int64
  at::Tensor labels;          ///< int64, kIgnoreIndex where nothing is predicted
  at::Tensor position_ids;    ///< int64, restart at 0 in every packed segment
  at::Tensor segment_ids;     ///< int64, -1 on padding (block-diagonal attention)
  at::Tensor attention_mask;  ///< int64, 1 token / 0 padding
  int64_t n_targets = 0;      ///< positions the shifted loss counts (labels[:, 1:] != ignore)
  /// Tokens (attention_mask = 1), or -1 where unknown (a hand-made batch): then read from
  /// attention_mask when needed. to_tensors() and split_rows() count on the host, so that the
  /// trainer never waits for the device to learn a batch's counts or whether it has padding.
  int64_t n_tokens = -1;
  /// Per row, the targets and tokens above (empty where unknown); split_rows() sums them.
  std::vector<int64_t> row_targets, row_tokens;
  /// Per row, its largest position_ids entry (empty where unknown): a longrope model's choice of
  /// rotary frequencies (ForwardOptions::max_position) without reading the device.
  std::vector<int64_t> row_max_positions;
  /// Per row, the lengths of its runs of equal segment_ids (its documents, and its padding), in
  /// order, from the host batch (empty where unknown): what varlen_offsets() turns into flash
  /// attention's offsets without reading the device.
  std::vector<std::vector<int32_t>> row_runs;
  /// Variable-length attention's offsets already on the device, with their longest-run bound
  /// (GraphedPasses' fixed-size copy); undefined: micro_batch_loss_sum makes them from row_runs.
  at::Tensor cu_seqlens;
  int64_t max_seqlen = 0;

  /// Tokens: n_tokens, or attention_mask's sum (a device read) where unknown; without a mask, every
  /// position.
  int64_t tokens() const;
  /// Whether attention_mask has padding, where known without reading the device (see n_tokens);
  /// without a mask, none.
  std::optional<bool> padding() const;
};

/// Copies `batch` into tensors on `device`: the five arrays as one int64 (5, B, T) host tensor, in
/// pinned memory and copied without blocking when the device is CUDA (a copy from pageable memory
/// waits for the device's queue). Throws ft::Error naming the array whose size disagrees with
/// rows × cols.
BatchTensors to_tensors(const data::Batch& batch, c10::Device device = c10::kCPU);

/// `b` cut into consecutive pieces of at most `rows` rows (the last may be shorter), each with its
/// own target count: the same rows, so the same step when accumulated with one divisor (step.h).
std::vector<BatchTensors> split_rows(const BatchTensors& b, int64_t rows);

/// model::ForwardOptions::cu_seqlens and max_seqlen for `b`'s rows on `device`: int32 offsets of
/// every row's runs (row_runs) in the flattened B·T tokens (to CUDA from pinned memory, without
/// blocking), and the longest run; {undefined, 0} where row_runs is unknown. Only CUDA's flash
/// attention takes them (micro_batch_loss_sum passes them for CUDA batches). With `runs` above the
/// batch's count, empty runs at the end pad the offsets to runs + 1 entries (a CUDA graph's
/// fixed-size input: flash attention skips an empty run).
std::pair<at::Tensor, int64_t> varlen_offsets(const BatchTensors& b, c10::Device device, int64_t runs = 0);
/// The number of runs in `b`'s rows (row_runs), or 0 where unknown.
int64_t varlen_runs(const BatchTensors& b);

/// Targets the shifted causal loss counts: labels[:, 1:] != ignore_index (logits at j predict j + 1).
int64_t count_targets(const at::Tensor& labels, int64_t ignore_index = data::kIgnoreIndex);

/// Sum over counted positions of the per-token cross-entropy, float32 scalar; logits (B, T, V) at j
/// predict labels (B, T) at j + 1 as in Hugging Face. Divided by count_targets() it is
/// model::causal_lm_loss().
at::Tensor causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels,
                              int64_t ignore_index = data::kIgnoreIndex);

}  // namespace ft::train
