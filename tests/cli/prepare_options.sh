#!/usr/bin/env bash
# ft prepare and ft fisher refuse an option that applies only with another one they were not given
# (tests/CMakeLists.txt: cli_prepare_options): each was silently ignored before; ft eval refuses two
# sets of one name. Uses the default job's tokenizer, store and model (the fortunes_store fixture).
#   tests/cli/prepare_options.sh FT DEFAULT_JOB_DIR WORK_DIR
set -euo pipefail
ft=$1 data=$2 d=$3
rm -rf "$d" && mkdir -p "$d"
printf 'one document\n\nanother one\n' >"$d/a.txt"
printf '{"text": "one document"}\n' >"$d/a.jsonl"
fails() {  # fails PATTERN COMMAND...: the command exits non-zero, names the problem, writes no store
  local pattern=$1
  shift
  if "$@" >"$d/out" 2>"$d/err"; then echo "FAIL: succeeded: $*"; exit 1; fi
  grep -q -- "$pattern" "$d/err" || { echo "FAIL: '$*' did not say '$pattern':"; cat "$d/err"; exit 1; }
  test ! -e "$d/s.h5" || { echo "FAIL: '$*' wrote a store"; exit 1; }
}
prep=("$ft" prepare -o "$d/s.h5" -t "$data/tokenizer")
fails "--split and --separator apply to --format text only, not to --format jsonl" "${prep[@]}" "$d/a.jsonl" --format jsonl --split blank_lines
fails "--separator applies with --split separator only" "${prep[@]}" "$d/a.txt" --separator '%%'
fails "--template applies to --format chat or instruction only, not to --format text" "${prep[@]}" "$d/a.txt" --template chatml
fails "--too-long applies with --max-tokens N" "${prep[@]}" "$d/a.txt" --too-long truncate
printf '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' >"$d/c.jsonl"
fails "template-var requires --template" "${prep[@]}" "$d/c.jsonl" --format chat --template-var x=1
fails "template variables apply to the 'model' chat template only" "${prep[@]}" "$d/c.jsonl" --format chat --template chatml --template-var x=1
fails "the tokenizer has none" "${prep[@]}" "$d/c.jsonl" --format chat --template model
fails "--train-turns applies to --format chat only, not to --format jsonl" "${prep[@]}" "$d/a.jsonl" --format jsonl --train-turns last
fails "train_turns 'first' is not all, last or each" "${prep[@]}" "$d/c.jsonl" --format chat --template chatml --train-turns first
fails "--max-bad-fraction applies with --on-error skip only" "${prep[@]}" "$d/a.txt" --max-bad-fraction 0.1
fails "gamma requires --previous" "$ft" fisher "$data/train/final" "$data/fortunes.h5" -o "$d/s.h5" --gamma 0.5
fails "the name 'f' is taken by an earlier set" "$ft" eval "$data/train/final" -s "f=$data/fortunes.h5" -s "f=$data/fortunes.h5@10"
# The same options where they apply.
"${prep[@]}" "$d/a.txt" --split blank_lines --max-tokens 64 --too-long truncate --on-error skip --max-bad-fraction 0.5 \
  | grep -q "2 documents"
rm -f "$d/s.h5"
printf '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]}\n' >"$d/c2.jsonl"
"${prep[@]}" "$d/c2.jsonl" --format chat --template chatml --train-turns last | grep -q "1 documents"
rm -f "$d/s.h5"
"${prep[@]}" "$d/c2.jsonl" --format chat --template chatml --train-turns each | grep -q "2 documents"
echo "prepare options OK"
