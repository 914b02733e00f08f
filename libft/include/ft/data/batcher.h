#pragma once
// Batcher: documents of token stores → batches of plain row-major arrays (torch-free; the trainer
// wraps them in tensors with from_blob). Deterministic from a seed, resumable from a small state,
// sharded across data-parallel ranks, mixing several stores, with a held-out evaluation split.
//
// ROWS. The batcher produces one global stream of rows; row k is a fixed function of the seed, the
// options and the stores, whatever the rank or the world size.
//
//  Packed mode (for pre-training-style and instruction data alike): the documents of an epoch, in
//  the epoch's order, are concatenated into rows of exactly seq_len tokens.
//   - input_ids are the tokens; labels are the same tokens with -100 where the token is not
//     trainable AND at the first position of every segment; the loss shifts by one as Hugging
//     Face's does (logits at position j predict labels[j + 1]), so no position predicts across a
//     document boundary. Rows are seq_len long, not seq_len + 1: the shift happens in the loss.
//   - position_ids restart at 0 at the start of every segment; segment_ids number the segments of
//     a row 0, 1, 2, ... (-1 on padding), so the trainer can build block-diagonal attention (or
//     cu_seqlens for varlen kernels) that never crosses documents.
//   - A document that does not fit in the rest of a row is split: the row is filled, and the next
//     row continues the document with a new segment whose positions restart at 0 (a continuation
//     cannot see the earlier part, so it is a fresh context to the model, and every position stays
//     below seq_len) and which starts with the LAST token of the previous fragment. That one token
//     of overlap (label -100 as a segment start) lets the first new token still be predicted, so
//     every trainable token but a document's first is a target exactly once per epoch, however the
//     document is split.
//     A row never ends with a one-token fragment of a document that continues (it would carry no
//     target); that slot is padding instead.
//   - The last row of an epoch is padded (pad_id, label -100, segment -1, attention_mask 0); the
//     next epoch starts a fresh row.
//  Padded mode: one document per row; the batch's arrays are as wide as its longest row (or
//   seq_len with pad_to_seq_len), padded on the right. Documents longer than seq_len are truncated
//   to their first seq_len tokens, or rejected when the batcher is built (TooLongPolicy::Error).
//   labels, position_ids and segment_ids follow the same rules (one segment per row).
//
// EPOCHS AND SHUFFLING. Epoch e visits every document of the split once, in an order shuffled by
// Fisher–Yates with a generator seeded from (seed, stream, e) (or in store order without shuffle).
// max_epochs > 0 ends the stream; 0 makes it endless (the trainer counts steps).
//
// SHARDING. A step consumes batch_size × world consecutive global rows; rank r takes rows
// [r × batch_size, (r + 1) × batch_size) of them. Ranks therefore never share a row, together they
// see exactly the rows one rank with batch_size × world would see, and every rank gets the same
// number of rows per step (when a finite stream ends inside a step, the rows past its end are
// padding rows, all of whose labels are -100; then next() returns nothing on every rank at once).
// Every rank plans all rows of the step (arithmetic on document lengths) but reads only its own.
//
// MIXTURES. With several stores and Mixing::Concatenate, an epoch is the union of their documents,
// shuffled together. With Mixing::Sample, each store is its own stream with its own epochs, and
// global row k comes from store s with probability weight_s / Σ weights, drawn from a hash of
// (seed, k): deterministic, independent of history, and the realized shares converge to the weights.
// A sampled stream is endless (max_epochs must be 0).
//
// HELD-OUT SPLIT. For store i, `eval.count` documents (or round(eval.fraction × n_docs)) are drawn
// by a permutation seeded from (eval.seed, i); Split::Eval sees only those, Split::Train only the
// others, so training never sees an evaluation document. The split does not depend on `seed`.
//
// RESUME. BatcherState {seed, row, per stream {epoch, cursor}} is the exact position: `cursor` is
// the number of rows the stream has produced in its current epoch. Restoring regenerates the
// epoch's order and replays the packing arithmetic for `cursor` rows (no token reads). The state
// also carries a digest of the data configuration (stores' checksums, mode, seq_len, split,
// mixing), and a batcher refuses a state saved under another configuration. The state does not
// depend on rank, world or batch_size, so a run can resume on a different number of ranks.
#include <cstdint>
#include <memory>
#include <utility>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ft/data/token_store.h"

namespace ft::data {

enum class BatchMode { Packed, Padded };
enum class TooLongPolicy { Truncate, Error };
enum class Mixing { Concatenate, Sample };
enum class Split { Train, Eval };

inline constexpr int64_t kIgnoreIndex = -100;  ///< label of positions the loss skips (Hugging Face's)

/// Documents held out of each store for evaluation: `count` if > 0, else round(fraction × n_docs).
struct HeldOut {
  double fraction = 0.0;
  int64_t count = 0;
  uint64_t seed = 0;
};

struct BatcherSource {
  BatcherSource(std::shared_ptr<const TokenStoreReader> store_ = nullptr, double weight_ = 1.0)
      : store(std::move(store_)), weight(weight_) {}
  std::shared_ptr<const TokenStoreReader> store;
  double weight = 1.0;  ///< Mixing::Sample only
  /// This store's held-out documents, instead of the batcher's `eval` drawn with this source's
  /// index: those a batcher with `held_out` would set aside for this store at index
  /// `held_out_index`. Lets a mixture replay a store while keeping out exactly the documents another
  /// run (the one that trained on the store first) evaluates on.
  std::optional<HeldOut> held_out;
  int held_out_index = 0;
};

struct BatcherOptions {
  BatchMode mode = BatchMode::Packed;
  int64_t seq_len = 1024;   ///< row length (packed) or the longest row (padded); ≥ 2 when packed
  int64_t batch_size = 8;   ///< rows per rank per step
  int rank = 0;
  int world = 1;
  bool shuffle = true;
  uint64_t seed = 0;
  int64_t max_epochs = 0;   ///< 0 = endless
  Mixing mixing = Mixing::Concatenate;
  Split split = Split::Train;
  HeldOut eval;
  bool pad_to_seq_len = false;  ///< padded mode: width seq_len instead of the batch's longest row
  TooLongPolicy too_long = TooLongPolicy::Truncate;  ///< padded mode
  int32_t pad_id = 0;
};

/// The exact position of a batcher; small, and JSON text for checkpoints.
struct BatcherState {
  struct Stream {
    int64_t epoch = 0;
    int64_t cursor = 0;  ///< rows produced in this epoch
    bool operator==(const Stream&) const = default;
  };
  uint64_t seed = 0;
  int64_t row = 0;              ///< global rows produced so far (all ranks)
  std::vector<Stream> streams;  ///< one (Concatenate) or one per store (Sample)
  std::string config;           ///< digest of the data configuration

  std::string to_json() const;
  /// Throws ft::Error naming the problem for malformed text.
  static BatcherState from_json(std::string_view text);
  bool operator==(const BatcherState&) const = default;
};

/// Tokens [begin, begin + length) of document `doc` of source `source`, at column `col` of its row.
struct Segment {
  int32_t source = 0;
  int64_t doc = 0;
  int64_t begin = 0;
  int64_t length = 0;
  int64_t col = 0;
  bool operator==(const Segment&) const = default;
};

/// Where a row came from. No segments = a padding row (a finite stream's end).
struct RowInfo {
  int64_t global_row = 0;
  int32_t stream = 0;
  int64_t epoch = 0;
  std::vector<Segment> segments;
  bool operator==(const RowInfo&) const = default;
};

/// rows × cols arrays, row-major. int64 ids/labels/positions are what torch's embedding and
/// cross-entropy take (torch::kLong) without a conversion.
struct Batch {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int64_t> input_ids;       ///< pad_id on padding
  std::vector<int64_t> labels;          ///< kIgnoreIndex where nothing is predicted
  std::vector<int64_t> position_ids;    ///< 0 at each segment start; 0 on padding
  std::vector<int32_t> segment_ids;     ///< segment within the row; -1 on padding
  std::vector<uint8_t> attention_mask;  ///< 1 on tokens, 0 on padding
  std::vector<RowInfo> row_info;        ///< this rank's rows
  int64_t n_targets = 0;                ///< labels != kIgnoreIndex in this rank's batch
  int64_t step = 0;                     ///< global step index (0-based)
  BatcherState state;                   ///< the position after this batch: checkpoint it with the step
};

class Batcher {
 public:
  /// Throws ft::Error for bad options, an empty split, or (TooLongPolicy::Error) a too-long document.
  Batcher(std::vector<BatcherSource> sources, BatcherOptions options);
  /// Continues exactly where `state` was taken (see RESUME). Throws ft::Error when the state was
  /// saved under another data configuration or seed.
  Batcher(std::vector<BatcherSource> sources, BatcherOptions options, const BatcherState& state);
  ~Batcher();
  Batcher(Batcher&&) noexcept;
  Batcher& operator=(Batcher&&) noexcept;

  /// The next step's batch for this rank; nullopt once a finite stream is exhausted (on all ranks
  /// at the same step).
  std::optional<Batch> next();
  /// The position of the next batch.
  BatcherState state() const;
  const BatcherOptions& options() const;
  /// Documents of this batcher's split, per source, ascending.
  const std::vector<std::vector<int64_t>>& split_docs() const;
  /// Rows stream `stream` produces in epoch `epoch` (depends on the order when packing).
  int64_t rows_in_epoch(int64_t epoch, int stream = 0) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The held-out documents of a store of `n_docs` documents at position `source_index` (ascending).
std::vector<int64_t> held_out_docs(int64_t n_docs, const HeldOut& eval, int source_index);

}  // namespace ft::data
