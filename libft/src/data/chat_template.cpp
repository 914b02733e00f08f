#include "ft/data/chat_template.h"

#include <algorithm>

#include "ft/util/error.h"

namespace ft::data {

const char* role_name(Role role) {
  switch (role) {
    case Role::system:
      return "system";
    case Role::user:
      return "user";
    case Role::assistant:
      return "assistant";
    case Role::tool:
      return "tool";
    case Role::developer:
      return "developer";
  }
  return "?";
}

bool is_instructions(Role role) { return role == Role::system || role == Role::developer; }

TrainTurns parse_train_turns(std::string_view name) {
  if (name == "all") return TrainTurns::all;
  if (name == "last") return TrainTurns::last;
  if (name == "each") return TrainTurns::each;
  FT_FAIL("[records] train_turns '", name, "' is not all, last or each");
}

const char* train_turns_name(TrainTurns turns) {
  switch (turns) {
    case TrainTurns::all:
      return "all";
    case TrainTurns::last:
      return "last";
    case TrainTurns::each:
      return "each";
  }
  return "?";
}

bool calls_tools(const Message& m) {
  // fields_json is the reader's own serialisation of the message's other fields (tool_calls,
  // reasoning_content or thinking, tool_call_id, name). In an assistant's, only the tool_calls key
  // can match: inside the reasoning's JSON string a quote is escaped, and tool_calls' own values come
  // after that key.
  return m.role == Role::assistant && m.fields_json.find("\"tool_calls\"") != std::string::npos;
}

bool has_tool_use(std::span<const Message> messages) {
  return std::any_of(messages.begin(), messages.end(),
                     [](const Message& m) { return m.role == Role::tool || calls_tools(m); });
}

ChatTemplate parse_chat_template(std::string_view name) {
  if (name == "llama2") return ChatTemplate::llama2;
  if (name == "chatml") return ChatTemplate::chatml;
  if (name == "model" || is_template_file(name)) return ChatTemplate::model;
  FT_FAIL("[records] unknown chat template '", name,
          "' (known: llama2, chatml, model: the checkpoint's own, or a FILE.jinja)");
}

bool is_template_file(std::string_view name) {
  return name.size() > 6 && name.substr(name.size() - 6) == ".jinja";
}

const char* chat_template_name(ChatTemplate tmpl) {
  switch (tmpl) {
    case ChatTemplate::llama2:
      return "llama2";
    case ChatTemplate::chatml:
      return "chatml";
    case ChatTemplate::model:
      return "model";
  }
  return "?";
}

void check_chat_order(std::span<const Message> messages) {
  FT_CHECK(!messages.empty(), "[records] a conversation needs at least one message");
  const size_t first = is_instructions(messages[0].role) ? 1 : 0;
  for (size_t i = first; i < messages.size(); ++i) {
    const Role role = messages[i].role;
    bool ok = false;
    const char* expected = "";
    if (i == first) {
      ok = role == Role::user;
      expected = "user must come first";
    } else {
      const Message& prev = messages[i - 1];
      if (prev.role == Role::user) {
        ok = role == Role::assistant;
        expected = "assistant must come next";
      } else if (calls_tools(prev)) {
        ok = role == Role::tool;
        expected = "tool must come after an assistant message with tool_calls";
      } else if (prev.role == Role::tool) {
        ok = role == Role::tool || role == Role::assistant;
        expected = "tool or assistant must come after a tool message";
      } else {
        ok = role == Role::user;
        expected = "user must come next";
      }
    }
    FT_CHECK(ok, "[records] messages[", i, "] is ", role_name(role), " but ", expected,
             " (an optional system or developer message, then user and assistant alternating)");
  }
  FT_CHECK(messages.back().role == Role::assistant, "[records] the conversation must end with an assistant message");
}

namespace {

TemplateSegment text(std::string s, bool trainable) { return {TemplateSegment::Kind::text, std::move(s), trainable}; }
TemplateSegment bos() { return {TemplateSegment::Kind::bos, {}, false}; }
TemplateSegment eos() { return {TemplateSegment::Kind::eos, {}, true}; }
TemplateSegment special(std::string piece, bool trainable) {
  return {TemplateSegment::Kind::special, std::move(piece), trainable};
}

}  // namespace

std::vector<TemplateSegment> render_text(std::string_view body, bool add_bos, bool add_eos) {
  std::vector<TemplateSegment> out;
  if (add_bos) out.push_back(bos());
  out.push_back(text(std::string(body), true));
  if (add_eos) out.push_back(eos());
  return out;
}

std::vector<TemplateSegment> render_instruction(std::string_view prompt, std::string_view completion, bool add_bos) {
  std::vector<TemplateSegment> out;
  if (add_bos) out.push_back(bos());
  out.push_back(text(std::string(prompt), false));
  out.push_back(text(std::string(completion), true));
  out.push_back(eos());
  return out;
}

std::vector<TemplateSegment> render_chat(ChatTemplate tmpl, std::span<const Message> messages, bool add_bos,
                                         TrainTurns turns) {
  check_chat_order(messages);
  FT_CHECK(turns != TrainTurns::each, "[records] render_chat: TrainTurns::each renders each turn's prefix with last");
  FT_CHECK(messages[0].role != Role::developer, "[records] the ", chat_template_name(tmpl),
           " template has no developer role; use the checkpoint's own (--template model), e.g. gpt-oss's");
  FT_CHECK(!has_tool_use(messages), "[records] the ", chat_template_name(tmpl),
           " template has no tool calls or tool messages; use the checkpoint's own (--template model)");
  for (const Message& m : messages) {
    const bool reasoning = m.fields_json.find("\"reasoning_content\"") != std::string::npos ||
                           m.fields_json.find("\"thinking\"") != std::string::npos;
    FT_CHECK(!reasoning, "[records] the ", chat_template_name(tmpl),
             " template has no place for an assistant's reasoning (reasoning_content, thinking); use the checkpoint's "
             "own (--template model), e.g. Qwen3's, which writes it between <think> and </think>");
  }
  // The conversation ends with an assistant message (check_chat_order): under TrainTurns::last only
  // that one is trained.
  const size_t last = messages.size() - 1;
  auto trained = [&](size_t i) { return messages[i].role == Role::assistant && (turns == TrainTurns::all || i == last); };
  std::vector<TemplateSegment> out;
  switch (tmpl) {
    case ChatTemplate::llama2: {
      size_t i = 0;
      std::string system_block;
      if (messages[0].role == Role::system) {
        system_block = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n";
        i = 1;
      }
      for (; i + 1 < messages.size(); i += 2) {
        out.push_back(bos());
        out.push_back(text("[INST] " + system_block + messages[i].content + " [/INST]", false));
        system_block.clear();
        const bool label = trained(i + 1);
        out.push_back(text(" " + messages[i + 1].content, label));
        out.push_back({TemplateSegment::Kind::eos, {}, label});
      }
      break;
    }
    case ChatTemplate::chatml: {
      if (add_bos) out.push_back(bos());
      for (size_t i = 0; i < messages.size(); ++i) {
        const Message& m = messages[i];
        const bool label = trained(i);
        out.push_back(special("<|im_start|>", false));
        out.push_back(text(std::string(role_name(m.role)) + "\n", false));
        out.push_back(text(m.content, label));
        out.push_back(special("<|im_end|>", label));
        out.push_back(text("\n", false));
      }
      break;
    }
    case ChatTemplate::model:
      FT_FAIL("[records] the 'model' chat template renders through ModelChatTemplate");
  }
  return out;
}

Example tokenize_segments(std::span<const TemplateSegment> segments, const TokenEncoder& encoder) {
  const SpecialTokens sp = encoder.special();
  Example ex;
  std::string run;  // text waiting to be encoded, all with the same trainability
  bool run_trainable = false;
  bool at_start = true;  // document start or right after BOS: encode with the dummy prefix

  auto flush = [&] {
    if (run.empty()) return;
    const std::vector<int32_t> ids = at_start ? encoder.encode_start(run) : encoder.encode_continuation(run);
    ex.tokens.insert(ex.tokens.end(), ids.begin(), ids.end());
    ex.trainable.insert(ex.trainable.end(), ids.size(), run_trainable ? 1 : 0);
    run.clear();
    at_start = false;
  };
  auto push_id = [&](int32_t id, bool trainable) {
    flush();
    ex.tokens.push_back(id);
    ex.trainable.push_back(trainable ? 1 : 0);
    at_start = false;
  };
  auto push_text = [&](const std::string& s, bool trainable) {
    if (s.empty()) return;
    if (!run.empty() && run_trainable != trainable) flush();
    run += s;
    run_trainable = trainable;
  };

  for (const TemplateSegment& s : segments) {
    switch (s.kind) {
      case TemplateSegment::Kind::bos:
        FT_CHECK(sp.bos >= 0, "[records] the rendering needs a BOS token but the tokenizer has none");
        push_id(sp.bos, s.trainable);
        at_start = true;
        break;
      case TemplateSegment::Kind::eos:
        FT_CHECK(sp.eos >= 0, "[records] the rendering needs an EOS token but the tokenizer has none");
        push_id(sp.eos, s.trainable);
        break;
      case TemplateSegment::Kind::special:
        if (const int32_t id = encoder.piece_id(s.text); id >= 0) {
          push_id(id, s.trainable);
        } else {
          push_text(s.text, s.trainable);
        }
        break;
      case TemplateSegment::Kind::text:
        push_text(s.text, s.trainable);
        break;
    }
  }
  flush();
  return ex;
}

}  // namespace ft::data
