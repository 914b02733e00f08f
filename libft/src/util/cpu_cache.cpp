#include "ft/util/cpu_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace ft::util {
namespace {

constexpr std::size_t kRound = std::size_t{64} << 10;

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t n) override {
    void* p = acquire(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }

  void set_options(const CpuCacheOptions& o) {
    std::lock_guard<std::mutex> lock(mu_);
    options_ = o;
    shrink_to(options_.max_cached_bytes);
  }
  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {true, hits_, misses_, cached_bytes_, live_bytes_};
  }
  void trim() {
    std::lock_guard<std::mutex> lock(mu_);
    shrink_to(0);
  }

 private:
  void* acquire(std::size_t n) {
    std::size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (n >= options_.min_block_bytes) {
        size = (n + kRound - 1) / kRound * kRound;
        auto it = pool_.lower_bound(size);
        if (it != pool_.end() && it->first <= size + size / 8) {
          void* p = it->second;
          live_.emplace(p, it->first);
          cached_bytes_ -= it->first;
          live_bytes_ += it->first;
          pool_.erase(it);
          ++hits_;
          return p;
        }
        ++misses_;
      }
    }
    if (size == 0) return c10::alloc_cpu(n);
    void* p = c10::alloc_cpu(size);  // throws c10::Error when the system is out of memory
    std::lock_guard<std::mutex> lock(mu_);
    live_.emplace(p, size);
    live_bytes_ += size;
    return p;
  }

  static void release(void* p);

  void release_block(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it != live_.end()) {
        const std::size_t size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        if (cached_bytes_ + size <= options_.max_cached_bytes) {
          pool_.emplace(size, p);
          cached_bytes_ += size;
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  void shrink_to(std::size_t limit) {  // under mu_; largest blocks first
    while (cached_bytes_ > limit && !pool_.empty()) {
      auto it = std::prev(pool_.end());
      cached_bytes_ -= it->first;
      c10::free_cpu(it->second);
      pool_.erase(it);
    }
  }

  std::mutex mu_;
  CpuCacheOptions options_;
  std::multimap<std::size_t, void*> pool_;
  std::unordered_map<void*, std::size_t> live_;
  std::size_t cached_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive static destruction order.
CachingCpuAllocator* const g_allocator = new CachingCpuAllocator;
bool g_installed = false;
std::mutex g_install_mu;

void CachingCpuAllocator::release(void* p) { g_allocator->release_block(p); }

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

}  // namespace

bool install_cpu_cache(const CpuCacheOptions& options) {
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (kSanitized) return false;
  if (const char* env = std::getenv("LIBFT_CPU_CACHE"); env != nullptr && std::strcmp(env, "0") == 0) return false;
  g_allocator->set_options(options);
  if (!g_installed) {
    c10::SetCPUAllocator(g_allocator, /*priority=*/0);
    g_installed = true;
  }
  return true;
}

CpuCacheStats cpu_cache_stats() {
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (!g_installed) return {};
  return g_allocator->stats();
}

void trim_cpu_cache() { g_allocator->trim(); }

}  // namespace ft::util
