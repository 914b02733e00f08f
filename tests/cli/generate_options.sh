#!/usr/bin/env bash
# ft generate rejects sampling settings it would otherwise ignore or fail on late (tests/CMakeLists.txt:
# cli_generate_options): a token count or temperature that is not > 0, a top-p outside (0, 1], and
# --temperature, --top-p or --seed without --sample (greedy decoding uses none of them), --chat with
# another prompt, and --system without --chat. Each is refused before the model is loaded, with the
# option named; so is --chat without a tokenizer (once the model directory shows none). Valid settings
# generate.
#   tests/cli/generate_options.sh FT MODEL_CONFIG_JSON WORK_DIR
set -euo pipefail
ft=$1 config=$2 d=$3
rm -rf "$d" && mkdir -p "$d"
"$ft" init "$config" "$d/m" --seed 1 >/dev/null
fails() {  # fails PATTERN ARGS...: ft generate with ARGS exits non-zero, names the problem, generates nothing
  local pattern=$1
  shift
  if "$ft" generate "$d/m" --prompt-ids 1,2 "$@" >"$d/out" 2>"$d/err"; then echo "FAIL: succeeded: $*"; exit 1; fi
  grep -q -- "$pattern" "$d/err" || { echo "FAIL: '$*' did not say '$pattern':"; cat "$d/err"; exit 1; }
  ! grep -q "generated" "$d/out" || { echo "FAIL: '$*' generated"; exit 1; }
}
fails "max-new-tokens: must be > 0, got -5" -n -5
fails "max-new-tokens: must be > 0, got 0" -n 0
fails "temperature: must be > 0, got 0" --sample --temperature 0
fails "top-p: must be in (0, 1\], got 1.5" --sample --top-p 1.5
fails "top-p: must be in (0, 1\], got 0" --sample --top-p 0
fails "top-p: must be in (0, 1\], got x" --sample --top-p x
fails "top-p requires --sample" --top-p 0.5
fails "temperature requires --sample" --temperature 0.7
fails "seed requires --sample" --seed 3
fails "prompt-ids excludes --chat" --chat hi
# --chat needs a tokenizer, and one with a chat template.
if "$ft" generate "$d/m" --chat hi >"$d/out" 2>"$d/err"; then echo "FAIL: --chat without a tokenizer"; exit 1; fi
grep -q -- "--chat needs a tokenizer with a chat template" "$d/err" || { cat "$d/err"; exit 1; }
if "$ft" generate "$d/m" --system "Be brief." --prompt hi >"$d/out" 2>"$d/err"; then echo "FAIL: --system alone"; exit 1; fi
grep -q -- "--system requires --chat" "$d/err" || { cat "$d/err"; exit 1; }
# Valid settings, greedy and sampled: the sampled tokens follow the seed.
"$ft" generate "$d/m" --prompt-ids 1,2 -n 4 | grep -q "generated"
"$ft" generate "$d/m" --prompt-ids 1,2 -n 4 --sample --top-p 1 --temperature 0.7 --seed 5 | grep "^generated" >"$d/a"
"$ft" generate "$d/m" --prompt-ids 1,2 -n 4 --sample --top-p 1 --temperature 0.7 --seed 5 | grep "^generated" >"$d/b"
cmp "$d/a" "$d/b"
# generation_config.json's eos_token_id stops generation, as in transformers' generate(), in place of
# config.json's: with the first greedy token listed there, one token comes out.
first=$("$ft" generate "$d/m" --prompt-ids 1,2 -n 4 | sed -n 's/^generated: \([0-9]*\) .*/\1/p')
test -n "$first" || { echo "FAIL: no first token"; exit 1; }
printf '{"eos_token_id": [96, %s]}\n' "$first" >"$d/m/generation_config.json"
"$ft" generate "$d/m" --prompt-ids 1,2 -n 4 | grep -q "^1 tokens in" || { echo "FAIL: did not stop at $first"; exit 1; }
printf '{"eos_token_id": "x"}\n' >"$d/m/generation_config.json"
if "$ft" generate "$d/m" --prompt-ids 1,2 -n 4 >"$d/out" 2>"$d/err"; then echo "FAIL: bad generation_config.json"; exit 1; fi
grep -q "generation_config.json: eos_token_id must be a token id" "$d/err" || { cat "$d/err"; exit 1; }
echo "generate options OK"
