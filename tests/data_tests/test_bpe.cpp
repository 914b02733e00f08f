// tokenizer.json's BPE against Hugging Face's `tokenizers`: tests/python/bpe_reference.py trains
// three byte-level tokenizers (Llama 3, Qwen2/Qwen3, GPT-2/SmolLM layouts) on the Debian fortunes and
// the Jargon File, with each family's pre-tokenizer pattern, normaliser, post-processor and added
// tokens, writes four sentencepiece-style ones (Metaspace or Prepend/Replace, byte fallback: Llama 2
// as transformers 5 saves it, Llama 2's older layout, Metaspace with split, Gemma's layout) from the
// sentencepiece model libft trains, and records what transformers' AutoTokenizer makes of real text
// and of edge cases. libft must give the same ids, tokens, framing and decoded text; then the errors
// a damaged or unsupported tokenizer.json gets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "ft/data/chat_template.h"
#include "ft/data/records.h"
#include "ft/data/tokenizer.h"
#include "ft/util/error.h"
#include "records_test_util.h"

using ft::data::Tokenizer;
using ft::test::error_of;
namespace fs = std::filesystem;

namespace {

fs::path reference_dir() {
  const char* env = std::getenv("LIBFT_BPE_REFERENCE_DIR");
  return env && *env ? fs::path(env) : fs::path();
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

#define REQUIRE_REFERENCE()                                                                             \
  const fs::path ref_dir = reference_dir();                                                             \
  if (ref_dir.empty()) GTEST_SKIP() << "LIBFT_BPE_REFERENCE_DIR is not set (ctest sets it)";            \
  ASSERT_TRUE(fs::exists(ref_dir / "bpe_reference.json")) << ref_dir << ": the Python step did not run"

}  // namespace

TEST(BpeParity, MatchesTokenizers) {
  REQUIRE_REFERENCE();
  const auto ref = nlohmann::json::parse(slurp(ref_dir / "bpe_reference.json"));
  const auto& variants = ref.at("variants");
  ASSERT_EQ(variants.size(), 10u);
  for (const auto& [name, v] : variants.items()) {
    SCOPED_TRACE(name);
    const Tokenizer tok = Tokenizer::load((ref_dir / v.at("dir").get<std::string>()).string());
    EXPECT_TRUE(tok.from_tokenizer_json());
    EXPECT_EQ(tok.byte_level_bpe(), v.at("byte_level").get<bool>());
    EXPECT_EQ(tok.vocab_size(), v.at("vocab_size").get<int32_t>());
    const auto& sp = tok.special();
    EXPECT_EQ(sp.bos, v.at("bos").get<int32_t>());
    EXPECT_EQ(sp.eos, v.at("eos").get<int32_t>());
    EXPECT_EQ(sp.pad, v.at("pad").get<int32_t>());
    EXPECT_EQ(sp.unk, v.at("unk").get<int32_t>());
    EXPECT_EQ(sp.add_bos, v.at("add_bos").get<bool>());
    EXPECT_EQ(sp.add_eos, v.at("add_eos").get<bool>());
    const auto& cases = v.at("cases");
    ASSERT_GE(cases.size(), 100u);
    size_t failures = 0;
    for (const auto& c : cases) {
      const std::string text = c.at("text"), source = c.at("source");
      const auto want = c.at("ids").get<std::vector<int32_t>>();
      const std::vector<int32_t> ids = tok.encode(text);
      std::vector<int32_t> framed;
      if (sp.add_bos) framed.push_back(sp.bos);
      framed.insert(framed.end(), ids.begin(), ids.end());
      if (sp.add_eos) framed.push_back(sp.eos);
      std::vector<std::string> tokens;
      if (ids == want) {
        for (int32_t id : ids) tokens.push_back(tok.id_to_piece(id));
      }
      const bool ok = ids == want && framed == c.at("ids_special").get<std::vector<int32_t>>() &&
                      tokens == c.at("tokens").get<std::vector<std::string>>() &&
                      tok.decode(want) == c.at("decoded").get<std::string>();
      if (!ok && ++failures <= 8) {
        ADD_FAILURE() << name << " " << source << ": differs from tokenizers\n  text:    " << nlohmann::json(text).dump()
                      << "\n  libft:   " << testing::PrintToString(ids) << "\n  python:  " << testing::PrintToString(want)
                      << "\n  framed:  " << testing::PrintToString(framed) << " vs " << c.at("ids_special").dump()
                      << "\n  decoded: " << nlohmann::json(tok.decode(want)).dump() << " vs " << c.at("decoded").dump();
      }
    }
    EXPECT_EQ(failures, 0u) << "of " << cases.size() << " cases";
    // The decoders on id lists of their own: byte runs that are and are not UTF-8, byte tokens
    // between words, special tokens (skipped) before the first word.
    for (const auto& d : v.at("decodes")) {
      const auto ids = d.at("ids").get<std::vector<int32_t>>();
      EXPECT_EQ(tok.decode(ids), d.at("decoded").get<std::string>()) << testing::PrintToString(ids);
    }
    if (!v.at("byte_level").get<bool>()) {
      EXPECT_GE(v.at("decodes").size(), 7u);
    }
  }
}

// Damaged or unsupported tokenizer.json files: an error naming the file and what is wrong, never a
// tokenizer that encodes something else.
TEST(BpeParity, BadTokenizerJsonIsAnError) {
  REQUIRE_REFERENCE();
  const fs::path source = ref_dir / "llama3" / "tokenizer.json";
  const std::string good = slurp(source);
  const fs::path dir = ref_dir / "bad";
  fs::create_directories(dir);
  const fs::path file = dir / "tokenizer.json";
  auto load_error = [&](const std::string& bytes) {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
    return error_of([&] { Tokenizer::load(file.string()); });
  };
  auto mutated = [&](const std::function<void(nlohmann::json&)>& change) {
    nlohmann::json j = nlohmann::json::parse(good);
    change(j);
    return j.dump();
  };
  auto expect = [&](const std::string& error, const std::string& part) {
    EXPECT_NE(error.find(file.string()), std::string::npos) << error;
    EXPECT_NE(error.find(part), std::string::npos) << error;
  };
  expect(load_error(good.substr(0, good.size() / 2)), "[json]");
  expect(load_error(mutated([](auto& j) { j["pre_tokenizer"]["pretokenizers"][0]["type"] = "Whitespace"; })),
         "pre-tokenizer 'Whitespace' is not supported");
  expect(load_error(mutated([](auto& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; })),
         "Split behavior 'Sideways' is not one of");
  expect(load_error(mutated([](auto& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(\\p{L}"; })),
         "does not compile");
  expect(load_error(mutated([](auto& j) { j["normalizer"] = {{"type", "Lowercase"}}; })),
         "normalizer 'Lowercase' is not supported");
  expect(load_error(mutated([](auto& j) { j["model"]["dropout"] = 0.1; })), "dropout");
  expect(load_error(mutated([](auto& j) { j["truncation"] = {{"max_length", 8}}; })), "'truncation' is set");
  expect(load_error(mutated([](auto& j) {
           auto& merges = j["model"]["merges"];
           merges[0] = merges[0].is_string() ? nlohmann::json("Ġ nope") : nlohmann::json({"Ġ", "nope"});
         })),
         "merge 0 names 'nope', which is not in the vocabulary");
  expect(load_error(mutated([](auto& j) { j["model"]["vocab"].erase("!"); })), "'!', which is not in the vocabulary");
  expect(load_error(mutated([](auto& j) { j["decoder"] = {{"type", "Metaspace"}}; })), "the decoder must be ByteLevel");
  expect(load_error(mutated([](auto& j) {
           j["pre_tokenizer"]["pretokenizers"].insert(j["pre_tokenizer"]["pretokenizers"].begin(),
                                                       nlohmann::json::object({{"type", "Metaspace"}, {"replacement", "_"}}));
         })),
         "both Metaspace and ByteLevel");
  // byte_fallback in a byte-level vocabulary never comes into play (every byte has its stand-in).
  {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << mutated([](auto& j) { j["model"]["byte_fallback"] = true; });
    const Tokenizer a = Tokenizer::load(source.string()), b = Tokenizer::load(file.string());
    const std::string text = "caf\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x98\x80 x";
    EXPECT_EQ(a.encode(text), b.encode(text));
  }
  // Sentencepiece-style files: a missing byte token, a normalizer or decoder libft does not run, a
  // ByteLevel decoder without a ByteLevel pre-tokenizer, a normalized added token under Prepend.
  const std::string sp_good = slurp(ref_dir / "llama2" / "tokenizer.json");
  auto sp_mutated = [&](const std::function<void(nlohmann::json&)>& change) {
    nlohmann::json j = nlohmann::json::parse(sp_good);
    change(j);
    return j.dump();
  };
  expect(load_error(sp_mutated([](auto& j) { j["model"]["vocab"].erase("<0x41>"); })),
         "byte_fallback is set but the vocabulary has no '<0x41>'");
  expect(load_error(sp_mutated([](auto& j) { j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", " +"}}}, {"content", "_"}}; })),
         "only a Replace of a String pattern");
  expect(load_error(sp_mutated([](auto& j) { j["decoder"] = {{"type", "CTC"}}; })), "decoder 'CTC' is not supported");
  expect(load_error(sp_mutated([](auto& j) { j["decoder"] = {{"type", "ByteLevel"}}; })),
         "ByteLevel decoder without a ByteLevel pre-tokenizer");
  expect(load_error(sp_mutated([](auto& j) { j["pre_tokenizer"]["prepend_scheme"] = "sometimes"; })),
         "prepend_scheme 'sometimes' is not always, first or never");
  expect(load_error(sp_mutated([](auto& j) { j["pre_tokenizer"]["replacement"] = "ab"; })), "must be one character");
  expect(load_error(sp_mutated([](auto& j) {
           j["normalizer"] = {{"type", "Prepend"}, {"prepend", "_"}};
           j["added_tokens"].back()["normalized"] = true;
         })),
         "normalized added token with a Prepend normalizer");
  // Without byte_fallback or an unk token, a character outside the vocabulary is an error, not
  // silently dropped as tokenizers drops it.
  {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << sp_mutated([](auto& j) { j["model"]["byte_fallback"] = false; });
    const Tokenizer t = Tokenizer::load(file.string());
    expect(error_of([&] { t.encode("snowman \xE2\x98\x83"); }), "is not in the vocabulary and there is neither");
  }
  // tokenizer_config.json naming a token the vocabulary lacks.
  const fs::path with_config = ref_dir / "bad_config";
  fs::create_directories(with_config);
  fs::copy_file(source, with_config / "tokenizer.json", fs::copy_options::overwrite_existing);
  std::ofstream(with_config / "tokenizer_config.json", std::ios::trunc) << R"({"eos_token": "<|nope|>"})";
  const std::string e = error_of([&] { Tokenizer::load(with_config.string()); });
  EXPECT_NE(e.find("eos_token '<|nope|>' is not in the vocabulary"), std::string::npos) << e;
  // A directory with neither file.
  fs::remove(with_config / "tokenizer.json");
  EXPECT_NE(error_of([&] { Tokenizer::load(with_config.string()); }).find("neither tokenizer.model nor tokenizer.json"),
            std::string::npos);
}

// Malformed UTF-8 encodes as U+FFFD (as sentencepiece does), the fingerprint follows the file, and
// piece lookups answer for added tokens and byte-level spellings alike.
TEST(BpeParity, InvalidUtf8FingerprintsAndPieces) {
  REQUIRE_REFERENCE();
  const Tokenizer tok = Tokenizer::load((ref_dir / "qwen2").string());
  EXPECT_EQ(tok.encode("ok \xFF ok"), tok.encode("ok \xEF\xBF\xBD ok"));
  EXPECT_EQ(tok.decode(tok.encode("ok \xC3 ok")), "ok \xEF\xBF\xBD ok");
  const int32_t im_start = tok.piece_to_id("<|im_start|>");
  ASSERT_GE(im_start, 0);
  EXPECT_EQ(tok.id_to_piece(im_start), "<|im_start|>");
  EXPECT_EQ(tok.encode("<|im_start|>"), std::vector<int32_t>{im_start});
  EXPECT_EQ(tok.piece_to_id("<|not a token|>"), -1);  // no unk_token
  EXPECT_NE(tok.fingerprint(), Tokenizer::load((ref_dir / "gpt2").string()).fingerprint());
  EXPECT_EQ(tok.fingerprint(), Tokenizer::load((ref_dir / "qwen2").string()).fingerprint());
  EXPECT_NE(error_of([&] { tok.id_to_piece(tok.vocab_size()); }).find("is not a token"), std::string::npos);
}

// ignore_merges (Llama 3's): a pre-token that is itself in the vocabulary is kept whole, even where
// the merges would not build it. The trained reference cannot show it (a trained vocabulary is what
// its merges build), so a word no merge makes is added to a copy of the Llama 3 layout.
TEST(BpeParity, IgnoreMergesKeepsAVocabularyWordWhole) {
  REQUIRE_REFERENCE();
  nlohmann::json j = nlohmann::json::parse(slurp(ref_dir / "llama3" / "tokenizer.json"));
  ASSERT_TRUE(j["model"]["ignore_merges"].get<bool>());
  const std::string word = "\u0120qqzzqq";  // " qqzzqq" in byte-level spelling
  ASSERT_FALSE(j["model"]["vocab"].contains(word));
  int32_t next = 0;
  for (const auto& [token, id] : j["model"]["vocab"].items()) next = std::max(next, id.get<int32_t>() + 1);
  for (const auto& t : j["added_tokens"]) next = std::max(next, t["id"].get<int32_t>() + 1);
  j["model"]["vocab"][word] = next;
  const fs::path dir = ref_dir / "ignore_merges";
  fs::create_directories(dir);
  for (bool ignore : {true, false}) {
    j["model"]["ignore_merges"] = ignore;
    std::ofstream(dir / "tokenizer.json", std::ios::trunc) << j.dump();
    const Tokenizer tok = Tokenizer::load((dir / "tokenizer.json").string());
    const std::vector<int32_t> ids = tok.encode("a qqzzqq");
    ASSERT_FALSE(ids.empty());
    if (ignore) {
      EXPECT_EQ(ids.back(), next);
      EXPECT_EQ(ids.size(), 2u);
    } else {
      EXPECT_GT(ids.size(), 2u);  // built from the merges, in pieces
    }
    EXPECT_EQ(tok.decode(ids), "a qqzzqq");
  }
}

// Chat data through a byte-level BPE (Qwen's layout, chatml): the examples libft tokenizes segment
// by segment equal the whole rendered conversation encoded at once, which is how transformers'
// apply_chat_template tokenizes (the added tokens cut the string into the same segments), and the
// trainable tokens decode to exactly the assistant turns with their <|im_end|>.
TEST(BpeParity, ChatmlExamplesEqualTheRenderedConversation) {
  REQUIRE_REFERENCE();
  using namespace ft::data;
  const Tokenizer tok = Tokenizer::load((ref_dir / "qwen2").string());
  const auto ref = nlohmann::json::parse(slurp(ref_dir / "bpe_reference.json"));
  std::vector<std::string> texts;  // real text: the reference's fortune records and Jargon File lines
  for (const auto& c : ref["variants"]["qwen2"]["cases"]) {
    const std::string source = c["source"], text = c["text"];
    if ((source.starts_with("fortunes/") || source.starts_with("jargon#")) && !text.empty()) texts.push_back(text);
  }
  ASSERT_GE(texts.size(), 60u);
  std::vector<std::vector<Message>> chats;
  std::string jsonl;
  for (size_t k = 0, c = 0; k + 5 <= texts.size() && chats.size() < 12; ++c) {
    std::vector<Message> m;
    if (c % 2 == 0) m.push_back({Role::system, texts[k++]});
    for (size_t t = 0; t < 1 + c % 2; ++t) {
      m.push_back({Role::user, texts[k++]});
      m.push_back({Role::assistant, texts[k++]});
    }
    nlohmann::json arr = nlohmann::json::array();
    for (const Message& x : m) arr.push_back({{"role", role_name(x.role)}, {"content", x.content}});
    jsonl += nlohmann::json({{"messages", arr}}).dump() + "\n";
    chats.push_back(std::move(m));
  }
  const fs::path dir = ref_dir / "chat";
  fs::create_directories(dir);
  std::ofstream(dir / "chat.jsonl", std::ios::trunc) << jsonl;
  const TokenizerEncoder enc(tok);
  RecordOptions ro;
  ro.format = RecordFormat::chat;
  TokenizeOptions to;
  to.chat_template = "chatml";
  const auto examples = read_examples({(dir / "chat.jsonl").string()}, ro, to, ErrorPolicy{}, enc);
  ASSERT_EQ(examples.size(), chats.size());
  const int32_t im_end = tok.piece_to_id("<|im_end|>");
  for (size_t c = 0; c < chats.size(); ++c) {
    std::string rendered, labels;
    for (const Message& m : chats[c]) {
      rendered += std::string("<|im_start|>") + role_name(m.role) + "\n" + m.content + "<|im_end|>\n";
      if (m.role == Role::assistant) labels += m.content + "<|im_end|>";
    }
    EXPECT_EQ(examples[c].tokens, tok.encode(rendered)) << "chat " << c;  // no BOS: Qwen has none
    std::string whole;  // each trainable span decoded, <|im_end|> shown (decode skips specials)
    for (const auto& span : ft::test::trainable_spans(examples[c])) {
      std::vector<int32_t> run;
      for (int32_t id : span) {
        if (id != im_end) {
          run.push_back(id);
          continue;
        }
        whole += tok.decode(run) + "<|im_end|>";
        run.clear();
      }
      whole += tok.decode(run);
    }
    EXPECT_EQ(whole, labels) << "chat " << c;
  }
}
