#!/usr/bin/env python3
"""benchmarks/trace_summary.py on a synthetic Kineto trace: the GPU's busy time counts overlapping
kernels once, kernels fall into the right kinds, launches and their host time are counted, and the
top list is ordered by device time; a trace without device events (a CPU run) still summarizes."""
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(here, "..", "..", "benchmarks", "trace_summary.py")
sys.path.insert(0, os.path.dirname(script))
import trace_summary  # noqa: E402


def ev(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 1}


trace = {"traceEvents": [
    ev("cpu_op", "aten::mm", 0.0, 50.0),
    ev("cuda_runtime", "cudaLaunchKernel", 5.0, 4.0),
    ev("cuda_runtime", "cudaLaunchKernel", 20.0, 6.0),
    ev("cuda_runtime", "cudaStreamSynchronize", 30.0, 100.0),  # not a launch
    ev("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 10.0, 400.0),
    ev("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 500.0, 300.0),
    ev("kernel", "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", 300.0, 200.0),  # overlaps the first GEMM by 110
    ev("kernel", "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 800.0, 100.0),
    ev("kernel", "void ft::kernels::(anonymous namespace)::lora_cast_down_kernel<c10::BFloat16, 16>", 900.0, 50.0),
    ev("kernel", "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", 950.0, 25.0),
    ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 975.0, 25.0),
    {"ph": "s", "cat": "ac2g", "name": "flow", "ts": 5.0, "id": 1},  # no duration: ignored
]}

lines = trace_summary.summarize(trace, top=3)
head = lines[0]
# Busy: [10, 410) ∪ [300, 500) ∪ [500, 800) ∪ [800, 900) ∪ [900, 950) ∪ [950, 975) ∪ [975, 1000) = 990 µs of a 1000 µs span.
assert "span 1.00 ms, GPU busy 0.99 ms (99%)" in head, head
assert "6 kernels, 2 launch calls (0.01 ms of host time in them)" in head, head
kinds = lines[1]
# Device time: GEMM 700, elementwise 200, attention 100, libft 50, reduction 25, copy 25 (of 1100).
for part in ["gemm 0.70 ms (64%)", "elementwise 0.20 ms (18%)", "attention 0.10 ms (9%)", "libft 0.05 ms (5%)",
             "reduction/norm 0.03 ms (2%)", "copy/fill 0.03 ms (2%)"]:
    assert part in kinds, (part, kinds)
assert kinds.index("gemm") < kinds.index("elementwise") < kinds.index("attention"), kinds
assert lines[2] == "top 3 of 6 kernels by device time:", lines[2]
assert "x2" in lines[3] and "sm90_xmma_gemm" in lines[3], lines[3]
assert "vectorized_elementwise_kernel" in lines[4] and "flash_fwd_kernel" in lines[5], lines[4:6]
assert trace_summary.union_length([(0, 10), (5, 15), (20, 30)]) == 25

cpu_only = {"traceEvents": [ev("cpu_op", "aten::mm", 0.0, 50.0), ev("cpu_op", "aten::add", 60.0, 40.0)]}
assert trace_summary.summarize(cpu_only)[0].startswith("span 0.10 ms, GPU busy 0.00 ms (0%), 0 kernels"), trace_summary.summarize(cpu_only)

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "t.json")
    with open(path, "w") as f:
        json.dump(trace, f)
    out = subprocess.run([sys.executable, script, path, "--top", "2"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(path + ": span 1.00 ms"), out
    assert "top 2 of 6 kernels" in out, out
    bad = os.path.join(d, "bad.json")
    with open(bad, "w") as f:
        f.write("{")
    out = subprocess.run([sys.executable, script, bad], capture_output=True, text=True, check=True).stdout
    assert "unreadable" in out, out
print("trace summary OK")
