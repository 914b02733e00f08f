#pragma once
// Internal: the byte-level checks and the JSON parser behind the JSONL record readers (records.cpp)
// and the fuzz target (tests/fuzz/fuzz_jsonl.cpp).
//
// libft has its own small JSON parser here instead of nlohmann-json because error messages must name
// the column of the offending value ("messages[2].role must be a string" at the value, not at the
// line start), and nlohmann reports positions only for syntax errors. Writing it also removes two
// nlohmann behaviours that would have to be worked around anyway: it stops at a NUL byte as if the
// input ended there, and it silently skips a UTF-8 BOM at the start of every parse call, i.e. of
// every line. The fuzz target checks this parser against nlohmann on every input both should agree on.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ft/data/records.h"

namespace ft::data::jsonl {

struct Member;

/// A parsed JSON value that remembers where it started, for error messages.
struct Value {
  enum class Type : uint8_t { null, boolean, number, string, array, object };
  Type type = Type::null;
  size_t offset = 0;  ///< byte offset of the value's first byte in the parsed text
  bool boolean = false;
  std::string text;             ///< string: the decoded UTF-8; number: the literal as written
  std::vector<Value> items;     ///< array elements
  std::vector<Member> members;  ///< object members in input order (keys are unique)

  const Value* find(std::string_view key) const;
};

struct Member {
  std::string key;
  size_t key_offset = 0;  ///< offset of the key's opening quote
  Value value;
};

const char* type_name(Value::Type type);

/// `v` as compact JSON text (numbers as written, object members in input order).
std::string to_json(const Value& v);

struct ParseError {
  size_t offset = 0;  ///< byte offset of the offending byte (== text.size() for a premature end)
  std::string reason;
};

/// Parses exactly one JSON value (RFC 8259) spanning `text`, surrounding whitespace allowed. Stricter
/// than the RFC where data files need it: duplicate keys, nesting deeper than `max_depth`, and the
/// \u0000 escape are errors. Bytes >= 0x80 are copied into strings unchecked, so callers validate
/// UTF-8 first (check_line_bytes). Returns false and fills `error` on bad input.
bool parse(std::string_view text, int max_depth, Value& out, ParseError& error);

/// Offset of the first byte that does not belong to a well-formed UTF-8 sequence (overlong forms,
/// surrogates and code points above U+10FFFF are ill-formed), or npos when `text` is valid.
size_t find_invalid_utf8(std::string_view text);

/// A problem found in one line, at a 0-based byte offset in the line as given.
struct LineProblem {
  size_t offset = 0;
  std::string reason;
  bool whole_line = false;  ///< about the line as a whole (offset meaningless), e.g. a blank line
};

/// The checks every input line gets before anything else looks at it: NUL bytes and UTF-8.
std::optional<LineProblem> check_line_bytes(std::string_view line);

/// What parse_jsonl_record needs from RecordOptions.
struct RecordRules {
  RecordFormat format = RecordFormat::jsonl_text;
  bool allow_unknown_fields = false;
  int max_depth = 32;
};

/// One JSONL line → `out` (origin left alone), or the first problem. Checks, in order: blank line,
/// BOM, NUL, UTF-8, JSON syntax, then the schema of `rules.format` (fields, types, emptiness, and for
/// chat the order of roles).
std::optional<LineProblem> parse_jsonl_record(std::string_view line, const RecordRules& rules, Record& out);

/// True when `s` holds only spaces, tabs, CR and LF (or nothing): such a document is "empty".
bool is_blank(std::string_view s);

}  // namespace ft::data::jsonl
