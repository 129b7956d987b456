#include "host_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace seqfuse {
namespace {

constexpr size_t kAlignment = 64;  // as c10's CPU allocator; also the header's size

// The size class of n bytes: n rounded up to an eighth of its leading power
// of two, so a block serves requests up to 12.5% smaller than itself.
size_t size_class(size_t n) {
  size_t top = size_t{1} << (63 - __builtin_clzll(n));
  const size_t step = std::max<size_t>(top / 8, kAlignment);
  return (n + step - 1) / step * step;
}

int64_t cap_from_env() {
  const char* v = std::getenv("SEQFUSE_HOST_CACHE_MB");
  if (!v || !*v) return int64_t{256} << 20;
  try {
    return std::max<int64_t>(std::stoll(v), 0) << 20;
  } catch (const std::exception&) {
    return int64_t{256} << 20;
  }
}

// Each block starts with a header (kAlignment bytes) holding its size class;
// the tensor's data starts after it.
class HostCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHostCacheMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = size_class(n);
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(bytes);
      }
      live_ += static_cast<int64_t>(bytes);
    }
    if (!base) {
      base = std::aligned_alloc(kAlignment, bytes + kAlignment);
      if (!base) {
        std::lock_guard<std::mutex> lock(mutex_);
        live_ -= static_cast<int64_t>(bytes);
        throw std::bad_alloc();
      }
      std::memcpy(base, &bytes, sizeof bytes);
    }
    void* data = static_cast<char*>(base) + kAlignment;
    return {data, base, &HostCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t release() {
    std::map<size_t, std::vector<void*>> drop;
    int64_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      freed = cached_;
      cached_ = 0;
    }
    for (auto& [bytes, blocks] : drop)
      for (void* b : blocks) std::free(b);
    return freed;
  }

  std::pair<int64_t, int64_t> usage() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, live_};
  }

  static HostCache& instance() {
    // Never destroyed: tensors may release their blocks during interpreter shutdown.
    static HostCache* cache = new HostCache();
    return *cache;
  }

 private:
  static void give_back(void* base) {
    size_t bytes;
    std::memcpy(&bytes, base, sizeof bytes);
    HostCache& c = instance();
    {
      std::lock_guard<std::mutex> lock(c.mutex_);
      c.live_ -= static_cast<int64_t>(bytes);
      if (c.cached_ + static_cast<int64_t>(bytes) <= c.cap_) {
        c.free_[bytes].push_back(base);
        c.cached_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(base);
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> cached blocks
  int64_t cached_ = 0, live_ = 0;
  const int64_t cap_ = cap_from_env();
};

}  // namespace

at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype, std::optional<at::MemoryFormat> memory_format) {
  return at::detail::empty_generic(sizes, &HostCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   memory_format);
}

int64_t release_host_cache() { return HostCache::instance().release(); }

std::pair<int64_t, int64_t> host_cache_usage() { return HostCache::instance().usage(); }

}  // namespace seqfuse
