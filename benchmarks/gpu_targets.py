#!/usr/bin/env python3
"""The kernels issue's targets, read from bench_model's Google Benchmark JSON output.

    build-gpu/benchmarks/bench_model --benchmark_out=bench.json --benchmark_out_format=json
    python3 benchmarks/gpu_targets.py bench.json [more.json ...]   # several runs' files are merged

Prints one line per target with the measured ratio and PASS/FAIL (or "missing" where the run has
no such benchmark, e.g. on a machine without a GPU), then the speed-up of each opt-in path (the
extended GEMM, the row kernels, the model's fused kernels) against the default it would replace.
scripts/gpu-check.sh runs it last.

Targets (issue 7; all times from the same run):
  - fused LoRA linear fwd+bwd <= 1.10x the bare frozen linear (x W^T forward, dy W backward);
  - fused LoRA linear >= 1.25x faster than the unfused (PEFT-style) chain;
  - QLoRA linear <= 1.15x the bf16 LoRA linear at T >= 4096;
  - NF4 -> bf16 dequantization >= 75% of the device-to-device copy bandwidth (bytes read + written);
  - a LoRA training step of a 1.24B Llama-shaped model >= 1.3x faster fused than unfused, MFU >= 40%
    (batches of 1 and 4 sequences of 2048 tokens; the fused path eager and as a CUDA graph).
"""
import json
import re
import sys

LAYERS = {0: "o_proj 4096->4096", 1: "gate_proj 4096->14336", 2: "down_proj 14336->4096"}
MODES = {0: "bare", 1: "unfused", 2: "fused", 3: "qlora", 4: "fused, extended GEMM", 5: "fused, row kernels",
         6: "fused, extended GEMM, row kernels"}


def load(path):
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        # Google Benchmark writes each result as it finishes: a run cut short (the GPU check's time
        # limit) leaves a file whose complete entries are still worth reading.
        end = text.rfind("\n    }")
        if end < 0:
            raise
        data = json.loads(text[: end + len("\n    }")] + "\n  ]\n}")
    runs = {}
    for b in data.get("benchmarks", []):
        if b.get("error_occurred") or b.get("run_type") == "aggregate":
            continue
        # The row's arguments only: Google Benchmark appends "/min_time:2.000", "/real_time" and the like.
        runs[re.sub(r"(/[a-z_]+:[^/]*|/real_time)+$", "", b["name"])] = b
    return runs


def seconds(b):
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def targets(runs):
    """(description, value, bound, kind) tuples; kind "max" passes when value <= bound."""
    out = []
    # BM_LoraLinear/1/<mode>/<layer>/<rank>/<tokens>[/<graph>]: eager rows, and rows replayed as CUDA
    # graphs (the GPU's time without the host's per-operation cost), each compared with its own kind.
    linear = {}
    for name, b in runs.items():
        m = re.fullmatch(r"BM_LoraLinear/1/(\d)/(\d)/(\d+)/(\d+)(?:/([01]))?", name)
        if m:
            mode, layer, rank, tokens = map(int, m.groups()[:4])
            linear[(int(m.group(5) or 0), mode, layer, rank, tokens)] = seconds(b)
    bare = {(graph, layer, tokens): t for (graph, mode, layer, rank, tokens), t in linear.items() if mode == 0}
    for (graph, mode, layer, rank, tokens), t in sorted(linear.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][4], kv[0][3], kv[0][1])):
        where = f"{LAYERS[layer]}, r {rank}, T {tokens}" + (", CUDA graph" if graph else "")
        # Modes 4-6: the fused layer with the extended GEMM (adapt::set_lora_extended_gemm), the row
        # kernels (adapt::set_lora_row_kernels), and both, beside mode 2.
        what = {2: "fused LoRA", 4: "fused LoRA, extended GEMM,", 5: "fused LoRA, row kernels,",
                6: "fused LoRA, extended GEMM, row kernels,"}.get(mode)
        if what and (graph, layer, tokens) in bare:
            out.append((f"{what} / bare linear ({where})", t / bare[(graph, layer, tokens)], 1.10, "max"))
        if what and (graph, 1, layer, rank, tokens) in linear:
            out.append((f"unfused / {what} ({where})", linear[(graph, 1, layer, rank, tokens)] / t, 1.25, "min"))
        # QLoRA (3; 7 and 8: through the extended GEMM, without and with the row kernels) against
        # the bf16 LoRA layer on the same path (2; 4; 6).
        lora_mode = {3: 2, 7: 4, 8: 6}.get(mode)
        if lora_mode and tokens >= 4096 and (graph, lora_mode, layer, rank, tokens) in linear:
            path = {3: "", 7: ", extended GEMM", 8: ", extended GEMM, row kernels"}[mode]
            out.append((f"QLoRA / LoRA linear{path} ({where})", t / linear[(graph, lora_mode, layer, rank, tokens)], 1.15, "max"))
    nf4, copy = runs.get("BM_NF4Dequant/1/1"), runs.get("BM_DeviceCopy")
    if nf4 and copy:
        out.append(("NF4 dequantization / device copy bandwidth", nf4["GB/s"] / copy["GB/s"], 0.75, "min"))
    # BM_LoraStepCuda/<fused>/<batch>/<graph>/<loss chunk>/<fused loss and rope>: the speed-up at each batch size (eager),
    # and the MFU of every fused row (2: with the extended GEMM, 3: row kernels, 4: both, 5: and the
    # adapter gradients split over token chunks), all with the whole logits.
    kinds = {1: "fused", 2: "fused, extended GEMM", 3: "fused, row kernels", 4: "fused, extended GEMM, row kernels",
             5: "fused, extended GEMM, row kernels, split adapter gradients", 7: "fused, grouped projections",
             8: "fused, extended GEMM, row kernels, grouped projections"}
    for batch in (1, 4):
        for kind, what in kinds.items():
            unfused, fused = runs.get(f"BM_LoraStepCuda/0/{batch}/0/0/0"), runs.get(f"BM_LoraStepCuda/{kind}/{batch}/0/0/0")
            if unfused and fused:
                out.append((f"1.24B LoRA step, {what} / unfused tokens/s (batch {batch} x 2048)",
                            fused["tokens/s"] / unfused["tokens/s"], 1.3, "min"))
    for batch in (1, 4):
        for graph in (0, 1):
            for kind, what in kinds.items():
                for loss in (0, 1):
                    fused = runs.get(f"BM_LoraStepCuda/{kind}/{batch}/{graph}/0/{loss}")
                    if fused:
                        how = ("CUDA graph" if graph else "eager") + (", fused loss and rope" if loss else "")
                        out.append((f"1.24B LoRA step, {what}, MFU % (batch {batch} x 2048, {how})", fused["MFU%"], 40.0, "min"))
    return out


def opt_ins(runs):
    """(description, speed-up) of each opt-in path against the default it would replace, from rows
    of the same run: > 1 means the opt-in is faster. Which defaults to flip, once their tests pass."""
    out = []
    linear = {}
    for name, b in runs.items():
        m = re.fullmatch(r"BM_LoraLinear/1/(\d)/(\d)/16/(\d+)(?:/([01]))?", name)
        if m:
            mode, layer, tokens = map(int, m.groups()[:3])
            linear[(mode, layer, tokens, int(m.group(4) or 0))] = seconds(b)
    split, qsplit = "the split fused path", "QLoRA's split fused path"
    pairs = [(5, 2, "LoRA layer, row kernels", split), (4, 2, "LoRA layer, extended GEMM", split),
             (6, 2, "LoRA layer, extended GEMM + row kernels", split), (7, 3, "QLoRA layer, extended GEMM", qsplit),
             (8, 3, "QLoRA layer, extended GEMM + row kernels", qsplit)]
    for (mode, layer, tokens, graph), t in sorted(linear.items(), key=lambda kv: (kv[0][3], kv[0][1], kv[0][2], kv[0][0])):
        for new, old, what, against in pairs:
            if mode == new and (old, layer, tokens, graph) in linear:
                where = f"{LAYERS[layer]}, T {tokens}" + (", CUDA graph" if graph else "")
                out.append((f"{what} against {against} ({where})", linear[(old, layer, tokens, graph)] / t))
    # Dropout 0.1 (BM_LoraLinearDropout): inside the row kernels against ATen's dropout kernel, and
    # what dropout costs each path against its own row without it.
    for name, b in sorted(runs.items()):
        m = re.fullmatch(r"BM_LoraLinearDropout/1/(\d)/(\d)/16/(\d+)/0", name)
        if not m:
            continue
        mode, layer, tokens = map(int, m.groups())
        where = f"{LAYERS[layer]}, T {tokens}"
        for new, old, what in [(5, 2, "split"), (6, 4, "extended GEMM")]:
            base = runs.get(f"BM_LoraLinearDropout/1/{old}/{layer}/16/{tokens}/0")
            if mode == new and base:
                out.append((f"LoRA layer with dropout 0.1, in the row kernels against ATen's dropout ({what}, {where})",
                            seconds(base) / seconds(b)))
        plain = linear.get((mode, layer, tokens, 0))
        if plain:
            out.append((f"LoRA layer mode {mode}, without dropout against with dropout 0.1 ({where})", seconds(b) / plain))
    # The adapter gradients split over token chunks (lora.grad_splits; BM_LoraOp 22, 23 and 25, 26)
    # against the single GEMM the fused path issues by default (21 and 24).
    for one, splits, what in [(21, ((22, 4), (23, 8)), "dB = dy^T S"), (24, ((25, 4), (26, 8)), "dA = dS^T x")]:
        for name, b in sorted(runs.items()):
            m = re.fullmatch(rf"BM_LoraOp/{one}/(\d)/16/(\d+)", name)
            if not m:
                continue
            layer, tokens = map(int, m.groups())
            for op, n in splits:
                row = runs.get(f"BM_LoraOp/{op}/{layer}/16/{tokens}")
                if row:
                    out.append((f"{what} split over {n} token chunks (lora.grad_splits {n}) against one GEMM "
                                f"({LAYERS[layer]}, T {tokens})", seconds(b) / seconds(row)))
    for bench, what in [("BM_CrossEntropyCuda", "fused cross-entropy (kernels.loss)"), ("BM_RopeCuda", "fused rotary embedding (kernels.rope)"),
                        ("BM_SwigluCuda", "fused SwiGLU (kernels.swiglu)")]:
        for name, b in sorted(runs.items()):
            m = re.fullmatch(bench + r"/1/(\d+)(/\d+)?", name)
            base = runs.get(bench + "/0/" + name[len(bench) + 3:]) if m else None
            if m and base:
                out.append((f"{what} against ATen's ({name[len(bench) + 3:]})", seconds(base) / seconds(b)))
    for name, b in sorted(runs.items()):  # the kernel on a packed [gate | up]'s halves (grouped projections)
        m = re.fullmatch(r"BM_SwigluCuda/3/(\d+)", name)
        base = runs.get(f"BM_SwigluCuda/2/{m.group(1)}") if m else None
        if m and base:
            out.append((f"fused SwiGLU on packed [gate | up] halves against ATen's chain ({m.group(1)})",
                        seconds(base) / seconds(b)))
    for batch in (1, 4):
        for graph in (0, 1):
            base = runs.get(f"BM_LoraStepCuda/1/{batch}/{graph}/0/0")
            how = f"batch {batch}" + (", CUDA graph" if graph else "")
            for kind, loss, what in [(3, 0, "row kernels"), (4, 0, "extended GEMM + row kernels"), (1, 1, "model kernels"),
                                     (4, 1, "every opt-in"), (5, 1, "every opt-in, adapter gradients in 4 token chunks")]:
                row = runs.get(f"BM_LoraStepCuda/{kind}/{batch}/{graph}/0/{loss}")
                if base and row:
                    out.append((f"1.24B LoRA step, {what} against the fused default ({how})", row["tokens/s"] / base["tokens/s"]))
            # Grouped projections (lora.group_projections; rows 7 and 8) against the same paths without;
            # the last with the model's fused kernels on both sides (the SwiGLU kernel then reads the
            # grouped [gate | up]'s halves in place).
            for kind, loss, against, what in [(7, 0, 1, "grouped projections against the fused default"),
                                               (8, 0, 4, "grouped projections with the extended GEMM and row kernels "
                                                         "against those alone"),
                                               (8, 1, 4, "grouped projections with every opt-in against every opt-in")]:
                row, other = runs.get(f"BM_LoraStepCuda/{kind}/{batch}/{graph}/0/{loss}"), runs.get(
                    f"BM_LoraStepCuda/{against}/{batch}/{graph}/0/{loss}")
                if row and other:
                    out.append((f"1.24B LoRA step, {what} ({how})", row["tokens/s"] / other["tokens/s"]))
            # The model's shared input cast (on by default) against per-projection casts (row 6).
            unshared = runs.get(f"BM_LoraStepCuda/6/{batch}/{graph}/0/0")
            if base and unshared:
                out.append((f"1.24B LoRA step, the shared input cast (default) against per-projection casts ({how})",
                            base["tokens/s"] / unshared["tokens/s"]))
    # DoRA's row norms without forming W + s B A (adapt::dora_row_norm, the default) against forming it.
    formed, formula = runs.get("BM_DoraRowNorm/1/0"), runs.get("BM_DoraRowNorm/1/1")
    if formed and formula:
        out.append(("DoRA row norms, adapt::dora_row_norm (default) against forming W + s B A "
                    "(gate_proj 4096->14336, bf16 W)", seconds(formed) / seconds(formula)))
    return out


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    runs = {}
    for path in argv[1:]:
        try:
            runs.update(load(path))
        except (OSError, ValueError) as e:  # no file, or one cut short (a benchmark that crashed or timed out)
            print(f"gpu targets: missing ({path}: {e})")
    rows = targets(runs)
    if not rows:
        print("gpu targets: missing (no CUDA benchmark in " + " ".join(argv[1:]) + ")")
        return 0
    failed = 0
    for text, value, bound, kind in rows:
        ok = value <= bound if kind == "max" else value >= bound
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {text}: {value:.3f} ({'<=' if kind == 'max' else '>='} {bound})")
    speedups = opt_ins(runs)
    if speedups:
        print("opt-in paths against the defaults they would replace (speed-up, same run; > 1: faster):")
        for text, value in speedups:
            print(f"  {value:6.3f}x  {text}")
    print(f"gpu targets: {len(rows) - failed} of {len(rows)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
