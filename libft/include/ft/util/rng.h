#pragma once
// The default random generators of this process that dropout draws from (the CPU's and, on CUDA,
// `device`'s), saved and restored as one uint8 tensor: for checkpoints (ft/train/state.h) and for
// replaying a forward pass's draws in an activation-checkpointing recomputation (ft/model/llama.h).
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <string>

namespace ft::util {

/// The generators' states, concatenated (CPU first).
at::Tensor generator_states(c10::Device device);

/// generator_states()'s tensor back into the generators; throws naming `where` if its size does not
/// fit this process's generators (e.g. a checkpoint resumed on another kind of device).
void set_generator_states(const at::Tensor& state, c10::Device device, const std::string& where);

}  // namespace ft::util
