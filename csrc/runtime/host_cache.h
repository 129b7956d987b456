// Recycled host memory for the fused CPU ops' outputs and intermediates.
//
// A fresh allocation of a few megabytes comes from the OS as untouched pages
// (glibc serves it with mmap): the first write to each 4 KiB page faults and
// zeroes it, and freeing unmaps it again. At batch 1 resnet50's 56x56x256
// maps (3.2 MB) paid about 0.6 ms a stage for it, a fifth of the forward
// (seqfuse.profile, with and without glibc's mmap threshold raised). The
// deployment runtimes plan one arena per model; a fused call's output leaves
// the op as the caller's tensor, so instead every block of at least
// kHostCacheMinBytes is recycled: when its tensor's storage is released the
// block is kept (up to a cap) and handed to the next request of its size
// class with its pages already mapped. Smaller blocks take torch's allocator.
//
// The cap is 256 MiB of cached (free) blocks; SEQFUSE_HOST_CACHE_MB sets it
// (0: no caching). seqfuse.ops.release_host_cache() frees the cached blocks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace seqfuse {

constexpr size_t kHostCacheMinBytes = size_t{1} << 17;

// An uninitialized CPU tensor, as at::empty(sizes, dtype, memory_format),
// whose storage comes from the cache when it is large enough.
at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype,
                      std::optional<at::MemoryFormat> memory_format = std::nullopt);

// Frees every cached block to the OS; returns the bytes freed.
int64_t release_host_cache();

// (bytes in cached free blocks, bytes handed out and not yet returned).
std::pair<int64_t, int64_t> host_cache_usage();

}  // namespace seqfuse
