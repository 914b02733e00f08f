#pragma once
// 16-byte vector loads and stores for the kernels' per-thread code (kernels/*.cu), usable on the
// host too, where the CPU tests run that code: one 128-bit memory instruction on the device, a
// memcpy on the host. p must be 16-byte aligned on the device.
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FT_VEC16_HD __host__ __device__ __forceinline__
#define FT_VEC16_UNROLL _Pragma("unroll")
#else
#define FT_VEC16_HD inline
#define FT_VEC16_UNROLL
#endif

namespace ft::kernels::detail {

/// Values of T in one 16-byte vector: 4 float32, 8 bf16 or fp16.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

struct alignas(16) Vec16 {
  uint32_t w[4];
};

/// kVec16<T> values of T from p into out.
template <typename T>
FT_VEC16_HD void load16(const T* p, T* out) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec16*>(out) = *reinterpret_cast<const Vec16*>(p);
#else
  std::memcpy(out, p, 16);
#endif
}

/// kVec16<T> values of T from in to p.
template <typename T>
FT_VEC16_HD void store16(T* p, const T* in) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Vec16*>(p) = *reinterpret_cast<const Vec16*>(in);
#else
  std::memcpy(p, in, 16);
#endif
}

/// kVec16<T> values of T from p, as float.
template <typename T>
FT_VEC16_HD void load16_float(const T* p, float* out) {
  alignas(16) T t[kVec16<T>];
  load16(p, t);
  FT_VEC16_UNROLL
  for (int e = 0; e < kVec16<T>; ++e) out[e] = static_cast<float>(t[e]);
}

/// kVec16<T> floats rounded to T, to p.
template <typename T>
FT_VEC16_HD void store16_float(T* p, const float* in) {
  alignas(16) T t[kVec16<T>];
  FT_VEC16_UNROLL
  for (int e = 0; e < kVec16<T>; ++e) t[e] = static_cast<T>(in[e]);
  store16(p, t);
}

}  // namespace ft::kernels::detail

#undef FT_VEC16_HD
#undef FT_VEC16_UNROLL
