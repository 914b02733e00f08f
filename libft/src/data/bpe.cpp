#include "bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <queue>
#include <unordered_map>
#include <tuple>
#include <utility>

#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::data::detail {

namespace {

using nlohmann::json;

// GPT-2's pattern, which the ByteLevel pre-tokenizer applies when use_regex is set.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// The next code point of valid UTF-8 at s[i] (advancing i); callers have checked validity.
uint32_t next_code_point(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return s[i++], b0;
  const int n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
  uint32_t cp = b0 & (0x7F >> n);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

// The length of the valid UTF-8 sequence at s[i], or, where it is invalid, minus the length of its
// maximal subpart (the bytes Unicode's "substitution of maximal subparts" replaces with one U+FFFD,
// as Rust's from_utf8_lossy does): at least 1.
int utf8_sequence(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  int n = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) n = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) n = 3, lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
  else if (b0 >= 0xF0 && b0 <= 0xF4) n = 4, lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
  else return -1;
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size()) return -k;
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return -k;
  }
  return n;
}

// Unicode's White_Space property, which Rust's char::is_whitespace (the added tokens' lstrip and
// rstrip) tests.
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

struct Regex {
  pcre2_code* code = nullptr;
  Regex() = default;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code); }
};

// Metaspace's prepend_scheme: when a "▁" goes before a stretch of text.
enum class Prepend { always, first, never };

// What a Split does with the text it matches (tokenizers' SplitDelimiterBehavior).
enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// A pre-tokenizer step, applied to every piece the previous steps made.
struct Step {
  enum Kind { SplitRegex, SplitString, Digits, ByteLevel, Metaspace } kind;
  std::unique_ptr<Regex> regex;  // SplitRegex, and ByteLevel with use_regex
  std::string literal;           // SplitString; Metaspace's replacement
  Behavior behavior = Behavior::isolated;  // SplitRegex, SplitString, Digits
  bool add_prefix_space = false; // ByteLevel
  Prepend prepend = Prepend::always;  // Metaspace
  bool split = true;                  // Metaspace: cut before each replacement
};

// A normalizer, applied in order to each stretch of text between added tokens.
struct Normalizer {
  enum Kind { NFC, Prepend, Replace } kind;
  std::string from, to;  // Prepend: `to`; Replace: every `from` becomes `to`
};

// A decoder of the chain that turns tokens back into text.
struct Decoder {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string from, to;  // Replace; Strip's content in `from`; Metaspace's replacement in `from`
  int start = 0, stop = 0;            // Strip
  Prepend prepend = Prepend::always;  // Metaspace
};

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (s.find(from) == std::string::npos) return;
  std::string out;
  out.reserve(s.size() + 16);
  size_t last = 0;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, last)) {
    out.append(s, last, at - last).append(to);
    last = at + from.size();
  }
  out.append(s, last);
  s.swap(out);
}

// Oniguruma (which the tokenizers library runs these patterns with) reads \s as Unicode's
// White_Space; PCRE2's \s with Unicode properties also matches U+180E, which White_Space has not
// included since Unicode 6.3. So \s and \S become the property itself, in or out of a class.
std::string onig_to_pcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    const char c = pattern[++i];
    if (c == 's') out += "\\p{White_Space}";
    else if (c == 'S') out += "\\P{White_Space}";
    else out += '\\', out += c;
  }
  return out;
}

std::unique_ptr<Regex> compile(std::string_view onig_pattern, const std::string& where) {
  const std::string pattern = onig_to_pcre2(onig_pattern);
  int code = 0;
  PCRE2_SIZE offset = 0;
  auto re = std::make_unique<Regex>();
  re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &code,
                           &offset, nullptr);
  if (re->code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(code, message, sizeof(message));
    FT_FAIL(where, ": the pattern does not compile (", reinterpret_cast<const char*>(message), " at offset ", offset,
            " of ", pattern, "): ", onig_pattern);
  }
  pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // an interpreter fallback where JIT is unavailable
  return re;
}

using Matches = std::vector<std::pair<size_t, size_t>>;  // [begin, end) byte ranges, in order, disjoint

// The pieces of `text` cut at `matches` (none empty) as `behavior` says, empty pieces dropped, as
// tokenizers' NormalizedString::split does: a match merged with its neighbour only where that
// neighbour is not a match itself.
void split_at(std::string_view text, const Matches& matches, Behavior behavior, std::vector<std::string>& out) {
  auto emit = [&](size_t b, size_t e) {
    if (e > b) out.emplace_back(text.substr(b, e - b));
  };
  if (behavior == Behavior::isolated || behavior == Behavior::removed) {  // no merging: straight out
    size_t last = 0;
    for (const auto& [b, e] : matches) {
      emit(last, b);
      if (behavior == Behavior::isolated) emit(b, e);
      last = e;
    }
    emit(last, text.size());
    return;
  }
  struct Interval {
    size_t b, e;
    bool match;
  };
  std::vector<Interval> all, kept;
  size_t last = 0;
  for (const auto& [b, e] : matches) {
    if (b > last) all.push_back({last, b, false});
    all.push_back({b, e, true});
    last = e;
  }
  if (last < text.size()) all.push_back({last, text.size(), false});
  bool previous_match = false;
  switch (behavior) {
    case Behavior::isolated:
    case Behavior::removed:
      break;  // above
    case Behavior::contiguous:
      for (const Interval& i : all) {
        if (i.match && !kept.empty() && kept.back().match) kept.back().e = i.e;
        else kept.push_back(i);
      }
      break;
    case Behavior::merged_with_previous:
      for (const Interval& i : all) {
        if (i.match && !previous_match && !kept.empty()) kept.back().e = i.e;
        else kept.push_back(i);
        previous_match = i.match;
      }
      break;
    case Behavior::merged_with_next:
      for (auto it = all.rbegin(); it != all.rend(); ++it) {
        if (it->match && !previous_match && !kept.empty()) kept.back().b = it->b;
        else kept.push_back(*it);
        previous_match = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const Interval& i : kept) emit(i.b, i.e);
}

Matches literal_matches(std::string_view text, std::string_view literal) {
  Matches m;
  for (size_t at = text.find(literal); at != std::string_view::npos; at = text.find(literal, at + literal.size())) {
    m.emplace_back(at, at + literal.size());
  }
  return m;
}

// Each ASCII digit, one match each (tokenizers' Digits tests char::is_ascii_digit).
Matches digit_matches(std::string_view text) {
  Matches m;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] >= '0' && text[i] <= '9') m.emplace_back(i, i + 1);
  }
  return m;
}

// The non-empty matches of `re` in `text`, leftmost first (an empty match moves on a character).
Matches regex_matches(const Regex& re, std::string_view text) {
  Matches found;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re.code, nullptr);
  FT_CHECK(md != nullptr, "[tokenizer] out of memory for a regular expression match");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start <= text.size()) {
    const int rc = pcre2_match(re.code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      pcre2_match_data_free(md);
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      FT_FAIL("[tokenizer] regular expression match failed: ", reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (e == b) {  // an empty match: look again one character further
      if (b >= text.size()) break;
      size_t i = b;
      next_code_point(text, i);
      start = i;
      continue;
    }
    found.emplace_back(b, e);
    start = e;
  }
  pcre2_match_data_free(md);
  return found;
}

const json* member(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

bool flag(const json& j, const char* key, bool fallback, const std::string& where) {
  const json* v = member(j, key);
  if (v == nullptr) return fallback;
  FT_CHECK(v->is_boolean(), where, ": '", key, "' must be true or false, not ", v->dump());
  return v->get<bool>();
}

std::string string_of(const json& j, const char* key, const std::string& where) {
  const json* v = member(j, key);
  FT_CHECK(v != nullptr && v->is_string(), where, ": '", key, "' must be a string");
  return v->get<std::string>();
}

// One Unicode character (as the tokenizers library's char-typed settings need), or an error.
std::string one_character(const json& j, const char* key, const std::string& where) {
  const std::string s = string_of(j, key, where);
  FT_CHECK(!s.empty() && utf8_sequence(s, 0) == static_cast<int>(s.size()), where, ": '", key,
           "' must be one character, not '", s, "'");
  return s;
}

// Metaspace's prepend_scheme, or the older add_prefix_space (true: always, false: never).
Prepend prepend_scheme(const json& j, const std::string& where) {
  if (const json* v = member(j, "prepend_scheme")) {
    FT_CHECK(v->is_string(), where, ": prepend_scheme must be a string");
    const std::string s = v->get<std::string>();
    if (s == "always") return Prepend::always;
    if (s == "first") return Prepend::first;
    if (s == "never") return Prepend::never;
    FT_FAIL(where, ": prepend_scheme '", s, "' is not always, first or never");
  }
  return flag(j, "add_prefix_space", true, where) ? Prepend::always : Prepend::never;
}

// A Replace normalizer's or decoder's (pattern, content); only String patterns are supported.
std::pair<std::string, std::string> string_replace(const json& j, const std::string& where) {
  const json* pattern = member(j, "pattern");
  FT_CHECK(pattern != nullptr && pattern->is_object() && member(*pattern, "String") != nullptr, where,
           ": only a Replace of a String pattern is supported, not ", j.dump());
  std::string from = string_of(*pattern, "String", where + ": Replace");
  FT_CHECK(!from.empty(), where, ": a Replace of the empty string");
  return {std::move(from), string_of(j, "content", where + ": Replace")};
}

// The vocabulary's spelling of a byte-fallback token: "<0x0A>".
std::string byte_token(int b) {
  char name[8];
  std::snprintf(name, sizeof(name), "<0x%02X>", b);
  return name;
}

}  // namespace

struct JsonBpe::Impl {
  std::string path;
  std::unordered_map<std::string, int32_t> vocab;  // the model's, byte-level spellings
  std::vector<std::string> tokens;                  // by id (model and added); empty where no token
  std::vector<bool> assigned;
  std::vector<AddedToken> added;
  std::unordered_map<std::string, size_t> added_by_content;
  std::array<std::vector<size_t>, 256> added_by_first_byte;  // indices into `added`, longest first
  // (left id << 32 | right id) → (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  bool ignore_merges = false;
  int32_t unk = -1;
  bool fuse_unk = false;
  bool byte_fallback = false;
  std::array<int32_t, 256> byte_ids{};  // <0xNN> → id, with byte_fallback
  std::vector<Normalizer> normalizers;
  bool byte_level = false;  // the pre-tokenizer ends with ByteLevel
  std::vector<Step> steps;
  std::vector<Decoder> decoders;  // empty: tokens joined with spaces, as tokenizers does without one
  std::array<std::string, 256> byte_chars;         // byte → its stand-in's UTF-8
  std::unordered_map<uint32_t, unsigned char> char_bytes;  // stand-in code point → byte
  std::vector<int32_t> prefix, suffix;
  // Encoded words (byte-level spellings → ids); bounded, shared by threads.
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void byte_alphabet() {
    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes for
    // U+0100 onwards, in byte order.
    int next = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : 256 + next++;
      utf8proc_uint8_t utf8[4];
      const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), utf8);
      byte_chars[b].assign(reinterpret_cast<const char*>(utf8), static_cast<size_t>(n));
      char_bytes[cp] = static_cast<unsigned char>(b);
    }
  }

  void set_token(int32_t id, const std::string& token, const std::string& where) {
    FT_CHECK(id >= 0 && id < (1 << 30), where, ": token id ", id, " out of range");
    if (static_cast<size_t>(id) >= tokens.size()) tokens.resize(id + 1), assigned.resize(id + 1, false);
    FT_CHECK(!assigned[id] || tokens[id] == token, where, ": id ", id, " is both '", tokens[id], "' and '", token, "'");
    tokens[id] = token;
    assigned[id] = true;
  }

  void parse_model(const json& m) {
    const std::string where = "[tokenizer] " + path + ": model";
    FT_CHECK(m.is_object(), where, " must be an object");
    const std::string type = m.value("type", "BPE");
    FT_CHECK(type == "BPE", where, ": type '", type, "' is not supported (only BPE)");
    FT_CHECK(member(m, "dropout") == nullptr, where, ": BPE dropout is not supported (it makes encoding random)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const json* v = member(m, key);
      FT_CHECK(v == nullptr || (v->is_string() && v->get<std::string>().empty()), where, ": ", key,
               " is not supported in a byte-level BPE");
    }
    byte_fallback = flag(m, "byte_fallback", false, where);
    ignore_merges = flag(m, "ignore_merges", false, where);
    fuse_unk = flag(m, "fuse_unk", false, where);
    const json* v = member(m, "vocab");
    FT_CHECK(v != nullptr && v->is_object() && !v->empty(), where, ": 'vocab' must be a non-empty object");
    vocab.reserve(v->size());
    for (const auto& [token, id] : v->items()) {
      FT_CHECK(id.is_number_integer(), where, ": the id of '", token, "' must be an integer");
      set_token(id.get<int32_t>(), token, where);
      vocab.emplace(token, id.get<int32_t>());
    }
    const json* ms = member(m, "merges");
    FT_CHECK(ms != nullptr && ms->is_array(), where, ": 'merges' must be a list");
    merges.reserve(ms->size());
    int32_t rank = 0;
    for (const auto& entry : *ms) {
      std::string a, b;
      if (entry.is_string()) {  // "a b", as tokenizers wrote before 0.20
        const std::string s = entry.get<std::string>();
        const size_t space = s.find(' ');
        FT_CHECK(space != std::string::npos && space > 0 && space + 1 < s.size(), where, ": merge ", rank, " '", s,
                 "' is not two tokens separated by a space");
        a = s.substr(0, space), b = s.substr(space + 1);
      } else {
        FT_CHECK(entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string(), where,
                 ": merge ", rank, " must be \"a b\" or [\"a\", \"b\"], not ", entry.dump());
        a = entry[0].get<std::string>(), b = entry[1].get<std::string>();
      }
      auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
      FT_CHECK(ia != vocab.end() && ib != vocab.end(), where, ": merge ", rank, " names '",
               ia == vocab.end() ? a : b, "', which is not in the vocabulary");
      FT_CHECK(iab != vocab.end(), where, ": merge ", rank, " makes '", a + b, "', which is not in the vocabulary");
      const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
      merges.emplace(key, std::make_pair(rank, iab->second));  // the first (lowest) rank wins, as in tokenizers
      ++rank;
    }
    if (const json* u = member(m, "unk_token")) {
      FT_CHECK(u->is_string(), where, ": unk_token must be a string");
      auto it = vocab.find(u->get<std::string>());
      FT_CHECK(it != vocab.end(), where, ": unk_token '", u->get<std::string>(), "' is not in the vocabulary");
      unk = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      auto it = vocab.find(byte_token(b));
      byte_ids[b] = it == vocab.end() ? -1 : it->second;
    }
  }

  // tokenizers drops the bytes whose <0xNN> token is missing; libft asks for all 256 (sentencepiece
  // vocabularies with byte fallback have them all) rather than lose text. A byte-level vocabulary
  // spells every byte already, so its byte_fallback never comes into play.
  void check_byte_fallback(const std::string& where) const {
    if (!byte_fallback || byte_level) return;
    for (int b = 0; b < 256; ++b) {
      FT_CHECK(byte_ids[b] >= 0, where, ": byte_fallback is set but the vocabulary has no '", byte_token(b),
               "' (a sentencepiece vocabulary with byte fallback has all 256 byte tokens)");
    }
  }

  void parse_normalizer(const json& n, const std::string& where) {
    FT_CHECK(n.is_object(), where, " must be an object or null");
    const std::string type = n.value("type", "");
    if (type == "NFC") {
      normalizers.push_back({Normalizer::NFC, "", ""});
    } else if (type == "Prepend") {
      normalizers.push_back({Normalizer::Prepend, "", string_of(n, "prepend", where + ": Prepend")});
    } else if (type == "Replace") {
      auto [from, to] = string_replace(n, where);
      normalizers.push_back({Normalizer::Replace, std::move(from), std::move(to)});
    } else if (type == "Sequence") {
      const json* list = member(n, "normalizers");
      FT_CHECK(list != nullptr && list->is_array(), where, ": a Sequence needs 'normalizers'");
      for (const auto& x : *list) parse_normalizer(x, where);
    } else {
      FT_FAIL(where, ": normalizer '", type, "' is not supported (only NFC, Prepend, Replace and Sequence)");
    }
  }

  void parse_pre_tokenizer(const json& p, const std::string& where) {
    FT_CHECK(p.is_object(), where, " must be an object");
    const std::string type = p.value("type", "");
    if (type == "Sequence") {
      const json* list = member(p, "pretokenizers");
      FT_CHECK(list != nullptr && list->is_array(), where, ": a Sequence needs 'pretokenizers'");
      for (const auto& x : *list) parse_pre_tokenizer(x, where);
    } else if (type == "Split") {
      const std::string behavior = p.value("behavior", "");
      FT_CHECK(!flag(p, "invert", false, where), where, ": an inverted Split is not supported");
      const json* pattern = member(p, "pattern");
      FT_CHECK(pattern != nullptr && pattern->is_object(), where, ": Split needs a 'pattern'");
      Step s;
      if (behavior == "Isolated") s.behavior = Behavior::isolated;
      else if (behavior == "Removed") s.behavior = Behavior::removed;
      else if (behavior == "MergedWithPrevious") s.behavior = Behavior::merged_with_previous;
      else if (behavior == "MergedWithNext") s.behavior = Behavior::merged_with_next;
      else if (behavior == "Contiguous") s.behavior = Behavior::contiguous;
      else FT_FAIL(where, ": Split behavior '", behavior, "' is not one of Isolated, Removed, MergedWithPrevious, "
                   "MergedWithNext and Contiguous");
      if (const json* re = member(*pattern, "Regex")) {
        FT_CHECK(re->is_string(), where, ": the Split pattern's Regex must be a string");
        s.kind = Step::SplitRegex;
        s.regex = compile(re->get<std::string>(), where + ": Split");
      } else {
        s.kind = Step::SplitString;
        s.literal = string_of(*pattern, "String", where + ": the Split pattern");
        FT_CHECK(!s.literal.empty(), where, ": an empty Split string");
      }
      steps.push_back(std::move(s));
    } else if (type == "Digits") {
      Step s;
      s.kind = Step::Digits;
      s.behavior = flag(p, "individual_digits", false, where) ? Behavior::isolated : Behavior::contiguous;
      steps.push_back(std::move(s));
    } else if (type == "ByteLevel") {
      Step s;
      s.kind = Step::ByteLevel;
      s.add_prefix_space = flag(p, "add_prefix_space", true, where);
      if (flag(p, "use_regex", true, where)) s.regex = compile(kGpt2Pattern, where + ": ByteLevel");
      steps.push_back(std::move(s));
    } else if (type == "Metaspace") {
      Step s;
      s.kind = Step::Metaspace;
      s.literal = one_character(p, "replacement", where + ": Metaspace");
      s.prepend = prepend_scheme(p, where + ": Metaspace");
      s.split = flag(p, "split", true, where);
      steps.push_back(std::move(s));
    } else {
      FT_FAIL(where, ": pre-tokenizer '", type,
              "' is not supported (only Split, Digits, ByteLevel, Metaspace and Sequence)");
    }
  }

  void parse_decoder(const json& d, const std::string& where) {
    FT_CHECK(d.is_object(), where, " must be an object or null");
    const std::string type = d.value("type", "");
    Decoder x{};
    if (type == "Sequence") {
      const json* list = member(d, "decoders");
      FT_CHECK(list != nullptr && list->is_array(), where, ": a Sequence needs 'decoders'");
      for (const auto& e : *list) parse_decoder(e, where);
      return;
    } else if (type == "ByteLevel") {
      x.kind = Decoder::ByteLevel;
    } else if (type == "Replace") {
      x.kind = Decoder::Replace;
      std::tie(x.from, x.to) = string_replace(d, where);
    } else if (type == "ByteFallback") {
      x.kind = Decoder::ByteFallback;
    } else if (type == "Fuse") {
      x.kind = Decoder::Fuse;
    } else if (type == "Strip") {
      x.kind = Decoder::Strip;
      x.from = one_character(d, "content", where + ": Strip");
      for (auto [key, out] : {std::pair{"start", &x.start}, std::pair{"stop", &x.stop}}) {
        const json* v = member(d, key);
        FT_CHECK(v != nullptr && v->is_number_unsigned(), where, ": Strip's '", key, "' must be a count");
        *out = static_cast<int>(std::min<uint64_t>(v->get<uint64_t>(), 1u << 20));
      }
    } else if (type == "Metaspace") {
      x.kind = Decoder::Metaspace;
      x.from = one_character(d, "replacement", where + ": Metaspace");
      x.prepend = prepend_scheme(d, where + ": Metaspace");
    } else {
      FT_FAIL(where, ": decoder '", type,
              "' is not supported (only ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace and Sequence)");
    }
    decoders.push_back(std::move(x));
  }

  // The ids the post-processor's template puts around a single sequence.
  void parse_post_processor(const json& p, const std::string& where) {
    FT_CHECK(p.is_object(), where, " must be an object or null");
    const std::string type = p.value("type", "");
    if (type == "ByteLevel") return;  // offsets only
    if (type == "Sequence") {
      const json* list = member(p, "processors");
      FT_CHECK(list != nullptr && list->is_array(), where, ": a Sequence needs 'processors'");
      for (const auto& x : *list) parse_post_processor(x, where);
      return;
    }
    FT_CHECK(type == "TemplateProcessing", where, ": post-processor '", type,
             "' is not supported (only TemplateProcessing, ByteLevel and Sequence)");
    FT_CHECK(prefix.empty() && suffix.empty(), where, ": more than one TemplateProcessing");
    const json* single = member(p, "single");
    const json* specials = member(p, "special_tokens");
    FT_CHECK(single != nullptr && single->is_array(), where, ": TemplateProcessing needs 'single'");
    bool seen_sequence = false;
    for (const auto& piece : *single) {
      if (piece.contains("Sequence")) {
        FT_CHECK(!seen_sequence, where, ": a single-sequence template with two sequences");
        seen_sequence = true;
        continue;
      }
      FT_CHECK(piece.contains("SpecialToken") && piece["SpecialToken"].contains("id"), where,
               ": template piece ", piece.dump(), " is neither a SpecialToken nor the Sequence");
      const std::string name = piece["SpecialToken"]["id"].get<std::string>();
      FT_CHECK(specials != nullptr && specials->contains(name) && (*specials)[name].contains("ids"), where,
               ": the template's special token '", name, "' is not in its special_tokens");
      for (const auto& id : (*specials)[name]["ids"]) {
        FT_CHECK(id.is_number_integer(), where, ": the ids of '", name, "' must be integers");
        (seen_sequence ? suffix : prefix).push_back(id.get<int32_t>());
      }
    }
    FT_CHECK(seen_sequence, where, ": the single-sequence template has no $A");
  }

  void parse(std::string_view text) {
    const json j = parse_json_strict(text, path);
    const std::string where = "[tokenizer] " + path;
    FT_CHECK(j.is_object(), where, ": expected a JSON object");
    FT_CHECK(member(j, "truncation") == nullptr, where, ": 'truncation' is set: libft tokenizes whole documents "
             "(set it to null)");
    FT_CHECK(member(j, "padding") == nullptr, where, ": 'padding' is set: libft pads batches itself (set it to null)");
    FT_CHECK(j.contains("model"), where, ": no 'model'");
    parse_model(j["model"]);
    if (const json* n = member(j, "normalizer")) parse_normalizer(*n, where + ": normalizer");
    if (const json* p = member(j, "pre_tokenizer")) parse_pre_tokenizer(*p, where + ": pre_tokenizer");
    byte_level = !steps.empty() && steps.back().kind == Step::ByteLevel;
    for (size_t i = 0; i + 1 < steps.size(); ++i) {
      FT_CHECK(steps[i].kind != Step::ByteLevel, where, ": ByteLevel must be the pre-tokenizer's last step");
    }
    const json* decoder = member(j, "decoder");
    if (byte_level) {
      FT_CHECK(decoder != nullptr && decoder->is_object() && decoder->value("type", "") == "ByteLevel", where,
               ": the decoder must be ByteLevel, as the pre-tokenizer is, not ",
               decoder ? decoder->dump() : std::string("null"));
      for (const Step& s : steps) {
        FT_CHECK(s.kind != Step::Metaspace, where, ": a pre-tokenizer with both Metaspace and ByteLevel");
      }
    }
    check_byte_fallback(where + ": model");
    if (decoder != nullptr) parse_decoder(*decoder, where + ": decoder");
    for (const Decoder& d : decoders) {
      FT_CHECK(byte_level || d.kind != Decoder::ByteLevel, where,
               ": a ByteLevel decoder without a ByteLevel pre-tokenizer would decode other bytes than were encoded");
    }
    if (const json* p = member(j, "post_processor")) parse_post_processor(*p, where + ": post_processor");
    if (const json* list = member(j, "added_tokens")) {
      FT_CHECK(list->is_array(), where, ": 'added_tokens' must be a list");
      for (const auto& t : *list) {
        const std::string w = where + ": added token " + t.dump();
        FT_CHECK(t.is_object() && t.contains("id") && t["id"].is_number_integer(), w, ": needs an integer 'id'");
        AddedToken a;
        a.id = t["id"].get<int32_t>();
        a.content = string_of(t, "content", w);
        FT_CHECK(!a.content.empty(), w, ": empty content");
        a.special = flag(t, "special", false, w);
        a.lstrip = flag(t, "lstrip", false, w);
        a.rstrip = flag(t, "rstrip", false, w);
        FT_CHECK(!flag(t, "single_word", false, w), w, ": single_word is not supported");
        // libft finds added tokens in the text before normalising it, which gives what tokenizers
        // gives (it finds "normalized" ones in the normalised text) as long as normalising leaves
        // the token as it is and commutes with cutting it out.
        if (!normalizers.empty() && flag(t, "normalized", !a.special, w)) {
          for (const Normalizer& n : normalizers) {
            FT_CHECK(n.kind == Normalizer::NFC || !(a.lstrip || a.rstrip || n.kind == Normalizer::Prepend), w,
                     ": a normalized added token with a Prepend normalizer, or with lstrip/rstrip and a Replace "
                     "normalizer, is not supported");
          }
          FT_CHECK(normalize(a.content) == a.content, w, ": normalized, and the normalizer changes it");
        }
        set_token(a.id, a.content, w);
        if (added_by_content.emplace(a.content, added.size()).second) added.push_back(std::move(a));
      }
    }
    for (size_t i = 0; i < added.size(); ++i) {
      added_by_first_byte[static_cast<unsigned char>(added[i].content[0])].push_back(i);
    }
    for (auto& list : added_by_first_byte) {
      std::stable_sort(list.begin(), list.end(),
                       [&](size_t a, size_t b) { return added[a].content.size() > added[b].content.size(); });
    }
    for (const auto* ids : {&prefix, &suffix}) {
      for (int32_t id : *ids) {
        FT_CHECK(id >= 0 && id < static_cast<int32_t>(tokens.size()) && assigned[id], where, ": the post-processor's id ",
                 id, " is not a token");
      }
    }
  }

  std::string normalize(std::string_view text) const {
    std::string s(text);
    for (const Normalizer& n : normalizers) {
      if (s.empty()) break;
      if (n.kind == Normalizer::Prepend) {
        s.insert(0, n.to);
      } else if (n.kind == Normalizer::Replace) {
        replace_all(s, n.from, n.to);
      } else {
        utf8proc_uint8_t* out = nullptr;
        const utf8proc_ssize_t k = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                                static_cast<utf8proc_ssize_t>(s.size()), &out,
                                                static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
        FT_CHECK(k >= 0, "[tokenizer] ", path, ": NFC normalisation failed (", utf8proc_errmsg(k), ")");
        s.assign(reinterpret_cast<const char*>(out), static_cast<size_t>(k));
        std::free(out);
      }
    }
    return s;
  }

  // BPE over one pre-token (byte-level spelling).
  std::vector<int32_t> word_ids(const std::string& word) const {
    if (ignore_merges) {
      if (auto it = vocab.find(word); it != vocab.end()) return {it->second};
    }
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (auto it = cache.find(word); it != cache.end()) return it->second;
    }
    struct Symbol {
      int32_t id, prev, next;
    };
    std::vector<Symbol> sym;
    auto add = [&](int32_t id) {
      const auto n = static_cast<int32_t>(sym.size());
      sym.push_back({id, n - 1, -1});
      if (n > 0) sym[n - 1].next = n;
    };
    bool last_unk = false;  // the last symbol is an unk that a following one may fuse with
    for (size_t i = 0; i < word.size();) {
      const size_t start = i;
      next_code_point(word, i);
      const std::string_view c = std::string_view(word).substr(start, i - start);
      if (auto it = vocab.find(std::string(c)); it != vocab.end()) {
        add(it->second), last_unk = false;
      } else if (byte_fallback && std::all_of(c.begin(), c.end(), [&](char b) { return byte_ids[static_cast<unsigned char>(b)] >= 0; })) {
        for (unsigned char b : c) add(byte_ids[b]);
        last_unk = false;
      } else {
        FT_CHECK(unk >= 0, "[tokenizer] ", path, ": the character '", c,
                 "' is not in the vocabulary and there is neither byte_fallback nor an unk_token");
        if (!(fuse_unk && last_unk)) add(unk);
        last_unk = true;
      }
    }
    using Entry = std::tuple<int32_t, int32_t, int32_t, int32_t>;  // rank, position, left id, right id
    std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
    auto push = [&](int32_t pos) {
      if (pos < 0 || sym[pos].next < 0) return;
      const int32_t right = sym[pos].next;
      auto it = merges.find((static_cast<uint64_t>(sym[pos].id) << 32) | static_cast<uint32_t>(sym[right].id));
      if (it != merges.end()) heap.emplace(it->second.first, pos, sym[pos].id, sym[right].id);
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) push(i);
    std::vector<bool> dead(sym.size(), false);
    while (!heap.empty()) {
      const auto [rank, pos, left, right] = heap.top();
      heap.pop();
      if (dead[pos] || sym[pos].id != left || sym[pos].next < 0 || sym[sym[pos].next].id != right) continue;
      const int32_t r = sym[pos].next;
      sym[pos].id = merges.at((static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right)).second;
      dead[r] = true;
      sym[pos].next = sym[r].next;
      if (sym[r].next >= 0) sym[sym[r].next].prev = pos;
      push(sym[pos].prev);
      push(pos);
    }
    std::vector<int32_t> ids;
    for (int32_t i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
    if (word.size() <= 256) {  // sentencepiece-style words can be whole paragraphs
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (cache.size() > (1u << 16)) cache.clear();
      cache.emplace(word, ids);
    }
    return ids;
  }

  // One stretch of text between added tokens: normalise, pre-tokenize, BPE. `at_origin`: the
  // stretch starts the input (Metaspace's prepend_scheme "first" prepends only there).
  void encode_plain(std::string_view text, bool at_origin, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    std::vector<std::string> pieces{normalize(text)}, next;
    for (const Step& s : steps) {
      next.clear();
      for (size_t k = 0; k < pieces.size(); ++k) {
        std::string& piece = pieces[k];
        if (s.kind == Step::SplitString || s.kind == Step::SplitRegex || s.kind == Step::Digits) {
          const Matches m = s.kind == Step::SplitString ? literal_matches(piece, s.literal)
                            : s.kind == Step::Digits    ? digit_matches(piece)
                                                        : regex_matches(*s.regex, piece);
          split_at(piece, m, s.behavior, next);
          continue;
        }
        if (s.kind == Step::Metaspace) {
          replace_all(piece, " ", s.literal);
          const bool prepend = s.prepend == Prepend::always || (s.prepend == Prepend::first && at_origin && k == 0);
          if (prepend && !piece.starts_with(s.literal)) piece.insert(0, s.literal);
          if (!s.split) {
            next.push_back(std::move(piece));
            continue;
          }
          // Each replacement starts the next piece (tokenizers' MergedWithNext).
          split_at(piece, literal_matches(piece, s.literal), Behavior::merged_with_next, next);
          continue;
        }
        if (s.kind == Step::ByteLevel && s.add_prefix_space && !piece.starts_with(' ')) piece.insert(0, 1, ' ');
        if (s.regex) split_at(piece, regex_matches(*s.regex, piece), Behavior::isolated, next);
        else next.push_back(std::move(piece));
      }
      pieces.swap(next);
      at_origin = at_origin && !pieces.empty();  // only the first piece can start the input
    }
    std::string word;
    for (const std::string& piece : pieces) {
      if (piece.empty()) continue;
      if (!byte_level) {
        for (int32_t id : word_ids(piece)) out.push_back(id);
        continue;
      }
      word.clear();
      for (unsigned char b : piece) word += byte_chars[b];
      for (int32_t id : word_ids(word)) out.push_back(id);
    }
  }

  // The added token matching at text[i], leftmost-longest; nullptr if none.
  const AddedToken* added_at(std::string_view text, size_t i) const {
    for (size_t k : added_by_first_byte[static_cast<unsigned char>(text[i])]) {
      if (text.compare(i, added[k].content.size(), added[k].content) == 0) return &added[k];
    }
    return nullptr;
  }
};

JsonBpe::JsonBpe(std::string_view json_text, const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->byte_alphabet();
  impl_->parse(json_text);
}

JsonBpe::~JsonBpe() = default;

namespace {
// `s` with each invalid UTF-8 sequence replaced by U+FFFD (Rust's from_utf8_lossy), or nullopt where
// it is valid already.
std::optional<std::string> lossy_utf8(std::string_view s) {
  std::optional<std::string> fixed;
  size_t copied = 0;
  for (size_t i = 0; i < s.size();) {
    const int n = utf8_sequence(s, i);
    if (n > 0) {
      i += static_cast<size_t>(n);
      continue;
    }
    if (!fixed) fixed.emplace().reserve(s.size() + 8);
    fixed->append(s, copied, i - copied).append("\xEF\xBF\xBD");
    i += static_cast<size_t>(-n);
    copied = i;
  }
  if (fixed) fixed->append(s, copied);
  return fixed;
}
}  // namespace

std::vector<int32_t> JsonBpe::encode(std::string_view raw) const {
  const Impl& m = *impl_;
  // Malformed UTF-8 becomes U+FFFD, as sentencepiece does (and as reading bytes into a Rust or
  // Python string for the tokenizers library would have to).
  const std::optional<std::string> fixed = lossy_utf8(raw);
  const std::string_view text = fixed ? std::string_view(*fixed) : raw;
  std::vector<int32_t> ids;
  size_t plain = 0;  // start of the text not yet encoded
  for (size_t i = 0; i < text.size();) {
    const AddedToken* t = m.added.empty() ? nullptr : m.added_at(text, i);
    if (t == nullptr) {
      ++i;
      continue;
    }
    size_t end_plain = i, resume = i + t->content.size();
    if (t->lstrip) {  // whitespace before the token belongs to it
      while (end_plain > plain) {
        size_t k = end_plain - 1;
        while (k > plain && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        size_t j = k;
        if (!is_white_space(next_code_point(text, j))) break;
        end_plain = k;
      }
    }
    if (t->rstrip) {
      while (resume < text.size()) {
        size_t j = resume;
        if (!is_white_space(next_code_point(text, j))) break;
        resume = j;
      }
    }
    m.encode_plain(text.substr(plain, end_plain - plain), plain == 0, ids);
    ids.push_back(t->id);
    plain = i = resume;
  }
  m.encode_plain(text.substr(plain), plain == 0, ids);
  return ids;
}

namespace {

// The byte a "<0xNN>" token stands for (tokenizers' ByteFallback decoder: six characters, two hex
// digits of either case), or -1.
int fallback_byte(const std::string& token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return -1;
  int value = 0;
  for (int k = 3; k < 5; ++k) {
    const char c = token[k];
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return -1;
    value = value * 16 + d;
  }
  return value;
}

}  // namespace

std::string JsonBpe::decode(std::span<const int32_t> ids, const std::vector<bool>& skip) const {
  const Impl& m = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    FT_CHECK(id >= 0 && static_cast<size_t>(id) < m.tokens.size() && m.assigned[id], "[tokenizer] ", m.path, ": id ",
             id, " is not a token of this tokenizer");
    if (static_cast<size_t>(id) < skip.size() && skip[id]) continue;
    tokens.push_back(m.tokens[id]);
  }
  if (m.decoders.empty()) {  // tokenizers without a decoder: the tokens joined by spaces
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out.append(i ? " " : "").append(tokens[i]);
    return out;
  }
  std::vector<std::string> next;
  for (const Decoder& d : m.decoders) {
    next.clear();
    switch (d.kind) {
      case Decoder::ByteLevel: {
        // A token whose characters all stand for bytes becomes those bytes; any other token (an
        // added token with a space, say) is kept as it is spelt. One string, made valid UTF-8.
        std::string bytes;
        for (const std::string& token : tokens) {
          std::string out;
          bool mapped = true;
          for (size_t i = 0; i < token.size() && mapped;) {
            auto it = m.char_bytes.find(next_code_point(token, i));
            if (it == m.char_bytes.end()) mapped = false;
            else out += static_cast<char>(it->second);
          }
          bytes += mapped ? out : token;
        }
        std::optional<std::string> fixed = lossy_utf8(bytes);
        next.push_back(fixed ? std::move(*fixed) : std::move(bytes));
        break;
      }
      case Decoder::Replace:
        for (std::string& token : tokens) replace_all(token, d.from, d.to), next.push_back(std::move(token));
        break;
      case Decoder::ByteFallback: {
        // A run of byte tokens becomes its bytes where they are valid UTF-8, else one U+FFFD per byte.
        std::string run;
        auto flush = [&] {
          if (run.empty()) return;
          if (!lossy_utf8(run)) {
            next.push_back(run);
          } else {
            for (size_t k = 0; k < run.size(); ++k) next.emplace_back("\xEF\xBF\xBD");
          }
          run.clear();
        };
        for (std::string& token : tokens) {
          const int b = fallback_byte(token);
          if (b >= 0) {
            run += static_cast<char>(b);
            continue;
          }
          flush();
          next.push_back(std::move(token));
        }
        flush();
        break;
      }
      case Decoder::Fuse: {
        std::string all;
        for (const std::string& token : tokens) all += token;
        next.push_back(std::move(all));
        break;
      }
      case Decoder::Strip:
        // Up to `start` leading and `stop` trailing copies of the character, from each token.
        for (std::string& token : tokens) {
          size_t b = 0, e = token.size();
          for (int k = 0; k < d.start && token.compare(b, d.from.size(), d.from) == 0 && b < e; ++k) b += d.from.size();
          for (int k = 0; k < d.stop && e >= b + d.from.size() && token.compare(e - d.from.size(), d.from.size(), d.from) == 0;
               ++k) {
            e -= d.from.size();
          }
          next.push_back(token.substr(b, e - b));
        }
        break;
      case Decoder::Metaspace:
        // The replacement becomes a space, except a leading one of the first token where a space was
        // prepended when encoding.
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string& token = tokens[i];
          if (i == 0 && d.prepend != Prepend::never && token.starts_with(d.from)) token.erase(0, d.from.size());
          replace_all(token, d.from, " ");
          next.push_back(std::move(token));
        }
        break;
    }
    tokens.swap(next);
  }
  std::string out;
  for (const std::string& token : tokens) out += token;
  return out;
}

bool JsonBpe::byte_level() const { return impl_->byte_level; }

int32_t JsonBpe::vocab_size() const { return static_cast<int32_t>(impl_->tokens.size()); }

int32_t JsonBpe::token_to_id(std::string_view token) const {
  const std::string key(token);
  if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end()) return impl_->added[it->second].id;
  if (auto it = impl_->vocab.find(key); it != impl_->vocab.end()) return it->second;
  return -1;
}

std::string JsonBpe::id_to_token(int32_t id) const {
  FT_CHECK(id >= 0 && static_cast<size_t>(id) < impl_->tokens.size() && impl_->assigned[id], "[tokenizer] ",
           impl_->path, ": id ", id, " is not a token of this tokenizer");
  return impl_->tokens[id];
}

const std::vector<AddedToken>& JsonBpe::added_tokens() const { return impl_->added; }
int32_t JsonBpe::unk_id() const { return impl_->unk; }
const std::vector<int32_t>& JsonBpe::template_prefix() const { return impl_->prefix; }
const std::vector<int32_t>& JsonBpe::template_suffix() const { return impl_->suffix; }

}  // namespace ft::data::detail
