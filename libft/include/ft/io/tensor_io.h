#pragma once
// Bridges between torch tensors and the torch-free safetensors layer.
#include <ATen/core/Tensor.h>

#include <string>

#include "ft/io/safetensors.h"

namespace ft::io {

at::ScalarType to_scalar_type(DType dtype);
DType to_dtype(at::ScalarType type);  ///< throws for types safetensors cannot hold
/// Copies a tensor out of a (memory-mapped) file into a new CPU tensor.
at::Tensor read_tensor(const SafetensorsFile& file, const TensorInfo& info);
/// Why the tensor `info` of `file` cannot serve as trained weights: "is I64, not a float type" or
/// "holds NaN or Inf"; empty when it can (adapter checks list these per tensor).
std::string float_tensor_problem(const SafetensorsFile& file, const TensorInfo& info);
/// A view of a CPU tensor for writing. `t` must stay alive and be contiguous and on the CPU.
TensorWrite tensor_write(const std::string& name, const at::Tensor& t);

}  // namespace ft::io
