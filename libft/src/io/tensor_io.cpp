#include "ft/io/tensor_io.h"

#include <ATen/ATen.h>

#include <cstring>

namespace ft::io {

at::ScalarType to_scalar_type(DType d) {
  switch (d) {
    case DType::BOOL: return at::kBool;
    case DType::U8: return at::kByte;
    case DType::I8: return at::kChar;
    case DType::I16: return at::kShort;
    case DType::U16: return at::kUInt16;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I32: return at::kInt;
    case DType::U32: return at::kUInt32;
    case DType::F32: return at::kFloat;
    case DType::F64: return at::kDouble;
    case DType::I64: return at::kLong;
    case DType::U64: return at::kUInt64;
    case DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case DType::F8_E5M2: return at::kFloat8_e5m2;
    default: break;
  }
  FT_FAIL("[safetensors] dtype ", dtype_name(d), " has no torch equivalent");
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: return DType::BOOL;
    case at::kByte: return DType::U8;
    case at::kChar: return DType::I8;
    case at::kShort: return DType::I16;
    case at::kUInt16: return DType::U16;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kInt: return DType::I32;
    case at::kUInt32: return DType::U32;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kLong: return DType::I64;
    case at::kUInt64: return DType::U64;
    case at::kFloat8_e4m3fn: return DType::F8_E4M3;
    case at::kFloat8_e5m2: return DType::F8_E5M2;
    default: FT_FAIL("[safetensors] torch dtype ", c10::toString(t), " cannot be stored in safetensors");
  }
}

at::Tensor read_tensor(const SafetensorsFile& file, const TensorInfo& info) {
  at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(to_scalar_type(info.dtype)));
  auto bytes = file.bytes(info);
  FT_CHECK(bytes.size() == static_cast<size_t>(t.nbytes()), "[safetensors] ", file.path(), ": tensor '", info.name,
           "' size mismatch");
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}

TensorWrite tensor_write(const std::string& name, const at::Tensor& t) {
  FT_CHECK(t.device().is_cpu() && t.is_contiguous(), "[safetensors] tensor '", name,
           "' must be a contiguous CPU tensor to be written");
  TensorWrite w;
  w.name = name;
  w.dtype = to_dtype(t.scalar_type());
  w.shape = t.sizes().vec();
  w.data = t.data_ptr();
  w.nbytes = t.nbytes();
  return w;
}

std::string float_tensor_problem(const SafetensorsFile& file, const TensorInfo& info) {
  const DType d = info.dtype;
  if (d != DType::F32 && d != DType::F16 && d != DType::BF16 && d != DType::F64)
    return "is " + std::string(dtype_name(d)) + ", not a float type";
  if (!at::isfinite(read_tensor(file, info)).all().item<bool>()) return "holds NaN or Inf";
  return "";
}

}  // namespace ft::io
