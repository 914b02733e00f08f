#!/usr/bin/env python3
"""`ft eval --json` against a training run's own evaluations: the base model's losses must equal the
first run's step-0 evaluation (eval.at_start), and each run's final model's (or adapter's) losses its
last evaluation, set by set, to 1e-9 relative. Variant i of the ft eval command is RUN_DIR i.

    check_eval_matches_run.py EVAL_JSON RUN_DIR [RUN_DIR ...]
"""
import json
import sys


def main(eval_json, *run_dirs):
    rows = json.load(open(eval_json, encoding="utf-8"))
    base = rows[0]
    if base["model"] != "base" or len(rows) != 1 + len(run_dirs):
        sys.exit("check_eval: expected the base model first, then one row per run directory")
    checked = 0
    for tuned, run_dir in zip(rows[1:], run_dirs):
        evals = {}
        for line in open(f"{run_dir}/metrics.jsonl", encoding="utf-8"):
            j = json.loads(line)
            if j["type"] == "eval":
                evals.setdefault(j["set"], []).append(j)
        for name, lines in evals.items():
            # Step 0 is the base model in the first run (LoRA starts at B = 0; a prefix run does not
            # start at the base: its prefix is random).
            pairs = ((base, lines[0]), (tuned, lines[-1])) if run_dir == run_dirs[0] else ((tuned, lines[-1]),)
            for row, line in pairs:
                got, want = row[name]["loss"], line["loss"]
                if abs(got - want) > 1e-9 * abs(want) or row[name]["targets"] != line["targets"]:
                    sys.exit(f"check_eval: {row['model']} on {name}: ft eval {got!r} ({row[name]['targets']} targets), "
                             f"{run_dir} step {line['step']} {want!r} ({line['targets']} targets)")
                checked += 1
            if abs(tuned[name]["delta_loss"] - (tuned[name]["loss"] - base[name]["loss"])) > 1e-12:
                sys.exit(f"check_eval: {name}: delta_loss is not the difference of the losses")
    print(f"ft eval matches the runs: {checked} losses")


if __name__ == "__main__":
    main(*sys.argv[1:])
