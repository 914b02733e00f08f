#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with TensorBoard's own reader (which checks every record's
CRC-32C) and checks that the scalars equal metrics.jsonl: train/loss, train/lr, train/grad_norm at
every train line, eval/<set>/loss at every eval line, after TensorBoard's purge of the steps that a
resumed run replayed.

    check_event_log.py RUN_DIR
"""
import json
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def fail(message):
    print(f"check_event_log: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    run_dir = sys.argv[1]
    files = [f for f in os.listdir(run_dir) if "tfevents" in f]
    if not files:
        fail(f"no event file in {run_dir}")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}, purge_orphaned_data=True)
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        # A resumed run replays the steps after its checkpoint; its SessionLog START must have made
        # TensorBoard drop the interrupted process's copies of them.
        twice = sorted({s for s in steps if steps.count(s) > 1})
        if twice:
            fail(f"{tag}: steps {twice[:10]} appear more than once after TensorBoard's purge")
        scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    expected = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["type"] == "train":
                for key in ("loss", "lr", "grad_norm"):
                    expected.setdefault(f"train/{key}", {})[r["step"]] = r[key]
            elif r["type"] == "eval":
                expected.setdefault(f"eval/{r['set']}/loss", {})[r["step"]] = r["loss"]
    checked = 0
    for tag, by_step in expected.items():
        got = scalars.get(tag)
        if got is None:
            fail(f"tag {tag} missing; the event files have {sorted(scalars)}")
        if sorted(got) != sorted(by_step):
            fail(f"{tag}: steps {sorted(got)[:10]}... differ from metrics.jsonl's {sorted(by_step)[:10]}...")
        for step, value in by_step.items():
            if not math.isclose(got[step], value, rel_tol=1e-6, abs_tol=1e-30):
                fail(f"{tag} at step {step}: {got[step]} in the event file, {value} in metrics.jsonl")
            checked += 1
    print(f"event log OK: {len(files)} file(s), {checked} scalars equal to metrics.jsonl")


if __name__ == "__main__":
    main()
