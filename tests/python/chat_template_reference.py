#!/usr/bin/env python3
"""Reference renders of Hugging Face chat templates (the Jinja2 subset in tokenizer_config.json's
"chat_template" or a checkpoint's chat_template.jinja) and assistant-turn label masks, for libft's C++
Jinja interpreter and its chat tokenization.

    chat_template_reference.py OUT_DIR BPE_DIR SP_MODEL

BPE_DIR is the output directory of bpe_reference.py (its llama3/ and qwen2/ tokenizers); SP_MODEL is a
sentencepiece tokenizer.model (<unk>=0, <s>=1, </s>=2, byte fallback), such as the one
TokenizerParity.TrainModel writes.

Every template here was written for this file, in the format of a model family's published chat format
(Llama 3, Llama 3.1 with tools, ChatML/Qwen2.5 with tools, Llama 2/Mistral [INST], Gemma, Zephyr, Phi-3,
Harmony (gpt-oss) with tools and reasoning, and a ChatML variant with {% generation %}); none is copied
from a model repository.

Outputs, all inside OUT_DIR:

  tok_llama3/  tokenizer.json + tokenizer_config.json (BPE_DIR/llama3) with the Llama 3 template stored
               the legacy way, as the string under tokenizer_config.json's "chat_template" key, and no
               chat_template.jinja (written by save_pretrained(..., save_jinja_files=False))
  tok_qwen2/   tokenizer.json + tokenizer_config.json (BPE_DIR/qwen2) + chat_template.jinja (ChatML)
  tok_sp/      tokenizer.model (a copy of SP_MODEL) + tokenizer_config.json + chat_template.jinja
               (Llama 2 [INST]); no tokenizer.json. save_pretrained leaves add_bos_token out of
               tokenizer_config.json (tokenizer.json's post-processor held it), so it is put back
  tok_harmony/ tokenizer.json (BPE_DIR/qwen2 with Harmony's <|start|>, <|message|>, <|channel|>, ...
               added as special tokens) + chat_template.jinja (Harmony)
  tok_spjson/  the same tokenizer as transformers 5 saves it: tokenizer.json (Metaspace, byte fallback) and
               no tokenizer.model, + tokenizer_config.json + chat_template.jinja (Llama 2 [INST])
  chat_reference.json  (ASCII JSON)
      "render":   [{"name", "template", "context", "expected"}]  template.render(**context) as
                  transformers compiles it, or
                  [{"name", "template", "context", "error"}]     rendering (or compiling) must fail;
                  "error" is a substring a good message contains ("" for syntax errors)
      "tokenize": [{"name", "tokenizer", "messages", "rendered", "ids", "spans", "labels", "straddles",
                    "train_turns", "all_fails" [, "tools", "template_vars", "piece_ids", "piece_labels"]}]
                  tokenizer is "tok_llama3" | "tok_qwen2" | "tok_sp" (a directory above);
                  rendered = apply_chat_template(messages, tokenize=False);
                  ids = its input_ids (== tok(rendered, add_special_tokens=False).input_ids);
                  spans = [[start, end), ...] UTF-8 byte offsets into rendered, one per assistant
                  message i: start = len(render(messages[:i], add_generation_prompt=True)),
                  end = len(render(messages[:i+1])), both in UTF-8 bytes (train_turns "last": one
                  span, from len(render(messages[:-1], add_generation_prompt=True)) to the end;
                  all_fails: whether some turn's renders do not extend each other, so that
                  labelling every turn must be refused); template_vars: apply_chat_template's
                  keyword arguments;
                  labels[k] = 1 iff token k's start offset (the fast tokenizer's offset mapping,
                  converted from characters to UTF-8 bytes) lies in some span. A token can straddle a
                  span start: in whitespace_edges_qwen2 the "\n\n" token begins on the "\n" that ends
                  "<|im_start|>assistant\n" and ends inside the content, so it is labelled 0.
                  straddles: whether a token crosses a span boundary. libft cuts the text there (as
                  inference tokenizes the generation prompt alone); for such byte-level BPE cases
                  piece_ids/piece_labels tokenize the cut pieces one by one, libft's expected output

What transformers 5.17 does (found by running it; the script checks the file layout and the ids):
  * save_pretrained writes a string chat template to a separate chat_template.jinja (byte-for-byte the
    template) and removes "chat_template" from tokenizer_config.json. Only save_jinja_files=False
    gives the legacy layout: the template as the "chat_template" string in tokenizer_config.json and no
    .jinja file. AutoTokenizer.from_pretrained reads either.
  * apply_chat_template(messages, tokenize=True) returns a BatchEncoding (return_dict defaults to True)
    with "input_ids" (a flat list for one conversation) and "attention_mask"; it tokenizes the rendered
    text with add_special_tokens=False, so a BOS the template writes is not doubled.
  * apply_chat_template passes the template: messages, tools (None when not given), documents (None),
    add_generation_prompt, and every special_tokens_map entry (bos_token, eos_token, unk_token,
    pad_token, ... as strings; a missing one is absent, e.g. qwen2 has no bos_token). The render cases
    below pass their context verbatim, so a template that tests `tools is not none` gets "tools": null
    in its context, as apply_chat_template would give it.
  * A LlamaTokenizer loaded from tokenizer.model is a fast (tokenizers) tokenizer: save_pretrained
    writes tokenizer.json and not tokenizer.model (so tok_sp gets SP_MODEL copied in and tokenizer.json
    removed). Its pre-tokenizer is Metaspace(prepend_scheme="first", split=False), so "▁" is prepended
    only at the very start of the text, not after a special token such as <s> or </s>.

Deterministic: the same bytes every run (render cases pass date_string, so strftime_now is never called).
Writes only inside OUT_DIR.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import jinja2  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils.chat_template_utils import _compile_jinja_template  # noqa: E402


def fail(message):
    sys.exit(f"chat_template_reference.py: {message}")


# ---------------------------------------------------------------------------------------------------
# Family templates (written for this file, in each family's published format)
# ---------------------------------------------------------------------------------------------------

LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA31 = """{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions. To call one, reply with a JSON object " }}
    {{- '{"name": function name, "parameters": dictionary of argument name and value}.\\n\\n' }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in loop_messages %}
    {%- if message.role == 'tool' or message.role == 'ipython' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or (message.content is iterable and message.content is not string) %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- elif message.tool_calls is defined %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("This template supports one tool call per message") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML = """{%- set default_system = 'You are a helpful assistant.' %}
{%- if tools is not none and tools | length > 0 %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- default_system }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "Function signatures are inside <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each call, return a JSON object with the function name and arguments inside " }}
    {{- "<tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(in_tool_block=false, turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {%- if not ns.in_tool_block %}
            {{- '<|im_start|>user' }}
            {%- set ns.in_tool_block = true %}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\\n' }}
            {%- set ns.in_tool_block = false %}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- call.function.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA2 = """{%- if messages[0]['role'] == 'system' %}
    {%- set loop_messages = messages[1:] %}
    {%- set system_message = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}
{%- else %}
    {%- set loop_messages = messages %}
    {%- set system_message = '' %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 %}
        {%- set content = system_message + message['content'] | trim %}
    {%- else %}
        {%- set content = message['content'] | trim %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + content + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}
"""

# Gemma 3's shape: a system message folded into the first user turn, content as a string or a list
# of typed parts (text trimmed, images as a marker), slicing, loop.first, `is string` / `is iterable`.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set sys = messages[0]['content'] -%}
    {%- set first_user_prefix = (sys if sys is string else sys[0]['text']) + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}
            {%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception('Invalid content type') }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

# Relies on trim_blocks/lstrip_blocks rather than "-": the newline after each {{ }} line is output.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# One line, no whitespace control needed.
PHI3 = ("{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

GENERATION = """{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['role'] == 'assistant' %}
        {% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Harmony, gpt-oss's chat format: a system block (identity, dates, reasoning effort, built-in tools),
# the instructions and function namespaces as a developer message, assistant turns on the analysis
# (reasoning, from "thinking"), commentary (tool calls) and final channels. As gpt-oss's template
# does, only the last assistant turn keeps its reasoning and ends with <|return|> (earlier ones end
# with <|end|>), and a tool call's analysis is dropped once a final answer follows: its turns do not
# extend each other (TrainTurns::last). The constructs are the ones that template leans on:
# recursive macros with defaults whose output is assigned with set, iterable/string/mapping tests,
# dict items, `not in (x or [])`, namespaces written inside loops, slices by loop.index.
HARMONY = """{%- macro ts_type(schema, required=[], depth=0) -%}
    {%- if schema.type is defined and schema.type is iterable and schema.type is not string
           and schema.type is not mapping and schema.type[0] is defined -%}
        {{- schema.type | join(" | ") -}}
    {%- elif schema.oneOf -%}
        {%- set seen = namespace(objects=0) -%}
        {%- for option in schema.oneOf -%}
            {%- if option.type == "object" %}{% set seen.objects = seen.objects + 1 %}{% endif -%}
        {%- endfor -%}
        {%- if seen.objects > 0 and schema.oneOf | length > 1 -%}
            {{- "any" -}}
        {%- else -%}
            {%- for option in schema.oneOf -%}
                {{- ts_type(option, required, depth + 1) -}}
                {%- if option.description %} {{ "// " + option.description }}{% endif -%}
                {%- if not loop.last %}
                    {{- " | " }}
                {% endif -%}
            {%- endfor -%}
        {%- endif -%}
    {%- elif schema.type == "array" -%}
        {%- if schema['items'] -%}
            {%- set inner = ts_type(schema['items'], required, depth + 1) -%}
            {%- if inner | length > 40 or inner == "object" -%}
                {{- "any[]" -}}
            {%- else -%}
                {{- inner + "[]" -}}
            {%- endif -%}
        {%- else -%}
            {{- "any[]" -}}
        {%- endif -%}
        {%- if schema.nullable %}{{ " | null" }}{% endif -%}
    {%- elif schema.type == "string" -%}
        {%- if schema.enum -%}
            {{- '"' + schema.enum | join('" | "') + '"' -}}
        {%- else -%}
            {{- "string" -}}
            {%- if schema.nullable %}{{ " | null" }}{% endif -%}
        {%- endif -%}
    {%- elif schema.type in ["number", "integer"] -%}
        {{- "number" -}}
    {%- elif schema.type == "boolean" -%}
        {{- "boolean" -}}
    {%- elif schema.type == "object" and schema.properties -%}
        {{- "{\\n" -}}
        {%- for key, value in schema.properties.items() -%}
            {{- "  " * (depth + 1) + key -}}
            {%- if key not in (schema.required or []) %}?{% endif -%}
            {{- ": " + ts_type(value, schema.required or [], depth + 1) -}}
            {%- if not loop.last %},{% endif %}{{ "\\n" }}
        {%- endfor -%}
        {{- "  " * depth + "}" -}}
    {%- elif schema.type == "object" -%}
        {{- "object" -}}
    {%- else -%}
        {{- "any" -}}
    {%- endif -%}
{%- endmacro -%}

{%- macro tool_namespace(name, tools) -%}
    {{- "## " + name + "\\n\\nnamespace " + name + " {\\n\\n" -}}
    {%- for entry in tools -%}
        {%- set fn = entry.function if entry.function is defined else entry -%}
        {%- if fn.description %}{{ "// " + fn.description + "\\n" }}{% endif -%}
        {{- "type " + fn.name + " = " -}}
        {%- set params = fn.parameters or {} -%}
        {%- if params.properties -%}
            {{- "(_: {\\n" -}}
            {%- for pname, pspec in params.properties | items -%}
                {%- if pspec.description %}{{ "// " + pspec.description + "\\n" }}{% endif -%}
                {{- pname -}}{{- "?" if pname not in (params.required or []) else "" -}}
                {{- ": " + ts_type(pspec, params.required or []) -}}
                {%- if pspec.default is defined -%}
                    {{- ", // default: " + (pspec.default if pspec.default is string else pspec.default | tojson) -}}
                {%- else -%}
                    {{- "," -}}
                {%- endif -%}
                {{- "\\n" -}}
            {%- endfor -%}
            {{- "}) => any;\\n\\n" -}}
        {%- else -%}
            {{- "() => any;\\n\\n" -}}
        {%- endif -%}
    {%- endfor -%}
    {{- "} // namespace " + name -}}
{%- endmacro -%}

{%- macro system_block() -%}
    {{- (model_identity if model_identity is defined else "You are a helpful model, fine-tuned with libft.") + "\\n" -}}
    {{- "Knowledge cutoff: 2024-06\\n" -}}
    {{- "Current date: " + (date_string if date_string is defined else strftime_now("%Y-%m-%d")) + "\\n\\n" -}}
    {{- "Reasoning: " + (reasoning_effort | default("medium")) + "\\n\\n" -}}
    {%- if builtin_tools -%}
        {{- "# Tools\\n\\n" -}}
        {%- set builtin = namespace(browser=false, python=false) -%}
        {%- for tool in builtin_tools -%}
            {%- if tool == "browser" %}{% set builtin.browser = true %}
            {%- elif tool == "python" %}{% set builtin.python = true %}{% endif -%}
        {%- endfor -%}
        {%- if builtin.browser -%}
            {{- "## browser\\n\\n// Tool for browsing.\\nnamespace browser {\\n\\ntype search = (_: {\\nquery: string,\\n}) => any;\\n\\n} // namespace browser\\n\\n" -}}
        {%- endif -%}
        {%- if builtin.python %}{{ "## python\\n\\nUse this tool to run Python code.\\n\\n" }}{% endif -%}
    {%- endif -%}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
    {%- if tools %}{{ "\\nCalls to these tools must go to the commentary channel: 'functions'." }}{% endif -%}
{%- endmacro -%}

{{- "<|start|>system<|message|>" + system_block() + "<|end|>" -}}
{%- if messages[0].role in ["system", "developer"] -%}
    {%- set instructions = messages[0].content -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set instructions = "" -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if instructions or tools -%}
    {{- "<|start|>developer<|message|>" -}}
    {%- if instructions %}{{ "# Instructions\\n\\n" + instructions }}{% endif -%}
    {%- if tools %}{{ "\\n\\n# Tools\\n\\n" + tool_namespace("functions", tools) }}{% endif -%}
    {{- "<|end|>" -}}
{%- endif -%}
{%- set state = namespace(last_call=none) -%}
{%- for message in turns -%}
    {%- if message.role == "assistant" -%}
        {%- for field in ["content", "thinking"] -%}
            {%- if field in message and message[field] is string and "<|channel|>" in message[field] -%}
                {{- raise_exception("Pass the analysis in 'thinking' and the answer in 'content', without <|channel|> tags (found in '" + field + "')") -}}
            {%- endif -%}
        {%- endfor -%}
        {%- if "tool_calls" in message -%}
            {%- set later = namespace(final=false) -%}
            {%- for after in turns[loop.index:] -%}
                {%- if after.role == "assistant" and "tool_calls" not in after %}{% set later.final = true %}{% endif -%}
            {%- endfor -%}
            {%- set call = message.tool_calls[0] -%}
            {%- if call.function %}{% set call = call.function %}{% endif -%}
            {%- if message.content and message.thinking -%}
                {{- raise_exception("Cannot pass both content and thinking in an assistant message with tool calls") -}}
            {%- endif -%}
            {%- set analysis = message.thinking or message.content -%}
            {%- if analysis and not later.final -%}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + analysis + "<|end|>" -}}
            {%- endif -%}
            {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary " -}}
            {{- (call.content_type if call.content_type is defined else "json") + "<|message|>" -}}
            {{- call.arguments | tojson if call.arguments is mapping else call.arguments -}}
            {{- "<|call|>" -}}
            {%- set state.last_call = call.name -%}
        {%- elif loop.last and not add_generation_prompt -%}
            {%- if message.thinking is defined and message.thinking -%}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" -}}
            {%- endif -%}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" -}}
        {%- else -%}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" -}}
            {%- set state.last_call = none -%}
        {%- endif -%}
    {%- elif message.role == "tool" -%}
        {%- if state.last_call is none -%}
            {{- raise_exception("A tool message needs an assistant tool call before it") -}}
        {%- endif -%}
        {{- "<|start|>functions." + state.last_call + " to=assistant<|channel|>commentary<|message|>" -}}
        {{- (message.content if message.content is string else message.content | tojson) + "<|end|>" -}}
    {%- elif message.role == "user" -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}
    {%- else -%}
        {{- raise_exception("Unexpected role '" + message.role + "' after the first message") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}
"""

# ---------------------------------------------------------------------------------------------------
# Conversations shared by the family render cases
# ---------------------------------------------------------------------------------------------------

SYS_CHAT = [
    {"role": "system", "content": "You are a terse assistant.\n"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " 4 "},
    {"role": "user", "content": "And 3+3?"},
]
PLAIN_CHAT = [
    {"role": "user", "content": "  Hi there!\n"},
    {"role": "assistant", "content": "Hello! How can I help?"},
]
SINGLE = [{"role": "user", "content": "Write a haiku about caf\u00e9 mornings \u2615 and \u6771\u4eac."}]
BAD_ORDER = [
    {"role": "user", "content": "one"},
    {"role": "user", "content": "two"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city (\"metric\" units).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Z\u00fcrich"},
                "days": {"type": "integer", "description": "Forecast days", "default": 1},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                              "parameters": {"type": "object", "properties": {}}}}
TOOL_CHAT = [
    {"role": "system", "content": "Use tools when helpful."},
    {"role": "user", "content": "Weather in Z\u00fcrich?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Z\u00fcrich", "days": 2}}}]},
    {"role": "tool", "content": "{\"temp_c\": 21.5, \"sky\": \"clear\"}"},
    {"role": "assistant", "content": "It is 21.5 \u00b0C and clear."},
]
QWEN_TOOL_CHAT = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "Let me check.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
    {"role": "tool", "content": "{\"temp_c\": 18}"},
    {"role": "tool", "content": "\"14:05\""},
    {"role": "assistant", "content": "18 \u00b0C at 14:05."},
]


def chat_context(messages, add_generation_prompt, bos="<s>", eos="</s>", **extra):
    return {"messages": messages, "add_generation_prompt": add_generation_prompt, "bos_token": bos,
            "eos_token": eos, **extra}


# Harmony (gpt-oss): tool schemas that reach each branch of ts_type, built-in tools, reasoning.
HARMONY_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather at a place.",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Z\u00fcrich, CH"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer", "default": 1},
            "hourly": {"type": "boolean"},
            "fields": {"type": "array", "items": {"type": "string"}, "nullable": True},
            "stations": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "elevation": {"type": "number"}}, "required": ["id"]}},
            "window": {"type": "object", "properties": {"from": {"type": "string"}, "to": {
                "type": ["string", "null"]}}, "required": ["from"]},
            "when": {"oneOf": [{"type": "string", "description": "an ISO date"},
                               {"type": "integer", "description": "days from now"}]},
            "filter": {"oneOf": [{"type": "object"}, {"type": "string"}]},
            "note": {"type": "string", "nullable": True},
            "extra": {},
        }, "required": ["location"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "ping", "description": "Is the service up?"}},
]
HARMONY_CALL = {"type": "function", "function": {"name": "get_weather",
                                                 "arguments": {"location": "Z\u00fcrich, CH", "days": 2}}}
HARMONY_THINKING = [
    {"role": "user", "content": "Is 91 prime?"},
    {"role": "assistant", "thinking": "91 = 7 \u00d7 13, so no.", "content": "No: 91 = 7 \u00d7 13."},
]
HARMONY_MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Is 91 prime?"},
    {"role": "assistant", "thinking": "7 times 13.", "content": "No."},
    {"role": "user", "content": "And 97?"},
    {"role": "assistant", "thinking": "Not divisible by 2, 3, 5 or 7.", "content": "Yes, 97 is prime."},
]
HARMONY_TOOL_CHAT = [
    {"role": "developer", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Z\u00fcrich for two days?"},
    {"role": "assistant", "content": "", "thinking": "I should call get_weather.", "tool_calls": [HARMONY_CALL]},
    {"role": "tool", "content": {"temp_c": [21.5, 19.0], "sky": "clear"}},
    {"role": "assistant", "content": "21.5 \u00b0C today and 19 \u00b0C tomorrow, clear."},
]


HARMONY_SPECIALS = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>",
                    "<|constrain|>"]


def harmony_context(messages, add_generation_prompt, **extra):
    return chat_context(messages, add_generation_prompt, bos="<|startoftext|>", eos="<|return|>",
                        date_string="2025-08-05", **extra)


def harmony_cases():
    pending = HARMONY_TOOL_CHAT[:4]
    pending_content = [dict(m) for m in pending]
    pending_content[2] = {"role": "assistant", "content": "Calling the weather tool.",
                          "tool_calls": [{"type": "function", "function": {
                              "name": "get_time", "arguments": "{\"city\": \"Z\u00fcrich\"}",
                              "content_type": "<|constrain|>json"}}]}
    cases = [
        ("harmony_tools_genprompt", HARMONY, harmony_context(HARMONY_TOOL_CHAT[:2], True, tools=HARMONY_TOOLS,
                                                             reasoning_effort="high", builtin_tools=["browser", "python"],
                                                             model_identity="You are a test model.")),
        ("harmony_thinking_last_turn", HARMONY, harmony_context(HARMONY_THINKING, False, tools=None)),
        ("harmony_thinking_genprompt", HARMONY, harmony_context(HARMONY_THINKING + [
            {"role": "user", "content": "Why?"}], True, tools=None)),
        ("harmony_multi_turn", HARMONY, harmony_context(HARMONY_MULTI, False, tools=None, builtin_tools=["python"])),
        ("harmony_tool_call_then_final", HARMONY, harmony_context(HARMONY_TOOL_CHAT, False, tools=HARMONY_TOOLS[:2])),
        ("harmony_tool_call_pending", HARMONY, harmony_context(pending, True, tools=HARMONY_TOOLS[:2])),
        ("harmony_tool_call_string_arguments", HARMONY, harmony_context(pending_content, True, tools=HARMONY_TOOLS)),
    ]
    errors = [
        ("harmony_channel_tags_in_content", HARMONY, harmony_context(
            [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "<|channel|>final<|message|>Hello"}], False, tools=None),
         "without <|channel|> tags (found in 'content')"),
        ("harmony_tool_without_call", HARMONY, harmony_context(
            [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}], True, tools=None),
         "A tool message needs an assistant tool call before it"),
        ("harmony_call_with_content_and_thinking", HARMONY, harmony_context(
            [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "a", "thinking": "b", "tool_calls": [HARMONY_CALL]}], False, tools=None),
         "Cannot pass both content and thinking"),
    ]
    return cases, errors


def family_cases():
    L3 = dict(bos="<|begin_of_text|>", eos="<|eot_id|>")
    cases = [
        ("llama3_system_genprompt", LLAMA3, chat_context(SYS_CHAT, True, **L3)),
        ("llama3_plain_no_genprompt", LLAMA3, chat_context(PLAIN_CHAT, False, **L3)),
        ("llama3_single_genprompt", LLAMA3, chat_context(SINGLE, True, **L3)),
        ("llama31_system_genprompt", LLAMA31, chat_context(SYS_CHAT, True, date_string="26 Jul 2024", tools=None,
                                                           **L3)),
        ("llama31_plain_no_genprompt", LLAMA31, chat_context(PLAIN_CHAT, False, date_string="01 Jan 2025",
                                                             tools=None, **L3)),
        ("llama31_tools", LLAMA31, chat_context(TOOL_CHAT, False, date_string="15 Mar 2025",
                                                tools=[WEATHER_TOOL, TIME_TOOL], **L3)),
        ("llama31_tools_genprompt_no_system", LLAMA31, chat_context(SINGLE, True, date_string="15 Mar 2025",
                                                                    tools=[TIME_TOOL], **L3)),
        ("chatml_default_system_genprompt", CHATML, chat_context(PLAIN_CHAT, True, bos=None, eos="<|im_end|>",
                                                                 tools=None)),
        ("chatml_system_no_genprompt", CHATML, chat_context(SYS_CHAT, False, bos=None, eos="<|im_end|>",
                                                            tools=None)),
        ("chatml_tools", CHATML, chat_context(QWEN_TOOL_CHAT, True, bos=None, eos="<|im_end|>",
                                              tools=[WEATHER_TOOL, TIME_TOOL])),
        ("chatml_empty_tools_list", CHATML, chat_context(SYS_CHAT, True, bos=None, eos="<|im_end|>", tools=[])),
        ("llama2_system", LLAMA2, chat_context(SYS_CHAT, False)),
        ("llama2_plain", LLAMA2, chat_context(PLAIN_CHAT + [{"role": "user", "content": "Bye"}], False)),
        ("llama2_single", LLAMA2, chat_context(SINGLE, True)),
        ("gemma_genprompt", GEMMA, chat_context(PLAIN_CHAT + [{"role": "user", "content": "Thanks"}], True,
                                                bos="<bos>", eos="<eos>")),
        ("gemma_no_genprompt", GEMMA, chat_context(PLAIN_CHAT, False, bos="<bos>", eos="<eos>")),
        ("gemma3_system_genprompt", GEMMA3, chat_context(SYS_CHAT, True, bos="<bos>", eos="<eos>")),
        ("gemma3_parts_no_genprompt", GEMMA3, chat_context(
            [{"role": "system", "content": [{"type": "text", "text": "Be brief. "}]},
             {"role": "user", "content": [{"type": "text", "text": " Hi "}, {"type": "image"},
                                          {"type": "text", "text": "what is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat.\n"}]}], False,
            bos="<bos>", eos="<eos>")),
        ("zephyr_system_genprompt", ZEPHYR, chat_context(SYS_CHAT, True)),
        ("zephyr_plain_no_genprompt", ZEPHYR, chat_context(PLAIN_CHAT, False)),
        ("phi3_system_genprompt", PHI3, chat_context(SYS_CHAT, True, bos="<s>", eos="<|endoftext|>")),
        ("phi3_plain_no_genprompt", PHI3, chat_context(PLAIN_CHAT, False, bos="<s>", eos="<|endoftext|>")),
        ("generation_plain", GENERATION, chat_context(PLAIN_CHAT, False)),
        ("generation_system_genprompt", GENERATION, chat_context(SYS_CHAT, True)),
    ]
    errors = [
        ("llama2_roles_not_alternating", LLAMA2, chat_context(BAD_ORDER, False),
         "Conversation roles must alternate"),
        ("gemma_system_role", GEMMA, chat_context(SYS_CHAT, True, bos="<bos>", eos="<eos>"),
         "System role not supported"),
        ("gemma_roles_not_alternating", GEMMA, chat_context(BAD_ORDER, True, bos="<bos>", eos="<eos>"),
         "Conversation roles must alternate"),
        ("gemma3_roles_not_alternating", GEMMA3, chat_context(BAD_ORDER, True, bos="<bos>", eos="<eos>"),
         "Conversation roles must alternate"),
    ]
    return cases, errors


# ---------------------------------------------------------------------------------------------------
# Micro cases: one Jinja feature at a time
# ---------------------------------------------------------------------------------------------------

MSGS = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "done"},
]
NESTED = {
    "name": "Zo\u00eb \"quoted\" <tag> & 'apos'",
    "list": [1, 2.5, 0.5, 1.0, True, False, None, -3],
    "nested": {"empty_list": [], "empty_dict": {}, "deep": {"k": [1, {"x": "y"}]}},
    "text": "line1\nline2\ttab \\ backslash",
    "unicode": "caf\u00e9 \u65e5\u672c \U0001F600",
}


def micro_cases():
    c = []

    def ok(name, template, context=None):
        c.append((name, template, context or {}))

    # --- text, output tags, comments, whitespace control --------------------------------------
    ok("text_plain", "Hello, world!")
    ok("text_trailing_newline_dropped", "one line\n")
    ok("text_two_trailing_newlines", "two\n\n")
    ok("expr_simple", "{{ a }} and {{ b }}", {"a": "A", "b": 2})
    ok("comment_inline", "a{# a comment #}b")
    ok("comment_multiline", "a{# line 1\n   line 2 #}b")
    ok("ws_dash_expr", "a  \n {{- b -}} \n  c", {"b": "B"})
    ok("ws_dash_block", "x\n  {%- if true -%}\n  y\n  {%- endif -%}\n  z")
    ok("ws_dash_left_only", "a   {{- 'b' }}   c")
    ok("trim_blocks_newline", "{% if true %}\nyes\n{% endif %}\nend")
    ok("trim_blocks_not_after_expr", "{{ 'a' }}\nb")
    ok("lstrip_blocks_indented", "start\n    {% if true %}\n    indented\n    {% endif %}\ndone")
    ok("lstrip_blocks_not_expr", "    {{ 'x' }}\n")
    ok("lstrip_blocks_text_before_tag", "text {% if true %}kept{% endif %} text")
    ok("comment_own_line", "a\n    {# note #}\nb")
    ok("plus_disables_lstrip", "    {%+ if true %}x{% endif %}")
    ok("plus_disables_trim", "{% if true +%}\nx{% endif %}")
    ok("indented_loop_layout", "<list>\n  {% for i in items %}\n  <i>{{ i }}</i>\n  {% endfor %}\n</list>",
       {"items": [1, 2]})
    ok("crlf_in_text", "a\r\nb")

    # --- literals ------------------------------------------------------------------------------
    ok("literal_quotes", "{{ 'single' }} {{ \"double\" }} {{ 'has \"double\"' }} {{ \"has 'single'\" }}")
    ok("literal_escapes", "{{ 'a\\nb\\tc\\\\d\\'e' }}|{{ \"q\\\"q\" }}")
    ok("literal_numbers", "{{ 42 }} {{ -7 }} {{ 3.25 }} {{ 0.5 }} {{ 10.0 }}")
    ok("literal_bool_none", "{{ true }} {{ True }} {{ false }} {{ False }} {{ none }} {{ None }}")
    ok("literal_list", "{{ [1, 'a', [2, 3], []] }}")
    ok("literal_dict", "{{ {'a': 1, 'b': [true, none], 'c': {}} }}")
    ok("literal_tuple", "{{ (1, 2) }} {{ (1,) }} {{ () }}")
    ok("literal_tuple_loop", "{% for a, b in [(1, 'x'), (2, 'y')] %}{{ a }}{{ b }};{% endfor %}")
    ok("literal_repr_quotes", "{{ ['it\\'s', 'q\"', 'both\\'\"', 'a\\nb', 'caf\u00e9'] }}")
    ok("literal_empty_values", "[{{ [] }}][{{ {} }}][{{ '' }}]")

    # --- operators -----------------------------------------------------------------------------
    ok("op_int_arith", "{{ 1 + 2 }} {{ 5 - 7 }} {{ 3 * 4 }} {{ 7 / 2 }} {{ 8 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} "
                       "{{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 2 ** -1 }}")
    ok("op_float_arith", "{{ 1 + 2.0 }} {{ 0.1 + 0.2 }} {{ 7.5 // 2 }} {{ 7.5 % 2 }} {{ 2 ** 0.5 }} {{ 1.5 * 2 }}")
    ok("op_precedence", "{{ 2 + 3 * 4 }} {{ (2 + 3) * 4 }} {{ 2 * -3 }} {{ 10 - 2 - 3 }} {{ 2 ** 3 ** 2 }}")
    ok("op_unary_minus_pow", "{{ -2 ** 2 }} {{ -(2 ** 2) }}")
    ok("op_unary_minus_var", "{{ -x }} {{ -(x + 1) }} {{ - -x }} {{ -y }}", {"x": 3, "y": -1.5})
    ok("op_unary_minus_then_filter", "{{ -3|abs }} {{ -2.5|int }} {{ -(3|abs) }}")
    ok("op_string_concat", "{{ 'ab' + 'cd' }} {{ 'n=' ~ 5 }} {{ 'x' ~ none }} {{ 1 ~ 2 }} "
                           "{{ 'x' ~ undefined_name ~ 'y' }}")
    ok("op_string_repeat", "{{ 'ab' * 3 }}|{{ '-' * 0 }}|{{ 2 * 'z' }}")
    ok("op_list_concat", "{{ [1] + [2, 3] }} {{ ([1] + ['a'])|length }}")
    ok("op_compare_numbers", "{{ 1 == 1.0 }} {{ 2 != 2 }} {{ 2 < 3 }} {{ 3 <= 3 }} {{ 4 > 5 }} {{ 5 >= 6 }}")
    ok("op_compare_strings", "{{ 'abc' < 'abd' }} {{ 'B' < 'a' }} {{ 'a' == 'a' }} {{ role == 'user' }}",
       {"role": "user"})
    ok("op_compare_lists", "{{ [1, 2] == [1, 2] }} {{ {'a': 1} == {'a': 1} }} {{ none == none }} {{ 1 == '1' }}")
    ok("op_in", "{{ 'ell' in 'hello' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'v' in {'k': 'v'} }} "
                "{{ 3 not in [1, 2] }} {{ not 'x' in 'abc' }}")
    ok("op_logic", "{{ true and false }} {{ true or false }} {{ not true }} {{ not none }}")
    ok("op_logic_values", "[{{ '' or 'fallback' }}] [{{ 0 and 1 }}] [{{ 'a' and 'b' }}] [{{ none or [] }}] "
                          "[{{ missing or 'm' }}]")
    ok("op_conditional", "{{ 'yes' if flag else 'no' }}|{{ 'shown' if flag }}|{{ 'hidden' if not flag }}|",
       {"flag": True})
    ok("op_conditional_nested", "{{ 'a' if x > 2 else 'b' if x > 1 else 'c' }}", {"x": 2})
    ok("op_truthiness", "{% for v in values %}{{ 'T' if v else 'F' }}{% endfor %}",
       {"values": [0, 1, "", "a", [], [0], {}, {"a": 1}, None, 0.0, 0.1, False, True, " "]})
    ok("op_truthiness_undefined", "{{ 'T' if missing else 'F' }}{{ 'T' if msg.nope else 'F' }}",
       {"msg": {"role": "user"}})

    # --- attribute and subscript access --------------------------------------------------------
    ok("access_attr_and_item", "{{ msg.role }} {{ msg['role'] }} {{ msg.content }}|{{ msg.missing }}|"
                               "{{ msg['missing'] }}|", {"msg": {"role": "user", "content": "hi"}})
    ok("access_missing_is_defined", "{{ msg.nope is defined }} {{ msg.role is defined }} "
                                    "{{ msg['nope'] is undefined }}",
       {"msg": {"role": "user"}})
    ok("access_list_index", "{{ items[0] }} {{ items[-1] }} {{ items[-2] }}|{{ items[10] }}|",
       {"items": ["a", "b", "c", "d"]})
    ok("access_list_slices", "{{ items[1:] }} {{ items[:-1] }} {{ items[::-1] }} {{ items[1:3] }} {{ items[::2] }} "
                             "{{ items[5:] }}", {"items": [1, 2, 3, 4]})
    ok("access_string_slices", "{{ s[0] }} {{ s[-1] }} {{ s[1:] }} {{ s[:-1] }} {{ s[::-1] }} {{ s[::2] }}",
       {"s": "hello"})
    ok("access_unicode_string", "{{ s[1] }} {{ s[-1] }} {{ s|length }} {{ s[::-1] }} {{ s[6:] }}",
       {"s": "h\u00e9llo \u4e16\u754c\U0001F600"})
    ok("access_nested", "{{ data.a.b[1].c }} {{ data['a']['b'][0] }} {{ messages[0].content }}",
       {"data": {"a": {"b": [7, {"c": "deep"}]}}, "messages": [{"role": "user", "content": "first"}]})
    ok("access_variable_key", "{% for k in ['x', 'y'] %}{{ d[k] }}{% endfor %} {{ items[i] }}",
       {"d": {"x": 1, "y": 2}, "items": ["p", "q"], "i": 1})

    # --- filters ---------------------------------------------------------------------------------
    ok("filter_trim", "[{{ '  a b \\n'|trim }}] [{{ s|trim }}]", {"s": "\t\n x \r\n"})
    ok("filter_length", "{{ 'h\u00e9llo'|length }} {{ [1, 2, 3]|length }} {{ {'a': 1}|length }} {{ messages|length }} "
                        "{{ ''|length }}", {"messages": MSGS})
    ok("filter_count", "{{ [1, 2]|count }} {{ 'abc'|count }}")
    ok("filter_tojson_plain", "{{ data|tojson }}", {"data": NESTED})
    ok("filter_tojson_indent2", "{{ data|tojson(indent=2) }}", {"data": NESTED})
    ok("filter_tojson_indent4", "{{ data|tojson(indent=4) }}", {"data": NESTED})
    ok("filter_tojson_string", "{{ 'it\\'s \"x\" <b>\\n'|tojson }} {{ s|tojson }}",
       {"s": "t\u00e9st \u2028 \U0001F600"})
    ok("filter_tojson_scalars", "{{ true|tojson }} {{ false|tojson }} {{ none|tojson }} {{ 3|tojson }} "
                                "{{ 0.5|tojson }} {{ 1.0|tojson }} {{ -2|tojson }} {{ 1e20|tojson }} "
                                "{{ 1e-07|tojson }}")
    ok("filter_tojson_list_literal", "{{ [1, 'a', (2, 3), {'k': none}]|tojson }}")
    ok("filter_tojson_empty_indent", "{{ [] | tojson(indent=2) }} {{ {} | tojson(indent=2) }} "
                                     "{{ {'a': []}|tojson(indent=2) }}")
    ok("filter_tojson_messages", "{{ messages|tojson }}", {"messages": MSGS})
    ok("filter_case", "{{ 'hello World'|upper }} {{ 'Hello WORLD'|lower }} {{ 'hELLO wORLD'|capitalize }}")
    ok("filter_title", "{{ \"hello wORLD-foo bar_baz they're (x) [y]\"|title }}")
    ok("filter_replace", "{{ 'a-b-c'|replace('-', '+') }} {{ 'aaa'|replace('a', 'bb') }}")
    ok("filter_default", "[{{ missing|default('dflt') }}] [{{ ''|default('dflt') }}] [{{ ''|default('dflt', true) }}] "
                         "[{{ none|default('dflt') }}] [{{ none|default('dflt', boolean=true) }}] "
                         "[{{ 0|default('z', true) }}] [{{ msg.nope|default('nokey') }}]", {"msg": {}})
    ok("filter_first_last", "{{ [3, 1, 2]|first }} {{ [3, 1, 2]|last }} {{ 'abc'|first }} {{ 'abc'|last }} "
                            "{{ (messages|first).role }}",
       {"messages": MSGS})
    ok("filter_join", "{{ [1, 2, 3]|join }}|{{ ['a', 'b']|join(', ') }}|{{ messages|join('/', attribute='role') }}"
                      "|{{ []|join(',') }}", {"messages": MSGS})
    ok("filter_list", "{{ 'abc'|list }} {{ (1, 2)|list }} {{ {'a': 1, 'b': 2}|list }} {{ range(3)|list }}")
    ok("filter_string", "{{ 12|string ~ 'x' }} {{ [1, 'a']|string }} {{ none|string }} {{ 1.5|string|length }}")
    ok("filter_int", "{{ '42'|int }} {{ '3.7'|int }} {{ 3.99|int }} {{ 'abc'|int }} {{ true|int }} {{ ' 7 '|int }}")
    ok("filter_float", "{{ '1.5'|float }} {{ 2|float }} {{ 'x'|float }} {{ '1e3'|float }}")
    ok("filter_abs", "{{ x|abs }} {{ y|abs }} {{ 0|abs }}", {"x": -2.5, "y": -4})
    ok("filter_round", "{{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 3.14159|round(2) }} {{ 7|round }} "
                       "{{ 1.25|round(1) }} {{ -1.5|round }}")
    ok("filter_items", "{% for k, v in d|items %}{{ k }}={{ v }};{% endfor %}", {"d": {"b": 1, "a": 2, "c": None}})
    ok("filter_selectattr_equalto", "{{ messages|selectattr('role', 'equalto', 'assistant')|list|length }} "
                                    "{{ messages|selectattr('role', 'equalto', 'user')"
                                    "|map(attribute='content')|join(',') }}",
       {"messages": MSGS})
    ok("filter_selectattr_defined", "{{ messages|selectattr('tool_calls', 'defined')|list|length }} "
                                    "{{ messages|selectattr('tool_calls', 'undefined')"
                                    "|map(attribute='role')|join(',') }}",
       {"messages": MSGS})
    ok("filter_rejectattr_none", "{{ messages|rejectattr('content', 'none')|map(attribute='role')|join(',') }} "
                                 "{{ messages|selectattr('content', 'none')|map(attribute='role')|join(',') }}",
       {"messages": MSGS})
    ok("filter_selectattr_string", "{{ messages|selectattr('content', 'string')|list|length }}", {"messages": MSGS})
    ok("filter_selectattr_truthy", "{{ tools|selectattr('enabled')|map(attribute='name')|join(',') }} "
                                   "{{ tools|rejectattr('enabled')|map(attribute='name')|join(',') }}",
       {"tools": [{"name": "a", "enabled": True}, {"name": "b", "enabled": False}, {"name": "c", "enabled": 1},
                  {"name": "d", "enabled": None}]})
    ok("filter_map", "{{ ['a', 'b']|map('upper')|join }} {{ messages|map(attribute='role')|list }} "
                     "{{ ['x', 'y']|map('upper')|list }}", {"messages": MSGS[:2]})
    ok("filter_safe", "{{ '<b>&</b>'|safe }} {{ '<i>\"</i>' }}")
    ok("filter_indent", "[{{ text|indent(2) }}]", {"text": "line1\nline2\n\nline4\n"})
    ok("filter_indent_first", "[{{ text|indent(width=2, first=true) }}][{{ text|indent(2, false) }}]",
       {"text": "a\nb"})
    ok("filter_indent_default", "[{{ text|indent }}]", {"text": "a\n  b"})
    ok("filter_reverse", "{{ [1, 2, 3]|reverse|list }} {{ 'abc'|reverse }} "
                         "{% for x in [1, 2, 3]|reverse %}{{ x }}{% endfor %}")
    ok("filter_sort", "{{ [3, 1, 2]|sort }} {{ ['b', 'A', 'c', 'a']|sort }} {{ [2.5, 1, -3]|sort }}")
    ok("filter_sort_attribute", "{{ people|sort(attribute='age')|map(attribute='name')|join(',') }} "
                                "{{ people|sort(attribute='name')|map(attribute='name')|join(',') }}",
       {"people": [{"name": "bob", "age": 30}, {"name": "Al", "age": 25}, {"name": "cy", "age": 35}]})
    ok("filter_unique", "{{ [1, 2, 1, 3, 2]|unique|list }} {{ ['a', 'A', 'b']|unique|list }}")
    ok("filter_dictsort", "{% for k, v in d|dictsort %}{{ k }}={{ v }};{% endfor %}",
       {"d": {"b": 1, "A": 2, "c": 3, "a0": 4}})
    ok("filter_sum_min_max", "{{ [1, 2, 3.5]|sum }} {{ [1, 2]|sum }} {{ []|sum }} {{ [3, 1, 2]|min }} "
                             "{{ [3, 1, 2]|max }} "
                             "{{ ['b', 'A', 'c']|min }} {{ ['b', 'A', 'c']|max }}")
    ok("filter_chain", "{{ '  Mixed Case  '|trim|lower|replace(' ', '_')|upper }}")
    ok("filter_in_expression", "{{ 'n=' ~ items|length ~ '!' }} {{ items|length + 1 }} {{ (items|first) * 2 }}",
       {"items": [5, 6]})

    # --- tests -----------------------------------------------------------------------------------
    ok("test_defined", "{{ x is defined }} {{ missing is defined }} {{ missing is undefined }} "
                       "{{ x is undefined }} {{ n is defined }}", {"x": 1, "n": None})
    ok("test_none", "{{ none is none }} {{ x is none }} {{ n is none }} {{ missing is none }}", {"x": 0, "n": None})
    ok("test_string", "{{ 'a' is string }} {{ 1 is string }} {{ s is string }} {{ none is string }} "
                      "{{ ['a'] is string }}", {"s": ""})
    ok("test_number", "{{ 1 is number }} {{ 1.5 is number }} {{ true is number }} {{ 'a' is number }} "
                      "{{ none is number }}")
    ok("test_integer_float", "{{ 1 is integer }} {{ 1.0 is integer }} {{ true is integer }} {{ 1.0 is float }} "
                             "{{ 1 is float }} {{ x is integer }} {{ y is float }}", {"x": 5, "y": 5.0})
    ok("test_mapping_iterable", "{{ {} is mapping }} {{ [] is mapping }} {{ d is mapping }} {{ [] is iterable }} "
                                "{{ 'a' is iterable }} {{ 1 is iterable }} {{ {} is iterable }} {{ none is iterable }}",
       {"d": {"a": 1}})
    ok("test_sequence", "{{ [] is sequence }} {{ 'a' is sequence }} {{ {} is sequence }} {{ 1 is sequence }} "
                        "{{ (1, 2) is sequence }}")
    ok("test_boolean_true_false", "{{ true is boolean }} {{ 1 is boolean }} {{ true is true }} {{ 1 is true }} "
                                  "{{ false is false }} {{ 0 is false }} {{ none is false }}")
    ok("test_odd_even_divisible", "{{ 3 is odd }} {{ 3 is even }} {{ 0 is even }} {{ -3 is odd }} "
                                  "{{ 9 is divisibleby(3) }} {{ 10 is divisibleby(3) }}")
    ok("test_equalto_in", "{{ 3 is equalto(3) }} {{ 'a' is equalto('b') }} {{ 2 is in [1, 2] }} "
                          "{{ 'a' is in 'cat' }} {{ 'z' is in {'z': 0} }}")
    ok("test_lower_upper", "{{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 'aBc' is lower }} {{ 'aBc' is upper }} "
                           "{{ 'a1 b' is lower }}")
    ok("test_not", "{{ x is not none }} {{ x is not string }} {{ missing is not defined }} {{ 4 is not odd }} "
                   "{{ not x is none }}", {"x": "s"})
    ok("test_in_if", "{% if content is string %}S:{{ content }}{% elif content is iterable %}"
                     "{% for part in content %}[{{ part.type }}]{% endfor %}{% endif %}",
       {"content": [{"type": "text", "text": "hi"}, {"type": "image"}]})

    # --- string methods ------------------------------------------------------------------------
    ok("method_strip", "[{{ s.strip() }}] [{{ s.lstrip() }}] [{{ s.rstrip() }}]", {"s": "  \n hi there \n "})
    ok("method_strip_chars", "[{{ s.strip('\\n') }}] [{{ s.rstrip('\\n') }}] [{{ 'xxhixx'.strip('x') }}] "
                             "[{{ s.lstrip('\\n') }}]", {"s": "\n\nhi\n \n"})
    ok("method_split", "{{ 'a b  c'.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} "
                       "{{ '  x  y '.split() }} {{ ''.split(',') }} {{ 'a b c'.split(' ', 1) }}")
    ok("method_split_index", "{{ s.split('</think>')[-1].strip() }}|{{ s.split('</think>')[0] }}",
       {"s": "<think>hmm</think>\n\n Answer "})
    ok("method_starts_ends", "{{ s.startswith('He') }} {{ s.startswith('he') }} {{ s.endswith('!') }} "
                             "{{ s.endswith('x') }}", {"s": "Hello!"})
    ok("method_case", "{{ s.upper() }} {{ s.lower() }} {{ s.title() }} {{ s.capitalize() }}",
       {"s": "hELLO wORLD-foo bar_baz they're"})
    ok("method_replace_find", "{{ s.replace('l', 'L') }} {{ s.find('lo') }} {{ s.find('z') }} {{ s.find('l') }}",
       {"s": "hello"})
    ok("method_chain", "{{ ' A,b '.strip().lower().split(',') }}")
    ok("method_dict", "{% for k, v in d.items() %}{{ k }}:{{ v }} {% endfor %}|{{ d.keys()|list }}|"
                      "{{ d.values()|list }}|{{ d.get('a') }}|{{ d.get('zz') }}|{{ d.get('zz', 'dflt') }}|"
                      "{% for k in d %}{{ k }}{% endfor %}|{% for k in d.keys() %}{{ k }}{% endfor %}",
       {"d": {"b": 1, "a": [2], "c": "three"}})

    # --- statements ------------------------------------------------------------------------------
    ok("stmt_if_elif_else", "{% for x in [1, 2, 3, 4] %}{% if x == 1 %}one{% elif x == 2 %}two{% elif x == 3 %}"
                            "three{% else %}many{% endif %},{% endfor %}")
    ok("stmt_if_nested", "{% if a %}{% if b %}ab{% else %}a{% endif %}{% else %}none{% endif %}",
       {"a": True, "b": False})
    ok("stmt_for_else_empty", "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}")
    ok("stmt_for_else_filtered", "{% for x in [1, 2] if x > 5 %}{{ x }}{% else %}none matched{% endfor %}")
    ok("stmt_for_else_nonempty", "{% for x in [1] %}{{ x }}{% else %}empty{% endfor %}")
    ok("stmt_for_dict_items", "{% for k, v in d.items() %}{{ k }}={{ v }}{{ ', ' if not loop.last }}{% endfor %}",
       {"d": {"z": 1, "a": 2, "m": 3}})
    ok("stmt_for_dict_keys", "{% for k in d %}{{ k }}{% endfor %}", {"d": {"z": 1, "a": 2}})
    ok("stmt_for_string", "{% for ch in 'h\u00e9!' %}[{{ ch }}]{% endfor %}")
    ok("stmt_for_inline_if", "{% for x in range(10) if x is odd %}{{ loop.index }}/{{ loop.length }}:{{ x }}"
                             "{{ ',' if not loop.last }}{% endfor %}")
    ok("stmt_for_inline_if_messages", "{% for m in messages if m.role != 'system' %}{{ loop.index0 }}{{ m.role[0] }}"
                                      "{% endfor %}", {"messages": MSGS})
    ok("stmt_loop_vars", "{% for x in ['a', 'b', 'c'] %}{{ x }}:{{ loop.index }}{{ loop.index0 }}{{ loop.first }}"
                         "{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}|{% endfor %}")
    ok("stmt_loop_prev_next", "{% for x in [1, 2, 3] %}[{{ loop.previtem }}-{{ x }}-{{ loop.nextitem }}]{% endfor %}")
    ok("stmt_loop_prev_defined", "{% for m in messages %}{% if loop.previtem is defined and loop.previtem.role == "
                                 "m.role %}dup{% else %}{{ m.role }}{% endif %} {% endfor %}",
       {"messages": [{"role": "user"}, {"role": "user"}, {"role": "assistant"}]})
    ok("stmt_loop_cycle", "{% for x in range(5) %}{{ loop.cycle('a', 'b') }}{% endfor %}")
    ok("stmt_nested_loops", "{% for row in rows %}{% set outer = loop.index %}{% for c in row %}"
                            "{{ outer }}.{{ loop.index }}"
                            "={{ c }} {% endfor %}{% endfor %}", {"rows": [["a", "b"], ["c"]]})
    ok("stmt_break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}"
                              "{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}")
    ok("stmt_break_nested", "{% for a in [1, 2] %}{% for b in [1, 2, 3] %}{% if b == 2 %}{% break %}{% endif %}"
                            "{{ a }}{{ b }} {% endfor %}{% endfor %}")
    ok("stmt_set_simple", "{% set x = 5 %}{% set y = x * 2 %}{% set s = 'v' ~ y %}{{ y }} {{ s }}")
    ok("stmt_set_tuple", "{% set a, b = 1, 2 %}{{ a }}{{ b }} {% set c, d = ['x', 'y'] %}{{ c }}{{ d }}")
    ok("stmt_set_scope_in_loop", "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }} {% endfor %}|{{ x }}")
    ok("stmt_set_scope_in_if", "{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}")
    ok("stmt_namespace", "{% set ns = namespace(count=0, found=false, last='') %}{% for m in messages %}"
                         "{% set ns.count = ns.count + 1 %}"
                         "{% if m.role == 'tool' %}{% set ns.found = true %}{% endif %}"
                         "{% set ns.last = m.role %}{% endfor %}{{ ns.count }} {{ ns.found }} {{ ns.last }}",
       {"messages": MSGS})
    ok("stmt_namespace_index", "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
                               "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}{{ ns.last_user }}",
       {"messages": MSGS + [{"role": "user", "content": "again"}]})
    ok("stmt_block_set", "{% set greeting %}Hello {{ name }}!{% endset %}[{{ greeting }}] {{ greeting|length }}",
       {"name": "W\u00f6rld"})
    ok("stmt_block_set_multiline", "{% set body %}\n  {% for i in [1, 2] %}\n  item {{ i }}\n  {% endfor %}\n"
                                   "{% endset %}[{{ body }}]")
    ok("stmt_macro", "{% macro render(role, content='(empty)', sep=': ') %}"
                     "{{ role }}{{ sep }}{{ content }}{% endmacro %}"
                     "{{ render('user') }}|{{ render('bot', 'hi') }}|{{ render('x', sep=' -> ', content='y') }}")
    ok("stmt_macro_multiline", "{% macro turn(m) %}\n<{{ m.role }}>\n{{ m.content }}\n{% endmacro %}\n"
                               "{% for m in messages %}\n{{ turn(m) }}\n{% endfor %}", {"messages": MSGS[:2]})
    ok("stmt_macro_calls_macro", "{% macro inner(x) %}({{ x }}){% endmacro %}{% macro outer(a, b=2) %}"
                                 "{{ inner(a) }}{{ inner(b) }}{% endmacro %}{{ outer(1) }}{{ outer('p', b='q') }}")
    # A macro sees the scopes it is defined in as they are when it is called (jinja2's closures):
    # itself, macros and variables set after it; not its caller's loop variables.
    ok("stmt_macro_recursive", "{% macro down(n, sep='') %}{% if n > 0 %}{{ sep }}{{ n }}{{ down(n - 1, ',') }}"
                               "{% endif %}{% endmacro %}{{ down(4) }}|{% set s = down(2) %}{{ s | length }}")
    ok("stmt_macro_calls_later_macro", "{% macro a() %}A{{ b() }}{% endmacro %}{% macro b() %}B{% endmacro %}{{ a() }}")
    ok("stmt_macro_sees_later_sets", "{% set x = 1 %}{% macro a() %}[{{ x }}{{ y }}]{% endmacro %}{{ a() }}"
                                     "{% set x = 2 %}{% set y = 3 %}{{ a() }}")
    ok("stmt_macro_not_callers_loop", "{% macro a() %}[{{ m }}]{% endmacro %}{% for m in [1, 2] %}{{ a() }}{% endfor %}")
    ok("stmt_macro_in_loop_body", "{% for i in [1, 2] %}{% set z = i * 10 %}{% macro a() %}{{ z }}{% endmacro %}"
                                  "{{ a() }}{% endfor %}")
    ok("stmt_range", "{{ range(3)|list }} {{ range(2, 5)|list }} {{ range(10, 0, -3)|list }} {{ range(0)|list }} "
                     "{% for i in range(1, 4) %}{{ i }}{% endfor %}")
    ok("stmt_range_len", "{% for i in range(messages|length - 1, -1, -1) %}{{ messages[i].role[0] }}{% endfor %}",
       {"messages": MSGS})

    # --- output formatting of non-strings ------------------------------------------------------
    ok("output_numbers", "{{ 1 }} {{ 1.0 }} {{ 0.1 }} {{ 1e20 }} {{ 1.5e3 }} {{ 1e-7 }} {{ 123456.789 }} {{ 10 / 4 }}")
    ok("output_context_numbers", "{{ i }} {{ f }} {{ g }} {{ big }} {{ neg }}",
       {"i": 7, "f": 2.0, "g": 0.25, "big": 12345678901234, "neg": -0.5})
    ok("output_bool_none", "{{ true }} {{ none }} {{ b }} {{ n }}", {"b": False, "n": None})
    ok("output_containers", "{{ [1, 'a'] }} {{ {'a': 1} }} {{ lst }} {{ d }}",
       {"lst": [1, 2.5, "s", None, True, {"k": [False]}], "d": {"a": "b", "n": None}})
    ok("output_undefined", "[{{ undefined_var }}] [{{ msg.nope }}] [{{ msg['nope'] }}] [{{ items[9] }}]",
       {"msg": {}, "items": []})
    ok("output_unicode", "{{ s }} {{ s|upper }} {{ [s] }}",
       {"s": "\u00e9t\u00e9 \u00c5ngstr\u00f6m \u65e5\u672c \U0001F600"})

    # --- small realistic combinations ---------------------------------------------------------
    ok("combo_content_parts", "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
                              "{% for p in m.content if p.type == 'text' %}{{ p.text }}{% endfor %}{% endif %}\n"
                              "{% endfor %}",
       {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
                     {"role": "assistant", "content": "a cat"}]})
    ok("combo_system_slice", "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}"
                             "{% set rest = messages[1:] %}{% else %}{% set sys = 'default' %}{% set rest = messages %}"
                             "{% endif %}S={{ sys }} N={{ rest|length }} L={{ rest[-1].role }}", {"messages": MSGS})
    ok("combo_think_strip", "{% for m in messages %}{% set c = m.content %}{% if '</think>' in c %}"
                            "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}{{ m.role }}: {{ c }}\n"
                            "{% endfor %}",
       {"messages": [{"role": "assistant", "content": "<think>\nplan\n</think>\n\nFinal."},
                     {"role": "user", "content": "ok"}]})
    return c


def micro_errors():
    return [
        ("error_raise_exception", "{% if true %}{{ raise_exception('Some message') }}{% endif %}", {}, "Some message"),
        ("error_raise_exception_in_loop", "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                                          "{{ raise_exception('Unsupported role: ' + m.role) }}{% endif %}{% endfor %}",
         {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
         "Unsupported role: robot"),
        ("error_unclosed_if", "{% if true %}abc", {}, ""),
        ("error_unclosed_for", "{% for x in items %}{{ x }}", {"items": [1]}, ""),
        ("error_mismatched_end", "{% for x in items %}{{ x }}{% endif %}", {"items": [1]}, ""),
        ("error_unknown_tag", "{% frobnicate %}", {}, ""),
        ("error_unclosed_string", "{{ 'abc }}", {}, ""),
        ("error_unclosed_expression", "{{ x ", {"x": 1}, ""),
        ("error_undefined_attr_of_undefined", "{{ missing.attr }}", {}, "missing"),
        ("error_undefined_attr_of_missing_key", "{{ msg.nope.deeper }}", {"msg": {}}, "nope"),
        ("error_unknown_filter", "{{ 'a'|nosuchfilter }}", {}, "nosuchfilter"),
    ]


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------

def render(template, context):
    return _compile_jinja_template(template).render(**context)


def build_render_cases():
    fam_ok, fam_err = family_cases()
    harmony_ok, harmony_err = harmony_cases()
    ok_cases = fam_ok + harmony_ok + micro_cases()
    err_cases = fam_err + harmony_err + micro_errors()
    out, names = [], set()
    for name, template, context in ok_cases:
        if name in names:
            fail(f"duplicate render case name {name}")
        names.add(name)
        try:
            expected = render(template, context)
        except Exception as e:  # noqa: BLE001
            fail(f"render case {name} raised {type(e).__name__}: {e}")
        out.append({"name": name, "template": template, "context": context, "expected": expected})
    for name, template, context, error in err_cases:
        if name in names:
            fail(f"duplicate render case name {name}")
        names.add(name)
        try:
            got = render(template, context)
        except jinja2.TemplateError as e:
            if error not in str(e):
                fail(f"error case {name}: message {str(e)!r} lacks {error!r}")
        else:
            fail(f"error case {name} rendered {got!r} instead of failing")
        out.append({"name": name, "template": template, "context": context, "error": error})
    # The context must survive the JSON round trip unchanged (the C++ side sees only the JSON).
    for case in out:
        if json.loads(json.dumps(case["context"])) != case["context"]:
            fail(f"render case {case['name']}: context does not round-trip through JSON")
    return out


# ---------------------------------------------------------------------------------------------------
# Tokenizer directories and tokenization cases
# ---------------------------------------------------------------------------------------------------

def save_tokenizer(tok, template, out, jinja_file):
    tok.chat_template = template
    if os.path.isdir(out):
        shutil.rmtree(out)
    tok.save_pretrained(out, save_jinja_files=jinja_file)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    jinja_path = os.path.join(out, "chat_template.jinja")
    if jinja_file:
        with open(jinja_path, encoding="utf-8") as f:
            if f.read() != template:
                fail(f"{out}/chat_template.jinja is not the template")
        if "chat_template" in config:
            fail(f"{out}: the template is in tokenizer_config.json as well as chat_template.jinja")
    else:
        if os.path.exists(jinja_path):
            fail(f"{out}: save_jinja_files=False still wrote chat_template.jinja")
        if config.get("chat_template") != template:
            fail(f"{out}/tokenizer_config.json has no \"chat_template\" string equal to the template")


def make_tokenizers(out_dir, bpe_dir, sp_model):
    for family in ("llama3", "qwen2"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not os.path.isfile(os.path.join(bpe_dir, family, name)):
                fail(f"{bpe_dir}/{family}/{name} is missing: run bpe_reference.py {bpe_dir} first")
    if not os.path.isfile(sp_model):
        fail(f"{sp_model} is not a file")

    # transformers' default: chat_template.jinja. Legacy layout for llama3 (save_jinja_files=False).
    save_tokenizer(AutoTokenizer.from_pretrained(os.path.join(bpe_dir, "llama3")), LLAMA3,
                   os.path.join(out_dir, "tok_llama3"), jinja_file=False)
    save_tokenizer(AutoTokenizer.from_pretrained(os.path.join(bpe_dir, "qwen2")), CHATML,
                   os.path.join(out_dir, "tok_qwen2"), jinja_file=True)

    src = os.path.join(out_dir, "sp_source")
    if os.path.isdir(src):
        shutil.rmtree(src)
    os.makedirs(src)
    shutil.copyfile(sp_model, os.path.join(src, "tokenizer.model"))
    with open(os.path.join(src, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True}, f, indent=2)
    sp_tok = AutoTokenizer.from_pretrained(src)
    # tok_spjson: what transformers 5 saves for it, tokenizer.json (Metaspace, byte fallback) only.
    spjson_out = os.path.join(out_dir, "tok_spjson")
    save_tokenizer(sp_tok, LLAMA2, spjson_out, jinja_file=True)
    if os.path.exists(os.path.join(spjson_out, "tokenizer.model")):
        fail("tok_spjson: transformers saved a tokenizer.model; this case needs tokenizer.json alone")
    sp_out = os.path.join(out_dir, "tok_sp")
    save_tokenizer(sp_tok, LLAMA2, sp_out, jinja_file=True)
    shutil.rmtree(src)
    # transformers 5 saves the converted tokenizer.json and no tokenizer.model; libft reads tokenizer.model.
    if not os.path.exists(os.path.join(sp_out, "tokenizer.model")):
        shutil.copyfile(sp_model, os.path.join(sp_out, "tokenizer.model"))
    if os.path.exists(os.path.join(sp_out, "tokenizer.json")):
        os.remove(os.path.join(sp_out, "tokenizer.json"))
    # save_pretrained drops add_bos_token from tokenizer_config.json (tokenizer.json's post-processor
    # carried it); without tokenizer.json a reload would not add <s>. Put the flag back.
    config_path = os.path.join(sp_out, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("add_bos_token") is not True:
        config["add_bos_token"] = True
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")

    # tok_harmony: the Qwen2-layout BPE with Harmony's markers added as special tokens, and the
    # Harmony template (gpt-oss's format).
    harmony = AutoTokenizer.from_pretrained(os.path.join(bpe_dir, "qwen2"))
    harmony.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIALS],
                       special_tokens=True)
    save_tokenizer(harmony, HARMONY, os.path.join(out_dir, "tok_harmony"), jinja_file=True)

    # Load every directory back as a user would: what is on disk is what the cases below use.
    toks = {}
    for name, template in (("tok_llama3", LLAMA3), ("tok_qwen2", CHATML), ("tok_sp", LLAMA2),
                           ("tok_spjson", LLAMA2), ("tok_harmony", HARMONY)):
        tok = AutoTokenizer.from_pretrained(os.path.join(out_dir, name))
        if tok.chat_template != template:
            fail(f"{name}: the reloaded chat_template differs from the one saved")
        if not tok.is_fast:
            fail(f"{name}: {type(tok).__name__} is not a fast tokenizer, so it has no offset mapping")
        toks[name] = tok
    sp = toks["tok_sp"]
    if (sp.unk_token_id, sp.bos_token_id, sp.eos_token_id) != (0, 1, 2):
        fail(f"tok_sp: unk/bos/eos ids {(sp.unk_token_id, sp.bos_token_id, sp.eos_token_id)}, expected (0, 1, 2)")
    if sp("Hello").input_ids[:1] != [1] or sp("Hello", add_special_tokens=False).input_ids[:1] == [1]:
        fail("tok_sp: reloaded from tokenizer.model, it does not frame text with <s> as add_bos_token says")
    if toks["tok_spjson"]("Hello").input_ids != sp("Hello").input_ids:
        fail("tok_spjson: tokenizer.json alone encodes otherwise than tokenizer.model")
    return toks


CONVERSATIONS = [
    ("single_turn", [
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant. How can I help you today?"},
    ]),
    ("system_multi_turn", [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "Tokyo is the capital of Japan."},
        {"role": "user", "content": "Thanks, bye."},
        {"role": "assistant", "content": "Goodbye!"},
    ]),
    ("non_ascii", [
        {"role": "user",
         "content": "Tradu\u00efs \u00ab caf\u00e9 cr\u00e8me \u00bb en japonais, s'il te pla\u00eet \U0001F64F"},
        {"role": "assistant",
         "content": "\u30ab\u30d5\u30a7\u30af\u30ea\u30fc\u30e0 (\u5496\u5561) \u2615\U0001F600 \u2014 "
                    "na\u00efve r\u00e9sum\u00e9"},
    ]),
    ("whitespace_edges", [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "\n\n  Indented answer.\n\tTabbed line.\n\n"},
        {"role": "user", "content": "\nnewline first"},
        {"role": "assistant", "content": " one space "},
    ]),
    ("empty_assistant", [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say something."},
        {"role": "assistant", "content": "Something."},
    ]),
    ("multiline_code", [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Print the numbers 1 to 3."},
        {"role": "assistant",
         "content": "```python\nfor i in range(1, 4):\n    print(i)\n```\nThat prints 1, 2 and 3."},
    ]),
    ("decomposed_accents", [
        # "e" + U+0301 COMBINING ACUTE ACCENT: qwen2's NFC normalizer composes it, offsets stay in the original
        {"role": "user", "content": "Cafe\u0301 or cafe\u0301?"},
        {"role": "assistant", "content": "Cafe\u0301, with the accent."},
    ]),
]

# Tool use, as OpenAI-style records carry it: the tools' JSON schemas beside the messages, assistant
# messages with tool_calls (content empty or absent), and tool messages with the results.
WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {
            "type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
CONVERSATIONS += [
    ("tool_use", [
        {"role": "user", "content": "Weather and time in Z\u00fcrich?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Z\u00fcrich", "unit": "celsius"}}},
                        {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Z\u00fcrich"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
        {"role": "assistant", "content": "It is 21.5 \u00b0C and clear in Z\u00fcrich, and 14:05."},
        {"role": "user", "content": "And Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": "{\"temp\": 18}"},
        {"role": "assistant", "content": "18 \u00b0C in Paris."},
    ]),
]
TOOLS_FOR = {"tool_use": WEATHER_TOOLS}

# Harmony conversations (tok_harmony): reasoning in "thinking", a developer message, a tool call on
# the commentary channel. Earlier turns render differently once later ones follow (their reasoning
# dropped, <|end|> for <|return|>), so the multi-turn case trains the last turn alone.
HARMONY_CONVERSATIONS = [
    ("harmony_thinking", [{"role": "developer", "content": "Answer in one line."}] + HARMONY_THINKING, None, "all"),
    ("harmony_tool_call", [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Z\u00fcrich for two days?"},
        {"role": "assistant", "content": "", "tool_calls": [HARMONY_CALL]},
        {"role": "tool", "content": "{\"temp_c\": [21.5, 19.0], \"sky\": \"clear\"}"},
        {"role": "assistant", "thinking": "Two temperatures, both clear.",
         "content": "21.5 \u00b0C today and 19 \u00b0C tomorrow, clear."},
    ], "harmony_tools", "all"),
    ("harmony_multi_turn", HARMONY_MULTI, None, "last"),
    # (with the one above: what train_turns "each" makes of HARMONY_MULTI, one example per turn)
    ("harmony_multi_turn_first", HARMONY_MULTI[:3], None, "last"),
]
HARMONY_VARS = {"date_string": "2025-08-05", "reasoning_effort": "low"}

TOKENIZERS_FOR = {
    "single_turn": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "system_multi_turn": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "non_ascii": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "whitespace_edges": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "empty_assistant": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "multiline_code": ("tok_llama3", "tok_qwen2", "tok_sp", "tok_spjson"),
    "decomposed_accents": ("tok_qwen2",),
    "tool_use": ("tok_qwen2",),
}


def flat_input_ids(result, where):
    if isinstance(result, transformers.BatchEncoding) or hasattr(result, "keys"):
        result = result["input_ids"]
    if isinstance(result, list) and result and isinstance(result[0], list):
        if len(result) != 1:
            fail(f"{where}: apply_chat_template returned {len(result)} sequences")
        result = result[0]
    if not isinstance(result, list) or not all(isinstance(i, int) for i in result):
        fail(f"{where}: cannot read input ids from {type(result).__name__}")
    return result


def tokenize_case(name, tok_name, tok, messages, tools=None, train_turns="all", template_vars=None):
    where = f"{name}/{tok_name}"
    kwargs = template_vars or {}
    rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    ids = flat_input_ids(tok.apply_chat_template(messages, tools=tools, tokenize=True, **kwargs), where)
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    if enc.input_ids != ids:
        fail(f"{where}: apply_chat_template ids differ from tok(rendered, add_special_tokens=False)")
    offsets = enc.get("offset_mapping")
    if offsets is None or len(offsets) != len(ids):
        fail(f"{where}: {type(tok).__name__} gave no offset mapping for the rendered text")

    # Every assistant turn i: from the end of render(messages[:i]) + generation prompt to the end of
    # render(messages[:i + 1]), where each is a prefix of the next. Where that fails, train_turns
    # "all" cannot label the conversation (all_fails), and "last" labels the final turn: from the end
    # of render(messages[:-1]) + generation prompt to the end.
    spans, all_fails = [], False
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        p = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        q = tok.apply_chat_template(messages[:i + 1], tools=tools, tokenize=False, add_generation_prompt=False,
                                    **kwargs)
        if not q.startswith(p) or not rendered.startswith(q):
            all_fails = True
        spans.append([len(p.encode("utf-8")), len(q.encode("utf-8"))])
    if train_turns == "last":
        if messages[-1]["role"] != "assistant":
            fail(f"{where}: train_turns last needs a conversation that ends with an assistant turn")
        p = tok.apply_chat_template(messages[:-1], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
        if not rendered.startswith(p):
            fail(f"{where}: the render before the last turn plus a generation prompt is not a prefix of the whole")
        spans = [[len(p.encode("utf-8")), len(rendered.encode("utf-8"))]]
    elif all_fails:
        fail(f"{where}: the turns' renders do not extend each other; this case needs train_turns last")

    byte_at = [0]  # byte offset of each character of rendered, and of its end
    for ch in rendered:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    labels = []
    for start, end in offsets:
        if not 0 <= start <= end <= len(rendered):
            fail(f"{where}: offset ({start}, {end}) outside the rendered text")
        b = byte_at[start]
        labels.append(1 if any(s <= b < e for s, e in spans) else 0)
    # libft tokenizes the text cut at the span boundaries (so that no token is half label), which is
    # what inference sees: the generation prompt is tokenized on its own. Where one of the whole
    # render's tokens straddles a boundary, the reference is therefore the pieces tokenized one by one
    # (byte-level BPE: a piece encodes the same wherever it starts).
    cuts = sorted({b for span in spans for b in span} | {0, byte_at[-1]})
    straddles = any(byte_at[start] < c < byte_at[end] for start, end in offsets for c in cuts)
    case = {"name": f"{name}_{tok_name[4:]}", "tokenizer": tok_name, "messages": messages, "rendered": rendered,
            "ids": ids, "spans": spans, "labels": labels, "straddles": straddles, "train_turns": train_turns,
            "all_fails": all_fails}
    if tools is not None:
        case["tools"] = tools
    if template_vars:
        case["template_vars"] = template_vars
    if tok_name not in ("tok_sp", "tok_spjson"):
        raw = rendered.encode("utf-8")
        piece_ids, piece_labels = [], []
        for lo, hi in zip(cuts, cuts[1:]):
            part = tok(raw[lo:hi].decode("utf-8"), add_special_tokens=False).input_ids
            piece_ids += part
            piece_labels += [1 if any(s <= lo < e for s, e in spans) else 0] * len(part)
        if not straddles and (piece_ids != ids or piece_labels != labels):
            fail(f"{where}: no token straddles a span boundary, yet the pieces tokenize differently")
        if straddles:
            case["piece_ids"], case["piece_labels"] = piece_ids, piece_labels
    elif straddles:
        fail(f"{where}: a sentencepiece token straddles a span boundary; this reference cannot cover it")
    return case


def main():
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR BPE_DIR SP_MODEL")
    out_dir, bpe_dir, sp_model = sys.argv[1:]
    os.makedirs(out_dir, exist_ok=True)

    render_cases = build_render_cases()
    toks = make_tokenizers(out_dir, bpe_dir, sp_model)
    tokenize_cases = []
    for name, messages in CONVERSATIONS:
        for tok_name in TOKENIZERS_FOR[name]:
            tokenize_cases.append(tokenize_case(name, tok_name, toks[tok_name], messages,
                                                TOOLS_FOR.get(name)))
    for name, messages, tools, train_turns in HARMONY_CONVERSATIONS:
        tokenize_cases.append(tokenize_case(name, "tok_harmony", toks["tok_harmony"], messages,
                                            HARMONY_TOOLS[:2] if tools else None, train_turns, HARMONY_VARS))
    if not any(c["all_fails"] for c in tokenize_cases):
        fail("no tokenize case has turns that do not extend each other")

    reference = {"render": render_cases, "tokenize": tokenize_cases}
    path = os.path.join(out_dir, "chat_reference.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        json.dump(reference, f, ensure_ascii=True, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    n_err = sum("error" in c for c in render_cases)
    n_lab = sum(sum(c["labels"]) for c in tokenize_cases)
    n_ids = sum(len(c["ids"]) for c in tokenize_cases)
    print(f"wrote {len(render_cases)} render cases ({len(render_cases) - n_err} renders, {n_err} errors) and "
          f"{len(tokenize_cases)} tokenize cases ({n_ids} tokens, {n_lab} labelled) to {path} "
          f"(transformers {transformers.__version__}, jinja2 {jinja2.__version__})")


if __name__ == "__main__":
    main()
