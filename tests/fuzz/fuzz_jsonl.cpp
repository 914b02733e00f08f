// libFuzzer target for the JSONL record readers (build with -DLIBFT_FUZZ=ON and clang; see
// records_fuzz.cmake).
//
// The input is a whole JSONL file. For each format it is read through RecordReader from memory, which
// must end without throwing: every line is a record or a bad record, never a crash or an exception.
// Records must satisfy the schema's promises (valid UTF-8, no NUL, no blank field, chat roles in
// order), issues must point inside the input, and rendering a record must give labels that are
// exactly the completion / assistant turns. Each line is also parsed by nlohmann-json: wherever
// nlohmann rejects a line, libft's parser must too, and wherever libft accepts one, both must agree
// on the value.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "ft/data/chat_template.h"
#include "ft/data/jinja.h"
#include "ft/data/records.h"
#include "ft/util/error.h"
#include "jsonl.h"

using namespace ft::data;

namespace {

[[noreturn]] void bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_jsonl: %s\n", what.c_str());
  std::abort();
}

constexpr int64_t kMaxLineBytes = 4096;
constexpr int kMaxDepth = 16;

// One token per byte; BOS 1, EOS 2, <|im_end|> 300 when `pieces`.
class Bytes final : public TokenEncoder {
 public:
  explicit Bytes(bool pieces) : pieces_(pieces) {}
  std::vector<int32_t> encode_start(std::string_view t) const override {
    return encode_continuation(" " + std::string(t));
  }
  std::vector<int32_t> encode_continuation(std::string_view t) const override {
    std::vector<int32_t> ids;
    for (unsigned char c : t) ids.push_back(c + 3);
    return ids;
  }
  int32_t piece_id(std::string_view p) const override { return pieces_ && p == "<|im_end|>" ? 300 : -1; }
  SpecialTokens special() const override { return {1, 2, -1, -1, true, false}; }
  // A template that writes each message's content and tool calls between role tags.
  std::pair<std::string, std::string> chat_template() const override {
    return {"{% for m in messages %}<{{ m.role }}>{{ m.content if m.content is not none }}"
            "{% for c in m.tool_calls | default([]) %}[{{ c | tojson }}]{% endfor %}</{{ m.role }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}",
            "fuzz.jinja"};
  }
  std::string render(const std::vector<int32_t>& ids) const {
    std::string s;
    for (int32_t id : ids)
      s += id == 2     ? std::string("</s>")
           : id == 300 ? std::string("<|im_end|>")
                       : std::string(1, static_cast<char>(id - 3));
    return s;
  }

 private:
  bool pieces_;
};

std::string labels_of(const Example& ex, const Bytes& enc) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < ex.tokens.size(); ++i) {
    if (ex.trainable[i]) ids.push_back(ex.tokens[i]);
  }
  return enc.render(ids);
}

void check_text(const std::string& s, const char* what) {
  if (jsonl::is_blank(s)) bug(std::string(what) + " accepted blank");
  if (jsonl::check_line_bytes(s)) bug(std::string(what) + " accepted with a NUL or invalid UTF-8");
}

// The physical lines as the reader sees them: split on LF, one CR before the LF dropped.
std::vector<std::string_view> lines_of(std::string_view in) {
  std::vector<std::string_view> lines;
  size_t start = 0;
  while (start < in.size()) {
    size_t nl = in.find('\n', start);
    const bool terminated = nl != std::string_view::npos;
    if (!terminated) nl = in.size();
    std::string_view line = in.substr(start, nl - start);
    if (terminated && !line.empty() && line.back() == '\r') line.remove_suffix(1);
    lines.push_back(line);
    start = nl + 1;
  }
  return lines;
}

nlohmann::json to_nlohmann(const jsonl::Value& v) {
  using T = jsonl::Value::Type;
  switch (v.type) {
    case T::null:
      return nullptr;
    case T::boolean:
      return v.boolean;
    case T::number:
      return nlohmann::json::parse(v.text);
    case T::string:
      return v.text;
    case T::array: {
      nlohmann::json a = nlohmann::json::array();
      for (const auto& item : v.items) a.push_back(to_nlohmann(item));
      return a;
    }
    case T::object: {
      nlohmann::json o = nlohmann::json::object();
      for (const auto& m : v.members) o[m.key] = to_nlohmann(m.value);
      return o;
    }
  }
  return nullptr;
}

void differential(std::string_view line) {
  if (line.size() > static_cast<size_t>(kMaxLineBytes) || jsonl::check_line_bytes(line)) return;
  if (line.substr(0, 3) == "\xEF\xBB\xBF") return;  // nlohmann skips a BOM; libft rejects it on purpose
  jsonl::Value mine;
  jsonl::ParseError error;
  const bool ok = jsonl::parse(line, kMaxDepth, mine, error);
  if (!ok && error.offset > line.size()) bug("error offset past the end of the line");
  nlohmann::json theirs;
  try {
    theirs = nlohmann::json::parse(line.begin(), line.end());
  } catch (const nlohmann::json::parse_error&) {
    if (ok) bug("libft accepted a line nlohmann rejects: " + std::string(line));
    return;
  } catch (const nlohmann::json::exception&) {
    return;  // number out of range: a limit of nlohmann's, not a syntax question
  }
  if (!ok) {
    // The only rejections stricter than nlohmann's, all on purpose.
    const std::string& r = error.reason;
    if (r.find("duplicate key") == std::string::npos && r.find("nesting deeper") == std::string::npos &&
        r.find("\\u0000") == std::string::npos) {
      bug("libft rejected a line nlohmann accepts (" + r + "): " + std::string(line));
    }
    return;
  }
  nlohmann::json converted;
  try {
    converted = to_nlohmann(mine);
  } catch (const nlohmann::json::exception&) {
    return;  // a number nlohmann cannot hold
  }
  if (converted != theirs) bug("libft and nlohmann parse a line differently: " + std::string(line));
}

void read_all(std::string_view input, RecordFormat format, bool allow_unknown,
              const std::vector<std::string_view>& lines) {
  RecordOptions ro;
  ro.format = format;
  ro.allow_unknown_fields = allow_unknown;
  ro.max_line_bytes = kMaxLineBytes;
  ro.max_json_depth = kMaxDepth;
  ro.accept_bom = (input.size() % 3) != 0;
  std::istringstream in{std::string(input)};
  const Bytes enc(input.size() % 2 == 0);
  int64_t outcomes = 0;
  try {
    RecordReader reader(in, "fuzz", ro);
    Record rec;
    RecordIssue issue;
    for (RecordReader::Next r; (r = reader.next(rec, issue)) != RecordReader::Next::end;) {
      ++outcomes;
      if (r == RecordReader::Next::bad) {
        if (issue.reason.empty()) bug("an issue without a reason");
        if (issue.origin.line < 0 || issue.origin.line > static_cast<int64_t>(lines.size()))
          bug("issue line out of range");
        if (issue.origin.line == 0 && !lines.empty()) bug("a whole-file issue for a file with lines");
        if (issue.origin.line > 0) {
          const auto len = static_cast<int64_t>(lines[static_cast<size_t>(issue.origin.line - 1)].size());
          if (issue.column < 0 || issue.column > len + 1) bug("issue column out of range: " + issue.to_string());
        }
        continue;
      }
      if (rec.origin.line < 1 || rec.origin.line > static_cast<int64_t>(lines.size())) bug("record line out of range");
      switch (format) {
        case RecordFormat::jsonl_text:
          check_text(rec.text, "text");
          break;
        case RecordFormat::instruction: {
          check_text(rec.prompt, "prompt");
          check_text(rec.completion, "completion");
          const Example ex = tokenize_segments(render_instruction(rec.prompt, rec.completion, true), enc);
          if (labels_of(ex, enc) != rec.completion + "</s>") bug("instruction labels are not the completion");
          break;
        }
        case RecordFormat::chat: {
          check_chat_order(rec.messages);  // throws ft::Error (a bug here) when out of order
          // nlohmann (behind jinja::Value::parse_json) holds fewer numbers than JSON allows; records with
          // others cannot reach the model's template and are bad records there.
          bool jinja_json = rec.tools_json.empty() || nlohmann::json::accept(rec.tools_json);
          for (const Message& m : rec.messages) {
            const bool calls = m.role == Role::assistant && !m.fields_json.empty();
            if (!calls) check_text(m.content, "content");  // beside tool calls, content may be empty
            jinja_json = jinja_json && (m.fields_json.empty() || nlohmann::json::accept(m.fields_json));
          }
          if (jinja_json) {
            // The labels of the model's template: each assistant message's content, tool calls, end tag.
            static const ModelChatTemplate model_template(enc);
            static const jinja::Template calls_template(
                "{% for c in fields.tool_calls | default([]) %}[{{ c | tojson }}]{% endfor %}", "calls");
            std::string model_labels;
            for (const Message& m : rec.messages) {
              if (m.role != Role::assistant) continue;
              const jinja::Value fields = m.fields_json.empty() ? jinja::Value(jinja::Dict{})
                                                                : jinja::Value::parse_json(m.fields_json, "fields");
              model_labels += m.content + calls_template.render({{"fields", fields}}) + "</assistant>";
            }
            if (labels_of(tokenize_segments(model_template.render(rec.messages, rec.tools_json), enc), enc) !=
                model_labels) {
              bug("the model template's labels are not the assistant turns");
            }
          }
          if (has_tool_use(rec.messages) || !rec.tools_json.empty()) {
            if (has_tool_use(rec.messages)) {
              bool refused = false;
              try {
                render_chat(ChatTemplate::chatml, rec.messages, true);
              } catch (const ft::Error&) {
                refused = true;
              }
              if (!refused) bug("chatml rendered tool use");
            }
            break;
          }
          std::string llama2, chatml;
          for (const Message& m : rec.messages) {
            if (m.role != Role::assistant) continue;
            llama2 += " " + m.content + "</s>";
            chatml += m.content + "<|im_end|>";
          }
          if (labels_of(tokenize_segments(render_chat(ChatTemplate::llama2, rec.messages, true), enc), enc) != llama2)
            bug("llama2 labels are not the assistant turns");
          if (labels_of(tokenize_segments(render_chat(ChatTemplate::chatml, rec.messages, true), enc), enc) != chatml)
            bug("chatml labels are not the assistant turns");
          break;
        }
        case RecordFormat::text:
          break;
      }
    }
  } catch (const ft::Error& e) {
    bug(std::string("the reader threw on in-memory input: ") + e.what());
  }
  // JSONL: every line is exactly one outcome; an input without lines is one (bad) outcome.
  const int64_t expected = lines.empty() ? 1 : static_cast<int64_t>(lines.size());
  if (outcomes != expected) bug("lines and outcomes differ in number");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto lines = lines_of(input);
  const bool allow_unknown = size % 5 == 0;
  for (RecordFormat f : {RecordFormat::jsonl_text, RecordFormat::instruction, RecordFormat::chat}) {
    read_all(input, f, allow_unknown, lines);
  }
  for (std::string_view line : lines) differential(line);
  return 0;
}
