#pragma once
// Hugging Face checkpoint directories: config.json + model.safetensors (or shards with
// model.safetensors.index.json). Pickle-based .bin/.pt weights are never loaded.
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include "ft/model/llama.h"

namespace ft::io {

struct LoadOptions {
  c10::Device device = c10::kCPU;
  /// Parameter dtype; default float32 (training and parity). Checkpoint values are converted.
  c10::ScalarType dtype = c10::kFloat;
};

/// Loads config.json and the weights. Strict: every missing, unexpected or mis-shaped tensor is
/// reported (all of them, in one error naming the checkpoint), never silently skipped.
model::CausalLM load_pretrained(const std::string& dir, const LoadOptions& options = {});

/// Copies weights from a checkpoint into an existing model, with the same strictness. gpt-oss's
/// fused experts (gate_up_proj with gate and up interleaved, down_proj, their biases; or the
/// weights as MXFP4 _blocks and _scales, as OpenAI released them) load into libft's per-expert
/// projections.
void load_weights(model::CausalLM& model, const std::string& dir);

/// MXFP4 (OCP microscaling, as gpt-oss's checkpoints store their experts) to float32: `blocks`
/// (…, G, 16) uint8, two four-bit E2M1 values a byte (the low nibble first), `scales` (…, G)
/// uint8, each block's exponent biased by 127. Returns (…, G·32): each value · 2^(scale − 127).
at::Tensor mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales);

struct SaveOptions {
  /// dtype written; default: the model's parameter dtype.
  std::optional<c10::ScalarType> dtype;
  /// Shards above this size, as save_pretrained's max_shard_size.
  uint64_t max_shard_bytes = 5ull << 30;
  /// A checkpoint directory whose tokenizer files (tokenizer.model, tokenizer.json,
  /// tokenizer_config.json, special_tokens_map.json, added_tokens.json, chat_template.jinja) and
  /// generation_config.json, those it has, are copied beside the weights: a fine-tuned or merged
  /// model is then a checkpoint that loads with its tokenizer, as save_pretrained of a model and its
  /// tokenizer gives. Empty, or not a directory: nothing is copied.
  std::string copy_files_from;
};

/// Writes config.json and model.safetensors (or shards + index), each file atomically, and copies
/// SaveOptions::copy_files_from's tokenizer files. Tied LM heads are not written (as save_pretrained
/// does).
void save_pretrained(model::CausalLM& model, const std::string& dir, const SaveOptions& options = {});

}  // namespace ft::io
