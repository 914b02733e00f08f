#pragma once
// The BPE of a Hugging Face tokenizer.json, in its two layouts. Internal to ft_data: users reach it
// through ft::data::Tokenizer, which picks it for a tokenizer.json.
//
//   * Byte-level (Llama 3, Qwen2/Qwen3, GPT-2/SmolLM): Split by the file's regular expression, then
//     ByteLevel, each byte spelt by a printable stand-in; ByteLevel decoder.
//   * sentencepiece-style (Llama 2, Mistral, TinyLlama, Gemma, as `transformers` 5 saves them: it
//     writes no tokenizer.model any more): spaces become "▁" (a Metaspace pre-tokenizer, or
//     Prepend/Replace normalizers), characters outside the vocabulary become <0xNN> byte tokens
//     (byte_fallback); a Replace/ByteFallback/Fuse/Strip or Metaspace decoder.
//
// What it implements is what the `tokenizers` library computes for such a file:
//   1. added tokens (specials such as <|im_start|> or </s>) are cut out of the text first,
//      leftmost-longest, with their lstrip/rstrip;
//   2. the normalizers, in order, on each stretch of text between added tokens: NFC (Qwen's, through
//      utf8proc), Prepend and Replace (the older Llama 2 files');
//   3. the pre-tokenizers: Split by the file's own regular expression (PCRE2 with Unicode properties
//      runs the Oniguruma patterns these files hold, \s read as White_Space as Oniguruma reads it)
//      or string, with any of its behaviours (Isolated, Removed, MergedWithPrevious,
//      MergedWithNext, Contiguous); Digits (ASCII digits, one by one or in runs);
//      then ByteLevel (with GPT-2's pattern where use_regex says so) mapping each byte to its
//      printable stand-in; or Metaspace (spaces to "▁", a "▁" prepended always, never, or only to
//      text at the very start of the input: prepend_scheme "first", which is what transformers 5's
//      Llama tokenizers use, so no "▁" after <s>; optionally split before each "▁");
//   4. the BPE model: merges by rank, the lowest rank and then the leftmost pair first; with
//      ignore_merges a word that is itself in the vocabulary kept whole; with byte_fallback a
//      character outside the vocabulary as its UTF-8 bytes' <0xNN> tokens, else unk_token (fused
//      with fuse_unk);
//   5. decoding through the file's decoder chain: ByteLevel back to bytes, invalid UTF-8 replaced by
//      U+FFFD as Rust's from_utf8_lossy does; or Replace, ByteFallback (a run of <0xNN> tokens to
//      its bytes, one U+FFFD per byte where they are not valid UTF-8), Fuse, Strip and Metaspace. No
//      clean-up of spaces: transformers 5 ignores clean_up_tokenization_spaces for these tokenizers.
// Anything else such a file may say (other normalizers, pre-tokenizers, decoders, dropout, word
// prefixes or suffixes, truncation, padding, a byte-level decoder without a byte-level pre-tokenizer
// or the reverse) is an error naming the file and the key, not ignored.
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

class JsonBpe {
 public:
  /// `json_text` is the content of `path` (named in every error).
  JsonBpe(std::string_view json_text, const std::string& path);
  ~JsonBpe();
  JsonBpe(const JsonBpe&) = delete;
  JsonBpe& operator=(const JsonBpe&) = delete;

  /// Text → ids, no post-processor (no BOS/EOS). The text must be valid UTF-8.
  std::vector<int32_t> encode(std::string_view text) const;
  /// ids → text; ids with skip[id] are left out.
  std::string decode(std::span<const int32_t> ids, const std::vector<bool>& skip) const;
  /// One past the largest id, of the model's vocabulary and the added tokens.
  int32_t vocab_size() const;
  /// Whether the pre-tokenizer is byte-level (text then encodes the same wherever it starts: no "▁"
  /// is ever prepended).
  bool byte_level() const;
  /// The id of a token (its byte-level spelling, or an added token's content); -1 when absent.
  int32_t token_to_id(std::string_view token) const;
  /// The token of an id: its spelling in the vocabulary ("Ġthe", "▁the", "<0x0A>"), or an added
  /// token's content.
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
