// ModelChatTemplate: a checkpoint's own Jinja chat template, rendered and labelled (chat_template.h).
#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>

#include "ft/data/chat_template.h"
#include "ft/data/jinja.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::data {

struct ModelChatTemplate::Impl {
  std::string file;
  jinja::Template tmpl;
  jinja::Dict base;                 // the context's fixed part
  std::vector<std::string> splits;  // longest first

  Impl(std::string f, const std::string& source) : file(std::move(f)), tmpl(source, file) {}

  // The messages as the template sees them, made once per conversation (a labelled render renders
  // 2n + 1 prefixes of it).
  static jinja::List message_values(std::span<const Message> messages) {
    jinja::List list;
    list.reserve(messages.size());
    for (const Message& m : messages) {
      jinja::Dict d{{"role", jinja::Value(role_name(m.role))}, {"content", jinja::Value(m.content)}};
      if (!m.fields_json.empty()) {
        const jinja::Value fields = jinja::Value::parse_json(m.fields_json, "a message's fields");
        for (const auto& field : fields.as_dict()) {
          auto it = std::find_if(d.begin(), d.end(), [&](const auto& kv) { return kv.first == field.first; });
          if (it != d.end()) it->second = field.second;
          else d.push_back(field);
        }
      }
      list.emplace_back(std::move(d));
    }
    return list;
  }

  // The first `count` messages rendered.
  std::string render(const jinja::List& messages, size_t count, bool gen, jinja::Spans* generation,
                     const jinja::Value* tools = nullptr) const {
    jinja::List list(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(count));
    jinja::Dict vars = base;
    if (tools) {
      std::erase_if(vars, [](const auto& kv) { return kv.first == "tools"; });
      vars.emplace_back("tools", *tools);
    }
    vars.emplace_back("messages", jinja::Value(std::move(list)));
    vars.emplace_back("add_generation_prompt", jinja::Value(gen));
    return tmpl.render(vars, generation);
  }
};

namespace {

// `full` as segments: text cut where labels (`spans`) start and end, and at the split pieces
// (longest first), which become single-id segments.
std::vector<TemplateSegment> cut_segments(const std::string& full, const jinja::Spans& spans,
                                          const std::vector<std::string>& splits) {
  std::vector<char> label(full.size(), 0);
  for (const auto& [b, e] : spans) std::fill(label.begin() + static_cast<std::ptrdiff_t>(b), label.begin() + static_cast<std::ptrdiff_t>(e), 1);
  std::vector<TemplateSegment> out;
  auto add_text = [&](size_t b, size_t e) {
    while (b < e) {
      size_t c = b;
      while (c < e && label[c] == label[b]) ++c;
      out.push_back({TemplateSegment::Kind::text, full.substr(b, c - b), label[b] != 0});
      b = c;
    }
  };
  size_t pos = 0, text_start = 0;
  while (pos < full.size()) {
    const std::string* hit = nullptr;
    if (!splits.empty()) {
      for (const std::string& s : splits) {
        if (full.compare(pos, s.size(), s) == 0) {
          hit = &s;
          break;
        }
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    add_text(text_start, pos);
    out.push_back({TemplateSegment::Kind::special, *hit, label[pos] != 0});
    pos += hit->size();
    text_start = pos;
  }
  add_text(text_start, full.size());
  return out;
}

}  // namespace

std::pair<std::string, std::string> parse_template_var(std::string_view assignment) {
  const size_t eq = assignment.find('=');
  FT_CHECK(eq != std::string_view::npos, "[records] template variable '", assignment, "' is not NAME=VALUE");
  const std::string name(assignment.substr(0, eq));
  const std::string value(assignment.substr(eq + 1));
  const bool identifier = !name.empty() && (std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_') &&
                          std::all_of(name.begin(), name.end(), [](char c) {
                            return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
                          });
  FT_CHECK(identifier, "[records] template variable '", name, "' is not a name (letters, digits, _)");
  if (nlohmann::json::accept(value)) return {name, value};
  return {name, nlohmann::json(value).dump()};
}

ModelChatTemplate::ModelChatTemplate(const TokenEncoder& encoder,
                                     const std::vector<std::pair<std::string, std::string>>& vars) {
  auto [source, file] = encoder.chat_template();
  FT_CHECK(!source.empty(), "[records] the template 'model' needs the checkpoint's chat template, but the tokenizer has "
                            "none (no chat_template.jinja, and no 'chat_template' in tokenizer_config.json)");
  init(encoder, source, file, vars);
}

ModelChatTemplate::ModelChatTemplate(const TokenEncoder& encoder, const std::string& path,
                                     const std::vector<std::pair<std::string, std::string>>& vars) {
  std::string source;
  try {
    source = read_text_file(path);
  } catch (const ft::Error& e) {
    FT_FAIL("[records] chat template file ", path, ": ", e.what());
  }
  init(encoder, source, path, vars);
}

void ModelChatTemplate::init(const TokenEncoder& encoder, const std::string& source, const std::string& file,
                             const std::vector<std::pair<std::string, std::string>>& vars) {
  impl_ = std::make_unique<Impl>(file, source);
  const SpecialTokens sp = encoder.special();
  impl_->base.emplace_back("tools", jinja::Value::none());
  impl_->base.emplace_back("documents", jinja::Value::none());
  const std::pair<const char*, int32_t> tokens[] = {
      {"bos_token", sp.bos}, {"eos_token", sp.eos}, {"unk_token", sp.unk}, {"pad_token", sp.pad}};
  for (const auto& [name, id] : tokens) {
    if (id < 0) continue;
    std::string text = encoder.piece(id);
    if (!text.empty()) impl_->base.emplace_back(name, jinja::Value(std::move(text)));
  }
  for (const auto& var : vars) {
    const std::string& name = var.first;
    const std::string& json = var.second;
    FT_CHECK(name != "messages" && name != "add_generation_prompt", "[records] template variable '", name,
             "' is set by libft itself");
    auto& base = impl_->base;
    std::erase_if(base, [&](const auto& kv) { return kv.first == name; });
    base.emplace_back(name, jinja::Value::parse_json(json, "template variable '" + name + "'"));
  }
  impl_->splits = encoder.split_pieces();
  std::erase_if(impl_->splits, [](const std::string& s) { return s.empty(); });
  std::stable_sort(impl_->splits.begin(), impl_->splits.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
}

ModelChatTemplate::ModelChatTemplate(ModelChatTemplate&&) noexcept = default;
ModelChatTemplate::~ModelChatTemplate() = default;

const std::string& ModelChatTemplate::file() const { return impl_->file; }


std::string ModelChatTemplate::render_text(std::span<const Message> messages, bool add_generation_prompt) const {
  return impl_->render(Impl::message_values(messages), messages.size(), add_generation_prompt, nullptr);
}

std::vector<TemplateSegment> ModelChatTemplate::render(std::span<const Message> messages, const std::string& tools_json,
                                                      TrainTurns turns) const {
  check_chat_order(messages);
  FT_CHECK(turns != TrainTurns::each, "[records] ModelChatTemplate::render: TrainTurns::each renders each turn's prefix with last");
  const jinja::Value tools = tools_json.empty() ? jinja::Value::none() : jinja::Value::parse_json(tools_json, "tools");
  const jinja::Value* t = tools_json.empty() ? nullptr : &tools;
  jinja::Spans spans;
  const jinja::List values = Impl::message_values(messages);
  const std::string full = impl_->render(values, messages.size(), false, &spans, t);
  // Where the final assistant turn starts: the rendering before it plus the generation prompt.
  auto last_turn_start = [&] {
    const size_t i = messages.size() - 1;  // an assistant message (check_chat_order)
    const std::string before = impl_->render(values, i, true, nullptr, t);
    FT_CHECK(full.compare(0, before.size(), before) == 0, "[records] chat template ", impl_->file,
             ": the rendering does not start with the rendering before its last assistant turn (messages[", i,
             "]) plus the generation prompt, so that turn cannot be told apart");
    return before.size();
  };
  if (impl_->tmpl.has_generation()) {
    if (turns == TrainTurns::last) {
      const size_t start = last_turn_start();
      std::erase_if(spans, [&](const auto& s) { return s.first < start; });
    }
  } else if (turns == TrainTurns::last) {
    spans = {{last_turn_start(), full.size()}};
  } else {
    spans.clear();
    for (size_t i = 0; i < messages.size(); ++i) {
      if (messages[i].role != Role::assistant) continue;
      const std::string before = impl_->render(values, i, true, nullptr, t);
      const std::string with = impl_->render(values, i + 1, false, nullptr, t);
      FT_CHECK(with.compare(0, before.size(), before) == 0, "[records] chat template ", impl_->file,
               ": the rendering up to messages[", i,
               "] (an assistant turn) does not start with the rendering before it plus the generation prompt, so its "
               "text cannot be told apart; use a template with {% generation %} blocks");
      FT_CHECK(full.compare(0, with.size(), with) == 0, "[records] chat template ", impl_->file, ": messages[", i,
               "] (an assistant turn) renders differently once later messages follow, so its text cannot be told "
               "apart; train the last assistant turn only (--train-turns last), use a template with {% generation %} "
               "blocks, or give one conversation per assistant turn");
      spans.emplace_back(before.size(), with.size());
    }
  }
  return cut_segments(full, spans, impl_->splits);
}

std::vector<TemplateSegment> ModelChatTemplate::render_prompt(std::span<const Message> messages) const {
  FT_CHECK(!messages.empty() && messages.back().role == Role::user, "[records] a prompt must end with a user message");
  return cut_segments(impl_->render(Impl::message_values(messages), messages.size(), true, nullptr), {},
                      impl_->splits);
}

}  // namespace ft::data
