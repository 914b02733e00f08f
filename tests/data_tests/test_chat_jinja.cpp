// Checkpoints' own chat templates: the Jinja subset (jinja.h) and ModelChatTemplate's rendering,
// labels and tokenization. The unit tests here need nothing else; the ChatTemplateParity tests compare
// with what jinja2 and transformers' apply_chat_template produce for the same templates and
// conversations (tests/python/chat_template_reference.py, run by ctest before them).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "ft/data/chat_template.h"
#include "ft/data/jinja.h"
#include "ft/data/records.h"
#include "ft/data/tokenizer.h"
#include "ft/util/error.h"
#include "records_test_util.h"

namespace fs = std::filesystem;
using ft::data::Message;
using ft::data::ModelChatTemplate;
using ft::data::Role;
using ft::data::TemplateSegment;
using ft::test::error_of;
namespace jinja = ft::data::jinja;

namespace {

// Every example the record reader makes of `file` with the chat template `tmpl`.
std::vector<ft::data::Example> read_examples(const std::filesystem::path& file, ft::data::RecordFormat format,
                                             const std::string& tmpl, const ft::data::TokenEncoder& enc,
                                             ft::data::TrainTurns turns = ft::data::TrainTurns::all) {
  ft::data::RecordOptions ro;
  ro.format = format;
  ft::data::TokenizeOptions to;
  to.chat_template = tmpl;
  to.train_turns = turns;
  ft::data::ExampleReader reader({file.string()}, ro, to, {}, enc);
  std::vector<ft::data::Example> out;
  ft::data::Example ex;
  ft::data::RecordOrigin origin;
  while (reader.next(ex, origin)) out.push_back(ex);
  return out;
}

std::string render(const std::string& source, const jinja::Dict& vars = {}) {
  return jinja::Template(source, "t").render(vars);
}

jinja::Value messages_value(const std::vector<Message>& messages) {
  jinja::List list;
  for (const auto& m : messages) {
    list.emplace_back(jinja::Dict{{"role", ft::data::role_name(m.role)}, {"content", m.content}});
  }
  return jinja::Value(std::move(list));
}

const std::vector<Message> kTwoTurns = {{Role::system, "Be brief."},
                                        {Role::user, "Hi"},
                                        {Role::assistant, "Hello!"},
                                        {Role::user, "Bye"},
                                        {Role::assistant, "See you."}};

// ByteEncoder (one id per byte, a sentencepiece-like dummy space at document starts) with a chat
// template and pieces to cut out.
class TemplateEncoder final : public ft::data::TokenEncoder {
 public:
  TemplateEncoder(std::string source, std::vector<std::string> pieces)
      : source_(std::move(source)), pieces_(pieces), bytes_(std::move(pieces)) {}
  std::vector<int32_t> encode_start(std::string_view t) const override { return bytes_.encode_start(t); }
  std::vector<int32_t> encode_continuation(std::string_view t) const override { return bytes_.encode_continuation(t); }
  int32_t piece_id(std::string_view p) const override {
    if (p == "<s>") return ft::test::ByteEncoder::kBos;
    if (p == "</s>") return ft::test::ByteEncoder::kEos;
    return bytes_.piece_id(p);
  }
  ft::data::SpecialTokens special() const override { return bytes_.special(); }
  std::string piece(int32_t id) const override {
    return id == ft::test::ByteEncoder::kBos ? "<s>" : id == ft::test::ByteEncoder::kEos ? "</s>" : "";
  }
  std::vector<std::string> split_pieces() const override {
    std::vector<std::string> all = pieces_;
    all.insert(all.end(), {"<s>", "</s>"});
    return all;
  }
  std::pair<std::string, std::string> chat_template() const override { return {source_, "test.jinja"}; }
  std::string render(std::span<const int32_t> ids) const { return bytes_.render(ids); }

 private:
  std::string source_;
  std::vector<std::string> pieces_;
  ft::test::ByteEncoder bytes_;
};

// The labelled text of an example, with labelled runs in [[ ]].
std::string labelled(const ft::data::Example& ex, const TemplateEncoder& enc) {
  std::string out;
  bool in = false;
  for (size_t i = 0; i < ex.tokens.size(); ++i) {
    const bool label = ex.trainable[i] != 0;
    if (label != in) out += label ? "[[" : "]]";
    in = label;
    out += enc.render(std::span<const int32_t>(&ex.tokens[i], 1));
  }
  if (in) out += "]]";
  return out;
}

const char* const kChatml =
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

}  // namespace

// ---------------------------------------------------------------------------------------------
// The Jinja subset (expected outputs from jinja2 3.1.6 as transformers configures it)

TEST(Jinja, TrimsBlocksAndStripsLinesAsTransformersConfiguresIt) {
  const std::string t =
      "<s>\n{% for m in messages %}\n    {%- if m.role == 'user' %}\n  [U] {{ m.content | trim }}\n    {% else %}\n"
      "  [A] {{ m.content }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n{# done #}\nend\n";
  const std::vector<Message> msgs = {{Role::user, " hi "}, {Role::assistant, "yo"}};
  EXPECT_EQ(render(t, {{"messages", messages_value(msgs)}, {"eos_token", "</s>"}}), "<s>\n  [U] hi\n  [A] yo</s>\nend");
}

TEST(Jinja, PrintsValuesAsPython) {
  EXPECT_EQ(render("{{ 1.5e16 }} {{ 123456.789 }} {{ 1/3 }} {{ 2.0**0.5 }} {{ -0.0 }} {{ 1e-4 }} {{ 12345678901234567890.0 }}"),
            "1.5e+16 123456.789 0.3333333333333333 1.4142135623730951 -0.0 0.0001 1.2345678901234567e+19");
  EXPECT_EQ(render("{{ [1, 'a', none, true] }} {{ {'k': \"it's\"} }} {{ (1,) }} {{ missing }}"),
            "[1, 'a', None, True] {'k': \"it's\"} (1,) ");
}

TEST(Jinja, ErrorsNameTheTemplateLineAndColumn) {
  EXPECT_EQ(error_of([] { render("ok\n{% if x %}\n{{ 1 + }}\n{% endif %}"); }),
            "[chat template] t:3:8: unexpected '}}' in an expression");
  EXPECT_EQ(error_of([] { render("{% for x in y %}\n{% endif %}"); }),
            "[chat template] t:2:1: unexpected '{% endif %}' (the open block ends with '{% endfor %}')");
  EXPECT_EQ(error_of([] { render("a\n  {{ raise_exception('Roles must alternate') }}"); }),
            "[chat template] t:2:21: the template raised an error: Roles must alternate");
  // (a message that looks like libft's own errors still gets its place: found by fuzz_jinja, where it
  // escaped as a std::runtime_error)
  EXPECT_EQ(error_of([] { render("{{ raise_exception('[chat template] no') }}"); }),
            "[chat template] t:1:19: the template raised an error: [chat template] no");
  EXPECT_EQ(error_of([] { render("{{ messages[0].content }}"); }), "[chat template] t:1:12: 'messages' is undefined");
  EXPECT_EQ(error_of([] { render("{% set x = [] %}{{ x.append(1) }}"); }),
            "[chat template] t:1:28: list.append() is not allowed: the template sandbox is immutable (as transformers')");
  // Unknown filters and tests are refused when the template is parsed, before any rendering.
  EXPECT_EQ(error_of([] { jinja::Template("{% if false %}{{ 'a' | nofilter }}{% endif %}", "t"); }),
            "[chat template] t:1:22: unknown filter 'nofilter'");
  EXPECT_EQ(error_of([] { jinja::Template("{{ 1 is prime }}", "t"); }), "[chat template] t:1:6: unknown test 'prime'");
  EXPECT_EQ(error_of([] { render("{% include 'x' %}"); }),
            "[chat template] t:1:1: the 'include' tag is not supported in chat templates");
}

TEST(Jinja, SandboxLimitsEndRunawayTemplates) {
  EXPECT_NE(error_of([] { render("{{ range(100001) | length }}"); }).find("range() is limited to 100000 items"),
            std::string::npos);
  EXPECT_EQ(render("{{ range(100000) | length }}"), "100000");
  EXPECT_NE(error_of([] { render("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"); }).find("64 MiB"),
            std::string::npos);
  EXPECT_NE(error_of([] { render("{{ " + std::string(400, '(') + "1" + std::string(400, ')') + " }}"); })
                .find("nested more than 256 deep"),
            std::string::npos);
  EXPECT_NE(error_of([] { render("{{ 'ab' * 100000000 }}"); }).find("too large"), std::string::npos);
  std::string chain = "{{ 1";
  for (int i = 0; i < 20000; ++i) chain += " + 1";
  EXPECT_NE(error_of([&] { render(chain + " }}"); }).find("more than 10000 operands in a row"), std::string::npos);
  std::string blocks;
  for (int i = 0; i < 300; ++i) blocks += "{% if true %}";
  EXPECT_NE(error_of([&] { render(blocks); }).find("nested more than 256 deep"), std::string::npos);
  EXPECT_EQ(jinja::Value().name(), "");
  EXPECT_NE(error_of([] { render("{% for i in range(1001) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"); })
                .find("more than a million loop iterations"),
            std::string::npos);
}

TEST(Jinja, MacrosSeeNamespacesAndNestAtMost64Deep) {
  // A macro kept in a namespace calls itself through it (as jinja2 allows: "0123 4"); unbounded
  // recursion that way is cut at 64 macro calls.
  const std::string recurse =
      "{% set ns = namespace(n=0) %}{% macro f(k) %}{% set ns.n = ns.n + 1 %}{% if k > 0 %}{{ ns.f(k - 1) }}"
      "{% endif %}{{ k }}{% endmacro %}{% set ns.f = f %}";
  EXPECT_EQ(render(recurse + "{{ f(3) }} {{ ns.n }}"), "0123 4");
  EXPECT_NE(error_of([&] { render(recurse + "{{ f(100) }}"); }).find("macros nest more than 64 deep"), std::string::npos);
  EXPECT_EQ(render("{% macro g(a, b='x') %}{{ a }}{{ b }}{% endmacro %}{{ g(1) }}{{ g(2, b=3) }}"), "1x23");
}

TEST(Jinja, GenerationBlocksReportWhatTheyWrote) {
  jinja::Template t("a{% generation %}b{{ x }}{% endgeneration %}c{% generation %}{% endgeneration %}", "t");
  EXPECT_TRUE(t.has_generation());
  jinja::Spans spans;
  EXPECT_EQ(t.render({{"x", "XY"}}, &spans), "abXYc");
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0], std::make_pair(size_t{1}, size_t{4}));
  EXPECT_EQ(spans[1], std::make_pair(size_t{5}, size_t{5}));
}

// ---------------------------------------------------------------------------------------------
// ModelChatTemplate with a stand-in encoder

TEST(ModelChatTemplate, LabelsWhatEachAssistantTurnAdds) {
  const TemplateEncoder enc(kChatml, {"<|im_start|>", "<|im_end|>"});
  const ModelChatTemplate tmpl(enc);
  const auto ex = ft::data::tokenize_segments(tmpl.render(kTwoTurns), enc);
  // The header up to "assistant\n" comes with the generation prompt, so it is not a label; the
  // content, <|im_end|> and the newline after it are.
  EXPECT_EQ(labelled(ex, enc),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "[[Hello!<|im_end|>\n]]<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[See you.<|im_end|>\n]]");
  // <|im_start|> and <|im_end|> are single ids, and only the document's first text has the dummy
  // space (here: none, the document starts with a piece).
  EXPECT_EQ(ex.tokens[0], ft::test::ByteEncoder::kFirstPiece);
  EXPECT_EQ(enc.render(std::span<const int32_t>(ex.tokens.data() + 1, 6)), "system");
}

TEST(ModelChatTemplate, TextAfterBosIsAContinuationAsInHuggingFace) {
  const TemplateEncoder enc(
      "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token + '[INST] ' + m.content + ' [/INST]' }}"
      "{% elif m.role == 'assistant' %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}{% endfor %}",
      {});
  const ModelChatTemplate tmpl(enc);
  const std::vector<Message> msgs = {{Role::user, "Q"}, {Role::assistant, "A"}};
  EXPECT_EQ(tmpl.render_text(msgs, false), "<s>[INST] Q [/INST] A </s>");
  const auto ex = ft::data::tokenize_segments(tmpl.render(msgs), enc);
  EXPECT_EQ(ex.tokens.front(), ft::test::ByteEncoder::kBos);
  EXPECT_EQ(labelled(ex, enc), "<s>[INST] Q [/INST][[ A </s>]]");  // no dummy space after <s>
}

TEST(ModelChatTemplate, GenerationBlocksAreTheLabels) {
  const TemplateEncoder enc(
      "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
      {});
  const ModelChatTemplate tmpl(enc);
  const auto ex = ft::data::tokenize_segments(tmpl.render(kTwoTurns), enc);
  // (trim_blocks eats the newline after {% endif %})
  EXPECT_EQ(labelled(ex, enc), " <system>Be brief.<user>Hi<assistant>[[Hello!]]<user>Bye<assistant>[[See you.]]");
}

TEST(ModelChatTemplate, TakesVariablesAsApplyChatTemplatesKeywordArguments) {
  // As Qwen3's enable_thinking: the generation prompt closes an empty reasoning block, so the
  // labels are the answer alone.
  const TemplateEncoder enc(
      "{{ date | default('') }}|{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and not "
      "enable_thinking %}<think></think>{% endif %}{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
      "assistant: {% if not enable_thinking %}<think></think>{% endif %}{% endif %}",
      {});
  const std::vector<Message> msgs = {{Role::user, "Q"}, {Role::assistant, "A"}};
  const ModelChatTemplate off(enc, {ft::data::parse_template_var("enable_thinking=false"),
                                    ft::data::parse_template_var("date=26 Jul 2024")});
  EXPECT_EQ(labelled(ft::data::tokenize_segments(off.render(msgs), enc), enc),
            " 26 Jul 2024|user: Q\nassistant: <think></think>[[A\n]]");
  EXPECT_EQ(ft::data::parse_template_var("n=[1, 2]"), std::make_pair(std::string("n"), std::string("[1, 2]")));
  EXPECT_EQ(ft::data::parse_template_var("s=it's"), std::make_pair(std::string("s"), std::string("\"it's\"")));
  EXPECT_EQ(error_of([] { ft::data::parse_template_var("novalue"); }),
            "[records] template variable 'novalue' is not NAME=VALUE");
  EXPECT_EQ(error_of([] { ft::data::parse_template_var("a-b=1"); }),
            "[records] template variable 'a-b' is not a name (letters, digits, _)");
  EXPECT_EQ(error_of([&] { ModelChatTemplate t(enc, {{"messages", "[]"}}); }),
            "[records] template variable 'messages' is set by libft itself");
}

TEST(ModelChatTemplate, TemplateFilesReplaceTheCheckpoints) {
  // The Qwen3-like template below cannot be labelled; the same format from a file with {% generation %}
  // blocks can (the encoder's own template is ignored).
  const TemplateEncoder enc("{% for m in messages %}{% if loop.last %}<think></think>{% endif %}{% endfor %}", {});
  const std::string dir = ft::test::scratch_dir("chat_template_file");
  const std::string path = dir + "/labelled.jinja";
  ft::test::write_file(path,
                       "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}"
                       "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}\n");
  EXPECT_TRUE(ft::data::is_template_file(path));
  EXPECT_EQ(ft::data::parse_chat_template(path), ft::data::ChatTemplate::model);
  const ModelChatTemplate tmpl(enc, path, {});
  EXPECT_EQ(tmpl.file(), path);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(tmpl.render(kTwoTurns), enc), enc),
            " system: Be brief.user: Hiassistant: [[Hello!]]user: Byeassistant: [[See you.]]");  // (trim_blocks)
  EXPECT_NE(error_of([&] { ModelChatTemplate t(enc, dir + "/missing.jinja", {}); }).find("missing.jinja: cannot open"),
            std::string::npos);
}

TEST(ModelChatTemplate, ReasoningContentIsTrainedWithItsTurn) {
  // A record's reasoning_content reaches the template (here as Qwen3's renders it, in <think>), and
  // the labels are what the turn adds after the generation prompt: the reasoning and the answer.
  const TemplateEncoder enc(
      "{% for m in messages %}<|im_start|>{{ m.role }}\n"
      "{% if m.role == 'assistant' and m.reasoning_content is defined %}<think>\n{{ m.reasoning_content }}\n"
      "</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
      {"<|im_start|>", "<|im_end|>"});
  const std::string dir = ft::test::scratch_dir("chat_reasoning");
  ft::test::write_file(dir + "/r.jsonl",
                       R"({"messages": [{"role": "user", "content": "2+2?"}, )"
                       R"({"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}]})"
                       "\n");
  const auto examples = read_examples(dir + "/r.jsonl", ft::data::RecordFormat::chat, "model", enc);
  ASSERT_EQ(examples.size(), 1u);
  // (rendered by jinja2 3.1.6 with transformers' settings: the same text)
  EXPECT_EQ(labelled(examples[0], enc),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
            "[[<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n]]");
  // libft's own templates have no place for it: the record is bad, not trained without its reasoning.
  EXPECT_NE(error_of([&] { read_examples(dir + "/r.jsonl", ft::data::RecordFormat::chat, "chatml", enc); })
                .find("the chatml template has no place for an assistant's reasoning (reasoning_content, thinking)"),
            std::string::npos);
}

TEST(ModelChatTemplate, ContentPartsReachTheTemplateAsAList) {
  // Templates of newer checkpoints render a list of content parts themselves; libft's chatml gets
  // the texts joined.
  const TemplateEncoder enc(
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
      "{% for p in m.content %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
      {"<|im_start|>", "<|im_end|>"});
  const std::string dir = ft::test::scratch_dir("chat_parts");
  ft::test::write_file(dir + "/p.jsonl",
                       R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "2+"}, )"
                       R"({"type": "text", "text": "2?"}]}, {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]})"
                       "\n");
  const auto model = read_examples(dir + "/p.jsonl", ft::data::RecordFormat::chat, "model", enc);
  ASSERT_EQ(model.size(), 1u);
  EXPECT_EQ(labelled(model[0], enc),
            "<|im_start|>user\n[text:2+][text:2?]<|im_end|>\n<|im_start|>assistant\n[[[text:4]<|im_end|>\n]]");
  const auto chatml = read_examples(dir + "/p.jsonl", ft::data::RecordFormat::chat, "chatml", enc);
  ASSERT_EQ(chatml.size(), 1u);
  EXPECT_EQ(labelled(chatml[0], enc), "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[4<|im_end|>]]\n");
}

TEST(ModelChatTemplate, RefusesTemplatesWhoseTurnsDoNotExtendEachOther) {
  // As Qwen3's template: only the last assistant turn keeps its reasoning block.
  const TemplateEncoder enc(
      "{% for m in messages %}{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}"
      "{{ m.role }}: {{ m.content }}\n{% endfor %}",
      {});
  const ModelChatTemplate tmpl(enc);
  EXPECT_EQ(error_of([&] { tmpl.render(kTwoTurns); }),
            "[records] chat template test.jinja: messages[2] (an assistant turn) renders differently once later "
            "messages follow, so its text cannot be told apart; train the last assistant turn only (--train-turns "
            "last), use a template with {% generation %} blocks, or give one conversation per assistant turn");
  // One assistant turn is fine.
  EXPECT_NO_THROW(tmpl.render(std::span<const Message>(kTwoTurns).first(3)));

  const TemplateEncoder no_template("", {});
  EXPECT_NE(error_of([&] { ModelChatTemplate t(no_template); }).find("the tokenizer has none"), std::string::npos);
  const TemplateEncoder broken("{% for m in messages %}", {});
  EXPECT_EQ(error_of([&] { ModelChatTemplate t(broken); }),
            "[chat template] test.jinja:1:24: unexpected end of template: expected '{% endfor %}'");
}

TEST(ModelChatTemplate, TrainsTheLastTurnAloneWhereAskedTo) {
  using ft::data::TrainTurns;
  // The Qwen3-like template of the test above: with TrainTurns::last the earlier turn is context,
  // rendered as the whole conversation renders it, and only the final turn is labelled.
  const TemplateEncoder qwen3(
      "{% for m in messages %}{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}"
      "{{ m.role }}: {{ m.content }}\n{% endfor %}",
      {});
  const ModelChatTemplate q(qwen3);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(q.render(kTwoTurns, "", TrainTurns::last), qwen3), qwen3),
            " system: Be brief.\nuser: Hi\nassistant: Hello!\nuser: Bye\n[[<think></think>assistant: See you.\n]]");
  // ChatML, whose turns extend each other: the last turn's labels are those of TrainTurns::all.
  const TemplateEncoder enc(kChatml, {"<|im_start|>", "<|im_end|>"});
  const ModelChatTemplate chatml(enc);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(chatml.render(kTwoTurns, "", TrainTurns::last), enc), enc),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[See you.<|im_end|>\n]]");
  // {% generation %} blocks: those of the last turn.
  const TemplateEncoder gen(
      "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>"
      "{% endif %}",
      {});
  const ModelChatTemplate g(gen);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(g.render(kTwoTurns, "", TrainTurns::last), gen), gen),
            " <system>Be brief.<user>Hi<assistant>Hello!<user>Bye<assistant>[[See you.]]");
  // A template whose context changes once the last turn follows cannot place that turn.
  const TemplateEncoder moving("{% for m in messages %}{% if not loop.last %}{{ m.content }};{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}>{% endif %}",
                               {});
  EXPECT_EQ(error_of([&] { ModelChatTemplate(moving).render(kTwoTurns, "", TrainTurns::last); }),
            "[records] chat template test.jinja: the rendering does not start with the rendering before its last "
            "assistant turn (messages[4]) plus the generation prompt, so that turn cannot be told apart");

  // libft's own templates.
  const auto chatml_last = ft::data::render_chat(ft::data::ChatTemplate::chatml, kTwoTurns, false, TrainTurns::last);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(chatml_last, enc), enc),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[See you.<|im_end|>]]\n");
  const auto llama2_last = ft::data::render_chat(ft::data::ChatTemplate::llama2, kTwoTurns, false, TrainTurns::last);
  EXPECT_EQ(labelled(ft::data::tokenize_segments(llama2_last, enc), enc),
            "<s> [INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello!</s><s> [INST] Bye [/INST][[ See you.</s>]]");

  // Through the records reader; train_turns is for chat records only.
  const std::string dir = ft::test::scratch_dir("chat_train_turns");
  ft::test::write_file(dir + "/c.jsonl",
                       R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, )"
                       R"({"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]})"
                       "\n");
  const auto examples = read_examples(dir + "/c.jsonl", ft::data::RecordFormat::chat, "model", qwen3, TrainTurns::last);
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(labelled(examples[0], qwen3), " user: Hi\nassistant: Hello!\nuser: Bye\n[[<think></think>assistant: See you.\n]]");
  EXPECT_NE(error_of([&] { read_examples(dir + "/c.jsonl", ft::data::RecordFormat::chat, "model", qwen3); })
                .find("(--train-turns last)"),
            std::string::npos);
  ft::test::write_file(dir + "/i.jsonl", R"({"prompt": "Q", "completion": "A"})" "\n");
  EXPECT_EQ(error_of([&] {
              read_examples(dir + "/i.jsonl", ft::data::RecordFormat::instruction, "chatml", enc, TrainTurns::last);
            }),
            "[records] train_turns applies to chat records only, not to instruction");
  EXPECT_EQ(ft::data::parse_train_turns("last"), TrainTurns::last);
  EXPECT_EQ(error_of([] { ft::data::parse_train_turns("first"); }),
            "[records] train_turns 'first' is not all, last or each");

  // TrainTurns::each: one example per assistant turn, the conversation up to it, trained on it.
  const auto each = read_examples(dir + "/c.jsonl", ft::data::RecordFormat::chat, "model", qwen3, TrainTurns::each);
  ASSERT_EQ(each.size(), 2u);
  EXPECT_EQ(labelled(each[0], qwen3), " user: Hi\n[[<think></think>assistant: Hello!\n]]");
  EXPECT_EQ(labelled(each[1], qwen3), " user: Hi\nassistant: Hello!\nuser: Bye\n[[<think></think>assistant: See you.\n]]");
  const auto each_chatml = read_examples(dir + "/c.jsonl", ft::data::RecordFormat::chat, "chatml", enc, TrainTurns::each);
  ASSERT_EQ(each_chatml.size(), 2u);
  EXPECT_EQ(labelled(each_chatml[0], enc),
            "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n");
  // A record whose later turn the template refuses is bad as a whole, the turn named.
  const TemplateEncoder picky("{% for m in messages %}{% if m.content == 'See you.' %}{{ raise_exception('no') }}"
                              "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
                              "assistant: {% endif %}",
                              {});
  EXPECT_NE(error_of([&] { read_examples(dir + "/c.jsonl", ft::data::RecordFormat::chat, "model", picky, TrainTurns::each); })
                .find("turn 2 of 2 (messages[3]): [chat template] test.jinja:1:"),
            std::string::npos);
}

TEST(ModelChatTemplate, ThinkingAndTheDeveloperRoleReachTheTemplate) {
  // gpt-oss's names: an assistant's "thinking" (its analysis channel) and a first "developer"
  // message. libft's own templates have a place for neither.
  const TemplateEncoder enc(
      "{% for m in messages %}<|start|>{{ m.role }}{% if m.thinking is defined %}<|channel|>analysis<|message|>"
      "{{ m.thinking }}<|end|><|start|>{{ m.role }}{% endif %}<|message|>{{ m.content }}<|end|>{% endfor %}"
      "{% if add_generation_prompt %}<|start|>assistant{% endif %}",
      {"<|start|>", "<|channel|>", "<|message|>", "<|end|>"});
  const std::string dir = ft::test::scratch_dir("chat_thinking");
  ft::test::write_file(dir + "/t.jsonl",
                       R"({"messages": [{"role": "developer", "content": "Be exact."}, {"role": "user", "content": "2+2?"}, )"
                       R"({"role": "assistant", "content": "4", "thinking": "Two and two."}]})"
                       "\n");
  const auto examples = read_examples(dir + "/t.jsonl", ft::data::RecordFormat::chat, "model", enc);
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(labelled(examples[0], enc),
            "<|start|>developer<|message|>Be exact.<|end|><|start|>user<|message|>2+2?<|end|><|start|>assistant"
            "[[<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|message|>4<|end|>]]");
  EXPECT_NE(error_of([&] { read_examples(dir + "/t.jsonl", ft::data::RecordFormat::chat, "chatml", enc); })
                .find("the chatml template has no developer role"),
            std::string::npos);
  ft::test::write_file(dir + "/both.jsonl",
                       R"({"messages": [{"role": "user", "content": "2+2?"}, )"
                       R"({"role": "assistant", "content": "4", "thinking": "a", "reasoning_content": "b"}]})"
                       "\n");
  EXPECT_NE(error_of([&] { read_examples(dir + "/both.jsonl", ft::data::RecordFormat::chat, "model", enc); })
                .find("messages[1] has both reasoning_content and thinking; give one"),
            std::string::npos);
  ft::test::write_file(dir + "/late.jsonl",
                       R"({"messages": [{"role": "user", "content": "2+2?"}, {"role": "developer", "content": "x"}]})"
                       "\n");
  EXPECT_NE(error_of([&] { read_examples(dir + "/late.jsonl", ft::data::RecordFormat::chat, "model", enc); })
                .find("messages[1]: a developer message may only come first"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Against jinja2 and transformers

namespace {

fs::path reference_dir() {
  const char* env = std::getenv("LIBFT_CHAT_REFERENCE_DIR");
  return env && *env ? fs::path(env) : fs::path();
}

// Messages as the JSONL reader makes them: tool calls and ids in fields_json.
std::vector<Message> messages_of(const nlohmann::ordered_json& j) {
  std::vector<Message> out;
  for (const auto& m : j) {
    const std::string role = m.at("role");
    Message msg{role == "system"      ? Role::system
                : role == "developer" ? Role::developer
                : role == "user"      ? Role::user
                : role == "tool"      ? Role::tool
                                      : Role::assistant,
                m.contains("content") && m["content"].is_string() ? m["content"].get<std::string>() : ""};
    nlohmann::ordered_json fields = nlohmann::ordered_json::object();
    for (const auto& [k, v] : m.items()) {
      if (k != "role" && (k != "content" || !v.is_string())) fields[k] = v;
    }
    if (!fields.empty()) msg.fields_json = fields.dump();
    out.push_back(std::move(msg));
  }
  return out;
}

std::string tools_of(const nlohmann::ordered_json& c) { return c.contains("tools") ? c["tools"].dump() : ""; }

#define REQUIRE_CHAT_REFERENCE()                                                                     \
  const fs::path ref_dir = reference_dir();                                                          \
  if (ref_dir.empty()) GTEST_SKIP() << "LIBFT_CHAT_REFERENCE_DIR is not set (ctest sets it)";        \
  ASSERT_TRUE(fs::exists(ref_dir / "chat_reference.json")) << ref_dir << ": the Python step did not run"; \
  const auto ref = nlohmann::ordered_json::parse(ft::test::read_file((ref_dir / "chat_reference.json").string()))

}  // namespace

TEST(ChatTemplateParity, RendersAsJinja2) {
  REQUIRE_CHAT_REFERENCE();
  int renders = 0, errors = 0;
  for (const auto& c : ref.at("render")) {
    const std::string name = c.at("name");
    SCOPED_TRACE(name);
    const jinja::Value context = jinja::Value::parse_json(c.at("context").dump(), name);
    std::string got, error;
    try {
      got = jinja::Template(c.at("template").get<std::string>(), name).render(context.as_dict());
    } catch (const ft::Error& e) {
      error = e.what();
    }
    if (c.contains("expected")) {
      EXPECT_EQ(error, "");
      EXPECT_EQ(got, c.at("expected").get<std::string>());
      ++renders;
    } else {
      EXPECT_NE(error, "") << "rendered " << got;
      EXPECT_NE(error.find("[chat template] " + name + ":"), std::string::npos) << error;
      EXPECT_NE(error.find(c.at("error").get<std::string>()), std::string::npos) << error;
      ++errors;
    }
  }
  EXPECT_GE(renders, 150);
  EXPECT_GE(errors, 10);
}

TEST(ChatTemplateParity, TokenizesAsApplyChatTemplate) {
  REQUIRE_CHAT_REFERENCE();
  std::map<std::string, ft::data::Tokenizer> tokenizers;
  int cases = 0, straddling = 0, refused = 0;
  for (const auto& c : ref.at("tokenize")) {
    const std::string name = c.at("name"), tok_name = c.at("tokenizer");
    SCOPED_TRACE(name);
    if (!tokenizers.count(tok_name)) tokenizers.emplace(tok_name, ft::data::Tokenizer::load((ref_dir / tok_name).string()));
    const ft::data::TokenizerEncoder enc(tokenizers.at(tok_name));
    std::vector<std::pair<std::string, std::string>> vars;  // apply_chat_template's keyword arguments
    if (c.contains("template_vars")) {
      for (const auto& [k, v] : c["template_vars"].items()) vars.emplace_back(k, v.dump());
    }
    const ModelChatTemplate tmpl(enc, vars);
    const auto messages = messages_of(c.at("messages"));
    if (!c.contains("tools")) {
      EXPECT_EQ(tmpl.render_text(messages, false), c.at("rendered").get<std::string>());
    }
    const auto turns = ft::data::parse_train_turns(c.at("train_turns").get<std::string>());
    const auto ex = ft::data::tokenize_segments(tmpl.render(messages, tools_of(c), turns), enc);
    // Where the turns do not extend each other, labelling every turn is refused, not guessed.
    if (c.at("all_fails").get<bool>()) {
      EXPECT_NE(error_of([&] { tmpl.render(messages, tools_of(c)); }).find("(--train-turns last)"), std::string::npos);
      ++refused;
    }
    const bool straddles = c.at("straddles");
    // Where one of transformers' tokens crosses a label boundary, libft cuts the text there (as the
    // generation prompt is tokenized alone at inference): the pieces, tokenized one by one.
    const auto& ids = c.at(straddles ? "piece_ids" : "ids");
    const auto& labels = c.at(straddles ? "piece_labels" : "labels");
    EXPECT_EQ(ex.tokens, ids.get<std::vector<int32_t>>());
    std::vector<uint8_t> want(labels.begin(), labels.end());
    EXPECT_EQ(ex.trainable, want);
    ++cases;
    straddling += straddles;
  }
  EXPECT_GE(cases, 20);
  EXPECT_LE(straddling, 2);
  EXPECT_GE(refused, 1);
}

TEST(ChatTemplateParity, ToolUseRecordsPrepareAsApplyChatTemplate) {
  REQUIRE_CHAT_REFERENCE();
  // The tool conversation as a JSONL record ("tools", "tool_calls", tool messages) through the reader
  // and the checkpoint's ChatML template with its tools branch: transformers' ids, and labels on the
  // assistant turns only (tool calls included, tool results not).
  const auto tok = ft::data::Tokenizer::load((ref_dir / "tok_qwen2").string());
  const ft::data::TokenizerEncoder enc(tok);
  const fs::path dir = ft::test::scratch_dir("chat_template_tools");
  int found = 0;
  for (const auto& c : ref.at("tokenize")) {
    if (!c.contains("tools") || c.at("tokenizer") != "tok_qwen2") continue;
    ++found;
    std::ofstream(dir / "tools.jsonl") << nlohmann::ordered_json{{"messages", c.at("messages")}, {"tools", c.at("tools")}}.dump()
                                       << "\n";
    const auto examples = read_examples(dir / "tools.jsonl", ft::data::RecordFormat::chat, "model", enc);
    ASSERT_EQ(examples.size(), 1u);
    EXPECT_EQ(examples[0].tokens, c.at("ids").get<std::vector<int32_t>>());
    const auto& labels = c.at("labels");
    EXPECT_EQ(examples[0].trainable, std::vector<uint8_t>(labels.begin(), labels.end()));
    // With libft's chatml the record is bad, not silently rendered without its tools.
    EXPECT_NE(error_of([&] { read_examples(dir / "tools.jsonl", ft::data::RecordFormat::chat, "chatml", enc); })
                  .find("use the checkpoint's own (--template model)"),
              std::string::npos);
  }
  EXPECT_EQ(found, 1);
}

TEST(ChatTemplateParity, EachTurnPreparesAsItsOwnConversation) {
  REQUIRE_CHAT_REFERENCE();
  // Harmony's two-turn conversation as a JSONL record (reasoning in "thinking") with train_turns
  // each: one example per assistant turn, each the conversation up to it trained on it alone, as
  // apply_chat_template renders those prefixes.
  const auto tok = ft::data::Tokenizer::load((ref_dir / "tok_harmony").string());
  const ft::data::TokenizerEncoder enc(tok);
  const nlohmann::ordered_json* first = nullptr;
  const nlohmann::ordered_json* both = nullptr;
  for (const auto& c : ref.at("tokenize")) {
    if (c.at("name") == "harmony_multi_turn_first_harmony") first = &c;
    if (c.at("name") == "harmony_multi_turn_harmony") both = &c;
  }
  ASSERT_TRUE(first && both);
  const fs::path dir = ft::test::scratch_dir("chat_template_each");
  std::ofstream(dir / "each.jsonl") << nlohmann::ordered_json{{"messages", both->at("messages")}}.dump() << "\n";
  ft::data::RecordOptions ro;
  ro.format = ft::data::RecordFormat::chat;
  ft::data::TokenizeOptions to;
  to.chat_template = "model";
  to.train_turns = ft::data::TrainTurns::each;
  for (const auto& [k, v] : both->at("template_vars").items()) to.template_vars.emplace_back(k, v.dump());
  ft::data::ReadReport report;
  const auto examples = ft::data::read_examples({(dir / "each.jsonl").string()}, ro, to, {}, enc, &report);
  ASSERT_EQ(examples.size(), 2u);
  EXPECT_EQ(report.records, 1);
  EXPECT_EQ(report.examples, 2);
  const nlohmann::ordered_json* want[2] = {first, both};
  for (size_t n = 0; n < 2; ++n) {
    EXPECT_EQ(examples[n].tokens, want[n]->at("ids").get<std::vector<int32_t>>()) << "turn " << n;
    const auto& labels = want[n]->at("labels");
    EXPECT_EQ(examples[n].trainable, std::vector<uint8_t>(labels.begin(), labels.end())) << "turn " << n;
  }
}

TEST(ChatTemplateParity, ReadsTheCheckpointsTemplate) {
  REQUIRE_CHAT_REFERENCE();
  // tok_llama3 keeps its template in tokenizer_config.json, tok_qwen2 and tok_sp in chat_template.jinja.
  const auto llama3 = ft::data::Tokenizer::load((ref_dir / "tok_llama3").string());
  EXPECT_NE(llama3.chat_template().find("<|start_header_id|>"), std::string::npos);
  EXPECT_EQ(fs::path(llama3.chat_template_file()).filename(), "tokenizer_config.json");
  const auto qwen2 = ft::data::Tokenizer::load((ref_dir / "tok_qwen2").string());
  EXPECT_EQ(fs::path(qwen2.chat_template_file()).filename(), "chat_template.jinja");
  EXPECT_EQ(qwen2.chat_template(), ft::test::read_file((ref_dir / "tok_qwen2" / "chat_template.jinja").string()));

  // A list of named templates: "default" is the one; without it, or with a wrong type, an error.
  const fs::path dir = ft::test::scratch_dir("chat_template_config");
  fs::copy_file(ref_dir / "tok_sp" / "tokenizer.model", dir / "tokenizer.model");
  auto write_config = [&](const std::string& chat_template) {
    std::ofstream(dir / "tokenizer_config.json") << R"({"bos_token": "<s>", "eos_token": "</s>", "chat_template": )"
                                                 << chat_template << "}";
  };
  write_config(R"([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])");
  EXPECT_EQ(ft::data::Tokenizer::load(dir.string()).chat_template(), "D");
  write_config(R"([{"name": "tool_use", "template": "T"}])");
  EXPECT_EQ(error_of([&] { ft::data::Tokenizer::load(dir.string()); }),
            "[tokenizer] " + (dir / "tokenizer_config.json").string() +
                ": 'chat_template' lists templates (tool_use) but none named 'default'");
  write_config("42");
  EXPECT_NE(error_of([&] { ft::data::Tokenizer::load(dir.string()); }).find("must be a string or a list"), std::string::npos);
  write_config("null");
  const auto none = ft::data::Tokenizer::load(dir.string());
  EXPECT_EQ(none.chat_template(), "");
  const ft::data::TokenizerEncoder enc(none);
  EXPECT_NE(error_of([&] { ModelChatTemplate t(enc); }).find("the tokenizer has none"), std::string::npos);
}

TEST(ChatTemplateParity, ChatRecordsPrepareWithTheModelTemplate) {
  REQUIRE_CHAT_REFERENCE();
  // The JSONL reader with template "model" gives what ModelChatTemplate gives, for every
  // conversation of the Llama 3 tokenizer, and instruction records render as one user/assistant turn.
  const auto tok = ft::data::Tokenizer::load((ref_dir / "tok_llama3").string());
  const ft::data::TokenizerEncoder enc(tok);
  const ModelChatTemplate tmpl(enc);
  const fs::path dir = ft::test::scratch_dir("chat_template_records");
  std::vector<ft::data::Example> expected;
  {
    std::ofstream out(dir / "chat.jsonl");
    for (const auto& c : ref.at("tokenize")) {
      if (c.at("tokenizer") != "tok_llama3") continue;
      const auto& msgs = c.at("messages");
      // (the JSONL reader refuses empty contents, as bad records)
      if (std::any_of(msgs.begin(), msgs.end(), [](const auto& m) { return m.at("content") == ""; })) continue;
      out << nlohmann::ordered_json{{"messages", c.at("messages")}}.dump() << "\n";
      expected.push_back(ft::data::tokenize_segments(tmpl.render(messages_of(c.at("messages"))), enc));
    }
  }
  ASSERT_GE(expected.size(), 5u);
  const auto examples = read_examples(dir / "chat.jsonl", ft::data::RecordFormat::chat, "model", enc);
  ASSERT_EQ(examples.size(), expected.size());
  for (size_t n = 0; n < examples.size(); ++n) {
    EXPECT_EQ(examples[n].tokens, expected[n].tokens);
    EXPECT_EQ(examples[n].trainable, expected[n].trainable);
  }

  {
    std::ofstream(dir / "inst.jsonl") << R"({"prompt": "2+2?", "completion": "4"})" << "\n";
  }
  const auto inst = read_examples(dir / "inst.jsonl", ft::data::RecordFormat::instruction, "model", enc);
  ASSERT_EQ(inst.size(), 1u);
  const std::vector<Message> pair = {{Role::user, "2+2?"}, {Role::assistant, "4"}};
  EXPECT_EQ(inst[0].tokens, ft::data::tokenize_segments(tmpl.render(pair), enc).tokens);
}
