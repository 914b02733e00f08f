#include "ft/data/records.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <exception>
#include <sstream>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "ft/util/error.h"
#include "jsonl.h"

namespace fs = std::filesystem;

namespace ft::data {

namespace {

constexpr std::string_view kBom = "\xEF\xBB\xBF";

// Splits a stream into lines without holding more than one (capped) line: a multi-GB JSONL file, or
// a binary file passed by mistake, costs the buffer plus max_line_bytes, never the file.
class LineReader {
 public:
  static constexpr size_t kBufferBytes = 256 << 10;

  /// `buffer` (kBufferBytes, contents irrelevant) is the caller's so that it is allocated once for all
  /// the files of a reader.
  LineReader(std::istream& in, int64_t max_line_bytes, std::string name, char* buffer)
      : in_(in), max_(static_cast<uint64_t>(max_line_bytes)), name_(std::move(name)), buf_(buffer) {}

  /// The next line without its LF, and without the CR of a CRLF. `too_long` lines are cut short in
  /// `line` (their content must not be used). False at the end of the stream.
  bool next(std::string& line, bool& too_long) {
    line.clear();
    uint64_t length = 0;
    bool any = false, newline = false;
    char last = 0;
    while (true) {
      if (pos_ == end_) {
        if (eof_) break;
        in_.read(buf_, static_cast<std::streamsize>(kBufferBytes));
        FT_CHECK(!in_.bad(), "[records] ", name_, ": read error after line ", number_);
        end_ = static_cast<size_t>(in_.gcount());
        pos_ = 0;
        if (end_ == 0) {
          eof_ = true;
          break;
        }
      }
      any = true;
      const char* start = buf_ + pos_;
      const auto* nl = static_cast<const char*>(std::memchr(start, '\n', end_ - pos_));
      const size_t n = nl ? static_cast<size_t>(nl - start) : end_ - pos_;
      // One byte past the limit is kept so that a CR dropped below leaves a line of exactly max_.
      const size_t room =
          static_cast<size_t>(std::min<uint64_t>(max_ + 1 - std::min<uint64_t>(line.size(), max_ + 1), n));
      line.append(start, room);
      if (n > 0) last = start[n - 1];
      length += n;
      pos_ += n;
      if (nl) {
        ++pos_;
        newline = true;
        break;
      }
    }
    if (!any) return false;
    ++number_;
    if (newline && length > 0 && last == '\r') {
      --length;
      if (line.size() > length) line.pop_back();
    }
    too_long = length > max_;
    return true;
  }

  int64_t number() const { return number_; }

 private:
  std::istream& in_;
  uint64_t max_;
  std::string name_;
  char* buf_;
  size_t pos_ = 0, end_ = 0;
  bool eof_ = false;
  int64_t number_ = 0;
};

bool has_extension(const std::string& path, const std::vector<std::string>& extensions) {
  if (extensions.empty()) return true;
  return std::any_of(extensions.begin(), extensions.end(), [&](const std::string& ext) {
    return path.size() >= ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0;
  });
}

void check_options(const RecordOptions& o) {
  FT_CHECK(o.max_line_bytes > 0, "[records] max_line_bytes must be positive, got ", o.max_line_bytes);
  FT_CHECK(o.max_record_bytes > 0, "[records] max_record_bytes must be positive, got ", o.max_record_bytes);
  // The root object, the messages array and a message object: chat needs three levels.
  FT_CHECK(o.max_json_depth >= 3 && o.max_json_depth <= 1000, "[records] max_json_depth must be in [3, 1000], got ",
           o.max_json_depth);
  if (o.format == RecordFormat::text && o.split == TextSplit::separator) {
    FT_CHECK(!o.separator.empty() && o.separator.find('\n') == std::string::npos &&
                 o.separator.find('\r') == std::string::npos,
             "[records] the text separator must be one non-empty line, got '", o.separator, "'");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Names

RecordFormat parse_record_format(std::string_view name) {
  if (name == "text") return RecordFormat::text;
  if (name == "jsonl") return RecordFormat::jsonl_text;
  if (name == "instruction") return RecordFormat::instruction;
  if (name == "chat") return RecordFormat::chat;
  FT_FAIL("[records] unknown record format '", name, "' (known: text, jsonl, instruction, chat)");
}

const char* record_format_name(RecordFormat format) {
  switch (format) {
    case RecordFormat::text:
      return "text";
    case RecordFormat::jsonl_text:
      return "jsonl";
    case RecordFormat::instruction:
      return "instruction";
    case RecordFormat::chat:
      return "chat";
  }
  return "?";
}

TextSplit parse_text_split(std::string_view name) {
  if (name == "file") return TextSplit::whole_file;
  if (name == "blank_lines") return TextSplit::blank_lines;
  if (name == "separator") return TextSplit::separator;
  FT_FAIL("[records] unknown text split '", name, "' (known: file, blank_lines, separator)");
}

const char* text_split_name(TextSplit split) {
  switch (split) {
    case TextSplit::whole_file:
      return "file";
    case TextSplit::blank_lines:
      return "blank_lines";
    case TextSplit::separator:
      return "separator";
  }
  return "?";
}

std::string RecordIssue::to_string() const {
  std::string s = origin.file;
  if (origin.line > 0) {
    s += ":" + std::to_string(origin.line);
    if (column > 0) s += ":" + std::to_string(column);
  }
  return s + ": " + reason;
}

// ---------------------------------------------------------------------------------------------
// Sources

std::vector<std::string> list_source_files(const std::vector<std::string>& sources,
                                           const std::vector<std::string>& extensions) {
  FT_CHECK(!sources.empty(), "[records] no sources given");
  std::vector<std::string> out;
  for (const std::string& source : sources) {
    std::error_code ec;
    const fs::file_status st = fs::status(source, ec);
    FT_CHECK(!ec || ec == std::errc::no_such_file_or_directory, "[records] ", source, ": ", ec.message());
    FT_CHECK(fs::exists(st), "[records] ", source, ": no such file or directory");
    if (fs::is_regular_file(st)) {
      out.push_back(source);  // named explicitly: read whatever its extension
      continue;
    }
    FT_CHECK(fs::is_directory(st), "[records] ", source, ": neither a regular file nor a directory");
    std::vector<std::string> found;
    try {
      for (auto it = fs::recursive_directory_iterator(source); it != fs::recursive_directory_iterator(); ++it) {
        const std::string name = it->path().filename().string();
        if (!name.empty() && name[0] == '.') {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        // is_regular_file follows symlinks; the iterator itself does not descend into linked dirs.
        if (it->is_regular_file() && has_extension(name, extensions)) found.push_back(it->path().generic_string());
      }
    } catch (const fs::filesystem_error& e) {
      FT_FAIL("[records] ", source, ": cannot list the directory: ", e.what());
    }
    std::string wanted;
    for (const auto& ext : extensions) wanted += (wanted.empty() ? " (" : ", ") + ext;
    FT_CHECK(!found.empty(), "[records] ", source, ": the directory holds no file", wanted, wanted.empty() ? "" : ")");
    // Byte-wise order, independent of the file system's listing order and of the locale.
    std::sort(found.begin(), found.end());
    out.insert(out.end(), found.begin(), found.end());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// RecordReader

struct RecordReader::Impl {
  RecordOptions opt;
  jsonl::RecordRules rules;
  std::vector<std::string> files;
  std::istream* external = nullptr;  // the stream constructor's input, read as files[0]

  size_t next_file = 0;
  std::ifstream file;
  std::unique_ptr<LineReader> lines;
  std::unique_ptr<char[]> buffer = std::make_unique_for_overwrite<char[]>(LineReader::kBufferBytes);
  std::string name;             // the open file
  int64_t records_in_file = 0;  // good and bad
  std::string line;             // reused between lines

  explicit Impl(RecordOptions o) : opt(std::move(o)) {
    check_options(opt);
    rules.format = opt.format;
    rules.allow_unknown_fields = opt.allow_unknown_fields;
    rules.max_depth = opt.max_json_depth;
  }

  bool open_next() {
    lines.reset();
    if (file.is_open()) file.close();
    if (next_file >= files.size()) return false;
    name = files[next_file++];
    records_in_file = 0;
    std::istream* in = external;
    if (!in) {
      file.clear();
      file.open(name, std::ios::binary);
      FT_CHECK(file.is_open(), "[records] ", name, ": cannot open: ", std::strerror(errno));
      in = &file;
    }
    lines = std::make_unique<LineReader>(*in, opt.max_line_bytes, name, buffer.get());
    return true;
  }

  Next bad(RecordIssue& issue, int64_t line_no, int64_t column, std::string reason) {
    issue.origin = {name, line_no};
    issue.column = column;
    issue.reason = std::move(reason);
    ++records_in_file;
    return Next::bad;
  }

  std::string too_long_reason() const {
    return "line longer than max_line_bytes (" + std::to_string(opt.max_line_bytes) + " bytes)";
  }

  // A BOM on line 1: accepted (dropped, columns shift by 3) or a problem. Returns the column shift.
  int64_t take_bom(int64_t line_no, std::optional<RecordIssue>& problem) {
    if (line_no != 1 || line.compare(0, kBom.size(), kBom) != 0) return 0;
    if (!opt.accept_bom) {
      problem = RecordIssue{{name, 1}, 1, "UTF-8 byte order mark (rejected: accept_bom is off)"};
      return 0;
    }
    line.erase(0, kBom.size());
    return static_cast<int64_t>(kBom.size());
  }

  // Returns end when the open file has no more records.
  Next next_jsonl(Record& record, RecordIssue& issue) {
    bool too_long = false;
    if (!lines->next(line, too_long)) {
      if (records_in_file == 0) return bad(issue, 0, 0, "the file holds no record");
      return Next::end;
    }
    const int64_t ln = lines->number();
    if (too_long) return bad(issue, ln, opt.max_line_bytes + 1, too_long_reason());
    std::optional<RecordIssue> problem;
    const int64_t shift = take_bom(ln, problem);
    if (problem) return bad(issue, ln, problem->column, problem->reason);
    if (auto p = jsonl::parse_jsonl_record(line, rules, record)) {
      return bad(issue, ln, p->whole_line ? 0 : static_cast<int64_t>(p->offset) + 1 + shift, std::move(p->reason));
    }
    record.origin = {name, ln};
    ++records_in_file;
    return Next::record;
  }

  // Assembles one text document from the open file. Lines of a document with a problem are still
  // consumed (to find where the next document starts) but not stored.
  Next next_text(Record& record, RecordIssue& issue) {
    const TextSplit split = opt.split;
    std::string& doc = record.text;
    doc.clear();
    bool started = false, has_content = false;
    int64_t first_line = 0;
    std::optional<RecordIssue> problem;

    auto finish = [&](int64_t end_line) -> Next {
      if (problem) return bad(issue, problem->origin.line, problem->column, problem->reason);
      if (!has_content) {
        if (split == TextSplit::whole_file) return bad(issue, 0, 0, "empty document (the file holds only whitespace)");
        return bad(issue, end_line, 0, "empty document (nothing but whitespace before this separator)");
      }
      record.origin = {name, split == TextSplit::whole_file ? 0 : first_line};
      record.prompt.clear();
      record.completion.clear();
      record.messages.clear();
      ++records_in_file;
      return Next::record;
    };

    bool too_long = false;
    while (lines->next(line, too_long)) {
      const int64_t ln = lines->number();
      const int64_t shift = take_bom(ln, problem);
      if (split == TextSplit::separator && !too_long && line == opt.separator) return finish(ln);
      if (split == TextSplit::blank_lines && !too_long && jsonl::is_blank(line)) {
        if (started) return finish(ln);
        continue;
      }
      if (!started) {
        started = true;
        first_line = ln;
      } else if (!problem) {
        doc += '\n';
      }
      if (problem) continue;
      if (too_long) {
        problem = RecordIssue{{name, ln}, opt.max_line_bytes + 1, too_long_reason()};
      } else if (auto p = jsonl::check_line_bytes(line)) {
        problem = RecordIssue{{name, ln}, static_cast<int64_t>(p->offset) + 1 + shift, p->reason};
      } else if (static_cast<int64_t>(doc.size() + line.size()) > opt.max_record_bytes) {
        problem = RecordIssue{
            {name, ln}, 0, "document longer than max_record_bytes (" + std::to_string(opt.max_record_bytes) + ")"};
      } else {
        doc += line;
        has_content = has_content || !jsonl::is_blank(line);
      }
    }
    // End of file. Whitespace after the last separator ends the file like the separator itself
    // (fortune files end with "%\n"); a file that yields nothing at all is an error.
    if (started && (split != TextSplit::separator || has_content || problem)) return finish(0);
    if (records_in_file == 0) {
      return bad(issue, 0, 0,
                 split == TextSplit::whole_file ? "empty document (the file is empty)" : "the file holds no document");
    }
    return Next::end;
  }
};

RecordReader::RecordReader(const std::vector<std::string>& sources, RecordOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->files = list_source_files(sources, impl_->opt.extensions);
}

RecordReader::RecordReader(std::istream& in, std::string name, RecordOptions options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->files = {std::move(name)};
  impl_->external = &in;
}

RecordReader::~RecordReader() = default;
RecordReader::RecordReader(RecordReader&&) noexcept = default;
RecordReader& RecordReader::operator=(RecordReader&&) noexcept = default;

RecordReader::Next RecordReader::next(Record& record, RecordIssue& issue) {
  Impl& m = *impl_;
  while (true) {
    if (!m.lines && !m.open_next()) return Next::end;
    const Next r = m.opt.format == RecordFormat::text ? m.next_text(record, issue) : m.next_jsonl(record, issue);
    if (r != Next::end) return r;
    m.lines.reset();
  }
}

const std::vector<std::string>& RecordReader::files() const { return impl_->files; }
const RecordOptions& RecordReader::options() const { return impl_->opt; }

// ---------------------------------------------------------------------------------------------
// ExampleReader

std::string ReadReport::summary(int64_t max_lines) const {
  std::ostringstream os;
  os << records << " records from " << files << (files == 1 ? " file: " : " files: ") << examples << " examples ("
     << tokens << " tokens, " << labels << " labels), " << skipped << " skipped, " << truncated << " truncated";
  auto list = [&](const char* what, const std::vector<RecordIssue>& issues, int64_t total) {
    int64_t shown = 0;
    for (const RecordIssue& issue : issues) {
      if (shown == max_lines) break;
      os << "\n  " << what << ": " << issue.to_string();
      ++shown;
    }
    if (total > shown) os << "\n  ... and " << (total - shown) << " more " << what;
  };
  list("skipped", skipped_records, skipped);
  list("truncated", truncated_records, truncated);
  return os.str();
}

struct ExampleReader::Impl {
  RecordReader records;
  TokenizeOptions tok;
  ErrorPolicy policy;
  const TokenEncoder* encoder;
  std::optional<ChatTemplate> tmpl;
  std::optional<ModelChatTemplate> model_tmpl;  // tmpl == model
  bool add_bos = false, add_eos = false;
  ReadReport report;
  bool finished = false;

  // Look-ahead windows: records read in order, then tokenized in parallel, then handed out in
  // order with the error policy applied exactly as if each had been tokenized when reached.
  // With threads > 1 a producer thread reads and tokenizes the next windows (helped by threads - 1
  // workers) while the caller consumes the current one (in ft prepare: compresses and writes it),
  // so reading, tokenizing and writing overlap.
  struct Slot {
    RecordReader::Next kind = RecordReader::Next::end;
    Record record;
    RecordIssue issue;
    std::vector<Example> examples;        // one, or one per assistant turn (TrainTurns::each)
    std::vector<int64_t> truncated_from;  // per example: > 0 where it was cut
    size_t taken = 0;                     // examples handed out
    std::optional<std::string> reason;    // why the record is bad, from build()
    std::exception_ptr error;           // a read or tokenizer failure, rethrown when reached
  };
  using Window = std::vector<Slot>;
  Window window;
  size_t window_pos = 0;
  bool input_done = false;  // the caller has taken the last window
  int threads = 1;

  // Producer side (threads > 1).
  std::thread producer;
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<Window> queue;  // at most kQueuedWindows
  bool produced_all = false, stop = false;
  // Windows of 4096 records (or 16 MB of text, whichever comes first) keep the per-window joins rare:
  // on the fortunes, 256-record windows left the two-thread pipeline 38% slower than raw encoding,
  // 4096-record windows 20% (17% at deflate level 1, 16% with the producer as one of the tokenizers;
  // 1024-record windows 23%, 8192 15-16%: within the benchmark's noise of 4096).
  static constexpr size_t kWindowRecords = 4096, kQueuedWindows = 2, kWindowBytes = 16u << 20;

  Impl(RecordReader r, TokenizeOptions t, ErrorPolicy p, const TokenEncoder& e)
      : records(std::move(r)), tok(std::move(t)), policy(p), encoder(&e) {
    const RecordFormat format = records.options().format;
    const SpecialTokens sp = encoder->special();
    FT_CHECK(tok.max_tokens >= 0, "[records] max_tokens must be >= 0, got ", tok.max_tokens);
    FT_CHECK(policy.max_bad_fraction >= 0.0 && policy.max_bad_fraction <= 1.0,
             "[records] max_bad_fraction must be in [0, 1], got ", policy.max_bad_fraction);
    FT_CHECK(policy.max_listed >= 0, "[records] max_listed must be >= 0");
    if (!tok.chat_template.empty()) {
      FT_CHECK(format == RecordFormat::chat || format == RecordFormat::instruction, "[records] a chat template ('",
               tok.chat_template, "') applies to chat and instruction records, not to ", record_format_name(format));
      tmpl = parse_chat_template(tok.chat_template);
      if (is_template_file(tok.chat_template)) {
        model_tmpl.emplace(*encoder, tok.chat_template, tok.template_vars);
      } else if (tmpl == ChatTemplate::model) {
        model_tmpl.emplace(*encoder, tok.template_vars);
      }
    }
    FT_CHECK(tok.template_vars.empty() || tmpl == ChatTemplate::model,
             "[records] template variables apply to the 'model' chat template only");
    FT_CHECK(tok.train_turns == TrainTurns::all || format == RecordFormat::chat,
             "[records] train_turns applies to chat records only, not to ", record_format_name(format));
    FT_CHECK(format != RecordFormat::chat || tmpl,
             "[records] chat records need a chat template (llama2, chatml, or model: the checkpoint's own)");
    if ((format == RecordFormat::instruction || format == RecordFormat::chat) && tmpl != ChatTemplate::model) {
      FT_CHECK(sp.eos >= 0 || tmpl == ChatTemplate::chatml, "[records] ", record_format_name(format),
               " records end with EOS, but the tokenizer has no EOS token");
    }
    FT_CHECK(tmpl != ChatTemplate::llama2 || sp.bos >= 0, "[records] the llama2 template needs a BOS token");
    threads = tok.threads > 0 ? tok.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    add_bos = tok.add_bos.value_or(sp.add_bos) && sp.bos >= 0;
    add_eos = tok.add_eos.value_or(sp.add_eos);
    FT_CHECK(!add_eos || sp.eos >= 0, "[records] add_eos is set but the tokenizer has no EOS token");
  }

  // The record's renderings: one, or one per assistant turn (TrainTurns::each: each prefix of the
  // conversation that ends with an assistant turn, trained on that turn).
  std::vector<std::vector<TemplateSegment>> renderings(const Record& r) const {
    if (records.options().format != RecordFormat::chat || tok.train_turns != TrainTurns::each) return {render(r)};
    const auto turns = std::count_if(r.messages.begin(), r.messages.end(),
                                     [](const Message& m) { return m.role == Role::assistant; });
    std::vector<std::vector<TemplateSegment>> out;
    for (size_t i = 0; i < r.messages.size(); ++i) {
      if (r.messages[i].role != Role::assistant) continue;
      const std::span<const Message> upto(r.messages.data(), i + 1);
      try {
        if (model_tmpl) {
          out.push_back(model_tmpl->render(upto, r.tools_json, TrainTurns::last));
        } else {
          FT_CHECK(r.tools_json.empty(), "[records] the ", chat_template_name(*tmpl),
                   " template has no tool definitions (\"tools\"); use the checkpoint's own (--template model)");
          out.push_back(render_chat(*tmpl, upto, add_bos, TrainTurns::last));
        }
      } catch (const ft::Error& e) {
        FT_FAIL("turn ", out.size() + 1, " of ", turns, " (messages[", i, "]): ", e.what());
      }
    }
    return out;
  }

  std::vector<TemplateSegment> render(const Record& r) const {
    switch (records.options().format) {
      case RecordFormat::text:
      case RecordFormat::jsonl_text:
        return render_text(r.text, add_bos, add_eos);
      case RecordFormat::instruction: {
        if (!tmpl) return render_instruction(r.prompt, r.completion, add_bos);
        const Message pair[2] = {{Role::user, r.prompt}, {Role::assistant, r.completion}};
        if (model_tmpl) return model_tmpl->render(pair);
        return render_chat(*tmpl, pair, add_bos);
      }
      case RecordFormat::chat:
        if (model_tmpl) return model_tmpl->render(r.messages, r.tools_json, tok.train_turns);
        FT_CHECK(r.tools_json.empty(), "[records] the ", chat_template_name(*tmpl),
                 " template has no tool definitions (\"tools\"); use the checkpoint's own (--template model)");
        return render_chat(*tmpl, r.messages, add_bos, tok.train_turns);
    }
    return {};
  }

  // The examples for `r` (one, or one per assistant turn), or the reason it is bad.
  // `truncated_from[k]` > 0 where example k was cut.
  std::optional<std::string> build(const Record& r, std::vector<Example>& examples,
                                   std::vector<int64_t>& truncated_from) const {
    examples.clear();
    truncated_from.clear();
    std::vector<std::vector<TemplateSegment>> all;
    try {
      all = renderings(r);
    } catch (const ft::Error& e) {
      // A conversation the template refuses (its raise_exception, tool use it cannot render) is a
      // bad record, under the error policy like any other.
      return std::string(e.what());
    }
    if (all.empty()) return std::string("the conversation has no assistant turn");
    for (const auto& segments : all) {
      Example& ex = examples.emplace_back();
      int64_t& cut = truncated_from.emplace_back(0);
      if (auto reason = build_one(r, segments, ex, cut)) {
        if (all.size() > 1) return "turn " + std::to_string(examples.size()) + " of " + std::to_string(all.size()) + ": " + *reason;
        return reason;
      }
    }
    return std::nullopt;
  }

  std::optional<std::string> build_one(const Record& r, const std::vector<TemplateSegment>& segments, Example& ex,
                                       int64_t& truncated_from) const {
    ex = tokenize_segments(segments, *encoder);
    const auto n = static_cast<int64_t>(ex.tokens.size());
    if (tok.max_tokens > 0 && n > tok.max_tokens) {
      if (tok.too_long == TokenizeOptions::TooLong::error) {
        return "document has " + std::to_string(n) + " tokens, more than max_tokens (" +
               std::to_string(tok.max_tokens) + ")";
      }
      ex.tokens.resize(static_cast<size_t>(tok.max_tokens));
      ex.trainable.resize(static_cast<size_t>(tok.max_tokens));
      truncated_from = n;
    }
    if (std::find(ex.trainable.begin(), ex.trainable.end(), uint8_t{1}) == ex.trainable.end()) {
      if (truncated_from > 0) {
        return "no label left after truncating " + std::to_string(n) + " tokens to max_tokens (" +
               std::to_string(tok.max_tokens) + ")";
      }
      return "the document has no label";
    }
    check_example(ex, r.origin);
    return std::nullopt;
  }

  ~Impl() {
    if (!producer.joinable()) return;
    {
      std::lock_guard lock(mutex);
      stop = true;
    }
    changed.notify_all();
    producer.join();
  }

  // Reads up to `size` records into `w`; true when the input ended (or failed) with them.
  bool read_window(Window& w, size_t size) {
    size_t bytes = 0;
    while (w.size() < size && bytes < kWindowBytes) {
      Slot& slot = w.emplace_back();
      try {
        slot.kind = records.next(slot.record, slot.issue);
      } catch (...) {
        slot.error = std::current_exception();
        return true;
      }
      if (slot.kind == RecordReader::Next::end) return true;
      const Record& r = slot.record;
      bytes += r.text.size() + r.prompt.size() + r.completion.size();
      for (const auto& m : r.messages) bytes += m.content.size();
    }
    return false;
  }

  // Tokenizes the records of `w` from `next` onwards, claiming them a few at a time so that
  // workers sharing `next` finish together however uneven the records are.
  void tokenize_part(Window& w, std::atomic<size_t>& next) const {
    constexpr size_t kClaim = 8;
    for (size_t begin = next.fetch_add(kClaim); begin < w.size(); begin = next.fetch_add(kClaim)) {
      for (size_t i = begin; i < std::min(begin + kClaim, w.size()); ++i) {
        Slot& slot = w[i];
        if (slot.kind != RecordReader::Next::record || slot.error) continue;
        try {
          slot.reason = build(slot.record, slot.examples, slot.truncated_from);
        } catch (...) {
          slot.error = std::current_exception();
        }
      }
    }
  }

  // Reads window k+1 while `threads` workers tokenize window k, then queues window k for the
  // caller, who writes it while windows k+1 and k+2 are being tokenized and read.
  void produce() {
    Window current;
    bool done = read_window(current, kWindowRecords);
    while (true) {
      std::atomic<size_t> cursor{0};
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back([this, &current, &cursor] { tokenize_part(current, cursor); });
      Window next;
      const bool next_done = done || read_window(next, kWindowRecords);
      tokenize_part(current, cursor);  // the producer is the threads-th tokenizer once the next window is read
      for (auto& thread : pool) thread.join();
      {
        std::unique_lock lock(mutex);
        changed.wait(lock, [this] { return stop || queue.size() < kQueuedWindows; });
        if (stop) return;
        queue.push_back(std::move(current));
        produced_all = done;
      }
      changed.notify_all();
      if (done) return;
      current = std::move(next);
      done = next_done;
    }
  }

  // Makes the next window current.
  void refill() {
    window_pos = 0;
    if (threads <= 1) {
      window.clear();
      input_done = read_window(window, 1);
      std::atomic<size_t> cursor{0};
      tokenize_part(window, cursor);
      return;
    }
    if (!producer.joinable()) producer = std::thread([this] { produce(); });
    std::unique_lock lock(mutex);
    changed.wait(lock, [this] { return !queue.empty(); });
    window = std::move(queue.front());
    queue.pop_front();
    input_done = produced_all && queue.empty();
    changed.notify_all();
  }

  // Hands out the slot's next example, counting it (and its truncation) in the report; moves past
  // the slot after its last.
  void take(Slot& slot, Example& example, RecordOrigin& origin) {
    const size_t k = slot.taken++;
    if (slot.truncated_from[k] > 0) {
      ++report.truncated;
      if (static_cast<int64_t>(report.truncated_records.size()) < policy.max_listed) {
        report.truncated_records.push_back(RecordIssue{slot.record.origin, 0,
                                                       "truncated from " + std::to_string(slot.truncated_from[k]) +
                                                           " to " + std::to_string(tok.max_tokens) + " tokens"});
      }
    }
    example = std::move(slot.examples[k]);
    ++report.examples;
    report.tokens += static_cast<int64_t>(example.tokens.size());
    report.labels += std::count(example.trainable.begin(), example.trainable.end(), uint8_t{1});
    origin = slot.record.origin;
    if (slot.taken == slot.examples.size()) ++window_pos;
  }

  void on_bad(const RecordIssue& bad) {
    FT_CHECK(policy.on_error == ErrorPolicy::OnError::skip, "[records] ", bad.to_string());
    ++report.skipped;
    if (static_cast<int64_t>(report.skipped_records.size()) < policy.max_listed) report.skipped_records.push_back(bad);
  }

  void finish() {
    if (finished) return;
    finished = true;
    const double fraction = report.records > 0 ? static_cast<double>(report.skipped) / report.records : 0.0;
    if (fraction > policy.max_bad_fraction) {
      std::ostringstream os;
      os << "[records] " << report.skipped << " of " << report.records << " records are bad (" << std::setprecision(3)
         << 100.0 * fraction << "%), more than max_bad_fraction " << policy.max_bad_fraction << ". The first ones:";
      for (size_t i = 0; i < report.skipped_records.size() && i < 5; ++i) {
        os << "\n  " << report.skipped_records[i].to_string();
      }
      FT_FAIL(os.str());
    }
    FT_CHECK(report.examples > 0, "[records] no usable record in ", report.files, " file(s), starting with ",
             records.files().empty() ? std::string("-") : records.files()[0]);
  }
};

ExampleReader::ExampleReader(RecordReader records, TokenizeOptions tokenize, ErrorPolicy policy,
                             const TokenEncoder& encoder)
    : impl_(std::make_unique<Impl>(std::move(records), std::move(tokenize), policy, encoder)) {
  impl_->report.files = static_cast<int64_t>(impl_->records.files().size());
}

ExampleReader::ExampleReader(const std::vector<std::string>& sources, const RecordOptions& options,
                             TokenizeOptions tokenize, ErrorPolicy policy, const TokenEncoder& encoder)
    : ExampleReader(RecordReader(sources, options), std::move(tokenize), policy, encoder) {}

ExampleReader::~ExampleReader() = default;
ExampleReader::ExampleReader(ExampleReader&&) noexcept = default;
ExampleReader& ExampleReader::operator=(ExampleReader&&) noexcept = default;

bool ExampleReader::next(Example& example, RecordOrigin& origin) {
  Impl& m = *impl_;
  if (m.finished) return false;
  while (true) {
    if (m.window_pos == m.window.size()) {
      if (m.input_done) {
        m.finish();
        return false;
      }
      m.refill();
      continue;
    }
    Impl::Slot& slot = m.window[m.window_pos];
    if (slot.taken > 0) {
      // The rest of a record's examples (TrainTurns::each; take() moves past the slot after its last).
      m.take(slot, example, origin);
      return true;
    }
    if (slot.error) {
      ++m.window_pos;
      std::rethrow_exception(slot.error);
    }
    switch (slot.kind) {
      case RecordReader::Next::end:
        ++m.window_pos;
        m.finish();
        return false;
      case RecordReader::Next::bad:
        ++m.window_pos;
        ++m.report.records;
        m.on_bad(slot.issue);
        continue;
      case RecordReader::Next::record:
        break;
    }
    ++m.report.records;
    if (slot.reason) {
      ++m.window_pos;
      m.on_bad(RecordIssue{slot.record.origin, 0, std::move(*slot.reason)});
      continue;
    }
    m.take(slot, example, origin);
    return true;
  }
}

const ReadReport& ExampleReader::report() const { return impl_->report; }

std::vector<Example> ExampleReader::build(const Record& record) const {
  std::vector<Example> examples;
  std::vector<int64_t> truncated_from;
  if (auto reason = impl_->build(record, examples, truncated_from))
    FT_FAIL("[records] ", RecordIssue{record.origin, 0, *reason}.to_string());
  return examples;
}

std::vector<Example> read_examples(const std::vector<std::string>& sources, const RecordOptions& options,
                                   const TokenizeOptions& tokenize, const ErrorPolicy& policy,
                                   const TokenEncoder& encoder, ReadReport* report) {
  ExampleReader reader(sources, options, tokenize, policy, encoder);
  std::vector<Example> out;
  Example ex;
  RecordOrigin origin;
  while (reader.next(ex, origin)) out.push_back(std::move(ex));
  if (report) *report = reader.report();
  return out;
}

}  // namespace ft::data
