// Per-thread scratch memory for the kernel cores, and their clock.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace seqfuse::kernels {

// A 64-byte aligned buffer of at least `elements` values owned by the calling
// thread, grown on demand and reused by every later call on that thread. The
// contents are not preserved across calls that grow it.
template <typename A> A* thread_workspace(size_t elements) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> buffer;
  thread_local size_t capacity = 0;
  const size_t bytes = std::max<size_t>(elements * sizeof(A), 64);
  if (bytes > capacity) {
    buffer.reset();
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    buffer.reset(p);
    capacity = bytes;
  }
  return static_cast<A*>(buffer.get());
}

// Nanoseconds on the monotonic clock (CLOCK_MONOTONIC on Linux, the clock of
// Python's time.monotonic_ns): the stage timings of seqfuse.profile.
inline int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace seqfuse::kernels
