#!/usr/bin/env bash
# A Gemma 3, Gemma 2, Phi-3, Mixtral or gpt-oss checkpoint from the command line (tests/CMakeLists.txt:
# cli_gemma3_chat, cli_gemma2_chat, cli_phi3_chat, cli_mixtral_chat, cli_gpt_oss_chat), as a user brings one from the Hub:
# config.json in transformers 4.x's layout (Gemma 3: rope_local_base_freq, sliding_window_pattern;
# Gemma 2: both soft-caps, hidden_act beside hidden_activation, alternating windows by default; Phi-3:
# Phi-4-mini's longrope "su"-style rope_scaling, here with an original context of 24 tokens that
# conversations and generation cross, a partial rotary embedding and a window; Mixtral: four experts,
# two per token), a sentencepiece-style tokenizer.json with the family's turn markers added as special
# tokens (Gemma: <start_of_turn>/<end_of_turn>; Phi-3: <|system|>/<|user|>/<|assistant|>/<|end|>;
# Mixtral: [INST]/[/INST]), and a chat template of the family's kind whose turns end at a marker that
# the config lists as an EOS (as Gemma 3's [1, 106]; Mixtral's answers end at </s>). For Mixtral the
# QLoRA run stores the experts in NF4 and keeps the routers. gpt-oss: Harmony's markers, a template of
# its kind (reasoning on the analysis channel, earlier turns rendered differently from the last, so
# prepare refuses to label every turn and trains the last with --train-turns last), a
# generation_config.json that stops at <|call|> beside config.json's <|return|>. ft prepare renders
# conversations with that template, full fine-tuning learns them, a LoRA run on top exports an
# adapter that ft merge folds back (a QLoRA run keeps what was learned too), and ft generate --chat
# answers and stops at the end-of-turn marker.
#   tests/cli/family_chat.sh FT PYTHON SENTENCEPIECE_TOKENIZER_DIR WORK_DIR [gemma3|gemma2|phi3|mixtral|gpt_oss]
set -euo pipefail
ft=$1 python=$2 tok=$3 d=$4 family=${5:-gemma3}
rm -rf "$d" && mkdir -p "$d/m"
# The tokenizer with the family's turn markers added as special tokens (as its own file lists them).
markers="<start_of_turn> <end_of_turn>"
end_marker="<end_of_turn>"
if [ "$family" = phi3 ]; then
  markers="<|system|> <|user|> <|assistant|> <|end|>"
  end_marker="<|end|>"
elif [ "$family" = mixtral ]; then
  markers="[INST] [/INST]"
  end_marker="</s>"
elif [ "$family" = gpt_oss ]; then
  markers="<|start|> <|message|> <|channel|> <|end|> <|return|> <|call|>"
  end_marker="<|return|>"
fi
read -r vocab end_id < <("$python" - "$tok" "$d/m" "$end_marker" $markers <<'PY'
import sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1])
t.add_special_tokens({"additional_special_tokens": sys.argv[4:]})
t.save_pretrained(sys.argv[2])
print(len(t), t.convert_tokens_to_ids(sys.argv[3]))
PY
)
# One global layer after a local one (pattern 2), the local window shorter than a conversation.
if [ "$family" = phi3 ]; then
  # (longrope's factors for the 24 of 32 dimensions that turn; Phi-4-mini's keys, 4.x's layout)
  cat >"$d/config.json" <<EOF
{"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": $vocab, "hidden_size": 128,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
 "rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1.1, 1.2, 1.4, 1.7, 2, 2.5, 3, 3.5, 4, 5],
                  "long_factor": [1, 1.2, 1.5, 2, 3, 4, 6, 8, 11, 15, 20, 26]},
 "max_position_embeddings": 512, "original_max_position_embeddings": 24, "sliding_window": 20,
 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": false,
 "bos_token_id": 1, "eos_token_id": [2, $end_id], "pad_token_id": 0, "torch_dtype": "float32"}
EOF
  shows=("q/k/v packed in qkv_proj" "gate/up packed in gate_up_proj" "long factors past 24 positions"
         "turning 24 of 32 dims" "sliding window 20 in 2 of 2 layers")
elif [ "$family" = mixtral ]; then
  cat >"$d/config.json" <<EOF
{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": $vocab, "hidden_size": 64,
 "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
 "rope_theta": 1000000.0, "sliding_window": null, "max_position_embeddings": 512, "output_router_logits": false,
 "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": false,
 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": null, "torch_dtype": "float32"}
EOF
  shows=("experts        4 of 96 units, 2 per token (weights renormalised), in 2 of 2 layers")
elif [ "$family" = gpt_oss ]; then
  # (gpt-oss-20b's layout, shrunk: a sliding layer shorter than a conversation, then a global one;
  # its config.json stops at <|return|>, its generation_config.json at <|call|> too.)
  call_id=$("$python" -c 'import sys; from transformers import AutoTokenizer; print(AutoTokenizer.from_pretrained(sys.argv[1]).convert_tokens_to_ids("<|call|>"))' "$d/m")
  cat >"$d/config.json" <<EOF
{"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": $vocab, "hidden_size": 64,
 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "head_dim": 16, "num_local_experts": 4, "experts_per_token": 2, "swiglu_limit": 7.0, "sliding_window": 16,
 "layer_types": ["sliding_attention", "full_attention"], "hidden_act": "silu", "max_position_embeddings": 1024,
 "rms_norm_eps": 1e-05, "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 256},
 "attention_bias": true, "attention_dropout": 0.0, "initial_context_length": 256, "output_router_logits": false,
 "router_aux_loss_coef": 0.9, "tie_word_embeddings": false, "eos_token_id": $end_id, "pad_token_id": 0,
 "torch_dtype": "float32"}
EOF
  printf '{"eos_token_id": [%s, %s], "pad_token_id": 0}\n' "$end_id" "$call_id" >"$d/generation_config.json"
  shows=("experts        4 of 64 units, 2 per token" "sliding window 16 in 1 of 2 layers")
elif [ "$family" = gemma2 ]; then
  # (Gemma 2's own caps, 50 and 30: the trained model's scores and logits grow into them.)
  cat >"$d/config.json" <<EOF
{"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": $vocab, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
 "head_dim": 32, "query_pre_attn_scalar": 32, "hidden_act": "gelu_pytorch_tanh",
 "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 16,
 "max_position_embeddings": 512, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
 "cache_implementation": "hybrid", "bos_token_id": 1, "eos_token_id": [2, $end_id], "pad_token_id": 0,
 "torch_dtype": "float32"}
EOF
  shows=("sliding window 16 in 1 of 2 layers" "scores soft-capped at 50" "logits soft-capped at 30" "GeGLU")
else
  cat >"$d/config.json" <<EOF
{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": $vocab, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
 "head_dim": 32, "query_pre_attn_scalar": 32, "hidden_activation": "gelu_pytorch_tanh",
 "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": null,
 "sliding_window": 16, "sliding_window_pattern": 2, "max_position_embeddings": 512,
 "attn_logit_softcapping": null, "final_logit_softcapping": null, "cache_implementation": "hybrid",
 "bos_token_id": 1, "eos_token_id": [2, $end_id], "pad_token_id": 0, "torch_dtype": "float32"}
EOF
  shows=("sliding window 16 in 1 of 2 layers (their rope default, theta 10000)" "GeGLU")
fi
"$ft" init "$d/config.json" "$d/init" --seed 5 >/dev/null
cp "$d/init/"* "$d/m/"
if [ -f "$d/generation_config.json" ]; then cp "$d/generation_config.json" "$d/m/"; fi
"$ft" inspect "$d/m" >"$d/inspect.txt"
for want in "${shows[@]}"; do
  grep -qF "$want" "$d/inspect.txt" || { echo "FAIL: inspect does not show '$want'"; cat "$d/inspect.txt"; exit 1; }
done
if [ "$family" = phi3 ]; then
  # Phi-3's kind: every turn "<|role|>\n" + content + "<|end|>\n"; the generation prompt opens the
  # assistant's turn.
  cat >"$d/m/chat_template.jinja" <<'EOF'
{%- for message in messages -%}
    {{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|assistant|>\n' }}
{%- else -%}
    {{ eos_token }}
{%- endif -%}
EOF
elif [ "$family" = gpt_oss ]; then
  # Harmony's kind: the system block, instructions as a developer message, the answer on the final
  # channel after its reasoning on the analysis channel. Only the last turn keeps its reasoning and
  # ends with <|return|>; earlier ones end with <|end|>, so its turns do not extend each other and
  # prepare trains each conversation's last turn (--train-turns last).
  cat >"$d/m/chat_template.jinja" <<'EOF'
{{- "<|start|>system<|message|>Reasoning: " + (reasoning_effort | default("low")) + "<|end|>" -}}
{%- if messages[0].role in ["system", "developer"] -%}
    {{- "<|start|>developer<|message|>" + messages[0].content + "<|end|>" -}}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
    {%- if m.role == "user" -%}
        {{- "<|start|>user<|message|>" + m.content + "<|end|>" -}}
    {%- elif loop.last and not add_generation_prompt -%}
        {%- if m.thinking is defined -%}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + m.thinking + "<|end|>" -}}
        {%- endif -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + m.content + "<|return|>" -}}
    {%- else -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + m.content + "<|end|>" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
EOF
elif [ "$family" = mixtral ]; then
  # Mistral's kind: "[INST] " + the user's words (the system's before the first) + " [/INST]", the
  # answer, then </s>; nothing opens the answer. (No space before the answer: this tokenizer, Gemma's
  # layout, would keep it in the decoded text.)
  cat >"$d/m/chat_template.jinja" <<'EOF'
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{ bos_token }}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else -%}
        {{ message['content'] + eos_token }}
    {%- endif -%}
{%- endfor -%}
EOF
else
cat >"$d/m/chat_template.jinja" <<'EOF'
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
EOF
fi
prepare_args=()
if [ "$family" = gpt_oss ]; then
  # Reasoning in "thinking"; the second conversation has two turns, of which the last is trained.
  for i in $(seq 40); do
    echo '{"messages": [{"role": "user", "content": "What is a hacker?"}, {"role": "assistant", "thinking": "Define it.", "content": "A person who enjoys exploring the details of programmable systems."}]}'
    echo '{"messages": [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who wrote the Jargon File?"}, {"role": "assistant", "content": "Many hands, over decades."}]}'
  done >"$d/chat.jsonl"
  # Labelling every turn is refused, with the advice.
  if "$ft" prepare "$d/chat.jsonl" -o "$d/chat.h5" -t "$d/m" --format chat --template model >"$d/prepare.log" 2>&1; then
    echo "FAIL: prepare labelled turns that do not extend each other"; exit 1
  fi
  grep -q -- "--train-turns last" "$d/prepare.log" || { cat "$d/prepare.log"; exit 1; }
  # One example per assistant turn: 40 one-turn and 40 two-turn conversations make 120.
  "$ft" prepare "$d/chat.jsonl" -o "$d/each.h5" -t "$d/m" --format chat --template model --train-turns each \
    >"$d/prepare-each.log" 2>&1 || { cat "$d/prepare-each.log"; exit 1; }
  grep -q "80 records from 1 file: 120 examples" "$d/prepare-each.log" || { cat "$d/prepare-each.log"; exit 1; }
  prepare_args=(--train-turns last)
  export SEQ_LEN=128
else
  for i in $(seq 40); do
    echo '{"messages": [{"role": "user", "content": "What is a hacker?"}, {"role": "assistant", "content": "A person who enjoys exploring the details of programmable systems."}]}'
    echo '{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who wrote the Jargon File?"}, {"role": "assistant", "content": "Many hands, over decades."}]}'
  done >"$d/chat.jsonl"
fi
"$ft" prepare "$d/chat.jsonl" -o "$d/chat.h5" -t "$d/m" --format chat --template model "${prepare_args[@]}" \
  >"$d/prepare.log" 2>&1 || { cat "$d/prepare.log"; exit 1; }
grep -q "80 examples" "$d/prepare.log" || { echo "FAIL: prepare"; cat "$d/prepare.log"; exit 1; }
# shellcheck source=chat_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/chat_run.sh"
chat_fine_tune
# QLoRA on the same base (its linear layers in NF4) keeps what the full run learned.
read -r qfirst qlast < <(chat_run qlora qlora "$d/full/final" 10 1.0e-3 $'lora:\n  r: 8\n  alpha: 16\n  targets: [all-linear]')
awk -v b="$qlast" 'BEGIN { exit !(b < 0.5) }' || { echo "FAIL: QLoRA loss $qfirst -> $qlast"; exit 1; }
"$ft" merge "$d/full/final" "$d/lora/final" -o "$d/merged" >/dev/null
answer1="A person who enjoys exploring the details of programmable systems." n=40
if [ "$family" = gpt_oss ]; then
  # (the analysis channel, then the final one; the answer shows special tokens as their pieces)
  answer1="<|channel|>analysis<|message|>Define it.<|end|><|start|>assistant<|channel|>final<|message|>$answer1" n=60
fi
out=$("$ft" generate "$d/merged" --chat "What is a hacker?" -n $n)
echo "$out" | grep -qxF "answer: $answer1" ||
  { echo "FAIL: generate --chat did not answer:"; echo "$out"; exit 1; }
answer2="Many hands, over decades."
if [ "$family" = gpt_oss ]; then answer2="<|channel|>final<|message|>$answer2"; fi
out=$("$ft" generate "$d/merged" --chat "Who wrote the Jargon File?" --system "Answer briefly." -n $n)
echo "$out" | grep -qxF "answer: $answer2" ||
  { echo "FAIL: generate --chat --system did not answer:"; echo "$out"; exit 1; }
echo "$family chat OK: full fine-tuning loss $first -> $last, LoRA $lfirst -> $llast, QLoRA $qfirst -> $qlast"
