// Batcher: see ft/data/batcher.h for the row, epoch, sharding, mixture and resume rules.
//
// Internals: a Stream is a list of document references (source << 40 | doc) with a position
// (epoch, cursor = rows made this epoch, pos = next document in the epoch's order, off = next token
// of that document). Planning a row only consults document lengths (the readers' in-memory
// doc_offsets); tokens are read only for this rank's rows. Randomness is SplitMix64, with bounded
// draws by Lemire's multiply-and-reject, so orders are identical on every platform and standard
// library (std::uniform_int_distribution is not).
#include "ft/data/batcher.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::data {
namespace {

constexpr int kSourceShift = 40;  // DocRef = source << 40 | doc: 2^40 documents per store
constexpr uint64_t kDocMask = (uint64_t{1} << kSourceShift) - 1;
constexpr int kStateVersion = 1;

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  FT_FAIL("[batcher] ", std::forward<Args>(args)...);
}

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t hash_of(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x6c69626674ULL;  // "libft"
  for (uint64_t p : parts) h = mix64(h ^ mix64(p));
  return h;
}

// Domain tags keep the different random streams independent.
constexpr uint64_t kTagShuffle = 1, kTagMixture = 2, kTagHeldOut = 3;

/// SplitMix64 generator.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    s += 0x9e3779b97f4a7c15ULL;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, n), n > 0 (Lemire, "Fast random integer generation in an interval").
  uint64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    auto lo = static_cast<uint64_t>(m);
    if (lo < n) {
      const uint64_t threshold = (0 - n) % n;
      while (lo < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        lo = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

template <typename T>
void shuffle(std::vector<T>& v, uint64_t seed) {
  Rng rng(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

/// Uniform double in [0, 1) from 53 high bits.
double unit(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

std::string hex64(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

uint64_t bits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

uint64_t hash_string(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a, then mixed
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return mix64(h);
}

}  // namespace

std::vector<int64_t> held_out_docs(int64_t n_docs, const HeldOut& eval, int source_index) {
  if (!(eval.fraction >= 0.0 && eval.fraction < 1.0)) fail("eval fraction must be in [0, 1), not ", eval.fraction);
  if (eval.count < 0) fail("eval count must be >= 0, not ", eval.count);
  const int64_t k = eval.count > 0 ? std::min(eval.count, n_docs)
                                   : static_cast<int64_t>(std::llround(eval.fraction * static_cast<double>(n_docs)));
  if (k == 0) return {};
  std::vector<int64_t> perm(static_cast<size_t>(n_docs));
  for (int64_t i = 0; i < n_docs; ++i) perm[static_cast<size_t>(i)] = i;
  shuffle(perm, hash_of({kTagHeldOut, eval.seed, static_cast<uint64_t>(source_index)}));
  perm.resize(static_cast<size_t>(k));
  std::sort(perm.begin(), perm.end());
  return perm;
}

// ------------------------------------------------------------------------------------------------
// State

std::string BatcherState::to_json() const {
  nlohmann::json j;
  j["format"] = "libft.batcher_state";
  j["version"] = kStateVersion;
  j["seed"] = seed;
  j["row"] = row;
  j["config"] = config;
  j["streams"] = nlohmann::json::array();
  for (const Stream& s : streams) j["streams"].push_back({{"epoch", s.epoch}, {"cursor", s.cursor}});
  return j.dump();
}

BatcherState BatcherState::from_json(std::string_view text) {
  const nlohmann::json j = parse_json_strict(text, "batcher state", 8);
  auto bad = [](const std::string& why) -> void { fail("batcher state: ", why); };
  if (!j.is_object()) bad("not a JSON object");
  if (!j.contains("format") || j["format"] != "libft.batcher_state") bad("'format' is not \"libft.batcher_state\"");
  if (!j.contains("version") || !j["version"].is_number_integer() || j["version"].get<int64_t>() != kStateVersion)
    bad("unsupported 'version' (this libft reads " + std::to_string(kStateVersion) + ")");
  auto nonneg = [&](const nlohmann::json& o, const char* key) -> int64_t {
    if (!o.contains(key) || !o[key].is_number_integer() || o[key].get<int64_t>() < 0)
      bad(std::string("'") + key + "' must be a non-negative integer");
    return o[key].get<int64_t>();
  };
  BatcherState s;
  if (!j.contains("seed") || !j["seed"].is_number_unsigned()) bad("'seed' must be an unsigned integer");
  s.seed = j["seed"].get<uint64_t>();
  s.row = nonneg(j, "row");
  if (!j.contains("config") || !j["config"].is_string()) bad("'config' must be a string");
  s.config = j["config"].get<std::string>();
  if (!j.contains("streams") || !j["streams"].is_array() || j["streams"].empty())
    bad("'streams' must be a non-empty array");
  for (const auto& st : j["streams"]) {
    if (!st.is_object()) bad("each stream must be an object");
    s.streams.push_back({nonneg(st, "epoch"), nonneg(st, "cursor")});
  }
  return s;
}

// ------------------------------------------------------------------------------------------------
// Batcher

struct Batcher::Impl {
  std::vector<BatcherSource> sources;
  std::vector<std::span<const int64_t>> offsets;  // per source
  BatcherOptions opt;
  std::vector<std::vector<int64_t>> split;  // per source: documents of this split

  struct Stream {
    std::vector<uint64_t> base;   // DocRefs in store order
    std::vector<uint64_t> order;  // this epoch's order (shuffle only)
    int64_t epoch = 0, cursor = 0;
    size_t pos = 0;
    int64_t off = 0;
    const std::vector<uint64_t>& docs() const { return order.empty() ? base : order; }
  };
  std::vector<Stream> streams;
  std::vector<double> cumulative;  // Sample: cumulative normalized weights
  int64_t row = 0;
  std::string config;
  std::vector<int32_t> tok_buf;
  std::vector<uint8_t> tr_buf;

  int64_t length(uint64_t ref) const {
    const auto& o = offsets[ref >> kSourceShift];
    const size_t d = ref & kDocMask;
    return o[d + 1] - o[d];
  }

  bool finished(const Stream& s) const { return opt.max_epochs > 0 && s.epoch >= opt.max_epochs; }

  void start_epoch(Stream& s, size_t index, int64_t epoch) const {
    s.epoch = epoch;
    s.cursor = 0;
    s.pos = 0;
    s.off = 0;
    if (opt.shuffle) {
      s.order = s.base;
      shuffle(s.order, hash_of({kTagShuffle, opt.seed, index, static_cast<uint64_t>(epoch)}));
    }
  }

  /// Plans the stream's next row into `out` (segments only) and advances the stream.
  void plan_row(Stream& s, size_t index, std::vector<Segment>& out) const {
    out.clear();
    if (finished(s)) return;
    const auto& docs = s.docs();
    const size_t n = docs.size();
    if (opt.mode == BatchMode::Padded) {
      const uint64_t ref = docs[s.pos];
      const int64_t len = std::min(length(ref), opt.seq_len);
      out.push_back({static_cast<int32_t>(ref >> kSourceShift), static_cast<int64_t>(ref & kDocMask), 0, len, 0});
      ++s.pos;
    } else {
      const int64_t S = opt.seq_len;
      int64_t filled = 0;
      while (filled < S && s.pos < n) {
        const uint64_t ref = docs[s.pos];
        const int64_t avail = length(ref) - s.off;
        const int64_t room = S - filled;
        // A one-token fragment of a continuing document would carry no target: pad instead.
        if (room == 1 && avail > 1) break;
        const int64_t take = std::min(avail, room);
        out.push_back({static_cast<int32_t>(ref >> kSourceShift), static_cast<int64_t>(ref & kDocMask), s.off, take,
                       filled});
        filled += take;
        if (take == avail) {
          ++s.pos;
          s.off = 0;
        } else {
          s.off += take - 1;  // the continuation re-reads this fragment's last token (see header)
        }
      }
    }
    ++s.cursor;
    if (s.pos == n) start_epoch(s, index, s.epoch + 1);
  }

  size_t choose_stream(int64_t k) const {
    if (opt.mixing == Mixing::Concatenate) return 0;
    const double u = unit(hash_of({kTagMixture, opt.seed, static_cast<uint64_t>(k)}));
    for (size_t i = 0; i + 1 < cumulative.size(); ++i)
      if (u < cumulative[i]) return i;
    return cumulative.size() - 1;
  }

  std::string name(size_t source) const { return sources[source].store->path(); }

  void setup(std::vector<BatcherSource> srcs, BatcherOptions o) {
    sources = std::move(srcs);
    opt = o;
    if (sources.empty()) fail("no sources");
    if (opt.world < 1 || opt.rank < 0 || opt.rank >= opt.world)
      fail("rank ", opt.rank, " is outside a world of ", opt.world);
    if (opt.batch_size < 1) fail("batch_size must be >= 1, not ", opt.batch_size);
    if (opt.mode == BatchMode::Packed && opt.seq_len < 2) fail("seq_len must be >= 2 when packing, not ", opt.seq_len);
    if (opt.seq_len < 1) fail("seq_len must be >= 1, not ", opt.seq_len);
    if (opt.max_epochs < 0) fail("max_epochs must be >= 0, not ", opt.max_epochs);
    if (opt.mixing == Mixing::Sample && opt.max_epochs != 0)
      fail("a sampled mixture is endless: max_epochs must be 0 (count steps instead)");
    if (sources.size() >= (size_t{1} << (64 - kSourceShift))) fail("too many sources");

    // What decides the rows' contents (not max_epochs, too_long or the batch geometry: a run may be
    // extended, or resumed on another number of ranks).
    std::string canon = "mode=" + std::to_string(int(opt.mode)) + ";seq_len=" + std::to_string(opt.seq_len) +
                        ";shuffle=" + std::to_string(opt.shuffle) + ";mixing=" + std::to_string(int(opt.mixing)) +
                        ";split=" + std::to_string(int(opt.split)) + ";eval=" +
                        std::to_string(bits(opt.eval.fraction)) + "," + std::to_string(opt.eval.count) + "," +
                        std::to_string(opt.eval.seed);
    double total_weight = 0;
    for (size_t i = 0; i < sources.size(); ++i) {
      const auto& src = sources[i];
      if (!src.store) fail("source ", i, " has no store");
      const int64_t n = src.store->n_docs();
      if (static_cast<uint64_t>(n) > kDocMask) fail(name(i), ": too many documents");
      offsets.push_back(src.store->doc_offsets());
      if (opt.mixing == Mixing::Sample) {
        if (!(src.weight > 0) || !std::isfinite(src.weight))
          fail(name(i), ": mixture weight must be positive and finite, not ", src.weight);
        total_weight += src.weight;
        canon += ";w=" + std::to_string(bits(src.weight));
      }
      canon += ";store=" + src.store->info().sha256;

      // A held-out count that takes every document would leave the training split empty, and would
      // make an evaluation of "the N held-out documents" silently one of the whole store.
      const HeldOut& held_spec = src.held_out ? *src.held_out : opt.eval;
      if (held_spec.count > 0 && held_spec.count >= n)
        fail(name(i), ": held_out_docs (", held_spec.count, ") is at least the store's document count (", n,
             opt.split == Split::Eval ? "): the held-out set would be the whole store, not a part a run set aside"
                                      : "): every document of this store would be held out, none trained on",
             "; hold out fewer");
      const std::vector<int64_t> held = src.held_out ? held_out_docs(n, *src.held_out, src.held_out_index)
                                                     : held_out_docs(n, opt.eval, static_cast<int>(i));
      if (src.held_out) {
        canon += ";held=" + std::to_string(bits(src.held_out->fraction)) + "," + std::to_string(src.held_out->count) +
                 "," + std::to_string(src.held_out->seed) + "," + std::to_string(src.held_out_index);
      }
      std::vector<int64_t> docs;
      if (opt.split == Split::Eval) {
        docs = held;
      } else {
        docs.reserve(static_cast<size_t>(n) - held.size());
        size_t h = 0;
        for (int64_t d = 0; d < n; ++d) {
          if (h < held.size() && held[h] == d) {
            ++h;
            continue;
          }
          docs.push_back(d);
        }
      }
      if (opt.mode == BatchMode::Padded && opt.too_long == TooLongPolicy::Error)
        for (int64_t d : docs) {
          const int64_t len = offsets[i][d + 1] - offsets[i][d];
          if (len > opt.seq_len)
            fail(name(i), ": document ", d, " has ", len, " tokens, more than seq_len ", opt.seq_len,
                 " (too_long policy: error; use truncate or packing)");
        }
      split.push_back(std::move(docs));
    }

    const char* split_name = opt.split == Split::Eval ? "evaluation" : "training";
    if (opt.mixing == Mixing::Concatenate) {
      Stream s;
      for (size_t i = 0; i < sources.size(); ++i)
        for (int64_t d : split[i]) s.base.push_back(uint64_t{i} << kSourceShift | static_cast<uint64_t>(d));
      if (s.base.empty()) fail("the ", split_name, " split of the ", sources.size(), " store(s) holds no documents");
      streams.push_back(std::move(s));
    } else {
      double acc = 0;
      for (size_t i = 0; i < sources.size(); ++i) {
        Stream s;
        for (int64_t d : split[i]) s.base.push_back(uint64_t{i} << kSourceShift | static_cast<uint64_t>(d));
        if (s.base.empty()) fail(name(i), ": its ", split_name, " split holds no documents");
        streams.push_back(std::move(s));
        acc += sources[i].weight / total_weight;
        cumulative.push_back(acc);
      }
    }
    for (size_t i = 0; i < streams.size(); ++i) start_epoch(streams[i], i, 0);
    config = hex64(hash_string(canon));
  }

  void restore(const BatcherState& st) {
    if (st.config != config)
      fail("the state was saved under another data configuration (digest ", st.config, ", this batcher's is ",
           config, "): stores, mode, seq_len, shuffle, split or mixture differ");
    if (st.seed != opt.seed) fail("the state was saved with seed ", st.seed, " but the options say ", opt.seed);
    if (st.streams.size() != streams.size())
      fail("the state has ", st.streams.size(), " streams, this batcher ", streams.size());
    row = st.row;
    std::vector<Segment> scratch;
    for (size_t i = 0; i < streams.size(); ++i) {
      Stream& s = streams[i];
      const auto& want = st.streams[i];
      if (opt.max_epochs > 0 && (want.epoch > opt.max_epochs || (want.epoch == opt.max_epochs && want.cursor != 0)))
        fail("the state's stream ", i, " is past max_epochs ", opt.max_epochs);
      start_epoch(s, i, want.epoch);
      if (finished(s)) continue;
      if (opt.mode == BatchMode::Padded) {
        if (want.cursor >= static_cast<int64_t>(s.base.size()))
          fail("the state's cursor ", want.cursor, " is past the end of epoch ", want.epoch);
        s.pos = static_cast<size_t>(want.cursor);
        s.cursor = want.cursor;
      } else {
        for (int64_t r = 0; r < want.cursor; ++r) {
          plan_row(s, i, scratch);
          if (s.epoch != want.epoch) fail("the state's cursor ", want.cursor, " is past the end of epoch ", want.epoch);
        }
      }
    }
  }

  BatcherState state() const {
    BatcherState st;
    st.seed = opt.seed;
    st.row = row;
    st.config = config;
    for (const Stream& s : streams) st.streams.push_back({s.epoch, s.cursor});
    return st;
  }

  std::optional<Batch> next() {
    if (opt.mixing == Mixing::Concatenate && finished(streams[0])) return std::nullopt;
    const int64_t B = opt.batch_size;
    const int64_t first_mine = opt.rank * B;
    Batch b;
    b.rows = B;
    b.step = row / (B * opt.world);
    b.row_info.resize(static_cast<size_t>(B));
    std::vector<Segment> scratch;
    for (int64_t j = 0; j < B * opt.world; ++j) {
      const size_t s = choose_stream(row);
      const bool mine = j >= first_mine && j < first_mine + B;
      RowInfo* info = mine ? &b.row_info[static_cast<size_t>(j - first_mine)] : nullptr;
      if (info) {
        info->global_row = row;
        info->stream = static_cast<int32_t>(s);
        info->epoch = streams[s].epoch;
      }
      plan_row(streams[s], s, info ? info->segments : scratch);
      ++row;
    }

    int64_t width = opt.seq_len;
    if (opt.mode == BatchMode::Padded && !opt.pad_to_seq_len) {
      width = 1;
      for (const RowInfo& r : b.row_info)
        for (const Segment& g : r.segments) width = std::max(width, g.col + g.length);
    }
    b.cols = width;
    const size_t cells = static_cast<size_t>(B * width);
    b.input_ids.assign(cells, opt.pad_id);
    b.labels.assign(cells, kIgnoreIndex);
    b.position_ids.assign(cells, 0);
    b.segment_ids.assign(cells, -1);
    b.attention_mask.assign(cells, 0);
    for (int64_t i = 0; i < B; ++i) {
      const RowInfo& r = b.row_info[static_cast<size_t>(i)];
      for (size_t g = 0; g < r.segments.size(); ++g) {
        const Segment& seg = r.segments[g];
        tok_buf.resize(static_cast<size_t>(seg.length));
        tr_buf.resize(static_cast<size_t>(seg.length));
        sources[static_cast<size_t>(seg.source)].store->read(seg.doc, seg.begin, seg.length, tok_buf.data(),
                                                             tr_buf.data());
        const size_t base = static_cast<size_t>(i * width + seg.col);
        for (int64_t t = 0; t < seg.length; ++t) {
          const size_t p = base + static_cast<size_t>(t);
          const int64_t tok = tok_buf[static_cast<size_t>(t)];
          b.input_ids[p] = tok;
          if (t > 0 && tr_buf[static_cast<size_t>(t)]) {
            b.labels[p] = tok;
            ++b.n_targets;
          }
          b.position_ids[p] = t;
          b.segment_ids[p] = static_cast<int32_t>(g);
          b.attention_mask[p] = 1;
        }
      }
    }
    b.state = state();
    return b;
  }
};

Batcher::Batcher(std::vector<BatcherSource> sources, BatcherOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->setup(std::move(sources), options);
}

Batcher::Batcher(std::vector<BatcherSource> sources, BatcherOptions options, const BatcherState& state)
    : impl_(std::make_unique<Impl>()) {
  impl_->setup(std::move(sources), options);
  impl_->restore(state);
}

Batcher::~Batcher() = default;
Batcher::Batcher(Batcher&&) noexcept = default;
Batcher& Batcher::operator=(Batcher&&) noexcept = default;

std::optional<Batch> Batcher::next() { return impl_->next(); }
BatcherState Batcher::state() const { return impl_->state(); }
const BatcherOptions& Batcher::options() const { return impl_->opt; }
const std::vector<std::vector<int64_t>>& Batcher::split_docs() const { return impl_->split; }

int64_t Batcher::rows_in_epoch(int64_t epoch, int stream) const {
  if (stream < 0 || static_cast<size_t>(stream) >= impl_->streams.size()) fail("no stream ", stream);
  Impl::Stream s;
  s.base = impl_->streams[static_cast<size_t>(stream)].base;
  impl_->start_epoch(s, static_cast<size_t>(stream), epoch);
  // Plan the epoch without an epoch limit.
  BatcherOptions saved = impl_->opt;
  std::vector<Segment> scratch;
  int64_t rows = 0;
  Impl probe;  // planning needs only opt and offsets
  probe.opt = saved;
  probe.opt.max_epochs = 0;
  probe.offsets = impl_->offsets;
  while (s.epoch == epoch) {
    probe.plan_row(s, static_cast<size_t>(stream), scratch);
    ++rows;
  }
  return rows;
}

}  // namespace ft::data
