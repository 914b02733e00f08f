#!/usr/bin/env bash
# The bundled default job, on real text that Debian ships (the fortunes package):
#   1. train a sentencepiece tokenizer on the fortune files,
#   2. tokenize them once into an HDF5 token store (ft prepare, skipping the few empty records),
#   3. build a small Llama from configs/models/tiny-llama.json and save it as a Hugging Face checkpoint,
#   4. inspect it and sample from it (greedy and top-p).
# Until the trainer lands the weights are random, so the samples are noise.
#   scripts/default-job.sh FT_BINARY OUT_DIR
set -euo pipefail
ft=$1 out=$2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fortunes=/usr/share/games/fortunes
mapfile -t texts < <(find "$fortunes" -maxdepth 1 -type f ! -name '*.*' | sort)
[ ${#texts[@]} -gt 0 ] || { echo "no fortune files in $fortunes (run scripts/setup.sh)"; exit 1; }
mkdir -p "$out"
"$ft" train-tokenizer "${texts[@]}" -o "$out/tokenizer" --vocab-size 4096 --seed 0
"$ft" prepare "${texts[@]}" -o "$out/fortunes.h5" -t "$out/tokenizer" --format text --split separator \
  --on-error skip --max-bad-fraction 0.01
"$ft" init "$root/configs/models/tiny-llama.json" "$out/model" --seed 0
"$ft" inspect "$out/model"
"$ft" generate "$out/model" -p "The meaning of life is" -t "$out/tokenizer" -n 16 --device cpu
"$ft" generate "$out/model" -p "The meaning of life is" -t "$out/tokenizer" -n 16 --device cpu \
  --sample --top-p 0.9 --temperature 0.8 --seed 1
echo "default job OK: tokenizer, token store and checkpoint in $out"
