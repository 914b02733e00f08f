#pragma once
// Prefix tuning (Li & Liang 2021) with Hugging Face PEFT's semantics and files.
//
// Every layer attends to P learned key/value vectors per key/value head before the sequence's own
// tokens (model::PrefixEncoder; the base model is frozen). As in PEFT, the prefix acts as P cached
// tokens: with grouped-query attention it has G (not H) heads, the tokens' positions start at P,
// attention masks cover only the tokens, and it is concatenated inside attention, so it composes
// with packed documents (every document sees the whole prefix), padding, the KV cache of
// generation and activation checkpointing.
//
// INIT: "normal" is PEFT's default (torch.nn.Embedding's N(0, 1) for the table or, with the
// projection, for the embedding, and nn.Linear's default for the MLP); "zero" is PEFT's
// init_weights="zero" (a zero table, or a zero last layer of the MLP).
//
// FILES (PEFT's): adapter_config.json ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens",
// "num_layers", "token_dim" = G·D, "num_attention_heads" = G, "num_transformer_submodules": 1,
// "prefix_projection", "encoder_hidden_size", ...}) and adapter_model.safetensors with the single
// tensor "prompt_embeddings" (P, L·2·G·D): the table, computed through the MLP when there is one
// (PEFT saves no MLP weights, and loads the table as a plain embedding). Loading is strict: a
// config for another shape of model, or a tensor of the wrong shape, is an error naming it.
#include <cstdint>
#include <string>
#include <vector>

#include "ft/model/llama.h"

namespace ft::adapt {

struct PrefixOptions {
  int64_t num_virtual_tokens = 20;
  /// PEFT's prefix_projection: the table comes from a two-layer MLP over a (P, G·D) embedding.
  bool projection = false;
  int64_t encoder_hidden_size = 0;  ///< the MLP's hidden width; 0 = G·D (PEFT's default)
  std::string init = "normal";      ///< normal (PEFT's default) | zero
  uint64_t seed = 0;
};

/// Attaches a fresh prefix to `model` (which must have none yet) and freezes every other parameter.
/// Throws ft::Error for options out of range.
void apply_prefix(model::CausalLM& model, const PrefixOptions& options);

/// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (the computed table).
void save_peft_prefix(model::CausalLM& model, const PrefixOptions& options, const std::string& dir,
                      const std::string& base_model = "");

/// Reads a PEFT prefix-tuning adapter_config.json (only causal LM, one transformer submodule).
PrefixOptions read_peft_prefix_config(const std::string& path);

/// Every problem of the prefix adapter in `dir` for `model`: a config for another number of layers,
/// key/value heads or head size, a missing, misshapen, extra, non-float or non-finite tensor.
std::vector<std::string> check_peft_prefix(model::CausalLM& model, const std::string& dir);

/// Attaches the prefix in `dir` to `model` (a plain table of the saved values, as PEFT loads it,
/// whether or not it was trained with the projection) and freezes every other parameter.
PrefixOptions load_peft_prefix(model::CausalLM& model, const std::string& dir);

/// The "peft_type" of the adapter in `dir` ("LORA", "PREFIX_TUNING", ...); throws ft::Error when
/// its adapter_config.json is missing or unreadable.
std::string peft_adapter_type(const std::string& dir);

}  // namespace ft::adapt
