#pragma once
// bfloat16 autocast for a scope on one device type (CUDA for training; the CPU in tests that check
// what autocast computes): weights, gradients and optimizer state keep their dtype. Restores the
// previous state and clears autocast's cast cache when the scope ends, normally or by an
// exception. Off (no effect) when constructed with false.
#include <ATen/autocast_mode.h>

namespace ft::util {

class AutocastScope {
 public:
  explicit AutocastScope(bool enable, at::DeviceType device = at::kCUDA) : enabled_(enable), device_(device) {
    if (!enabled_) return;
    previous_ = at::autocast::is_autocast_enabled(device_);
    previous_dtype_ = at::autocast::get_autocast_dtype(device_);
    at::autocast::set_autocast_dtype(device_, at::kBFloat16);
    at::autocast::set_autocast_enabled(device_, true);
  }
  ~AutocastScope() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(device_, previous_);
    at::autocast::set_autocast_dtype(device_, previous_dtype_);
    at::autocast::clear_cache();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool enabled_;
  at::DeviceType device_;
  bool previous_ = false;
  at::ScalarType previous_dtype_ = at::kBFloat16;
};

/// The dtype products of `x` compute in: autocast's for x's device type where autocast is on there,
/// else x's own.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  const at::DeviceType d = x.device().type();
  return at::autocast::is_autocast_enabled(d) ? at::autocast::get_autocast_dtype(d) : x.scalar_type();
}

}  // namespace ft::util
