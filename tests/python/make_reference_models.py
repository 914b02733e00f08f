#!/usr/bin/env python3
"""Builds tiny Hugging Face models of each supported family and their reference outputs.

    python tests/python/make_reference_models.py OUT_DIR

For each family, OUT_DIR/<family>/ holds what `save_pretrained` wrote (config.json +
model.safetensors, or shards) and reference.safetensors with:
  input_ids (2, 16) int64, attention_mask (2, 16) int64 (row 1 left-padded by 3),
  labels (2, 16) int64 (-100 on padding and on the token after it), logits (2, 16, V) float32, loss () float32,
  greedy_prompt (5,) int64 and greedy_tokens (10,) int64 from `generate(do_sample=False)`.
The C++ parity tests (tests/test_llama_parity.cpp) compare libft against these. Run by ctest.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM,
                          GraniteConfig, GraniteForCausalLM, LlamaConfig, Phi3Config, Phi3ForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          SmolLM3Config, SmolLM3ForCausalLM,
                          LlamaForCausalLM, MistralConfig, MixtralConfig, MixtralForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, GptOssConfig, GptOssForCausalLM)
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)

FAMILIES = {
    # Llama 2 / TinyLlama layout: multi-head attention, default rope, untied head.
    "llama2": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=4)),
    # Llama 3.1: grouped-query attention and llama3 rope scaling (original context 16 < our positions' wavelengths).
    "llama3": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500000.0,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16})),
    # Llama with every bias and linear rope scaling.
    "llama_bias": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                                 rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # SmolLM layout: tied embeddings, few key/value heads.
    "smollm": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=True)),
    # Mistral: sliding window (6 < 16 tokens, so it bites) and head_dim != hidden/heads.
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, num_key_value_heads=2, head_dim=24, sliding_window=6)),
    # Qwen2: q/k/v biases, tied embeddings.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen3: RMSNorm of each head's queries and keys, head_dim != hidden/heads, tied embeddings, and a
    # sliding-window first layer (6 < 16 tokens) before a full one.
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                                            use_sliding_window=True, sliding_window=6,
                                            layer_types=["sliding_attention", "full_attention"])),
    # Gemma 1 (gemma-2b's layout): multi-query attention, norms as offsets from one, √E-scaled
    # embeddings, a tied head, and the exact GELU its first configs named (hidden_act "gelu").
    "gemma": (GemmaForCausalLM, GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=24, hidden_act="gelu")),
    # Gemma 2: soft-capped attention scores (3.0) and final logits (4.0), both small enough to bite,
    # scores scaled by query_pre_attn_scalar (20, not head_dim 24), norms around both sublayers, and
    # its default layer types for three layers: sliding (6 < 16 tokens), global, sliding. Built with
    # transformers' eager attention: its default SDPA attention leaves the scores uncapped.
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=24,
                                               query_pre_attn_scalar=20, sliding_window=6, attn_logit_softcapping=3.0,
                                               final_logit_softcapping=4.0)),
    # Gemma 3 (text): tanh-GELU, norms as offsets from one and around both sublayers, q/k norms,
    # √E-scaled embeddings, scores scaled by query_pre_attn_scalar (20, not head_dim 24), a
    # sliding-window layer (6 < 16 tokens) with its own rotary base beside a global one; tied head.
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=24,
                                                   query_pre_attn_scalar=20, sliding_window=6,
                                                   layer_types=["sliding_attention", "full_attention"])),
    # Gemma 3 as its 4B+ siblings' language models: linear rope scaling of the global layers, final
    # logit soft-capping (small enough to bite), every bias, an untied head, three layers of which
    # the third is global (sliding_window_pattern 3).
    "gemma3_scaled": (Gemma3ForCausalLM, Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=1, head_dim=16, sliding_window=5,
        sliding_window_pattern=3, tie_word_embeddings=False, attention_bias=True, final_logit_softcapping=4.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Gemma 3's image-text checkpoints (gemma-3-4b and up: Gemma3ForConditionalGeneration, saved as
    # language_model.model.*, beside a vision tower and a projector): libft loads the language model.
    # Linear rope ×8 on the global layer, as gemma-3-4b; the references are the image-text model's
    # own logits and generation on text.
    "gemma3_image_text": (Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=24, sliding_window=6,
                                     layer_types=["sliding_attention", "full_attention"],
                                     rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                         "rope_theta": 1e6},
                                                      "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 1e4}}),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)),
    # (Each family's seed is its place here: new ones go last.)
    # Granite 3: Llama's block with its four multipliers (granite-3.1-2b's values but for the
    # attention's, which is larger here: 0.015625 is 1/head_dim for its head_dim 64), tied head.
    "granite": (GraniteForCausalLM, GraniteConfig(**COMMON, num_key_value_heads=2, embedding_multiplier=12.0,
                                                  attention_multiplier=0.1, residual_multiplier=0.22,
                                                  logits_scaling=8.0, tie_word_embeddings=True)),
    # Phi-3 (Phi-3-mini-4k's layout): q, k, v packed in qkv_proj and gate, up in gate_up_proj,
    # multi-head attention, a sliding window (6 < 16 tokens, so it bites) on every layer, untied head.
    "phi3": (Phi3ForCausalLM, Phi3Config(**COMMON, num_key_value_heads=4, sliding_window=6)),
    # Phi-4-mini's layout: longrope (original context 8 < 16 tokens, so the references use the long
    # factors, and generation crosses from the short ones to the long), a partial rotary embedding
    # (0.75 of head_dim 16: 12 dimensions turn), grouped-query attention.
    "phi3_longrope": (Phi3ForCausalLM, Phi3Config(
        **COMMON, num_key_value_heads=2, original_max_position_embeddings=8, partial_rotary_factor=0.75,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 3.0],
                      "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0]})),
    # SmolLM3: Llama's block with layers that have no rotary embedding (NoPE; here every second,
    # no_rope_layer_interval 2), which also slide (use_sliding_window, a window of 6 < 16 tokens).
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(**COMMON, num_key_value_heads=2, no_rope_layer_interval=2,
                                                  use_sliding_window=True, sliding_window=6,
                                                  tie_word_embeddings=False)),
    # OLMo 2: norms on the sublayers' outputs only, q and k normed over all heads, GQA, every bias.
    "olmo2": (Olmo2ForCausalLM, Olmo2Config(**COMMON, num_key_value_heads=2, attention_bias=True)),
    # Qwen2.5's long-context setting: YaRN ×4 over an original context of 64 (the ramp between
    # kept and divided frequencies spans dimensions 0 to 3 of 8), in 4.x's rope_scaling with "type".
    "qwen2_yarn": (Qwen2ForCausalLM, Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                                 rope_scaling={"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 64})),
    # YaRN with every option: DeepSeek's mscale pair for the attention factor, beta_fast and
    # beta_slow moved (the ramp spans dimensions 0.21 to 2.62 of 8), and its ends left fractional
    # (truncate false, as gpt-oss's; truncated, it would span 0 to 3).
    "llama_yarn": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=2, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 4.0,
        "beta_slow": 0.25, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False})),
    # OLMo 3: OLMo 2's block with a sliding-window layer (6 < 16 tokens) beside a global one, the
    # global one's rotary embedding YaRN (OLMo-3-7B's keys: a given attention_factor), written in
    # 4.x's rope_scaling and converted by Olmo3Config into one rope per layer type.
    "olmo3": (Olmo3ForCausalLM, Olmo3Config(**COMMON, num_key_value_heads=2, attention_bias=True, sliding_window=6,
                                            layer_types=["sliding_attention", "full_attention"],
                                            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 64,
                                                          "attention_factor": 1.2, "beta_fast": 32,
                                                          "beta_slow": 1})),
    # Mixtral: Mistral's attention with four experts per layer, two per token (weights renormalised
    # and kept in float32), saved as block_sparse_moe.experts.N.w1/w2/w3 and block_sparse_moe.gate.
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2)),
    # Qwen3-MoE: Qwen3's attention (q/k norms, head_dim 24), six experts of 40 units, two per token
    # with their weights not renormalised (norm_topk_prob false, as Qwen3-MoE's default), and a dense
    # middle layer (mlp_only_layers) of three.
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2,
                                                      head_dim=24, num_experts=6, num_experts_per_tok=2,
                                                      moe_intermediate_size=40, norm_topk_prob=False,
                                                      mlp_only_layers=[1])),
    # Qwen2-MoE (Qwen1.5-MoE's layout): q/k/v biases, four experts of 40 units, two per token with
    # their weights renormalised, and a shared expert of 56 units behind its sigmoid gate.
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4,
                                                      num_experts_per_tok=2, moe_intermediate_size=40,
                                                      shared_expert_intermediate_size=56, norm_topk_prob=True)),
    # OLMoE: Llama's block with q and k normed over all heads, q, k and v clamped to ±1.5 (clip_qkv,
    # which the randomised weights' O(1) activations reach), attention biases, and four experts of
    # the MLP's width, two per token, their weights not renormalised.
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(**COMMON, num_key_value_heads=2, attention_bias=True, clip_qkv=1.5,
                                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    # gpt-oss: attention sinks, biases on every projection, the router's and the experts', a sliding
    # layer (6 < 16 tokens) before a global one, YaRN ×4 over 16 positions, four experts of 96 units,
    # two per token, their weights the softmax of the top two logits. The experts' gate_up weights
    # are scaled up (randomize) so that the activation's clamp at swiglu_limit 7 bites (transformers
    # 5.17's GptOssExperts clamps at 7 whatever the config says). Built with transformers' eager
    # attention: the sinks' own.
    # (Experts of 96 units: MXFP4's blocks of 32 must divide both of an expert's widths.)
    "gpt_oss": (GptOssForCausalLM, GptOssConfig(**{**COMMON, "intermediate_size": 96}, num_key_value_heads=2, head_dim=24, num_local_experts=4,
                                                num_experts_per_tok=2, sliding_window=6, swiglu_limit=7.0,
                                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                                 "beta_slow": 1.0, "truncate": False,
                                                                 "original_max_position_embeddings": 16,
                                                                 "rope_theta": 150000.0})),
}

# Variants saved from another family's model with their experts rewritten (see build_mxfp4).
MXFP4 = {"gpt_oss_mxfp4": "gpt_oss"}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations, so that logits differ clearly between tokens (HF's 0.02 init
    makes them nearly uniform, which would let layout bugs pass)."""
    g = torch.Generator().manual_seed(seed)
    # Gemma's norm weights are offsets from one.
    one = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(one + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() < 2:  # (the vision tower's LayerNorm weights)
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif model.config.model_type == "gpt_oss" and p.dim() == 3:
                # (gpt-oss's fused experts multiply from the left, x · W: (experts, in, out); gate and
                # up ×4, so that about one in twelve of them passes the clamp at 7)
                scale = 4.0 if name.endswith("gate_up_proj") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                # (fan-in: the last dimension, also of transformers 5's (experts, out, in) expert weights)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def mxfp4_quantize(w: torch.Tensor):
    """MXFP4 blocks and scales of `w` (..., out, in) in Linear's layout, as gpt-oss's checkpoints
    store them: per 32 values of a row, one power-of-two scale (the smallest that brings the block's
    largest magnitude within FP4's 6) and each value rounded to the nearest of FP4's 16."""
    *lead, rows, cols = w.shape
    x = w.reshape(*lead, rows, cols // 32, 32).float()
    amax = x.abs().amax(-1).clamp_min(2.0 ** -100)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = x / torch.exp2(e)[..., None]
    values = torch.tensor(FP4_VALUES[:8])
    idx = (scaled.abs()[..., None] - values).abs().argmin(-1)
    code = idx | ((scaled < 0).long() << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)  # (..., G, 16): low nibble even
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous()


def quantize_experts(model):
    """Rounds each gpt-oss expert weight to MXFP4, puts transformers' own dequantization of it
    (convert_moe_packed_tensors) into the model, and returns {checkpoint name: blocks or scales}."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                blocks, scales = mxfp4_quantize(p.transpose(1, 2))  # (experts, out, in)
                p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                out[name + "_blocks"], out[name + "_scales"] = blocks, scales
    return out


def build(out_dir: str, family: str, seed: int, shard_bytes=None, mxfp4=False) -> None:
    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    if config.model_type in ("gemma2", "gpt_oss"):
        model.set_attn_implementation("eager")
    randomize(model, seed)
    if mxfp4:
        quantized = quantize_experts(model)
    path = os.path.join(out_dir, family + "_mxfp4" if mxfp4 else family if shard_bytes is None else family + "_sharded")
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if mxfp4:
        # The experts' weights as MXFP4 blocks and scales in place of the dense tensors, and the
        # config's quantization_config, as OpenAI's checkpoints have them.
        from safetensors.torch import load_file
        weights_path = os.path.join(path, "model.safetensors")
        weights = {k: v for k, v in load_file(weights_path).items() if k + "_blocks" not in quantized}
        save_file({**weights, **quantized}, weights_path, metadata={"format": "pt"})
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    g = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(0, config.get_text_config().vocab_size, (2, 16), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    # The first real token of a left-padded row would be predicted from a padding position, whose
    # logits are meaningless (and differ between implementations): do not train on it.
    labels[1, 3] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        prompt = input_ids[0, :5]
        # transformers 5.17's cached Phi-3 generation, at the step that crosses longrope's original
        # context, drops its cache and runs the new token alone (Phi3ForCausalLM's
        # prepare_inputs_for_generation sets past_key_values to None, and the token attends to
        # itself only): the uncached generation is the model's own.
        longrope = config.model_type == "phi3" and config.rope_parameters["rope_type"] == "longrope"
        generated = model.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, use_cache=not longrope)[0, 5:]
    save_file({
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": out.logits.float().contiguous(),
        "loss": out.loss.float().reshape(()).contiguous(),
        "greedy_prompt": prompt.clone(),
        "greedy_tokens": generated.contiguous(),
    }, os.path.join(path, "reference.safetensors"))


def main() -> int:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for seed, family in enumerate(FAMILIES):
        build(out_dir, family, seed)
    build(out_dir, "llama3", 1, shard_bytes="100KB")  # several shards + model.safetensors.index.json
    for variant, family in MXFP4.items():
        build(out_dir, family, list(FAMILIES).index(family), mxfp4=True)
    with open(os.path.join(out_dir, "families.json"), "w") as f:
        json.dump(sorted(d for d in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, d))), f)
    print(f"reference models written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
