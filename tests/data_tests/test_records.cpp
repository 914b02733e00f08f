// Record readers with the deterministic ByteEncoder: sources, splitting, templates and label masks.
// Real text throughout: documents, prompts and chat turns are fortunes from the Debian package.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <streambuf>

#include "ft/util/error.h"
#include "jsonl.h"
#include "records_test_util.h"

using namespace ft::data;
using ft::test::ByteEncoder;

namespace {

std::string jsonl_of(const std::vector<nlohmann::json>& records) {
  std::string out;
  for (const auto& r : records) out += r.dump() + "\n";
  return out;
}

// Multi-turn conversations built from consecutive fortunes: system (every other one), then
// user/assistant pairs.
std::vector<std::vector<Message>> fortune_chats(size_t n_chats) {
  const auto f = ft::test::some_fortunes("fortunes", 400);
  std::vector<std::vector<Message>> chats;
  size_t k = 0;
  for (size_t c = 0; c < n_chats && k + 8 < f.size(); ++c) {
    std::vector<Message> m;
    if (c % 2 == 0) m.push_back({Role::system, f[k++]});
    const size_t turns = 1 + c % 3;
    for (size_t t = 0; t < turns; ++t) {
      m.push_back({Role::user, f[k++]});
      m.push_back({Role::assistant, f[k++]});
    }
    chats.push_back(std::move(m));
  }
  return chats;
}

nlohmann::json chat_json(const std::vector<Message>& messages) {
  nlohmann::json arr = nlohmann::json::array();
  for (const Message& m : messages) arr.push_back({{"role", role_name(m.role)}, {"content", m.content}});
  return {{"messages", arr}};
}

std::vector<Example> read_all(const std::vector<std::string>& sources, const RecordOptions& ro,
                              const TokenizeOptions& to, const TokenEncoder& enc,
                              std::vector<RecordOrigin>* origins = nullptr) {
  ExampleReader reader(sources, ro, to, ErrorPolicy{}, enc);
  std::vector<Example> out;
  Example ex;
  RecordOrigin origin;
  while (reader.next(ex, origin)) {
    out.push_back(ex);
    if (origins) origins->push_back(origin);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Byte-level checks and the JSON parser

TEST(RecordsUtf8, AcceptsWellFormedAndFindsTheFirstBadByte) {
  using jsonl::find_invalid_utf8;
  constexpr size_t ok = std::string_view::npos;
  EXPECT_EQ(find_invalid_utf8("plain ASCII"), ok);
  EXPECT_EQ(find_invalid_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xEF\xBB\xBF \xF4\x8F\xBF\xBF"), ok);
  EXPECT_EQ(find_invalid_utf8("ab\xC3"), 2u);             // truncated at the end
  EXPECT_EQ(find_invalid_utf8("ab\xC3(x"), 2u);           // bad continuation
  EXPECT_EQ(find_invalid_utf8("\x80"), 0u);               // lone continuation
  EXPECT_EQ(find_invalid_utf8("a\xC0\xAF"), 1u);          // overlong '/'
  EXPECT_EQ(find_invalid_utf8("a\xC1\xBF"), 1u);          // overlong
  EXPECT_EQ(find_invalid_utf8("a\xE0\x80\xAF"), 1u);      // overlong 3-byte
  EXPECT_EQ(find_invalid_utf8("a\xF0\x80\x80\xAF"), 1u);  // overlong 4-byte
  EXPECT_EQ(find_invalid_utf8("xy\xED\xA0\x80"), 2u);     // surrogate U+D800
  EXPECT_EQ(find_invalid_utf8("\xF4\x90\x80\x80"), 0u);   // U+110000
  EXPECT_EQ(find_invalid_utf8("\xF5\x80\x80\x80"), 0u);
  EXPECT_EQ(find_invalid_utf8("Caf\xE9 au lait"), 3u);  // Latin-1 é
}

TEST(RecordsJson, ParsesValuesWithPositions) {
  jsonl::Value v;
  jsonl::ParseError err;
  ASSERT_TRUE(jsonl::parse(R"( {"a": [1, -2.5e3, true, null], "b": "x\u00e9\ud83d\ude00\n", "c": {}} )", 32, v, err))
      << err.reason;
  ASSERT_EQ(v.type, jsonl::Value::Type::object);
  EXPECT_EQ(v.offset, 1u);
  ASSERT_EQ(v.members.size(), 3u);
  EXPECT_EQ(v.members[0].key, "a");
  EXPECT_EQ(v.members[0].key_offset, 2u);
  const auto& a = v.members[0].value;
  ASSERT_EQ(a.items.size(), 4u);
  EXPECT_EQ(a.offset, 7u);
  EXPECT_EQ(a.items[1].text, "-2.5e3");
  EXPECT_EQ(a.items[1].offset, 11u);
  EXPECT_EQ(v.find("b")->text, "x\xC3\xA9\xF0\x9F\x98\x80\n");
  EXPECT_EQ(v.find("c")->type, jsonl::Value::Type::object);
}

TEST(RecordsJson, RejectsWithTheOffendingOffset) {
  struct Case {
    const char* text;
    size_t offset;
    const char* reason;
  };
  const Case cases[] = {
      {R"({"a": 1,})", 8, "expected a key string"},
      {R"({"a" 1})", 5, "expected ':'"},
      {R"({"a": 01})", 7, "leading zero"},
      {R"({"a": 1.})", 8, "after '.'"},
      {R"({"a": tru})", 9, "expected 'true'"},
      {R"({"a": "x)", 6, "unterminated string"},
      {"{\"a\": \"x\ty\"}", 8, "control character 0x09"},
      {R"({"a": "\x"})", 7, "invalid escape"},
      {R"({"a": "\ud800"})", 7, "without a low surrogate"},
      {R"({"a": "\udc00"})", 7, "lone low surrogate"},
      {R"({"a": "\u0000"})", 7, "\\u0000 (NUL) is not allowed"},
      {R"({"a": 1, "a": 2})", 9, "duplicate key \"a\""},
      {R"({"a": 1} x)", 9, "after the JSON value"},
      {R"([[[[1]]]])", 3, "nesting deeper than 3"},
      {"", 0, "unexpected end of line"},
  };
  for (const Case& c : cases) {
    jsonl::Value v;
    jsonl::ParseError err;
    EXPECT_FALSE(jsonl::parse(c.text, 3, v, err)) << c.text;
    EXPECT_EQ(err.offset, c.offset) << c.text << ": " << err.reason;
    EXPECT_NE(err.reason.find(c.reason), std::string::npos) << c.text << ": " << err.reason;
  }
}

TEST(RecordsJson, WideObjectsFindDuplicates) {
  std::string s = "{";
  for (int i = 0; i < 100; ++i) s += "\"k" + std::to_string(i) + "\": " + std::to_string(i) + ", ";
  std::string dup = s + "\"k42\": 0}";
  s += "\"last\": 0}";
  jsonl::Value v;
  jsonl::ParseError err;
  EXPECT_TRUE(jsonl::parse(s, 8, v, err)) << err.reason;
  EXPECT_EQ(v.members.size(), 101u);
  EXPECT_FALSE(jsonl::parse(dup, 8, v, err));
  EXPECT_EQ(err.reason, "duplicate key \"k42\"");
  EXPECT_EQ(err.offset, dup.rfind("\"k42\""));
}

// ---------------------------------------------------------------------------------------------
// Plain text

TEST(RecordsText, WholeFileIsOneDocumentAllLabelsButBos) {
  FT_REQUIRE_FORTUNES();
  const std::string path = std::string(ft::test::kFortuneDir) + "/fortunes";
  std::string content = ft::test::read_file(path);
  ASSERT_EQ(content.back(), '\n');
  content.pop_back();  // the last line terminator is not part of the document

  ByteEncoder enc({}, /*add_bos=*/true, /*add_eos=*/true);
  std::vector<RecordOrigin> origins;
  const auto examples = read_all({path}, RecordOptions{}, TokenizeOptions{}, enc, &origins);
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(origins[0].file, path);
  EXPECT_EQ(origins[0].line, 0);
  const Example& ex = examples[0];
  EXPECT_EQ(enc.render(ex.tokens), "<s> " + content + "</s>");
  EXPECT_EQ(ex.trainable[0], 0);  // BOS
  for (size_t i = 1; i < ex.tokens.size(); ++i) ASSERT_EQ(ex.trainable[i], 1) << i;
  const auto spans = ft::test::trainable_spans(ex);
  ASSERT_EQ(spans.size(), 1u);
  EXPECT_EQ(enc.decode(spans[0]), content + "</s>");

  // The tokenizer's add_bos/add_eos are the defaults; options override them.
  TokenizeOptions no_specials;
  no_specials.add_bos = false;
  no_specials.add_eos = false;
  const auto bare = read_all({path}, RecordOptions{}, no_specials, enc);
  EXPECT_EQ(enc.render(bare[0].tokens), " " + content);
}

TEST(RecordsText, SeparatorSplitsFortunesLikeAnIndependentSplitter) {
  FT_REQUIRE_FORTUNES();
  RecordOptions ro;
  ro.split = TextSplit::separator;
  ro.separator = "%";
  for (const char* name : {"fortunes", "computers", "linux", "science"}) {
    const std::string path = std::string(ft::test::kFortuneDir) + "/" + name;
    const auto expected = ft::test::fortunes_of(path);
    ASSERT_GT(expected.size(), 100u) << name;
    RecordReader reader({path}, ro);
    Record rec;
    RecordIssue issue;
    size_t n = 0;
    int64_t prev_line = 0;
    RecordReader::Next r;
    while ((r = reader.next(rec, issue)) != RecordReader::Next::end) {
      ASSERT_EQ(r, RecordReader::Next::record) << issue.to_string();
      ASSERT_LT(n, expected.size());
      EXPECT_EQ(rec.text, expected[n]) << name << " #" << n;
      EXPECT_GT(rec.origin.line, prev_line);
      prev_line = rec.origin.line;
      ++n;
    }
    EXPECT_EQ(n, expected.size()) << name;
  }
  // The first record's origin is line 1; the second starts after the first "%".
  RecordReader reader({std::string(ft::test::kFortuneDir) + "/fortunes"}, ro);
  Record rec;
  RecordIssue issue;
  ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record);
  EXPECT_EQ(rec.origin.line, 1);
  EXPECT_EQ(rec.text, "A day for firm decisions!!!!!  Or is it?");
  ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record);
  EXPECT_EQ(rec.origin.line, 3);
}

TEST(RecordsText, BlankLinesSplitParagraphs) {
  FT_REQUIRE_FORTUNES();
  const auto fortunes = ft::test::some_fortunes("humorists", 50);
  std::string file;
  for (size_t i = 0; i < fortunes.size(); ++i) file += fortunes[i] + (i % 3 == 0 ? "\n\n\n" : "\n \t\n");
  const std::string dir = ft::test::scratch_dir("records_paragraphs");
  ft::test::write_file(dir + "/humorists.txt", "\n\n" + file);
  RecordOptions ro;
  ro.split = TextSplit::blank_lines;
  RecordReader reader({dir + "/humorists.txt"}, ro);
  Record rec;
  RecordIssue issue;
  for (const std::string& f : fortunes) {
    ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record) << issue.to_string();
    EXPECT_EQ(rec.text, f);
  }
  EXPECT_EQ(reader.next(rec, issue), RecordReader::Next::end);
}

TEST(RecordsText, DirectoriesAreWalkedInSortedOrder) {
  FT_REQUIRE_FORTUNES();
  const std::string dir = ft::test::scratch_dir("records_walk");
  const auto f = ft::test::some_fortunes("wisdom", 8);
  // Created out of order; names chosen so that byte order differs from creation order and from a
  // case-insensitive or natural sort.
  ft::test::write_file(dir + "/b/10.txt", f[0]);
  ft::test::write_file(dir + "/b/9.txt", f[1]);
  ft::test::write_file(dir + "/B.txt", f[2]);
  ft::test::write_file(dir + "/a.txt", f[3]);
  ft::test::write_file(dir + "/a.txt.bak", f[4]);
  ft::test::write_file(dir + "/.hidden.txt", f[5]);
  ft::test::write_file(dir + "/.git/x.txt", f[6]);
  std::filesystem::create_symlink(dir + "/b", dir + "/z_link_to_b");  // a linked directory: not entered

  const auto all = list_source_files({dir}, {});
  const std::vector<std::string> expect_all = {dir + "/B.txt", dir + "/a.txt", dir + "/a.txt.bak", dir + "/b/10.txt",
                                               dir + "/b/9.txt"};
  EXPECT_EQ(all, expect_all);
  const auto txt = list_source_files({dir}, {".txt"});
  EXPECT_EQ(txt, (std::vector<std::string>{dir + "/B.txt", dir + "/a.txt", dir + "/b/10.txt", dir + "/b/9.txt"}));
  // Files named explicitly are read whatever their extension, in the order given.
  EXPECT_EQ(list_source_files({dir + "/a.txt.bak", dir + "/B.txt"}, {".txt"}),
            (std::vector<std::string>{dir + "/a.txt.bak", dir + "/B.txt"}));

  RecordOptions ro;
  ro.extensions = {".txt"};
  RecordReader reader({dir}, ro);
  Record rec;
  RecordIssue issue;
  for (size_t i : {2, 3, 0, 1}) {
    ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record);
    EXPECT_EQ(rec.text, f[i]);
  }
  EXPECT_EQ(reader.next(rec, issue), RecordReader::Next::end);
}

// ---------------------------------------------------------------------------------------------
// JSONL

TEST(RecordsJsonl, TextRecordsRoundTripRealText) {
  FT_REQUIRE_FORTUNES();
  // Fortunes from "computers" hold tabs, quotes, backslashes and backspaces (overstriking): all must
  // come back byte for byte through JSON escapes.
  const auto fortunes = ft::test::some_fortunes("computers", 300, 2000);
  std::vector<nlohmann::json> recs;
  for (const auto& f : fortunes) recs.push_back({{"text", f}});
  const std::string dir = ft::test::scratch_dir("records_jsonl_text");
  ft::test::write_file(dir + "/computers.jsonl", jsonl_of(recs));

  RecordOptions ro;
  ro.format = RecordFormat::jsonl_text;
  ByteEncoder enc({}, true, true);
  std::vector<RecordOrigin> origins;
  const auto examples = read_all({dir + "/computers.jsonl"}, ro, TokenizeOptions{}, enc, &origins);
  ASSERT_EQ(examples.size(), fortunes.size());
  for (size_t i = 0; i < fortunes.size(); ++i) {
    EXPECT_EQ(origins[i].line, static_cast<int64_t>(i + 1));
    const auto spans = ft::test::trainable_spans(examples[i]);
    ASSERT_EQ(spans.size(), 1u);
    EXPECT_EQ(enc.decode(spans[0]), fortunes[i] + "</s>");  // text: everything but the BOS
    EXPECT_EQ(examples[i].trainable[0], 0);
  }
}

TEST(RecordsJsonl, InstructionLabelsAreCompletionAndEosOnly) {
  FT_REQUIRE_FORTUNES();
  const auto f = ft::test::some_fortunes("literature", 120);
  std::vector<nlohmann::json> recs;
  for (size_t i = 0; i + 1 < f.size(); i += 2) {
    recs.push_back(
        {{"prompt", "Quote something, then explain it.\n\n" + f[i] + "\n\n### Response:\n"}, {"completion", f[i + 1]}});
  }
  const std::string dir = ft::test::scratch_dir("records_instruction");
  ft::test::write_file(dir + "/lit.jsonl", jsonl_of(recs));

  RecordOptions ro;
  ro.format = RecordFormat::instruction;
  ByteEncoder enc;
  const auto examples = read_all({dir + "/lit.jsonl"}, ro, TokenizeOptions{}, enc);
  ASSERT_EQ(examples.size(), recs.size());
  for (size_t i = 0; i < recs.size(); ++i) {
    const std::string prompt = recs[i]["prompt"], completion = recs[i]["completion"];
    const Example& ex = examples[i];
    // [BOS] prompt (document start: dummy-prefix space) completion (continuation) EOS
    EXPECT_EQ(enc.render(ex.tokens), "<s> " + prompt + completion + "</s>");
    const auto spans = ft::test::trainable_spans(ex);
    ASSERT_EQ(spans.size(), 1u);
    EXPECT_EQ(enc.render(spans[0]), completion + "</s>");
    EXPECT_EQ(ex.tokens.back(), ByteEncoder::kEos);
    EXPECT_EQ(ex.trainable.back(), 1);
  }

  // With a template the pair is a one-turn chat: llama2 labels are " " + completion and EOS.
  TokenizeOptions to;
  to.chat_template = "llama2";
  const auto templated = read_all({dir + "/lit.jsonl"}, ro, to, enc);
  const std::string p0 = recs[0]["prompt"], c0 = recs[0]["completion"];
  EXPECT_EQ(enc.render(templated[0].tokens), "<s> [INST] " + p0 + " [/INST] " + c0 + "</s>");
  const auto spans = ft::test::trainable_spans(templated[0]);
  ASSERT_EQ(spans.size(), 1u);
  EXPECT_EQ(enc.decode(spans[0]), c0 + "</s>");
}

// The acceptance test of the label masks: for multi-turn chats, the decoded trainable spans,
// concatenated, are exactly the assistant contents, each followed by its end-of-turn marker.
TEST(RecordsChat, TrainableSpansAreExactlyTheAssistantTurnsLlama2) {
  FT_REQUIRE_FORTUNES();
  const auto chats = fortune_chats(40);
  ASSERT_EQ(chats.size(), 40u);
  std::vector<nlohmann::json> recs;
  for (const auto& c : chats) recs.push_back(chat_json(c));
  const std::string dir = ft::test::scratch_dir("records_chat_llama2");
  ft::test::write_file(dir + "/chat.jsonl", jsonl_of(recs));

  RecordOptions ro;
  ro.format = RecordFormat::chat;
  TokenizeOptions to;
  to.chat_template = "llama2";
  ByteEncoder enc;
  const auto examples = read_all({dir + "/chat.jsonl"}, ro, to, enc);
  ASSERT_EQ(examples.size(), chats.size());
  for (size_t c = 0; c < chats.size(); ++c) {
    std::string expected_labels, expected_render;
    std::string sys;
    for (size_t i = 0; i < chats[c].size(); ++i) {
      const Message& m = chats[c][i];
      if (m.role == Role::system) sys = "<<SYS>>\n" + m.content + "\n<</SYS>>\n\n";
      if (m.role == Role::user) {
        expected_render += "<s> [INST] " + sys + m.content + " [/INST]";
        sys.clear();
      }
      if (m.role == Role::assistant) {
        expected_labels += m.content + "</s>";
        expected_render += " " + m.content + "</s>";
      }
    }
    const Example& ex = examples[c];
    EXPECT_EQ(enc.render(ex.tokens), expected_render) << "chat " << c;
    std::string labels;
    for (const auto& span : ft::test::trainable_spans(ex)) labels += enc.decode(span);
    EXPECT_EQ(labels, expected_labels) << "chat " << c;
  }
}

TEST(RecordsChat, TrainableSpansAreExactlyTheAssistantTurnsChatml) {
  FT_REQUIRE_FORTUNES();
  const auto chats = fortune_chats(40);
  std::vector<nlohmann::json> recs;
  for (const auto& c : chats) recs.push_back(chat_json(c));
  const std::string dir = ft::test::scratch_dir("records_chat_chatml");
  ft::test::write_file(dir + "/chat.jsonl", jsonl_of(recs));

  RecordOptions ro;
  ro.format = RecordFormat::chat;
  TokenizeOptions to;
  to.chat_template = "chatml";
  // Twice: with <|im_start|>/<|im_end|> as single ids, and with a vocabulary that lacks them, where
  // they are rendered as text (and <|im_end|>'s text tokens are labels).
  for (bool pieces : {true, false}) {
    ByteEncoder enc(pieces ? std::vector<std::string>{"<|im_start|>", "<|im_end|>"} : std::vector<std::string>{});
    const auto examples = read_all({dir + "/chat.jsonl"}, ro, to, enc);
    ASSERT_EQ(examples.size(), chats.size());
    for (size_t c = 0; c < chats.size(); ++c) {
      std::string expected_labels, expected_render = "<s>";
      for (const Message& m : chats[c]) {
        expected_render += std::string("<|im_start|>") + role_name(m.role) + "\n" + m.content + "<|im_end|>\n";
        if (m.role == Role::assistant) expected_labels += m.content + "<|im_end|>";
      }
      // Without the pieces the text after BOS starts a document: the stand-in's dummy-prefix space.
      if (!pieces) expected_render.insert(3, " ");
      const Example& ex = examples[c];
      EXPECT_EQ(enc.render(ex.tokens), expected_render) << "chat " << c;
      std::string labels;
      for (const auto& span : ft::test::trainable_spans(ex)) labels += enc.decode(span);
      EXPECT_EQ(labels, expected_labels) << "chat " << c << (pieces ? " (pieces)" : " (text markers)");
      // One span per assistant turn; the id form has <|im_end|> as one label token.
      size_t assistants = 0;
      for (const Message& m : chats[c]) assistants += m.role == Role::assistant;
      EXPECT_EQ(ft::test::trainable_spans(ex).size(), assistants);
      if (pieces) {
        for (const auto& span : ft::test::trainable_spans(ex)) EXPECT_EQ(span.back(), ByteEncoder::kFirstPiece + 1);
      }
    }
  }
}

TEST(RecordsChat, TokenizationSplitsOnlyWhereTheMaskChanges) {
  // Adjacent non-trainable text (template + user content + template) is one encode call: with the
  // stand-in, a document start shows as a single leading space, continuations as none.
  std::vector<TemplateSegment> segs = {
      {TemplateSegment::Kind::text, "a", false}, {TemplateSegment::Kind::text, "b", false},
      {TemplateSegment::Kind::text, "c", true},  {TemplateSegment::Kind::bos, "", false},
      {TemplateSegment::Kind::text, "d", false}, {TemplateSegment::Kind::special, "<x>", true},
      {TemplateSegment::Kind::text, "", true},   {TemplateSegment::Kind::eos, "", true}};
  ByteEncoder enc;
  const Example ex = tokenize_segments(segs, enc);
  EXPECT_EQ(enc.render(ex.tokens), " abc<s> d<x></s>");
  EXPECT_EQ(ex.trainable, (std::vector<uint8_t>{0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1}));
}

TEST(RecordsChat, TemplatesByName) {
  EXPECT_EQ(parse_chat_template("llama2"), ChatTemplate::llama2);
  EXPECT_EQ(parse_chat_template("chatml"), ChatTemplate::chatml);
  EXPECT_THROW(parse_chat_template("vicuna"), ft::Error);
  EXPECT_EQ(parse_record_format("jsonl"), RecordFormat::jsonl_text);
  EXPECT_THROW(parse_record_format("csv"), ft::Error);
  EXPECT_EQ(parse_text_split("separator"), TextSplit::separator);
  // Chat data without a template is a configuration error, not something to default.
  RecordOptions ro;
  ro.format = RecordFormat::chat;
  ByteEncoder enc;
  const std::string dir = ft::test::scratch_dir("records_no_template");
  ft::test::write_file(dir + "/c.jsonl",
                       R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})"
                       "\n");
  EXPECT_THROW(ExampleReader({dir + "/c.jsonl"}, ro, TokenizeOptions{}, ErrorPolicy{}, enc), ft::Error);
  TokenizeOptions to;
  to.chat_template = "chatml";
  ro.format = RecordFormat::jsonl_text;
  EXPECT_THROW(ExampleReader({dir + "/c.jsonl"}, ro, to, ErrorPolicy{}, enc), ft::Error);
}

// ---------------------------------------------------------------------------------------------
// Streaming

namespace {

// An endless-looking input produced on the fly: one `line_bytes`-byte line of 'x', then `tail`.
class GeneratedBuf : public std::streambuf {
 public:
  GeneratedBuf(uint64_t line_bytes, std::string tail)
      : left_(line_bytes), tail_(std::move(tail)), chunk_(1 << 20, 'x') {}

 protected:
  int_type underflow() override {
    if (left_ > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left_, chunk_.size()));
      left_ -= n;
      setg(chunk_.data(), chunk_.data(), chunk_.data() + n);
      return traits_type::to_int_type(chunk_[0]);
    }
    if (!tail_done_) {
      tail_done_ = true;
      setg(tail_.data(), tail_.data(), tail_.data() + tail_.size());
      if (!tail_.empty()) return traits_type::to_int_type(tail_[0]);
    }
    return traits_type::eof();
  }

 private:
  uint64_t left_;
  std::string tail_;
  std::vector<char> chunk_;
  bool tail_done_ = false;
};

long max_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

}  // namespace

TEST(RecordsStreaming, A512MiBLineIsSkippedWithoutBufferingIt) {
  FT_REQUIRE_FORTUNES();
  const auto f = ft::test::some_fortunes("kids", 3);
  const std::string tail =
      "\n" + nlohmann::json({{"text", f[0]}}).dump() + "\n" + nlohmann::json({{"text", f[1]}}).dump() + "\n";
  GeneratedBuf buf(512ull << 20, tail);
  std::istream in(&buf);
  RecordOptions ro;
  ro.format = RecordFormat::jsonl_text;
  ro.max_line_bytes = 1 << 20;
  const long rss_before = max_rss_kib();
  RecordReader reader(in, "generated.jsonl", ro);
  Record rec;
  RecordIssue issue;
  ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::bad);
  EXPECT_EQ(issue.to_string(), "generated.jsonl:1:1048577: line longer than max_line_bytes (1048576 bytes)");
  ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record);
  EXPECT_EQ(rec.text, f[0]);
  EXPECT_EQ(rec.origin.line, 2);
  ASSERT_EQ(reader.next(rec, issue), RecordReader::Next::record);
  EXPECT_EQ(rec.text, f[1]);
  EXPECT_EQ(reader.next(rec, issue), RecordReader::Next::end);
  // The high-water mark grows by the buffers (about 2 MiB), not by the 512 MiB line.
  EXPECT_LT(max_rss_kib() - rss_before, 64 << 10);
}

TEST(RecordsStreaming, ReadsRecordsOneAtATimeFromAStream) {
  FT_REQUIRE_FORTUNES();
  const auto f = ft::test::some_fortunes("people", 200);
  std::string data;
  for (size_t i = 0; i + 1 < f.size(); i += 2)
    data += nlohmann::json({{"prompt", f[i]}, {"completion", f[i + 1]}}).dump() + "\n";
  std::istringstream in(data);
  RecordOptions ro;
  ro.format = RecordFormat::instruction;
  ByteEncoder enc;
  ExampleReader reader(RecordReader(in, "people.jsonl", ro), TokenizeOptions{}, ErrorPolicy{}, enc);
  Example ex;
  RecordOrigin origin;
  size_t n = 0;
  while (reader.next(ex, origin)) {
    EXPECT_EQ(origin.line, static_cast<int64_t>(n + 1));
    EXPECT_EQ(enc.render(ft::test::trainable_spans(ex)[0]), f[2 * n + 1] + "</s>");
    ++n;
  }
  EXPECT_EQ(n, f.size() / 2);
  EXPECT_EQ(reader.report().examples, static_cast<int64_t>(n));
  EXPECT_EQ(reader.report().skipped, 0);
}

TEST(RecordsSeeds, FuzzSeedsAreValidRecords) {
  // tests/data/jsonl seeds the fuzzer; the good ones must stay good for the formats they name.
  const char* root = std::getenv("LIBFT_TEST_DATA");
  ASSERT_NE(root, nullptr);
  const std::string dir = std::string(root) + "/jsonl";
  ByteEncoder enc({"<|im_start|>", "<|im_end|>"});
  const std::pair<const char*, RecordFormat> seeds[] = {{"text.jsonl", RecordFormat::jsonl_text},
                                                        {"instruction.jsonl", RecordFormat::instruction},
                                                        {"chat.jsonl", RecordFormat::chat}};
  for (const auto& [name, format] : seeds) {
    RecordOptions ro;
    ro.format = format;
    TokenizeOptions to;
    if (format == RecordFormat::chat) to.chat_template = "chatml";
    ReadReport report;
    const auto examples = read_examples({dir + "/" + name}, ro, to, ErrorPolicy{}, enc, &report);
    EXPECT_GE(examples.size(), 3u) << name;
    EXPECT_EQ(report.skipped, 0) << name;
  }
}
