#!/usr/bin/env python3
"""Reliability of `ft train` checkpoints, end to end on CPU: kills, crashes inside the save path,
signals and damaged checkpoints must never change what a run computes.

    kill_resume.py FT CONFIG MODEL_CONFIG DATA_DIR WORK_DIR [--kills N] [--seed S]

DATA_DIR holds the default job's tokenizer/ and fortunes.h5. Every scenario is compared with an
uninterrupted reference run of the same config: the per-step train/skip/eval lines of metrics.jsonl
(loss, lr, grad norm, target counts and the hash of each step's input ids, i.e. the order of the
samples seen; timing fields excluded) and the final weights must be bit-identical.

 1. kills:   SIGKILL at random moments (seeded), at least N times, each restart resuming from the
             newest checkpoint; some kills land inside checkpoint writes (a .tmp directory is left
             behind), most inside a step's accumulation window.
 2. signal:  SIGTERM mid-run: exit status 143, a checkpoint at the step reached, exact resume.
 3. crashes: LIBFT_CHECKPOINT_CRASH=<point>@2 ends the process inside the second save (the third for
             during_prune) at every
             point of the save path; every checkpoint directory left verifies against its manifest
             (checked here independently with hashlib) and the resumed run is exact.
 4. damage:  the newest checkpoint truncated, bit-flipped or missing a file: the run falls back to
             the previous checkpoint, names the file, and still ends bit-identical; with
             checkpoint.strict=true it stops with an error naming the file instead.
Standard library only.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

TIMING = ("tokens_per_s", "step_time_s", "eval_time_s", "peak_rss_mib", "peak_device_mib")  # vary between processes


def fail(message):
    print(f"kill_resume: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


class Runner:
    def __init__(self, ft, config, model_config, data_dir):
        self.ft = ft
        self.base = [ft, "train", config,
                     f"model.config={model_config}",
                     f"tokenizer={os.path.join(data_dir, 'tokenizer')}",
                     f"data.train={os.path.join(data_dir, 'fortunes.h5')}",
                     "data.batch_size=2", "data.seq_len=64", "data.grad_accum=2",
                     "schedule.warmup_steps=3", "eval.held_out_docs=40", "eval.max_batches=2",
                     "checkpoint.keep_last=2", "log_every=1"]

    def args(self, out, steps, every, extra=()):
        return self.base + [f"output_dir={out}", f"max_steps={steps}", f"eval.every={every * 2}",
                            f"checkpoint.every={every}"] + list(extra)

    def run(self, out, steps, every, extra=(), env=None, expect=0):
        p = subprocess.run(self.args(out, steps, every, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env, text=True)
        if p.returncode != expect:
            fail(f"ft train {out} exited {p.returncode}, expected {expect}:\n{p.stdout[-3000:]}")
        return p.stdout

    def start(self, out, steps, every):
        return subprocess.Popen(self.args(out, steps, every), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)


def metrics(out):
    lines = []
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{out}/metrics.jsonl:{n}: not JSON ({e}): {line!r}")
            lines.append({k: v for k, v in record.items() if k not in TIMING})
    return lines


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def same_as_reference(out, ref, what):
    a, b = metrics(out), metrics(ref)
    if a != b:
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                fail(f"{what}: metrics line {i + 1} differs from the uninterrupted run:\n  got  {x}\n  want {y}")
        fail(f"{what}: {len(a)} metrics lines, the uninterrupted run has {len(b)}")
    wa = file_digest(os.path.join(out, "final", "model.safetensors"))
    wb = file_digest(os.path.join(ref, "final", "model.safetensors"))
    if wa != wb:
        fail(f"{what}: final weights differ from the uninterrupted run")


def verify_checkpoints(out, what):
    """Every step-N directory is complete: its manifest lists files whose sizes and SHA-256 match."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return 0
    n = 0
    for name in sorted(os.listdir(root)):
        if not name.startswith("step-") or name.endswith((".tmp", ".old")):
            continue
        d = os.path.join(root, name)
        try:
            with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"{what}: {d} looks complete but has no valid manifest: {e}")
        for entry in manifest["files"]:
            p = os.path.join(d, entry["name"])
            if not os.path.exists(p) or os.path.getsize(p) != entry["bytes"] or file_digest(p) != entry["sha256"]:
                fail(f"{what}: {p} does not match the manifest: a partial checkpoint was left as complete")
        n += 1
    return n


def batcher_epoch(checkpoint_dir):
    with open(os.path.join(checkpoint_dir, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return state["step"], state["batcher"]["streams"][0]["epoch"]


def scenario_kills(r, work, kills_wanted, rng, event_check=True):
    steps, every = 150, 3
    ref = os.path.join(work, "kill-ref")
    r.run(ref, steps, every)
    out = os.path.join(work, "kills")
    kills, during_save, resumes, attempts = 0, 0, [], 0
    # Kill delays adapt to the machine: when a run was killed before its next checkpoint (a loaded
    # machine starts and steps slower), the next delays are longer.
    stretch, last_newest = 1.0, -1
    while True:
        attempts += 1
        if attempts > 200:
            fail("kills: no progress after 200 restarts")
        ckpt_root = os.path.join(out, "checkpoints")
        if os.path.isdir(ckpt_root):
            done = sorted(n for n in os.listdir(ckpt_root) if n.startswith("step-") and "." not in n)
            if done:
                resumes.append(batcher_epoch(os.path.join(ckpt_root, done[-1])))
        p = r.start(out, steps, every)
        if kills >= kills_wanted:
            _, err = p.communicate()
            if p.returncode != 0:
                fail(f"kills: the last resumed run exited {p.returncode}:\n{err[-3000:]}")
            break
        # Long enough to make progress past the ~0.5 s start-up; shorter once the run nears its end,
        # so that it cannot finish before the wanted number of kills.
        newest = resumes[-1][0] if resumes else 0
        # The stretch grows while kills land before any new checkpoint and shrinks again with progress;
        # near the end it is capped, so that one long delay cannot let the run finish.
        if newest <= last_newest:
            stretch = min(stretch * 1.5, 20.0)
        else:
            stretch = max(1.0, stretch / 1.5)
        last_newest = newest
        if newest < 0.6 * steps:
            time.sleep(stretch * rng.uniform(0.3, 2.0))
        else:
            time.sleep(min(stretch, 3.0) * rng.uniform(0.2, 0.8))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            if os.path.isdir(ckpt_root) and any(n.endswith(".tmp") for n in os.listdir(ckpt_root)):
                during_save += 1
            verify_checkpoints(out, f"kills (after kill {kills})")
        else:
            err = p.stderr.read()
            if p.returncode != 0:
                fail(f"kills: run exited {p.returncode}:\n{err[-3000:]}")
            fail(f"kills: the run finished after {kills} kills; lower the delays or raise max_steps")
    same_as_reference(out, ref, f"kills ({kills} SIGKILLs)")
    if not event_check:
        return report(kills, during_save, resumes)
    # TensorBoard's view of the event files of all those processes equals metrics.jsonl.
    check = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "check_event_log.py"), out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check.returncode != 0:
        fail(f"kills: event files disagree with metrics.jsonl:\n{check.stdout[-2000:]}")
    print(f"kills: {check.stdout.strip()}")
    report(kills, during_save, resumes)


def report(kills, during_save, resumes):
    resumed_steps = [s for s, _ in resumes]
    epochs = sorted(set(e for _, e in resumes))
    if len(set(resumed_steps)) < 3:
        fail(f"kills: only resumed from steps {resumed_steps}; the kills did not exercise resumption")
    same_epoch = len(resumes) - len(epochs)
    print(f"kills: {kills} SIGKILLs ({during_save} during a checkpoint write), resumed from steps {resumed_steps} "
          f"(epochs {epochs}; {same_epoch} resumes inside an epoch already resumed in); metrics and final weights "
          f"bit-identical to the uninterrupted run")
    if same_epoch < 1:
        fail("kills: no second resume inside the same epoch")


def scenario_signal(r, work):
    steps, every = 40, 4
    ref = os.path.join(work, "signal-ref")
    r.run(ref, steps, every)
    out = os.path.join(work, "signal")
    p = r.start(out, steps, every)
    ckpt_root = os.path.join(out, "checkpoints")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(ckpt_root) and any("." not in n for n in os.listdir(ckpt_root))):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    if p.returncode != 128 + signal.SIGTERM:
        fail(f"signal: SIGTERM gave exit status {p.returncode}, expected {128 + signal.SIGTERM}:\n{err[-3000:]}")
    if "saved (signal)" not in err:
        fail(f"signal: no checkpoint saved on SIGTERM:\n{err[-3000:]}")
    r.run(out, steps, every)
    same_as_reference(out, ref, "signal")
    print("signal: SIGTERM saved a checkpoint and exited 143; the resumed run is bit-identical")


def scenario_crashes(r, work, points):
    steps, every = 12, 3
    ref = os.path.join(work, "crash-ref")
    r.run(ref, steps, every)
    for point in points:
        out = os.path.join(work, f"crash-{point}")
        # The second save, or the third for during_prune: the first one that removes an older checkpoint.
        env = dict(os.environ, LIBFT_CHECKPOINT_CRASH=f"{point}@{3 if point == 'during_prune' else 2}")
        r.run(out, steps, every, env=env, expect=86)
        n = verify_checkpoints(out, f"crash at {point}")
        log = r.run(out, steps, every)
        same_as_reference(out, ref, f"crash at {point}")
        print(f"crash at {point}: {n} intact checkpoint(s) left, resumed "
              f"({'from step ' + log.split('(step ')[1].split(' ')[0] if '(step ' in log else 'from scratch'}) "
              "bit-identical")


def damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "bit-flipped":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x10]))
    elif how == "missing":
        os.remove(path)


def scenario_damage(r, work):
    steps, every = 12, 3
    ref = os.path.join(work, "crash-ref")  # written by scenario_crashes
    for how, victim in (("truncated", "model.safetensors"), ("bit-flipped", "optimizer.safetensors"),
                        ("missing", "trainer_state.json")):
        out = os.path.join(work, f"damaged-{how}")
        shutil.copytree(ref, out)
        newest = os.path.join(out, "checkpoints", f"step-{steps:08d}")
        damage(os.path.join(newest, victim), how)
        strict = r.run(out, steps, every, extra=["checkpoint.strict=true"], expect=1)
        if victim not in strict or "checkpoint.strict" not in strict:
            fail(f"damage ({how}): the strict run's error does not name {victim}:\n{strict[-2000:]}")
        log = r.run(out, steps, every)
        if "skipping damaged checkpoint" not in log or victim not in log or f"step {steps - every} of" not in log:
            fail(f"damage ({how}): no fallback to step {steps - every} naming {victim}:\n{log[-3000:]}")
        same_as_reference(out, ref, f"damage ({how})")
        print(f"damage ({how} {victim}): strict run refused it by name; default run fell back to step "
              f"{steps - every} and ended bit-identical")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ft")
    ap.add_argument("config")
    ap.add_argument("model_config")
    ap.add_argument("data_dir")
    ap.add_argument("work")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("LIBFT_KILL_SEED", str(int(time.time()) % 100000))))
    ap.add_argument("--no-event-check", action="store_true", help="skip the TensorBoard reader check")
    ap.add_argument("--points", default="begin,after_files,after_manifest,after_rename,during_prune")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    r = Runner(a.ft, a.config, a.model_config, a.data_dir)
    start = time.time()
    scenario_crashes(r, a.work, a.points.split(","))
    scenario_damage(r, a.work)
    scenario_signal(r, a.work)
    scenario_kills(r, a.work, a.kills, random.Random(a.seed), event_check=not a.no_event_check)
    print(f"kill/resume OK ({time.time() - start:.0f} s, seed {a.seed})")


if __name__ == "__main__":
    main()
