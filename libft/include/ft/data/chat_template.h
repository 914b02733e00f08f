#pragma once
// Turning a record into tokens with an exact label mask: chat templates, the segment model, and the
// small encoder interface that tokenization goes through. Torch-free.
//
// A document is rendered as a list of segments, each either text or one special token, and each
// either trainable (a label) or not. Text is tokenized segment by segment rather than as one string,
// so that no token straddles a label boundary and the mask is exact. Adjacent text segments with
// the same trainability are joined first, so tokenization is only split where the mask changes.
//
// Leading spaces at segment joins. sentencepiece (Llama's tokenizer) prefixes every encode() call
// with a "▁" (the dummy prefix) and attaches a space to the word after it: "[/INST] Sure" becomes
// "[/INST]" + "▁Sure". Encoding a later segment on its own would therefore invent a space ("\nSure"
// would become "\n" + "▁Sure"). So:
//   * The first text of a document, and text right after a BOS token, is encoded as a document start
//     (TokenEncoder::encode_start: with the dummy prefix, as the model saw every document start).
//   * All other text is encoded as a continuation (TokenEncoder::encode_continuation: no prefix).
//   * A space that the template puts between two segments is written at the start of the later
//     segment (" " + answer), because that is where sentencepiece puts it: in the first token of the
//     next word. The llama2 answer's first label is "▁Sure", exactly the token the model emits after
//     "[/INST]" at inference.
// With sentencepiece's default whitespace splitting no piece crosses a space, so a join placed before
// a space gives the same tokens as encoding the whole string (the tests check this on real text). A
// join elsewhere (chatml's "\n" + content) gives the tokens of each side on its own, which can differ
// from whole-string tokenization only where the vocabulary has a piece spanning the join.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ft/data/example.h"
#include "ft/data/tokenizer.h"

namespace ft::data {

// ---------------------------------------------------------------------------------------------
// Encoder interface

/// What tokenization needs from a tokenizer. ft::data::Tokenizer is adapted by TokenizerEncoder; tests
/// use deterministic encoders.
class TokenEncoder {
 public:
  virtual ~TokenEncoder() = default;
  /// Tokens of `text` at the start of a document (sentencepiece: with its dummy-prefix "▁").
  virtual std::vector<int32_t> encode_start(std::string_view text) const = 0;
  /// Tokens of `text` continuing earlier text: nothing is prepended.
  virtual std::vector<int32_t> encode_continuation(std::string_view text) const = 0;
  /// The id of `piece` when the vocabulary holds it as one token (e.g. "<|im_end|>"), else -1.
  virtual int32_t piece_id(std::string_view piece) const = 0;
  /// BOS/EOS ids (-1 = none) and whether documents get them by default.
  virtual SpecialTokens special() const = 0;

  // For the checkpoint's own (Jinja) chat template; stand-in encoders may leave these out.
  /// The text of token `id` ("<s>", "<|eot_id|>"), for the template's bos_token and eos_token.
  virtual std::string piece(int32_t /*id*/) const { return {}; }
  /// Pieces the rendered text must be cut at and given as single ids (see
  /// Tokenizer::special_pieces); empty where encode_continuation() cuts them out itself.
  virtual std::vector<std::string> split_pieces() const { return {}; }
  /// The template's Jinja source and the file it came from; empty when there is none.
  virtual std::pair<std::string, std::string> chat_template() const { return {}; }
};

/// ft::data::Tokenizer as a TokenEncoder; `tokenizer` must outlive it.
///
/// encode_continuation(text) encodes U+E000 + text and drops the tokens that U+E000 alone encodes to.
/// U+E000 (private use) is not in any real vocabulary, so it becomes byte-fallback or <unk> tokens,
/// which merge with nothing: the dummy prefix attaches to it instead of to `text`, and `text` gets
/// the tokens it has in the middle of a line. When the prefix tokens do not come out unchanged (a
/// vocabulary that does hold U+E000), the call throws rather than guessing. (Without byte fallback,
/// text that starts with a character outside the vocabulary shares U+E000's <unk>; that character
/// is lost, as <unk> loses it anyway.)
class TokenizerEncoder final : public TokenEncoder {
 public:
  explicit TokenizerEncoder(const Tokenizer& tokenizer);
  std::vector<int32_t> encode_start(std::string_view text) const override;
  std::vector<int32_t> encode_continuation(std::string_view text) const override;
  int32_t piece_id(std::string_view piece) const override;
  SpecialTokens special() const override;
  std::string piece(int32_t id) const override;
  std::vector<std::string> split_pieces() const override;
  std::pair<std::string, std::string> chat_template() const override;

 private:
  const Tokenizer* tokenizer_;
  std::vector<int32_t> sentinel_ids_;
};

// ---------------------------------------------------------------------------------------------
// Segments and templates

/// One piece of a rendered document.
struct TemplateSegment {
  enum class Kind : uint8_t {
    text,     ///< `text`, tokenized (see the header comment for start vs continuation)
    bos,      ///< the tokenizer's BOS id
    eos,      ///< the tokenizer's EOS id
    special,  ///< the piece named by `text` as one id when the vocabulary has it, else `text` as text
  };
  Kind kind = Kind::text;
  std::string text;
  bool trainable = false;
};

/// developer: OpenAI's name for the instructions that come first (gpt-oss's Harmony template and
/// OpenAI's chat format); only a checkpoint's own template renders it.
enum class Role : uint8_t { system, user, assistant, tool, developer };
const char* role_name(Role role);
/// Whether `role` may only come first (system, developer).
bool is_instructions(Role role);

struct Message {
  Role role = Role::user;
  std::string content;
  /// The message's other fields as a JSON object, "" for none: an assistant's "tool_calls" (then
  /// "content" may be null) and its reasoning ("reasoning_content", or "thinking" as gpt-oss's
  /// template reads it), a tool message's "tool_call_id" and "name".
  /// Only a checkpoint's own template (ModelChatTemplate) renders them; they override `role` and
  /// `content` there.
  std::string fields_json{};
};

/// Whether an assistant message calls tools (has "tool_calls").
bool calls_tools(const Message& message);
/// Whether a conversation has tool messages or tool calls.
bool has_tool_use(std::span<const Message> messages);

/// Which assistant turns of a conversation are trained.
///   all:  every one (the default).
///   last: the final one only; the earlier turns are context, rendered as the template renders them
///         before a later turn. For templates that render a turn differently once others follow, as
///         gpt-oss's does (it drops earlier turns' reasoning and ends them with <|end|> instead of
///         <|return|>), this is the only labelling of one example that matches what the model sees.
///   each: one example per assistant turn: the conversation up to that turn, trained on it alone
///         (`last` on each prefix). Every turn is trained with its own reasoning, as the model
///         generates it, at the cost of the context tokens repeated.
enum class TrainTurns : uint8_t { all, last, each };
TrainTurns parse_train_turns(std::string_view name);  ///< throws ft::Error for unknown names
const char* train_turns_name(TrainTurns turns);

/// Chat templates, chosen by name ("llama2", "chatml"). Messages must be: an optional system (or
/// developer) message first, then user and assistant alternating, starting with user and ending with assistant (the
/// JSONL reader checks this; render_chat checks it again). Contents are used as given: no strip().
///
/// llama2 (Meta's Llama-2-chat format), one block per user/assistant pair i:
///     BOS "[INST] " [<<SYS>> block, first pair only] user_i " [/INST]"   not trainable, document start
///         " " assistant_i                                             trainable, continuation
///     EOS                                                             trainable
///   where the <<SYS>> block is "<<SYS>>\n" system "\n<</SYS>>\n\n". It differs from Meta's reference
///   code in two ways: contents are not stripped, and there is no space between the answer and EOS
///   (Meta writes one; it would teach the model to emit a lone "▁" before every EOS). Needs BOS and
///   EOS ids.
///
/// chatml, per message m:
///     <|im_start|> role "\n"   not trainable
///     content                  trainable for assistant messages
///     <|im_end|>               trainable for assistant messages (the end-of-turn marker)
///     "\n"                     not trainable
///   preceded by BOS when the tokenizer adds one (special().add_bos). <|im_start|> and <|im_end|> are
///   single ids when the vocabulary has them (TokenEncoder::piece_id); otherwise they are rendered as
///   text, and <|im_end|>'s text tokens are then labels of an assistant turn like the id would be.
///   No EOS: <|im_end|> ends each turn.
///
/// model: the checkpoint's own Jinja template (tokenizer_config.json's chat_template or
///   chat_template.jinja), rendered as transformers' apply_chat_template renders it: see
///   ModelChatTemplate. Where a template name is expected, a path ending in ".jinja" names a
///   template file to use the same way (is_template_file).
enum class ChatTemplate : uint8_t { llama2, chatml, model };
ChatTemplate parse_chat_template(std::string_view name);  ///< throws ft::Error for unknown names
/// Whether `name` is a Jinja template file rather than a template name: it ends in ".jinja".
bool is_template_file(std::string_view name);
const char* chat_template_name(ChatTemplate tmpl);

/// Checks the message order described at ChatTemplate; throws ft::Error naming the message. With
/// tool use: after an assistant message with tool calls come one or more tool messages, then an
/// assistant message (see has_tool_use; only ModelChatTemplate renders those).
void check_chat_order(std::span<const Message> messages);

/// Plain text: [BOS] text [EOS]; every token but the BOS is a label.
std::vector<TemplateSegment> render_text(std::string_view text, bool add_bos, bool add_eos);
/// Instruction data without a template: [BOS] prompt completion EOS, prompt as a document start and
/// completion as its continuation, joined with nothing between them (a separator such as "\n\n" or
/// "### Response:\n" belongs in the data). Labels: completion and EOS.
std::vector<TemplateSegment> render_instruction(std::string_view prompt, std::string_view completion, bool add_bos);
/// A conversation in `tmpl` (llama2 or chatml; see ChatTemplate). `add_bos` matters only for chatml.
std::vector<TemplateSegment> render_chat(ChatTemplate tmpl, std::span<const Message> messages, bool add_bos,
                                         TrainTurns turns = TrainTurns::all);

/// The checkpoint's own chat template, rendered as transformers' apply_chat_template(messages) renders
/// it (jinja.h), with the context transformers gives it: messages ([{role, content}]),
/// add_generation_prompt, bos_token and eos_token (when the tokenizer has them), tools and documents
/// (none). As apply_chat_template(tokenize=True), the whole text is tokenized without adding BOS or
/// EOS: whatever the template writes is what the model sees.
///
/// Labels: the assistant turns, found the way the template itself draws them.
///   * A template with {% generation %} blocks (transformers' return_assistant_tokens_mask) labels
///     exactly what those blocks write.
///   * Otherwise each assistant message i is labelled with what its rendering adds: the text between
///     render(messages[:i], add_generation_prompt=true) and render(messages[:i+1]). That is its
///     content and whatever the template closes the turn with (Llama 3's <|eot_id|>, ChatML's
///     <|im_end|> and newline), but not the header that the generation prompt already gives. This
///     needs renderings that extend each other; a template that renders earlier turns differently
///     once later ones follow (Qwen3 drops past reasoning) is an error naming the message.
///
/// Tokenization: text is cut where labels start and end, and at the tokenizer's split_pieces();
/// the first text of the document is encoded as a document start and every later text as a
/// continuation, as Hugging Face's tokenizers do (Metaspace's prepend_scheme "first": no "▁" after
/// <s>).
/// "NAME=VALUE" → (NAME, JSON): VALUE as JSON when it is JSON (false, 3, "x", [1]), else as a
/// string. Throws ft::Error for a missing '=' or a name that is not an identifier.
std::pair<std::string, std::string> parse_template_var(std::string_view assignment);

class ModelChatTemplate {
 public:
  /// Parses the encoder's chat_template(); throws ft::Error when there is none or it does not parse.
  /// `vars` adds variables to every rendering, as apply_chat_template's keyword arguments do
  /// (enable_thinking, date_string, ...): (name, JSON value) pairs, see parse_template_var.
  explicit ModelChatTemplate(const TokenEncoder& encoder,
                             const std::vector<std::pair<std::string, std::string>>& vars = {});
  /// A template from the Jinja file `path` in place of the checkpoint's (for example one with
  /// {% generation %} blocks where the checkpoint's cannot be labelled), with the encoder's tokens.
  ModelChatTemplate(const TokenEncoder& encoder, const std::string& path,
                    const std::vector<std::pair<std::string, std::string>>& vars);
  ModelChatTemplate(ModelChatTemplate&&) noexcept;
  ~ModelChatTemplate();
  /// Checks the message order (check_chat_order), renders and labels the conversation (the turns
  /// `turns` names). `tools_json`: the record's tool definitions (a JSON array) for the template's
  /// `tools`, "" for none.
  std::vector<TemplateSegment> render(std::span<const Message> messages, const std::string& tools_json = "",
                                      TrainTurns turns = TrainTurns::all) const;
  /// A prompt for generation: `messages` (ending with a user message) and the generation prompt,
  /// nothing trainable.
  std::vector<TemplateSegment> render_prompt(std::span<const Message> messages) const;
  /// The rendered text alone (add_generation_prompt as given).
  std::string render_text(std::span<const Message> messages, bool add_generation_prompt) const;
  /// Where the template came from.
  const std::string& file() const;

 private:
  void init(const TokenEncoder& encoder, const std::string& source, const std::string& file,
            const std::vector<std::pair<std::string, std::string>>& vars);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Tokenizes rendered segments; example.trainable follows each segment's flag token for token.
/// Throws ft::Error when a bos/eos segment meets a tokenizer without that id.
Example tokenize_segments(std::span<const TemplateSegment> segments, const TokenEncoder& encoder);

}  // namespace ft::data
