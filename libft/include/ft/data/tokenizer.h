#pragma once
// Tokenizers of Hugging Face checkpoints, with the special tokens a checkpoint declares: sentencepiece
// (the Llama 2 / Mistral / TinyLlama `tokenizer.model` format), and the BPE of a `tokenizer.json`,
// which computes what the `tokenizers` library computes for it: byte-level (Llama 3, Qwen2/Qwen3,
// GPT-2, SmolLM) or sentencepiece-style (Metaspace and byte fallback: Llama 2, Mistral, TinyLlama as
// transformers 5 saves them, without a tokenizer.model). Torch-free.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ft::data {

struct SpecialTokens {
  int32_t bos = -1;  ///< -1 = none
  int32_t eos = -1;
  int32_t pad = -1;
  int32_t unk = -1;
  bool add_bos = true;   ///< tokenizer_config.json's add_bos_token (default true for Llama)
  bool add_eos = false;  ///< tokenizer_config.json's add_eos_token
};

struct TrainTokenizerOptions {
  std::vector<std::string> inputs;  ///< text files (one sentence or paragraph per line)
  std::string model_prefix;         ///< writes <prefix>.model and <prefix>.vocab
  int32_t vocab_size = 4096;
  std::string model_type = "bpe";   ///< bpe | unigram
  bool byte_fallback = true;        ///< as Llama: unknown characters become <0xNN> byte pieces
  double character_coverage = 1.0;
  int64_t input_sentence_size = 0;  ///< 0 = all; otherwise a sample of this many sentences
  uint64_t seed = 0;                ///< sentencepiece's sampling is made deterministic with it
                                    ///< (libft draws the input_sentence_size sample itself)
  /// Trainer threads. Recorded in the model and, for unigram, it changes how statistics are summed:
  /// keep it fixed for byte-identical models across machines.
  int32_t num_threads = 4;
  bool verbose = false;             ///< sentencepiece's INFO log (hundreds of lines) to stderr
};

/// What Tokenizer::fingerprint() hashes after the model bytes:
/// fingerprint = hex(SHA-256(<tokenizer.model bytes> + "\n" + fingerprint_settings(special))), with
/// "libft-tokenizer-v1 bos=1 eos=2 pad=-1 unk=0 add_bos=1 add_eos=0" as the settings' form.
std::string fingerprint_settings(const SpecialTokens& special);

/// A stretch of a document's text, for showing what a store trains on (Tokenizer::decode_spans).
struct TextSpan {
  std::string text;
  bool trainable = false;
  bool special = false;  ///< one special token (BOS, EOS, <|im_end|>...), shown as its piece
};

class Tokenizer {
 public:
  /// `path` is a tokenizer.model or tokenizer.json file, or a checkpoint directory holding one
  /// (tokenizer.model first) plus, optionally, tokenizer_config.json / special_tokens_map.json, which
  /// set the special tokens and flags. For a tokenizer.json, BOS/EOS and whether they are added
  /// start from its post-processor's template; the fingerprint hashes the tokenizer.json bytes.
  static Tokenizer load(const std::string& path);
  /// Trains a sentencepiece model; returns the path of the .model file. Settings as Llama's
  /// tokenizer.model: no normalisation, whitespace kept as is, digits split, ids unk 0, <s> 1, </s> 2,
  /// no pad. The same options and text give the same bytes wherever the files live.
  static std::string train(const TrainTokenizerOptions& options);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  /// Text → ids, without BOS/EOS (callers add them per document; see bos_id()/eos_id()).
  std::vector<int32_t> encode(std::string_view text) const;
  /// ids → text (special tokens skipped).
  std::string decode(std::span<const int32_t> ids) const;
  /// A document as text cut where `trainable` changes and at special tokens, which come as their
  /// pieces. Each span's text is what decoding the document up to its end adds, so the space that
  /// sentencepiece keeps in a word's first piece stays with that word ("▁Sure" → " Sure"). The
  /// spans' texts joined, specials left out, are decode(ids) (where every prefix decodes to a
  /// prefix of it, i.e. no run ends inside a multi-byte character).
  std::vector<TextSpan> decode_spans(std::span<const int32_t> ids, std::span<const uint8_t> trainable) const;
  int32_t vocab_size() const;
  int32_t piece_to_id(std::string_view piece) const;  ///< unk id when absent
  std::string id_to_piece(int32_t id) const;
  const SpecialTokens& special() const { return special_; }
  /// Hex digest identifying the tokenizer (model bytes + special-token settings); token stores
  /// record it and refuse to be read with another tokenizer.
  const std::string& fingerprint() const { return fingerprint_; }
  const std::string& path() const { return path_; }
  /// A tokenizer.json's byte-level BPE (no sentencepiece dummy prefix: text encodes the same
  /// wherever it starts).
  bool byte_level_bpe() const;
  /// Loaded from a tokenizer.json (either layout), whose added tokens encode() cuts out of text.
  bool from_tokenizer_json() const;

  /// The checkpoint's chat template (Jinja source), empty when it has none: a directory's
  /// chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of
  /// {name, template} of which "default" is taken), as transformers reads them.
  const std::string& chat_template() const { return chat_template_; }
  /// The file chat_template() came from (for error messages); empty when there is none.
  const std::string& chat_template_file() const { return chat_template_file_; }
  /// The pieces that Hugging Face cuts out of text as single ids before the model sees it: for a
  /// sentencepiece model its control and unknown pieces (<s>, </s>, <unk>; Mistral's [INST]; its
  /// user-defined pieces need no cutting: sentencepiece keeps them whole itself); for a
  /// tokenizer.json its added tokens (which encode() already cuts out itself).
  std::vector<std::string> special_pieces() const;

 private:
  Tokenizer();
  void load_byte_level_bpe(const std::string& bytes, const std::vector<std::string>& config_files);
  struct Impl;
  std::unique_ptr<Impl> impl_;
  SpecialTokens special_;
  std::string fingerprint_;
  std::string path_;
  std::string chat_template_, chat_template_file_;
};

}  // namespace ft::data
