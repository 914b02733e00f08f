#pragma once
// Adaptation modes: how a run changes a pretrained model and what it trains.
//
// A mode (1) rewrites the model where it needs to (wraps or replaces linear layers, adds prefix
// parameters, quantizes frozen weights: the adapter modes), (2) decides which parameters train
// (requires_grad), (3) names the tensors it owns, which are what a checkpoint must hold to resume
// (everything else is rebuilt from the run's model source), and (4) describes itself for the run
// log. Modes are looked up by name from the run config ("mode: freeze"), so a new mode is one file
// plus one register_mode() call. Continued pretraining is not a mode but a data choice (causal LM on
// raw-text stores) that composes with any of them.
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ft/config/run_config.h"
#include "ft/model/llama.h"

namespace ft::adapt {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

class Mode {
 public:
  virtual ~Mode() = default;
  virtual std::string name() const = 0;
  /// Rewrites `model` in place and sets requires_grad on every parameter (true = trains). Throws
  /// ft::Error when the mode's settings do not fit the model (a block index out of range, a
  /// pattern that matches nothing).
  virtual void apply(model::CausalLM& model) = 0;
  /// The tensors a checkpoint saves and a resume loads, by name. Default: the trainable parameters.
  virtual NamedTensors state(model::CausalLM& model) const;
  /// One line for the run log: what is frozen, what trains.
  virtual std::string describe(model::CausalLM& model) const;
  /// Writes the run's result to `dir`: by default the whole model as a Hugging Face checkpoint;
  /// adapter modes write their adapter (PEFT's format) instead.
  virtual void export_final(model::CausalLM& model, const std::string& dir, const config::RunConfig& config) const;
  /// Whether export_final() writes the frozen base weights (false for the adapter modes, whose
  /// result is the adapter alone).
  virtual bool exports_base() const { return true; }
};

using ModeFactory = std::function<std::unique_ptr<Mode>(const config::RunConfig&)>;

/// Makes `name` available to make_mode(); replaces an earlier registration of the same name.
void register_mode(const std::string& name, ModeFactory factory);
/// The mode the config names (config.mode); throws ft::Error listing the known modes otherwise.
std::unique_ptr<Mode> make_mode(const config::RunConfig& config);
std::vector<std::string> mode_names();

/// Trainable and frozen parameter counts (elements).
struct TrainableCounts {
  int64_t trainable = 0, frozen = 0;
  int64_t trainable_tensors = 0, frozen_tensors = 0;
};
TrainableCounts count_trainable(model::CausalLM& model);

/// Stores the frozen weights of the linear layers (requires_grad false, floating point, dense) in
/// `dtype`, in place, and returns the bytes this frees. Under CUDA bf16 autocast every linear
/// product casts its weight to bf16 anyway, so for the adapter modes, whose frozen base is never
/// written back, storing it in bf16 computes bit for bit the same products with half the memory
/// and without a cast of every weight in every forward pass (PEFT users get the same by loading
/// the base with torch_dtype=bfloat16). Embeddings (and a tied head), norms, biases and trainable
/// weights keep their dtype: the residual stream stays float32.
int64_t store_frozen_linears(model::CausalLM& model, at::ScalarType dtype);
/// Names of the parameters `freeze` selects in `model` (FreezeSection's rules), in model order.
/// Throws ft::Error for a block index out of range, a pattern that matches no parameter, or
/// contradictory settings for tied embeddings.
std::vector<std::string> frozen_parameter_names(model::CausalLM& model, const config::FreezeSection& freeze);

/// Shell-style glob: '*' any run of characters (dots included), '?' one character.
bool glob_match(std::string_view pattern, std::string_view text);

}  // namespace ft::adapt
