// The FMA peak loop (fma_peak.h), one variant per ISA in this one file: each
// variant is a single function with its own target attribute and uses only
// compiler intrinsics inside it, so no code built for AVX-512 or AVX2 can be
// shared with (or merged by the linker into) the baseline variant. The other
// kernels need per-ISA translation units because their templates and inline
// helpers would otherwise be compiled once for one target.
//
// A round updates kAcc independent accumulators, acc = acc * kMul + kAdd, one
// FMA each. kAcc covers latency x ports with room to spare: AVX-512 16 zmm
// (latency 4, 2 ports: 8 needed), AVX2 12 ymm (latency 4-5, 2 ports: 10).
// acc converges to kAdd / (1 - kMul) = 1, so no value overflows or becomes
// denormal however long the loop runs.
#include "fma_peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SEQFUSE_FMA_X86 1
#endif

namespace seqfuse::kernels {
namespace {

constexpr float kMul = 0.9999f;
constexpr float kAdd = 1e-4f;

// A loop variant: runs `rounds` rounds starting from accumulators derived
// from `seed` and returns their sum. Feeding each call the previous result
// makes every call depend on the one before, so the compiler can neither drop
// nor hoist it (the function is pure).
using FmaLoop = float (*)(float seed, int64_t rounds);

struct Variant {
  FmaLoop loop;
  int64_t flops_per_round;
};

#ifdef SEQFUSE_FMA_X86
__attribute__((target("avx512f"), noinline)) float fma_loop_avx512(float seed, int64_t rounds) {
  constexpr int kAcc = 16;
  __m512 acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = _mm512_set1_ps(seed + 0.001f * static_cast<float>(k));
  const __m512 mul = _mm512_set1_ps(kMul), add = _mm512_set1_ps(kAdd);
  for (int64_t i = 0; i < rounds; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kAcc; ++k) acc[k] = _mm512_fmadd_ps(acc[k], mul, add);
  }
  __m512 sum = acc[0];
  for (int k = 1; k < kAcc; ++k) sum = _mm512_add_ps(sum, acc[k]);
  alignas(64) float lanes[16];  // not _mm512_reduce_add_ps: GCC 12's trips -Wuninitialized
  _mm512_store_ps(lanes, sum);
  float total = 0.0f;
  for (float v : lanes) total += v;
  return total / (16.0f * kAcc);
}

// The bfloat16 product peak: vdpbf16ps, acc += a[2i] * b[2i] + a[2i+1] *
// b[2i+1] per lane, 4 flops. a * b is small and positive, so the
// accumulators grow by ~2e-6 per round and stay far from overflow and from
// subnormals (which the instruction flushes) however long the loop runs.
__attribute__((target("avx512f,avx512bf16"), noinline)) float dot_loop_avx512bf16(float seed, int64_t rounds) {
  constexpr int kAcc = 16;
  __m512 acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = _mm512_set1_ps(seed + 0.001f * static_cast<float>(k));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (int64_t i = 0; i < rounds; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kAcc; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], a, a);
  }
  __m512 sum = acc[0];
  for (int k = 1; k < kAcc; ++k) sum = _mm512_add_ps(sum, acc[k]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  float total = 0.0f;
  for (float v : lanes) total += v;
  return total / (16.0f * kAcc) * 1e-3f;  // back near the seed's size for the next call
}

__attribute__((target("avx2,fma"), noinline)) float fma_loop_avx2(float seed, int64_t rounds) {
  constexpr int kAcc = 12;
  __m256 acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = _mm256_set1_ps(seed + 0.001f * static_cast<float>(k));
  const __m256 mul = _mm256_set1_ps(kMul), add = _mm256_set1_ps(kAdd);
  for (int64_t i = 0; i < rounds; ++i) {
#pragma GCC unroll 12
    for (int k = 0; k < kAcc; ++k) acc[k] = _mm256_fmadd_ps(acc[k], mul, add);
  }
  __m256 sum = acc[0];
  for (int k = 1; k < kAcc; ++k) sum = _mm256_add_ps(sum, acc[k]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.0f;
  for (float v : lanes) total += v;
  return total / (8.0f * kAcc);
}
#endif

// Any CPU: 16-byte vectors. On x86-64 (SSE2) a multiply and an add; elsewhere
// the compiler contracts them into the CPU's FMA (e.g. NEON fmla).
__attribute__((noinline)) float fma_loop_baseline(float seed, int64_t rounds) {
  typedef float V4 __attribute__((vector_size(16)));
  constexpr int kAcc = 12;
  V4 acc[kAcc];
  for (int k = 0; k < kAcc; ++k) {
    const float v = seed + 0.001f * static_cast<float>(k);
    acc[k] = V4{v, v, v, v};
  }
  const V4 mul = {kMul, kMul, kMul, kMul}, add = {kAdd, kAdd, kAdd, kAdd};
  for (int64_t i = 0; i < rounds; ++i) {
#pragma GCC unroll 12
    for (int k = 0; k < kAcc; ++k) acc[k] = acc[k] * mul + add;
  }
  V4 sum = acc[0];
  for (int k = 1; k < kAcc; ++k) sum += acc[k];
  return (sum[0] + sum[1] + sum[2] + sum[3]) / (4.0f * kAcc);
}

Variant variant_for(Isa isa, Product product) {
#ifdef SEQFUSE_FMA_X86
  if (product == Product::Bf16Dot && isa == Isa::Avx512Bf16) return {dot_loop_avx512bf16, 16 * 16 * 4};
  if (isa == Isa::Avx512 || isa == Isa::Avx512Bf16) return {fma_loop_avx512, 16 * 16 * 2};
  if (isa == Isa::Avx2) return {fma_loop_avx2, 12 * 8 * 2};
#endif
  (void)isa;
  (void)product;
  return {fma_loop_baseline, 12 * 4 * 2};
}

// Rounds between two clock reads: ~10 us of work, so the clock costs < 1%.
constexpr int64_t kChunk = 4096;

}  // namespace

double fma_peak_gflops(int threads, double seconds, Isa isa, Product product) {
  threads = std::max(1, threads);
  if (!(seconds > 0.0)) seconds = 0.2;
  if (static_cast<int>(isa) > static_cast<int>(detect_isa())) isa = detect_isa();
  const Variant v = variant_for(isa, product);
  const double warm_up = std::min(0.05, seconds / 4);

  // Each thread's own rate over its own timed interval; the threads start
  // together (a spin barrier) so the intervals overlap, and the sum is the
  // machine's rate with `threads` cores busy.
  std::vector<double> rate(static_cast<size_t>(threads), 0.0);
  std::vector<float> sink(static_cast<size_t>(threads), 0.0f);
  std::atomic<int> waiting{threads};
  auto work = [&](int t) {
    using clock = std::chrono::steady_clock;
    waiting.fetch_sub(1, std::memory_order_acq_rel);
    while (waiting.load(std::memory_order_acquire) > 0) std::this_thread::yield();
    float seed = 1.0f;
    const auto warm_start = clock::now();
    while (std::chrono::duration<double>(clock::now() - warm_start).count() < warm_up) seed = v.loop(seed, kChunk);
    int64_t rounds = 0;
    const auto start = clock::now();
    double elapsed = 0.0;
    do {
      seed = v.loop(seed, kChunk);
      rounds += kChunk;
      elapsed = std::chrono::duration<double>(clock::now() - start).count();
    } while (elapsed < seconds);
    rate[static_cast<size_t>(t)] = static_cast<double>(rounds) * static_cast<double>(v.flops_per_round) / elapsed;
    sink[static_cast<size_t>(t)] = seed;
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();

  double total = 0.0;
  float check = 0.0f;
  for (int t = 0; t < threads; ++t) {
    total += rate[static_cast<size_t>(t)];
    check += sink[static_cast<size_t>(t)];
  }
  // The accumulators stay near 1; a result that is not finite means the loop
  // did not compute what it counts.
  if (!(check == check)) return 0.0;
  return total / 1e9;
}

}  // namespace seqfuse::kernels
