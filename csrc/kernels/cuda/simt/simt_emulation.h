// SIMT emulation layer: compiles CUDA device code (kernels written in headers)
// with g++ and runs it on the CPU, so that ctest can check CUDA kernels on a
// machine without a GPU. Header-only, C++20, no CUDA headers, no torch.
//
// Device code does, when __CUDACC__ is not defined,
//     #include "simt_emulation.h"
// and then uses the CUDA spellings directly (threadIdx, __syncthreads(),
// __shfl_xor_sync, nvcuda::wmma, ...). The host side launches a kernel with
//     simt::launch(kernel, grid, block, dynamic_smem_bytes, args...);
// instead of kernel<<<grid, block, dynamic_smem_bytes>>>(args...).
//
// Execution model
//   * Blocks run one after another (blockIdx.x fastest, then y, then z). Every
//     thread of a block is a real std::thread (from a process-wide pool that
//     grows to the largest block launched and is reused by every block of
//     every launch), so barriers really block and data races between the
//     threads of a block are real races.
//   * __shared__ is `static`: since blocks run one after another and a
//     block's threads are real threads, a function-static array is exactly
//     the block's shared memory. (Consequence: static __shared__ arrays start
//     zeroed and keep the previous block's contents, so reading them before
//     writing is NOT caught; the dynamic shared buffer, simt_dynamic_shared(),
//     is refilled with 0xCD bytes at every block start, and is caught.)
//     `extern __shared__ T buf[];` cannot be spelled; use simt_dynamic_shared().
//   * Threads that return from the kernel leave every barrier (as exited
//     threads do on the GPU), so the common `if (i >= n) return;` before a
//     __syncthreads() / __syncwarp() works. A shuffle that reads an exited
//     lane (undefined on the GPU) and a WMMA call with an exited lane throw
//     std::logic_error; exited lanes vote 0 in __ballot_sync/__any_sync and
//     are not counted by __all_sync.
//   * A barrier that some live threads never reach is a deadlock: when threads
//     wait and no thread reached or left a barrier for simt::deadlock_timeout()
//     (default 30 s, env SIMT_DEADLOCK_TIMEOUT_MS), the launching thread
//     aborts the launch and launch throws simt::deadlock_error, saying which
//     barriers the threads wait at.
//   * An exception thrown by a kernel thread is caught in that thread, the
//     launch is aborted (every thread waiting at or later reaching a barrier
//     of the block unwinds; no further block starts), and launch() rethrows
//     the first exception once every thread of the block has finished.
//     Nothing calls std::terminate.
//     A thread that spins forever without reaching a barrier is not stopped.
//   * Launches are serialised (one at a time per process); a launch from
//     inside a kernel (dynamic parallelism) throws std::logic_error.
//
// Limits (what this does NOT emulate)
//   * No timing: nothing about performance, occupancy, bank conflicts,
//     coalescing or register pressure can be learnt from it.
//   * No memory model: all memory is ordinary host memory, ordered only by
//     the barriers (which synchronise like a mutex). Missing __threadfence(),
//     volatile or atomics across blocks are not caught, and block-to-block
//     communication inside one launch cannot deadlock or race the way it can
//     on the GPU (blocks never run concurrently).
//   * Warps are not lock-step: only __syncwarp, the warp intrinsics and the
//     WMMA calls order the lanes of a warp. (This catches missing __syncwarp
//     that implicit warp-synchronous code would hide, but a kernel that is
//     only correct under lock-step execution fails here.)
//   * Warp intrinsics (and __syncwarp) support only the full mask 0xffffffff;
//     any other mask throws std::logic_error. Warps are the consecutive
//     groups of 32 linear thread ids (x fastest); a block must be a multiple
//     of 32 threads (checked at launch).
//   * WMMA: every lane's fragment holds the WHOLE tile (x[] has rows * cols
//     elements in row-major order) and every lane computes the whole mma
//     redundantly; the per-lane element mapping of the hardware is NOT
//     emulated, so device code must not rely on which x[] element a lane
//     holds (elementwise operations applied to every x[] are fine). The calls
//     check what CUDA requires: 256-bit aligned pointers, ldm a multiple of
//     16 bytes, the same pointer/ldm/layout and (for mma/store) identical
//     fragments in all 32 lanes. Products and sums are float, summed in k
//     order; the tensor cores' own accumulation order/rounding is not modelled.
//   * Intended for small shapes in tests: every block thread is an OS thread
//     and every barrier puts the waiting threads to sleep and wakes them
//     (roughly 0.05 ms for a warp, 0.1-0.5 ms for a 256-thread block, each
//     warp intrinsic costs two warp barriers).
//
// Since the barriers are real synchronisation (mutex + atomics), a test built
// with -fsanitize=thread reports shared-memory races of the device code
// (e.g. a missing __syncthreads()) without false positives from the layer.
#pragma once

#ifdef __CUDACC__
#error "simt_emulation.h is the host (g++) emulation of CUDA; do not include it in nvcc builds"
#endif

#include <math.h>  // expf, tanhf, erff, fmaxf, fminf, sqrtf, log1pf, fmaf at global scope

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ------------------------------------------------------------------
// __global__/__device__/__host__ are empty (so `__device__ inline` and
// `__device__ __forceinline__` both stay valid); functions defined in headers
// need `inline`, `static` or to be templates, as in any C++ header.

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __constant__
#define __constant__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif
// Block shared memory: see the header comment (blocks run one after another).
#ifndef __shared__
#define __shared__ static
#endif

// nvcc's `#pragma unroll [n]` is CUDA spelling too; g++ does not know it and
// warns once per loop (-Wunknown-pragmas, part of -Wall). This silences that
// for the rest of the translation unit on g++ >= 13 only: g++ 12's C++ front
// end ignores diagnostic pragmas for -Wunknown-pragmas (GCC bug 53431), so
// with g++ 12 a target compiling device code that uses `#pragma unroll` needs
// -Wno-unknown-pragmas (or the device code a macro that is empty on the host).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---- built-in vector types and indices ----------------------------------------------

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Per thread of the emulation; set by simt::launch before the kernel runs.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

// ---- launch state (internal) ----------------------------------------------------------

namespace simt {

// Thrown by launch when the threads of a block did not all reach a barrier.
struct deadlock_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

// Unwinds the sibling threads of a thread that threw; never leaves launch().
struct Aborted {};

inline std::atomic<long long>& deadlock_timeout_ms_storage() {
  static std::atomic<long long> ms{[] {
    const char* env = std::getenv("SIMT_DEADLOCK_TIMEOUT_MS");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? v : 30000LL;
  }()};
  return ms;
}

// A reusable barrier that, unlike std::barrier, can be reset between blocks
// and be aborted. Arrivals are counted under a mutex; waiters sleep on an
// atomic word (futex) holding the phase (bits 1..31) and the abort flag (bit 0).
class Barrier {
 public:
  enum class Result { passed, aborted };
  struct Snapshot {
    unsigned expected, waiting;
  };

  // Only while no thread uses the barrier. `progress` counts every arrival,
  // departure and completion (the launch's deadlock watchdog reads it).
  void reset(unsigned participants, std::atomic<uint64_t>* progress) {
    std::lock_guard<std::mutex> lk(m_);
    expected_ = participants;
    arrived_ = 0;
    progress_ = progress;
    word_.fetch_and(~kAbort);
  }

  // Result::passed: every participant arrived. Result::aborted (abort()
  // was called): the caller's arrival is withdrawn, it no longer participates.
  Result arrive_and_wait() {
    uint32_t phase = 0;
    {
      std::lock_guard<std::mutex> lk(m_);
      progress_->fetch_add(1, std::memory_order_relaxed);
      const uint32_t w = word_.load(std::memory_order_relaxed);
      if (w & kAbort) {
        if (expected_ > 0) --expected_;
        return Result::aborted;
      }
      phase = w & ~kAbort;
      if (++arrived_ >= expected_) {
        complete_locked();
        return Result::passed;
      }
    }
    for (;;) {
      const uint32_t w = word_.load(std::memory_order_acquire);
      if ((w & ~kAbort) != phase) return Result::passed;
      if (w & kAbort) {
        std::lock_guard<std::mutex> lk(m_);
        if ((word_.load(std::memory_order_acquire) & ~kAbort) != phase) return Result::passed;
        --arrived_;  // arrived_ < expected_ still holds: nothing completes
        --expected_;
        return Result::aborted;
      }
      word_.wait(w, std::memory_order_acquire);
    }
  }

  // Leaves the barrier for good (std::barrier::arrive_and_drop semantics).
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lk(m_);
    progress_->fetch_add(1, std::memory_order_relaxed);
    if (expected_ > 0) --expected_;
    if (arrived_ > 0 && arrived_ >= expected_) complete_locked();
  }

  // Releases every waiter, now and later, with Result::aborted.
  void abort() {
    word_.fetch_or(kAbort, std::memory_order_release);
    word_.notify_all();
  }

  Snapshot snapshot() {
    std::lock_guard<std::mutex> lk(m_);
    return Snapshot{expected_, arrived_};
  }

 private:
  static constexpr uint32_t kAbort = 1;

  void complete_locked() {
    arrived_ = 0;
    progress_->fetch_add(1, std::memory_order_relaxed);
    word_.fetch_add(2, std::memory_order_release);  // next phase, abort bit untouched
    word_.notify_all();
  }

  std::mutex m_;
  unsigned expected_ = 0;
  unsigned arrived_ = 0;  // threads waiting in the current phase
  std::atomic<uint64_t>* progress_ = nullptr;
  std::atomic<uint32_t> word_{0};
};

struct Warp {
  Barrier barrier;
  std::array<uint64_t, 32> slots{};  // exchange slots of the warp intrinsics, one per lane
  std::atomic<unsigned> exited{0};   // lanes that returned from (or threw out of) the kernel
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

struct LaunchState {
  dim3 grid, block;
  unsigned threads = 0;
  std::chrono::milliseconds timeout{30000};
  Barrier block_barrier;
  std::unique_ptr<Warp[]> warps;
  unsigned num_warps = 0;
  std::unique_ptr<std::byte, FreeDeleter> smem;
  size_t smem_bytes = 0;
  uint3 block_idx{0, 0, 0};  // the block being run (written by the launching thread between blocks)
  bool done = false;
  std::atomic<bool> abort{false};
  std::atomic<uint64_t> progress{0};     // barrier events and thread exits: the watchdog's heartbeat
  std::atomic<uint32_t> start_gen{0};    // bumped by the launching thread to start a block (or finish)
  std::atomic<unsigned> finished{0};     // threads done with the current block
  std::mutex main_mutex;
  std::condition_variable main_cv;       // the last thread of a block wakes the launching thread
  std::mutex error_mutex;
  std::exception_ptr first_error;

  // Records the first exception and unwinds every thread of the block.
  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lk(error_mutex);
      if (!first_error) first_error = e;
    }
    abort.store(true, std::memory_order_release);
    block_barrier.abort();
    for (unsigned w = 0; w < num_warps; ++w) warps[w].barrier.abort();
  }

  // Who waits where, for the deadlock report; empty when nobody waits.
  std::string waiting_threads() {
    std::string out;
    const Barrier::Snapshot b = block_barrier.snapshot();
    if (b.waiting > 0)
      out += std::to_string(b.waiting) + " of " + std::to_string(b.expected) + " live threads wait at __syncthreads()";
    for (unsigned w = 0; w < num_warps; ++w) {
      const Barrier::Snapshot s = warps[w].barrier.snapshot();
      if (s.waiting == 0) continue;
      out += (out.empty() ? "" : "; ") + std::string("warp ") + std::to_string(w) + ": " + std::to_string(s.waiting) +
             " of " + std::to_string(s.expected) +
             " live lanes wait at __syncwarp() / a warp intrinsic / a WMMA call";
    }
    return out;
  }

  void watch_for_deadlock(uint64_t& last_progress, std::chrono::steady_clock::time_point& since) {
    const uint64_t p = progress.load(std::memory_order_relaxed);
    const auto now = std::chrono::steady_clock::now();
    if (p != last_progress) {
      last_progress = p;
      since = now;
      return;
    }
    if (abort.load() || now - since < timeout) return;
    const std::string who = waiting_threads();
    if (who.empty()) return;  // nobody waits: the threads are computing (or spinning), not deadlocked
    fail(std::make_exception_ptr(deadlock_error(
        "simt: deadlock in block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
        std::to_string(block_idx.z) + "): no thread reached or left a barrier for " +
        std::to_string(timeout.count()) + " ms; " + who +
        " (divergent __syncthreads/__syncwarp, or a warp intrinsic not executed by every live lane)")));
  }
};

struct ThreadState {
  LaunchState* launch = nullptr;
  unsigned linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  unsigned warp = 0;
  unsigned lane = 0;
  bool left_block_barrier = false;
  bool left_warp_barrier = false;
};

inline thread_local ThreadState tls;

inline ThreadState& current(const char* what) {
  if (!tls.launch) throw std::logic_error(std::string("simt: ") + what + " called outside simt::launch");
  return tls;
}

inline std::string where(const ThreadState& t) {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         ") thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
         std::to_string(threadIdx.z) + ") [warp " + std::to_string(t.warp) + " lane " + std::to_string(t.lane) + "]";
}

inline void wait_on(ThreadState& t, Barrier& b, bool& left) {
  LaunchState& L = *t.launch;
  if (b.arrive_and_wait() == Barrier::Result::aborted) {
    left = true;
    throw Aborted{};
  }
  if (L.abort.load(std::memory_order_acquire)) throw Aborted{};
}

inline void block_sync(ThreadState& t) { wait_on(t, t.launch->block_barrier, t.left_block_barrier); }

inline void warp_sync(ThreadState& t, const char*) { wait_on(t, t.launch->warps[t.warp].barrier, t.left_warp_barrier); }

inline void require_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu)
    throw std::logic_error(std::string("simt: ") + what + ": only the full mask 0xffffffff is emulated");
}

// Every lane stores v in its slot, the warp meets, every lane reads the slot
// of `src`, the warp meets again (so no lane overwrites its slot early).
template <class T> T warp_exchange(ThreadState& t, T v, unsigned src, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "simt: warp intrinsics exchange trivially copyable values of at most 8 bytes");
  Warp& w = t.launch->warps[t.warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[t.lane] = bits;
  warp_sync(t, what);
  if ((w.exited.load() >> src) & 1u)
    throw std::logic_error(std::string("simt: ") + what + " at " + where(t) + " reads lane " + std::to_string(src) +
                           ", which has exited (the value is undefined on the GPU)");
  bits = w.slots[src];
  warp_sync(t, what);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

enum class ShflMode { idx, up, down, bfly };

// The source lane of shfl.sync as the PTX ISA defines it (CUDA passes
// c = ((32 - width) << 8) | (up ? 0 : 0x1f)). Out-of-segment sources give the
// lane its own value.
inline unsigned shfl_source(ShflMode mode, unsigned lane, unsigned b, int width, const char* what) {
  if (width < 1 || width > 32 || !std::has_single_bit(static_cast<unsigned>(width)))
    throw std::logic_error(std::string("simt: ") + what + ": width must be a power of two in [1, 32]");
  const int l = static_cast<int>(lane);
  const int bv = static_cast<int>(b & 31u);
  const int segmask = (32 - width) & 31;
  const int clamp = mode == ShflMode::up ? 0 : 31;
  const int max_lane = (l & segmask) | (clamp & ~segmask);
  const int min_lane = l & segmask;
  int j = l;
  bool ok = false;
  switch (mode) {
    case ShflMode::up: j = l - bv; ok = j >= max_lane; break;
    case ShflMode::down: j = l + bv; ok = j <= max_lane; break;
    case ShflMode::bfly: j = l ^ bv; ok = j <= max_lane; break;
    case ShflMode::idx: j = min_lane | (bv & ~segmask); ok = j <= max_lane; break;
  }
  return static_cast<unsigned>(ok ? j : l);
}

template <class T> T shfl(unsigned mask, T v, ShflMode mode, unsigned b, int width, const char* what) {
  require_full_mask(mask, what);
  ThreadState& t = current(what);
  return warp_exchange(t, v, shfl_source(mode, t.lane, b, width, what), what);
}

inline float fast_expf(float x) { return ::expf(x); }

}  // namespace detail

// How long the threads of a block may wait without any barrier progress before
// launch reports a deadlock (whole process; read at each launch).
inline std::chrono::milliseconds deadlock_timeout() {
  return std::chrono::milliseconds(detail::deadlock_timeout_ms_storage().load());
}
inline void set_deadlock_timeout(std::chrono::milliseconds t) {
  detail::deadlock_timeout_ms_storage().store(std::max<long long>(1, t.count()));
}

}  // namespace simt

// ---- shared memory, barriers, warp intrinsics ---------------------------------------

// The current launch's dynamic shared buffer (64-byte aligned, refilled with
// 0xCD bytes at every block start).
inline void* simt_dynamic_shared() { return simt::detail::current("simt_dynamic_shared()").launch->smem.get(); }

inline void __syncthreads() { simt::detail::block_sync(simt::detail::current("__syncthreads()")); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::detail::require_full_mask(mask, "__syncwarp");
  simt::detail::warp_sync(simt::detail::current("__syncwarp()"), "__syncwarp()");
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned __activemask() { return 0xffffffffu; }

template <class T> T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
  return simt::detail::shfl(mask, var, simt::detail::ShflMode::idx, static_cast<unsigned>(srcLane), width,
                            "__shfl_sync");
}
template <class T> T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
  return simt::detail::shfl(mask, var, simt::detail::ShflMode::bfly, static_cast<unsigned>(laneMask), width,
                            "__shfl_xor_sync");
}
template <class T> T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return simt::detail::shfl(mask, var, simt::detail::ShflMode::down, delta, width, "__shfl_down_sync");
}
template <class T> T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return simt::detail::shfl(mask, var, simt::detail::ShflMode::up, delta, width, "__shfl_up_sync");
}

namespace simt::detail {
struct Vote {
  unsigned ballot;  // bit l: lane l is live and its predicate was non-zero
  unsigned live;    // lanes that have not exited
};
inline Vote vote(unsigned mask, int predicate, const char* what) {
  require_full_mask(mask, what);
  ThreadState& t = current(what);
  Warp& w = t.launch->warps[t.warp];
  w.slots[t.lane] = predicate != 0 ? 1u : 0u;
  warp_sync(t, what);
  const unsigned live = ~w.exited.load();
  unsigned r = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (w.slots[i] != 0) r |= 1u << i;
  warp_sync(t, what);
  return Vote{r & live, live};
}
}  // namespace simt::detail

// Exited lanes vote 0 (ballot, any) and are not counted (all), as on the GPU.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return simt::detail::vote(mask, predicate, "__ballot_sync").ballot;
}
inline int __any_sync(unsigned mask, int predicate) {
  return simt::detail::vote(mask, predicate, "__any_sync").ballot != 0u;
}
inline int __all_sync(unsigned mask, int predicate) {
  const simt::detail::Vote v = simt::detail::vote(mask, predicate, "__all_sync");
  return v.ballot == v.live;
}

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }

template <class T> T __ldg(const T* p) { return *p; }

// ---- atomics -----------------------------------------------------------------------------
// Return the old value, as CUDA's do.

inline float atomicAdd(float* address, float val) { return std::atomic_ref<float>(*address).fetch_add(val); }
inline double atomicAdd(double* address, double val) { return std::atomic_ref<double>(*address).fetch_add(val); }
inline int atomicAdd(int* address, int val) { return std::atomic_ref<int>(*address).fetch_add(val); }
inline unsigned atomicAdd(unsigned* address, unsigned val) {
  return std::atomic_ref<unsigned>(*address).fetch_add(val);
}

namespace simt::detail {
template <class T, class Better> T atomic_update(T* address, T val, Better better) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (better(val, old) && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
}  // namespace simt::detail

inline int atomicMax(int* address, int val) {
  return simt::detail::atomic_update(address, val, [](int a, int b) { return a > b; });
}
inline unsigned atomicMax(unsigned* address, unsigned val) {
  return simt::detail::atomic_update(address, val, [](unsigned a, unsigned b) { return a > b; });
}
inline int atomicMin(int* address, int val) {
  return simt::detail::atomic_update(address, val, [](int a, int b) { return a < b; });
}
inline unsigned atomicMin(unsigned* address, unsigned val) {
  return simt::detail::atomic_update(address, val, [](unsigned a, unsigned b) { return a < b; });
}

// ---- math --------------------------------------------------------------------------------
// expf, tanhf, erff, fmaxf, fminf, sqrtf, log1pf, fmaf come from <math.h> at
// global scope (libstdc++'s <math.h> also brings the float overloads of
// exp/tanh/... there). The intrinsics below are exact or libm-accurate, not
// the GPU's approximations.

inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
// glibc's <math.h> already declares an (unlinkable) extern "C" __expf, so the
// CUDA intrinsic is a function-like macro.
#ifdef __expf
#undef __expf
#endif
#define __expf(x) (::simt::detail::fast_expf(x))

// ---- half types ----------------------------------------------------------------------------
// 16-bit storage, bit-compatible with CUDA's / torch's half and bfloat16. No
// arithmetic and no implicit conversions: device code converts with the
// intrinsics below.

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half> && std::is_standard_layout_v<__half>);
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }

// Round to nearest even; subnormals, overflow to inf, inf kept; NaN -> the
// quiet NaN sign|0x7e00 (as torch's c10::Half).
inline __half __float2half_rn(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<unsigned short>(sign | 0x7e00u)};
  if (a >= 0x47800000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65536 (or inf)
  const uint32_t e = a >> 23;
  if (e < 113) {  // below 2^-14: a half subnormal (or zero)
    if (e < 102) return __half{static_cast<unsigned short>(sign)};  // < 2^-25: rounds to zero
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;              // value = mant * 2^(e - 150)
    const uint32_t shift = 126 - e;                                 // half units of 2^-24: mant >> shift
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // may carry into the smallest normal: still right
    return __half{static_cast<unsigned short>(sign | r)};
  }
  uint32_t bits = ((e - 112) << 10) | ((a >> 13) & 0x3ffu);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (bits & 1u))) ++bits;  // a carry rounds up to the next binade / inf
  return __half{static_cast<unsigned short>(sign | bits)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu;
  const uint32_t m = h.__x & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;  // exact
    return sign ? -v : v;
  }
  if (e == 31) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
  return std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
}

// Round to nearest even; NaN kept quiet (as c10::BFloat16 / kernels/bf16.h).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(static_cast<uint32_t>(h.__x) << 16); }

// ---- WMMA ------------------------------------------------------------------------------------

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// float -> tf32 (10-bit mantissa), round to nearest, ties away from zero (cvt.rna.tf32.f32);
// the result is a float whose low 13 mantissa bits are zero.
inline float __float_to_tf32(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7f800000u) == 0x7f800000u)  // inf / NaN: no rounding (NaN kept quiet)
    return std::bit_cast<float>((u & 0x7fffffffu) > 0x7f800000u ? ((u | 0x400000u) & 0xffffe000u) : u);
  return std::bit_cast<float>((u + 0x1000u) & 0xffffe000u);
}

namespace detail {

template <class T> struct storage {
  using type = T;
};
template <> struct storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K> struct tile;
template <int M, int N, int K> struct tile<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct tile<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct tile<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <int M, int N, int K> inline constexpr bool shape_16bit =
    (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16);
template <int M, int N, int K> inline constexpr bool shape_tf32 = M == 16 && N == 16 && K == 8;

template <class Use, int M, int N, int K, class T, class Layout> constexpr bool valid_fragment() {
  constexpr bool is16 = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
  constexpr bool istf32 = std::is_same_v<T, precision::tf32>;
  constexpr bool ab_layout = std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>;
  if constexpr (std::is_same_v<Use, accumulator>)
    return std::is_same_v<T, float> && std::is_void_v<Layout> && (shape_16bit<M, N, K> || shape_tf32<M, N, K>);
  else if constexpr (std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>)
    return ab_layout && ((is16 && shape_16bit<M, N, K>) || (istf32 && shape_tf32<M, N, K>));
  else
    return false;
}

}  // namespace detail

// The whole tile in every lane: x[r * cols + c] is element (r, c). NOT the
// hardware's per-lane mapping (see the header comment).
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static_assert(detail::valid_fragment<Use, M, N, K, T, Layout>(),
                "simt wmma: supported fragments are 16x16x16 / 32x8x16 / 8x32x16 with __half or __nv_bfloat16 "
                "a/b (row_major or col_major) and a float accumulator (Layout void), and 16x16x8 with "
                "precision::tf32 a/b and a float accumulator");
  using element_type = T;
  using storage_element_type = typename detail::storage<T>::type;
  static constexpr int simt_rows = detail::tile<Use, M, N, K>::rows;
  static constexpr int simt_cols = detail::tile<Use, M, N, K>::cols;
  static constexpr int num_elements = simt_rows * simt_cols;
  storage_element_type x[num_elements];
};

namespace detail {

namespace sd = ::simt::detail;

template <class F> inline constexpr bool is_input = false;
template <int M, int N, int K, class T, class L>
inline constexpr bool is_input<fragment<matrix_a, M, N, K, T, L>> = true;
template <int M, int N, int K, class T, class L>
inline constexpr bool is_input<fragment<matrix_b, M, N, K, T, L>> = true;

// What a lane passes to a warp-collective call; lane 0 checks that all agree.
struct Call {
  const void* ptr;
  unsigned ldm;
  int layout;
  const void* frags[3];
  size_t frag_bytes[3];
};

inline void check_ptr(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::invalid_argument(std::string("simt wmma: ") + what + ": the pointer must be 256-bit (32-byte) aligned");
  if ((static_cast<size_t>(ldm) * elem_bytes) % 16 != 0)
    throw std::invalid_argument(std::string("simt wmma: ") + what + ": ldm must be a multiple of 16 bytes");
}

// Warp-collective entry: publish the call, meet, lane 0 checks that every lane
// made the same call (pointer, ldm, layout; fragments bit-identical where
// given), meet again before the work.
inline void collective_enter(sd::ThreadState& t, const Call& call, int nfrags, const char* what) {
  sd::Warp& w = t.launch->warps[t.warp];
  w.slots[t.lane] = reinterpret_cast<uintptr_t>(&call);
  sd::warp_sync(t, what);
  if (const unsigned exited = w.exited.load(); exited != 0)
    throw std::logic_error(std::string("simt wmma: ") + what + ": all 32 lanes must make the call, lane " +
                           std::to_string(std::countr_zero(exited)) + " has exited");
  if (t.lane == 0) {
    for (unsigned l = 1; l < 32; ++l) {
      const Call& o = *reinterpret_cast<const Call*>(static_cast<uintptr_t>(w.slots[l]));
      if (o.ptr != call.ptr || o.ldm != call.ldm || o.layout != call.layout)
        throw std::logic_error(std::string("simt wmma: ") + what + ": lane " + std::to_string(l) +
                               " passed a different pointer/ldm/layout than lane 0 (must be warp-uniform)");
      for (int f = 0; f < nfrags; ++f)
        if (std::memcmp(o.frags[f], call.frags[f], call.frag_bytes[f]) != 0)
          throw std::logic_error(std::string("simt wmma: ") + what + ": lane " + std::to_string(l) +
                                 " holds a different fragment than lane 0: the emulation keeps the whole tile in "
                                 "every lane, so device code must not rely on the per-lane x[] mapping");
    }
  }
  sd::warp_sync(t, what);
}

// Where element (r, c) of a tile lies in memory.
inline size_t offset(bool row_major_layout, int r, int c, unsigned ldm) {
  const size_t rr = static_cast<size_t>(r), cc = static_cast<size_t>(c);
  return row_major_layout ? rr * ldm + cc : cc * ldm + rr;
}

inline float operand(__half v) { return __half2float(v); }
inline float operand(__nv_bfloat16 v) { return __bfloat162float(v); }
// What the tensor core uses of a tf32 operand: the upper 19 bits.
inline float operand(float v) {
  if (std::isnan(v)) return v;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & 0xffffe000u);
}

inline float load_tf32(float v) { return __float_to_tf32(v); }

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout, class V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  using S = typename fragment<Use, M, N, K, T, Layout>::storage_element_type;
  S s;
  if constexpr (std::is_same_v<T, precision::tf32>)
    s = __float_to_tf32(static_cast<float>(v));
  else if constexpr (std::is_same_v<S, __half> && !std::is_same_v<V, __half>)
    s = __float2half(static_cast<float>(v));
  else if constexpr (std::is_same_v<S, __nv_bfloat16> && !std::is_same_v<V, __nv_bfloat16>)
    s = __float2bfloat16(static_cast<float>(v));
  else
    s = static_cast<S>(v);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = s;
}

// matrix_a / matrix_b: the fragment's Layout says how the tile lies in memory.
template <class Use, int M, int N, int K, class T, class Layout>
  requires detail::is_input<fragment<Use, M, N, K, T, Layout>>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                      const typename fragment<Use, M, N, K, T, Layout>::storage_element_type* ptr, unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  constexpr const char* what = "load_matrix_sync";
  ::simt::detail::ThreadState& t = ::simt::detail::current(what);
  detail::check_ptr(ptr, ldm, sizeof(*ptr), what);
  const detail::Call call{ptr, ldm, std::is_same_v<Layout, row_major> ? 0 : 1, {}, {}};
  detail::collective_enter(t, call, 0, what);
  for (int r = 0; r < Frag::simt_rows; ++r)
    for (int c = 0; c < Frag::simt_cols; ++c) {
      const size_t at = detail::offset(std::is_same_v<Layout, row_major>, r, c, ldm);
      if constexpr (std::is_same_v<T, precision::tf32>)
        f.x[r * Frag::simt_cols + c] = detail::load_tf32(ptr[at]);
      else
        f.x[r * Frag::simt_cols + c] = ptr[at];
    }
  __syncwarp();
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, float>;
  constexpr const char* what = "load_matrix_sync(accumulator)";
  ::simt::detail::ThreadState& t = ::simt::detail::current(what);
  detail::check_ptr(ptr, ldm, sizeof(float), what);
  const detail::Call call{ptr, ldm, static_cast<int>(layout), {}, {}};
  detail::collective_enter(t, call, 0, what);
  for (int r = 0; r < Frag::simt_rows; ++r)
    for (int c = 0; c < Frag::simt_cols; ++c)
      f.x[r * Frag::simt_cols + c] = ptr[detail::offset(layout == mem_row_major, r, c, ldm)];
  __syncwarp();
}

// Lane 0 writes the tile (the other lanes hold identical copies, checked).
template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, float>;
  constexpr const char* what = "store_matrix_sync";
  ::simt::detail::ThreadState& t = ::simt::detail::current(what);
  detail::check_ptr(ptr, ldm, sizeof(float), what);
  const detail::Call call{ptr, ldm, static_cast<int>(layout), {&f, nullptr, nullptr}, {sizeof(f), 0, 0}};
  detail::collective_enter(t, call, 1, what);
  if (t.lane == 0)
    for (int r = 0; r < Frag::simt_rows; ++r)
      for (int c = 0; c < Frag::simt_cols; ++c) {
        ptr[detail::offset(layout == mem_row_major, r, c, ldm)] = f.x[r * Frag::simt_cols + c];
      }
  __syncwarp();
}

// d = a * b + c: products of the (converted) inputs in float, summed in float
// in k order starting from c. d may be c.
template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  constexpr const char* what = "mma_sync";
  ::simt::detail::ThreadState& t = ::simt::detail::current(what);
  const detail::Call call{nullptr, 0, 0, {&a, &b, &c}, {sizeof(a), sizeof(b), sizeof(c)}};
  detail::collective_enter(t, call, 3, what);
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += detail::operand(a.x[i * K + k]) * detail::operand(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
  __syncwarp();
}

}  // namespace nvcuda::wmma

// ---- launch ------------------------------------------------------------------------------------

namespace simt {

namespace detail {

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// The process's block threads: created on demand (grow-only, at most 1024),
// parked between launches, never destroyed (detached and intentionally
// leaked, so nothing needs joining at exit). Used under launch_mutex only.
class ThreadPool {
 public:
  using Job = void (*)(void* context, unsigned thread);

  static ThreadPool& instance() {
    static ThreadPool* const pool = new ThreadPool;
    return *pool;
  }

  // Starts job(context, i) on threads i = 0 .. n-1. Throws (std::system_error)
  // before starting anything if the threads cannot be created.
  void start(unsigned n, Job job, void* context) {
    grow(n);
    job_ = job;
    context_ = context;
    remaining_.store(n, std::memory_order_relaxed);
    for (unsigned i = 0; i < n; ++i) {
      slots_[i]->generation.fetch_add(1, std::memory_order_release);
      slots_[i]->generation.notify_one();
    }
  }

  // Returns once every thread of the last start() returned from the job.
  void wait() {
    for (;;) {
      const unsigned r = remaining_.load(std::memory_order_acquire);
      if (r == 0) return;
      remaining_.wait(r, std::memory_order_acquire);
    }
  }

 private:
  struct alignas(64) Slot {
    std::atomic<uint32_t> generation{0};
  };

  void grow(unsigned n) {
    slots_.reserve(n);
    while (slots_.size() < n) {
      auto slot = std::make_unique<Slot>();
      const unsigned i = static_cast<unsigned>(slots_.size());
      std::thread([this, s = slot.get(), i] { loop(*s, i); }).detach();
      slots_.push_back(std::move(slot));  // no reallocation: reserved
    }
  }

  void loop(Slot& slot, unsigned i) {
    uint32_t seen = 0;
    for (;;) {
      slot.generation.wait(seen, std::memory_order_acquire);
      seen = slot.generation.load(std::memory_order_acquire);
      job_(context_, i);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_all();
    }
  }

  std::vector<std::unique_ptr<Slot>> slots_;
  Job job_ = nullptr;
  void* context_ = nullptr;
  std::atomic<unsigned> remaining_{0};
};

inline void validate(dim3 grid, dim3 block, size_t smem) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("simt::launch: " + m); };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("every grid dimension must be >= 1");
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) bad("grid exceeds CUDA's limits");
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("every block dimension must be >= 1");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u) bad("block dimension exceeds CUDA's limits");
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n > 1024u) bad("a block has at most 1024 threads, got " + std::to_string(n));
  if (n % 32u != 0)
    bad("the emulation needs whole warps: block threads must be a multiple of 32, got " + std::to_string(n));
  if (smem > 227u * 1024u) bad("dynamic shared memory above 227 KiB (" + std::to_string(smem) + " bytes)");
}

template <class Invoke> void worker(LaunchState& L, unsigned linear, const Invoke& invoke) {
  tls = ThreadState{&L, linear, linear / 32u, linear % 32u, false, false};
  blockDim = L.block;
  gridDim = L.grid;
  threadIdx = uint3{linear % L.block.x, (linear / L.block.x) % L.block.y, linear / (L.block.x * L.block.y)};
  uint32_t seen = 0;
  for (;;) {
    L.start_gen.wait(seen, std::memory_order_acquire);  // the next block (or the end)
    seen = L.start_gen.load(std::memory_order_acquire);
    if (L.done) break;
    blockIdx = L.block_idx;
    tls.left_block_barrier = tls.left_warp_barrier = false;
    try {
      invoke();
    } catch (const Aborted&) {
    } catch (...) {
      L.fail(std::current_exception());
    }
    // An exited thread no longer holds up the barriers of its block.
    L.warps[tls.warp].exited.fetch_or(1u << tls.lane);
    if (!tls.left_block_barrier) L.block_barrier.arrive_and_drop();
    if (!tls.left_warp_barrier) L.warps[tls.warp].barrier.arrive_and_drop();
    if (L.finished.fetch_add(1, std::memory_order_acq_rel) + 1 == L.threads) {
      std::lock_guard<std::mutex> lk(L.main_mutex);
      L.main_cv.notify_one();
    }
  }
  tls = ThreadState{};
}

template <class Invoke> struct Job {
  LaunchState* launch;
  const Invoke* invoke;
  static void run(void* context, unsigned thread) {
    const Job& job = *static_cast<const Job*>(context);
    try {
      worker(*job.launch, thread, *job.invoke);
    } catch (...) {  // only the emulation's own bookkeeping can get here (e.g. bad_alloc)
      job.launch->fail(std::current_exception());
    }
  }
};

inline void start_next(LaunchState& L) {
  L.finished.store(0, std::memory_order_relaxed);
  L.start_gen.fetch_add(1, std::memory_order_release);
  L.start_gen.notify_all();
}

}  // namespace detail

// Runs kernel(args...) over grid x block threads, blocks one after another,
// each block's threads on threads of a process-wide pool.
// Rethrows the first exception a kernel thread threw; throws
// std::invalid_argument for a launch configuration CUDA or the emulation rejects.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "simt::launch: wrong number of kernel arguments");
  if (detail::tls.launch) throw std::logic_error("simt::launch: launching from inside a kernel is not emulated");
  detail::validate(grid, block, dynamic_smem_bytes);
  const std::tuple<std::remove_cvref_t<P>...> params(std::forward<A>(args)...);
  const auto invoke = [&] { std::apply(kernel, params); };

  std::lock_guard<std::mutex> serial(detail::launch_mutex());
  detail::LaunchState L;
  L.grid = grid;
  L.block = block;
  L.threads = block.x * block.y * block.z;
  L.timeout = deadlock_timeout();
  L.num_warps = L.threads / 32u;
  L.warps = std::make_unique<detail::Warp[]>(L.num_warps);
  L.smem_bytes = dynamic_smem_bytes;
  const size_t alloc = (std::max<size_t>(dynamic_smem_bytes, 1) + 63) / 64 * 64;
  L.smem.reset(static_cast<std::byte*>(std::aligned_alloc(64, alloc)));
  if (!L.smem) throw std::bad_alloc();

  detail::ThreadPool& pool = detail::ThreadPool::instance();
  detail::Job<decltype(invoke)> job{&L, &invoke};
  pool.start(L.threads, &detail::Job<decltype(invoke)>::run, &job);

  const std::chrono::milliseconds poll = std::min(L.timeout, std::chrono::milliseconds(100));
  for (unsigned z = 0; z < grid.z && !L.abort.load(); ++z)
    for (unsigned y = 0; y < grid.y && !L.abort.load(); ++y)
      for (unsigned x = 0; x < grid.x && !L.abort.load(); ++x) {
        L.block_idx = uint3{x, y, z};
        L.block_barrier.reset(L.threads, &L.progress);
        for (unsigned w = 0; w < L.num_warps; ++w) {
          L.warps[w].barrier.reset(32, &L.progress);
          L.warps[w].exited.store(0);
        }
        std::memset(L.smem.get(), 0xCD, alloc);
        detail::start_next(L);
        std::unique_lock<std::mutex> lk(L.main_mutex);
        uint64_t last_progress = L.progress.load();
        auto since = std::chrono::steady_clock::now();
        while (L.finished.load(std::memory_order_acquire) < L.threads) {
          L.main_cv.wait_for(lk, poll, [&] { return L.finished.load(std::memory_order_acquire) >= L.threads; });
          L.watch_for_deadlock(last_progress, since);
        }
      }
  L.done = true;
  detail::start_next(L);
  pool.wait();
  if (L.first_error) std::rethrow_exception(L.first_error);
}

}  // namespace simt
