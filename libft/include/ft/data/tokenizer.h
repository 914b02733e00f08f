#pragma once
// sentencepiece tokenizers (the Llama 2 / Mistral / TinyLlama `tokenizer.model` format), with the
// special tokens a Hugging Face checkpoint declares. Torch-free.
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
};

class Tokenizer {
 public:
  /// `path` is a tokenizer.model file or a checkpoint directory holding one (plus, optionally,
  /// tokenizer_config.json / special_tokens_map.json, which set the special tokens and flags).
  static Tokenizer load(const std::string& path);
  /// Trains a sentencepiece model; returns the path of the .model file.
  static std::string train(const TrainTokenizerOptions& options);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  /// Text → ids, without BOS/EOS (callers add them per document; see bos_id()/eos_id()).
  std::vector<int32_t> encode(std::string_view text) const;
  /// ids → text (special tokens skipped).
  std::string decode(std::span<const int32_t> ids) const;
  int32_t vocab_size() const;
  int32_t piece_to_id(std::string_view piece) const;  ///< unk id when absent
  std::string id_to_piece(int32_t id) const;
  const SpecialTokens& special() const { return special_; }
  /// Hex digest identifying the tokenizer (model bytes + special-token settings); token stores
  /// record it and refuse to be read with another tokenizer.
  const std::string& fingerprint() const { return fingerprint_; }
  const std::string& path() const { return path_; }

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  SpecialTokens special_;
  std::string fingerprint_;
  std::string path_;
};

}  // namespace ft::data
