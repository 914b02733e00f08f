// Batcher: row contents, epochs and shuffling, sharding, resume, mixtures, held-out split.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "ft/data/batcher.h"
#include "ft/util/error.h"
#include "store_test_util.h"

using namespace ft::data;
using namespace ft::data::testing;

namespace {

class BatcherTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = scratch_dir(); }

  /// A store of `n` documents with lengths in [lo, hi].
  std::shared_ptr<const TokenStoreReader> store(const std::string& name, size_t n, int64_t lo, int64_t hi,
                                                uint32_t seed) {
    const std::string path = (dir_ / name).string();
    write_store(path, make_docs(random_lengths(n, lo, hi, seed), kVocab, seed));
    return TokenStoreReader::open(path, kFingerprint);
  }

  static std::vector<Batch> drain(Batcher& b, size_t limit = 100000) {
    std::vector<Batch> out;
    while (out.size() < limit) {
      auto batch = b.next();
      if (!batch) break;
      out.push_back(std::move(*batch));
    }
    return out;
  }

  std::filesystem::path dir_;
};

BatcherOptions packed(int64_t seq_len, int64_t batch_size) {
  BatcherOptions o;
  o.mode = BatchMode::Packed;
  o.seq_len = seq_len;
  o.batch_size = batch_size;
  o.seed = 1234;
  return o;
}

void expect_same_batch(const Batch& a, const Batch& b, const std::string& what) {
  ASSERT_EQ(a.rows, b.rows) << what;
  ASSERT_EQ(a.cols, b.cols) << what;
  EXPECT_EQ(a.input_ids, b.input_ids) << what;
  EXPECT_EQ(a.labels, b.labels) << what;
  EXPECT_EQ(a.position_ids, b.position_ids) << what;
  EXPECT_EQ(a.segment_ids, b.segment_ids) << what;
  EXPECT_EQ(a.attention_mask, b.attention_mask) << what;
  EXPECT_EQ(a.row_info, b.row_info) << what;
  EXPECT_EQ(a.step, b.step) << what;
  EXPECT_EQ(a.state, b.state) << what;
}

/// Checks every cell of a batch against the store, following the rules in batcher.h, and returns
/// the (source, doc, token) targets it holds.
std::vector<std::tuple<int, int64_t, int64_t>> check_batch(const Batch& b, const std::vector<BatcherSource>& srcs,
                                                           const BatcherOptions& o) {
  std::vector<std::tuple<int, int64_t, int64_t>> targets;
  EXPECT_EQ(b.rows, o.batch_size);
  if (o.mode == BatchMode::Packed) {
    EXPECT_EQ(b.cols, o.seq_len);
  }
  int64_t n_targets = 0;
  for (int64_t r = 0; r < b.rows; ++r) {
    std::vector<bool> covered(static_cast<size_t>(b.cols), false);
    const RowInfo& info = b.row_info[static_cast<size_t>(r)];
    for (size_t g = 0; g < info.segments.size(); ++g) {
      const Segment& s = info.segments[g];
      const Example doc = srcs[static_cast<size_t>(s.source)].store->doc(s.doc);
      EXPECT_GE(s.length, 1);
      if (o.mode == BatchMode::Packed && g + 1 < info.segments.size()) {
        // Only the last segment of a row may stop short of its document's end.
        EXPECT_EQ(s.begin + s.length, static_cast<int64_t>(doc.tokens.size()));
      }
      for (int64_t t = 0; t < s.length; ++t) {
        const size_t p = static_cast<size_t>(r * b.cols + s.col + t);
        covered[static_cast<size_t>(s.col + t)] = true;
        const size_t i = static_cast<size_t>(s.begin + t);
        EXPECT_EQ(b.input_ids[p], doc.tokens[i]);
        EXPECT_EQ(b.position_ids[p], t);
        EXPECT_EQ(b.segment_ids[p], static_cast<int32_t>(g));
        EXPECT_EQ(b.attention_mask[p], 1);
        const bool target = t > 0 && doc.trainable[i];
        EXPECT_EQ(b.labels[p], target ? doc.tokens[i] : kIgnoreIndex);
        if (target) {
          targets.emplace_back(s.source, s.doc, static_cast<int64_t>(i));
          ++n_targets;
        }
      }
    }
    for (int64_t c = 0; c < b.cols; ++c) {
      if (covered[static_cast<size_t>(c)]) continue;
      const size_t p = static_cast<size_t>(r * b.cols + c);
      EXPECT_EQ(b.input_ids[p], o.pad_id);
      EXPECT_EQ(b.labels[p], kIgnoreIndex);
      EXPECT_EQ(b.segment_ids[p], -1);
      EXPECT_EQ(b.attention_mask[p], 0);
    }
  }
  EXPECT_EQ(b.n_targets, n_targets);
  return targets;
}

}  // namespace

TEST_F(BatcherTest, PackedRowsFollowTheRulesAndEveryTargetAppearsOncePerEpoch) {
  // Lengths 1..90 with seq_len 32: many documents split over two or more rows.
  std::vector<BatcherSource> srcs{{store("a.h5", 120, 1, 90, 1)}};
  BatcherOptions o = packed(32, 4);
  o.max_epochs = 2;
  Batcher b(srcs, o);
  const int64_t rows0 = b.rows_in_epoch(0), rows1 = b.rows_in_epoch(1);
  std::map<int64_t, std::multiset<std::tuple<int, int64_t, int64_t>>> targets_by_epoch;
  std::map<int64_t, int64_t> rows_by_epoch;
  int64_t padding_rows = 0, short_rows = 0;
  const auto batches = drain(b);
  for (const Batch& batch : batches) {
    const auto t = check_batch(batch, srcs, o);
    for (size_t r = 0; r < batch.row_info.size(); ++r) {
      const RowInfo& info = batch.row_info[r];
      if (info.segments.empty()) {
        ++padding_rows;
        continue;
      }
      ++rows_by_epoch[info.epoch];
      const auto& last = info.segments.back();
      if (last.col + last.length < o.seq_len) ++short_rows;
      for (const auto& s : info.segments)
        for (int64_t i = std::max<int64_t>(s.begin + 1, 1); i < s.begin + s.length; ++i)
          if (srcs[0].store->doc(s.doc).trainable[static_cast<size_t>(i)])
            targets_by_epoch[info.epoch].insert({s.source, s.doc, i});
    }
  }
  EXPECT_EQ(rows_by_epoch[0], rows0);
  EXPECT_EQ(rows_by_epoch[1], rows1);
  EXPECT_EQ(static_cast<int64_t>(batches.size()), (rows0 + rows1 + o.batch_size - 1) / o.batch_size);
  EXPECT_EQ(padding_rows, static_cast<int64_t>(batches.size()) * o.batch_size - rows0 - rows1);
  // Rows are full but for an epoch's last row and the rare slot before a continuing document.
  EXPECT_LE(short_rows, 2 + (rows0 + rows1) / 10);
  // Every trainable token but a document's first is a target exactly once per epoch.
  std::multiset<std::tuple<int, int64_t, int64_t>> expected;
  for (int64_t d = 0; d < srcs[0].store->n_docs(); ++d) {
    const Example e = srcs[0].store->doc(d);
    for (size_t i = 1; i < e.trainable.size(); ++i)
      if (e.trainable[i]) expected.insert({0, d, static_cast<int64_t>(i)});
  }
  EXPECT_EQ(targets_by_epoch[0], expected);
  EXPECT_EQ(targets_by_epoch[1], expected);
}

TEST_F(BatcherTest, ShufflingIsDeterministicAndChangesPerEpoch) {
  std::vector<BatcherSource> srcs{{store("a.h5", 80, 5, 40, 2)}};
  auto first_docs = [&](uint64_t seed, bool shuffle) {
    BatcherOptions o = packed(16, 2);
    o.seed = seed;
    o.shuffle = shuffle;
    o.max_epochs = 2;
    Batcher b(srcs, o);
    std::vector<std::vector<int64_t>> per_epoch(2);
    for (const Batch& batch : drain(b))
      for (const RowInfo& r : batch.row_info)
        for (const Segment& s : r.segments)
          if (s.begin == 0) per_epoch[static_cast<size_t>(r.epoch)].push_back(s.doc);
    return per_epoch;
  };
  const auto a = first_docs(1, true), a2 = first_docs(1, true), b = first_docs(2, true), plain = first_docs(1, false);
  EXPECT_EQ(a, a2);
  EXPECT_NE(a[0], b[0]);
  EXPECT_NE(a[0], a[1]);
  std::vector<int64_t> sorted = a[0];
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, plain[0]);  // a permutation of every document
  EXPECT_TRUE(std::is_sorted(plain[0].begin(), plain[0].end()));
  EXPECT_EQ(plain[0], plain[1]);
}

TEST_F(BatcherTest, PaddedModeTruncatesOrRejectsLongDocuments) {
  std::vector<BatcherSource> srcs{{store("a.h5", 30, 1, 50, 3)}};
  BatcherOptions o;
  o.mode = BatchMode::Padded;
  o.seq_len = 24;
  o.batch_size = 4;
  o.max_epochs = 1;
  o.pad_id = 7;
  Batcher b(srcs, o);
  std::set<int64_t> seen;
  for (const Batch& batch : drain(b)) {
    check_batch(batch, srcs, o);
    int64_t longest = 1;
    for (const RowInfo& r : batch.row_info) {
      if (r.segments.empty()) continue;
      ASSERT_EQ(r.segments.size(), 1u);
      const Segment& s = r.segments[0];
      EXPECT_EQ(s.begin, 0);
      EXPECT_EQ(s.length, std::min<int64_t>(srcs[0].store->doc_length(s.doc), 24));  // truncated to the first 24
      longest = std::max(longest, s.length);
      EXPECT_TRUE(seen.insert(s.doc).second);
    }
    EXPECT_EQ(batch.cols, longest);  // padded to the batch's longest row
  }
  EXPECT_EQ(seen.size(), 30u);

  o.pad_to_seq_len = true;
  Batcher fixed(srcs, o);
  EXPECT_EQ(fixed.next()->cols, 24);

  o.too_long = TooLongPolicy::Error;
  try {
    Batcher strict(srcs, o);
    FAIL() << "expected an error";
  } catch (const ft::Error& e) {
    EXPECT_NE(std::string(e.what()).find("more than seq_len 24"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("a.h5"), std::string::npos) << e.what();
  }
}

TEST_F(BatcherTest, RanksSplitEveryGlobalBatchWithoutOverlapOrLoss) {
  std::vector<BatcherSource> srcs{{store("a.h5", 100, 1, 70, 4)}};
  for (BatchMode mode : {BatchMode::Packed, BatchMode::Padded}) {
    const int world = 3;
    BatcherOptions single = packed(32, 2 * world);
    single.mode = mode;
    single.pad_to_seq_len = true;
    single.max_epochs = 2;
    Batcher one(srcs, single);
    const auto reference = drain(one);
    ASSERT_GT(reference.size(), 10u);

    std::vector<std::vector<Batch>> per_rank;
    for (int r = 0; r < world; ++r) {
      BatcherOptions o = single;
      o.batch_size = 2;
      o.rank = r;
      o.world = world;
      Batcher b(srcs, o);
      per_rank.push_back(drain(b));
      ASSERT_EQ(per_rank.back().size(), reference.size()) << "every rank runs the same number of steps";
    }
    std::set<std::pair<int64_t, int64_t>> all_pieces;  // (global row, first doc) of every real row
    for (size_t step = 0; step < reference.size(); ++step) {
      const Batch& ref = reference[step];
      std::vector<RowInfo> joined;
      std::vector<int64_t> ids, labels, positions;
      for (int r = 0; r < world; ++r) {
        const Batch& b = per_rank[static_cast<size_t>(r)][step];
        EXPECT_EQ(b.step, ref.step);
        EXPECT_EQ(b.state, ref.state);
        joined.insert(joined.end(), b.row_info.begin(), b.row_info.end());
        ids.insert(ids.end(), b.input_ids.begin(), b.input_ids.end());
        labels.insert(labels.end(), b.labels.begin(), b.labels.end());
        positions.insert(positions.end(), b.position_ids.begin(), b.position_ids.end());
      }
      // The union over ranks, in rank order, is the single-rank batch ...
      EXPECT_EQ(joined, ref.row_info);
      EXPECT_EQ(ids, ref.input_ids);
      EXPECT_EQ(labels, ref.labels);
      EXPECT_EQ(positions, ref.position_ids);
      // ... and the ranks' rows are disjoint: distinct global rows, distinct document pieces.
      for (const RowInfo& r : joined) {
        if (r.segments.empty()) continue;
        EXPECT_TRUE(all_pieces.insert({r.global_row, -1}).second);
        for (const Segment& s : r.segments)
          EXPECT_TRUE(all_pieces.insert({r.epoch * 1000000 + s.doc * 1000 + s.begin, s.length}).second)
              << "piece of document " << s.doc << " seen twice";
      }
    }
  }
}

TEST_F(BatcherTest, ResumesExactlyIncludingAcrossEpochBoundaries) {
  std::vector<BatcherSource> srcs{{store("a.h5", 40, 1, 60, 5)}, {store("b.h5", 25, 10, 30, 6)}};
  struct Case {
    BatchMode mode;
    Mixing mixing;
  };
  for (const Case c : {Case{BatchMode::Packed, Mixing::Concatenate}, Case{BatchMode::Padded, Mixing::Concatenate},
                       Case{BatchMode::Packed, Mixing::Sample}}) {
    BatcherOptions o = packed(32, 3);
    o.mode = c.mode;
    o.mixing = c.mixing;
    if (c.mixing == Mixing::Sample) {
      srcs[0].weight = 3;
      srcs[1].weight = 1;
    }
    Batcher full(srcs, o);
    const auto reference = drain(full, 60);  // about three epochs
    ASSERT_EQ(reference.size(), 60u);
    int64_t last_epoch = reference.back().row_info.back().epoch;
    ASSERT_GE(last_epoch, 1) << "the run must cross an epoch boundary";

    for (size_t k : {size_t{1}, size_t{7}, size_t{19}, size_t{33}, size_t{50}}) {
      Batcher first(srcs, o);
      const auto head = drain(first, k);
      const std::string saved = first.state().to_json();
      EXPECT_EQ(head.back().state.to_json(), saved);
      Batcher resumed(srcs, o, BatcherState::from_json(saved));
      for (size_t i = k; i < reference.size(); ++i) {
        const auto b = resumed.next();
        ASSERT_TRUE(b.has_value());
        expect_same_batch(*b, reference[i], "resumed after " + std::to_string(k) + " at batch " + std::to_string(i));
      }
    }
  }
}

TEST_F(BatcherTest, ResumesOnADifferentNumberOfRanks) {
  std::vector<BatcherSource> srcs{{store("a.h5", 60, 1, 50, 7)}};
  BatcherOptions o = packed(24, 4);
  Batcher one(srcs, o);
  const auto reference = drain(one, 20);
  Batcher first(srcs, o);
  drain(first, 5);
  const BatcherState state = first.state();  // 20 rows in
  // Two ranks of 2 rows continue the same row stream.
  std::vector<Batcher> ranks;
  for (int r = 0; r < 2; ++r) {
    BatcherOptions ro = o;
    ro.batch_size = 2;
    ro.rank = r;
    ro.world = 2;
    ranks.emplace_back(srcs, ro, state);
  }
  for (size_t i = 5; i < reference.size(); ++i) {
    std::vector<RowInfo> joined;
    for (auto& b : ranks) {
      const auto batch = b.next();
      joined.insert(joined.end(), batch->row_info.begin(), batch->row_info.end());
    }
    EXPECT_EQ(joined, reference[i].row_info);
  }
}

TEST_F(BatcherTest, RefusesAForeignOrMalformedState) {
  std::vector<BatcherSource> srcs{{store("a.h5", 20, 1, 30, 8)}};
  BatcherOptions o = packed(16, 2);
  Batcher b(srcs, o);
  b.next();
  const BatcherState s = b.state();
  BatcherOptions other = o;
  other.seq_len = 20;
  EXPECT_THROW(Batcher(srcs, other, s), ft::Error);
  other = o;
  other.seed = 99;
  EXPECT_THROW(Batcher(srcs, other, s), ft::Error);
  std::vector<BatcherSource> more{{srcs[0].store}, {store("b.h5", 5, 1, 3, 9)}};
  EXPECT_THROW(Batcher(more, o, s), ft::Error);
  BatcherState past = s;
  past.streams[0].cursor = 100000;
  EXPECT_THROW(Batcher(srcs, o, past), ft::Error);
  EXPECT_THROW(BatcherState::from_json("{}"), ft::Error);
  EXPECT_THROW(BatcherState::from_json("not json"), ft::Error);
  std::string text = s.to_json();
  EXPECT_EQ(BatcherState::from_json(text), s);
  text.replace(text.find("\"row\":"), 6, "\"row\":-");
  EXPECT_THROW(BatcherState::from_json(text), ft::Error);
}

TEST_F(BatcherTest, SampledMixtureConvergesToTheWeights) {
  std::vector<BatcherSource> srcs{{store("a.h5", 30, 5, 40, 10), 5.0},
                                  {store("b.h5", 10, 5, 40, 11), 3.0},
                                  {store("c.h5", 5, 5, 40, 12), 2.0}};
  BatcherOptions o = packed(16, 8);
  o.mixing = Mixing::Sample;
  Batcher b(srcs, o);
  std::vector<int64_t> rows(3, 0);
  const size_t steps = 1000;  // 8000 rows
  for (const Batch& batch : drain(b, steps))
    for (const RowInfo& r : batch.row_info) {
      ++rows[static_cast<size_t>(r.stream)];
      for (const Segment& s : r.segments) EXPECT_EQ(s.source, r.stream);  // a row comes from one store
    }
  const double total = static_cast<double>(steps * 8);
  EXPECT_NEAR(rows[0] / total, 0.5, 0.02);
  EXPECT_NEAR(rows[1] / total, 0.3, 0.02);
  EXPECT_NEAR(rows[2] / total, 0.2, 0.02);
  // The small store has gone through many epochs, the large one fewer.
  const BatcherState st = b.state();
  EXPECT_GT(st.streams[2].epoch, st.streams[0].epoch);

  o.max_epochs = 1;
  EXPECT_THROW(Batcher(srcs, o), ft::Error);
}

TEST_F(BatcherTest, HeldOutEvaluationDocumentsAreNeverTrainedOn) {
  std::vector<BatcherSource> srcs{{store("a.h5", 50, 1, 40, 13)}, {store("b.h5", 31, 1, 40, 14)}};
  for (const HeldOut held : {HeldOut{0.2, 0, 5}, HeldOut{0.0, 4, 6}}) {
    BatcherOptions train = packed(16, 2);
    train.eval = held;
    train.max_epochs = 1;
    BatcherOptions eval = train;
    eval.split = Split::Eval;
    eval.shuffle = false;
    Batcher tb(srcs, train), eb(srcs, eval);
    const size_t expect_a = held.count ? 4 : 10, expect_b = held.count ? 4 : 6;  // round(0.2 × 31) = 6
    ASSERT_EQ(eb.split_docs()[0].size(), expect_a);
    ASSERT_EQ(eb.split_docs()[1].size(), expect_b);
    for (int s = 0; s < 2; ++s) {
      std::set<int64_t> t(tb.split_docs()[s].begin(), tb.split_docs()[s].end());
      std::set<int64_t> e(eb.split_docs()[s].begin(), eb.split_docs()[s].end());
      for (int64_t d : e) EXPECT_FALSE(t.count(d)) << "document " << d << " is in both splits";
      EXPECT_EQ(t.size() + e.size(), static_cast<size_t>(srcs[s].store->n_docs()));
    }
    // What the batchers actually deliver respects the split.
    auto delivered = [&](Batcher& b) {
      std::set<std::pair<int, int64_t>> docs;
      for (const Batch& batch : drain(b))
        for (const RowInfo& r : batch.row_info)
          for (const Segment& s : r.segments) docs.insert({s.source, s.doc});
      return docs;
    };
    const auto trained = delivered(tb), evaluated = delivered(eb);
    EXPECT_EQ(evaluated.size(), expect_a + expect_b);
    for (const auto& d : evaluated) EXPECT_FALSE(trained.count(d));
    EXPECT_EQ(trained.size() + evaluated.size(), 81u);
    // Independent of the training seed.
    BatcherOptions reseeded = eval;
    reseeded.seed = 777;
    EXPECT_EQ(Batcher(srcs, reseeded).split_docs(), eb.split_docs());
  }
  // A count of at least a store's documents is an error naming the store, the count and the store's
  // document count, for the training split (nothing left to train on) and for the evaluation split
  // (it would silently be the whole store).
  for (const int64_t count : {int64_t{1000}, srcs[0].store->n_docs()}) {
    for (const Split split : {Split::Train, Split::Eval}) {
      BatcherOptions all_out = packed(16, 2);
      all_out.eval.count = count;
      all_out.split = split;
      try {
        Batcher b(srcs, all_out);
        ADD_FAILURE() << "held out " << count << " documents of " << srcs[0].store->n_docs();
      } catch (const ft::Error& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find(srcs[0].store->path() + ": held_out_docs (" + std::to_string(count) +
                            ") is at least the store's document count (" + std::to_string(srcs[0].store->n_docs()) + ")"),
                  std::string::npos)
            << what;
      }
    }
  }
}
