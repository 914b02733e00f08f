#!/usr/bin/env bash
# ft show (tests/CMakeLists.txt: cli_show_data): a chat store's documents as text with exactly the
# assistant turns marked, the token listing, and the errors for a document out of range and for a
# tokenizer that did not write the store. Uses the default job's tokenizer and store (fortunes_store).
#   tests/cli/show_data.sh FT DEFAULT_JOB_DIR WORK_DIR
set -euo pipefail
ft=$1 data=$2 d=$3
rm -rf "$d" && mkdir -p "$d"
tok="$data/tokenizer"
cat >"$d/chat.jsonl" <<'JSONL'
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a hacker?"}, {"role": "assistant", "content": "Someone who enjoys\nexploring systems."}, {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
JSONL
"$ft" prepare "$d/chat.jsonl" -o "$d/chat.h5" -t "$tok" --format chat --template llama2 >/dev/null 2>&1
"$ft" show "$d/chat.h5" -t "$tok" --color never >"$d/out"
# The llama2 rendering, the answers and their </s> marked: libft's labels, seen as text.
cat >"$d/want" <<'TEXT'
document 0: 71 tokens, 19 trained (26.8%)
<s>[INST] <<SYS>>
Be brief.
<</SYS>>

What is a hacker? [/INST]« Someone who enjoys
exploring systems.</s>»<s> [INST] Thanks [/INST]« You are welcome.</s>»

document 1:
<s>[INST] Hi [/INST]« Hello.</s>»
TEXT
grep -q "^$d/chat.h5: 2 documents, " "$d/out" || { echo "FAIL: no store summary"; cat "$d/out"; exit 1; }
# Compare from the first document on, with document 1's token counts left out.
sed -n '/^document 0/,$p' "$d/out" | sed 's/^\(document 1:\).*/\1/' >"$d/got"
diff "$d/want" <(head -n "$(wc -l <"$d/want")" "$d/got") || { echo "FAIL: ft show differs from the expected rendering"; exit 1; }
# --doc picks a document; --tokens lists every token with its flag; the flags add up to the count.
"$ft" show "$d/chat.h5" -t "$tok" --doc 1 --tokens --color never >"$d/one"
grep -q "^document 1: " "$d/one" && ! grep -q "^document 0" "$d/one" || { echo "FAIL: --doc 1"; cat "$d/one"; exit 1; }
rows=$(grep -cE '^ +[0-9]+ +[0-9]+ +[01]  "' "$d/one")
total=$(sed -n 's/^document 1: \([0-9]*\) tokens.*/\1/p' "$d/one")
trained=$(sed -n 's/^document 1: [0-9]* tokens, \([0-9]*\) trained.*/\1/p' "$d/one")
ones=$(grep -cE '^ +[0-9]+ +[0-9]+ +1  "' "$d/one")
[ "$rows" = "$total" ] && [ "$ones" = "$trained" ] || { echo "FAIL: --tokens rows $rows/$total, trained $ones/$trained"; exit 1; }
# --color always: ANSI colours instead of the marks.
"$ft" show "$d/chat.h5" -t "$tok" --doc 1 --color always | grep -q $'\x1b\[32m Hello.' || { echo "FAIL: --color always"; exit 1; }
# Plain text stores show too (every token but BOS trained).
"$ft" show "$data/fortunes.h5" -t "$tok" -n 2 --color never | grep -c "^document " | grep -qx 2 || { echo "FAIL: -n 2"; exit 1; }
fails() {  # fails PATTERN COMMAND...
  local pattern=$1
  shift
  if "$@" >"$d/o" 2>"$d/err"; then echo "FAIL: succeeded: $*"; exit 1; fi
  grep -q -- "$pattern" "$d/err" || { echo "FAIL: '$*' did not say '$pattern':"; cat "$d/err"; exit 1; }
}
fails "has documents 0 to 1" "$ft" show "$d/chat.h5" -t "$tok" --doc 2
printf 'a few words of text\nand some more text here\n' >"$d/t.txt"
"$ft" train-tokenizer "$d/t.txt" -o "$d/other" --vocab-size 300 >/dev/null 2>&1
fails "tokenizer" "$ft" show "$d/chat.h5" -t "$d/other"
echo "show data OK"
