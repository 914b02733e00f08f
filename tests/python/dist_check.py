#!/usr/bin/env python3
"""Data-parallel `ft train` on CPU (Gloo), end to end, against one process with the same global batch.

    dist_check.py FT DATA_DIR CONFIG_DIR WORK_DIR [--torchrun PATH]

DATA_DIR holds the default job's tokenizer/, fortunes.h5, jargon.h5 and train/final (the base model
for the adapter modes). Scenarios:

 1. equality: full fine-tuning and LoRA on 2 and 3 ranks (`ft launch`), with and without gradient
    accumulation, and QLoRA and prefix tuning on 2 ranks, against one process with the same global
    batch (the same rows in the same order: the metrics' "data" hashes are equal), both as the same
    micro-batches
    accumulated and as one big micro-batch: per-step losses and evaluations within 1e-6 (relative),
    final weights within 1e-5 (max |a - b| / max |b| per tensor; against the big batch, or within
    twice what one process's own accumulation deviates from it). Also through torchrun (its agent
    store) when --torchrun is given, and bit-identical through the variables mpirun and srun set.
 2. resume: a 2-rank run stopped by SIGTERM to the launcher resumes bit-identical to an
    uninterrupted 2-rank run (full, and LoRA with dropout: per-rank generator streams); resuming
    on 3 ranks is refused, naming the rank counts.
 3. killed rank: SIGKILL of rank 1 mid-run ends the job (launcher status non-zero, rank 0 reports the
    failed collective) well within the timeout.
 4. hung rank: rank 1 frozen with SIGSTOP (started without the launcher): rank 0 exits with an error
    naming the timeout within dist.timeout_s plus a margin.
Standard library only (safetensors are read by hand).
"""
import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

TIMING = ("tokens_per_s", "step_time_s", "eval_time_s", "peak_rss_mib", "peak_device_mib")


def fail(message):
    print(f"dist_check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            fail(f"{path}: {name} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        out[name] = struct.unpack(f"<{(b - a) // 4}f", data[a:b])
    return out


def weights_file(run_dir):
    final = os.path.join(run_dir, "final")
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(final, name)):
            return os.path.join(final, name)
    fail(f"{final} holds no safetensors file")


def max_rel_diff(a_path, b_path):
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    if a.keys() != b.keys():
        fail(f"{a_path} and {b_path} hold different tensors")
    worst, where = 0.0, ""
    for k in a:
        scale = max(max(abs(x) for x in b[k]), 1e-30)
        d = max(abs(x - y) for x, y in zip(a[k], b[k])) / scale
        if d > worst:
            worst, where = d, k
    return worst, where


def metric_lines(run_dir):
    lines = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for raw in f:
            j = json.loads(raw)
            for k in TIMING:
                j.pop(k, None)
            lines.append(j)
    return lines


def compare_metrics(ref_dir, dp_dir, what):
    ref, dp = metric_lines(ref_dir), metric_lines(dp_dir)
    if len(ref) != len(dp):
        fail(f"{what}: {len(dp)} metrics lines, one process wrote {len(ref)}")
    worst = 0.0
    for r, d in zip(ref, dp):
        if r.keys() != d.keys() or r["type"] != d["type"] or r.get("step") != d.get("step"):
            fail(f"{what}: metrics lines differ in shape: {r} vs {d}")
        for k in ("loss", "lr", "grad_norm", "perplexity"):
            if k in r:
                rel = abs(r[k] - d[k]) / max(abs(r[k]), 1e-30)
                worst = max(worst, rel)
                if rel > 1e-6:
                    fail(f"{what}: step {r['step']} {r['type']} {k}: {d[k]} vs one process {r[k]} (rel {rel:.2e})")
        for k in ("targets", "tokens", "skipped", "best", "set", "data"):  # data: the hash of the step's rows
            if k in r and r[k] != d[k]:
                fail(f"{what}: step {r['step']} {k}: {d[k]} vs one process {r[k]}")
    return worst


def run(cmd, env=None, log=None, timeout=300, expect=0):
    with open(log, "w") if log else open(os.devnull, "w") as out:
        p = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if expect is not None and p.returncode != expect:
        text = open(log).read()[-3000:] if log else ""
        fail(f"{' '.join(cmd)} exited with {p.returncode} (expected {expect})\n{text}")
    return p.returncode


def wait_for_steps(run_dir, n, proc, deadline_s=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    end = time.time() + deadline_s
    while time.time() < end:
        if proc.poll() is not None:
            fail(f"the job ended (status {proc.returncode}) before step {n}")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for line in f if '"type": "train"' in line or '"type":"train"' in line) >= n:
                    return
        time.sleep(0.05)
    fail(f"no step {n} within {deadline_s} s")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ft")
    ap.add_argument("data")
    ap.add_argument("configs")
    ap.add_argument("work")
    ap.add_argument("--torchrun", default="")
    args = ap.parse_args()
    ft, data, work = os.path.abspath(args.ft), os.path.abspath(args.data), os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_USE_AGENT_STORE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores
    full_cfg = os.path.join(args.configs, "train-tiny.yaml")
    lora_cfg = os.path.join(args.configs, "lora-jargon.yaml")
    common = [f"tokenizer={data}/tokenizer", "max_steps=4", "schedule.warmup_steps=1", "eval.every=2",
              "eval.max_batches=2", "checkpoint.every=0", "log_every=1", "eval.at_start=false"]
    modes = {
        "full": [full_cfg, f"model.config={os.path.join(args.configs, 'models', 'tiny-llama.json')}",
                 f"data.train=[{data}/fortunes.h5]", "eval.held_out_docs=200"],
        "lora": [lora_cfg, f"model.checkpoint={data}/train/final", f"data.train=[{data}/jargon.h5]",
                 "eval.held_out_docs=300", f"eval.stores=[{data}/fortunes.h5]", "lora.dropout=0"],
    }
    for mode in ("qlora", "prefix"):  # the same data and evaluation as the LoRA runs
        modes[mode] = [os.path.join(args.configs, f"{mode}-jargon.yaml")] + modes["lora"][1:5] + \
            (["lora.dropout=0"] if mode == "qlora" else [])

    # 1. equality with one process holding the whole global batch
    t0 = time.time()
    cases = [("full", 2, 3, 1), ("full", 3, 2, 1), ("full", 2, 2, 2), ("lora", 2, 3, 1), ("lora", 3, 2, 1),
             ("lora", 2, 2, 2), ("qlora", 2, 3, 1), ("prefix", 2, 3, 1)]
    refs = {}

    def reference(mode, rows, accum):
        """One process, `rows` per micro-batch, `accum` micro-batches per step (cached)."""
        key = (mode, rows, accum)
        if key not in refs:
            cfg, *extra = modes[mode]
            ref = os.path.join(work, f"{mode}-ref-b{rows}-a{accum}")
            run([ft, "train", cfg] + common + extra + [f"data.grad_accum={accum}", f"eval.batch_size={eval_rows}",
                 f"data.batch_size={rows}", f"output_dir={ref}"], env=env, log=ref + ".log")
            refs[key] = ref
        return refs[key]

    eval_rows = 6
    for mode, world, rows, accum in cases:
        cfg, *extra = modes[mode]
        out = os.path.join(work, f"{mode}-w{world}-b{rows}-a{accum}")
        run([ft, "launch", "-n", str(world), "train", cfg] + common + extra +
            [f"data.grad_accum={accum}", f"eval.batch_size={eval_rows}", f"data.batch_size={rows}", f"output_dir={out}"],
            env=env, log=out + ".log")
        # (a) one process accumulating the same micro-batches (only the order of the float32 sums
        # differs: bit-identical for 2 ranks without accumulation), and (b) one process with the whole
        # global batch in each micro-batch. Adam amplifies float32 rounding in tiny gradients (LoRA's
        # A right after its zero-initialised B): the bound is 1e-5, or twice what one process's own
        # accumulation deviates from the big batch, whichever is larger (the same rounding noise).
        same = reference(mode, rows, world * accum)
        big = reference(mode, world * rows, accum)
        w_acc, _ = max_rel_diff(weights_file(same), weights_file(big))
        bound = max(1e-5, 2 * w_acc)
        m_same = compare_metrics(same, out, out)
        m_big = compare_metrics(big, out, out)
        w_same, where_same = max_rel_diff(weights_file(out), weights_file(same))
        w_big, where_big = max_rel_diff(weights_file(out), weights_file(big))
        if w_same > bound:
            fail(f"{out}: final weights differ by {w_same:.2e} ({where_same}) from one process accumulating the same "
                 f"micro-batches (bound {bound:.1e})")
        if w_big > bound:
            fail(f"{out}: final weights differ by {w_big:.2e} ({where_big}) from one process with the global batch "
                 f"(bound {bound:.1e})")
        print(f"equal: {mode}, {world} ranks × {rows} rows × {accum} micro-batches: vs 1 process accumulating the same "
              f"micro-batches: metrics {m_same:.1e}, weights {w_same:.1e}; vs 1 process × {world * rows} rows: "
              f"metrics {m_big:.1e}, weights {w_big:.1e} (1 process accumulating: {w_acc:.1e})")
    if args.torchrun:
        cfg, *extra = modes["full"]
        out = os.path.join(work, "full-torchrun")
        run([args.torchrun, "--nproc-per-node=2", "--no-python", ft, "train", cfg] + common + extra +
            ["data.grad_accum=1", "eval.batch_size=6", "data.batch_size=3", f"output_dir={out}"], env=env,
            log=out + ".log")
        m = compare_metrics(reference("full", 3, 2), out, out)
        w, _ = max_rel_diff(weights_file(out), weights_file(reference("full", 3, 2)))
        if w > 1e-5:
            fail(f"torchrun: final weights differ from one process by {w:.2e}")
        if "torchrun agent store" not in open(out + ".log").read():
            fail("torchrun: the run did not use the agent store")
        print(f"equal: torchrun --nproc-per-node=2 (agent store) vs 1 process accumulating: metrics {m:.1e}, "
              f"weights within {w:.1e}")
    # The same 2-rank run started the way mpirun and srun start processes: bit-identical weights.
    cfg, *extra = modes["full"]
    ref = os.path.join(work, "full-w2-b3-a1")
    for name, make in (
        ("mpirun", lambda r: {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(r),
                              "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                              "MASTER_ADDR": "127.0.0.1"}),
        ("srun", lambda r: {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"})):
        out = os.path.join(work, f"full-{name}")
        port = str(29100 + (os.getpid() + len(name)) % 800)
        procs = [subprocess.Popen([ft, "train", cfg] + common + extra +
                                  ["data.grad_accum=1", f"eval.batch_size={eval_rows}", "data.batch_size=3",
                                   f"output_dir={out}"], env=dict(env, MASTER_PORT=port, **make(r)),
                                  stdout=open(f"{out}-{r}.log", "w"), stderr=subprocess.STDOUT) for r in range(2)]
        codes = [q.wait(timeout=300) for q in procs]
        if codes != [0, 0]:
            fail(f"{name}-style launch: exit codes {codes}\n" + open(f"{out}-0.log").read()[-2000:])
        if f"via {'mpi' if name == 'mpirun' else 'slurm'}" not in open(f"{out}-0.log").read():
            fail(f"{name}-style launch: the run did not read {name}'s variables")
        with open(weights_file(out), "rb") as a, open(weights_file(ref), "rb") as b:
            if a.read() != b.read():
                fail(f"{name}-style launch: final weights differ from ft launch's")
        print(f"equal: {name}'s environment gives ft launch's weights bit for bit")
    print(f"equality cases: {time.time() - t0:.0f} s")

    # 2. resume of a data-parallel run after SIGTERM, exact: full fine-tuning, and LoRA with dropout
    # (every rank draws its own dropout stream, which the checkpoint keeps per rank).
    long = [x.replace("max_steps=4", "max_steps=8").replace("checkpoint.every=0", "checkpoint.every=2") for x in common]
    for mode, more in (("full", []), ("lora", ["lora.dropout=0.1"])):
        cfg, *extra = modes[mode]
        base = [ft, "launch", "-n", "2", "train", cfg] + long + extra + more + ["data.batch_size=2", "eval.batch_size=4"]
        whole = os.path.join(work, f"resume-{mode}-whole")
        run(base + [f"output_dir={whole}"], env=env, log=whole + ".log")
        cut = os.path.join(work, f"resume-{mode}-cut")
        p = subprocess.Popen(base + [f"output_dir={cut}"], env=env, stdout=open(cut + ".log", "w"),
                             stderr=subprocess.STDOUT)
        wait_for_steps(cut, 3, p)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
        if rc != 143:
            fail(f"{mode}: SIGTERM to the launcher: status {rc}, expected 143\n{open(cut + '.log').read()[-2000:]}")
        ckpts = sorted(os.listdir(os.path.join(cut, "checkpoints")))
        if mode == "full":
            run(base[:3] + ["3"] + base[4:] + [f"output_dir={cut}"], env=env, log=cut + "-3.log", expect=1)
            if "resume with the same number of ranks" not in open(cut + "-3.log").read():
                fail("resuming on 3 ranks: no error naming the rank counts\n" + open(cut + "-3.log").read()[-2000:])
        run(base + [f"output_dir={cut}"], env=env, log=cut + "-resume.log")
        if metric_lines(whole) != metric_lines(cut):
            fail(f"{mode}: the resumed 2-rank run's metrics differ from the uninterrupted one")
        with open(weights_file(whole), "rb") as a, open(weights_file(cut), "rb") as b:
            if a.read() != b.read():
                fail(f"{mode}: the resumed 2-rank run's final weights differ from the uninterrupted one")
        print(f"resume ({mode}{', dropout 0.1' if more else ''}): SIGTERM at checkpoint(s) {ckpts}, resumed on 2 ranks "
              f"bit-identical{'; 3 ranks refused' if mode == 'full' else ''}")

    # 3. a killed rank ends the job
    cfg, *extra = modes["full"]
    endless = [x if not x.startswith("max_steps") else "max_steps=100000" for x in common]
    killed = os.path.join(work, "killed")
    p = subprocess.Popen([ft, "launch", "-n", "2", "--grace", "20", "train", cfg] + endless + extra +
                         ["data.batch_size=2", "dist.timeout_s=60", f"output_dir={killed}"], env=env,
                         stdout=open(killed + ".log", "w"), stderr=subprocess.STDOUT)
    wait_for_steps(killed, 2, p)
    ranks = children(p.pid)
    if len(ranks) != 2:
        fail(f"expected 2 rank processes under the launcher, found {ranks}")
    t_kill = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    try:
        rc = p.wait(timeout=90)
    except subprocess.TimeoutExpired:
        p.kill()
        fail("the job still ran 90 s after rank 1 was killed")
    took = time.time() - t_kill
    text = open(killed + ".log").read()
    if rc == 0 or "rank 1 was killed by signal" not in text or "ft: error (rank 0): [dist]" not in text:
        fail(f"killed rank: status {rc}\n{text[-2000:]}")
    print(f"killed rank: job ended with status {rc} {took:.1f} s after SIGKILL of rank 1")

    # 4. a hung rank: rank 0 gives up after dist.timeout_s
    hung = os.path.join(work, "hung")
    timeout_s = 8
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(29000 + os.getpid() % 1000))
        procs.append(subprocess.Popen([ft, "train", cfg] + endless + extra + ["data.batch_size=2",
                                      f"dist.timeout_s={timeout_s}", f"output_dir={hung}"], env=e,
                                      stdout=open(f"{hung}-{rank}.log", "w"), stderr=subprocess.STDOUT))
    wait_for_steps(hung, 2, procs[0])
    t_stop = time.time()
    os.kill(procs[1].pid, signal.SIGSTOP)
    try:
        rc = procs[0].wait(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        fail(f"rank 0 still ran {timeout_s + 60} s after rank 1 hung")
    took = time.time() - t_stop
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    text = open(f"{hung}-0.log").read()
    if rc == 0 or "ft: error (rank 0): [dist] rank 0" not in text:
        fail(f"hung rank: rank 0 status {rc}\n{text[-2000:]}")
    print(f"hung rank: rank 0 stopped with status {rc} {took:.1f} s after rank 1 froze (timeout {timeout_s} s): "
          + text.strip().splitlines()[-1][:200])
    print("dist_check OK")


if __name__ == "__main__":
    main()
