#!/usr/bin/env python3
"""Data-parallel scaling on paper: predicted step time and scaling efficiency of libft's data-parallel
design (issue 8) for full fine-tuning and LoRA of 1B and 7B Llama models, on 8 GPUs in one node
(NVLink) and on 2-16 nodes of 8 GPUs (InfiniBand). No GPU is needed; every assumption is a named
constant below, and changing one changes the table.

    python3 benchmarks/dp_scaling.py            # Markdown tables (benchmarks/RESULTS.md has a copy)

The model of one optimizer step per GPU:
  compute   = tokens_per_gpu x flops_per_token / (peak x MFU)
              flops_per_token = 6 N for full fine-tuning (forward 2N, backward 4N), 4 N for LoRA
              (forward 2N, input gradients 2N; the adapters' own FLOPs are below 1%)
  traffic   = ring all-reduce of the trainable gradients, float32:
              2 (n - 1) / n x bytes / bus_bandwidth, where the bus bandwidth is NVLink's inside a
              node and one 400 Gb/s NIC per GPU between nodes (NCCL's ring runs at the slowest link)
  overlap   = buckets are all-reduced from autograd hooks as their gradients become ready, so the
              traffic of all buckets but the last hides behind the rest of the LAST micro-step's
              backward pass (earlier micro-steps of an accumulation do not communicate)
  exposed   = max(traffic - hideable, last bucket's traffic), hideable = backward of one micro-step
              minus the time to fill the first bucket
  efficiency = compute / (compute + exposed)
"""

PEAK_BF16 = 989e12        # H100 SXM dense bf16 FLOP/s
MFU = 0.40                # model FLOP utilisation of the single-GPU step (assumed, typical for 1-7B)
NVLINK_BUS = 370e9        # NCCL all-reduce bus bandwidth inside an H100 node (B/s, measured order)
IB_BUS = 45e9             # per GPU between nodes: one 400 Gb/s NIC at ~90%
BUCKET = 25 * 2**20       # bytes per gradient bucket (PyTorch DDP's default)
GRAD_BYTES = 4            # float32 gradients (libft keeps float32 master weights and gradients)
MICRO_TOKENS = 8 * 2048   # tokens per GPU per micro-step
MODELS = {"1B": 1.24e9, "7B": 6.74e9}                     # Llama 3.2 1B, Llama 2 7B
LORA_PARAMS = {"1B": 11.3e6, "7B": 40.0e6}               # r 16 on every linear layer but the head
HBM = 80e9


def step(model, mode, gpus, accum):
    n = MODELS[model]
    trainable = n if mode == "full" else LORA_PARAMS[model]
    per_token = (6 if mode == "full" else 4) * n
    micro = MICRO_TOKENS * per_token / (PEAK_BF16 * MFU)
    compute = accum * micro
    backward = micro * (4 / 6 if mode == "full" else 2 / 4)
    bus = NVLINK_BUS if gpus <= 8 else IB_BUS
    nbytes = trainable * GRAD_BYTES
    traffic = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * nbytes / bus
    last = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * min(BUCKET, nbytes) / bus
    fill = backward * min(BUCKET, nbytes) / nbytes
    exposed = max(traffic - (backward - fill), last)
    return compute, traffic, exposed, compute / (compute + exposed)


def memory(model, mode):
    """Bytes per GPU for weights + gradients + AdamW state, without and with ZeRO-1/2 sharding."""
    n = MODELS[model]
    if mode == "full":
        return 16 * n  # float32 weights 4, gradients 4, AdamW moments 8
    return 2 * n + 16 * LORA_PARAMS[model]  # bf16 frozen base + float32 adapter state


def main():
    print("| model | mode | GPUs | accumulation | compute (s) | all-reduce (s) | exposed (s) | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in MODELS:
        for mode in ("full", "lora"):
            for gpus in (8, 16, 128):
                for accum in (1, 4):
                    c, t, e, eff = step(model, mode, gpus, accum)
                    print(f"| {model} | {mode} | {gpus} | {accum} | {c:.3f} | {t:.3f} | {e:.3f} | {100 * eff:.1f}% |")
    print()
    print("| model | mode | weights + gradients + AdamW per GPU | fits 80 GB? | with ZeRO-1 on 8 GPUs (optimizer state sharded) | with ZeRO-2 (and gradients) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, n in MODELS.items():
        for mode in ("full", "lora"):
            m = memory(model, mode)
            z1 = (8 * n / 8 + 8 * n) if mode == "full" else m
            z2 = (8 * n / 8 + 4 * n / 8 + 4 * n) if mode == "full" else m
            print(f"| {model} | {mode} | {m / 1e9:.1f} GB | {'yes' if m < 0.8 * HBM else 'no'} | {z1 / 1e9:.1f} GB | {z2 / 1e9:.1f} GB |")


if __name__ == "__main__":
    main()
