#!/usr/bin/env python3
"""LoRA and prefix-tuning adapters between libft and Hugging Face PEFT, both directions.

    peft_interop.py make DIR     a small Llama base (transformers), three PEFT LoRA adapters with
                                 non-zero B and two prefix-tuning adapters, saved by PEFT, with the
                                 logits PEFT computes
    peft_interop.py verify DIR   PEFT loads the adapters libft saved (DIR/libft_<name>) onto the
                                 same base and must reproduce libft's logits (max rel error <= 1e-4)

Adapters: "lists" targets seven projections by name with a rank_pattern and an alpha_pattern;
"rslora" targets "all-linear" with use_rslora and gaussian init; "dora" is DoRA (use_dora) on three
projections, with magnitudes moved away from the base's row norms; "saved" trains lm_head and
embed_tokens in full beside q and v adapters (modules_to_save), both moved away from the base's;
"tied" trains embed_tokens of a base whose head is tied to it (DIR/base_tied): PEFT trains a copy
that only the input side reads, and the head keeps the base's weights; "layers" adapts q and v in
layer 1 only (layers_to_transform) and trains both up_proj layers in full, which keeps them out of
the targets; "exclude" adapts all-linear but down_proj and layer 0's q_proj (exclude_modules as a
list), "exclude_re" leaves out layer 1's attention by a regular expression (exclude_modules as a
string); "qwen3" adapts all-linear on a Qwen3 base (DIR/base_qwen3, per-head q/k norms); "gemma3" adapts
all-linear on a Gemma 3 base (DIR/base_gemma3: tanh-GELU, offset norms, a sliding-window layer that the
11 tokens exceed) and "prefix_gemma3" is a plain prefix on it; "gemma2" and "prefix_gemma2" the same on
a Gemma 2 base (DIR/base_gemma2: attention scores and logits soft-capped, caps that bite; transformers'
eager attention, as its SDPA attention leaves the scores uncapped); "phi3" adapts all-linear on a Phi-3
base (DIR/base_phi3: q, k, v packed in qkv_proj and gate, up in gate_up_proj, which PEFT adapts as
one layer each; longrope past 8 positions, which the 11 tokens exceed; 12 of 16 dimensions turning),
"phi3_dora" is DoRA on its two packed projections, and "prefix_phi3" a plain prefix on it; "olmo2" adapts
all-linear on an OLMo 2 base (DIR/base_olmo2: norms on the sublayers' outputs only, q and k normed over all
heads, norm weights moved away from one); "mixtral" adapts the attention's projections on a Mixtral base
(DIR/base_mixtral: four experts, two per token; PEFT's all-linear would reach transformers 5's experts and
routers through target_parameters); "mixtral_experts" adds PEFT's target_parameters on both of its
3-D expert weights (mlp.experts.gate_up_proj and down_proj: nested ParamWrappers, each expert's slice of
an (E·r)-row A); "qwen3_moe_experts" adapts only experts.down_proj (by suffix, rank 6 by rank_pattern) on a
Qwen3-MoE base (DIR/base_qwen3_moe, its second layer dense) beside q_proj and o_proj (PEFT 0.21 turns a
gate_proj, up_proj or down_proj target on such a model into its experts' parameters). libft saves its own "mixtral_experts" with each expert's gate and up A apart (trained
separately), which it writes as gate_up_proj at twice the rank, A stacked and B block-diagonal.
"qwen3_moe_all_linear" is PEFT's all-linear on Qwen3-MoE, which PEFT 0.21 turns into the attention's
modules and the parameters gate_up_proj (at twice the rank), down_proj and the routers' gate.weight (and
the dense layer's MLP is left out), and saves so; "bias_all" and "bias_lora_only" train PEFT's bias option
(every linear layer's bias, or the adapted layers') on a Llama base with every bias (DIR/base_bias);
"gpt_oss_experts" is the OpenAI cookbook's kind of
adapter on a gpt-oss base (DIR/base_gpt_oss: attention sinks, biases, experts whose gate_up_proj
(E, H, 2I) is multiplied from the left and interleaves gate and up): all-linear (the attention) and
target_parameters on both expert weights; "qwen2_moe_all_linear" is PEFT's all-linear on a
Qwen2-MoE base (DIR/base_qwen2_moe, a shared expert behind its gate), which PEFT leaves as it is: every
nn.Linear, the shared expert's MLP and shared_expert_gate included, the experts and routers not.
Prefixes: "prefix" is a plain
table of 5 virtual tokens, "prefix_proj" one made through PEFT's projection MLP (PEFT saves the
table it computes); their logits are also taken for a right-padded batch with an attention mask.
The C++ side (tests/test_lora.cpp PeftInterop.*, tests/test_prefix.cpp PeftPrefixInterop.*) loads
DIR/peft_<name>, compares its logits with PEFT's, and saves its own.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, GptOssConfig,
                          GptOssForCausalLM)

ADAPTERS = {
    "lists": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
    "rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True, init_lora_weights="gaussian"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "saved": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "tied": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    "layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1],
                   layers_pattern="layers", modules_to_save=["mlp.up_proj"]),
    "exclude": dict(r=4, lora_alpha=8, target_modules="all-linear",
                    exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
    "exclude_re": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
                       exclude_modules=r".*layers\.1\.self_attn\..*"),
    "qwen3": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "gemma3": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "gemma2": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "phi3": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "phi3_dora": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], use_dora=True),
    "olmo2": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "mixtral": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mixtral_experts": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "qwen3_moe_experts": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                              target_parameters=["experts.down_proj"], rank_pattern={"down_proj": 6},
                              alpha_pattern={"o_proj": 3}),
    "qwen3_moe_all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "qwen2_moe_all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], bias="lora_only"),
    "gpt_oss_experts": dict(r=4, lora_alpha=8, target_modules="all-linear",
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}
BASES = {"tied": "base_tied", "qwen3": "base_qwen3", "prefix_qwen3": "base_qwen3", "gemma3": "base_gemma3",
         "prefix_gemma3": "base_gemma3", "gemma2": "base_gemma2", "prefix_gemma2": "base_gemma2",
         "phi3": "base_phi3", "phi3_dora": "base_phi3", "prefix_phi3": "base_phi3", "olmo2": "base_olmo2",
         "mixtral": "base_mixtral", "mixtral_experts": "base_mixtral", "qwen3_moe_experts": "base_qwen3_moe",
         "qwen3_moe_all_linear": "base_qwen3_moe", "qwen2_moe_all_linear": "base_qwen2_moe",
         "gpt_oss_experts": "base_gpt_oss", "bias_all": "base_bias", "bias_lora_only": "base_bias"}
# (the others adapt DIR/base)


def base_of(name):
    return BASES.get(name, "base")


def load(path):
    """A checkpoint in transformers; Gemma 2's with the eager attention that soft-caps its scores."""
    with open(os.path.join(path, "config.json")) as f:
        eager = {"attn_implementation": "eager"} if json.load(f)["model_type"] == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(path, **eager).eval()

PREFIXES = {
    "prefix": dict(num_virtual_tokens=5),
    "prefix_proj": dict(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24),
    "prefix_qwen3": dict(num_virtual_tokens=5),
    "prefix_gemma3": dict(num_virtual_tokens=5),
    "prefix_gemma2": dict(num_virtual_tokens=5),
    "prefix_phi3": dict(num_virtual_tokens=5),
}


def rel_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def input_ids():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 97, (2, 11), generator=g)


def make(d):
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                      rms_norm_eps=1e-5)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(os.path.join(d, "base"))
    cfg.tie_word_embeddings = True
    LlamaForCausalLM(cfg).eval().save_pretrained(os.path.join(d, "base_tied"))
    # Qwen3: per-head query and key norms, whose weights are moved away from 1 so that they matter.
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=64, tie_word_embeddings=False,
                                         rms_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for pname, p in qwen3.named_parameters():
            if pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(1 + 0.3 * torch.randn(p.shape))
    qwen3.save_pretrained(os.path.join(d, "base_qwen3"))
    # Gemma 3: norms are offsets from one, initialised at zero: moved away from it so that they matter.
    gemma3 = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=8, max_position_embeddings=64, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"],
                                                rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
                                                eos_token_id=None)).eval()
    with torch.no_grad():
        for pname, p in gemma3.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))
    gemma3.save_pretrained(os.path.join(d, "base_gemma3"))
    # Gemma 2: query and key weights scaled up so that the scores (about 5 at query_pre_attn_scalar
    # 8) reach the cap of 2, and a final cap of 0.3 that the initialisation's small logits reach.
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=8,
                                            attn_logit_softcapping=2.0, final_logit_softcapping=0.3,
                                            rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
                                            eos_token_id=None)).eval()
    with torch.no_grad():
        for pname, p in gemma2.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
    gemma2.save_pretrained(os.path.join(d, "base_gemma2"))
    # Phi-3 (Phi-4-mini's kind): longrope whose original context (8) the 11 tokens exceed (the long
    # factors turn them), 12 of each head's 16 dimensions turning, grouped-query attention.
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      original_max_position_embeddings=8, partial_rotary_factor=0.75,
                                      rope_scaling={"rope_type": "longrope",
                                                    "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 3.0],
                                                    "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0]},
                                      rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
                                      eos_token_id=None)).eval()
    phi3.save_pretrained(os.path.join(d, "base_phi3"))
    olmo2 = Olmo2ForCausalLM(Olmo2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
                                         eos_token_id=None)).eval()
    with torch.no_grad():
        for pname, p in olmo2.named_parameters():
            if pname.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn(p.shape))
    olmo2.save_pretrained(os.path.join(d, "base_olmo2"))
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                               num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                                               pad_token_id=None, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():  # (larger expert and router weights than the 0.02 init: distinct routes per token)
        for pname, p in mixtral.named_parameters():
            if "experts" in pname or pname.endswith("gate.weight"):
                p.copy_(0.2 * torch.randn(p.shape))
    mixtral.save_pretrained(os.path.join(d, "base_mixtral"))
    qwen3_moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                   moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                   mlp_only_layers=[1], max_position_embeddings=64, rms_norm_eps=1e-5,
                                                   pad_token_id=None, bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        for pname, p in qwen3_moe.named_parameters():
            if "experts" in pname or pname.endswith("gate.weight"):
                p.copy_(0.2 * torch.randn(p.shape))
    qwen3_moe.save_pretrained(os.path.join(d, "base_qwen3_moe"))
    qwen2_moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                   moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                                   rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
                                                   eos_token_id=None)).eval()
    with torch.no_grad():
        for pname, p in qwen2_moe.named_parameters():
            if "experts" in pname or "gate.weight" in pname:
                p.copy_(0.2 * torch.randn(p.shape))
    qwen2_moe.save_pretrained(os.path.join(d, "base_qwen2_moe"))
    gpt_oss = GptOssForCausalLM(GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                             max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=None,
                                             bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():  # (experts, router and sinks away from the 0.02 init: distinct routes per token)
        for pname, p in gpt_oss.named_parameters():
            if "experts" in pname or "router" in pname or pname.endswith("sinks"):
                p.copy_(0.2 * torch.randn(p.shape))
    gpt_oss.save_pretrained(os.path.join(d, "base_gpt_oss"))
    # Llama with every bias (attention and MLP), for PEFT's bias = all and lora_only.
    bias_cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True)
    LlamaForCausalLM(bias_cfg).eval().save_pretrained(os.path.join(d, "base_bias"))
    ids = input_ids()
    tensors = {"input_ids": ids}
    for name, kwargs in ADAPTERS.items():
        model = load(os.path.join(d, base_of(name)))
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kwargs))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:  # PEFT starts B at zero: make the adapter do something
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if "lora_magnitude_vector" in pname:  # and DoRA's magnitudes away from the base's norms
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                if ".modules_to_save." in pname:  # and the modules trained in full away from the base's
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
                if pname.endswith("bias") and p.requires_grad:  # and the biases that bias = all/lora_only trains
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(os.path.join(d, f"peft_{name}"))
        with torch.no_grad():
            tensors[f"logits_{name}"] = peft_model(input_ids=ids).logits.contiguous()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # the second row is right-padded
    tensors["attention_mask"] = mask
    for name, kwargs in PREFIXES.items():
        model = load(os.path.join(d, base_of(name)))
        torch.manual_seed(3)
        peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs)).eval()
        peft_model.save_pretrained(os.path.join(d, f"peft_{name}"))
        with torch.no_grad():
            tensors[f"logits_{name}"] = peft_model(input_ids=ids).logits.contiguous()
            tensors[f"logits_padded_{name}"] = peft_model(input_ids=ids, attention_mask=mask).logits.contiguous()
    save_file(tensors, os.path.join(d, "peft_logits.safetensors"))
    print(f"wrote the base, {len(ADAPTERS) + len(PREFIXES)} PEFT adapters and their logits to {d}")


def verify_one(d, ids, name, want, what):
    """PEFT loads DIR/libft_<name> onto the base; returns its max rel error against libft's logits."""
    model = load(os.path.join(d, base_of(name)))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(model, os.path.join(d, f"libft_{name}")).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    err, moved = rel_error(logits, want), rel_error(base_logits, want)
    print(f"{name}: PEFT on libft's {what} vs libft: max rel error {err:.2e} (the {what} moves the logits by "
          f"{moved:.2e})")
    if not err <= 1e-4:
        sys.exit(f"peft_interop: {name}: {err:.2e} > 1e-4")
    if not moved > 1e-2:
        sys.exit(f"peft_interop: {name}: the {what} barely changes the logits ({moved:.2e}); the test proves nothing")
    return err


def verify(d):
    ref = load_file(os.path.join(d, "libft_logits.safetensors"))
    ids = ref["input_ids"]
    worst = max(verify_one(d, ids, name, ref[f"logits_{name}"], "adapter") for name in ADAPTERS)
    ref = load_file(os.path.join(d, "libft_prefix_logits.safetensors"))
    worst = max(worst, *(verify_one(d, ids, name, ref[f"logits_{name}"], "prefix") for name in PREFIXES))
    print(f"peft interop OK (worst {worst:.2e})")


def merged(d):
    """DIR/merged_<name> (ft merge of DIR/peft_<name> into DIR/base) in plain transformers: PEFT's logits."""
    ref = load_file(os.path.join(d, "peft_logits.safetensors"))
    for name in ADAPTERS:
        model = load(os.path.join(d, f"merged_{name}"))
        with torch.no_grad():
            err = rel_error(model(input_ids=ref["input_ids"]).logits, ref[f"logits_{name}"])
        print(f"{name}: transformers on libft's merged checkpoint vs PEFT's adapted model: max rel error {err:.2e}")
        if not err <= 1e-4:
            sys.exit(f"peft_interop: merged {name}: {err:.2e} > 1e-4")
    print("merged checkpoints OK")


if __name__ == "__main__":
    {"make": make, "verify": verify, "merged": merged}[sys.argv[1]](sys.argv[2])
