# Sourced by the chat end-to-end scripts (qwen3_bpe.sh, family_chat.sh), which set ft (the ft binary)
# and d (their work directory, with the tokenizer in $d/m and the prepared data in $d/chat.h5).
# chat_run NAME MODE CHECKPOINT STEPS LR [extra YAML]: trains $d/NAME from CHECKPOINT on that data,
# prints the first and the last step's loss.
chat_run() {
  cat >"$d/$1.yaml" <<EOF
model:
  checkpoint: $3
tokenizer: $d/m
data:
  train: [$d/chat.h5]
  seq_len: ${SEQ_LEN:-64}
  batch_size: 8
optimizer:
  name: adamw
  lr: $5
max_steps: $4
mode: $2
${6:-}
output_dir: $d/$1
EOF
  "$ft" train "$d/$1.yaml" >"$d/$1.log" 2>&1 || { tail -20 "$d/$1.log" >&2; exit 1; }
  local losses
  losses=$(grep -o '"loss":[0-9.e+-]*' "$d/$1/metrics.jsonl" | cut -d: -f2)
  echo "$(echo "$losses" | head -1) $(echo "$losses" | tail -1)"
}

# chat_fine_tune: full fine-tuning of $d/m until the model answers (a random model: the loss must
# fall below 5% of its start), then a short LoRA run on the result, whose loss must end below 0.5.
# Sets first, last (full) and lfirst, llast (LoRA).
chat_fine_tune() {
  read -r first last < <(chat_run full full "$d/m" 150 3.0e-3)
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.05 * a) }' ||
    { echo "FAIL: full fine-tuning loss $first -> $last"; exit 1; }
  read -r lfirst llast < <(chat_run lora lora "$d/full/final" 20 1.0e-3 $'lora:\n  r: 8\n  alpha: 16\n  targets: [all-linear]')
  awk -v b="$llast" 'BEGIN { exit !(b < 0.5) }' || { echo "FAIL: LoRA loss $lfirst -> $llast"; exit 1; }
  test -f "$d/lora/final/adapter_model.safetensors" || { echo "FAIL: no adapter"; exit 1; }
}
