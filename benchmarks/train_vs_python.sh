#!/usr/bin/env bash
# libft's training loop vs an independent PyTorch + transformers loop, on the same CPU in one run:
# the same initial weights (ft init), the same micro-batches (ft batches), the same hyper-parameters
# (configs/train-tiny.yaml: AdamW, warmup + cosine, clipping, 2 micro-batches of 4 × 128 tokens per
# step). Prints every step's two losses (they must agree within 1e-3 relative) and both loops'
# training tokens/s and their ratio (tests/python/train_reference.py).
#   benchmarks/train_vs_python.sh FT PYTHON DEFAULT_JOB_DIR WORK_DIR [STEPS [MODEL_CONFIG_JSON]]
# With MODE=lora in the environment both loops train LoRA adapters (libft's lora mode against PEFT)
# from the same initial adapter, which PEFT writes; with MODE=prefix both train a prefix (8 virtual
# tokens) from the same PEFT-made initial prefix. With MODE=lora LORA_DROPOUT=0.05 both loops use that
# dropout (libft's fused path and PEFT's chain draw different masks): only the speed is compared.
# With MODE=lora LORA_BIAS=all or lora_only, the initial adapter says PEFT's bias option: the base's
# biases (all of them, or the adapted layers') train in both loops too; LORA_EXPERTS=1 adds PEFT's
# target_parameters on a mixture of experts' mlp.experts.gate_up_proj and down_proj.
# REPEATS=N runs N pairs and prints the median ratio.
# EXTRA_ARGS="key=value ..." adds run-config overrides (e.g. model.router_aux_loss_coef=0.1, which the
# reference reads back from the run's config.yaml).
# (DEFAULT_JOB_DIR: the default job's outputs, e.g. runs/default after scripts/run-default.sh)
set -euo pipefail
ft=$1 python=$2 data=$3 work=$4 steps=${5:-20}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model_config=${6:-$root/configs/models/tiny-llama.json}
rm -rf "$work" && mkdir -p "$work"
"$ft" init "$model_config" "$work/model" --seed 0 >/dev/null
args=("$root/configs/train-tiny.yaml" "model.checkpoint=$work/model" model.config=null model.init_seed=null
      "tokenizer=$data/tokenizer" "data.train=$data/fortunes.h5" "output_dir=$work/run" "max_steps=$steps"
      schedule.warmup_steps=4 data.batch_size=4 data.grad_accum=2 eval.every=0 checkpoint.every=0)
read -ra extra <<< "${EXTRA_ARGS:-}"
args+=("${extra[@]}")
if [ "${MODE:-full}" = lora ]; then
  "$python" "$root/tests/python/train_reference.py" --make-adapter "$work/adapter0" "$work/model" 2>&1 | grep -v '^Loading weights'
  args+=(mode=lora "lora.init_from=$work/adapter0" optimizer.weight_decay=0.0 "lora.dropout=${LORA_DROPOUT:-0}")
elif [ "${MODE:-full}" = prefix ]; then
  "$python" "$root/tests/python/train_reference.py" --make-prefix "$work/adapter0" "$work/model" 2>&1 | grep -v '^Loading weights'
  args+=(mode=prefix "prefix.init_from=$work/adapter0" optimizer.weight_decay=0.0 optimizer.lr=1e-2)
fi
"$ft" batches "${args[@]}" --steps "$steps" -o "$work/batches.safetensors"
"$ft" train "${args[@]}" 2>&1 | grep -v '^train '
speed=()
if [ "${LORA_DROPOUT:-0}" != 0 ]; then speed=(--speed-only); fi
"$python" "$root/tests/python/train_reference.py" "$work/run" "$work/model" "$work/batches.safetensors" \
  --json "$work/result.json" "${speed[@]}" 2>&1 | grep -v '^Loading weights'
# REPEATS=N (N > 1): N - 1 more pairs of runs, alternating libft and the reference, then every pair's
# ratio and their median (on a shared 2-core VM one pair's ratio moves by ±5% from run to run).
repeats=${REPEATS:-1}
for ((i = 2; i <= repeats; ++i)); do
  "$ft" train "${args[@]}" "output_dir=$work/run$i" >/dev/null 2>&1
  "$python" "$root/tests/python/train_reference.py" "$work/run$i" "$work/model" "$work/batches.safetensors" \
    --json "$work/result$i.json" --speed-only 2>&1 | grep '^tokens/s'
done
if [ "$repeats" -gt 1 ]; then
  "$python" - "$work" "$repeats" <<'PY'
import json, statistics, sys
work, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{work}/result{'' if i == 1 else i}.json")) for i in range(1, n + 1)]
ratios = [r["libft_tokens_per_s"] / r["reference_tokens_per_s"] for r in runs]
print(f"{n} pairs: libft {statistics.median(r['libft_tokens_per_s'] for r in runs):.0f} tokens/s, reference "
      f"{statistics.median(r['reference_tokens_per_s'] for r in runs):.0f} (medians); ratios "
      + " ".join(f"{x:.2f}" for x in ratios) + f"; median ratio {statistics.median(ratios):.2f}x")
PY
fi
