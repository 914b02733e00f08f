#!/usr/bin/env bash
# Adaptation modes side by side: full, freeze, lora, qlora and prefix fine-tuning of the same model on
# the same data and budget, one process per mode, back to back. For each: trainable parameters,
# weights + gradients + optimizer state (the trainer's memory line), peak resident memory during
# training (VmHWM reset when training starts, so loading does not count), median step time and
# tokens/s over the steps after the first, and the checkpoint size. Two models: the bundled one (the
# default job's pretrained tiny Llama) and a wider one of random weights (configs/models/wide-llama.json,
# 1024 wide, 50.8M parameters), which shows how the modes scale with width.
#   benchmarks/modes.sh FT PYTHON DEFAULT_JOB_DIR WORK_DIR [STEPS [MODELS]]
# MODELS: "bundled wide" (default), or one of them. Prints a Markdown table per model.
# (DEFAULT_JOB_DIR: the default job's outputs, e.g. runs/default after scripts/run-default.sh)
set -euo pipefail
ft=$1 python=$2 data=$3 work=$4 steps=${5:-6} models=${6:-bundled wide}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rm -rf "$work" && mkdir -p "$work"
for model in $models; do
  case $model in
    bundled) model_dir=$data/train/final ;;
    wide) model_dir=$work/wide-model; "$ft" init "$root/configs/models/wide-llama.json" "$model_dir" --seed 0 >/dev/null ;;
    *) echo "modes.sh: unknown model '$model' (bundled, wide)" >&2; exit 2 ;;
  esac
  for mode in full freeze lora qlora prefix; do
    config=$mode-jargon; [ "$mode" = full ] && config=continue-jargon
    out=$work/$model-$mode
    "$ft" train "$root/configs/$config.yaml" "model.checkpoint=$model_dir" "tokenizer=$data/tokenizer" \
      "data.train=$data/jargon.h5" "eval.stores=$data/fortunes.h5" "output_dir=$out" "max_steps=$steps" schedule.warmup_steps=1 eval.every=0 \
      eval.at_start=false checkpoint.every=$steps log_every=1 > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
  done
  "$python" - "$work" "$model" <<'PY'
import json, os, re, statistics, sys
work, model = sys.argv[1:3]
print(f"\n{model} model:\n")
print("| mode | trainable | weights + grads + optimizer state | resident at the first step | peak in training (added) | step time | tokens/s | checkpoint |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for mode in ("full", "freeze", "lora", "qlora", "prefix"):
    out = os.path.join(work, f"{model}-{mode}")
    log = open(out + ".log", encoding="utf-8").read()
    trainable = re.search(r"mode \w+: ([\d,]+) trainable parameters in \d+ tensors \(([\d.]+)%\)", log)
    memory = re.search(r"memory: weights ([\d.]+) MiB.*?, gradients ([\d.]+) MiB, optimizer state ([\d.]+) MiB", log)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    train = [r for r in rows if r["type"] == "train"]
    later = train[1:] or train
    step = statistics.median(r["step_time_s"] for r in later)
    tps = statistics.median(r["tokens_per_s"] for r in later)
    peak = max(r["peak_rss_mib"] for r in train)
    ckpt_dirs = sorted(os.listdir(os.path.join(out, "checkpoints")))
    ckpt = sum(os.path.getsize(os.path.join(out, "checkpoints", ckpt_dirs[-1], f))
               for f in os.listdir(os.path.join(out, "checkpoints", ckpt_dirs[-1])))
    w, g, o = (float(x) for x in memory.groups())
    start = float(re.search(r"resident memory at the first step: (\d+) MiB", log).group(1))
    print(f"| {mode} | {trainable.group(1)} ({float(trainable.group(2)):.2f}%) | {w:.1f} + {g:.1f} + {o:.1f} MiB "
          f"| {start:.0f} MiB | {peak:.0f} MiB (+{peak - start:.0f}) | {step * 1000:.0f} ms | {tps:.0f} | {ckpt / 1e6:.1f} MB |")
PY
done
