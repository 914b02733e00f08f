// ft generate: continue a prompt of token ids with a KV cache (greedy or top-p sampling).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <optional>
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "ft/adapt/lora.h"
#include "ft/adapt/prefix.h"
#include "ft/data/chat_template.h"
#include "ft/data/tokenizer.h"
#include "ft/io/hf_checkpoint.h"
#include "ft/io/hf_config.h"
#include "ft/model/generate.h"
#include "ft/util/error.h"

namespace ft::cli {
namespace {

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      FT_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      FT_FAIL("--prompt-ids: '", item, "' is not an integer token id");
    }
  }
  return ids;
}

// A number in (low, high]. (CLI::PositiveNumber's message spells out a 300-digit upper bound.)
CLI::Validator in_range(double low, double high, const std::string& text) {
  return CLI::Validator(
      [=](const std::string& v) -> std::string {
        double x = 0;
        return CLI::detail::lexical_cast(v, x) && x > low && x <= high ? "" : "must be " + text + ", got " + v;
      },
      text);
}

}  // namespace

void add_generate(CLI::App& app) {
  struct Args {
    std::string dir, adapter, prompt_ids, prompt, chat, system, chat_template, tokenizer, device = "auto",
        dtype = "float32";
    std::vector<std::string> template_vars;
    int64_t max_new_tokens = 32;
    bool sample = false;
    double temperature = 1.0, top_p = 0.9;
    uint64_t seed = 0;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a KV cache (greedy, or top-p sampling)");
  cmd->add_option("model_dir", a->dir, "Hugging Face checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("-a,--adapter", a->adapter, "A PEFT adapter (LoRA or prefix tuning) to apply to the model")
      ->check(CLI::ExistingDirectory);
  auto* ids_opt = cmd->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids, e.g. 1,15043,29892");
  auto* text_opt = cmd->add_option("-p,--prompt", a->prompt, "Prompt as text (needs a tokenizer)");
  auto* chat_opt = cmd->add_option("-c,--chat", a->chat,
                                   "A user message, rendered with the tokenizer's chat template and its generation "
                                   "prompt (chat_template.jinja or tokenizer_config.json); prints the answer");
  cmd->add_option("--system", a->system, "A system message before --chat")->needs(chat_opt);
  cmd->add_option("--chat-template", a->chat_template, "A Jinja template file for --chat in place of the tokenizer's")
      ->needs(chat_opt)
      ->check(CLI::ExistingFile);
  cmd->add_option("--template-var", a->template_vars, "NAME=VALUE for the chat template (JSON, or else a string)")
      ->needs(chat_opt);
  ids_opt->excludes(text_opt);
  chat_opt->excludes(text_opt)->excludes(ids_opt);
  cmd->add_option("-t,--tokenizer", a->tokenizer,
                  "tokenizer.model, tokenizer.json or a directory holding one (default: the model directory's, if any)");
  cmd->add_option("-n,--max-new-tokens", a->max_new_tokens, "Tokens to generate")
      ->capture_default_str()
      ->check(in_range(0, 1e9, "> 0"));
  auto* sample = cmd->add_flag("--sample", a->sample, "Sample with temperature and top-p instead of greedy decoding");
  // The sampling settings mean nothing to greedy decoding: given without --sample they are an error,
  // not silently ignored.
  cmd->add_option("--temperature", a->temperature, "Sampling temperature (> 0; with --sample)")
      ->capture_default_str()
      ->check(in_range(0, 1e30, "> 0"))
      ->needs(sample);
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass, in (0, 1] (with --sample)")
      ->capture_default_str()
      ->check(in_range(0, 1, "in (0, 1]"))
      ->needs(sample);
  cmd->add_option("--seed", a->seed, "Sampling seed (with --sample)")->capture_default_str()->needs(sample);
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "float32, bfloat16 or float16")->capture_default_str();
  cmd->callback([a] {
    io::LoadOptions load;
    load.device = parse_device(a->device);
    load.dtype = parse_dtype(a->dtype);
    model::CausalLM m = io::load_pretrained(a->dir, load);
    if (!a->adapter.empty()) {
      if (adapt::peft_adapter_type(a->adapter) == "PREFIX_TUNING") adapt::load_peft_prefix(m, a->adapter);
      else adapt::load_peft_adapter(m, a->adapter);
    }
    model::GenerateOptions g;
    g.max_new_tokens = a->max_new_tokens;
    g.greedy = !a->sample;
    g.temperature = a->temperature;
    g.top_p = a->top_p;
    g.seed = a->seed;
    // As transformers' generate(): generation_config.json's eos_token_id where the checkpoint has
    // one (gpt-oss stops at <|call|> too), else config.json's.
    g.stop_tokens = io::load_generation_eos(a->dir);
    if (g.stop_tokens.empty()) g.stop_tokens = m->config().eos_token_ids;
    // A tokenizer, when one is given or sits in the checkpoint: text prompts in, text out.
    std::optional<data::Tokenizer> tok;
    std::string tok_path = a->tokenizer;
    if (tok_path.empty() && (std::filesystem::exists(std::filesystem::path(a->dir) / "tokenizer.model") ||
                             std::filesystem::exists(std::filesystem::path(a->dir) / "tokenizer.json"))) {
      tok_path = a->dir;
    }
    if (!tok_path.empty()) tok = data::Tokenizer::load(tok_path);
    FT_CHECK(!a->prompt_ids.empty() || !a->prompt.empty() || !a->chat.empty(),
             "give --prompt TEXT, --chat TEXT or --prompt-ids IDS");
    std::vector<int64_t> prompt;
    if (!a->chat.empty()) {
      FT_CHECK(tok.has_value(), "--chat needs a tokenizer with a chat template: pass --tokenizer, or put one in ", a->dir);
      // As apply_chat_template(messages, add_generation_prompt=True): the template writes any BOS.
      const data::TokenizerEncoder encoder(*tok);
      std::vector<std::pair<std::string, std::string>> vars;
      for (const auto& v : a->template_vars) vars.push_back(data::parse_template_var(v));
      const data::ModelChatTemplate tmpl = a->chat_template.empty()
                                               ? data::ModelChatTemplate(encoder, vars)
                                               : data::ModelChatTemplate(encoder, a->chat_template, vars);
      std::vector<data::Message> messages;
      if (!a->system.empty()) messages.push_back({data::Role::system, a->system});
      messages.push_back({data::Role::user, a->chat});
      for (int32_t id : data::tokenize_segments(tmpl.render_prompt(messages), encoder).tokens) prompt.push_back(id);
      // A chat turn ends with the tokenizer's EOS (Llama 3's <|eot_id|>, Qwen's <|im_end|>) as well.
      const int32_t eos = tok->special().eos;
      if (eos >= 0 && std::find(g.stop_tokens.begin(), g.stop_tokens.end(), eos) == g.stop_tokens.end()) {
        g.stop_tokens.push_back(eos);
      }
    } else if (!a->prompt.empty()) {
      FT_CHECK(tok.has_value(), "--prompt needs a tokenizer: pass --tokenizer, or put tokenizer.model or tokenizer.json in ",
               a->dir);
      if (tok->special().add_bos && tok->special().bos >= 0) prompt.push_back(tok->special().bos);
      for (int32_t id : tok->encode(a->prompt)) prompt.push_back(id);
    } else {
      prompt = parse_ids(a->prompt_ids);
    }
    FT_CHECK(!tok || tok->vocab_size() <= m->config().vocab_size, "the tokenizer's vocabulary (", tok->vocab_size(),
             ") is larger than the model's (", m->config().vocab_size, ")");
    g.on_token = [](int64_t t) { std::cout << t << " " << std::flush; };
    std::cout << "prompt ids:";
    for (int64_t id : prompt) std::cout << " " << id;
    std::cout << "\ngenerated: ";
    const auto start = std::chrono::steady_clock::now();
    auto out = model::generate(m, prompt, g);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "\n" << out.size() << " tokens in " << seconds << " s (" << out.size() / std::max(seconds, 1e-9)
              << " tokens/s) on " << load.device << "\n";
    if (tok) {
      // Decoded as one sequence, so that word boundaries at the prompt's end come out right.
      std::vector<int32_t> ids(prompt.begin(), prompt.end());
      ids.insert(ids.end(), out.begin(), out.end());
      std::cout << "text: " << tok->decode(ids) << "\n";
      if (!a->chat.empty()) {
        // The answer with its special tokens as their pieces (gpt-oss's channels:
        // <|channel|>analysis<|message|>...), without the stop token that ended it.
        std::vector<int32_t> answer(out.begin(), out.end());
        if (!answer.empty() &&
            std::find(g.stop_tokens.begin(), g.stop_tokens.end(), answer.back()) != g.stop_tokens.end()) {
          answer.pop_back();
        }
        std::string text;
        for (const auto& span : tok->decode_spans(answer, std::vector<uint8_t>(answer.size(), 0))) text += span.text;
        std::cout << "answer: " << text << "\n";
      }
    }
  });
}

}  // namespace ft::cli
