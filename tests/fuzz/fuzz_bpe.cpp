// libFuzzer target for the tokenizer.json BPE (libft/src/data/bpe.cpp; build with -DLIBFT_FUZZ=ON and
// clang).
//
// The first input byte picks what the rest is:
//   even: text, encoded by two tokenizers built here. One has the Llama 3 layout (its pattern,
//         ignore_merges, no normaliser, a special and a plain added token). Every id it gives must be
//         a token, and decoding must give back the text itself when it is valid UTF-8 (utf8proc
//         decides, independently of bpe.cpp), or else valid UTF-8. The other has the Qwen2 layout
//         (NFC, an added token with lstrip and rstrip); decoding must give valid UTF-8 that encodes
//         to the same ids again. A third has Llama 2's layout as transformers 5 saves it (Metaspace
//         with prepend_scheme "first", byte fallback, the Replace/ByteFallback/Fuse/Strip decoder):
//         decoding must give back valid UTF-8 text that neither starts with a space (the one "▁"
//         that is prepended, and stripped again, absorbs it) nor holds a "▁" of its own, and valid
//         UTF-8 otherwise.
//   odd:  a tokenizer.json document, which must load or throw ft::Error, never crash; one that
//         loads must encode and decode a sample without crashing.
#include <utf8proc.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "bpe.h"
#include "ft/util/error.h"

using ft::data::detail::JsonBpe;

namespace {

[[noreturn]] void bug(const std::string& what, std::string_view text) {
  std::fprintf(stderr, "fuzz_bpe: %s (text %s)\n", what.c_str(), nlohmann::json(std::string(text)).dump(-1, ' ', true,
               nlohmann::json::error_handler_t::replace).c_str());
  std::abort();
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    utf8proc_int32_t cp = 0;
    const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                    static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
    if (n <= 0) return false;
    i += static_cast<size_t>(n);
  }
  return true;
}

// GPT-2's byte stand-ins, written out here rather than taken from bpe.cpp.
std::string stand_in(int b) {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int extra = 0;
    for (int c = 0; c < 256; ++c) {
      const bool keep = (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
      const uint32_t cp = keep ? static_cast<uint32_t>(c) : 256 + extra++;
      utf8proc_uint8_t buf[4];
      const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
      t[c].assign(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
    }
    return t;
  }();
  return table[b];
}

// A small tokenizer.json: the byte alphabet, merges that build a few English words (and "é"), two
// added tokens, the given pattern and normaliser.
std::string tokenizer_json(const char* pattern, bool nfc_normalizer, bool strip) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[stand_in(b)] = b;
  nlohmann::json merges = nlohmann::json::array();
  auto add_word = [&](const std::vector<std::string>& pieces) {
    std::string left = pieces[0];
    for (size_t i = 1; i < pieces.size(); ++i) {
      if (!vocab.contains(left + pieces[i])) {
        merges.push_back({left, pieces[i]});
        vocab[left + pieces[i]] = static_cast<int>(vocab.size());
      }
      left += pieces[i];
    }
  };
  const std::string space = stand_in(' ');
  for (const char* w : {"the", "and", "of", "ing", "in", "er", "hacker", "program"}) {
    std::vector<std::string> pieces = {space};
    for (const char* c = w; *c; ++c) pieces.push_back(std::string(1, *c));
    add_word(pieces);
    add_word(std::vector<std::string>(pieces.begin() + 1, pieces.end()));
  }
  add_word({stand_in(0xC3), stand_in(0xA9)});  // é
  const int next = static_cast<int>(vocab.size());
  nlohmann::json added = nlohmann::json::array();
  added.push_back({{"id", next}, {"content", "<|eot|>"}, {"special", true}, {"lstrip", strip}, {"rstrip", strip},
                   {"normalized", false}, {"single_word", false}});
  added.push_back({{"id", next + 1}, {"content", "<x>"}, {"special", false}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"single_word", false}});
  nlohmann::json j = {
      {"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
      {"normalizer", nfc_normalizer ? nlohmann::json({{"type", "NFC"}}) : nlohmann::json(nullptr)},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}}},
      {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", !nfc_normalizer},
        {"vocab", vocab}, {"merges", merges}}}};
  return j.dump();
}

// A sentencepiece-style tokenizer.json: "▁"-words, the 256 byte tokens, a few merges, <s> and </s>
// as special added tokens and "<x>" as a plain one.
std::string sentencepiece_json() {
  const std::string space = "\xE2\x96\x81";  // ▁
  nlohmann::json vocab = nlohmann::json::object();
  vocab["<unk>"] = 0, vocab["<s>"] = 1, vocab["</s>"] = 2;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  nlohmann::json merges = nlohmann::json::array();
  auto add = [&](const std::string& piece) {
    if (!vocab.contains(piece)) vocab[piece] = static_cast<int>(vocab.size());
  };
  add(space);
  for (char c = 'a'; c <= 'z'; ++c) add(std::string(1, c));
  for (const char* w : {"the", "and", "hacker", "program"}) {
    std::string left = space;
    for (const char* c = w; *c; ++c) {
      const std::string right(1, *c);
      if (!vocab.contains(left + right)) {
        merges.push_back({left, right});
        add(left + right);
      }
      left += right;
    }
  }
  const int next = static_cast<int>(vocab.size());
  nlohmann::json added = nlohmann::json::array();
  added.push_back({{"id", 0}, {"content", "<unk>"}, {"special", true}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"single_word", false}});
  added.push_back({{"id", 1}, {"content", "<s>"}, {"special", true}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"single_word", false}});
  added.push_back({{"id", 2}, {"content", "</s>"}, {"special", true}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"single_word", false}});
  added.push_back({{"id", next}, {"content", "<x>"}, {"special", false}, {"lstrip", false}, {"rstrip", false},
                   {"normalized", false}, {"single_word", false}});
  nlohmann::json replace_back = {{"type", "Replace"}, {"pattern", {{"String", space}}}, {"content", " "}};
  nlohmann::json j = {
      {"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", space}, {"prepend_scheme", "first"}, {"split", false}}},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {replace_back, {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", "<unk>"}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", true}, {"byte_fallback", true}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", merges}}}};
  return j.dump();
}

constexpr const char* kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

void check_ids(const JsonBpe& t, const std::vector<int32_t>& ids, std::string_view text) {
  for (int32_t id : ids) {
    if (id < 0 || id >= t.vocab_size()) bug("id " + std::to_string(id) + " outside the vocabulary", text);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto llama3 = std::make_unique<JsonBpe>(tokenizer_json(kLlama3, false, false), "llama3-layout");
  static const auto qwen2 = std::make_unique<JsonBpe>(tokenizer_json(kQwen2, true, true), "qwen2-layout");
  static const auto llama2 = std::make_unique<JsonBpe>(sentencepiece_json(), "llama2-layout");
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 1) {
    try {
      const JsonBpe t(rest, "fuzzed tokenizer.json");
      const auto ids = t.encode("The hacker's program: 1234 caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC <x>\n\n  end");
      check_ids(t, ids, rest);
      t.decode(ids, {});
    } catch (const ft::Error&) {
    }
    return 0;
  }
  const std::vector<int32_t> a = llama3->encode(rest);
  check_ids(*llama3, a, rest);
  const std::string back = llama3->decode(a, {});
  if (valid_utf8(rest) ? back != rest : !valid_utf8(back)) bug("llama3 layout: decode(encode(text)) is not the text", rest);
  const std::vector<int32_t> b = qwen2->encode(rest);
  check_ids(*qwen2, b, rest);
  const std::string q = qwen2->decode(b, {});
  if (!valid_utf8(q)) bug("qwen2 layout: the decoded text is not valid UTF-8", rest);
  // Decoded text is normalised and stripped already: encoding it again gives the same ids.
  if (qwen2->encode(q) != b) bug("qwen2 layout: encode(decode(encode(text))) differs from encode(text)", rest);
  const std::vector<int32_t> c = llama2->encode(rest);
  check_ids(*llama2, c, rest);
  const std::string l = llama2->decode(c, {});
  // Text with "▁" of its own decodes with spaces there, as in tokenizers.
  const bool plain = valid_utf8(rest) && !rest.starts_with(' ') && rest.find("\xE2\x96\x81") == std::string_view::npos;
  if (plain ? l != rest : !valid_utf8(l)) {
    bug("llama2 layout: decode(encode(text)) is not the text", rest);
  }
  return 0;
}
