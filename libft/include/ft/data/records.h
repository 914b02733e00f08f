#pragma once
// Reading training records from text files and JSONL into tokenized Examples with exact label masks.
// Torch-free.
//
//   RecordReader   files/directories/streams → Record (raw text, prompt/completion, or messages),
//                  or a RecordIssue for a bad record. Streams: one line in memory at a time (a text
//                  document is held whole, up to max_record_bytes).
//   ExampleReader  RecordReader + chat_template.h's rendering and tokenization + an ErrorPolicy →
//                  Examples, with a ReadReport of what was skipped or truncated.
//
// Input rules (the same for every format):
//   * UTF-8 only. Invalid bytes are an error at their byte column.
//   * A UTF-8 BOM at the very start of a file is accepted and dropped (Windows editors write one),
//     unless RecordOptions::accept_bom is false. Anywhere else a BOM at the start of a JSONL line is an
//     error (files concatenated with their BOMs); inside text it is the character U+FEFF.
//   * CRLF line endings are accepted: the CR before each LF is dropped. Other CRs are data.
//   * NUL bytes are errors, and so is the JSON escape \u0000.
//   * A line longer than max_line_bytes (terminator not counted) is an error; the reader skips to the
//     next LF without buffering the line.
//   * An empty or whitespace-only document is an error, and so are a blank JSONL line and a file that
//     holds no record.
//   * Positions are 1-based lines and 1-based byte columns of the file as stored (BOM included).
//   * Missing files or directories, unreadable files and bad options are not record errors: they
//     always throw, whatever the ErrorPolicy.
// Every skip decision depends only on the data, the options and the tokenizer (never on timing or on
// the machine), so every rank reading the same sources skips the same records.
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ft/data/chat_template.h"
#include "ft/data/example.h"

namespace ft::data {

/// How records are stored. Chosen explicitly: the reader never guesses from contents or extensions.
enum class RecordFormat : uint8_t {
  text,         ///< plain text files; documents per TextSplit
  jsonl_text,   ///< JSONL, {"text": "..."}
  instruction,  ///< JSONL, {"prompt": "...", "completion": "..."}
  /// JSONL, {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}; with tool
  /// use (for the checkpoint's own template only) also {"tools": [{...}]} beside the messages,
  /// assistant messages with "tool_calls": [{...}] (then "content" may be empty, null or absent) and
  /// {"role": "tool", "content": "...", "tool_call_id"/"name": "..."} messages after them; and
  /// assistant messages' "reasoning_content" (a string the template renders, e.g. Qwen3's
  /// <think>...</think>; trained with the turn it belongs to). "content" may also be a list of
  /// OpenAI-style text parts [{"type": "text", "text": "..."}]: the checkpoint's template gets the
  /// list, libft's own templates the texts joined.
  chat,
};
/// "text" | "jsonl" | "instruction" | "chat"; throws ft::Error otherwise.
RecordFormat parse_record_format(std::string_view name);
const char* record_format_name(RecordFormat format);

/// How a plain text file is cut into documents.
enum class TextSplit : uint8_t {
  whole_file,   ///< "file": the file is one document
  blank_lines,  ///< "blank_lines": paragraphs; runs of blank (whitespace-only) lines separate them
  separator,    ///< "separator": a line holding exactly RecordOptions::separator ends a document
};
TextSplit parse_text_split(std::string_view name);  ///< "file" | "blank_lines" | "separator"
const char* text_split_name(TextSplit split);

/// One record before tokenization. A text document is its lines joined with "\n" (line terminators
/// normalised, the last one dropped).
struct Record {
  RecordOrigin origin;             ///< file and first line (0 for a TextSplit::whole_file document)
  std::string text;                ///< text, jsonl_text
  std::string prompt, completion;  ///< instruction
  std::vector<Message> messages;   ///< chat
  std::string tools_json;          ///< chat: the record's "tools" (a JSON array), "" for none
};

/// A bad record: where and why.
struct RecordIssue {
  RecordOrigin origin;  ///< the file and the line of the problem (0: it concerns the whole file)
  int64_t column = 0;   ///< 1-based byte column of the problem in that line; 0: the whole line/record
  std::string reason;
  /// "file:line:column: reason", leaving out a zero line or column.
  std::string to_string() const;
};

struct RecordOptions {
  RecordFormat format = RecordFormat::text;

  // Plain text (RecordFormat::text).
  TextSplit split = TextSplit::whole_file;
  std::string separator = "%";  ///< for TextSplit::separator (fortune files use "%")

  // Directories: walked recursively in byte-wise sorted path order (the same order on every machine),
  // regular files only. Names starting with '.' are skipped, and so are symlinked directories (cycles);
  // symlinks to files are followed.
  std::vector<std::string> extensions;  ///< e.g. {".jsonl"}; empty = every file

  // JSONL.
  bool allow_unknown_fields = false;  ///< false: a field the format does not define is an error
  int max_json_depth = 32;            ///< deeper nesting (in unknown fields) is an error

  // Limits.
  int64_t max_line_bytes = 16 << 20;    ///< longer lines are errors
  int64_t max_record_bytes = 64 << 20;  ///< longer text documents are errors
  bool accept_bom = true;               ///< accept (and drop) a UTF-8 BOM at the start of a file
};

/// Reads records from files, directories or one stream, in order. Throws ft::Error for missing
/// sources, bad options or read failures; returns bad records as RecordIssues.
class RecordReader {
 public:
  /// Expands directories at construction; a source that does not exist, or a directory with no
  /// matching file, throws.
  RecordReader(const std::vector<std::string>& sources, RecordOptions options);
  /// Reads one stream (e.g. a decompressor's output), named `name` in origins. `in` must outlive the
  /// reader.
  RecordReader(std::istream& in, std::string name, RecordOptions options);
  ~RecordReader();
  RecordReader(RecordReader&&) noexcept;
  RecordReader& operator=(RecordReader&&) noexcept;

  enum class Next : uint8_t { record, bad, end };
  /// The next record (fills `record`) or bad record (fills `issue`), or the end.
  Next next(Record& record, RecordIssue& issue);

  /// The files that will be read, in order.
  const std::vector<std::string>& files() const;
  const RecordOptions& options() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Expands sources the way RecordReader does (see RecordOptions: sorted, hidden names skipped).
std::vector<std::string> list_source_files(const std::vector<std::string>& sources,
                                           const std::vector<std::string>& extensions);

// ---------------------------------------------------------------------------------------------
// Records → Examples

struct TokenizeOptions {
  /// Required for RecordFormat::chat; optional for instruction (empty: render_instruction's plain
  /// prompt + completion + EOS; otherwise the pair is rendered as a one-turn chat). "llama2",
  /// "chatml", or "model": the tokenizer's own Jinja template (ModelChatTemplate).
  std::string chat_template;
  /// With chat_template "model": variables for the template, (name, JSON value) pairs
  /// (ModelChatTemplate's `vars`, parse_template_var).
  std::vector<std::pair<std::string, std::string>> template_vars;
  /// Chat records: which assistant turns are trained (TrainTurns in chat_template.h).
  TrainTurns train_turns = TrainTurns::all;
  int64_t max_tokens = 0;  ///< 0 = no limit
  /// Threads that tokenize. Records are still read, and examples returned, in order on the calling
  /// thread, with the same skips and reports for any value: only the tokenization of a look-ahead
  /// window of records runs in parallel. 0 = one per core.
  int threads = 1;
  enum class TooLong : uint8_t {
    error,     ///< a longer document is a bad record
    truncate,  ///< keep the first max_tokens tokens (a bad record if no label is left)
  } too_long = TooLong::error;
  /// Unset = the tokenizer's add_bos/add_eos. add_bos: BOS before plain text, instruction data without
  /// a template, and chatml conversations (llama2 always has one per turn). add_eos: EOS after plain
  /// text (instruction data and llama2 always end with one; chatml ends turns with <|im_end|>).
  std::optional<bool> add_bos, add_eos;
};

struct ErrorPolicy {
  enum class OnError : uint8_t {
    fail,  ///< the first bad record throws ft::Error naming it
    skip,  ///< bad records are counted and listed in the ReadReport
  } on_error = OnError::fail;
  /// With skip: at the end of the input, more than this fraction of bad records (of all records read,
  /// bad ones included) throws ft::Error listing the first few.
  double max_bad_fraction = 0.0;
  /// How many skipped/truncated records the report keeps (counts are always complete).
  int64_t max_listed = 10000;
};

struct ReadReport {
  int64_t files = 0;
  int64_t records = 0;  ///< good + bad
  int64_t examples = 0;
  int64_t tokens = 0;                          ///< in the examples
  int64_t labels = 0;                          ///< trainable tokens in the examples
  int64_t skipped = 0;                         ///< bad records
  int64_t truncated = 0;                       ///< examples cut to max_tokens
  std::vector<RecordIssue> skipped_records;    ///< the first ErrorPolicy::max_listed
  std::vector<RecordIssue> truncated_records;  ///< the first ErrorPolicy::max_listed
  /// Counts, then up to `max_lines` skipped and truncated records, one per line, for logs.
  std::string summary(int64_t max_lines = 20) const;
};

/// Reads examples one at a time. `encoder` must outlive the reader.
class ExampleReader {
 public:
  ExampleReader(RecordReader records, TokenizeOptions tokenize, ErrorPolicy policy, const TokenEncoder& encoder);
  ExampleReader(const std::vector<std::string>& sources, const RecordOptions& options, TokenizeOptions tokenize,
                ErrorPolicy policy, const TokenEncoder& encoder);
  ~ExampleReader();
  ExampleReader(ExampleReader&&) noexcept;
  ExampleReader& operator=(ExampleReader&&) noexcept;

  /// The next example and where it came from; false at the end. Throws ft::Error for a bad record
  /// under OnError::fail, and at the end when the bad fraction exceeds the policy's or no example
  /// was read at all.
  bool next(Example& example, RecordOrigin& origin);
  const ReadReport& report() const;

  /// The examples for one record (one; one per assistant turn under TrainTurns::each); throws
  /// ft::Error (RecordIssue text) for a bad one. Useful for rendering a single record without a file.
  std::vector<Example> build(const Record& record) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Everything at once, for small data sets and tests. `report` may be null.
std::vector<Example> read_examples(const std::vector<std::string>& sources, const RecordOptions& options,
                                   const TokenizeOptions& tokenize, const ErrorPolicy& policy,
                                   const TokenEncoder& encoder, ReadReport* report = nullptr);

}  // namespace ft::data
