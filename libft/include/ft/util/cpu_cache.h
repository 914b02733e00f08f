#pragma once
// A caching allocator for large CPU tensors, so that a training loop's per-step buffers (logits,
// their log-softmax, gradients of the LM head) reuse memory instead of asking the kernel for fresh
// pages every micro-batch.
//
// Why: glibc serves a large request with mmap (or by growing a heap that it trims again), and the
// first touch of each fresh 4 KiB page is a page fault. In a VM a fault costs about 0.7 µs, so the
// 8 MiB log-softmax of a 512-token micro-batch over a 4096-word vocabulary spent 1.4 of its 1.9 ms
// faulting (2048 faults; 0.5 ms once the pages are reused). PyTorch's CUDA allocator caches blocks
// for the same reason; its CPU allocator does not.
//
// Blocks of at least `min_block_bytes` are rounded up to 64 KiB and, when freed, kept in a
// size-ordered pool (at most `max_cached_bytes` idle) for the next request of that size (up to 1/8
// larger). Smaller requests go straight to c10's allocator. Thread-safe; the pool never shrinks on
// its own (trim_cpu_cache() returns it to the system; run_training does so when it ends).
#include <cstddef>
#include <cstdint>

namespace ft::util {

struct CpuCacheOptions {
  std::size_t min_block_bytes = 256 << 10;
  std::size_t max_cached_bytes = std::size_t{2} << 30;  ///< idle bytes kept at most
};

struct CpuCacheStats {
  bool installed = false;
  int64_t hits = 0;            ///< large requests served from the pool
  int64_t misses = 0;          ///< large requests that went to the system
  std::size_t cached_bytes = 0;  ///< idle bytes in the pool now
  std::size_t live_bytes = 0;    ///< large blocks handed out and not yet freed
};

/// Makes the caching allocator c10's CPU allocator for the rest of the process (tensors allocated
/// before keep their own deleters). Idempotent; later calls only change the options. Returns false
/// (and installs nothing) in AddressSanitizer builds, where a pool would hide use-after-free.
/// The environment variable LIBFT_CPU_CACHE=0 also keeps c10's allocator.
bool install_cpu_cache(const CpuCacheOptions& options = {});
CpuCacheStats cpu_cache_stats();
/// Frees every idle block of the pool.
void trim_cpu_cache();

}  // namespace ft::util
