#!/usr/bin/env bash
# The bundled forgetting benchmark: pretrain the tiny Llama on the fortunes (general English) for
# 300 steps (configs/train-tiny.yaml, holding out 200 fortunes), then `ft bench
# configs/bench-forgetting.yaml`: adapt it to the Jargon File in every mode, with and without EWC and
# replay, and report target gain against forgetting (runs/bench-forgetting/report.md, report.html).
#   scripts/bench-forgetting.sh [FT] [DEFAULT_JOB_DIR]
# Needs the default job's tokenizer and stores (scripts/run-default.sh); the general model and the
# bench's outputs go beside them (DEFAULT_JOB_DIR/general, DEFAULT_JOB_DIR/bench-forgetting).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ft=$(realpath "${1:-$root/build/apps/ft}")
data=$(realpath -m "${2:-$root/runs/default}")
cd "$root"  # the bench config names its run configs relative to the repository
[ -f "$data/jargon.h5" ] || { echo "no $data/jargon.h5: run scripts/run-default.sh first"; exit 1; }
if [ ! -f "$data/general/final/config.json" ]; then
  "$ft" train "$root/configs/train-tiny.yaml" model.config="$root/configs/models/tiny-llama.json" \
    tokenizer="$data/tokenizer" data.train="[$data/fortunes.h5]" output_dir="$data/general" 2>&1 | grep -v '^train '
fi
"$ft" bench "$root/configs/bench-forgetting.yaml" "vars={data: $data}" 2>&1 | grep -v '^train '
