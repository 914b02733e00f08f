#!/usr/bin/env python3
"""benchmarks/gpu_targets.py on a synthetic Google Benchmark JSON file: the ratios it reports and
their PASS/FAIL verdicts, so that the GPU check's summary is right the first time it runs there."""
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(here, "..", "..", "benchmarks", "gpu_targets.py")
sys.path.insert(0, os.path.dirname(script))
import gpu_targets  # noqa: E402


def bench(name, real_time, unit="us", **counters):
    # As Google Benchmark names rows: a MinTime() shows in the name before /real_time.
    suffix = "/min_time:2.000/real_time" if name.startswith("BM_LoraStepCuda") else "/real_time"
    return dict(name=name + suffix, run_type="iteration", real_time=real_time, time_unit=unit, **counters)


data = {"benchmarks": [
    bench("BM_LoraLinear/1/0/0/16/2048", 200.0),  # bare o_proj
    bench("BM_LoraLinear/1/1/0/16/2048", 300.0),  # unfused
    bench("BM_LoraLinear/1/2/0/16/2048", 215.0),  # fused: 1.075x bare, 1.395x faster than unfused
    bench("BM_LoraLinear/1/3/0/16/2048", 260.0),  # QLoRA at T 2048: no target
    bench("BM_LoraLinear/1/4/0/16/2048", 210.0),  # fused, extended GEMM: 1.05x bare, 1.429x faster than unfused
    bench("BM_LoraLinear/1/6/0/16/2048", 206.0),  # extended GEMM and row kernels: 1.03x bare
    bench("BM_LoraLinear/1/0/2/16/8192", 2.0, unit="ms"),
    bench("BM_LoraLinear/1/2/2/16/8192", 2400.0),  # 1.2x bare: FAIL
    bench("BM_LoraLinear/1/3/2/16/8192", 2.6, unit="ms"),  # QLoRA 1.083x LoRA: PASS
    bench("BM_LoraLinear/1/4/2/16/8192", 2.1, unit="ms"),  # extended GEMM: 1.05x bare: PASS
    bench("BM_LoraLinear/1/7/2/16/8192", 2.7, unit="ms"),  # QLoRA, extended GEMM: 1.286x LoRA's: FAIL
    bench("BM_LoraLinear/0/2/0/8/512/0", 700.0),  # CPU: ignored
    bench("BM_LoraLinear/1/0/0/16/2048/1", 180.0),  # bare o_proj as a CUDA graph
    bench("BM_LoraLinear/1/2/0/16/2048/1", 190.0),  # fused as a CUDA graph: 1.056x its own bare row: PASS
    bench("BM_NF4Dequant/1/1", 40.0, **{"GB/s": 2.4e12}),
    bench("BM_DeviceCopy", 60.0, **{"GB/s": 3.0e12}),
    bench("BM_LoraStepCuda/0/1/0/0/0", 100.0, unit="ms", **{"tokens/s": 20000.0, "MFU%": 30.0}),
    bench("BM_LoraStepCuda/1/1/0/0/0", 80.0, unit="ms", **{"tokens/s": 25000.0, "MFU%": 37.5}),
    bench("BM_LoraStepCuda/2/1/0/0/0", 75.0, unit="ms", **{"tokens/s": 26000.0, "MFU%": 39.0}),
    bench("BM_LoraStepCuda/3/1/0/0/0", 74.0, unit="ms", **{"tokens/s": 27000.0, "MFU%": 40.5}),  # row kernels
    bench("BM_LoraStepCuda/4/4/0/0/1", 150.0, unit="ms", **{"tokens/s": 54613.0, "MFU%": 45.0}),  # fused loss
    bench("BM_LoraStepCuda/1/4/1/0/0", 200.0, unit="ms", **{"tokens/s": 40960.0, "MFU%": 41.0}),  # no eager batch 4: no ratio
    bench("BM_LoraStepCuda/6/1/0/0/0", 84.0, unit="ms", **{"tokens/s": 24000.0, "MFU%": 36.0}),  # without the shared input cast
    bench("BM_LoraStepCuda/7/1/0/0/0", 77.0, unit="ms", **{"tokens/s": 26500.0, "MFU%": 39.75}),  # grouped projections
    bench("BM_CrossEntropyCuda/0/8192/128256", 9000.0),
    bench("BM_CrossEntropyCuda/1/8192/128256", 3000.0),  # 3x
    bench("BM_RopeCuda/1/4", 100.0),  # no unfused row: no speed-up
    bench("BM_SwigluCuda/2/2048", 120.0),  # packed [gate | up], ATen's chain
    bench("BM_SwigluCuda/3/2048", 48.0),  # the kernel on the halves in place: 2.5x
    bench("BM_SwigluCuda/3/8192", 190.0),  # no chain row at 8192: no ratio
    bench("BM_LoraLinearDropout/1/2/0/16/2048/0", 300.0),  # dropout 0.1, ATen's kernel
    bench("BM_LoraLinearDropout/1/5/0/16/2048/0", 250.0),  # inside the row kernels: 1.2x
    bench("BM_DoraRowNorm/1/0", 900.0),  # DoRA's norms, W + s B A formed
    bench("BM_DoraRowNorm/1/1", 100.0),  # without: 9x
    bench("BM_LoraOp/21/0/16/2048", 24.0),  # dB, one GEMM
    bench("BM_LoraOp/22/0/16/2048", 12.0),  # dB split over 4 chunks: 2x
    bench("BM_LoraOp/26/0/16/2048", 10.0),  # dA split over 8 chunks, but no single-GEMM dA row: no ratio
    dict(name="BM_DeviceCopy_mean", run_type="aggregate", real_time=1.0, time_unit="us"),
    dict(name="BM_LoraLinear/1/0/1/16/2048/real_time", error_occurred=True, error_message="no CUDA device"),
]}

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "bench.json")
    with open(path, "w") as f:
        json.dump(data, f)
    rows = {text: (value, bound, kind) for text, value, bound, kind in gpu_targets.targets(gpu_targets.load(path))}
    speedups = dict(gpu_targets.opt_ins(gpu_targets.load(path)))
    out = subprocess.run([sys.executable, script, path], capture_output=True, text=True, check=True).stdout

expect = {
    "fused LoRA / bare linear (o_proj 4096->4096, r 16, T 2048)": 1.075,
    "fused LoRA / bare linear (o_proj 4096->4096, r 16, T 2048, CUDA graph)": 190.0 / 180.0,
    "unfused / fused LoRA (o_proj 4096->4096, r 16, T 2048)": 300.0 / 215.0,
    "fused LoRA, extended GEMM, / bare linear (o_proj 4096->4096, r 16, T 2048)": 1.05,
    "unfused / fused LoRA, extended GEMM, (o_proj 4096->4096, r 16, T 2048)": 300.0 / 210.0,
    "fused LoRA, extended GEMM, row kernels, / bare linear (o_proj 4096->4096, r 16, T 2048)": 1.03,
    "unfused / fused LoRA, extended GEMM, row kernels, (o_proj 4096->4096, r 16, T 2048)": 300.0 / 206.0,
    "fused LoRA / bare linear (down_proj 14336->4096, r 16, T 8192)": 1.2,
    "QLoRA / LoRA linear (down_proj 14336->4096, r 16, T 8192)": 2.6 / 2.4,
    "fused LoRA, extended GEMM, / bare linear (down_proj 14336->4096, r 16, T 8192)": 2.1 / 2.0,
    "QLoRA / LoRA linear, extended GEMM (down_proj 14336->4096, r 16, T 8192)": 2.7 / 2.1,
    "NF4 dequantization / device copy bandwidth": 0.8,
    "1.24B LoRA step, fused / unfused tokens/s (batch 1 x 2048)": 1.25,
    "1.24B LoRA step, fused, MFU % (batch 1 x 2048, eager)": 37.5,
    "1.24B LoRA step, fused, extended GEMM / unfused tokens/s (batch 1 x 2048)": 1.3,
    "1.24B LoRA step, fused, extended GEMM, MFU % (batch 1 x 2048, eager)": 39.0,
    "1.24B LoRA step, fused, MFU % (batch 4 x 2048, CUDA graph)": 41.0,
    "1.24B LoRA step, fused, extended GEMM, row kernels, MFU % (batch 4 x 2048, eager, fused loss and rope)": 45.0,
    "1.24B LoRA step, fused, row kernels / unfused tokens/s (batch 1 x 2048)": 1.35,
    "1.24B LoRA step, fused, row kernels, MFU % (batch 1 x 2048, eager)": 40.5,
    "1.24B LoRA step, fused, grouped projections / unfused tokens/s (batch 1 x 2048)": 26500.0 / 20000.0,
    "1.24B LoRA step, fused, grouped projections, MFU % (batch 1 x 2048, eager)": 39.75,
}
assert set(rows) == set(expect), sorted(rows)
for text, value in expect.items():
    assert abs(rows[text][0] - value) < 1e-9, (text, rows[text][0], value)
for line, verdict in [("fused LoRA / bare linear (o_proj 4096->4096, r 16, T 2048)", "PASS"),
                      ("T 2048, CUDA graph)", "PASS"), ("fused LoRA / bare linear (down_proj", "FAIL"),
                      ("QLoRA / LoRA linear (down_proj", "PASS"), ("NF4 dequantization", "PASS"),
                      ("QLoRA / LoRA linear, extended GEMM (down_proj", "FAIL"),
                      ("fused / unfused tokens/s", "FAIL"), ("fused, MFU % (batch 1", "FAIL"), ("MFU % (batch 4 x 2048, CUDA graph)", "PASS"),
                      ("eager, fused loss and rope)", "PASS"),
                      ("fused LoRA, extended GEMM, / bare linear (o_proj", "PASS"),
                      ("extended GEMM / unfused tokens/s", "PASS"), ("extended GEMM, MFU % (batch 1", "FAIL"),
                      ("grouped projections / unfused tokens/s", "PASS"), ("grouped projections, MFU % (batch 1", "FAIL")]:
    hits = [l for l in out.splitlines() if line in l]
    assert len(hits) == 1 and hits[0].strip().startswith(verdict), (line, verdict, out)
assert "gpu targets: 16 of 22 met" in out, out
# The opt-in paths against the defaults they would replace: only pairs measured in the same run.
expect_speedups = {
    "LoRA layer, extended GEMM against the split fused path (o_proj 4096->4096, T 2048)": 215.0 / 210.0,
    "LoRA layer, extended GEMM + row kernels against the split fused path (o_proj 4096->4096, T 2048)": 215.0 / 206.0,
    "LoRA layer, extended GEMM against the split fused path (down_proj 14336->4096, T 8192)": 2.4 / 2.1,
    "QLoRA layer, extended GEMM against QLoRA's split fused path (down_proj 14336->4096, T 8192)": 2.6 / 2.7,
    "fused cross-entropy (kernels.loss) against ATen's (8192/128256)": 3.0,
    "fused SwiGLU on packed [gate | up] halves against ATen's chain (2048)": 2.5,
    "1.24B LoRA step, row kernels against the fused default (batch 1)": 27000.0 / 25000.0,
    "LoRA layer with dropout 0.1, in the row kernels against ATen's dropout (split, o_proj 4096->4096, T 2048)": 1.2,
    "LoRA layer mode 2, without dropout against with dropout 0.1 (o_proj 4096->4096, T 2048)": 300.0 / 215.0,
    "dB = dy^T S split over 4 token chunks (lora.grad_splits 4) against one GEMM (o_proj 4096->4096, T 2048)": 2.0,
    "1.24B LoRA step, the shared input cast (default) against per-projection casts (batch 1)": 25000.0 / 24000.0,
    "1.24B LoRA step, grouped projections against the fused default (batch 1)": 26500.0 / 25000.0,
    "DoRA row norms, adapt::dora_row_norm (default) against forming W + s B A (gate_proj 4096->14336, bf16 W)": 9.0,
}
assert set(speedups) == set(expect_speedups), sorted(speedups)
for text, value in expect_speedups.items():
    assert abs(speedups[text] - value) < 1e-9, (text, speedups[text], value)
assert "opt-in paths against the defaults they would replace" in out and " 3.000x  fused cross-entropy" in out, out

# A file cut short after its third benchmark (a run stopped by the time limit) still gives those.
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "cut.json")
    text = json.dumps(data, indent=2)
    third = 0
    for _ in range(3):
        third = text.index("\n    }", third) + 1
    with open(path, "w") as f:
        f.write(text[: third + 5] + ",\n    {\n      \"name\": \"BM_Lo")
    cut = gpu_targets.load(path)
    assert sorted(cut) == ["BM_LoraLinear/1/0/0/16/2048", "BM_LoraLinear/1/1/0/16/2048", "BM_LoraLinear/1/2/0/16/2048"], sorted(cut)
# Two files (the GPU check's two benchmark calls) are merged: the targets of both come out.
with tempfile.TemporaryDirectory() as d:
    first, second = os.path.join(d, "a.json"), os.path.join(d, "b.json")
    with open(first, "w") as f:
        json.dump({"benchmarks": data["benchmarks"][:4]}, f)
    with open(second, "w") as f:
        json.dump({"benchmarks": data["benchmarks"][4:]}, f)
    both = subprocess.run([sys.executable, script, first, second], capture_output=True, text=True, check=True).stdout
    assert "gpu targets: 16 of 22 met" in both, both
print("gpu targets OK")
