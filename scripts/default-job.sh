#!/usr/bin/env bash
# The bundled default job: build a small Llama from configs/models/tiny-llama.json, save it as a
# Hugging Face checkpoint, inspect it, and sample from it (greedy and top-p).
#   scripts/default-job.sh FT_BINARY OUT_DIR
set -euo pipefail
ft=$1 out=$2
cfg="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/models/tiny-llama.json"
"$ft" init "$cfg" "$out" --seed 0
"$ft" inspect "$out"
"$ft" generate "$out" --prompt-ids 1,42,7 -n 16 --device cpu
"$ft" generate "$out" --prompt-ids 1,42,7 -n 16 --device cpu --sample --top-p 0.9 --temperature 0.8 --seed 1
echo "default job OK: checkpoint in $out"
