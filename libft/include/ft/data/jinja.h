#pragma once
// The Jinja2 subset that Hugging Face chat templates use (tokenizer_config.json's "chat_template", or a
// checkpoint's chat_template.jinja), rendered as transformers renders them: an immutable sandbox with
// trim_blocks and lstrip_blocks, the loopcontrols extension (break, continue), transformers' tojson
// (ensure_ascii off) and its globals raise_exception and strftime_now, and its {% generation %} block.
// Torch-free.
//
// Covered: text, {{ }}, {% %}, {# #}, whitespace control (-, +); literals (strings, ints, floats,
// booleans, none, lists, tuples, dicts); arithmetic, string concatenation (+, ~), comparisons, in,
// and/or/not, conditional expressions; attributes, subscripts and slices; if/elif/else, for (tuple
// targets, inline if, else, the loop object with cycle), set (names, tuples, namespace attributes,
// blocks), macros with defaults, break/continue, generation; the filters and tests that chat
// templates use (listed in jinja.cpp's apply_filter/apply_test) and the string and dict methods
// (strip, split, startswith, items, get, ...). Values print as Python prints them (None, True, 1.0,
// ['a', 1]). Anything else is an error naming the template, line and column.
//
// Sandbox limits: range() gives at most 100000 items (as Jinja's sandbox), loops run at most a
// million iterations in all, macros nest at most 64 deep, expressions and blocks 256 deep (with at
// most 10000 operands in a row of binary operators), and output stops at 64 MiB.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ft::data::jinja {

class Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  ///< insertion order, as Python's dict
struct Args {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> named;
};
using Function = std::function<Value(const Args&)>;

/// A template value. Lists and dicts are shared (copies are cheap); templates cannot mutate them,
/// except namespace() objects, which `set ns.attr = ...` writes through every copy.
class Value {
 public:
  enum class Type : uint8_t { undefined, none, boolean, integer, number, string, list, dict, function };

  Value() = default;  ///< undefined
  static Value none();
  Value(bool b);  // NOLINT(google-explicit-constructor): values are built from literals everywhere
  Value(int v);  // NOLINT
  Value(int64_t v);  // NOLINT
  Value(double v);  // NOLINT
  Value(const char* s);  // NOLINT
  Value(std::string s);  // NOLINT
  Value(List items);  // NOLINT
  Value(Dict items);  // NOLINT
  static Value function(std::string name, Function f);
  static Value namespace_(Dict items);
  static Value tuple(List items);  ///< a list that prints as Python prints a tuple
  static Value undefined(std::string name);  ///< remembers what was looked up, for error messages
  /// JSON text → value (objects keep their key order); throws ft::Error naming `what` on bad JSON.
  static Value parse_json(std::string_view json, std::string_view what);

  Type type() const { return type_; }
  bool is_undefined() const { return type_ == Type::undefined; }
  bool is_none() const { return type_ == Type::none; }
  bool is_string() const { return type_ == Type::string; }
  bool is_number() const { return type_ == Type::integer || type_ == Type::number; }
  bool is_namespace() const { return type_ == Type::dict && namespace_flag_; }
  bool is_tuple() const { return type_ == Type::list && namespace_flag_; }
  bool truthy() const;

  bool as_bool() const { return b_; }
  int64_t as_int() const { return i_; }
  double as_double() const { return type_ == Type::integer ? static_cast<double>(i_) : d_; }
  const std::string& as_string() const { return *s_; }
  const List& as_list() const { return *list_; }
  const Dict& as_dict() const { return *dict_; }
  Dict& mutable_dict() const { return *dict_; }  ///< namespaces only
  const Function& as_function() const { return *fn_; }
  /// Undefined and function values: the name ("" for a plain Value()).
  const std::string& name() const;

  /// The dict entry for `key`, or nullptr.
  const Value* find(std::string_view key) const;

  /// Python's str(): None, True, 1.0, "['a', 1]", "{'k': 'v'}"; undefined → "".
  std::string str() const;
  /// Python's repr() (strings quoted).
  std::string repr() const;
  /// json.dumps(value, ensure_ascii=False, indent=indent (< 0: none)), as transformers' tojson.
  std::string to_json(int indent = -1) const;

 private:
  Type type_ = Type::undefined;
  bool namespace_flag_ = false;  // dicts: a namespace(); lists: a tuple
  bool b_ = false;
  int64_t i_ = 0;
  double d_ = 0.0;
  std::shared_ptr<std::string> s_;
  std::shared_ptr<List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Function> fn_;
};

bool operator==(const Value& a, const Value& b);

/// Byte ranges [begin, end) of the output.
using Spans = std::vector<std::pair<size_t, size_t>>;

/// A parsed template. Thread-safe to render from several threads at once.
class Template {
 public:
  /// Parses `source`; throws ft::Error "[chat template] NAME:LINE:COL: ..." on a syntax error.
  Template(std::string_view source, std::string name);
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

  /// Renders with `variables` over the globals (range, namespace, dict, raise_exception,
  /// strftime_now). `generation`, when given, receives the output ranges that {% generation %}
  /// blocks wrote. Throws ft::Error naming the place on a runtime error or raise_exception().
  std::string render(const Dict& variables, Spans* generation = nullptr) const;

  const std::string& name() const;
  /// Whether the template has a {% generation %} block.
  bool has_generation() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ft::data::jinja
