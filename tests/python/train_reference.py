#!/usr/bin/env python3
"""The training loop of `ft train`, written independently in PyTorch + transformers, on the same
model, batches and hyper-parameters, to check libft's losses step by step and to time both.

    train_reference.py RUN_DIR MODEL_DIR BATCHES [--tolerance 1e-3] [--threads N] [--json OUT]
    train_reference.py --make-adapter ADAPTER_DIR MODEL_DIR
    train_reference.py --make-prefix ADAPTER_DIR MODEL_DIR

LoRA runs (mode: lora with lora.init_from) are compared too: the reference wraps the base with PEFT
(PeftModel.from_pretrained(..., is_trainable=True)) from the same initial adapter, which
--make-adapter writes (PEFT's LoraConfig on every projection, rank 8 with down_proj at 4, B
randomised so that the first steps already differ from the base). So are prefix-tuning runs (mode:
prefix with prefix.init_from, from PEFT's PrefixTuningConfig of 8 virtual tokens that --make-prefix
writes): PEFT's forward cannot take the 4-D packing mask, so the reference calls the base model with
PEFT's own prefix cache (get_prompt), a mask with the prefix's columns open to every token, and
positions shifted by the prefix length, as PEFT's forward does.

RUN_DIR is a finished `ft train` run (its config.yaml gives the hyper-parameters, its metrics.jsonl
the losses to compare); MODEL_DIR the Hugging Face checkpoint it started from (model.checkpoint);
BATCHES the `ft batches` export of the same config. The reference:
  - runs the checkpoint's *ForCausalLM (float32, CPU, sdpa) on each micro-batch with position ids that restart per
    packed document and a 4-D boolean mask that keeps attention inside each document;
  - sums token cross-entropies (labels shifted as Hugging Face does) over the step's micro-batches and
    divides by the step's total number of targets, then backward;
  - for a mixture of experts trained with the routers' load-balancing loss (the run's
    model.router_aux_loss_coef, else the config's output_router_logits and router_aux_loss_coef), adds
    coef × transformers' load_balancing_loss_func of each micro-batch (the routers' logits taken by
    forward hooks, the padding left out through a 2-D mask) × its targets before that division, and
    compares the step's target-weighted aux loss with libft's router_aux_loss too;
  - clips by global norm (torch.nn.utils.clip_grad_norm_), AdamW (torch.optim, foreach=False) with
    weight decay on matrices only (not on 1-D parameters or embed_tokens), and the lr of
    transformers' get_{constant,linear,cosine}_schedule_with_warmup.
It prints per-step losses, the largest relative difference, and tokens/s of both loops (libft's
from its metrics; the reference's measured here over the same steps: forward, backward, step).
Exit status 1 when a loss differs by more than the tolerance.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from transformers import get_linear_schedule_with_warmup


def block_causal_mask(segment_ids, window=None):
    """(B, T) document ids (-1 = padding) → (B, 1, T, T) bool, True where attention is allowed; with
    `window`, a query sees the keys less than `window` positions back only (transformers' sliding
    window, which it does not apply to a 4-D mask that it is given)."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if window:
        causal &= ~torch.ones(t, t, dtype=torch.bool).tril(-window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same & causal & (segment_ids[:, :, None] >= 0)
    mask |= torch.eye(t, dtype=torch.bool)  # padding attends to itself only (its labels are ignored)
    return mask[:, None]


def for_attention(model, mask):
    """A boolean mask as the model's attention takes it: eager attention (Gemma 2's, which soft-caps
    the scores) adds its mask to the scores, so it gets 0 and the float32 minimum instead. A dict
    (one mask per layer type) is converted entry by entry."""
    if isinstance(mask, dict):
        return {k: for_attention(model, m) for k, m in mask.items()}
    if model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def uniform_window(model):
    """The attention window of every layer, where a model has one for all (Mistral's, Phi-3's)."""
    config = model.config
    return config.sliding_window if config.model_type in ("mistral", "phi3") else None


def attention_masks(model, segment_ids):
    """The 4-D mask, or for OLMo 3, whose sliding-window layers sit beside global ones, one per layer
    type (Olmo3Model takes such a dict as it is, and again applies no window of its own)."""
    config = model.config
    if config.model_type in ("olmo3", "gpt_oss") and "sliding_attention" in config.layer_types:
        return {"full_attention": block_causal_mask(segment_ids),
                "sliding_attention": block_causal_mask(segment_ids, config.sliding_window)}
    return block_causal_mask(segment_ids, uniform_window(model))


def router_hooks(model, logits):
    """Forward hooks that append each router's logits (the first output of transformers'
    *TopKRouter modules) to `logits`: the decoder's own output_router_logits would also have
    transformers compute the aux loss with the 4-D mask, which its load_balancing_loss_func cannot take."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    assert routers, "no router modules found"
    return [m.register_forward_hook(lambda _m, _inp, out: logits.append(out[0])) for m in routers]


def aux_loss(model, logits, segment_ids):
    config = model.config
    base = model.get_base_model() if getattr(model, "peft_config", None) else model
    lb = sys.modules[type(base).__module__].load_balancing_loss_func
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return lb(tuple(logits), experts, config.num_experts_per_tok, (segment_ids >= 0).long())


def loss_sum(model, input_ids, labels, position_ids, segment_ids):
    mask = attention_masks(model, segment_ids)
    if getattr(model, "peft_config", None) and model.active_peft_config.peft_type == "PREFIX_TUNING":
        assert not isinstance(mask, dict), "prefix tuning with one mask per layer type is not built here"
        p = model.active_peft_config.num_virtual_tokens
        b, _, t, _ = mask.shape
        mask = torch.cat([torch.ones(b, 1, t, p, dtype=torch.bool), mask], dim=3)
        base = model.get_base_model()
        logits = base(input_ids=input_ids, position_ids=position_ids + p, attention_mask=for_attention(base, mask),
                      past_key_values=model.get_prompt(b), use_cache=True).logits
    else:
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=for_attention(model, mask)).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def make_adapter(adapter_dir, model_dir):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    # Every projection (Phi-3's are packed: qkv_proj and gate_up_proj); of a mixture of experts, the
    # attention's, as transformers 5 keeps its experts in 3-D parameters, not linear layers that PEFT
    # adapts by name.
    targets = (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if model.config.model_type == "phi3" else
               ["q_proj", "k_proj", "v_proj", "o_proj"] if model.config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss") else
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # (LORA_BIAS=all or lora_only in the environment: PEFT's bias option, the base's biases trained too)
    # (LORA_EXPERTS=1: a mixture of experts' expert weights too, through PEFT's target_parameters)
    parameters = (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if os.environ.get("LORA_EXPERTS") == "1"
                  else None)
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, rank_pattern={"down_proj": 4},
                        target_modules=targets, bias=os.environ.get("LORA_BIAS", "none"),
                        target_parameters=parameters)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(adapter_dir)
    print(f"wrote a PEFT LoRA adapter for {model_dir} to {adapter_dir}")


def make_prefix(adapter_dir, model_dir):
    from peft import PrefixTuningConfig, get_peft_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    peft_model.save_pretrained(adapter_dir)
    print(f"wrote a PEFT prefix-tuning adapter for {model_dir} to {adapter_dir}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--make-adapter":
        return make_adapter(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "--make-prefix":
        return make_prefix(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("model_dir")
    ap.add_argument("batches")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--speed-only", action="store_true",
                    help="LoRA with dropout: the two loops draw different dropout masks, so only the speed is "
                         "compared (PEFT runs with the run's lora.dropout)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    with open(os.path.join(a.run_dir, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    mode = cfg.get("mode", "full")
    if cfg["device"] != "cpu" or cfg["dtype"] != "float32" or mode not in ("full", "lora", "prefix"):
        sys.exit("train_reference: only float32 CPU runs of mode full, lora or prefix are compared")
    libft = [json.loads(line) for line in open(os.path.join(a.run_dir, "metrics.jsonl"), encoding="utf-8")]
    libft_train = [r for r in libft if r["type"] == "train"]
    if any(r["type"] == "skip" for r in libft):
        sys.exit("train_reference: the libft run skipped steps; pick a run without non-finite steps")
    steps = cfg["max_steps"]

    batches = load_file(a.batches)
    n_steps, accum = batches["input_ids"].shape[:2]
    if n_steps < steps or accum != cfg["data"]["grad_accum"]:
        sys.exit(f"train_reference: {a.batches} holds {n_steps} steps × {accum}; the run needs {steps} × "
                 f"{cfg['data']['grad_accum']}")

    # (Gemma 2: transformers' eager attention, the one that soft-caps the scores; SDPA leaves them uncapped.)
    with open(os.path.join(a.model_dir, "config.json"), encoding="utf-8") as f:
        attn = "eager" if json.load(f)["model_type"] in ("gemma2", "gpt_oss") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.float32, attn_implementation=attn)
    if mode == "lora":
        from peft import PeftModel
        init_from = cfg["lora"].get("init_from")
        dropout = float(cfg["lora"]["dropout"])
        if not init_from or (dropout != 0.0 and not a.speed_only):
            sys.exit("train_reference: LoRA runs are compared from lora.init_from with dropout 0 (or --speed-only)")
        model = PeftModel.from_pretrained(model, init_from, is_trainable=True)
        if dropout != 0.0:  # the run's dropout (PEFT made the adapter's dropout an Identity)
            for module in model.modules():
                if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
                    for key in list(module.lora_dropout.keys()):
                        module.lora_dropout[key] = torch.nn.Dropout(p=dropout)
    if mode == "prefix":
        # PEFT refuses to load a prompt-learning adapter as trainable: build the same config and load
        # the saved table into it (PEFT's set_peft_model_state_dict, as from_pretrained does).
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        init_from = cfg["prefix"].get("init_from")
        if not init_from:
            sys.exit("train_reference: prefix runs are compared from prefix.init_from")
        prefix_config = PeftConfig.from_pretrained(init_from)
        prefix_config.inference_mode = False
        model = get_peft_model(model, prefix_config)
        set_peft_model_state_dict(model, load_file(os.path.join(init_from, "adapter_model.safetensors")))
    model.train()
    opt_cfg = cfg["optimizer"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": float(opt_cfg["weight_decay"])},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if opt_cfg["name"] != "adamw":
        sys.exit("train_reference: only adamw is compared")
    # float(): PyYAML reads YAML 1.1, where "1e-08" (no dot) is a string.
    optimizer = torch.optim.AdamW(groups, lr=float(opt_cfg["lr"]), betas=tuple(float(b) for b in opt_cfg["betas"]),
                                  eps=float(opt_cfg["eps"]), foreach=False)
    sched_cfg = cfg["schedule"]
    make = {"constant": lambda o, w, t: get_constant_schedule_with_warmup(o, w),
            "linear": get_linear_schedule_with_warmup,
            "cosine": get_cosine_schedule_with_warmup}[sched_cfg["name"]]
    scheduler = make(optimizer, sched_cfg["warmup_steps"], sched_cfg["total_steps"])
    clip = float(cfg["clip_grad_norm"])

    aux_coef = cfg["model"].get("router_aux_loss_coef")
    if aux_coef is None:
        aux_coef = model.config.router_aux_loss_coef if getattr(model.config, "output_router_logits", False) else 0.0
    aux_coef = float(aux_coef)
    router_logits = []
    if aux_coef > 0:
        router_hooks(model, router_logits)
        print(f"routers' load-balancing loss x {aux_coef:g} (transformers' load_balancing_loss_func)")

    losses, aux_losses, tokens, seconds = [], [], 0, 0.0
    for s in range(steps):
        start = time.perf_counter()
        micro = [{k: batches[k][s, m] for k in ("input_ids", "labels", "position_ids", "segment_ids")}
                 for m in range(accum)]
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total, aux_total = 0.0, 0.0
        for b in micro:
            router_logits.clear()
            loss = loss_sum(model, **b)
            total += loss.item()
            objective = loss
            if aux_coef > 0:
                n_b = int((b["labels"][:, 1:] != -100).sum())
                aux = aux_loss(model, router_logits, b["segment_ids"]) * n_b
                aux_total += aux.item()
                objective = loss + aux_coef * aux
            (objective / n_targets).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        tokens += sum(int((b["segment_ids"] >= 0).sum()) for b in micro)
        losses.append(total / n_targets)
        aux_losses.append(aux_total / n_targets)

    worst = 0.0
    print(f"{'step':>4} {'libft':>12} {'reference':>12} {'rel diff':>10}")
    for s, (mine, ref) in enumerate(zip((r["loss"] for r in libft_train), losses), 1):
        rel = abs(mine - ref) / abs(ref)
        worst = max(worst, rel)
        print(f"{s:4d} {mine:12.6f} {ref:12.6f} {rel:10.2e}")
    if aux_coef > 0:
        print(f"{'step':>4} {'libft aux':>12} {'reference':>12} {'rel diff':>10}")
        for s, (r, ref) in enumerate(zip(libft_train, aux_losses), 1):
            mine = r.get("router_aux_loss")
            if mine is None:
                print(f"train reference: libft's step {s} has no router_aux_loss", file=sys.stderr)
                worst = math.inf
                continue
            rel = abs(mine - ref) / abs(ref)
            worst = max(worst, rel)
            print(f"{s:4d} {mine:12.6f} {ref:12.6f} {rel:10.2e}")
    libft_tps = sum(r["tokens"] for r in libft_train) / sum(r["step_time_s"] for r in libft_train)
    ref_tps = tokens / seconds
    print(f"largest relative loss difference over {steps} steps: {worst:.2e} (tolerance {a.tolerance:g})")
    print(f"tokens/s: libft {libft_tps:.0f}, PyTorch reference {ref_tps:.0f}, ratio {libft_tps / ref_tps:.2f}x "
          f"({torch.get_num_threads()} threads)")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"steps": steps, "max_rel_diff": worst, "libft_tokens_per_s": libft_tps,
                       "reference_tokens_per_s": ref_tps, "threads": torch.get_num_threads()}, f)
    if a.speed_only:
        print("train reference: speed only (the dropout masks differ, so the losses are not compared)")
        return
    if len(libft_train) != steps or not worst <= a.tolerance or not math.isfinite(worst):
        print("train reference: FAILED", file=sys.stderr)
        sys.exit(1)
    print("train reference OK")


if __name__ == "__main__":
    main()
