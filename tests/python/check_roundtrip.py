#!/usr/bin/env python3
"""Checks that Hugging Face transformers loads what libft saved and computes the same thing.

    python tests/python/check_roundtrip.py REF_DIR

For every REF_DIR/<family>/libft_saved written by the C++ parity test: transformers loads it,
every weight equals the original checkpoint's bit for bit, and the logits equal the reference
logits (max |a-b| / max |b| <= 1e-6: same weights, same library, so only summation order may differ).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> int:
    ref_dir = sys.argv[1]
    families = json.load(open(os.path.join(ref_dir, "families.json")))
    checked, failures = 0, []
    for family in families:
        saved = os.path.join(ref_dir, family, "libft_saved")
        if not os.path.isdir(saved):
            failures.append(f"{family}: libft did not save {saved}")
            continue
        # (Gemma 2's soft-capped attention scores: transformers' eager attention; SDPA leaves them uncapped.)
        with open(os.path.join(ref_dir, family, "config.json")) as f:
            eager = {"attn_implementation": "eager"} if json.load(f)["model_type"] == "gemma2" else {}
        original = AutoModelForCausalLM.from_pretrained(os.path.join(ref_dir, family), dtype=torch.float32,
                                                        **eager).eval()
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, **eager).eval()
        a, b = original.state_dict(), reloaded.state_dict()
        if original.config.model_type == "gemma3":  # an image-text model: libft saved its language model
            a = {"model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k: v
                 for k, v in a.items() if not k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
        if a.keys() != b.keys():
            failures.append(f"{family}: keys differ: {sorted(a.keys() ^ b.keys())}")
            continue
        for k in a:
            if not torch.equal(a[k], b[k]):
                failures.append(f"{family}: weight {k} differs after the round trip")
        ref = load_file(os.path.join(ref_dir, family, "reference.safetensors"))
        with torch.no_grad():
            logits = reloaded(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
        valid = ref["attention_mask"].bool()
        err = ((logits[valid] - ref["logits"][valid]).abs().max() / ref["logits"][valid].abs().max()).item()
        if err > 1e-6:
            failures.append(f"{family}: logits of the reloaded model differ, relative error {err:.3g}")
        shards = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))
        print(f"{family:16s} reloaded by transformers from {len(shards)} file(s), logits rel err {err:.2e}")
        checked += 1
    for f in failures:
        print("FAIL:", f)
    print(f"{checked} round trips checked, {len(failures)} failures")
    return 1 if failures or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
