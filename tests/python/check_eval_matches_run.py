#!/usr/bin/env python3
"""`ft eval --json` against a training run's own evaluations: the base model's losses must equal the
run's step-0 evaluation (eval.at_start) and the run's final model's (or adapter's) losses its last
evaluation, set by set, to the printed precision of float64 sums (1e-9 relative).

    check_eval_matches_run.py EVAL_JSON RUN_DIR
"""
import json
import sys


def main(eval_json, run_dir):
    rows = json.load(open(eval_json, encoding="utf-8"))
    evals = {}
    for line in open(f"{run_dir}/metrics.jsonl", encoding="utf-8"):
        j = json.loads(line)
        if j["type"] == "eval":
            evals.setdefault(j["set"], []).append(j)
    base, tuned = rows[0], rows[1]
    if base["model"] != "base":
        sys.exit("check_eval: the base model must come first")
    checked = 0
    for name, lines in evals.items():
        for row, line in ((base, lines[0]), (tuned, lines[-1])):
            got, want = row[name]["loss"], line["loss"]
            if abs(got - want) > 1e-9 * abs(want) or row[name]["targets"] != line["targets"]:
                sys.exit(f"check_eval: {row['model']} on {name}: ft eval {got!r} ({row[name]['targets']} targets), "
                         f"run step {line['step']} {want!r} ({line['targets']} targets)")
            checked += 1
        if abs(tuned[name]["delta_loss"] - (tuned[name]["loss"] - base[name]["loss"])) > 1e-12:
            sys.exit(f"check_eval: {name}: delta_loss is not the difference of the losses")
    print(f"ft eval matches the run: {checked} losses")


if __name__ == "__main__":
    main(*sys.argv[1:])
