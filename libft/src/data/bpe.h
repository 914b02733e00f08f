#pragma once
// Byte-level BPE from a Hugging Face tokenizer.json: the format of the Llama 3, Qwen2/Qwen3 and
// GPT-2/SmolLM tokenizers, which ship no sentencepiece tokenizer.model. Internal to ft_data: users
// reach it through ft::data::Tokenizer, which picks it for a tokenizer.json.
//
// What it implements is what the `tokenizers` library computes for such a file:
//   1. added tokens (specials such as <|im_start|>) are cut out of the text first, leftmost-longest,
//      with their lstrip/rstrip;
//   2. the normalizer: none, or NFC (Qwen's), through utf8proc;
//   3. the pre-tokenizer: Split by the file's own regular expression (PCRE2 with Unicode properties
//      runs the Oniguruma patterns these files hold, \s read as White_Space as Oniguruma reads it),
//      then ByteLevel (with GPT-2's pattern where use_regex says so) mapping each byte to its
//      printable stand-in;
//   4. the BPE model: merges by rank, the lowest rank and then the leftmost pair first, and with
//      ignore_merges a word that is itself in the vocabulary kept whole;
//   5. decoding: the ByteLevel decoder back to bytes, invalid UTF-8 replaced by U+FFFD as Rust's
//      from_utf8_lossy does. No clean-up of spaces: transformers 5 ignores
//      clean_up_tokenization_spaces for these tokenizers.
// Anything else such a file may say (other normalizers, pre-tokenizers, decoders, dropout, word
// prefixes or suffixes, truncation, padding) is an error naming the file and the key, not ignored.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ft::data::detail {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};

class ByteLevelBpe {
 public:
  /// `json_text` is the content of `path` (named in every error).
  ByteLevelBpe(std::string_view json_text, const std::string& path);
  ~ByteLevelBpe();
  ByteLevelBpe(const ByteLevelBpe&) = delete;
  ByteLevelBpe& operator=(const ByteLevelBpe&) = delete;

  /// Text → ids, no post-processor (no BOS/EOS). The text must be valid UTF-8.
  std::vector<int32_t> encode(std::string_view text) const;
  /// ids → text; ids with skip[id] are left out.
  std::string decode(std::span<const int32_t> ids, const std::vector<bool>& skip) const;
  /// One past the largest id, of the model's vocabulary and the added tokens.
  int32_t vocab_size() const;
  /// The id of a token (its byte-level spelling, or an added token's content); -1 when absent.
  int32_t token_to_id(std::string_view token) const;
  /// The token of an id: its byte-level spelling ("Ġthe"), or an added token's content.
  std::string id_to_token(int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;
  /// The model's unk_token id, -1 when it has none.
  int32_t unk_id() const;
  /// The post-processor's template for a single sequence: the ids before and after the text.
  /// Empty for a ByteLevel or no post-processor.
  const std::vector<int32_t>& template_prefix() const;
  const std::vector<int32_t>& template_suffix() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ft::data::detail
