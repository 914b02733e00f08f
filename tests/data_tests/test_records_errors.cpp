// Bad input: one test per case, each on files written into LIBFT_DATA_TEST_TMP, checking the
// file:line:column and the reason. The good records around the bad ones are real fortunes.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "ft/util/error.h"
#include "records_test_util.h"

using namespace ft::data;
using ft::test::ByteEncoder;

namespace {

std::string text_line(const std::string& text) { return nlohmann::json({{"text", text}}).dump(); }

// Writes `content` to LIBFT_DATA_TEST_TMP/records_err_<test>/<name> and returns its path. The directory
// is not emptied: a test writes several files and reads them back in any order.
std::string scratch_file(const std::string& test, const std::string& name, std::string_view content) {
  const char* root = std::getenv("LIBFT_DATA_TEST_TMP");
  const auto base = root ? std::filesystem::path(root) : std::filesystem::current_path() / "data_tmp"  /* ctest runs in the build tree */;
  const std::string path = (base / ("records_err_" + test) / name).string();
  ft::test::write_file(path, content);
  return path;
}

struct Read {
  std::vector<Record> records;
  std::vector<RecordIssue> issues;
};

Read read_records(const std::string& path, const RecordOptions& ro) {
  RecordReader reader({path}, ro);
  Read out;
  Record rec;
  RecordIssue issue;
  for (RecordReader::Next r; (r = reader.next(rec, issue)) != RecordReader::Next::end;) {
    if (r == RecordReader::Next::record)
      out.records.push_back(rec);
    else
      out.issues.push_back(issue);
  }
  return out;
}

std::vector<std::string> issue_strings(const std::vector<RecordIssue>& issues) {
  std::vector<std::string> out;
  for (const auto& i : issues) out.push_back(i.to_string());
  return out;
}

RecordOptions jsonl(RecordFormat format = RecordFormat::jsonl_text) {
  RecordOptions ro;
  ro.format = format;
  return ro;
}

// The message ExampleReader throws under OnError::fail ("" when nothing is thrown).
std::string fail_message(const std::string& path, const RecordOptions& ro, const TokenizeOptions& to = {}) {
  ByteEncoder enc;
  try {
    read_examples({path}, ro, to, ErrorPolicy{}, enc);
  } catch (const ft::Error& e) {
    return e.what();
  }
  return "";
}

std::vector<std::string> good(size_t n, const char* file = "fortunes") {
  auto f = ft::test::some_fortunes(file, n);
  EXPECT_EQ(f.size(), n);
  return f;
}

}  // namespace

TEST(RecordsBadInput, MalformedJsonLine) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(3);
  const std::string broken = text_line(f[1]).substr(0, text_line(f[1]).size() - 1);  // lost its '}'
  const std::string path = scratch_file("malformed", "a.jsonl",
                                        text_line(f[0]) + "\n" + text_line(f[2]) + "\n" + broken + "\n" +
                                            R"({"text": "x",, "y": 1})"
                                            "\n");
  const Read r = read_records(path, jsonl());
  EXPECT_EQ(r.records.size(), 2u);
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{path + ":3:" + std::to_string(broken.size() + 1) +
                                          ": invalid JSON: unexpected end of line, expected ',' or '}'",
                                      path + ":4:14: invalid JSON: unexpected ',', expected a key string"}));
  // Under OnError::fail the first one stops the read, with the same text.
  EXPECT_EQ(fail_message(path, jsonl()), "[records] " + r.issues[0].to_string());
}

TEST(RecordsBadInput, MissingField) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  const std::string path =
      scratch_file("missing", "a.jsonl", nlohmann::json({{"prompt", f[0]}}).dump() + "\n" + "  {}\n");
  RecordOptions ro = jsonl(RecordFormat::instruction);
  const Read r = read_records(path, ro);
  EXPECT_EQ(issue_strings(r.issues), (std::vector<std::string>{path + ":1:1: missing field \"completion\"",
                                                               path + ":2:3: missing field \"prompt\""}));
}

TEST(RecordsBadInput, MistypedFields) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  {
    const std::string path = scratch_file("mistyped", "text.jsonl",
                                          R"({"text": 42})"
                                          "\n"
                                          R"({"text": ["a"]})"
                                          "\n");
    EXPECT_EQ(issue_strings(read_records(path, jsonl()).issues),
              (std::vector<std::string>{path + ":1:10: \"text\" must be a string, not number",
                                        path + ":2:10: \"text\" must be a string, not array"}));
  }
  {
    const std::string line = nlohmann::json({{"completion", f[1]}, {"prompt", nullptr}}).dump();
    const std::string path = scratch_file("mistyped", "instr.jsonl", line + "\n");
    EXPECT_EQ(issue_strings(read_records(path, jsonl(RecordFormat::instruction)).issues),
              (std::vector<std::string>{path + ":1:" + std::to_string(line.find("null") + 1) +
                                        ": \"prompt\" must be a string, not null"}));
  }
  {
    const std::string path =
        scratch_file("mistyped", "chat.jsonl",
                     R"({"messages": {"role": "user"}})"
                     "\n"
                     R"({"messages": ["hello"]})"
                     "\n"
                     R"({"messages": [{"role": 1, "content": "x"}]})"
                     "\n"
                     R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": false}]})"
                     "\n");
    EXPECT_EQ(issue_strings(read_records(path, jsonl(RecordFormat::chat)).issues),
              (std::vector<std::string>{path + ":1:14: \"messages\" must be an array, not object",
                                        path + ":2:15: messages[0] must be an object, not string",
                                        path + ":3:24: messages[0].role must be a string, not number",
                                        path + ":4:83: messages[1].content must be a string, not boolean"}));
  }
  {
    const std::string path = scratch_file("mistyped", "root.jsonl", "[1, 2]\n\"text\"\n");
    EXPECT_EQ(issue_strings(read_records(path, jsonl()).issues),
              (std::vector<std::string>{path + ":1:1: expected a JSON object, not array",
                                        path + ":2:1: expected a JSON object, not string"}));
  }
}

TEST(RecordsBadInput, UnknownFieldsAreErrorsUnlessAllowed) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  const std::string line =
      nlohmann::json({{"text", f[0]}, {"source", "fortunes"}}).dump();  // keys sorted: source first
  const std::string path = scratch_file("unknown", "a.jsonl", line + "\n" + text_line(f[1]) + "\n");
  const Read strict = read_records(path, jsonl());
  EXPECT_EQ(issue_strings(strict.issues),
            (std::vector<std::string>{path + ":1:2: unknown field \"source\" (expected: text)"}));
  RecordOptions ro = jsonl();
  ro.allow_unknown_fields = true;
  const Read lenient = read_records(path, ro);
  EXPECT_TRUE(lenient.issues.empty());
  ASSERT_EQ(lenient.records.size(), 2u);
  EXPECT_EQ(lenient.records[0].text, f[0]);
  // Unknown fields inside chat messages too.
  const std::string chat = scratch_file(
      "unknown", "c.jsonl",
      R"({"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "yo"}]})"
      "\n");
  EXPECT_EQ(issue_strings(read_records(chat, jsonl(RecordFormat::chat)).issues),
            (std::vector<std::string>{chat + ":1:49: messages[0]: unknown field \"weight\" (expected: role, content, "
                                             "tool_calls, tool_call_id, name, reasoning_content, thinking)"}));
}

TEST(RecordsBadInput, DuplicateKeys) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(1);
  const std::string line = "{\"text\": " + nlohmann::json(f[0]).dump() + ", \"text\": \"again\"}";
  const std::string path = scratch_file("duplicate", "a.jsonl", line + "\n");
  EXPECT_EQ(issue_strings(read_records(path, jsonl()).issues),
            (std::vector<std::string>{path + ":1:" + std::to_string(line.rfind("\"text\"") + 1) +
                                      ": invalid JSON: duplicate key \"text\""}));
}

TEST(RecordsBadInput, NonUtf8Bytes) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  // A Latin-1 "é" inside a JSON string, and a stray continuation byte in a text document.
  const std::string path =
      scratch_file("utf8", "a.jsonl", text_line(f[0]) + "\n{\"text\": \"Caf\xE9 au lait\"}\n" + text_line(f[1]) + "\n");
  const Read r = read_records(path, jsonl());
  EXPECT_EQ(r.records.size(), 2u);
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{path + ":2:14: invalid UTF-8 (sequence starting with byte 0xE9)"}));

  RecordOptions ro;
  ro.split = TextSplit::separator;
  const std::string text = scratch_file("utf8", "b.txt", f[0] + "\n%\nline one\nline \x80two\n%\n" + f[1] + "\n%\n");
  const Read t = read_records(text, ro);
  ASSERT_EQ(t.records.size(), 2u);
  EXPECT_EQ(t.records[1].text, f[1]);
  EXPECT_EQ(issue_strings(t.issues),
            (std::vector<std::string>{text + ":" + std::to_string(std::count(f[0].begin(), f[0].end(), '\n') + 4) +
                                      ":6: invalid UTF-8 (sequence starting with byte 0x80)"}));
}

TEST(RecordsBadInput, ByteOrderMark) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  const std::string bom = "\xEF\xBB\xBF";
  // At the start of the file: accepted and dropped; columns still count the BOM's bytes.
  const std::string path = scratch_file("bom", "a.jsonl",
                                        bom +
                                            R"({"text": 7})"
                                            "\n" +
                                            text_line(f[0]) + "\n");
  EXPECT_EQ(issue_strings(read_records(path, jsonl()).issues),
            (std::vector<std::string>{path + ":1:13: \"text\" must be a string, not number"}));
  const std::string ok = scratch_file("bom", "b.jsonl", bom + text_line(f[0]) + "\n");
  const Read r = read_records(ok, jsonl());
  ASSERT_EQ(r.records.size(), 1u);
  EXPECT_EQ(r.records[0].text, f[0]);
  // The same in a text file: the document does not start with U+FEFF.
  const std::string txt = scratch_file("bom", "c.txt", bom + f[1] + "\n");
  EXPECT_EQ(read_records(txt, RecordOptions{}).records.at(0).text, f[1]);
  // Rejected when accept_bom is off.
  RecordOptions strict = jsonl();
  strict.accept_bom = false;
  EXPECT_EQ(issue_strings(read_records(ok, strict).issues),
            (std::vector<std::string>{ok + ":1:1: UTF-8 byte order mark (rejected: accept_bom is off)"}));
  RecordOptions strict_text;
  strict_text.accept_bom = false;
  EXPECT_EQ(issue_strings(read_records(txt, strict_text).issues),
            (std::vector<std::string>{txt + ":1:1: UTF-8 byte order mark (rejected: accept_bom is off)"}));
  // Anywhere else at the start of a JSONL line: concatenated files; an error at column 1.
  const std::string mid = scratch_file("bom", "d.jsonl", text_line(f[0]) + "\n" + bom + text_line(f[1]) + "\n");
  EXPECT_EQ(issue_strings(read_records(mid, jsonl()).issues),
            (std::vector<std::string>{mid + ":2:1: UTF-8 byte order mark (accepted only at the start of a file)"}));
}

TEST(RecordsBadInput, CrlfLineEndingsAreAcceptedAndStripped) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(20, "love");
  auto crlf = [](std::string s) {
    std::string out;
    for (char c : s) out += c == '\n' ? std::string("\r\n") : std::string(1, c);
    return out;
  };
  std::string sep, js;
  for (const auto& x : f) {
    sep += x + "\n%\n";
    js += text_line(x) + "\n";
  }
  RecordOptions ro;
  ro.split = TextSplit::separator;
  const Read lf = read_records(scratch_file("crlf", "lf.txt", sep), ro);
  const Read cr = read_records(scratch_file("crlf", "crlf.txt", crlf(sep)), ro);
  ASSERT_EQ(cr.records.size(), f.size());
  ASSERT_TRUE(cr.issues.empty());
  for (size_t i = 0; i < f.size(); ++i) {
    EXPECT_EQ(cr.records[i].text, f[i]);  // no CR left inside multi-line documents
    EXPECT_EQ(cr.records[i].origin.line, lf.records[i].origin.line);
  }
  const Read cj = read_records(scratch_file("crlf", "crlf.jsonl", crlf(js)), jsonl());
  ASSERT_EQ(cj.records.size(), f.size());
  for (size_t i = 0; i < f.size(); ++i) EXPECT_EQ(cj.records[i].text, f[i]);
  // A CR that is data (escaped in JSON, or alone mid-line in text) is kept.
  const Read data = read_records(scratch_file("crlf", "cr_data.jsonl",
                                              R"({"text": "a\r\nb"})"
                                              "\r\n"),
                                 jsonl());
  EXPECT_EQ(data.records.at(0).text, "a\r\nb");
  const Read mid = read_records(scratch_file("crlf", "cr_mid.txt", "a\rb\r\n"), RecordOptions{});
  EXPECT_EQ(mid.records.at(0).text, "a\rb");
}

TEST(RecordsBadInput, NulBytes) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  std::string raw = text_line(f[0]);
  raw.insert(12, 1, '\0');
  const std::string path = scratch_file("nul", "a.jsonl",
                                        raw + "\n" +
                                            R"({"text": "nul \u0000 here"})"
                                            "\n" +
                                            text_line(f[1]) + "\n");
  const Read r = read_records(path, jsonl());
  EXPECT_EQ(r.records.size(), 1u);
  EXPECT_EQ(
      issue_strings(r.issues),
      (std::vector<std::string>{path + ":1:13: NUL byte", path + ":2:15: invalid JSON: \\u0000 (NUL) is not allowed"}));
  const std::string text = scratch_file("nul", "b.txt", f[0] + std::string("\nab\0cd\n", 7));
  EXPECT_EQ(issue_strings(read_records(text, RecordOptions{}).issues),
            (std::vector<std::string>{text + ":" + std::to_string(std::count(f[0].begin(), f[0].end(), '\n') + 2) +
                                      ":3: NUL byte"}));
}

TEST(RecordsBadInput, EmptyDocuments) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  const std::string path = scratch_file("empty", "a.jsonl",
                                        text_line(f[0]) + "\n\n" +
                                            R"({"text": ""})"
                                            "\n" +
                                            R"({"text": " \n\t "})"
                                            "\n   \n" +
                                            text_line(f[1]) + "\n");
  EXPECT_EQ(issue_strings(read_records(path, jsonl()).issues),
            (std::vector<std::string>{path + ":2: empty line (a JSONL file holds one JSON object per line)",
                                      path + ":3:10: \"text\" is empty", path + ":4:10: \"text\" is empty",
                                      path + ":5: empty line (a JSONL file holds one JSON object per line)"}));
  const std::string chat =
      scratch_file("empty", "c.jsonl",
                   R"({"messages": []})"
                   "\n"
                   R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})"
                   "\n");
  EXPECT_EQ(
      issue_strings(read_records(chat, jsonl(RecordFormat::chat)).issues),
      (std::vector<std::string>{chat + ":1:14: \"messages\" is empty", chat + ":2:83: messages[1].content is empty"}));

  // Text: separators with nothing between them, an empty file, a whitespace-only file, a JSONL file
  // with no line.
  RecordOptions sep;
  sep.split = TextSplit::separator;
  const std::string doubled = scratch_file("empty", "d.txt", "%\n" + f[0] + "\n%\n  \n%\n" + f[1] + "\n%\n\n");
  const Read d = read_records(doubled, sep);
  EXPECT_EQ(d.records.size(), 2u);
  const int64_t n0 = std::count(f[0].begin(), f[0].end(), '\n');
  EXPECT_EQ(issue_strings(d.issues),
            (std::vector<std::string>{doubled + ":1: empty document (nothing but whitespace before this separator)",
                                      doubled + ":" + std::to_string(n0 + 5) +
                                          ": empty document (nothing but whitespace before this separator)"}));
  const std::string empty = scratch_file("empty", "e.txt", "");
  EXPECT_EQ(issue_strings(read_records(empty, RecordOptions{}).issues),
            (std::vector<std::string>{empty + ": empty document (the file is empty)"}));
  const std::string blank = scratch_file("empty", "f.txt", " \n\t\n");
  EXPECT_EQ(issue_strings(read_records(blank, RecordOptions{}).issues),
            (std::vector<std::string>{blank + ": empty document (the file holds only whitespace)"}));
  EXPECT_EQ(issue_strings(read_records(blank, sep).issues),
            (std::vector<std::string>{blank + ": the file holds no document"}));
  const std::string nothing = scratch_file("empty", "g.jsonl", "");
  EXPECT_EQ(issue_strings(read_records(nothing, jsonl()).issues),
            (std::vector<std::string>{nothing + ": the file holds no record"}));
}

TEST(RecordsBadInput, VeryLongLines) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(2);
  RecordOptions ro = jsonl();
  ro.max_line_bytes = 100;
  const std::string exact = R"({"text": ")" + std::string(88, 'a') + "\"}";  // 100 bytes
  ASSERT_EQ(exact.size(), 100u);
  const std::string over = R"({"text": ")" + std::string(89, 'a') + "\"}";
  const std::string path =
      scratch_file("long", "a.jsonl", exact + "\r\n" + over + "\n" + exact + "\n" + std::string(5000, 'x') + "\n");
  const Read r = read_records(path, ro);
  EXPECT_EQ(r.records.size(), 2u);  // a CR of a CRLF does not count
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{path + ":2:101: line longer than max_line_bytes (100 bytes)",
                                      path + ":4:101: line longer than max_line_bytes (100 bytes)"}));
  // In text, the document holding the line is bad; the next one is read.
  RecordOptions text;
  text.split = TextSplit::separator;
  text.max_line_bytes = 100;
  const std::string t =
      scratch_file("long", "b.txt", f[0] + "\n%\nshort\n" + std::string(300, 'y') + "\nshort\n%\n" + f[1] + "\n");
  const Read tr = read_records(t, text);
  ASSERT_EQ(tr.records.size(), 2u);
  EXPECT_EQ(tr.records[1].text, f[1]);
  const int64_t n0 = std::count(f[0].begin(), f[0].end(), '\n');
  EXPECT_EQ(issue_strings(tr.issues), (std::vector<std::string>{t + ":" + std::to_string(n0 + 4) +
                                                                ":101: line longer than max_line_bytes (100 bytes)"}));
  // max_record_bytes bounds a whole text document.
  RecordOptions doc;
  doc.max_record_bytes = 50;
  const std::string d = scratch_file("long", "c.txt", std::string(30, 'a') + "\n" + std::string(30, 'b') + "\n");
  EXPECT_EQ(issue_strings(read_records(d, doc).issues),
            (std::vector<std::string>{d + ":2: document longer than max_record_bytes (50)"}));
}

TEST(RecordsBadInput, DocumentsOverMaxTokens) {
  FT_REQUIRE_FORTUNES();
  const auto f = ft::test::some_fortunes("fortunes", 40, 400);
  std::string data;
  for (size_t i = 0; i + 1 < f.size(); i += 2)
    data += nlohmann::json({{"prompt", f[i]}, {"completion", f[i + 1]}}).dump() + "\n";
  const std::string path = scratch_file("max_tokens", "a.jsonl", data);
  RecordOptions ro = jsonl(RecordFormat::instruction);
  ByteEncoder enc;
  // Byte tokens: BOS + " " + prompt + completion + EOS.
  auto length = [&](size_t i) { return static_cast<int64_t>(3 + f[2 * i].size() + f[2 * i + 1].size()); };
  int64_t limit = 0;
  for (size_t i = 0; i < f.size() / 2; ++i) limit = std::max(limit, length(i));
  limit -= 1;  // the longest records are over by one
  int64_t longest = 0;
  std::string first_longest;
  for (size_t i = 0; i < f.size() / 2; ++i) {
    if (length(i) <= limit) continue;
    if (longest++ == 0)
      first_longest = path + ":" + std::to_string(i + 1) + ": document has " + std::to_string(limit + 1) +
                      " tokens, more than max_tokens (" + std::to_string(limit) + ")";
  }
  ASSERT_GE(longest, 1);
  TokenizeOptions to;
  to.max_tokens = limit;

  ErrorPolicy skip{ErrorPolicy::OnError::skip, 1.0};
  ReadReport report;
  auto examples = read_examples({path}, ro, to, skip, enc, &report);
  EXPECT_EQ(report.skipped, longest);
  ASSERT_EQ(static_cast<int64_t>(report.skipped_records.size()), longest);
  EXPECT_EQ(report.skipped_records[0].to_string(), first_longest);
  EXPECT_EQ(fail_message(path, ro, to), "[records] " + first_longest);

  // Truncation keeps the first max_tokens tokens and lists the record.
  to.too_long = TokenizeOptions::TooLong::truncate;
  examples = read_examples({path}, ro, to, ErrorPolicy{}, enc, &report);
  EXPECT_EQ(examples.size(), f.size() / 2);
  EXPECT_EQ(report.truncated, longest);
  EXPECT_EQ(report.truncated_records.at(0).reason,
            "truncated from " + std::to_string(limit + 1) + " to " + std::to_string(limit) + " tokens");
  for (const auto& ex : examples) EXPECT_LE(static_cast<int64_t>(ex.tokens.size()), limit);

  // Truncated down into the prompt: no label left, so the record is bad.
  to.max_tokens = 5;
  EXPECT_NE(fail_message(path, ro, to).find(": no label left after truncating"), std::string::npos);
}

TEST(RecordsBadInput, MissingFilesAndDirectoriesAlwaysThrow) {
  const std::string dir = ft::test::scratch_dir("records_err_missing");
  std::filesystem::create_directories(dir + "/empty");
  ft::test::write_file(dir + "/only_txt/a.txt", "text");
  ErrorPolicy skip{ErrorPolicy::OnError::skip, 1.0};
  ByteEncoder enc;
  auto message = [&](const std::vector<std::string>& sources, const RecordOptions& ro) -> std::string {
    try {
      read_examples(sources, ro, TokenizeOptions{}, skip, enc);
    } catch (const ft::Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(message({dir + "/nope.jsonl"}, jsonl()), "[records] " + dir + "/nope.jsonl: no such file or directory");
  EXPECT_EQ(message({dir + "/nope/"}, RecordOptions{}), "[records] " + dir + "/nope/: no such file or directory");
  EXPECT_EQ(message({dir + "/empty"}, RecordOptions{}), "[records] " + dir + "/empty: the directory holds no file");
  RecordOptions ext = jsonl();
  ext.extensions = {".jsonl"};
  EXPECT_EQ(message({dir + "/only_txt"}, ext), "[records] " + dir + "/only_txt: the directory holds no file (.jsonl)");
}

TEST(RecordsBadInput, ChatMessageOrder) {
  const std::string path = scratch_file(
      "order", "c.jsonl",
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "assistant", "content": "a"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})"
      "\n");
  const Read r = read_records(path, jsonl(RecordFormat::chat));
  EXPECT_EQ(r.records.size(), 1u);
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{
                path + ":1:58: messages[1]: a system message may only come first",
                path + ":2:24: messages[0].role is \"assistant\" but \"user\" must come first",
                path + ":3:58: messages[1].role is \"user\" but \"assistant\" must come after \"user\"",
                path + ":4:51: the conversation must end with an assistant message, not user",
                path + ":5:58: messages[1].role must be \"system\", \"developer\", \"user\", \"assistant\" or \"tool\", not \"bot\""}));
}

TEST(RecordsBadInput, ToolUse) {
  // Tool use: assistant tool_calls, then tool messages, then the assistant; "tools" beside the messages.
  const std::string path = scratch_file(
      "tools", "c.jsonl",
      R"({"messages": [{"role": "user", "content": "a", "tool_calls": [{"x": 1}]}, {"role": "assistant", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"x": 1}]}, {"role": "user", "content": "c"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": []}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_call_id": "1"}]})"
      "\n"
      R"({"tools": {"a": 1}, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5, "tool_calls": [{}]}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"x": 1}]}, )"
      R"({"role": "tool", "tool_call_id": "c1", "content": "42"}, {"role": "assistant", "content": "b"}], "tools": [{"n": "f"}]})"
      "\n");
  const Read r = read_records(path, jsonl(RecordFormat::chat));
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{
                path + ":1:62: messages[0].tool_calls: only assistant messages call tools",
                path + ":2:97: messages[2].role is \"tool\" but \"user\" must come after \"assistant\"",
                path + ":3:107: messages[2].role is \"user\" but \"tool\" must come after \"assistant\" with tool_calls",
                path + ":4:100: messages[1].tool_calls must be a non-empty array of objects",
                path + ":5:103: messages[1].tool_call_id: only tool messages have one",
                path + ":6:11: \"tools\" must be an array of objects",
                path + ":7:49: messages[1]: missing field \"content\"",
                path + ":8:82: messages[1].content must be a string or null, not number"}));
  ASSERT_EQ(r.records.size(), 1u);
  const auto& m = r.records[0].messages;
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[1].content, "");
  EXPECT_EQ(m[1].fields_json, R"({"tool_calls":[{"x":1}],"content":null})");
  EXPECT_EQ(m[2].role, Role::tool);
  EXPECT_EQ(m[2].fields_json, R"({"tool_call_id":"c1"})");
  EXPECT_EQ(r.records[0].tools_json, R"([{"n":"f"}])");
  EXPECT_TRUE(ft::data::has_tool_use(m));
}

TEST(RecordsBadInput, ReasoningContent) {
  // An assistant's reasoning_content is a string kept for the template; elsewhere, or of another
  // type, the record is bad.
  const std::string path = scratch_file(
      "reasoning", "c.jsonl",
      R"({"messages": [{"role": "user", "content": "a", "reasoning_content": "r"}, {"role": "assistant", "content": "b"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": 1}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "say \"tool_calls\""}]})"
      "\n");
  const Read r = read_records(path, jsonl(RecordFormat::chat));
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{
                path + ":1:69: messages[0].reasoning_content: only assistant messages have one",
                path + ":2:108: messages[1].reasoning_content must be a string, not number"}));
  ASSERT_EQ(r.records.size(), 1u);
  const auto& m = r.records[0].messages;
  EXPECT_EQ(m[1].fields_json, R"({"reasoning_content":"say \"tool_calls\""})");
  // A quoted "tool_calls" inside the reasoning is text, not a tool call.
  EXPECT_FALSE(ft::data::has_tool_use(m));
}

TEST(RecordsBadInput, ContentParts) {
  // OpenAI-style content parts: text parts, joined for `content`, the list kept for the template.
  const std::string u = R"({"messages": [{"role": "user", "content": )";
  const std::string a = R"(}, {"role": "assistant", "content": "b"}]})"
                        "\n";
  const std::string path = scratch_file(
      "parts", "c.jsonl",
      u + "[]" + a + u + R"(["x"])" + a + u + R"([{"type": "image_url", "image_url": {"url": "u"}}])" + a + u +
          R"([{"type": "text"}])" + a + u + R"([{"type": "text", "text": 1}])" + a + u +
          R"([{"type": "text", "text": "x", "cache": 1}])" + a + u + R"([{"type": "text", "text": " "}])" + a + u +
          R"([{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}])" + a);
  const Read r = read_records(path, jsonl(RecordFormat::chat));
  EXPECT_EQ(issue_strings(r.issues),
            (std::vector<std::string>{
                path + ":1:43: messages[0].content is an empty list",
                path + ":2:44: messages[0].content[0] must be an object, not string",
                path + ":3:53: messages[0].content[0].type is \"image_url\": only \"text\" parts (libft trains text-only "
                       "models)",
                path + ":4:44: messages[0].content[0]: missing field \"text\"",
                path + ":5:69: messages[0].content[0].text must be a string, not number",
                path + ":6:74: messages[0].content[0]: unknown field \"cache\" (expected: type, text)",
                path + ":7:43: messages[0].content is empty"}));
  ASSERT_EQ(r.records.size(), 1u);
  const auto& m = r.records[0].messages;
  EXPECT_EQ(m[0].content, "Hello, world");
  EXPECT_EQ(m[0].fields_json, R"({"content":[{"type":"text","text":"Hello, "},{"type":"text","text":"world"}]})");
}

TEST(RecordsBadInput, SkipPolicyCountsListsAndEnforcesTheFraction) {
  FT_REQUIRE_FORTUNES();
  const auto f = good(20, "drugs");
  std::string data;
  for (size_t i = 0; i < f.size(); ++i) {
    data += text_line(f[i]) + "\n";
    if (i % 5 == 4)
      data += R"({"text": 1})"
              "\n";  // 4 bad of 24
  }
  const std::string path = scratch_file("policy", "a.jsonl", data);
  ByteEncoder enc;
  ReadReport report;
  const auto examples = read_examples({path}, jsonl(), {}, ErrorPolicy{ErrorPolicy::OnError::skip, 0.2}, enc, &report);
  EXPECT_EQ(examples.size(), 20u);
  EXPECT_EQ(report.records, 24);
  EXPECT_EQ(report.skipped, 4);
  ASSERT_EQ(report.skipped_records.size(), 4u);
  EXPECT_EQ(report.skipped_records[0].to_string(), path + ":6:10: \"text\" must be a string, not number");
  EXPECT_EQ(report.skipped_records[3].origin.line, 24);
  EXPECT_NE(report.summary().find("24 records from 1 file: 20 examples"), std::string::npos) << report.summary();
  EXPECT_NE(report.summary().find("skipped: " + path + ":12:10:"), std::string::npos) << report.summary();

  // The decision depends only on the data: a second reader skips the same records.
  ReadReport again;
  read_examples({path}, jsonl(), {}, ErrorPolicy{ErrorPolicy::OnError::skip, 0.2}, enc, &again);
  EXPECT_EQ(issue_strings(again.skipped_records), issue_strings(report.skipped_records));

  // 4/24 = 16.7% > 10%: the end of the read throws, listing the first few.
  try {
    read_examples({path}, jsonl(), {}, ErrorPolicy{ErrorPolicy::OnError::skip, 0.1}, enc);
    FAIL() << "expected an error";
  } catch (const ft::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("4 of 24 records are bad (16.7%), more than max_bad_fraction 0.1"), std::string::npos) << what;
    EXPECT_NE(what.find(path + ":6:10:"), std::string::npos) << what;
    EXPECT_NE(what.find(path + ":24:10:"), std::string::npos) << what;
  }
  // The listing is capped, the count is not.
  ReadReport capped;
  ErrorPolicy cap{ErrorPolicy::OnError::skip, 1.0};
  cap.max_listed = 2;
  read_examples({path}, jsonl(), {}, cap, enc, &capped);
  EXPECT_EQ(capped.skipped, 4);
  EXPECT_EQ(capped.skipped_records.size(), 2u);
  EXPECT_NE(capped.summary().find("... and 2 more skipped"), std::string::npos) << capped.summary();
  // OnError::fail stops at the first.
  EXPECT_EQ(fail_message(path, jsonl()), "[records] " + path + ":6:10: \"text\" must be a string, not number");
}

TEST(RecordsBadInput, EveryFortuneFileInSkipModeReportsExactlyItsEmptyRecords) {
  FT_REQUIRE_FORTUNES();
  // The real files hold a few empty fortunes ("%" first in paradoxum and tao, "%\n%" in tao and
  // knghtbrd). An independent scan finds them; the reader must list exactly those, in file order.
  const auto files = ft::test::fortune_files();
  std::vector<std::string> expected;
  size_t fortunes = 0;
  for (const auto& file : files) {
    std::ifstream in(file);
    std::string line;
    int64_t n = 0;
    bool content = false;
    while (std::getline(in, line)) {
      ++n;
      if (line == "%") {
        if (!content)
          expected.push_back(file + ":" + std::to_string(n) +
                             ": empty document (nothing but whitespace before this separator)");
        else
          ++fortunes;
        content = false;
      } else if (line.find_first_not_of(" \t") != std::string::npos) {
        content = true;
      }
    }
    fortunes += content;
  }
  ASSERT_GE(expected.size(), 3u);
  RecordOptions ro;
  ro.split = TextSplit::separator;
  ByteEncoder enc;
  ReadReport report;
  const auto examples = read_examples(files, ro, {}, ErrorPolicy{ErrorPolicy::OnError::skip, 0.01}, enc, &report);
  EXPECT_EQ(examples.size(), fortunes);
  EXPECT_EQ(issue_strings(report.skipped_records), expected);
  EXPECT_EQ(report.files, static_cast<int64_t>(files.size()));
  // And under OnError::fail the first one stops the read.
  EXPECT_THROW(read_examples(files, ro, {}, ErrorPolicy{}, enc), ft::Error);
}
