#!/usr/bin/env python3
"""Where a traced step's time went, from a Kineto (chrome://tracing) trace.

    python3 benchmarks/trace_summary.py TRACE.json [TRACE.json ...] [--top N]

bench_model writes one trace per benchmark row with LIBFT_BENCH_PROFILE=DIR, and the GPU check
brings them back as profiles.tar.gz. For each trace this prints:
  - the step's span, the GPU's busy time (the union of its kernels, copies and fills, so that
    overlapping streams are not counted twice) and its idle share;
  - the number of kernels, and of launch calls with the host time spent in them;
  - the device time by kind of kernel: GEMM, attention, libft's own kernels, elementwise,
    reductions and norms, optimizer, copies and fills, other;
  - the N kernels with the most device time, by name.
A step whose GPU is idle for much of its span waits on the host (per-operation cost, which CUDA
graphs remove); a step that is busy spends its time in the kinds listed.
"""
import json
import re
import sys

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
LAUNCH_NAMES = re.compile(r"cudaLaunchKernel|cuLaunchKernel|cudaLaunchCooperativeKernel|cudaGraphLaunch|cudaMemcpyAsync|cudaMemsetAsync")

# First match wins, in this order.
KINDS = [
    ("libft", re.compile(r"ft::kernels|lora_cast_down|lora_up_add|cross_entropy_(forward|backward)_kernel|rope_kernel|"
                         r"swiglu_(forward|backward)_kernel|nf4_dequantize|rmsnorm_forward", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    ("gemm", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitKreduce|sm\d+_.*mma", re.I)),
    ("optimizer", re.compile(r"multi_tensor_apply|adam|sgd", re.I)),
    ("reduction/norm", re.compile(r"reduce|softmax|norm|nll_loss|cross_entropy|logsumexp|cumsum", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|CatArrayBatchedCopy|copy|fill|index|where|"
                               r"cat_|gather|scatter|dropout|silu|mul|add", re.I)),
]


def kind_of(event):
    if event.get("cat") in ("gpu_memcpy", "gpu_memset"):
        return "copy/fill"
    for name, pattern in KINDS:
        if pattern.search(event.get("name", "")):
            return name
    return "other"


def union_length(intervals):
    """Total length covered by [start, end) intervals (overlaps counted once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def short(name, width=90):
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize(trace, top=8):
    """Lines describing one trace (a dict with "traceEvents")."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e and "ts" in e]
    if not events:
        return ["no timed events"]
    start = min(float(e["ts"]) for e in events)
    end = max(float(e["ts"]) + float(e["dur"]) for e in events)
    span = end - start
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    busy = union_length([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device])
    launches = [e for e in events if e.get("cat") in LAUNCH_CATS and LAUNCH_NAMES.search(e.get("name", ""))]
    launch_us = sum(float(e["dur"]) for e in launches)
    kernels = sum(1 for e in device if e.get("cat") == "kernel")
    lines = [f"span {span / 1e3:.2f} ms, GPU busy {busy / 1e3:.2f} ms ({100 * busy / span if span else 0:.0f}%), "
             f"{kernels} kernels, {len(launches)} launch calls ({launch_us / 1e3:.2f} ms of host time in them)"]
    if not device:
        return lines
    device_us = sum(float(e["dur"]) for e in device)
    by_kind = {}
    for e in device:
        k = kind_of(e)
        by_kind[k] = by_kind.get(k, 0.0) + float(e["dur"])
    lines.append("by kind: " + ", ".join(f"{k} {t / 1e3:.2f} ms ({100 * t / device_us:.0f}%)"
                                         for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    by_name = {}
    for e in device:
        t, n = by_name.get(e["name"], (0.0, 0))
        by_name[e["name"]] = (t + float(e["dur"]), n + 1)
    lines.append(f"top {min(top, len(by_name))} of {len(by_name)} kernels by device time:")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {t / 1e3:8.2f} ms {100 * t / device_us:4.0f}% x{n:<5d} {short(name)}")
    return lines


def main(argv):
    top = 8
    paths = []
    args = iter(argv[1:])
    for a in args:
        if a == "--top":
            top = int(next(args))
        else:
            paths.append(a)
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        try:
            with open(path) as f:
                trace = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        lines = summarize(trace, top)
        print(f"{path}: {lines[0]}")
        for line in lines[1:]:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
