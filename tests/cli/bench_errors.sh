#!/usr/bin/env bash
# ft bench's config mistakes (tests/CMakeLists.txt: cli_bench_errors), on tests/data/bench-tiny.yaml
# with one mistake each: a typo in the last variant's overrides stops the bench before anything runs
# (no baseline, no variant trained) with the variant named; a target_set that the run config does not
# evaluate names the sets it does.
#   tests/cli/bench_errors.sh FT SOURCE_DIR DEFAULT_JOB_DIR WORK_DIR
set -euo pipefail
ft=$1 src=$2 data=$3 d=$4
rm -rf "$d" && mkdir -p "$d"
vars="vars={data: $data, out: $d/out, configs: $src/configs}"
fails() {  # fails PATTERN YAML: ft bench YAML exits non-zero and its error matches PATTERN
  if "$ft" bench "$2" "$vars" >"$d/log" 2>&1; then echo "FAIL: $2 succeeded"; exit 1; fi
  grep -q -- "$1" "$d/log" || { echo "FAIL: $2 did not say '$1':"; tail -5 "$d/log"; exit 1; }
}
sed 's/replay.held_out_docs=200/replay.held_out_doc=200/' "$src/tests/data/bench-tiny.yaml" >"$d/typo.yaml"
fails "variant 'lora+replay': " "$d/typo.yaml"
grep -q "held_out_doc'" "$d/log" || { echo "FAIL: the typo is not named:"; cat "$d/log"; exit 1; }
! grep -q "base model" "$d/log" || { echo "FAIL: the baseline ran before the config was checked"; exit 1; }
test ! -e "$d/out/full" || { echo "FAIL: a variant trained before the config was checked"; exit 1; }
sed 's/^target_set: held_out/target_set: heldout/' "$src/tests/data/bench-tiny.yaml" >"$d/set.yaml"
fails "target_set 'heldout' is not one of the run config's evaluation sets (fortunes, held_out)" "$d/set.yaml"
echo "bench errors OK"
