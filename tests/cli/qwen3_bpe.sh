#!/usr/bin/env bash
# A Qwen3 checkpoint with a tokenizer.json (byte-level BPE, no tokenizer.model), end to end through
# the command line (tests/CMakeLists.txt: cli_qwen3_bpe): ft init makes the model, the tokenizer
# files sit beside it as in a Hub checkpoint, ft prepare finds the tokenizer in the model directory and
# writes chatml conversations (with libft's chatml and with the checkpoint's own Jinja template), full fine-tuning learns them, a LoRA run on top exports an adapter
# that ft merge folds back, and ft generate answers in text (a raw prompt, and --chat through the chat template) through the tokenizer that the fine-tuned
# and merged checkpoints carry.
#   tests/cli/qwen3_bpe.sh FT BPE_TOKENIZER_DIR WORK_DIR
set -euo pipefail
ft=$1 tok=$2 d=$3
rm -rf "$d" && mkdir -p "$d"
# vocab 3008 >= the tokenizer's 3005; eos 3002 is <|im_end|> in the Qwen2-layout tokenizer.
cat >"$d/config.json" <<'EOF'
{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 3008, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "head_dim": 24, "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "attention_bias": false,
 "rope_theta": 1000000.0, "max_position_embeddings": 512, "eos_token_id": 3002, "bos_token_id": null}
EOF
"$ft" init "$d/config.json" "$d/m" --seed 3 >/dev/null
cp "$tok/tokenizer.json" "$tok/tokenizer_config.json" "$d/m/"
# Conversations: the same three questions and answers, 40 times over.
for i in $(seq 40); do
  echo '{"messages": [{"role": "user", "content": "What is a hacker?"}, {"role": "assistant", "content": "A person who enjoys exploring the details of programmable systems."}]}'
  echo '{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who wrote the Jargon File?"}, {"role": "assistant", "content": "Many hands, over decades."}]}'
  echo '{"messages": [{"role": "user", "content": "Ünïcode, 日本語?"}, {"role": "assistant", "content": "Yes — both."}]}'
done >"$d/chat.jsonl"
"$ft" prepare "$d/chat.jsonl" -o "$d/chat.h5" -t "$d/m" --format chat --template chatml >"$d/prepare.log" 2>&1 ||
  { cat "$d/prepare.log"; exit 1; }
grep -q "120 examples" "$d/prepare.log" || { echo "FAIL: prepare"; cat "$d/prepare.log"; exit 1; }
# The checkpoint's own template (ChatML, as Qwen's, in chat_template.jinja) gives the same tokens; its
# labels also take the newline after each <|im_end|>, which the template writes as part of the turn.
cat >"$d/m/chat_template.jinja" <<'EOF'
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
EOF
"$ft" prepare "$d/chat.jsonl" -o "$d/chat_model.h5" -t "$d/m" --format chat --template model >"$d/prepare_model.log" 2>&1 ||
  { cat "$d/prepare_model.log"; exit 1; }
grep -q "120 examples (4560 tokens, 1480 labels)" "$d/prepare_model.log" ||
  { echo "FAIL: prepare with the model's template"; cat "$d/prepare.log" "$d/prepare_model.log"; exit 1; }
# A template file of one's own, with {% generation %} around content and <|im_end|> only: the labels
# are then exactly libft's chatml ones.
cat >"$d/labelled.jinja" <<'EOF'
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
EOF
"$ft" prepare "$d/chat.jsonl" -o "$d/chat_file.h5" -t "$d/m" --format chat --template "$d/labelled.jinja" \
  >"$d/prepare_file.log" 2>&1 || { cat "$d/prepare_file.log"; exit 1; }
grep -q "120 examples (4560 tokens, 1360 labels)" "$d/prepare_file.log" ||
  { echo "FAIL: prepare with a template file"; cat "$d/prepare_file.log"; exit 1; }
# Full fine-tuning until the model answers (a random model: the loss must fall far), then a short
# LoRA run on the result, merged back.
# shellcheck source=chat_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/chat_run.sh"
chat_fine_tune
"$ft" merge "$d/full/final" "$d/lora/final" -o "$d/merged" >/dev/null
# The fine-tuned and the merged model carry the base's tokenizer files, byte for byte.
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
  cmp "$d/m/$f" "$d/full/final/$f" && cmp "$d/m/$f" "$d/merged/$f" || { echo "FAIL: $f not copied"; exit 1; }
done
out=$("$ft" generate "$d/merged" --prompt $'<|im_start|>user\nWhat is a hacker?<|im_end|>\n<|im_start|>assistant\n' -n 12)
echo "$out" | grep -q "A person who enjoys" || { echo "FAIL: generate did not answer:"; echo "$out"; exit 1; }
# The same question through the merged checkpoint's own chat template; the answer stops at <|im_end|>.
for args in "" "--chat-template $d/labelled.jinja"; do
  # shellcheck disable=SC2086
  out=$("$ft" generate "$d/merged" --chat "What is a hacker?" -n 40 $args)
  echo "$out" | grep -q "^answer: A person who enjoys exploring the details of programmable systems.$" ||
    { echo "FAIL: generate --chat $args did not answer:"; echo "$out"; exit 1; }
done
echo "qwen3 bpe OK: full fine-tuning loss $first -> $last, LoRA $lfirst -> $llast"
