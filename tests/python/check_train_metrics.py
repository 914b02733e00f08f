#!/usr/bin/env python3
"""Checks a training run's output directory (ft train): every line of metrics.jsonl parses as a JSON
object of a known type, train steps run 1..N without gaps, the loss fell, and the final checkpoint
and resolved config exist. Standard library only.

    check_train_metrics.py RUN_DIR EXPECTED_STEPS [--format-only]

--format-only skips the loss checks (for runs of a few steps that only prove a config runs).
"""
import json
import math
import os
import sys


def fail(message):
    print(f"check_train_metrics: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    run_dir, expected_steps = sys.argv[1], int(sys.argv[2])
    format_only = "--format-only" in sys.argv[3:]
    path = os.path.join(run_dir, "metrics.jsonl")
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{number}: not JSON: {e}")
            if not isinstance(record, dict) or record.get("type") not in ("train", "eval", "skip"):
                fail(f"{path}:{number}: not a train/eval/skip object: {line.strip()}")
            if record["type"] == "train":
                for key in ("step", "loss", "lr", "grad_norm", "targets", "tokens", "tokens_per_s", "step_time_s"):
                    if not isinstance(record.get(key), (int, float)) or not math.isfinite(record[key]):
                        fail(f"{path}:{number}: train line without a finite '{key}'")
                train.append(record)
            elif record["type"] == "eval":
                if not math.isclose(record["perplexity"], math.exp(record["loss"]), rel_tol=1e-9):
                    fail(f"{path}:{number}: perplexity is not exp(loss)")
                evals.append(record)
    steps = [r["step"] for r in train]
    if steps != list(range(1, expected_steps + 1)):
        fail(f"train steps are {steps}, expected 1..{expected_steps}")
    if not evals:
        fail("no eval line")
    first = sum(r["loss"] for r in train[:3]) / 3
    last = sum(r["loss"] for r in train[-3:]) / 3
    final_eval = evals[-1]["loss"]
    print(f"train loss {first:.4f} (first 3 steps) -> {last:.4f} (last 3); eval loss {final_eval:.4f} "
          f"at step {evals[-1]['step']}; {train[-1]['tokens_per_s']:.0f} tokens/s")
    if format_only:
        pass
    elif not last < first - 0.5:
        fail(f"the training loss did not fall: {first:.4f} -> {last:.4f}")
    if not format_only and not final_eval < train[0]["loss"] - 0.5:
        fail(f"the final eval loss {final_eval:.4f} is not below the first training loss {train[0]['loss']:.4f}")
    adapter = os.path.exists(os.path.join(run_dir, "final", "adapter_config.json"))
    final = ("final/adapter_config.json", "final/adapter_model.safetensors") if adapter else \
        ("final/config.json", "final/model.safetensors")
    for needed in ("config.yaml",) + final:
        if not os.path.exists(os.path.join(run_dir, needed)):
            fail(f"{needed} is missing in {run_dir}")
    print("train metrics OK")


if __name__ == "__main__":
    main()
