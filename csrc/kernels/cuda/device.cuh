// The prelude of seqfuse's device code: what every kernel header includes
// first. Under nvcc it brings the CUDA headers; under a host compiler (the C++
// tests) it brings the SIMT emulation layer (simt/simt_emulation.h), which gives
// the same spellings (__global__, __shared__, threadIdx, __syncthreads, warp
// shuffles, WMMA fragments, __half/__nv_bfloat16) on real host threads.
//
// Device code in csrc/kernels/cuda/ is torch-free like the CPU cores: raw
// pointers, sizes and the decoded spec; the .cu adapters in csrc/adapters/cuda/ own
// the device guard, the stream and the launch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define SEQFUSE_HD __host__ __device__ __forceinline__
#define SEQFUSE_DEVICE __device__ __forceinline__
#define SEQFUSE_UNROLL _Pragma("unroll")
#else
#include "simt/simt_emulation.h"
#define SEQFUSE_HD inline
#define SEQFUSE_DEVICE inline
// g++ 12 warns on an unknown `#pragma unroll` (and -Werror makes it fatal).
#define SEQFUSE_UNROLL
#endif

namespace seqfuse::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The block's dynamic shared memory (sized at launch).
template <typename T> SEQFUSE_DEVICE T* dynamic_shared() {
#if defined(__CUDACC__)
  extern __shared__ __align__(128) unsigned char seqfuse_dynamic_smem[];
  return reinterpret_cast<T*>(seqfuse_dynamic_smem);
#else
  return static_cast<T*>(simt_dynamic_shared());
#endif
}

// Storage types and the type arithmetic happens in: half types widen to float
// on load and round (to nearest even) on store; float and double are their own.
template <typename T> struct Storage {
  using acc = T;
  static SEQFUSE_HD acc load(T v) { return v; }
  static SEQFUSE_HD T store(acc v) { return v; }
};
template <> struct Storage<__half> {
  using acc = float;
  static SEQFUSE_HD float load(__half v) { return __half2float(v); }
  static SEQFUSE_HD __half store(float v) { return __float2half_rn(v); }
};
template <> struct Storage<__nv_bfloat16> {
  using acc = float;
  static SEQFUSE_HD float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static SEQFUSE_HD __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <typename T> using acc_of = typename Storage<T>::acc;

template <typename T> constexpr bool kIsHalfType = sizeof(T) == 2;

SEQFUSE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace seqfuse::cuda
