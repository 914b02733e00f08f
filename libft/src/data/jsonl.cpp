#include "jsonl.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>

#include "ft/data/jinja.h"
#include "ft/util/error.h"

namespace ft::data::jsonl {

const Value* Value::find(std::string_view key) const {
  for (const Member& m : members) {
    if (m.key == key) return &m.value;
  }
  return nullptr;
}

const char* type_name(Value::Type type) {
  switch (type) {
    case Value::Type::null:
      return "null";
    case Value::Type::boolean:
      return "boolean";
    case Value::Type::number:
      return "number";
    case Value::Type::string:
      return "string";
    case Value::Type::array:
      return "array";
    case Value::Type::object:
      return "object";
  }
  return "?";
}

bool is_blank(std::string_view s) {
  for (char c : s) {
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n') return false;
  }
  return true;
}

size_t find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // The allowed range of the second byte encodes the rules against overlong forms (E0, F0),
    // surrogates (ED) and code points above U+10FFFF (F4) (Unicode table 3-7).
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;  // a continuation byte without a lead, C0/C1, or F5..FF
    }
    if (i + len > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

namespace {

std::string hex_byte(unsigned char c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02X", c);
  return buf;
}

std::string describe_byte(unsigned char c) {
  if (c >= 0x21 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
  return "byte " + hex_byte(c);
}

// Thrown inside the parser only; parse() turns it into a ParseError.
struct Failure {
  size_t offset;
  std::string reason;
};

class Parser {
 public:
  Parser(std::string_view text, int max_depth) : s_(text), max_depth_(max_depth) {}

  void parse_document(Value& out) {
    skip_ws();
    parse_value(out, 0);
    skip_ws();
    if (pos_ < s_.size()) fail(pos_, "unexpected " + describe_byte(byte(pos_)) + " after the JSON value");
  }

 private:
  [[noreturn]] void fail(size_t offset, std::string reason) { throw Failure{offset, std::move(reason)}; }
  unsigned char byte(size_t i) const { return static_cast<unsigned char>(s_[i]); }

  void skip_ws() {
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect_more(const char* what) {
    if (pos_ >= s_.size()) fail(pos_, std::string("unexpected end of line, expected ") + what);
  }

  void parse_value(Value& v, int depth) {
    expect_more("a value");
    v.offset = pos_;
    const char c = s_[pos_];
    switch (c) {
      case '{':
        parse_object(v, depth + 1);
        return;
      case '[':
        parse_array(v, depth + 1);
        return;
      case '"':
        v.type = Value::Type::string;
        parse_string(v.text);
        return;
      case 't':
        parse_literal("true", v, Value::Type::boolean, true);
        return;
      case 'f':
        parse_literal("false", v, Value::Type::boolean, false);
        return;
      case 'n':
        parse_literal("null", v, Value::Type::null, false);
        return;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          parse_number(v);
          return;
        }
        if (static_cast<unsigned char>(c) == 0xEF && s_.substr(pos_, 3) == "\xEF\xBB\xBF")
          fail(pos_, "UTF-8 byte order mark where a value should start");
        fail(pos_, "unexpected " + describe_byte(byte(pos_)) + ", expected a value");
    }
  }

  void check_depth(int depth) {
    if (depth > max_depth_) fail(pos_, "nesting deeper than " + std::to_string(max_depth_) + " levels");
  }

  void parse_object(Value& v, int depth) {
    check_depth(depth);
    v.type = Value::Type::object;
    ++pos_;  // '{'
    skip_ws();
    expect_more("a key or '}'");
    if (s_[pos_] == '}') {
      ++pos_;
      return;
    }
    // A linear scan is cheapest for the few fields of a record; wide objects switch to a set so that a
    // crafted line with 100k keys is not quadratic. The set owns copies: members reallocate.
    std::set<std::string> wide_keys;
    while (true) {
      expect_more("a key");
      if (s_[pos_] != '"') fail(pos_, "unexpected " + describe_byte(byte(pos_)) + ", expected a key string");
      Member m;
      m.key_offset = pos_;
      parse_string(m.key);
      bool duplicate = false;
      if (v.members.size() < 16) {
        for (const Member& other : v.members) duplicate = duplicate || other.key == m.key;
      } else {
        if (wide_keys.empty()) {
          for (const Member& other : v.members) wide_keys.insert(other.key);
        }
        duplicate = !wide_keys.insert(m.key).second;
      }
      if (duplicate) fail(m.key_offset, "duplicate key \"" + m.key + "\"");
      skip_ws();
      expect_more("':'");
      if (s_[pos_] != ':') fail(pos_, "unexpected " + describe_byte(byte(pos_)) + ", expected ':'");
      ++pos_;
      skip_ws();
      parse_value(m.value, depth);
      v.members.push_back(std::move(m));
      skip_ws();
      expect_more("',' or '}'");
      if (s_[pos_] == ',') {
        ++pos_;
        skip_ws();
        continue;
      }
      if (s_[pos_] == '}') {
        ++pos_;
        return;
      }
      fail(pos_, "unexpected " + describe_byte(byte(pos_)) + ", expected ',' or '}'");
    }
  }

  void parse_array(Value& v, int depth) {
    check_depth(depth);
    v.type = Value::Type::array;
    ++pos_;  // '['
    skip_ws();
    expect_more("a value or ']'");
    if (s_[pos_] == ']') {
      ++pos_;
      return;
    }
    while (true) {
      v.items.emplace_back();
      parse_value(v.items.back(), depth);
      skip_ws();
      expect_more("',' or ']'");
      if (s_[pos_] == ',') {
        ++pos_;
        skip_ws();
        continue;
      }
      if (s_[pos_] == ']') {
        ++pos_;
        return;
      }
      fail(pos_, "unexpected " + describe_byte(byte(pos_)) + ", expected ',' or ']'");
    }
  }

  void parse_literal(std::string_view word, Value& v, Value::Type type, bool value) {
    if (s_.substr(pos_, word.size()) != word) {
      size_t i = 0;
      while (pos_ + i < s_.size() && i < word.size() && s_[pos_ + i] == word[i]) ++i;
      fail(pos_ + i, "invalid literal, expected '" + std::string(word) + "'");
    }
    v.type = type;
    v.boolean = value;
    pos_ += word.size();
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  void digits(const char* what) {
    if (pos_ >= s_.size() || !is_digit(s_[pos_])) {
      fail(pos_, std::string("invalid number: expected a digit ") + what);
    }
    while (pos_ < s_.size() && is_digit(s_[pos_])) ++pos_;
  }

  void parse_number(Value& v) {
    const size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
      if (pos_ < s_.size() && is_digit(s_[pos_])) fail(pos_, "invalid number: leading zero");
    } else {
      digits("after '-'");
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      digits("after '.'");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits("in the exponent");
    }
    v.type = Value::Type::number;
    v.text.assign(s_.substr(start, pos_ - start));
  }

  int hex4(size_t at) {
    if (at + 4 > s_.size()) fail(at, "truncated \\u escape");
    int value = 0;
    for (size_t i = at; i < at + 4; ++i) {
      const char c = s_[i];
      int d;
      if (c >= '0' && c <= '9')
        d = c - '0';
      else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        d = c - 'A' + 10;
      else
        fail(i, "invalid \\u escape: " + describe_byte(byte(i)) + " is not a hex digit");
      value = value * 16 + d;
    }
    return value;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  void parse_string(std::string& out) {
    const size_t open = pos_;
    ++pos_;  // '"'
    out.clear();
    while (true) {
      if (pos_ >= s_.size()) fail(open, "unterminated string");
      // Copy the run up to the next quote, backslash or control byte in one go.
      size_t run = pos_;
      while (run < s_.size()) {
        const unsigned char c = byte(run);
        if (c == '"' || c == '\\' || c < 0x20) break;
        ++run;
      }
      out.append(s_.substr(pos_, run - pos_));
      pos_ = run;
      if (pos_ >= s_.size()) fail(open, "unterminated string");
      const unsigned char c = byte(pos_);
      if (c == '"') {
        ++pos_;
        return;
      }
      if (c < 0x20) fail(pos_, "control character " + hex_byte(c) + " in a string (it must be escaped)");
      // A backslash.
      if (pos_ + 1 >= s_.size()) fail(pos_, "unterminated escape");
      const char e = s_[pos_ + 1];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          const size_t esc = pos_;
          uint32_t cp = static_cast<uint32_t>(hex4(pos_ + 2));
          pos_ += 6;
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail(esc, "lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (pos_ + 1 >= s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
              fail(esc, "high surrogate in a \\u escape without a low surrogate after it");
            const uint32_t low = static_cast<uint32_t>(hex4(pos_ + 2));
            if (low < 0xDC00 || low > 0xDFFF)
              fail(pos_, "high surrogate followed by a \\u escape that is not a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            pos_ += 6;
          }
          if (cp == 0) fail(esc, "\\u0000 (NUL) is not allowed");
          append_utf8(out, cp);
          continue;
        }
        default:
          fail(pos_, "invalid escape '\\" + std::string(1, e) + "'");
      }
      pos_ += 2;
    }
  }

  std::string_view s_;
  int max_depth_;
  size_t pos_ = 0;
};

}  // namespace

namespace {
void append_json(const Value& v, std::string& out) {
  switch (v.type) {
    case Value::Type::null:
      out += "null";
      return;
    case Value::Type::boolean:
      out += v.boolean ? "true" : "false";
      return;
    case Value::Type::number:
      out += v.text;
      return;
    case Value::Type::string:
      out += jinja::Value(v.text).to_json();  // json.dumps's escapes
      return;
    case Value::Type::array:
      out += '[';
      for (size_t i = 0; i < v.items.size(); ++i) {
        if (i) out += ',';
        append_json(v.items[i], out);
      }
      out += ']';
      return;
    case Value::Type::object:
      out += '{';
      for (size_t i = 0; i < v.members.size(); ++i) {
        if (i) out += ',';
        append_json(Value{Value::Type::string, 0, false, v.members[i].key, {}, {}}, out);
        out += ':';
        append_json(v.members[i].value, out);
      }
      out += '}';
      return;
  }
}
}  // namespace

std::string to_json(const Value& v) {
  std::string out;
  append_json(v, out);
  return out;
}

bool parse(std::string_view text, int max_depth, Value& out, ParseError& error) {
  out = Value{};
  try {
    Parser(text, max_depth).parse_document(out);
    return true;
  } catch (Failure& f) {
    error.offset = f.offset;
    error.reason = std::move(f.reason);
    out = Value{};
    return false;
  }
}

std::optional<LineProblem> check_line_bytes(std::string_view line) {
  if (const void* nul = std::memchr(line.data(), '\0', line.size())) {
    return LineProblem{static_cast<size_t>(static_cast<const char*>(nul) - line.data()), "NUL byte"};
  }
  if (size_t bad = find_invalid_utf8(line); bad != std::string_view::npos) {
    return LineProblem{
        bad, "invalid UTF-8 (sequence starting with byte " + hex_byte(static_cast<unsigned char>(line[bad])) + ")"};
  }
  return std::nullopt;
}

namespace {

// Schema checks. Each returns the problem for `v`, located at the offending value.
struct Schema {
  const RecordRules& rules;

  static LineProblem at(const Value& v, std::string reason) { return {v.offset, std::move(reason)}; }

  // Unknown keys first: a misspelt "promt" is better reported as itself than as a missing "prompt".
  // `optional` fields may be missing.
  std::optional<LineProblem> check_fields(const Value& obj, std::initializer_list<std::string_view> known,
                                          const std::string& where,
                                          std::initializer_list<std::string_view> optional = {}) const {
    if (!rules.allow_unknown_fields) {
      for (const Member& m : obj.members) {
        bool ok = false;
        for (std::string_view key : known) ok = ok || m.key == key;
        for (std::string_view key : optional) ok = ok || m.key == key;
        if (!ok) {
          std::string expected;
          for (std::string_view key : known) expected += (expected.empty() ? "" : ", ") + std::string(key);
          for (std::string_view key : optional) expected += (expected.empty() ? "" : ", ") + std::string(key);
          return LineProblem{m.key_offset, where + "unknown field \"" + m.key + "\" (expected: " + expected + ")"};
        }
      }
    }
    for (std::string_view key : known) {
      if (obj.find(key) == nullptr) return at(obj, where + "missing field \"" + std::string(key) + "\"");
    }
    return std::nullopt;
  }

  // A field that must be a non-blank string; `name` is how messages call it.
  std::optional<LineProblem> string_field(const Value& obj, std::string_view key, const std::string& name,
                                          std::string& out) const {
    const Value* v = obj.find(key);
    if (v->type != Value::Type::string) {
      return at(*v, name + " must be a string, not " + type_name(v->type));
    }
    if (is_blank(v->text)) return at(*v, name + " is empty");
    out = v->text;
    return std::nullopt;
  }
};

}  // namespace

std::optional<LineProblem> parse_jsonl_record(std::string_view line, const RecordRules& rules, Record& out) {
  if (is_blank(line)) return LineProblem{0, "empty line (a JSONL file holds one JSON object per line)", true};
  // Ahead of the JSON parser, which would call a BOM a bad value: a BOM here means concatenated files.
  if (line.substr(0, 3) == "\xEF\xBB\xBF") {
    return LineProblem{0, "UTF-8 byte order mark (accepted only at the start of a file)"};
  }
  if (auto p = check_line_bytes(line)) return p;

  Value root;
  ParseError error;
  if (!parse(line, rules.max_depth, root, error)) return LineProblem{error.offset, "invalid JSON: " + error.reason};
  if (root.type != Value::Type::object) {
    return LineProblem{root.offset, std::string("expected a JSON object, not ") + type_name(root.type)};
  }

  const Schema schema{rules};
  out.text.clear();
  out.prompt.clear();
  out.completion.clear();
  out.messages.clear();
  out.tools_json.clear();
  switch (rules.format) {
    case RecordFormat::text:
      FT_FAIL("[records] parse_jsonl_record: plain text is not JSONL");
    case RecordFormat::jsonl_text: {
      if (auto p = schema.check_fields(root, {"text"}, "")) return p;
      return schema.string_field(root, "text", "\"text\"", out.text);
    }
    case RecordFormat::instruction: {
      if (auto p = schema.check_fields(root, {"prompt", "completion"}, "")) return p;
      if (auto p = schema.string_field(root, "prompt", "\"prompt\"", out.prompt)) return p;
      return schema.string_field(root, "completion", "\"completion\"", out.completion);
    }
    case RecordFormat::chat: {
      if (auto p = schema.check_fields(root, {"messages"}, "", {"tools"})) return p;
      if (const Value* tools = root.find("tools")) {
        const bool objects = tools->type == Value::Type::array &&
                             std::all_of(tools->items.begin(), tools->items.end(),
                                         [](const Value& t) { return t.type == Value::Type::object; });
        if (!objects) return Schema::at(*tools, "\"tools\" must be an array of objects");
        out.tools_json = to_json(*tools);
      }
      const Value& messages = *root.find("messages");
      if (messages.type != Value::Type::array) {
        return Schema::at(messages, std::string("\"messages\" must be an array, not ") + type_name(messages.type));
      }
      if (messages.items.empty()) return Schema::at(messages, "\"messages\" is empty");
      for (size_t i = 0; i < messages.items.size(); ++i) {
        const Value& m = messages.items[i];
        const std::string name = "messages[" + std::to_string(i) + "]";
        if (m.type != Value::Type::object) {
          return Schema::at(m, name + " must be an object, not " + type_name(m.type));
        }
        if (auto p = schema.check_fields(m, {"role"}, name + ": ",
                                         {"content", "tool_calls", "tool_call_id", "name", "reasoning_content", "thinking"})) {
          return p;
        }
        const Value& role = *m.find("role");
        if (role.type != Value::Type::string) {
          return Schema::at(role, name + ".role must be a string, not " + type_name(role.type));
        }
        Message msg;
        if (role.text == "system")
          msg.role = Role::system;
        else if (role.text == "user")
          msg.role = Role::user;
        else if (role.text == "assistant")
          msg.role = Role::assistant;
        else if (role.text == "tool")
          msg.role = Role::tool;
        else if (role.text == "developer")
          msg.role = Role::developer;
        else
          return Schema::at(role, name + ".role must be \"system\", \"developer\", \"user\", \"assistant\" or \"tool\", not \"" +
                                      role.text + "\"");
        // Tool use: an assistant's tool_calls, a tool message's tool_call_id and name; an assistant's
        // reasoning: reasoning_content (which templates such as Qwen3's put in <think>...</think>) or
        // thinking (gpt-oss's template: its analysis channel). A message has at most one of the two.
        std::string fields;
        auto add_field = [&](const std::string& key, const Value& value) {
          fields += (fields.empty() ? "{" : ",") + to_json(Value{Value::Type::string, 0, false, key, {}, {}}) + ":" +
                    to_json(value);
        };
        const Value* calls = m.find("tool_calls");
        for (const Member& member : m.members) {
          if (member.key == "tool_calls") {
            if (msg.role != Role::assistant) return Schema::at(member.value, name + ".tool_calls: only assistant messages call tools");
            const bool objects = member.value.type == Value::Type::array && !member.value.items.empty() &&
                                 std::all_of(member.value.items.begin(), member.value.items.end(),
                                             [](const Value& c) { return c.type == Value::Type::object; });
            if (!objects) return Schema::at(member.value, name + ".tool_calls must be a non-empty array of objects");
            add_field(member.key, member.value);
          } else if (member.key == "reasoning_content" || member.key == "thinking") {
            if (msg.role != Role::assistant) {
              return Schema::at(member.value, name + "." + member.key + ": only assistant messages have one");
            }
            if (member.value.type != Value::Type::string) {
              return Schema::at(member.value, name + "." + member.key + " must be a string, not " +
                                                  type_name(member.value.type));
            }
            if (m.find("reasoning_content") && m.find("thinking")) {
              return Schema::at(member.value, name + " has both reasoning_content and thinking; give one");
            }
            add_field(member.key, member.value);
          } else if (member.key == "tool_call_id" || member.key == "name") {
            if (msg.role != Role::tool) {
              return Schema::at(member.value, name + "." + member.key + ": only tool messages have one");
            }
            if (member.value.type != Value::Type::string || is_blank(member.value.text)) {
              return Schema::at(member.value, name + "." + member.key + " must be a non-empty string");
            }
            add_field(member.key, member.value);
          }
        }
        // The order of roles is checked here rather than in the template, so that it is reported
        // at the message that breaks it.
        const size_t first = !out.messages.empty() && is_instructions(out.messages[0].role) ? 1 : 0;
        if (is_instructions(msg.role)) {
          if (i != 0) return Schema::at(role, name + ": a " + role.text + " message may only come first");
        } else {
          const Message* prev = i > first ? &out.messages.back() : nullptr;
          std::string expected;  // empty: in order
          if (!prev) {
            if (msg.role != Role::user) expected = "\"user\" must come first";
          } else if (prev->role == Role::user) {
            if (msg.role != Role::assistant) expected = "\"assistant\" must come after \"user\"";
          } else if (prev->role == Role::tool) {
            if (msg.role != Role::tool && msg.role != Role::assistant) {
              expected = "\"tool\" or \"assistant\" must come after \"tool\"";
            }
          } else if (calls_tools(*prev)) {
            if (msg.role != Role::tool) expected = "\"tool\" must come after \"assistant\" with tool_calls";
          } else if (msg.role != Role::user) {
            expected = "\"user\" must come after \"assistant\"";
          }
          if (!expected.empty()) return Schema::at(role, name + ".role is \"" + role.text + "\" but " + expected);
        }
        // Content: a string, non-blank, except beside tool calls (then empty, null or absent).
        const Value* content = m.find("content");
        if (calls) {
          if (content && content->type == Value::Type::string) {
            msg.content = content->text;
          } else if (content && content->type != Value::Type::null) {
            return Schema::at(*content, name + ".content must be a string or null, not " + type_name(content->type));
          } else {
            add_field("content", Value{});
          }
        } else if (content && content->type == Value::Type::array) {
          // OpenAI-style content parts: text parts only. The template gets the list; libft's own
          // templates, and anything else reading `content`, get the texts joined.
          if (content->items.empty()) return Schema::at(*content, name + ".content is an empty list");
          for (size_t k = 0; k < content->items.size(); ++k) {
            const Value& part = content->items[k];
            const std::string pname = name + ".content[" + std::to_string(k) + "]";
            if (part.type != Value::Type::object) {
              return Schema::at(part, pname + " must be an object, not " + type_name(part.type));
            }
            const Value* type = part.find("type");
            if (!type) return Schema::at(part, pname + ": missing field \"type\"");
            if (type->type != Value::Type::string || type->text != "text") {
              return Schema::at(*type, pname + ".type is " + to_json(*type) +
                                           ": only \"text\" parts (libft trains text-only models)");
            }
            if (auto p = schema.check_fields(part, {"type"}, pname + ": ", {"text"})) return p;
            const Value* text = part.find("text");
            if (!text) return Schema::at(part, pname + ": missing field \"text\"");
            if (text->type != Value::Type::string) {
              return Schema::at(*text, pname + ".text must be a string, not " + type_name(text->type));
            }
            msg.content += text->text;
          }
          if (is_blank(msg.content)) return Schema::at(*content, name + ".content is empty");
          add_field("content", *content);
        } else {
          if (!content) return Schema::at(m, name + ": missing field \"content\"");
          if (auto p = schema.string_field(m, "content", name + ".content", msg.content)) return p;
        }
        if (!fields.empty()) msg.fields_json = fields + "}";
        out.messages.push_back(std::move(msg));
      }
      if (out.messages.back().role != Role::assistant) {
        return Schema::at(messages.items.back(), "the conversation must end with an assistant message, not " +
                                                     std::string(role_name(out.messages.back().role)));
      }
      return std::nullopt;
    }
  }
  return std::nullopt;
}

}  // namespace ft::data::jsonl
