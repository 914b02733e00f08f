// TokenizerEncoder lives apart from chat_template.cpp so that code using only the TokenEncoder
// interface (the fuzz target, tests with a stand-in encoder) links without sentencepiece.
#include <algorithm>

#include "ft/data/chat_template.h"
#include "ft/util/error.h"

namespace ft::data {

namespace {
// U+E000, the first private-use code point: see the class comment in chat_template.h.
constexpr std::string_view kSentinel = "\xEE\x80\x80";
}  // namespace

TokenizerEncoder::TokenizerEncoder(const Tokenizer& tokenizer)
    : tokenizer_(&tokenizer), sentinel_ids_(tokenizer.encode(kSentinel)) {
  FT_CHECK(!sentinel_ids_.empty(), "[records] ", tokenizer.path(), ": U+E000 encodes to no token");
}

std::vector<int32_t> TokenizerEncoder::encode_start(std::string_view text) const { return tokenizer_->encode(text); }

std::vector<int32_t> TokenizerEncoder::encode_continuation(std::string_view text) const {
  if (text.empty()) return {};
  // A byte-level BPE adds no dummy prefix: a segment encodes the same wherever it starts.
  if (tokenizer_->byte_level_bpe()) return tokenizer_->encode(text);
  std::string joined;
  joined.reserve(kSentinel.size() + text.size());
  joined.append(kSentinel).append(text);
  std::vector<int32_t> ids = tokenizer_->encode(joined);
  FT_CHECK(ids.size() >= sentinel_ids_.size() && std::equal(sentinel_ids_.begin(), sentinel_ids_.end(), ids.begin()),
           "[records] ", tokenizer_->path(),
           ": cannot encode a continuation segment: the vocabulary merges U+E000 "
           "with the text after it (text starts with '",
           text.substr(0, 16), "')");
  ids.erase(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(sentinel_ids_.size()));
  return ids;
}

int32_t TokenizerEncoder::piece_id(std::string_view piece) const {
  // piece_to_id answers unk for unknown pieces; only a round trip proves the piece is in the vocabulary.
  const int32_t id = tokenizer_->piece_to_id(piece);
  if (id < 0 || id >= tokenizer_->vocab_size()) return -1;
  return tokenizer_->id_to_piece(id) == piece ? id : -1;
}

SpecialTokens TokenizerEncoder::special() const { return tokenizer_->special(); }

std::string TokenizerEncoder::piece(int32_t id) const { return tokenizer_->id_to_piece(id); }

std::vector<std::string> TokenizerEncoder::split_pieces() const {
  // A tokenizer.json's BPE cuts its added tokens out itself, with their lstrip/rstrip, and (for a
  // Metaspace one) prepends its "▁" after them as its prepend_scheme says.
  if (tokenizer_->from_tokenizer_json()) return {};
  return tokenizer_->special_pieces();
}

std::pair<std::string, std::string> TokenizerEncoder::chat_template() const {
  return {tokenizer_->chat_template(), tokenizer_->chat_template_file()};
}

}  // namespace ft::data
