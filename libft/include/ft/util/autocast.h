#pragma once
// bfloat16 autocast on CUDA for a scope (weights, gradients and optimizer state stay float32):
// restores the previous state and clears autocast's cast cache when the scope ends, normally or by
// an exception. Off (no effect) when constructed with false.
#include <ATen/autocast_mode.h>

namespace ft::util {

class CudaAutocastScope {
 public:
  explicit CudaAutocastScope(bool enable) : enabled_(enable) {
    if (!enabled_) return;
    previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~CudaAutocastScope() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(at::kCUDA, previous_);
    at::autocast::clear_cache();
  }
  CudaAutocastScope(const CudaAutocastScope&) = delete;
  CudaAutocastScope& operator=(const CudaAutocastScope&) = delete;

 private:
  bool enabled_, previous_ = false;
};

}  // namespace ft::util
