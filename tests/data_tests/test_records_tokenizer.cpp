// Record readers with a real sentencepiece model (ft::data::Tokenizer, trained on the fortunes):
// the continuation encoding at segment joins, and label masks decoded by the tokenizer itself.
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "ft/data/tokenizer.h"
#include "ft/util/error.h"
#include "records_test_util.h"

using namespace ft::data;

namespace {

// A 1000-piece BPE model like Llama's (byte fallback, dummy prefix, no normalisation), trained on a
// sample of the fortunes. One per test process: ctest runs each test in a process of its own.
class RecordsTokenizer : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (ft::test::fortune_files().empty()) return;  // SetUp reports it
    const std::string dir = ft::test::scratch_dir("records_tokenizer_" + std::to_string(::getpid()));
    std::string corpus;
    for (const auto& file : ft::test::fortune_files()) {
      const auto fortunes = ft::test::fortunes_of(file);
      for (size_t i = 0; i < fortunes.size(); i += 3) corpus += fortunes[i] + "\n";
    }
    ft::test::write_file(dir + "/corpus.txt", corpus);
    TrainTokenizerOptions o;
    o.inputs = {dir + "/corpus.txt"};
    o.model_prefix = dir + "/bpe1k";
    o.vocab_size = 1000;
    o.input_sentence_size = 5000;
    o.seed = 7;
    o.num_threads = 1;
    tokenizer_ = new Tokenizer(Tokenizer::load(Tokenizer::train(o)));
    dir_ = new std::string(dir);
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
    if (dir_) std::filesystem::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    FT_REQUIRE_FORTUNES();
    ASSERT_NE(tokenizer_, nullptr);
  }

  static const Tokenizer& tok() { return *tokenizer_; }

  // A span decoded by the tokenizer, with EOS shown as "</s>" (Tokenizer::decode drops it).
  static std::string decode_span(const std::vector<int32_t>& span) {
    std::string out;
    std::vector<int32_t> run;
    for (int32_t id : span) {
      if (id == tok().special().eos) {
        out += tok().decode(run) + "</s>";
        run.clear();
      } else {
        run.push_back(id);
      }
    }
    return out + tok().decode(run);
  }

  // Real fortunes that the tokenizer decodes back exactly and that start with a non-space (decode
  // drops a leading space, as sentencepiece always does).
  static std::vector<std::string> contents(const char* file, size_t n) {
    std::vector<std::string> out;
    for (const auto& f : ft::test::some_fortunes(file, 4 * n)) {
      if (f[0] == ' ' || tok().decode(tok().encode(f)) != f) continue;
      out.push_back(f);
      if (out.size() == n) break;
    }
    EXPECT_EQ(out.size(), n);
    return out;
  }

  static Tokenizer* tokenizer_;
  static std::string* dir_;
};
Tokenizer* RecordsTokenizer::tokenizer_ = nullptr;
std::string* RecordsTokenizer::dir_ = nullptr;

std::string write_chats(const std::string& dir, const std::vector<std::vector<Message>>& chats) {
  std::string data;
  for (const auto& c : chats) {
    nlohmann::json arr = nlohmann::json::array();
    for (const Message& m : c) arr.push_back({{"role", role_name(m.role)}, {"content", m.content}});
    data += nlohmann::json({{"messages", arr}}).dump() + "\n";
  }
  ft::test::write_file(dir + "/chat.jsonl", data);
  return dir + "/chat.jsonl";
}

}  // namespace

// The claim behind segment-by-segment tokenization: a join placed before a space, or after a
// newline, gives the tokens of the whole string.
TEST_F(RecordsTokenizer, ContinuationEncodingMatchesWholeStringTokenization) {
  const TokenizerEncoder enc(tok());
  size_t joins = 0;
  for (const char* file : {"fortunes", "computers", "songs-poems"}) {
    for (const std::string& f : ft::test::some_fortunes(file, 60, 2000)) {
      const std::vector<int32_t> whole = tok().encode(f);
      EXPECT_EQ(enc.encode_start(f), whole);
      for (size_t p = 1; p < f.size(); ++p) {
        const bool before_space = f[p] == ' ' && f[p - 1] != ' ';
        const bool after_newline = f[p - 1] == '\n';
        if (!before_space && !after_newline) continue;
        std::vector<int32_t> joined = enc.encode_start(f.substr(0, p));
        const auto rest = enc.encode_continuation(f.substr(p));
        joined.insert(joined.end(), rest.begin(), rest.end());
        ASSERT_EQ(joined, whole) << file << ": split at byte " << p << " of: " << f;
        ++joins;
      }
    }
  }
  EXPECT_GT(joins, 2000u);
  // Without the continuation encoding, the join would invent a space: "\nSure" vs "\n" "▁Sure".
  EXPECT_NE(enc.encode_start("Sure"), enc.encode_continuation("Sure"));
  EXPECT_EQ(tok().decode(enc.encode_continuation("Sure thing")), "Sure thing");
  EXPECT_EQ(enc.encode_continuation(""), std::vector<int32_t>{});
  // Pieces: the trained model has no <|im_end|>, so chatml renders it as text.
  EXPECT_EQ(enc.piece_id("<|im_end|>"), -1);
  EXPECT_EQ(enc.piece_id("<s>"), tok().special().bos);
}

TEST_F(RecordsTokenizer, ChatLabelsDecodeToExactlyTheAssistantTurns) {
  const auto f = contents("people", 60);
  std::vector<std::vector<Message>> chats;
  for (size_t k = 0, c = 0; k + 7 <= f.size(); ++c) {
    std::vector<Message> m;
    if (c % 2 == 0) m.push_back({Role::system, f[k++]});
    for (size_t t = 0; t < 1 + c % 3; ++t) {
      m.push_back({Role::user, f[k++]});
      m.push_back({Role::assistant, f[k++]});
    }
    chats.push_back(std::move(m));
  }
  ASSERT_GE(chats.size(), 8u);
  const std::string path = write_chats(ft::test::scratch_dir("records_tok_chat_" + std::to_string(::getpid())), chats);
  const TokenizerEncoder enc(tok());
  const int32_t bos = tok().special().bos, eos = tok().special().eos;

  for (const char* name : {"llama2", "chatml"}) {
    RecordOptions ro;
    ro.format = RecordFormat::chat;
    TokenizeOptions to;
    to.chat_template = name;
    const auto examples = read_examples({path}, ro, to, ErrorPolicy{}, enc);
    ASSERT_EQ(examples.size(), chats.size());
    for (size_t c = 0; c < chats.size(); ++c) {
      const auto& msgs = chats[c];
      const std::string marker = std::string(name) == "llama2" ? "</s>" : "<|im_end|>";
      std::string expected_labels;
      for (const Message& m : msgs) {
        if (m.role == Role::assistant) expected_labels += m.content + marker;
      }
      std::string labels;
      for (const auto& span : ft::test::trainable_spans(examples[c])) labels += decode_span(span);
      EXPECT_EQ(labels, expected_labels) << name << " chat " << c;

      // The whole example equals whole-string tokenization of the documented rendering: per
      // user/assistant pair for llama2 (as Meta's reference code encodes it), per conversation for chatml.
      std::vector<int32_t> expected_tokens;
      if (std::string(name) == "llama2") {
        std::string sys;
        for (const Message& m : msgs) {
          if (m.role == Role::system) sys = "<<SYS>>\n" + m.content + "\n<</SYS>>\n\n";
          if (m.role == Role::user) {
            expected_tokens.push_back(bos);
            const auto ids = tok().encode("[INST] " + sys + m.content + " [/INST]");
            expected_tokens.insert(expected_tokens.end(), ids.begin(), ids.end());
            sys.clear();
          }
          if (m.role == Role::assistant) {
            const auto ids = enc.encode_continuation(" " + m.content);
            expected_tokens.insert(expected_tokens.end(), ids.begin(), ids.end());
            expected_tokens.push_back(eos);
          }
        }
        // ... and each pair is exactly Meta's single encode call of "[INST] ... [/INST] answer".
        std::string sys2;
        size_t at = 0;
        for (size_t i = 0; i < msgs.size(); ++i) {
          if (msgs[i].role == Role::system) sys2 = "<<SYS>>\n" + msgs[i].content + "\n<</SYS>>\n\n";
          if (msgs[i].role != Role::user) continue;
          const auto pair = tok().encode("[INST] " + sys2 + msgs[i].content + " [/INST] " + msgs[i + 1].content);
          sys2.clear();
          ASSERT_EQ(examples[c].tokens.at(at), bos);
          const std::vector<int32_t> got(examples[c].tokens.begin() + static_cast<long>(at) + 1,
                                         examples[c].tokens.begin() + static_cast<long>(at + 1 + pair.size()));
          EXPECT_EQ(got, pair) << "pair at message " << i << " of chat " << c;
          at += pair.size() + 2;
          ASSERT_EQ(examples[c].tokens.at(at - 1), eos);
        }
        EXPECT_EQ(at, examples[c].tokens.size());
      } else {
        std::string rendered;
        for (const Message& m : msgs)
          rendered += std::string("<|im_start|>") + role_name(m.role) + "\n" + m.content + "<|im_end|>\n";
        expected_tokens.push_back(bos);
        const auto ids = tok().encode(rendered);
        expected_tokens.insert(expected_tokens.end(), ids.begin(), ids.end());
      }
      EXPECT_EQ(examples[c].tokens, expected_tokens) << name << " chat " << c;
    }
  }
}

TEST_F(RecordsTokenizer, InstructionAndTextLabels) {
  const auto f = contents("science", 40);
  const std::string dir = ft::test::scratch_dir("records_tok_instr_" + std::to_string(::getpid()));
  std::string instr, text;
  for (size_t i = 0; i + 1 < f.size(); i += 2) {
    instr += nlohmann::json({{"prompt", "Q: " + f[i] + "\nA:"}, {"completion", " " + f[i + 1]}}).dump() + "\n";
    text += nlohmann::json({{"text", f[i]}}).dump() + "\n";
  }
  ft::test::write_file(dir + "/instr.jsonl", instr);
  ft::test::write_file(dir + "/text.jsonl", text);
  const TokenizerEncoder enc(tok());

  RecordOptions ro;
  ro.format = RecordFormat::instruction;
  const auto examples = read_examples({dir + "/instr.jsonl"}, ro, {}, ErrorPolicy{}, enc);
  ASSERT_EQ(examples.size(), f.size() / 2);
  for (size_t i = 0; i < examples.size(); ++i) {
    const auto spans = ft::test::trainable_spans(examples[i]);
    ASSERT_EQ(spans.size(), 1u);
    // " " + completion after "A:": the first label is "▁word", which decode shows without its space.
    EXPECT_EQ(decode_span(spans[0]), f[2 * i + 1] + "</s>");
    // The join sits before a space, so the tokens are those of the whole string.
    std::vector<int32_t> whole = {tok().special().bos};
    const auto ids = tok().encode("Q: " + f[2 * i] + "\nA: " + f[2 * i + 1]);
    whole.insert(whole.end(), ids.begin(), ids.end());
    whole.push_back(tok().special().eos);
    EXPECT_EQ(examples[i].tokens, whole);
  }

  ro.format = RecordFormat::jsonl_text;
  const auto texts = read_examples({dir + "/text.jsonl"}, ro, {}, ErrorPolicy{}, enc);
  for (size_t i = 0; i < texts.size(); ++i) {
    const Example& ex = texts[i];
    std::vector<int32_t> expected = {tok().special().bos};
    const auto ids = tok().encode(f[2 * i]);
    expected.insert(expected.end(), ids.begin(), ids.end());
    if (tok().special().add_eos) expected.push_back(tok().special().eos);
    EXPECT_EQ(ex.tokens, expected);
    EXPECT_EQ(ex.trainable[0], 0);
    EXPECT_EQ(std::count(ex.trainable.begin(), ex.trainable.end(), uint8_t{1}),
              static_cast<long>(ex.tokens.size()) - 1);
    EXPECT_EQ(tok().decode(ex.tokens), f[2 * i]);
  }
}

TEST_F(RecordsTokenizer, ParallelTokenizationGivesTheSameExamplesAndReport) {
  // Every fortune file, as separator-split text, skipping the real empty records: 1 and 3 threads
  // must give identical examples, origins and reports (the look-ahead window is invisible).
  RecordOptions ro;
  ro.format = RecordFormat::text;
  ro.split = TextSplit::separator;
  ErrorPolicy policy;
  policy.on_error = ErrorPolicy::OnError::skip;
  policy.max_bad_fraction = 0.01;
  const TokenizerEncoder enc(tok());
  auto read_all = [&](int threads, std::vector<RecordOrigin>& origins) {
    TokenizeOptions to;
    to.threads = threads;
    to.max_tokens = 400;
    to.too_long = TokenizeOptions::TooLong::truncate;
    ExampleReader reader(ft::test::fortune_files(), ro, to, policy, enc);
    std::vector<Example> out;
    Example ex;
    RecordOrigin origin;
    while (reader.next(ex, origin)) {
      out.push_back(ex);
      origins.push_back(origin);
    }
    return std::make_pair(out, reader.report());
  };
  std::vector<RecordOrigin> o1, o3;
  const auto [e1, r1] = read_all(1, o1);
  const auto [e3, r3] = read_all(3, o3);
  ASSERT_GT(e1.size(), 10000u);
  ASSERT_EQ(e1.size(), e3.size());
  for (size_t i = 0; i < e1.size(); ++i) {
    ASSERT_EQ(e1[i].tokens, e3[i].tokens) << i;
    ASSERT_EQ(e1[i].trainable, e3[i].trainable) << i;
    ASSERT_EQ(o1[i].file, o3[i].file);
    ASSERT_EQ(o1[i].line, o3[i].line);
  }
  EXPECT_EQ(r1.summary(), r3.summary());
  EXPECT_GT(r1.skipped, 0);
  EXPECT_GT(r1.truncated, 0);

  // Under the fail policy, the same first bad record stops both.
  policy.on_error = ErrorPolicy::OnError::fail;
  std::string err1, err3;
  try { read_all(1, o1); } catch (const ::ft::Error& e) { err1 = e.what(); }
  try { read_all(3, o3); } catch (const ::ft::Error& e) { err3 = e.what(); }
  EXPECT_FALSE(err1.empty());
  EXPECT_EQ(err1, err3);
}
