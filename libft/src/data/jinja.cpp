// The Jinja2 subset of Hugging Face chat templates: see ft/data/jinja.h for what it covers. The
// semantics follow Jinja 2 3.1 as transformers configures it (trim_blocks, lstrip_blocks, loopcontrols,
// keep_trailing_newline off, an immutable sandbox) and Python's str/repr/json.dumps for printing;
// tests/python/chat_template_reference.py records what jinja2 itself renders for the test cases.
#include "ft/data/jinja.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>

#include "ft/util/error.h"

namespace ft::data::jinja {

// ---------------------------------------------------------------------------------------------
// UTF-8 and Python string helpers

namespace {

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t n = static_cast<utf8proc_ssize_t>(s.size());
  while (n > 0) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t len = utf8proc_iterate(p, n, &cp);
    if (len <= 0) {  // invalid byte: keep it as U+FFFD, as Python's errors="replace" would
      cp = 0xFFFD;
      len = 1;
    }
    out.push_back(static_cast<char32_t>(cp));
    p += len;
    n -= len;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

// Python's str.isspace().
bool is_space(char32_t c) {
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85) return true;
  if (c < 0x80) return false;
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

bool is_cased_letter(char32_t c) {
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}

char32_t to_upper(char32_t c) { return static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c))); }
char32_t to_lower(char32_t c) { return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))); }

std::string map_chars(std::string_view s, char32_t (*f)(char32_t)) {
  std::u32string u = decode_utf8(s);
  for (auto& c : u) c = f(c);
  return encode_utf8(u);
}

std::string py_strip(std::string_view s, const std::optional<std::string>& chars, bool left, bool right) {
  const std::u32string u = decode_utf8(s);
  const std::u32string set = chars ? decode_utf8(*chars) : std::u32string();
  auto strip_it = [&](char32_t c) { return chars ? set.find(c) != std::u32string::npos : is_space(c); };
  size_t b = 0, e = u.size();
  if (left) while (b < e && strip_it(u[b])) ++b;
  if (right) while (e > b && strip_it(u[e - 1])) --e;
  return encode_utf8(std::u32string_view(u).substr(b, e - b));
}

// Python's str.title(): a cased letter after an uncased character starts a word.
std::string py_title(std::string_view s) {
  std::u32string u = decode_utf8(s);
  bool prev_cased = false;
  for (auto& c : u) {
    const bool cased = is_cased_letter(c);
    if (cased) c = prev_cased ? to_lower(c) : static_cast<char32_t>(utf8proc_totitle(static_cast<utf8proc_int32_t>(c)));
    prev_cased = cased;
  }
  return encode_utf8(u);
}

std::string py_capitalize(std::string_view s) {
  std::u32string u = decode_utf8(s);
  for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? to_upper(u[i]) : to_lower(u[i]);
  return encode_utf8(u);
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to, int64_t count = -1) {
  std::string out;
  if (from.empty()) {  // Python inserts `to` between characters and at both ends
    const std::u32string u = decode_utf8(s);
    int64_t done = 0;
    for (size_t i = 0; i <= u.size(); ++i) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      if (i < u.size()) append_utf8(out, u[i]);
    }
    return out;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos)).append(to);
    pos = hit + from.size();
    ++done;
  }
  out.append(s.substr(pos));
  return out;
}

// Python's repr of a float (the shortest round-trip digits, scientific outside 1e-4 <= |x| < 1e16).
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  std::string out;
  if (sci[0] == '-') {
    out = "-";
    sci.erase(0, 1);
  }
  const size_t e_pos = sci.find('e');
  std::string digits = sci.substr(0, e_pos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp10 = std::atoi(sci.c_str() + e_pos + 1);
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 >= 0) {
      std::string int_part = digits.substr(0, std::min<size_t>(digits.size(), static_cast<size_t>(exp10) + 1));
      int_part.append(static_cast<size_t>(exp10) + 1 - int_part.size(), '0');
      std::string frac = digits.size() > static_cast<size_t>(exp10) + 1 ? digits.substr(static_cast<size_t>(exp10) + 1) : "0";
      return out + int_part + "." + frac;
    }
    return out + "0." + std::string(static_cast<size_t>(-exp10 - 1), '0') + digits;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  out += exp10 < 0 ? "e-" : "e+";
  const std::string e = std::to_string(std::abs(exp10));
  return out + (e.size() < 2 ? "0" : "") + e;
}

std::string py_str_repr(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (char32_t c : decode_utf8(s)) {
    if (c == static_cast<char32_t>(q) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    } else {
      append_utf8(out, c);
    }
  }
  out += q;
  return out;
}

void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Value

Value Value::none() {
  Value v;
  v.type_ = Type::none;
  return v;
}
Value::Value(bool b) : type_(Type::boolean), b_(b) {}
Value::Value(int v) : type_(Type::integer), i_(v) {}
Value::Value(int64_t v) : type_(Type::integer), i_(v) {}
Value::Value(double v) : type_(Type::number), d_(v) {}
Value::Value(const char* s) : type_(Type::string), s_(std::make_shared<std::string>(s)) {}
Value::Value(std::string s) : type_(Type::string), s_(std::make_shared<std::string>(std::move(s))) {}
Value::Value(List items) : type_(Type::list), list_(std::make_shared<List>(std::move(items))) {}
Value::Value(Dict items) : type_(Type::dict), dict_(std::make_shared<Dict>(std::move(items))) {}

Value Value::function(std::string name, Function f) {
  Value v;
  v.type_ = Type::function;
  v.s_ = std::make_shared<std::string>(std::move(name));
  v.fn_ = std::make_shared<Function>(std::move(f));
  return v;
}

Value Value::tuple(List items) {
  Value v(std::move(items));
  v.namespace_flag_ = true;
  return v;
}

Value Value::namespace_(Dict items) {
  Value v(std::move(items));
  v.namespace_flag_ = true;
  return v;
}

Value Value::undefined(std::string name) {
  Value v;
  v.s_ = std::make_shared<std::string>(std::move(name));
  return v;
}

namespace {
Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      return Value(static_cast<int64_t>(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float:
      return Value(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      List items;
      for (const auto& e : j) items.push_back(from_json(e));
      return Value(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      Dict items;
      for (const auto& [k, e] : j.items()) items.emplace_back(k, from_json(e));
      return Value(std::move(items));
    }
    default:
      return Value();
  }
}
}  // namespace

Value Value::parse_json(std::string_view json, std::string_view what) {
  try {
    return from_json(nlohmann::ordered_json::parse(json));
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[chat template] ", what, ": not valid JSON (", e.what(), ")");
  }
}

bool Value::truthy() const {
  switch (type_) {
    case Type::undefined:
    case Type::none:
      return false;
    case Type::boolean:
      return b_;
    case Type::integer:
      return i_ != 0;
    case Type::number:
      return d_ != 0.0;
    case Type::string:
      return !s_->empty();
    case Type::list:
      return !list_->empty();
    case Type::dict:
      return namespace_flag_ || !dict_->empty();
    case Type::function:
      return true;
  }
  return false;
}

const std::string& Value::name() const {
  static const std::string empty;
  return s_ ? *s_ : empty;
}

const Value* Value::find(std::string_view key) const {
  if (type_ != Type::dict) return nullptr;
  for (const auto& [k, v] : *dict_) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string Value::str() const {
  switch (type_) {
    case Type::undefined:
      return "";
    case Type::string:
      return *s_;
    default:
      return repr();
  }
}

std::string Value::repr() const {
  switch (type_) {
    case Type::undefined:
      return "";
    case Type::none:
      return "None";
    case Type::boolean:
      return b_ ? "True" : "False";
    case Type::integer:
      return std::to_string(i_);
    case Type::number:
      return float_repr(d_);
    case Type::string:
      return py_str_repr(*s_);
    case Type::list: {
      std::string out = namespace_flag_ ? "(" : "[";
      for (size_t i = 0; i < list_->size(); ++i) out += (i ? ", " : "") + (*list_)[i].repr();
      if (namespace_flag_) return out + (list_->size() == 1 ? ",)" : ")");
      return out + "]";
    }
    case Type::dict: {
      std::string out = namespace_flag_ ? "<Namespace {" : "{";
      for (size_t i = 0; i < dict_->size(); ++i) {
        out += (i ? ", " : "") + py_str_repr((*dict_)[i].first) + ": " + (*dict_)[i].second.repr();
      }
      return out + (namespace_flag_ ? "}>" : "}");
    }
    case Type::function:
      return "<function " + *s_ + ">";
  }
  return "";
}

namespace {
void to_json_impl(const Value& v, std::string& out, int indent, int depth, bool sort_keys) {
  auto newline = [&](int d) {
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  switch (v.type()) {
    case Value::Type::undefined:
    case Value::Type::none:
      out += "null";
      return;
    case Value::Type::boolean:
      out += v.as_bool() ? "true" : "false";
      return;
    case Value::Type::integer:
      out += std::to_string(v.as_int());
      return;
    case Value::Type::number: {
      const double d = v.as_double();
      out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : float_repr(d);
      return;
    }
    case Value::Type::string:
      json_string(out, v.as_string());
      return;
    case Value::Type::list: {
      const List& l = v.as_list();
      if (l.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < l.size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(depth + 1);
        to_json_impl(l[i], out, indent, depth + 1, sort_keys);
      }
      if (indent >= 0) newline(depth);
      out += ']';
      return;
    }
    case Value::Type::dict: {
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.as_dict()) items.push_back(&kv);
      if (sort_keys) std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      if (items.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(depth + 1);
        json_string(out, items[i]->first);
        out += ": ";
        to_json_impl(items[i]->second, out, indent, depth + 1, sort_keys);
      }
      if (indent >= 0) newline(depth);
      out += '}';
      return;
    }
    case Value::Type::function:
      FT_FAIL("a function is not JSON serializable");
  }
}
}  // namespace

std::string Value::to_json(int indent) const {
  std::string out;
  to_json_impl(*this, out, indent, 0, false);
  return out;
}

bool operator==(const Value& a, const Value& b) {
  using T = Value::Type;
  const bool an = a.is_number() || a.type() == T::boolean, bn = b.is_number() || b.type() == T::boolean;
  if (an && bn) {
    auto num = [](const Value& v) { return v.type() == T::boolean ? (v.as_bool() ? 1.0 : 0.0) : v.as_double(); };
    if (a.type() != T::number && b.type() != T::number) {
      auto ival = [](const Value& v) { return v.type() == T::boolean ? int64_t(v.as_bool()) : v.as_int(); };
      return ival(a) == ival(b);
    }
    return num(a) == num(b);
  }
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case T::undefined:
    case T::none:
      return true;
    case T::string:
      return a.as_string() == b.as_string();
    case T::list:
      return a.as_list() == b.as_list();
    case T::dict: {
      if (a.as_dict().size() != b.as_dict().size()) return false;
      for (const auto& [k, v] : a.as_dict()) {
        const Value* o = b.find(k);
        if (!o || !(*o == v)) return false;
      }
      return true;
    }
    case T::function:
      return &a.as_function() == &b.as_function();
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer

namespace {

struct Pos {
  int line = 1, col = 1;
};

struct Token {
  enum Kind : uint8_t { text, var_begin, var_end, block_begin, block_end, name, string, integer, number, op, eof };
  Kind kind = eof;
  std::string value;
  Pos pos;
};

[[noreturn]] void fail_at(const std::string& tmpl, Pos p, const std::string& msg) {
  FT_FAIL("[chat template] ", tmpl, ":", p.line, ":", p.col, ": ", msg);
}

class Lexer {
 public:
  Lexer(std::string_view source, const std::string& name) : name_(name) {
    // Jinja's newline normalisation, and keep_trailing_newline off: one final newline goes.
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r' && i + 1 < source.size() && source[i + 1] == '\n') continue;
      src_ += source[i];
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    std::vector<Token> out;
    size_t pos = 0;
    bool lstrip_next = false;
    while (pos < src_.size()) {
      size_t tag = src_.find('{', pos);
      while (tag != std::string::npos && tag + 1 < src_.size() && src_[tag + 1] != '{' && src_[tag + 1] != '%' &&
             src_[tag + 1] != '#') {
        tag = src_.find('{', tag + 1);
      }
      if (tag + 1 >= src_.size()) tag = std::string::npos;
      const size_t text_end = tag == std::string::npos ? src_.size() : tag;
      std::string text = src_.substr(pos, text_end - pos);
      const bool line_starting = pos == 0 || src_[pos - 1] == '\n';
      if (lstrip_next) {
        text = py_strip(text, std::nullopt, true, false);
        lstrip_next = false;
      }
      if (tag != std::string::npos) {
        const char kind = src_[tag + 1];
        const char sign = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
        if (sign == '-') {
          text = py_strip(text, std::nullopt, false, true);
        } else if (sign != '+' && kind != '{') {  // lstrip_blocks
          const size_t nl = text.rfind('\n');
          const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
          if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
              std::all_of(text.begin() + static_cast<std::ptrdiff_t>(l_pos), text.end(),
                          [](char c) { return c == ' ' || c == '\t' || c == '\f' || c == '\v'; })) {
            text.resize(l_pos);
          }
        }
      }
      if (!text.empty()) out.push_back({Token::text, std::move(text), pos_of(pos)});
      if (tag == std::string::npos) break;

      const char kind = src_[tag + 1];
      size_t p = tag + 2;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) ++p;
      if (kind == '#') {
        const size_t end = src_.find("#}", p);
        if (end == std::string::npos) fail_at(name_, pos_of(tag), "unclosed comment ({# without #})");
        const char esign = end > p ? src_[end - 1] : '\0';
        pos = end + 2;
        if (esign == '-') {
          lstrip_next = true;
        } else if (esign != '+' && pos < src_.size() && src_[pos] == '\n') {
          ++pos;  // trim_blocks
        }
        continue;
      }
      const bool block = kind == '%';
      out.push_back({block ? Token::block_begin : Token::var_begin, {}, pos_of(tag)});
      const char close = block ? '%' : '}';
      int depth = 0;  // open brackets: "}}" inside {'a': {}} is not the end of the tag
      for (;;) {
        while (p < src_.size() && std::isspace(static_cast<unsigned char>(src_[p]))) ++p;
        if (p >= src_.size()) fail_at(name_, pos_of(tag), block ? "unclosed tag ({% without %})" : "unclosed {{");
        if (depth > 0) {
          p = lex_token(p, out);
          const std::string& v = out.back().value;
          if (out.back().kind == Token::op) depth += (v == "(" || v == "[" || v == "{") - (v == ")" || v == "]" || v == "}");
          continue;
        }
        // The end of the tag, with its whitespace control.
        size_t q = p;
        char esign = '\0';
        if ((src_[q] == '-' || src_[q] == '+') && q + 1 < src_.size() && src_[q + 1] == close) {
          esign = src_[q];
          ++q;
        }
        if (src_[q] == close && q + 1 < src_.size() && src_[q + 1] == '}') {
          out.push_back({block ? Token::block_end : Token::var_end, {}, pos_of(p)});
          pos = q + 2;
          if (esign == '-') {
            lstrip_next = true;
          } else if (block && esign != '+' && pos < src_.size() && src_[pos] == '\n') {
            ++pos;  // trim_blocks
          }
          break;
        }
        p = lex_token(p, out);
        const std::string& v = out.back().value;
        if (out.back().kind == Token::op && (v == "(" || v == "[" || v == "{")) ++depth;
      }
    }
    out.push_back({Token::eof, {}, pos_of(src_.size())});
    return out;
  }

 private:
  Pos pos_of(size_t off) {
    if (line_starts_.empty()) {
      line_starts_.push_back(0);
      for (size_t i = 0; i < src_.size(); ++i) {
        if (src_[i] == '\n') line_starts_.push_back(i + 1);
      }
    }
    const auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), off) - 1;
    return {static_cast<int>(it - line_starts_.begin()) + 1, static_cast<int>(off - *it) + 1};
  }

  size_t lex_token(size_t p, std::vector<Token>& out) {
    const Pos at = pos_of(p);
    const char c = src_[p];
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t e = p;
      while (e < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
      out.push_back({Token::name, src_.substr(p, e - p), at});
      return e;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t e = p;
      bool real = false;
      auto digits = [&] {
        while (e < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
      };
      digits();
      if (e + 1 < src_.size() && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
        real = true;
        ++e;
        digits();
      }
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t f = e + 1;
        if (f < src_.size() && (src_[f] == '+' || src_[f] == '-')) ++f;
        if (f < src_.size() && std::isdigit(static_cast<unsigned char>(src_[f]))) {
          real = true;
          e = f;
          digits();
        }
      }
      std::string text = src_.substr(p, e - p);
      text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
      out.push_back({real ? Token::number : Token::integer, std::move(text), at});
      return e;
    }
    if (c == '\'' || c == '"') {
      std::string value;
      size_t e = p + 1;
      for (;;) {
        if (e >= src_.size()) fail_at(name_, at, "unclosed string literal");
        const char d = src_[e];
        if (d == c) break;
        if (d == '\\' && e + 1 < src_.size()) {
          const char x = src_[e + 1];
          e += 2;
          switch (x) {
            case 'n': value += '\n'; break;
            case 't': value += '\t'; break;
            case 'r': value += '\r'; break;
            case '0': value += '\0'; break;
            case 'b': value += '\b'; break;
            case 'f': value += '\f'; break;
            case 'v': value += '\v'; break;
            case 'a': value += '\a'; break;
            case '\\': value += '\\'; break;
            case '\'': value += '\''; break;
            case '"': value += '"'; break;
            case '\n': break;
            case 'x':
            case 'u':
            case 'U': {
              const size_t n = x == 'x' ? 2 : x == 'u' ? 4 : 8;
              if (e + n > src_.size()) fail_at(name_, at, "truncated \\" + std::string(1, x) + " escape");
              const std::string hex = src_.substr(e, n);
              char* end = nullptr;
              const unsigned long cp = std::strtoul(hex.c_str(), &end, 16);
              if (end != hex.c_str() + n || cp > 0x10FFFF) fail_at(name_, at, "bad \\" + std::string(1, x) + " escape");
              append_utf8(value, static_cast<char32_t>(cp));
              e += n;
              break;
            }
            default:  // Python keeps unknown escapes as written
              value += '\\';
              value += x;
          }
          continue;
        }
        value += d;
        ++e;
      }
      out.push_back({Token::string, std::move(value), at});
      return e + 1;
    }
    static const char* const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">",
                                      "=",  "(",  ")",  "[",  "]",  "{",  "}", ",", ".", ":", "|"};
    for (const char* op : ops) {
      const size_t n = std::char_traits<char>::length(op);
      if (src_.compare(p, n, op) == 0) {
        out.push_back({Token::op, op, at});
        return p + n;
      }
    }
    fail_at(name_, at, std::string("unexpected character '") + c + "'");
  }

  const std::string& name_;
  std::string src_;
  std::vector<size_t> line_starts_;
};

// ---------------------------------------------------------------------------------------------
// Syntax tree

struct Ctx;

struct Expr {
  Pos pos;
  virtual ~Expr() = default;
  virtual Value eval(Ctx& ctx) const = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

struct CallArgs {
  std::vector<ExprPtr> positional;
  std::vector<std::pair<std::string, ExprPtr>> named;
};

enum class Flow : uint8_t { normal, break_, continue_ };

struct Node {
  Pos pos;
  virtual ~Node() = default;
  virtual Flow exec(Ctx& ctx) const = 0;
};
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

struct MacroDef {
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // aligned to the last params
  Body body;
};

// ---------------------------------------------------------------------------------------------
// Evaluation context

struct Ctx {
  const std::string* tmpl_name = nullptr;
  std::string* out = nullptr;
  Spans* generation = nullptr;
  // Scopes, innermost last: the globals, the template's top level, then a frame per loop iteration
  // and per macro call. Shared, because a macro sees the scopes it was defined in as they are when
  // it is called (jinja2's closures): itself (recursion), macros and variables set after it.
  struct Frame {
    std::unordered_map<std::string, Value> vars;
    bool closed_over = false;  // listed in Budget::closed_over
  };
  std::vector<std::shared_ptr<Frame>> frames;
  // What a render counts, shared with the macros it defines (which may outlive the frame that
  // defined them, e.g. stored in a namespace).
  struct Budget {
    int64_t iterations = 0;
    int macro_depth = 0;
    // The frames macros hold. A macro is a value in a frame it holds, a reference cycle; emptying
    // them after the render breaks every one.
    std::vector<std::weak_ptr<Frame>> closed_over;
  };
  std::shared_ptr<Budget> budget;

  Value lookup(const std::string& name) const {
    for (auto it = frames.rbegin(); it != frames.rend(); ++it) {
      auto f = (*it)->vars.find(name);
      if (f != (*it)->vars.end()) return f->second;
    }
    return Value::undefined(name);
  }
  void set(const std::string& name, Value v) { frames.back()->vars[name] = std::move(v); }
  void push_frame() { frames.push_back(std::make_shared<Frame>()); }
  [[noreturn]] void fail(Pos p, const std::string& msg) const { fail_at(*tmpl_name, p, msg); }
  void write(std::string_view s, Pos p) {
    if (out->size() + s.size() > (64u << 20)) fail(p, "output exceeds 64 MiB");
    out->append(s);
  }
};

constexpr int64_t kMaxRange = 100000;

// What apply_filter and apply_test know. The parser checks names against these, so that a template
// naming another is refused when it is loaded, as jinja2 refuses it when it compiles.
constexpr std::string_view kFilters[] = {
    "abs",  "capitalize", "count", "d",      "default", "dictsort",   "e",       "escape", "first",  "float",
    "forceescape", "indent", "int", "items", "join",    "last",       "length",  "list",   "lower",  "map",
    "max",  "min",        "reject", "rejectattr", "replace", "reverse", "round", "safe",   "select", "selectattr",
    "sort", "string",     "sum",   "title",  "tojson",  "trim",       "unique",  "upper"};
constexpr std::string_view kTests[] = {
    "!=",      "<",        "<=",     "==",      ">",          ">=",      "boolean", "callable", "defined",
    "divisibleby", "eq",   "equalto", "even",   "false",      "float",   "ge",      "greaterthan", "gt",
    "in",      "integer",  "iterable", "le",    "lessthan",   "lower",   "lt",      "mapping",  "ne",
    "none",    "number",   "odd",    "sameas",  "sequence",   "string",  "true",    "undefined", "upper"};
template <size_t N>
bool known(const std::string_view (&names)[N], std::string_view name) {
  return std::find(std::begin(names), std::end(names), name) != std::end(names);
}
constexpr int64_t kMaxIterations = 1'000'000;

const char* type_name(const Value& v) {
  switch (v.type()) {
    case Value::Type::undefined: return "undefined";
    case Value::Type::none: return "NoneType";
    case Value::Type::boolean: return "bool";
    case Value::Type::integer: return "int";
    case Value::Type::number: return "float";
    case Value::Type::string: return "str";
    case Value::Type::list: return "list";
    case Value::Type::dict: return v.is_namespace() ? "Namespace" : "dict";
    case Value::Type::function: return "function";
  }
  return "?";
}

std::string undefined_message(const Value& v) {
  return v.name().empty() ? std::string("a value is undefined") : "'" + v.name() + "' is undefined";
}

[[noreturn]] void fail_undefined(Ctx& ctx, Pos p, const Value& v) { ctx.fail(p, undefined_message(v)); }

// Items of an iterable: lists, dict keys, string characters; undefined is empty (Jinja's Undefined).
List iterate(Ctx& ctx, Pos p, const Value& v) {
  switch (v.type()) {
    case Value::Type::undefined:
      return {};
    case Value::Type::list:
      return v.as_list();
    case Value::Type::dict: {
      List keys;
      for (const auto& kv : v.as_dict()) keys.emplace_back(kv.first);
      return keys;
    }
    case Value::Type::string: {
      List chars;
      for (char32_t c : decode_utf8(v.as_string())) chars.emplace_back(encode_utf8(std::u32string(1, c)));
      return chars;
    }
    default:
      ctx.fail(p, std::string("'") + type_name(v) + "' object is not iterable");
  }
}

int64_t length_of(Ctx& ctx, Pos p, const Value& v) {
  switch (v.type()) {
    case Value::Type::undefined: return 0;
    case Value::Type::string: return static_cast<int64_t>(decode_utf8(v.as_string()).size());
    case Value::Type::list: return static_cast<int64_t>(v.as_list().size());
    case Value::Type::dict: return static_cast<int64_t>(v.as_dict().size());
    default: ctx.fail(p, std::string("object of type '") + type_name(v) + "' has no len()");
  }
}

double to_double(Ctx& ctx, Pos p, const Value& v) {
  if (v.type() == Value::Type::boolean) return v.as_bool() ? 1.0 : 0.0;
  if (!v.is_number()) ctx.fail(p, std::string("expected a number, got ") + type_name(v));
  return v.as_double();
}

bool is_int_like(const Value& v) { return v.type() == Value::Type::integer || v.type() == Value::Type::boolean; }
int64_t int_of(const Value& v) { return v.type() == Value::Type::boolean ? int64_t(v.as_bool()) : v.as_int(); }

// Python's ordering for <, sort, min and max.
int compare(Ctx& ctx, Pos p, const Value& a, const Value& b) {
  const bool an = a.is_number() || a.type() == Value::Type::boolean;
  const bool bn = b.is_number() || b.type() == Value::Type::boolean;
  if (an && bn) {
    if (is_int_like(a) && is_int_like(b)) return int_of(a) < int_of(b) ? -1 : int_of(a) > int_of(b) ? 1 : 0;
    const double x = to_double(ctx, p, a), y = to_double(ctx, p, b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) return a.as_string().compare(b.as_string()) < 0 ? -1 : a.as_string() == b.as_string() ? 0 : 1;
  if (a.type() == Value::Type::list && b.type() == Value::Type::list) {
    const List &x = a.as_list(), &y = b.as_list();
    for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) {
      if (!(x[i] == y[i])) return compare(ctx, p, x[i], y[i]);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  ctx.fail(p, std::string("cannot compare '") + type_name(a) + "' with '" + type_name(b) + "'");
}

bool contains(Ctx& ctx, Pos p, const Value& container, const Value& item) {
  switch (container.type()) {
    case Value::Type::string:
      if (!item.is_string()) ctx.fail(p, std::string("'in <string>' requires a string, not ") + type_name(item));
      return container.as_string().find(item.as_string()) != std::string::npos;
    case Value::Type::list:
      return std::any_of(container.as_list().begin(), container.as_list().end(), [&](const Value& v) { return v == item; });
    case Value::Type::dict:
      return item.is_string() && container.find(item.as_string()) != nullptr;
    case Value::Type::undefined:
      return false;  // Jinja's Undefined iterates as empty
    default:
      ctx.fail(p, std::string("argument of type '") + type_name(container) + "' is not iterable");
  }
}

// Python's index into a sequence (negative from the end); undefined when out of range.
Value index_into(const Value& seq, int64_t i) {
  if (seq.type() == Value::Type::list) {
    const auto n = static_cast<int64_t>(seq.as_list().size());
    if (i < 0) i += n;
    return i >= 0 && i < n ? seq.as_list()[static_cast<size_t>(i)] : Value::undefined("index " + std::to_string(i));
  }
  const std::u32string u = decode_utf8(seq.as_string());
  const auto n = static_cast<int64_t>(u.size());
  if (i < 0) i += n;
  return i >= 0 && i < n ? Value(encode_utf8(u.substr(static_cast<size_t>(i), 1))) : Value::undefined("index");
}

// a.b and a[b]: a dict's entry, a sequence's item; undefined when absent (Jinja's getattr/getitem).
Value get_member(Ctx& ctx, Pos p, const Value& obj, const Value& key, const std::string& what) {
  switch (obj.type()) {
    case Value::Type::undefined:
      fail_undefined(ctx, p, obj);
    case Value::Type::dict:
      if (key.is_string()) {
        if (const Value* v = obj.find(key.as_string())) return *v;
      }
      break;
    case Value::Type::list:
    case Value::Type::string:
      if (is_int_like(key)) return index_into(obj, int_of(key));
      break;
    default:
      break;
  }
  return Value::undefined(what);
}

Value slice(Ctx& ctx, Pos p, const Value& obj, const Value& start, const Value& stop, const Value& step) {
  auto opt = [&](const Value& v) -> std::optional<int64_t> {
    if (v.is_undefined() || v.is_none()) return std::nullopt;
    if (!is_int_like(v)) ctx.fail(p, "slice indices must be integers or None");
    return int_of(v);
  };
  const int64_t st = opt(step).value_or(1);
  if (st == 0) ctx.fail(p, "slice step cannot be zero");
  std::u32string chars;
  int64_t n = 0;
  if (obj.type() == Value::Type::list) {
    n = static_cast<int64_t>(obj.as_list().size());
  } else if (obj.is_string()) {
    chars = decode_utf8(obj.as_string());
    n = static_cast<int64_t>(chars.size());
  } else if (obj.is_undefined()) {
    fail_undefined(ctx, p, obj);
  } else {
    ctx.fail(p, std::string("'") + type_name(obj) + "' object is not subscriptable");
  }
  // Python's PySlice_AdjustIndices.
  auto adjust = [&](std::optional<int64_t> v, int64_t dflt) {
    if (!v) return dflt;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < 0) x = st < 0 ? -1 : 0;
    } else if (x >= n) {
      x = st < 0 ? n - 1 : n;
    }
    return x;
  };
  const int64_t b = adjust(opt(start), st < 0 ? n - 1 : 0), e = adjust(opt(stop), st < 0 ? -1 : n);
  std::vector<int64_t> idx;
  for (int64_t i = b; st > 0 ? i < e : i > e; i += st) idx.push_back(i);
  if (obj.type() == Value::Type::list) {
    List out;
    for (int64_t i : idx) out.push_back(obj.as_list()[static_cast<size_t>(i)]);
    return Value(std::move(out));
  }
  std::u32string out;
  for (int64_t i : idx) out.push_back(chars[static_cast<size_t>(i)]);
  return Value(encode_utf8(out));
}

Value arith(Ctx& ctx, Pos p, const std::string& op, const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(ctx, p, a);
  if (b.is_undefined()) fail_undefined(ctx, p, b);
  const bool an = a.is_number() || a.type() == Value::Type::boolean;
  const bool bn = b.is_number() || b.type() == Value::Type::boolean;
  if (op == "+") {
    if (a.is_string() && b.is_string()) return Value(a.as_string() + b.as_string());
    if (a.type() == Value::Type::list && b.type() == Value::Type::list) {
      List out = a.as_list();
      out.insert(out.end(), b.as_list().begin(), b.as_list().end());
      return Value(std::move(out));
    }
  }
  const bool a_seq = a.is_string() || a.type() == Value::Type::list;
  const bool b_seq = b.is_string() || b.type() == Value::Type::list;
  if (op == "*" && ((a_seq && is_int_like(b)) || (b_seq && is_int_like(a)))) {
    const Value& seq = a.is_string() || a.type() == Value::Type::list ? a : b;
    const int64_t n = int_of(a.is_string() || a.type() == Value::Type::list ? b : a);
    const int64_t len = length_of(ctx, p, seq);
    if (n > 0 && len > 0 && n > (64 << 20) / len) ctx.fail(p, "repetition result too large");
    if (seq.is_string()) {
      std::string out;
      for (int64_t i = 0; i < n; ++i) out += seq.as_string();
      return Value(std::move(out));
    }
    List out;
    for (int64_t i = 0; i < n; ++i) out.insert(out.end(), seq.as_list().begin(), seq.as_list().end());
    return Value(std::move(out));
  }
  if (!an || !bn) {
    ctx.fail(p, std::string("unsupported operand types for ") + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
  }
  if (is_int_like(a) && is_int_like(b) && op != "/") {
    const int64_t x = int_of(a), y = int_of(b);
    int64_t r = 0;
    if (op == "+") {
      if (__builtin_add_overflow(x, y, &r)) ctx.fail(p, "integer overflow");
      return Value(r);
    }
    if (op == "-") {
      if (__builtin_sub_overflow(x, y, &r)) ctx.fail(p, "integer overflow");
      return Value(r);
    }
    if (op == "*") {
      if (__builtin_mul_overflow(x, y, &r)) ctx.fail(p, "integer overflow");
      return Value(r);
    }
    if (op == "//" || op == "%") {
      if (y == 0) ctx.fail(p, "integer division or modulo by zero");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) {
        --q;
        m += y;
      }
      return Value(op == "//" ? q : m);
    }
    if (op == "**") {
      if (y < 0) return Value(std::pow(static_cast<double>(x), static_cast<double>(y)));
      int64_t acc = 1;
      for (int64_t i = 0; i < y; ++i) {
        if (__builtin_mul_overflow(acc, x, &acc)) ctx.fail(p, "integer overflow");
      }
      return Value(acc);
    }
  }
  const double x = to_double(ctx, p, a), y = to_double(ctx, p, b);
  if (op == "+") return Value(x + y);
  if (op == "-") return Value(x - y);
  if (op == "*") return Value(x * y);
  if (op == "/") {
    if (y == 0) ctx.fail(p, "division by zero");
    return Value(x / y);
  }
  if (op == "//" || op == "%") {
    if (y == 0) ctx.fail(p, "float division or modulo by zero");
    const double m = std::fmod(x, y);
    const double mod = m != 0 && ((m < 0) != (y < 0)) ? m + y : m;
    return Value(op == "%" ? mod : std::floor((x - mod) / y + 0.5));
  }
  if (op == "**") return Value(std::pow(x, y));
  ctx.fail(p, "unknown operator " + op);
}

struct EvalArgs {
  List positional;
  std::vector<std::pair<std::string, Value>> named;

  const Value* get(size_t i, std::string_view name) const {
    if (i < positional.size()) return &positional[i];
    for (const auto& [k, v] : named) {
      if (k == name) return &v;
    }
    return nullptr;
  }
};

EvalArgs eval_args(Ctx& ctx, const CallArgs& args) {
  EvalArgs out;
  for (const auto& e : args.positional) out.positional.push_back(e->eval(ctx));
  for (const auto& [k, e] : args.named) out.named.emplace_back(k, e->eval(ctx));
  return out;
}

// Checks that a filter, test or method got at most the arguments it knows.
void check_args(Ctx& ctx, Pos p, const EvalArgs& a, std::initializer_list<std::string_view> names,
                const std::string& what) {
  if (a.positional.size() > names.size()) {
    ctx.fail(p, what + " takes at most " + std::to_string(names.size()) + " arguments (" +
                    std::to_string(a.positional.size()) + " given)");
  }
  for (const auto& [k, v] : a.named) {
    if (std::find(names.begin(), names.end(), k) == names.end()) ctx.fail(p, what + " got an unexpected argument '" + k + "'");
  }
}

Value call_function(Ctx& ctx, Pos p, const Value& f, const EvalArgs& a) {
  if (f.is_undefined()) fail_undefined(ctx, p, f);
  if (f.type() != Value::Type::function) ctx.fail(p, std::string("'") + type_name(f) + "' object is not callable");
  Args args{a.positional, a.named};
  auto fail = [&](const char* what) {
    if (f.name() == "raise_exception") ctx.fail(p, std::string("the template raised an error: ") + what);
    ctx.fail(p, f.name() + "(): " + what);
  };
  try {
    return f.as_function()(args);
  } catch (const Error& e) {
    // Errors from inside a macro already name their place; the globals' do not.
    if (starts_with(e.what(), "[chat template]")) throw;
    fail(e.what());
  } catch (const std::exception& e) {
    // (raise_exception's own: its text is the template's, whatever it starts with)
    fail(e.what());
  }
  return Value();  // (not reached: ctx.fail throws)
}

// ---------------------------------------------------------------------------------------------
// Tests and filters

bool apply_test(Ctx& ctx, Pos p, const std::string& name, const Value& v, const EvalArgs& a) {
  auto arg = [&](size_t i) -> const Value& {
    if (i >= a.positional.size()) ctx.fail(p, "test '" + name + "' needs an argument");
    return a.positional[i];
  };
  using T = Value::Type;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number() || v.type() == T::boolean;
  if (name == "integer") return v.type() == T::integer;
  if (name == "float") return v.type() == T::number;
  if (name == "boolean") return v.type() == T::boolean;
  if (name == "true") return v.type() == T::boolean && v.as_bool();
  if (name == "false") return v.type() == T::boolean && !v.as_bool();
  if (name == "mapping") return v.type() == T::dict;
  if (name == "iterable") return v.type() == T::list || v.type() == T::dict || v.is_string() || v.is_undefined();
  if (name == "sequence") return v.type() == T::list || v.type() == T::dict || v.is_string();
  if (name == "callable") return v.type() == T::function;
  if (name == "odd" || name == "even" || name == "divisibleby") {
    if (!is_int_like(v)) ctx.fail(p, "test '" + name + "' needs an integer, got " + type_name(v));
    if (name == "divisibleby") {
      const Value& d = arg(0);
      if (!is_int_like(d) || int_of(d) == 0) ctx.fail(p, "divisibleby needs a non-zero integer");
      return int_of(v) % int_of(d) == 0;
    }
    const bool odd = int_of(v) % 2 != 0;
    return name == "odd" ? odd : !odd;
  }
  if (name == "equalto" || name == "eq" || name == "==") return v == arg(0);
  if (name == "ne" || name == "!=") return !(v == arg(0));
  if (name == "lt" || name == "lessthan" || name == "<") return compare(ctx, p, v, arg(0)) < 0;
  if (name == "le" || name == "<=") return compare(ctx, p, v, arg(0)) <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return compare(ctx, p, v, arg(0)) > 0;
  if (name == "ge" || name == ">=") return compare(ctx, p, v, arg(0)) >= 0;
  if (name == "in") return contains(ctx, p, arg(0), v);
  if (name == "sameas") return v == arg(0) && v.type() == arg(0).type();
  if (name == "lower" || name == "upper") {
    if (!v.is_string()) return false;
    const std::string& s = v.as_string();
    return s == map_chars(s, name == "lower" ? to_lower : to_upper);
  }
  ctx.fail(p, "unknown test '" + name + "'");
}

Value apply_filter(Ctx& ctx, Pos p, const std::string& name, const Value& v, const EvalArgs& a);

// Jinja's attribute lookup for filters (map, selectattr, sort, ...): "a.b" walks dicts, "0" indexes.
Value attribute_of(Ctx& ctx, Pos p, const Value& v, const std::string& path) {
  Value cur = v;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    Value key(part);
    if (!part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }) &&
        cur.type() != Value::Type::dict) {
      key = Value(static_cast<int64_t>(std::stoll(part)));
    }
    cur = cur.is_undefined() ? cur : get_member(ctx, p, cur, key, part);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return cur;
}

std::string require_string(Ctx& ctx, Pos p, const Value& v, const std::string& what) {
  if (!v.is_string()) ctx.fail(p, what + " needs a string, got " + type_name(v));
  return v.as_string();
}

// The sort key of the sort/unique/min/max filters: lowercased strings unless case_sensitive.
Value sort_key(Ctx& ctx, Pos p, const Value& item, const Value* attribute, bool case_sensitive) {
  Value k = attribute && attribute->is_string() ? attribute_of(ctx, p, item, attribute->as_string()) : item;
  if (!case_sensitive && k.is_string()) k = Value(map_chars(k.as_string(), to_lower));
  return k;
}

List select_items(Ctx& ctx, Pos p, const std::string& name, const Value& v, const EvalArgs& a) {
  const bool by_attr = name == "selectattr" || name == "rejectattr";
  const bool keep = name == "select" || name == "selectattr";
  List out;
  size_t i = 0;
  std::string attr;
  if (by_attr) {
    if (a.positional.empty()) ctx.fail(p, name + " needs an attribute name");
    attr = require_string(ctx, p, a.positional[0], name);
    i = 1;
  }
  std::optional<std::string> test;
  if (i < a.positional.size()) test = require_string(ctx, p, a.positional[i++], name + "'s test");
  EvalArgs rest;
  rest.positional.assign(a.positional.begin() + static_cast<std::ptrdiff_t>(std::min(i, a.positional.size())),
                         a.positional.end());
  for (const Value& item : iterate(ctx, p, v)) {
    const Value x = by_attr ? attribute_of(ctx, p, item, attr) : item;
    const bool ok = test ? apply_test(ctx, p, *test, x, rest) : x.truthy();
    if (ok == keep) out.push_back(item);
  }
  return out;
}

Value apply_filter(Ctx& ctx, Pos p, const std::string& name, const Value& v, const EvalArgs& a) {
  auto flag = [&](size_t i, std::string_view key, bool dflt) {
    const Value* x = a.get(i, key);
    return x ? x->truthy() : dflt;
  };
  using T = Value::Type;
  const std::string what = "filter '" + name + "'";
  if (name == "trim") {
    check_args(ctx, p, a, {"chars"}, what);
    const Value* chars = a.get(0, "chars");
    return Value(py_strip(v.str(), chars && chars->is_string() ? std::optional(chars->as_string()) : std::nullopt, true, true));
  }
  if (name == "length" || name == "count") return Value(length_of(ctx, p, v));
  if (name == "tojson") {
    check_args(ctx, p, a, {"ensure_ascii", "indent", "separators", "sort_keys"}, what);
    const Value* indent = a.get(1, "indent");
    const Value* sort = a.get(3, "sort_keys");
    if (const Value* sep = a.get(2, "separators"); sep && !sep->is_none()) ctx.fail(p, "tojson: separators are not supported");
    if (const Value* ea = a.get(0, "ensure_ascii"); ea && ea->truthy()) ctx.fail(p, "tojson: ensure_ascii is not supported");
    const int ind = indent && is_int_like(*indent) ? static_cast<int>(int_of(*indent)) : -1;
    std::string out;
    try {
      to_json_impl(v, out, ind, 0, sort && sort->truthy());
    } catch (const ft::Error& e) {
      ctx.fail(p, std::string("tojson: ") + e.what());
    }
    return Value(std::move(out));
  }
  if (name == "upper") return Value(map_chars(v.str(), to_upper));
  if (name == "lower") return Value(map_chars(v.str(), to_lower));
  if (name == "capitalize") return Value(py_capitalize(v.str()));
  if (name == "title") {
    // Jinja's title: words start after whitespace, '-', and opening brackets.
    std::u32string u = decode_utf8(v.str());
    bool start = true;
    for (auto& c : u) {
      const bool sep = is_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
      if (!sep) c = start ? to_upper(c) : to_lower(c);
      start = sep;
    }
    return Value(encode_utf8(u));
  }
  if (name == "replace") {
    check_args(ctx, p, a, {"old", "new", "count"}, what);
    const Value* old = a.get(0, "old");
    const Value* neu = a.get(1, "new");
    if (!old || !neu) ctx.fail(p, "replace needs two arguments");
    const Value* count = a.get(2, "count");
    return Value(replace_all(v.str(), old->str(), neu->str(), count && is_int_like(*count) ? int_of(*count) : -1));
  }
  if (name == "default" || name == "d") {
    check_args(ctx, p, a, {"default_value", "boolean"}, what);
    const Value* dv = a.get(0, "default_value");
    const bool boolean = flag(1, "boolean", false);
    if (v.is_undefined() || (boolean && !v.truthy())) return dv ? *dv : Value("");
    return v;
  }
  if (name == "first" || name == "last") {
    const List items = iterate(ctx, p, v);
    if (items.empty()) return Value::undefined(name + " of an empty sequence");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "join") {
    check_args(ctx, p, a, {"d", "attribute"}, what);
    const Value* sep = a.get(0, "d");
    const Value* attr = a.get(1, "attribute");
    std::string out;
    bool first = true;
    for (const Value& item : iterate(ctx, p, v)) {
      if (!first) out += sep ? sep->str() : "";
      first = false;
      out += (attr && attr->is_string() ? attribute_of(ctx, p, item, attr->as_string()) : item).str();
    }
    return Value(std::move(out));
  }
  if (name == "list") return Value(iterate(ctx, p, v));
  if (name == "string") return Value(v.str());
  if (name == "safe") return v;
  if (name == "e" || name == "escape" || name == "forceescape") {
    std::string out;
    for (char c : v.str()) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
      }
    }
    return Value(std::move(out));
  }
  if (name == "int") {
    check_args(ctx, p, a, {"default", "base"}, what);
    const Value* dflt = a.get(0, "default");
    if (is_int_like(v)) return Value(int_of(v));
    if (v.type() == T::number) return Value(static_cast<int64_t>(std::trunc(v.as_double())));
    if (v.is_string()) {
      const std::string s = py_strip(v.as_string(), std::nullopt, true, true);
      int64_t i = 0;
      auto r = std::from_chars(s.data(), s.data() + s.size(), i);
      if (!s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size()) return Value(i);
      char* end = nullptr;
      const double d = std::strtod(s.c_str(), &end);
      if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(d)) return Value(static_cast<int64_t>(std::trunc(d)));
    }
    return dflt ? *dflt : Value(0);
  }
  if (name == "float") {
    check_args(ctx, p, a, {"default"}, what);
    const Value* dflt = a.get(0, "default");
    if (v.is_number() || v.type() == T::boolean) return Value(to_double(ctx, p, v));
    if (v.is_string()) {
      const std::string s = py_strip(v.as_string(), std::nullopt, true, true);
      char* end = nullptr;
      const double d = std::strtod(s.c_str(), &end);
      if (!s.empty() && end == s.c_str() + s.size()) return Value(d);
    }
    return dflt ? *dflt : Value(0.0);
  }
  if (name == "abs") {
    if (is_int_like(v)) return Value(std::abs(int_of(v)));
    return Value(std::fabs(to_double(ctx, p, v)));
  }
  if (name == "round") {
    check_args(ctx, p, a, {"precision", "method"}, what);
    const Value* prec = a.get(0, "precision");
    const Value* method = a.get(1, "method");
    const int64_t n = prec && is_int_like(*prec) ? int_of(*prec) : 0;
    const std::string m = method && method->is_string() ? method->as_string() : "common";
    if (m == "common") {
      // Python's round(x, n): an int stays an int; a float rounds its exact value, ties to even,
      // which is what printf's correctly rounded conversion does.
      if (is_int_like(v) && n >= 0) return Value(int_of(v));
      const double x = to_double(ctx, p, v);
      if (n >= 0 && n <= 300 && std::isfinite(x)) {
        char buf[512];
        std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(n), x);
        return Value(std::strtod(buf, nullptr));
      }
    }
    const double scale = std::pow(10.0, static_cast<double>(n));
    const double x = to_double(ctx, p, v) * scale;
    double r = 0;
    if (m == "common") r = std::nearbyint(x);
    else if (m == "ceil") r = std::ceil(x);
    else if (m == "floor") r = std::floor(x);
    else ctx.fail(p, "round: method must be common, ceil or floor");
    return Value(r / scale);
  }
  if (name == "items" || name == "dictsort") {
    if (v.is_undefined()) return Value(List{});
    if (v.type() != T::dict) ctx.fail(p, what + " needs a mapping, got " + type_name(v));
    List out;
    for (const auto& [k, x] : v.as_dict()) out.push_back(Value::tuple(List{Value(k), x}));
    if (name == "dictsort") {
      const bool cs = flag(0, "case_sensitive", false);
      const Value* by = a.get(1, "by");
      const bool by_value = by && by->is_string() && by->as_string() == "value";
      const bool rev = flag(2, "reverse", false);
      std::stable_sort(out.begin(), out.end(), [&](const Value& x, const Value& y) {
        const Value kx = sort_key(ctx, p, x.as_list()[by_value ? 1 : 0], nullptr, cs);
        const Value ky = sort_key(ctx, p, y.as_list()[by_value ? 1 : 0], nullptr, cs);
        return rev ? compare(ctx, p, ky, kx) < 0 : compare(ctx, p, kx, ky) < 0;
      });
    }
    return Value(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    return Value(select_items(ctx, p, name, v, a));
  }
  if (name == "map") {
    List out;
    const Value* attr = nullptr;
    const Value* dflt = nullptr;
    for (const auto& [k, x] : a.named) {
      if (k == "attribute") attr = &x;
      else if (k == "default") dflt = &x;
    }
    if (attr) {
      for (const Value& item : iterate(ctx, p, v)) {
        Value x = attribute_of(ctx, p, item, attr->str());
        out.push_back(x.is_undefined() && dflt ? *dflt : x);
      }
      return Value(std::move(out));
    }
    if (a.positional.empty()) ctx.fail(p, "map needs a filter name or attribute=");
    const std::string f = require_string(ctx, p, a.positional[0], "map");
    EvalArgs rest;
    rest.positional.assign(a.positional.begin() + 1, a.positional.end());
    rest.named = a.named;
    for (const Value& item : iterate(ctx, p, v)) out.push_back(apply_filter(ctx, p, f, item, rest));
    return Value(std::move(out));
  }
  if (name == "indent") {
    check_args(ctx, p, a, {"width", "first", "blank"}, what);
    const Value* width = a.get(0, "width");
    const std::string ind = width && width->is_string() ? width->as_string()
                                                        : std::string(static_cast<size_t>(width ? std::max<int64_t>(0, int_of(*width)) : 4), ' ');
    const bool first = flag(1, "first", false), blank = flag(2, "blank", false);
    std::string s = v.str() + "\n";
    std::vector<std::string> lines;
    for (size_t pos = 0; pos < s.size();) {
      const size_t nl = s.find('\n', pos);
      lines.push_back(s.substr(pos, nl - pos));
      pos = nl + 1;
    }
    std::string rv;
    if (blank) {
      for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + ind : "") + lines[i];
    } else {
      rv = lines.empty() ? "" : lines[0];
      for (size_t i = 1; i < lines.size(); ++i) rv += "\n" + (lines[i].empty() ? "" : ind) + lines[i];
    }
    return Value(first ? ind + rv : rv);
  }
  if (name == "reverse") {
    if (v.is_string()) {
      std::u32string u = decode_utf8(v.as_string());
      std::reverse(u.begin(), u.end());
      return Value(encode_utf8(u));
    }
    List items = iterate(ctx, p, v);
    std::reverse(items.begin(), items.end());
    return Value(std::move(items));
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    const bool is_sort = name == "sort";
    if (is_sort) check_args(ctx, p, a, {"reverse", "case_sensitive", "attribute"}, what);
    else check_args(ctx, p, a, {"case_sensitive", "attribute"}, what);
    const bool rev = is_sort && flag(0, "reverse", false);
    const bool cs = flag(is_sort ? 1 : 0, "case_sensitive", false);
    const Value* attr = a.get(is_sort ? 2 : 1, "attribute");
    List items = iterate(ctx, p, v);
    if (name == "unique") {
      List out;
      List seen;
      for (const Value& item : items) {
        const Value k = sort_key(ctx, p, item, attr, cs);
        if (std::find(seen.begin(), seen.end(), k) == seen.end()) {
          seen.push_back(k);
          out.push_back(item);
        }
      }
      return Value(std::move(out));
    }
    auto less = [&](const Value& x, const Value& y) {
      return compare(ctx, p, sort_key(ctx, p, x, attr, cs), sort_key(ctx, p, y, attr, cs)) < 0;
    };
    if (name == "min" || name == "max") {
      if (items.empty()) return Value::undefined("no " + name + " of an empty sequence");
      return name == "min" ? *std::min_element(items.begin(), items.end(), less)
                           : *std::max_element(items.begin(), items.end(), less);
    }
    if (rev) {
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) { return less(y, x); });
    } else {
      std::stable_sort(items.begin(), items.end(), less);
    }
    return Value(std::move(items));
  }
  if (name == "sum") {
    check_args(ctx, p, a, {"attribute", "start"}, what);
    const Value* attr = a.get(0, "attribute");
    const Value* start = a.get(1, "start");
    Value acc = start ? *start : Value(0);
    for (const Value& item : iterate(ctx, p, v)) {
      acc = arith(ctx, p, "+", acc, attr && attr->is_string() ? attribute_of(ctx, p, item, attr->as_string()) : item);
    }
    return acc;
  }
  ctx.fail(p, "unknown filter '" + name + "'");
}

// Methods of strings and dicts ("abc".strip(), d.items()); nullopt when `obj` has no such method.
std::optional<Value> call_method(Ctx& ctx, Pos p, const Value& obj, const std::string& name, const EvalArgs& a) {
  const std::string what = std::string(type_name(obj)) + "." + name + "()";
  auto str_arg = [&](size_t i, std::string_view key) -> std::optional<std::string> {
    const Value* x = a.get(i, key);
    if (!x || x->is_none()) return std::nullopt;
    return require_string(ctx, p, *x, what);
  };
  if (obj.is_string()) {
    const std::string& s = obj.as_string();
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      check_args(ctx, p, a, {"chars"}, what);
      return Value(py_strip(s, str_arg(0, "chars"), name != "rstrip", name != "lstrip"));
    }
    if (name == "upper") return Value(map_chars(s, to_upper));
    if (name == "lower") return Value(map_chars(s, to_lower));
    if (name == "title") return Value(py_title(s));
    if (name == "capitalize") return Value(py_capitalize(s));
    if (name == "startswith" || name == "endswith") {
      check_args(ctx, p, a, {"prefix"}, what);
      const Value* x = a.get(0, "prefix");
      if (!x) ctx.fail(p, what + " needs an argument");
      List options = x->type() == Value::Type::list ? x->as_list() : List{*x};
      for (const Value& o : options) {
        const std::string t = require_string(ctx, p, o, what);
        if (name == "startswith" ? starts_with(s, t) : ends_with(s, t)) return Value(true);
      }
      return Value(false);
    }
    if (name == "replace") {
      check_args(ctx, p, a, {"old", "new", "count"}, what);
      const auto old = str_arg(0, "old"), neu = str_arg(1, "new");
      if (!old || !neu) ctx.fail(p, what + " needs two strings");
      const Value* count = a.get(2, "count");
      return Value(replace_all(s, *old, *neu, count && is_int_like(*count) ? int_of(*count) : -1));
    }
    if (name == "find" || name == "count") {
      check_args(ctx, p, a, {"sub"}, what);
      const auto sub = str_arg(0, "sub");
      if (!sub) ctx.fail(p, what + " needs a string");
      if (name == "find") {
        const size_t hit = s.find(*sub);
        return Value(hit == std::string::npos ? int64_t(-1)
                                              : static_cast<int64_t>(decode_utf8(s.substr(0, hit)).size()));
      }
      if (sub->empty()) return Value(static_cast<int64_t>(decode_utf8(s).size()) + 1);
      int64_t n = 0;
      for (size_t pos = s.find(*sub); pos != std::string::npos; pos = s.find(*sub, pos + sub->size())) ++n;
      return Value(n);
    }
    if (name == "split" || name == "rsplit") {
      check_args(ctx, p, a, {"sep", "maxsplit"}, what);
      const auto sep = str_arg(0, "sep");
      const Value* ms = a.get(1, "maxsplit");
      const int64_t maxsplit = ms && is_int_like(*ms) ? int_of(*ms) : -1;
      List out;
      if (sep) {
        if (sep->empty()) ctx.fail(p, what + ": empty separator");
        if (name == "split") {
          size_t pos = 0;
          int64_t n = 0;
          for (;;) {
            const size_t hit = (maxsplit < 0 || n < maxsplit) ? s.find(*sep, pos) : std::string::npos;
            if (hit == std::string::npos) break;
            out.emplace_back(s.substr(pos, hit - pos));
            pos = hit + sep->size();
            ++n;
          }
          out.emplace_back(s.substr(pos));
        } else {
          size_t end = s.size();
          int64_t n = 0;
          std::vector<std::string> parts;
          for (;;) {
            if (maxsplit >= 0 && n >= maxsplit) break;
            if (end < sep->size()) break;
            const size_t hit = s.rfind(*sep, end - sep->size());
            if (hit == std::string::npos) break;
            parts.push_back(s.substr(hit + sep->size(), end - hit - sep->size()));
            end = hit;
            ++n;
          }
          parts.push_back(s.substr(0, end));
          for (auto it = parts.rbegin(); it != parts.rend(); ++it) out.emplace_back(*it);
        }
        return Value(std::move(out));
      }
      // Whitespace splitting: runs of whitespace, no empty strings.
      const std::u32string u = decode_utf8(s);
      if (name == "rsplit") {
        std::vector<std::u32string> parts;
        size_t e = u.size();
        int64_t n = 0;
        for (;;) {
          while (e > 0 && is_space(u[e - 1])) --e;
          if (e == 0) break;
          if (maxsplit >= 0 && n >= maxsplit) {
            parts.push_back(u.substr(0, e));
            break;
          }
          size_t b = e;
          while (b > 0 && !is_space(u[b - 1])) --b;
          parts.push_back(u.substr(b, e - b));
          e = b;
          ++n;
        }
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) out.emplace_back(encode_utf8(*it));
        return Value(std::move(out));
      }
      size_t i = 0;
      int64_t n = 0;
      for (;;) {
        while (i < u.size() && is_space(u[i])) ++i;
        if (i >= u.size()) break;
        if (maxsplit >= 0 && n >= maxsplit) {
          size_t e = u.size();
          while (e > i && is_space(u[e - 1])) --e;
          out.emplace_back(encode_utf8(u.substr(i, e - i)));
          break;
        }
        size_t j = i;
        while (j < u.size() && !is_space(u[j])) ++j;
        out.emplace_back(encode_utf8(u.substr(i, j - i)));
        i = j;
        ++n;
      }
      return Value(std::move(out));
    }
    if (name == "join") {
      check_args(ctx, p, a, {"iterable"}, what);
      const Value* x = a.get(0, "iterable");
      if (!x) ctx.fail(p, what + " needs an iterable");
      std::string out;
      bool first = true;
      for (const Value& item : iterate(ctx, p, *x)) {
        if (!first) out += s;
        first = false;
        out += require_string(ctx, p, item, what);
      }
      return Value(std::move(out));
    }
    if (name == "isdigit" || name == "isspace" || name == "isalpha") {
      const std::u32string u = decode_utf8(s);
      if (u.empty()) return Value(false);
      return Value(std::all_of(u.begin(), u.end(), [&](char32_t c) {
        if (name == "isspace") return is_space(c);
        const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        if (name == "isdigit") return cat == UTF8PROC_CATEGORY_ND;
        return cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
      }));
    }
    return std::nullopt;
  }
  if (obj.type() == Value::Type::dict && !obj.is_namespace()) {
    if (name == "items" || name == "keys" || name == "values") {
      check_args(ctx, p, a, {}, what);
      List out;
      for (const auto& [k, x] : obj.as_dict()) {
        if (name == "items") out.push_back(Value::tuple(List{Value(k), x}));
        else if (name == "keys") out.emplace_back(k);
        else out.push_back(x);
      }
      return Value(std::move(out));
    }
    if (name == "get") {
      check_args(ctx, p, a, {"key", "default"}, what);
      const Value* key = a.get(0, "key");
      if (!key) ctx.fail(p, what + " needs a key");
      const Value* hit = key->is_string() ? obj.find(key->as_string()) : nullptr;
      if (hit) return *hit;
      const Value* dflt = a.get(1, "default");
      return dflt ? *dflt : Value::none();
    }
    return std::nullopt;
  }
  if (obj.type() == Value::Type::list && (name == "append" || name == "pop" || name == "extend" || name == "insert" ||
                                          name == "remove" || name == "clear" || name == "sort" || name == "reverse")) {
    ctx.fail(p, "list." + name + "() is not allowed: the template sandbox is immutable (as transformers')");
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Expressions

struct Literal final : Expr {
  Value value;
  Value eval(Ctx&) const override { return value; }
};

struct NameRef final : Expr {
  std::string name;
  Value eval(Ctx& ctx) const override { return ctx.lookup(name); }
};

struct GetAttr final : Expr {
  ExprPtr obj;
  std::string attr;
  Value eval(Ctx& ctx) const override {
    const Value o = obj->eval(ctx);
    if (o.is_none()) return Value::undefined(attr);
    return get_member(ctx, pos, o, Value(attr), attr);
  }
};

struct GetItem final : Expr {
  ExprPtr obj, key;
  Value eval(Ctx& ctx) const override {
    const Value o = obj->eval(ctx);
    const Value k = key->eval(ctx);
    if (o.is_none()) ctx.fail(pos, "'NoneType' object is not subscriptable");
    return get_member(ctx, pos, o, k, k.str());
  }
};

struct SliceExpr final : Expr {
  ExprPtr obj, start, stop, step;  // each may be null
  Value eval(Ctx& ctx) const override {
    const Value o = obj->eval(ctx);
    auto ev = [&](const ExprPtr& e) { return e ? e->eval(ctx) : Value::none(); };
    return slice(ctx, pos, o, ev(start), ev(stop), ev(step));
  }
};

struct Call final : Expr {
  ExprPtr callee;
  CallArgs args;
  Value eval(Ctx& ctx) const override {
    if (const auto* attr = dynamic_cast<const GetAttr*>(callee.get())) {
      const Value o = attr->obj->eval(ctx);
      const EvalArgs a = eval_args(ctx, args);
      if (o.is_undefined()) fail_undefined(ctx, pos, o);
      if (auto r = call_method(ctx, pos, o, attr->attr, a)) return *r;
      const Value f = o.is_none() ? Value::undefined(attr->attr) : get_member(ctx, pos, o, Value(attr->attr), attr->attr);
      if (f.is_undefined()) ctx.fail(pos, std::string("'") + type_name(o) + "' object has no method '" + attr->attr + "'");
      return call_function(ctx, pos, f, a);
    }
    const Value f = callee->eval(ctx);
    return call_function(ctx, pos, f, eval_args(ctx, args));
  }
};

struct FilterExpr final : Expr {
  ExprPtr obj;
  std::string name;
  CallArgs args;
  Value eval(Ctx& ctx) const override { return apply_filter(ctx, pos, name, obj->eval(ctx), eval_args(ctx, args)); }
};

struct TestExpr final : Expr {
  ExprPtr obj;
  std::string name;
  CallArgs args;
  bool negate = false;
  Value eval(Ctx& ctx) const override {
    return Value(apply_test(ctx, pos, name, obj->eval(ctx), eval_args(ctx, args)) != negate);
  }
};

struct Unary final : Expr {
  char op = '-';
  ExprPtr x;
  Value eval(Ctx& ctx) const override {
    const Value v = x->eval(ctx);
    if (op == '!') return Value(!v.truthy());
    if (v.is_undefined()) fail_undefined(ctx, pos, v);
    if (is_int_like(v)) return Value(op == '-' ? -int_of(v) : int_of(v));
    const double d = to_double(ctx, pos, v);
    return Value(op == '-' ? -d : d);
  }
};

struct Binary final : Expr {
  std::string op;
  ExprPtr a, b;
  Value eval(Ctx& ctx) const override {
    if (op == "and") {
      Value l = a->eval(ctx);
      return l.truthy() ? b->eval(ctx) : l;
    }
    if (op == "or") {
      Value l = a->eval(ctx);
      return l.truthy() ? l : b->eval(ctx);
    }
    const Value l = a->eval(ctx), r = b->eval(ctx);
    if (op == "~") return Value(l.str() + r.str());
    return arith(ctx, pos, op, l, r);
  }
};

struct Compare final : Expr {
  ExprPtr first;
  std::vector<std::pair<std::string, ExprPtr>> rest;
  Value eval(Ctx& ctx) const override {
    Value l = first->eval(ctx);
    for (const auto& [op, e] : rest) {
      Value r = e->eval(ctx);
      bool ok = false;
      if (op == "==") ok = l == r;
      else if (op == "!=") ok = !(l == r);
      else if (op == "in") ok = contains(ctx, pos, r, l);
      else if (op == "notin") ok = !contains(ctx, pos, r, l);
      else {
        const int c = compare(ctx, pos, l, r);
        ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
      }
      if (!ok) return Value(false);
      l = std::move(r);
    }
    return Value(true);
  }
};

struct CondExpr final : Expr {
  ExprPtr test, then, otherwise;  // otherwise may be null (undefined)
  Value eval(Ctx& ctx) const override {
    if (test->eval(ctx).truthy()) return then->eval(ctx);
    return otherwise ? otherwise->eval(ctx) : Value::undefined("");
  }
};

struct ListExpr final : Expr {
  std::vector<ExprPtr> items;
  bool tuple = false;
  Value eval(Ctx& ctx) const override {
    List out;
    for (const auto& e : items) out.push_back(e->eval(ctx));
    return tuple ? Value::tuple(std::move(out)) : Value(std::move(out));
  }
};

struct DictExpr final : Expr {
  std::vector<std::pair<ExprPtr, ExprPtr>> items;
  Value eval(Ctx& ctx) const override {
    Dict out;
    for (const auto& [k, v] : items) {
      const Value key = k->eval(ctx);
      if (!key.is_string()) ctx.fail(k->pos, "dict keys must be strings here");
      Value val = v->eval(ctx);
      auto it = std::find_if(out.begin(), out.end(), [&](const auto& kv) { return kv.first == key.as_string(); });
      if (it != out.end()) it->second = std::move(val);
      else out.emplace_back(key.as_string(), std::move(val));
    }
    return Value(std::move(out));
  }
};

// ---------------------------------------------------------------------------------------------
// Statements

void exec_body(Ctx& ctx, const Body& body, Flow& flow) {
  for (const auto& n : body) {
    flow = n->exec(ctx);
    if (flow != Flow::normal) return;
  }
}

struct TextNode final : Node {
  std::string text;
  Flow exec(Ctx& ctx) const override {
    ctx.write(text, pos);
    return Flow::normal;
  }
};

struct OutputNode final : Node {
  ExprPtr expr;
  Flow exec(Ctx& ctx) const override {
    ctx.write(expr->eval(ctx).str(), pos);
    return Flow::normal;
  }
};

struct IfNode final : Node {
  std::vector<std::pair<ExprPtr, Body>> branches;  // a null test is the else branch
  Flow exec(Ctx& ctx) const override {
    for (const auto& [test, body] : branches) {
      if (!test || test->eval(ctx).truthy()) {
        Flow flow = Flow::normal;
        exec_body(ctx, body, flow);
        return flow;
      }
    }
    return Flow::normal;
  }
};

void assign(Ctx& ctx, Pos p, const std::vector<std::string>& targets, const Value& v) {
  if (targets.size() == 1) {
    ctx.set(targets[0], v);
    return;
  }
  if (v.type() != Value::Type::list && !v.is_string()) {
    ctx.fail(p, std::string("cannot unpack '") + type_name(v) + "' into " + std::to_string(targets.size()) + " names");
  }
  const List items = iterate(ctx, p, v);
  if (items.size() != targets.size()) {
    ctx.fail(p, "cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(targets.size()) + " names");
  }
  for (size_t i = 0; i < targets.size(); ++i) ctx.set(targets[i], items[i]);
}

struct ForNode final : Node {
  std::vector<std::string> targets;
  ExprPtr iter, filter;
  Body body, otherwise;
  Flow exec(Ctx& ctx) const override {
    const Value seq = iter->eval(ctx);
    List items = iterate(ctx, pos, seq);
    ctx.push_frame();
    if (filter) {
      List kept;
      for (const Value& item : items) {
        assign(ctx, pos, targets, item);
        if (filter->eval(ctx).truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const auto n = static_cast<int64_t>(items.size());
    Flow flow = Flow::normal;
    for (int64_t i = 0; i < n; ++i) {
      if (++ctx.budget->iterations > kMaxIterations) ctx.fail(pos, "the template runs more than a million loop iterations");
      // Each iteration starts from the enclosing scope, in a frame of its own (a macro defined in
      // the loop body keeps its iteration's).
      if (i > 0) ctx.frames.back() = std::make_shared<Ctx::Frame>();
      assign(ctx, pos, targets, items[static_cast<size_t>(i)]);
      Dict loop{{"index", Value(i + 1)},
                {"index0", Value(i)},
                {"revindex", Value(n - i)},
                {"revindex0", Value(n - i - 1)},
                {"first", Value(i == 0)},
                {"last", Value(i == n - 1)},
                {"length", Value(n)},
                {"depth", Value(1)},
                {"depth0", Value(0)},
                {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value::undefined("loop.previtem")},
                {"nextitem", i + 1 < n ? items[static_cast<size_t>(i + 1)] : Value::undefined("loop.nextitem")}};
      loop.emplace_back("cycle", Value::function("loop.cycle", [i](const Args& a) -> Value {
                          if (a.positional.empty()) throw ft::Error("[chat template] loop.cycle() needs arguments");
                          return a.positional[static_cast<size_t>(i) % a.positional.size()];
                        }));
      ctx.set("loop", Value(std::move(loop)));
      exec_body(ctx, body, flow);
      if (flow == Flow::break_) break;
      flow = Flow::normal;
    }
    ctx.frames.pop_back();
    if (n == 0) {
      Flow f = Flow::normal;
      exec_body(ctx, otherwise, f);
      return f;
    }
    return Flow::normal;
  }
};

struct SetNode final : Node {
  std::vector<std::string> targets;
  std::string attr;  // set ns.attr = ...: targets[0] is the namespace
  ExprPtr expr;
  Body block;  // {% set x %}...{% endset %}
  Flow exec(Ctx& ctx) const override {
    Value v;
    if (expr) {
      v = expr->eval(ctx);
    } else {
      std::string captured;
      std::string* saved = ctx.out;
      Spans* saved_gen = ctx.generation;
      ctx.out = &captured;
      ctx.generation = nullptr;
      Flow f = Flow::normal;
      exec_body(ctx, block, f);
      ctx.out = saved;
      ctx.generation = saved_gen;
      v = Value(std::move(captured));
    }
    if (!attr.empty()) {
      const Value ns = ctx.lookup(targets[0]);
      if (!ns.is_namespace()) ctx.fail(pos, "cannot assign attribute '" + attr + "' on '" + targets[0] + "': not a namespace()");
      Dict& d = ns.mutable_dict();
      auto it = std::find_if(d.begin(), d.end(), [&](const auto& kv) { return kv.first == attr; });
      if (it != d.end()) it->second = v;
      else d.emplace_back(attr, v);
      return Flow::normal;
    }
    assign(ctx, pos, targets, v);
    return Flow::normal;
  }
};

struct MacroNode final : Node {
  std::shared_ptr<MacroDef> def;
  Flow exec(Ctx& ctx) const override {
    // The macro runs in a frame of its own over the scopes it is defined in (shared, so it sees
    // them as they are when it is called), not over its caller's.
    std::shared_ptr<MacroDef> d = def;
    std::shared_ptr<Ctx::Budget> budget = ctx.budget;
    const Pos at = pos;
    auto scopes = std::make_shared<std::vector<std::shared_ptr<Ctx::Frame>>>(ctx.frames);
    for (const auto& frame : ctx.frames) {
      if (!frame->closed_over) budget->closed_over.push_back(frame);
      frame->closed_over = true;
    }
    const std::string* tmpl_name = ctx.tmpl_name;
    ctx.set(d->name, Value::function(d->name, [d, scopes, tmpl_name, budget, at](const Args& args) -> Value {
      Ctx m;
      m.tmpl_name = tmpl_name;
      m.frames = *scopes;
      m.budget = budget;
      if (budget->macro_depth >= 64) m.fail(at, "macros nest more than 64 deep");
      struct Nest {
        explicit Nest(Ctx::Budget& b) : b_(b) { ++b_.macro_depth; }
        ~Nest() { --b_.macro_depth; }
        Ctx::Budget& b_;
      } nest(*budget);
      std::string buf;
      m.out = &buf;
      m.push_frame();
      if (args.positional.size() > d->params.size()) {
        m.fail(at, "macro '" + d->name + "' takes " + std::to_string(d->params.size()) + " arguments");
      }
      const size_t first_default = d->params.size() - d->defaults.size();
      for (size_t i = 0; i < d->params.size(); ++i) {
        const std::string& pn = d->params[i];
        const Value* given = i < args.positional.size() ? &args.positional[i] : nullptr;
        for (const auto& [k, v] : args.named) {
          if (k == pn) given = &v;
        }
        if (given) m.set(pn, *given);
        else if (i >= first_default) m.set(pn, d->defaults[i - first_default]->eval(m));
        else m.set(pn, Value::undefined(pn));
      }
      for (const auto& [k, v] : args.named) {
        if (std::find(d->params.begin(), d->params.end(), k) == d->params.end()) {
          m.fail(at, "macro '" + d->name + "' has no argument '" + k + "'");
        }
      }
      Flow f = Flow::normal;
      exec_body(m, d->body, f);
      return Value(std::move(buf));
    }));
    return Flow::normal;
  }
};

struct GenerationNode final : Node {
  Body body;
  Flow exec(Ctx& ctx) const override {
    const size_t begin = ctx.out->size();
    Flow f = Flow::normal;
    exec_body(ctx, body, f);
    if (ctx.generation) ctx.generation->emplace_back(begin, ctx.out->size());
    return f;
  }
};

struct LoopControl final : Node {
  Flow flow = Flow::break_;
  Flow exec(Ctx&) const override { return flow; }
};

// ---------------------------------------------------------------------------------------------
// Parser

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::string& name) : t_(std::move(tokens)), name_(name) {}

  Body parse_template(bool& has_generation) {
    Body body = parse_body({});
    if (cur().kind != Token::eof) fail(cur().pos, "unexpected '{% " + peek_tag() + " %}'");
    has_generation = has_generation_;
    return body;
  }

 private:
  const Token& cur() const { return t_[i_]; }
  const Token& next() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }
  [[noreturn]] void fail(Pos p, const std::string& msg) const { fail_at(name_, p, msg); }
  bool is_op(std::string_view op) const { return cur().kind == Token::op && cur().value == op; }
  bool is_name(std::string_view n) const { return cur().kind == Token::name && cur().value == n; }
  void expect_op(std::string_view op) {
    if (!is_op(op)) fail(cur().pos, "expected '" + std::string(op) + "', found " + describe(cur()));
    next();
  }
  std::string expect_name() {
    if (cur().kind != Token::name) fail(cur().pos, "expected a name, found " + describe(cur()));
    return next().value;
  }
  void expect_block_end() {
    if (cur().kind != Token::block_end) fail(cur().pos, "expected the end of the tag (%}), found " + describe(cur()));
    next();
  }
  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Token::eof: return "the end of the template";
      case Token::text: return "text";
      case Token::var_begin: return "'{{'";
      case Token::var_end: return "'}}'";
      case Token::block_begin: return "'{%'";
      case Token::block_end: return "'%}'";
      case Token::string: return "a string";
      default: return "'" + t.value + "'";
    }
  }
  std::string peek_tag() const {
    return i_ + 1 < t_.size() && t_[i_ + 1].kind == Token::name ? t_[i_ + 1].value : std::string("?");
  }

  // Nodes until a {% tag %} named in `ends` (left unconsumed) or the end of the template.
  Body parse_body(std::initializer_list<std::string_view> ends) {
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.kind == Token::eof) {
        if (ends.size() != 0) fail(t.pos, "unexpected end of template: expected '{% " + std::string(*(ends.end() - 1)) + " %}'");
        return body;
      }
      if (t.kind == Token::text) {
        auto n = std::make_unique<TextNode>();
        n->pos = t.pos;
        n->text = t.value;
        body.push_back(std::move(n));
        next();
        continue;
      }
      if (t.kind == Token::var_begin) {
        auto n = std::make_unique<OutputNode>();
        n->pos = t.pos;
        next();
        n->expr = parse_tuple_expr(true);
        if (cur().kind != Token::var_end) fail(cur().pos, "expected '}}', found " + describe(cur()));
        next();
        body.push_back(std::move(n));
        continue;
      }
      if (t.kind != Token::block_begin) fail(t.pos, "unexpected " + describe(t));
      const std::string tag = peek_tag();
      if (std::find(ends.begin(), ends.end(), tag) != ends.end()) return body;
      if (ends.size() != 0 && (starts_with(tag, "end") || tag == "elif" || tag == "else")) {
        fail(t.pos, "unexpected '{% " + tag + " %}' (the open block ends with '{% " + std::string(*(ends.end() - 1)) + " %}')");
      }
      body.push_back(parse_statement());
    }
  }

  void consume_end(std::string_view tag) {
    next();  // {%
    const Token& n = cur();
    if (!(n.kind == Token::name && n.value == tag)) fail(n.pos, "expected '{% " + std::string(tag) + " %}'");
    next();
    expect_block_end();
  }

  NodePtr parse_statement() {
    Depth d(*this);  // blocks nest as deep as expressions may
    const Pos at = cur().pos;
    next();  // {%
    if (cur().kind != Token::name) fail(cur().pos, "expected a tag name, found " + describe(cur()));
    const std::string tag = next().value;
    if (tag == "if") {
      auto n = std::make_unique<IfNode>();
      n->pos = at;
      ExprPtr test = parse_expression(true);
      expect_block_end();
      for (;;) {
        Body b = parse_body({"elif", "else", "endif"});
        n->branches.emplace_back(std::move(test), std::move(b));
        next();  // {%
        const std::string which = next().value;
        if (which == "endif") {
          expect_block_end();
          break;
        }
        if (which == "else") {
          expect_block_end();
          Body e = parse_body({"endif"});
          n->branches.emplace_back(nullptr, std::move(e));
          consume_end("endif");
          break;
        }
        test = parse_expression(true);
        expect_block_end();
      }
      return n;
    }
    if (tag == "for") {
      auto n = std::make_unique<ForNode>();
      n->pos = at;
      n->targets.push_back(expect_name());
      while (is_op(",")) {
        next();
        n->targets.push_back(expect_name());
      }
      if (!is_name("in")) fail(cur().pos, "expected 'in' in the for tag");
      next();
      n->iter = parse_tuple_expr(false);
      if (is_name("if")) {
        next();
        n->filter = parse_expression(true);
      }
      if (is_name("recursive")) fail(cur().pos, "recursive loops are not supported");
      expect_block_end();
      ++loop_depth_;
      n->body = parse_body({"else", "endfor"});
      --loop_depth_;
      next();
      const std::string which = next().value;
      expect_block_end();
      if (which == "else") {
        n->otherwise = parse_body({"endfor"});
        consume_end("endfor");
      }
      return n;
    }
    if (tag == "set") {
      auto n = std::make_unique<SetNode>();
      n->pos = at;
      n->targets.push_back(expect_name());
      if (is_op(".")) {
        next();
        n->attr = expect_name();
      } else {
        while (is_op(",")) {
          next();
          n->targets.push_back(expect_name());
        }
      }
      if (is_op("=")) {
        next();
        n->expr = parse_tuple_expr(true);
        expect_block_end();
        return n;
      }
      if (n->targets.size() != 1 || !n->attr.empty()) fail(cur().pos, "a block set takes one name");
      if (is_op("|")) fail(cur().pos, "filtered block sets are not supported");
      expect_block_end();
      n->block = parse_body({"endset"});
      consume_end("endset");
      return n;
    }
    if (tag == "macro") {
      auto n = std::make_unique<MacroNode>();
      n->pos = at;
      n->def = std::make_shared<MacroDef>();
      n->def->name = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        n->def->params.push_back(expect_name());
        if (is_op("=")) {
          next();
          n->def->defaults.push_back(parse_expression(true));
        } else if (!n->def->defaults.empty()) {
          fail(cur().pos, "a macro argument without a default follows one with a default");
        }
        if (!is_op(",")) break;
        next();
      }
      expect_op(")");
      expect_block_end();
      const int saved = loop_depth_;
      loop_depth_ = 0;
      n->def->body = parse_body({"endmacro"});
      loop_depth_ = saved;
      consume_end("endmacro");
      return n;
    }
    if (tag == "generation") {
      auto n = std::make_unique<GenerationNode>();
      n->pos = at;
      has_generation_ = true;
      expect_block_end();
      n->body = parse_body({"endgeneration"});
      consume_end("endgeneration");
      return n;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) fail(at, "'" + tag + "' outside a loop");
      auto n = std::make_unique<LoopControl>();
      n->pos = at;
      n->flow = tag == "break" ? Flow::break_ : Flow::continue_;
      expect_block_end();
      return n;
    }
    static const char* const unsupported[] = {"include", "import", "from", "extends", "block", "call",
                                              "filter", "raw", "with", "autoescape", "do"};
    for (const char* u : unsupported) {
      if (tag == u) fail(at, "the '" + tag + "' tag is not supported in chat templates");
    }
    if (starts_with(tag, "end") || tag == "elif" || tag == "else") fail(at, "unexpected '{% " + tag + " %}'");
    fail(at, "unknown tag '" + tag + "'");
  }

  // Expressions --------------------------------------------------------------------------

  struct Depth {
    explicit Depth(Parser& p) : p_(p) {
      if (++p_.depth_ > 256) p_.fail(p_.cur().pos, "expressions and blocks nested more than 256 deep");
    }
    ~Depth() { --p_.depth_; }
    Parser& p_;
  };

  template <typename T>
  std::unique_ptr<T> make(Pos at) {
    auto n = std::make_unique<T>();
    n->pos = at;
    return n;
  }

  // `a, b` without brackets is a tuple (a list here), as Jinja parses {{ }} and set values.
  ExprPtr parse_tuple_expr(bool condexpr) {
    const Pos at = cur().pos;
    ExprPtr first = parse_expression(condexpr);
    if (!is_op(",")) return first;
    auto list = make<ListExpr>(at);
    list->tuple = true;
    list->items.push_back(std::move(first));
    while (is_op(",")) {
      next();
      if (cur().kind == Token::block_end || cur().kind == Token::var_end || is_op(")")) break;
      list->items.push_back(parse_expression(condexpr));
    }
    return list;
  }

  ExprPtr parse_expression(bool condexpr) {
    Depth d(*this);
    const Pos at = cur().pos;
    ExprPtr e = parse_or();
    while (condexpr && is_name("if")) {
      next();
      auto c = make<CondExpr>(at);
      c->then = std::move(e);
      c->test = parse_or();
      if (is_name("else")) {
        next();
        c->otherwise = parse_expression(true);
      }
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(std::string op, ExprPtr a, ExprPtr b, Pos at) {
    auto n = make<Binary>(at);
    n->op = std::move(op);
    n->a = std::move(a);
    n->b = std::move(b);
    return n;
  }

  // One left-associative level of binary operators: operands from `operand`, joined by `ops` (the
  // names "or" and "and", or operator tokens).
  ExprPtr left_assoc(std::initializer_list<std::string_view> ops, ExprPtr (Parser::*operand)()) {
    ExprPtr e = (this->*operand)();
    for (int n = 1;; ++n) {
      const Token& t = cur();
      if ((t.kind != Token::op && t.kind != Token::name) || std::find(ops.begin(), ops.end(), t.value) == ops.end()) {
        return e;
      }
      // The tree is evaluated (and freed) recursively: its depth stays bounded.
      if (n >= 10000) fail(t.pos, "more than 10000 operands in a row");
      next();
      e = binary(t.value, std::move(e), (this->*operand)(), t.pos);
    }
  }
  ExprPtr parse_or() { return left_assoc({"or"}, &Parser::parse_and); }
  ExprPtr parse_and() { return left_assoc({"and"}, &Parser::parse_not); }
  ExprPtr parse_not() {
    if (is_name("not")) {
      Depth d(*this);
      auto n = make<Unary>(next().pos);
      n->op = '!';
      n->x = parse_not();
      return n;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const Pos at = cur().pos;
    ExprPtr e = parse_math1();
    std::unique_ptr<Compare> c;
    for (;;) {
      std::string op;
      if (cur().kind == Token::op &&
          (cur().value == "==" || cur().value == "!=" || cur().value == "<" || cur().value == "<=" ||
           cur().value == ">" || cur().value == ">=")) {
        op = next().value;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && i_ + 1 < t_.size() && t_[i_ + 1].kind == Token::name && t_[i_ + 1].value == "in") {
        next();
        next();
        op = "notin";
      } else {
        break;
      }
      if (!c) {
        c = make<Compare>(at);
        c->first = std::move(e);
      }
      c->rest.emplace_back(op, parse_math1());
    }
    if (c) return c;
    return e;
  }
  ExprPtr parse_math1() { return left_assoc({"+", "-"}, &Parser::parse_concat); }
  ExprPtr parse_concat() { return left_assoc({"~"}, &Parser::parse_math2); }
  ExprPtr parse_math2() { return left_assoc({"*", "/", "//", "%"}, &Parser::parse_pow); }
  ExprPtr parse_pow() { return left_assoc({"**"}, &Parser::parse_unary_filtered); }
  ExprPtr parse_unary_filtered() { return parse_unary(true); }
  ExprPtr parse_unary(bool with_filter) {
    Depth d(*this);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      auto n = make<Unary>(cur().pos);
      n->op = next().value[0];
      n->x = parse_unary(false);
      e = std::move(n);
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filters(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    const Pos at = t.pos;
    switch (t.kind) {
      case Token::name: {
        const std::string n = next().value;
        if (n == "true" || n == "True" || n == "false" || n == "False") {
          auto l = make<Literal>(at);
          l->value = Value(n == "true" || n == "True");
          return l;
        }
        if (n == "none" || n == "None") {
          auto l = make<Literal>(at);
          l->value = Value::none();
          return l;
        }
        auto r = make<NameRef>(at);
        r->name = n;
        return r;
      }
      case Token::string: {
        std::string s = next().value;
        while (cur().kind == Token::string) s += next().value;  // adjacent literals join
        auto l = make<Literal>(at);
        l->value = Value(std::move(s));
        return l;
      }
      case Token::integer: {
        const std::string s = next().value;
        int64_t v = 0;
        const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
        if (r.ec != std::errc()) fail(at, "integer literal out of range");
        auto l = make<Literal>(at);
        l->value = Value(v);
        return l;
      }
      case Token::number: {
        auto l = make<Literal>(at);
        l->value = Value(std::strtod(next().value.c_str(), nullptr));
        return l;
      }
      case Token::op:
        if (t.value == "(") {
          next();
          if (is_op(")")) {
            next();
            auto empty = make<ListExpr>(at);
            empty->tuple = true;
            return empty;
          }
          ExprPtr e = parse_tuple_expr(true);
          expect_op(")");
          return e;
        }
        if (t.value == "[") {
          next();
          auto l = make<ListExpr>(at);
          while (!is_op("]")) {
            l->items.push_back(parse_expression(true));
            if (!is_op(",")) break;
            next();
          }
          expect_op("]");
          return l;
        }
        if (t.value == "{") {
          next();
          auto dct = make<DictExpr>(at);
          while (!is_op("}")) {
            ExprPtr k = parse_expression(true);
            expect_op(":");
            dct->items.emplace_back(std::move(k), parse_expression(true));
            if (!is_op(",")) break;
            next();
          }
          expect_op("}");
          return dct;
        }
        break;
      default:
        break;
    }
    fail(at, "unexpected " + describe(t) + " in an expression");
  }

  CallArgs parse_call_args() {
    expect_op("(");
    CallArgs args;
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail(cur().pos, "*args and **kwargs are not supported");
      if (cur().kind == Token::name && i_ + 1 < t_.size() && t_[i_ + 1].kind == Token::op && t_[i_ + 1].value == "=") {
        std::string key = next().value;
        next();
        args.named.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!args.named.empty()) fail(cur().pos, "a positional argument follows a keyword argument");
        args.positional.push_back(parse_expression(true));
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
    return args;
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto c = make<Call>(cur().pos);
    c->callee = std::move(callee);
    c->args = parse_call_args();
    return c;
  }

  ExprPtr parse_postfix(ExprPtr e) {
    for (;;) {
      if (is_op(".")) {
        const Pos at = next().pos;
        auto g = make<GetAttr>(at);
        g->obj = std::move(e);
        if (cur().kind == Token::integer) {
          auto gi = make<GetItem>(at);
          gi->obj = std::move(g->obj);
          auto l = make<Literal>(at);
          l->value = Value(static_cast<int64_t>(std::stoll(next().value)));
          gi->key = std::move(l);
          e = std::move(gi);
          continue;
        }
        g->attr = expect_name();
        e = std::move(g);
      } else if (is_op("[")) {
        const Pos at = next().pos;
        ExprPtr parts[3];
        int colons = 0;
        for (;;) {
          if (is_op(":")) {
            if (++colons > 2) fail(cur().pos, "too many ':' in a slice");
            next();
            continue;
          }
          if (is_op("]")) break;
          if (parts[colons]) fail(cur().pos, "expected ']' or ':'");
          parts[colons] = parse_expression(true);
        }
        next();
        if (colons == 0) {
          if (!parts[0]) fail(at, "empty subscript");
          auto gi = make<GetItem>(at);
          gi->obj = std::move(e);
          gi->key = std::move(parts[0]);
          e = std::move(gi);
        } else {
          auto s = make<SliceExpr>(at);
          s->obj = std::move(e);
          s->start = std::move(parts[0]);
          s->stop = std::move(parts[1]);
          s->step = std::move(parts[2]);
          e = std::move(s);
        }
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_filters(ExprPtr e) {
    for (;;) {
      if (is_op("|")) {
        const Pos at = next().pos;
        auto f = make<FilterExpr>(at);
        f->obj = std::move(e);
        f->name = expect_name();
        while (is_op(".")) {
          next();
          f->name += "." + expect_name();
        }
        if (!known(kFilters, f->name)) fail(at, "unknown filter '" + f->name + "'");
        if (is_op("(")) f->args = parse_call_args();
        e = std::move(f);
      } else if (is_name("is")) {
        const Pos at = next().pos;
        auto t = make<TestExpr>(at);
        t->obj = std::move(e);
        if (is_name("not")) {
          next();
          t->negate = true;
        }
        if (cur().kind == Token::name) {
          t->name = next().value;
        } else if (cur().kind == Token::op && (cur().value == "==" || cur().value == "!=" || cur().value == "<" ||
                                               cur().value == ">" || cur().value == "<=" || cur().value == ">=")) {
          t->name = next().value;
        } else {
          fail(cur().pos, "expected a test name after 'is'");
        }
        if (!known(kTests, t->name)) fail(at, "unknown test '" + t->name + "'");
        if (is_op("(")) {
          t->args = parse_call_args();
        } else if ((cur().kind == Token::name || cur().kind == Token::string || cur().kind == Token::integer ||
                    cur().kind == Token::number || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("if") && !is_name("is") &&
                   !is_name("in") && !is_name("not")) {
          t->args.positional.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  const std::string& name_;
  int depth_ = 0;
  int loop_depth_ = 0;
  bool has_generation_ = false;
};

// ---------------------------------------------------------------------------------------------
// Globals

Value make_range(const Args& a) {
  std::vector<int64_t> v;
  for (const Value& x : a.positional) {
    if (!is_int_like(x)) throw ft::Error("range() needs integers");
    v.push_back(int_of(x));
  }
  if (v.empty() || v.size() > 3) throw ft::Error("range() takes 1 to 3 integers");
  const int64_t start = v.size() == 1 ? 0 : v[0], stop = v.size() == 1 ? v[0] : v[1], step = v.size() == 3 ? v[2] : 1;
  if (step == 0) throw ft::Error("range() step must not be zero");
  List out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
    if (static_cast<int64_t>(out.size()) >= kMaxRange) throw ft::Error("range() is limited to 100000 items");
    out.emplace_back(i);
  }
  return Value(std::move(out));
}

std::string strftime_now(const std::string& format) {
  // SOURCE_DATE_EPOCH, the reproducible-builds convention, pins "now" for reproducible token stores.
  std::time_t now = std::time(nullptr);
  bool utc = false;
  if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH"); epoch && *epoch) {
    now = static_cast<std::time_t>(std::strtoll(epoch, nullptr, 10));
    utc = true;
  }
  std::tm tm{};
  if (utc) gmtime_r(&now, &tm);
  else localtime_r(&now, &tm);
  char buf[512];
  const size_t n = std::strftime(buf, sizeof buf, format.c_str(), &tm);
  return std::string(buf, n);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Template

struct Template::Impl {
  std::string name;
  Body body;
  bool has_generation = false;
};

Template::Template(std::string_view source, std::string name) : impl_(std::make_unique<Impl>()) {
  impl_->name = std::move(name);
  Lexer lexer(source, impl_->name);
  Parser parser(lexer.run(), impl_->name);
  impl_->body = parser.parse_template(impl_->has_generation);
}

Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;
Template::~Template() = default;

const std::string& Template::name() const { return impl_->name; }
bool Template::has_generation() const { return impl_->has_generation; }

std::string Template::render(const Dict& variables, Spans* generation) const {
  std::string out;
  Ctx ctx;
  ctx.tmpl_name = &impl_->name;
  ctx.out = &out;
  ctx.generation = generation;
  ctx.budget = std::make_shared<Ctx::Budget>();
  if (generation) generation->clear();
  ctx.push_frame();
  auto& globals = ctx.frames.back()->vars;
  globals["range"] = Value::function("range", make_range);
  // Namespaces are the one mutable value, so the one way to make a reference cycle (a macro stored
  // in a namespace that its frames hold). Emptying them after the render breaks every such cycle.
  auto namespaces = std::make_shared<List>();
  struct EmptyNamespaces {
    ~EmptyNamespaces() {
      for (const Value& ns : *list) ns.mutable_dict().clear();
    }
    std::shared_ptr<List> list;
  } empty_namespaces{namespaces};
  globals["namespace"] = Value::function("namespace", [weak = std::weak_ptr<List>(namespaces)](const Args& a) {
    Dict d;
    for (const Value& x : a.positional) {
      if (x.type() != Value::Type::dict) throw ft::Error("namespace() takes a dict or keyword arguments");
      for (const auto& kv : x.as_dict()) d.push_back(kv);
    }
    for (const auto& kv : a.named) d.push_back(kv);
    Value ns = Value::namespace_(std::move(d));
    if (auto list = weak.lock()) list->push_back(ns);
    return ns;
  });
  globals["dict"] = Value::function("dict", [](const Args& a) {
    Dict d;
    for (const Value& x : a.positional) {
      if (x.type() != Value::Type::dict) throw ft::Error("dict() takes a dict or keyword arguments");
      for (const auto& kv : x.as_dict()) d.push_back(kv);
    }
    for (const auto& kv : a.named) d.push_back(kv);
    return Value(std::move(d));
  });
  globals["raise_exception"] = Value::function("raise_exception", [](const Args& a) -> Value {
    throw std::runtime_error(a.positional.empty() ? std::string() : a.positional[0].str());
  });
  globals["strftime_now"] = Value::function("strftime_now", [](const Args& a) -> Value {
    if (a.positional.empty() || !a.positional[0].is_string()) throw ft::Error("strftime_now() needs a format string");
    return Value(strftime_now(a.positional[0].as_string()));
  });
  for (const auto& [k, v] : variables) globals[k] = v;
  ctx.push_frame();  // the template's top level
  struct EmptyClosedOver {
    ~EmptyClosedOver() {
      for (const auto& weak : budget->closed_over) {
        if (auto frame = weak.lock()) frame->vars.clear();
      }
    }
    std::shared_ptr<Ctx::Budget> budget;
  } empty_closed_over{ctx.budget};
  Flow f = Flow::normal;
  exec_body(ctx, impl_->body, f);
  return out;
}

}  // namespace ft::data::jinja
