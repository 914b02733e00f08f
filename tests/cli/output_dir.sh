#!/usr/bin/env bash
# ft init and ft merge never overwrite a model they were not told to (tests/CMakeLists.txt: cli_output_dir):
# a non-empty output directory is refused without --force, an output that is (or contains) the base or
# the adapter always, and --force replaces the whole directory, leaving no file of the old model.
#   tests/cli/output_dir.sh FT MODEL_CONFIG_JSON WORK_DIR
set -euo pipefail
ft=$1 config=$2 d=$3
rm -rf "$d" && mkdir -p "$d/adapter"
fails() {  # fails PATTERN COMMAND...: the command exits non-zero and its error matches PATTERN
  local pattern=$1
  shift
  if "$@" >"$d/out" 2>"$d/err"; then echo "FAIL: succeeded: $*"; exit 1; fi
  grep -q -- "$pattern" "$d/err" || { echo "FAIL: '$*' did not say '$pattern':"; cat "$d/err"; exit 1; }
}
"$ft" init "$config" "$d/a" --seed 1 >/dev/null
cp "$d/a/model.safetensors" "$d/a.orig"

fails "the output directory $d/a is not empty: choose another, or pass --force" "$ft" init "$config" "$d/a" --seed 2
fails "the output directory $d/a is not empty" "$ft" merge "$d/adapter" "$d/adapter" -o "$d/a"
fails "the output directory $d/a is the base model $d/a" "$ft" merge "$d/a" "$d/adapter" -o "$d/a" --force
fails "the output directory $d/a/ is the base model" "$ft" merge "$d/a" "$d/adapter" -o "$d/a/" --force
fails "is the base model" "$ft" merge "$d/a/../a" "$d/adapter" -o "$d/a" --force
ln -s "$d/a" "$d/link"
fails "is the base model" "$ft" merge "$d/link" "$d/adapter" -o "$d/a" --force
fails "the output directory $d contains the base model" "$ft" merge "$d/a" "$d/adapter" -o "$d" --force
fails "is the adapter" "$ft" merge "$d/a" "$d/adapter" -o "$d/adapter" --force
cmp "$d/a/model.safetensors" "$d/a.orig"

# --force replaces the model as a whole: a stale shard, index or generation config does not survive.
touch "$d/a/model-00001-of-00002.safetensors" "$d/a/model.safetensors.index.json" "$d/a/generation_config.json"
"$ft" init "$config" "$d/a" --seed 2 --force >/dev/null
test "$(ls "$d/a")" = "$(printf 'config.json\nmodel.safetensors')" || { echo "FAIL: left in $d/a:"; ls "$d/a"; exit 1; }
! cmp -s "$d/a/model.safetensors" "$d/a.orig"
! ls -d "$d"/a.tmp-* 2>/dev/null || { echo "FAIL: a temporary directory was left"; exit 1; }
"$ft" inspect "$d/a" >/dev/null

# An empty directory is fine; one that holds no model is not replaced, even with --force.
mkdir "$d/empty" "$d/notes" && echo keep >"$d/notes/notes.txt"
"$ft" init "$config" "$d/empty" >/dev/null
fails "holds no model" "$ft" init "$config" "$d/notes" --force
test -e "$d/notes/notes.txt"
# Directories the user has beside the output (an earlier tool's a.tmp or a.old, a base model) are
# never touched: the temporary directories have fresh names.
"$ft" init "$config" "$d/tmp.model" --seed 3 >/dev/null
cp -r "$d/tmp.model" "$d/b.tmp" && cp -r "$d/tmp.model" "$d/b.old"
"$ft" init "$config" "$d/b" >/dev/null
"$ft" init "$config" "$d/b" --seed 4 --force >/dev/null
cmp "$d/b.tmp/model.safetensors" "$d/tmp.model/model.safetensors"
cmp "$d/b.old/model.safetensors" "$d/tmp.model/model.safetensors"
# A symbolic link as the output: the model goes where it points, and the link stays a link.
mkdir "$d/real" && ln -s "$d/real" "$d/via"
"$ft" init "$config" "$d/via" --seed 5 >/dev/null
test -L "$d/via" && test -f "$d/real/model.safetensors" && test -f "$d/real/config.json"
cp "$d/real/model.safetensors" "$d/real.orig"
"$ft" init "$config" "$d/via" --seed 6 --force >/dev/null
test -L "$d/via" && ! cmp -s "$d/real/model.safetensors" "$d/real.orig"
test "$(ls -A "$d/real")" = "$(printf 'config.json\nmodel.safetensors')" || { echo "FAIL: left in $d/real:"; ls -A "$d/real"; exit 1; }
# The same replacement where the file system has no RENAME_EXCHANGE (the two-rename fallback).
cp "$d/real/model.safetensors" "$d/real.orig"
LIBFT_NO_RENAME_EXCHANGE=1 "$ft" init "$config" "$d/via" --seed 7 --force >/dev/null
test -L "$d/via" && ! cmp -s "$d/real/model.safetensors" "$d/real.orig"
test "$(ls -A "$d/real")" = "$(printf 'config.json\nmodel.safetensors')" || { echo "FAIL: left in $d/real:"; ls -A "$d/real"; exit 1; }
! ls -d "$d"/real.old-* "$d"/real.tmp-* 2>/dev/null || { echo "FAIL: a temporary directory was left"; exit 1; }
"$ft" inspect "$d/via" >/dev/null
echo "output directories OK"
