// Self-tests of the SIMT emulation layer (csrc/kernels/cuda/simt/simt_emulation.h):
// CUDA-style kernels run through simt::launch on the CPU, checked against host
// references. Indices and block order, __syncthreads-ordered shared memory,
// every shuffle mode (with widths), votes, dynamic shared memory, atomics
// across blocks, WMMA half / bf16 / tf32 products against double references,
// exceptions and deadlocks reported by launch, the misuse the layer catches,
// and the half / bfloat16 / tf32 conversions (half against g++'s _Float16).
#include "simt_emulation.h"

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/bf16.h"

// ---- a minimal check framework (the style of tests/cpp/check.h) -----------------------

namespace check {

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& tests() {
  static std::vector<TestCase> all;
  return all;
}
inline int64_t passed = 0;
inline int64_t failed = 0;

inline bool add(const char* name, void (*fn)()) {
  tests().push_back({name, fn});
  return true;
}

inline void record(bool ok, const char* file, int line, const char* expr, const std::string& message) {
  if (ok) {
    ++passed;
    return;
  }
  ++failed;
  if (failed <= 100) std::printf("%s:%d: CHECK(%s) failed: %s\n", file, line, expr, message.c_str());
}

inline int run_all() {
  for (const TestCase& test : tests()) {
    const int64_t failed_before = failed;
    const auto start = std::chrono::steady_clock::now();
    try {
      test.fn();
    } catch (const std::exception& e) {
      record(false, __FILE__, __LINE__, test.name, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      record(false, __FILE__, __LINE__, test.name, "uncaught non-standard exception");
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("%s %s (%.0f ms)\n", failed == failed_before ? "[  OK  ]" : "[FAILED]", test.name, ms);
    std::fflush(stdout);
  }
  std::printf("%lld passed, %lld failed\n", static_cast<long long>(passed), static_cast<long long>(failed));
  return failed == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK(cond, message)                                           \
  do {                                                                 \
    const bool check_ok_ = static_cast<bool>(cond);                    \
    std::string check_msg_;                                            \
    if (!check_ok_) {                                                  \
      std::ostringstream check_os_;                                    \
      check_os_ << message;                                            \
      check_msg_ = check_os_.str();                                    \
    }                                                                  \
    ::check::record(check_ok_, __FILE__, __LINE__, #cond, check_msg_); \
  } while (0)

// CHECK_THROWS(Exception, statement, substring of what())
#define CHECK_THROWS(Exception, statement, substring)                                                  \
  do {                                                                                                 \
    std::string check_what_ = "<nothing thrown>";                                                      \
    bool check_thrown_ = false;                                                                        \
    try {                                                                                              \
      statement;                                                                                       \
    } catch (const Exception& e) {                                                                     \
      check_thrown_ = true;                                                                            \
      check_what_ = e.what();                                                                          \
    } catch (const std::exception& e) {                                                                \
      check_what_ = std::string("other exception: ") + e.what();                                       \
    } catch (...) {                                                                                    \
      check_what_ = "non-standard exception";                                                          \
    }                                                                                                  \
    CHECK(check_thrown_ && check_what_.find(substring) != std::string::npos,                           \
          "expected " #Exception " containing \"" << substring << "\" from `" #statement "`, got: " << check_what_); \
  } while (0)

#define TEST(name)                                                                  \
  static void name();                                                               \
  [[maybe_unused]] static const bool name##_registered_ = ::check::add(#name, name); \
  static void name()

namespace {

constexpr unsigned kFull = 0xffffffffu;

// 64-byte aligned storage (WMMA needs 32-byte aligned tiles; std::vector gives 16).
template <class T> struct Aligned {
  explicit Aligned(size_t n) : size(n), data(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {
    if (!data) throw std::bad_alloc();
  }
  ~Aligned() { std::free(data); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  T& operator[](size_t i) { return data[i]; }
  const T& operator[](size_t i) const { return data[i]; }
  size_t size;
  T* data;
};

__device__ __forceinline__ unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned linear_block() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// ---- dim3 and indices ------------------------------------------------------------------------

TEST(dim3_constructors) {
  const dim3 a;
  const dim3 b(5);
  const dim3 c(2, 3);
  const dim3 d(2, 3, 4);
  const dim3 e(uint3{7, 8, 9});
  CHECK(a.x == 1 && a.y == 1 && a.z == 1, "dim3()");
  CHECK(b.x == 5 && b.y == 1 && b.z == 1, "dim3(5)");
  CHECK(c.x == 2 && c.y == 3 && c.z == 1, "dim3(2, 3)");
  CHECK(d.x == 2 && d.y == 3 && d.z == 4, "dim3(2, 3, 4)");
  CHECK(e.x == 7 && e.y == 8 && e.z == 9, "dim3(uint3)");
  CHECK(warpSize == 32, warpSize);
}

constexpr unsigned kRecord = 8;

__global__ void indices_kernel(unsigned* records, unsigned* order, unsigned* next) {
  const unsigned t = linear_thread();
  const unsigned b = linear_block();
  unsigned* r = records + (static_cast<size_t>(b) * block_threads() + t) * kRecord;
  r[0] = threadIdx.x;
  r[1] = threadIdx.y;
  r[2] = threadIdx.z;
  r[3] = blockIdx.x;
  r[4] = blockIdx.y;
  r[5] = blockIdx.z;
  r[6] = blockDim.x | blockDim.y << 10 | blockDim.z << 20;
  r[7] = gridDim.x | gridDim.y << 10 | gridDim.z << 20;
  if (t == 0) order[atomicAdd(next, 1u)] = b;
}

void check_indices(dim3 grid, dim3 block) {
  const unsigned nb = grid.x * grid.y * grid.z;
  const unsigned nt = block.x * block.y * block.z;
  std::vector<unsigned> records(static_cast<size_t>(nb) * nt * kRecord, 0xffffffffu);
  std::vector<unsigned> order(nb, 0xffffffffu);
  unsigned next = 0;
  simt::launch(indices_kernel, grid, block, 0, records.data(), order.data(), &next);
  CHECK(next == nb, next);
  for (unsigned i = 0; i < nb; ++i) CHECK(order[i] == i, "block " << order[i] << " ran as number " << i);
  int64_t bad = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx) {
              const unsigned b = bx + grid.x * (by + grid.y * bz);
              const unsigned t = tx + block.x * (ty + block.y * tz);
              const unsigned* r = &records[(static_cast<size_t>(b) * nt + t) * kRecord];
              const unsigned want[kRecord] = {tx, ty, tz, bx, by, bz, block.x | block.y << 10 | block.z << 20,
                                              grid.x | grid.y << 10 | grid.z << 20};
              for (unsigned k = 0; k < kRecord; ++k) bad += r[k] != want[k];
            }
  CHECK(bad == 0, bad << " wrong index fields for grid (" << grid.x << "," << grid.y << "," << grid.z << ") block ("
                      << block.x << "," << block.y << "," << block.z << ")");
}

TEST(indices_3x2_grid_of_64_thread_blocks) {
  check_indices(dim3(3, 2), dim3(64));
  check_indices(dim3(2, 1, 2), dim3(8, 4, 2));
  check_indices(dim3(1), dim3(32, 1, 3));
}

// ---- __syncthreads and static shared memory ------------------------------------------------

__global__ void block_reduce_kernel(const float* in, float* out) {
  __shared__ float s[1024];
  const unsigned t = threadIdx.x;
  const unsigned n = blockDim.x;
  s[t] = in[blockIdx.x * n + t];
  __syncthreads();
  for (unsigned stride = n / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

TEST(syncthreads_shared_memory_reduction) {
  for (const unsigned n : {64u, 256u, 1024u}) {
    const unsigned blocks = n == 1024 ? 2 : 5;
    std::vector<float> in(static_cast<size_t>(blocks) * n);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((i * 37) % 101);  // integers: exact sums
    std::vector<float> out(blocks, -1.0f);
    simt::launch(block_reduce_kernel, dim3(blocks), dim3(n), 0, in.data(), out.data());
    for (unsigned b = 0; b < blocks; ++b) {
      double want = 0;
      for (unsigned t = 0; t < n; ++t) want += in[static_cast<size_t>(b) * n + t];
      CHECK(out[b] == want, "n=" << n << " block " << b << ": " << out[b] << " != " << want);
    }
  }
}

// ---- shuffles ---------------------------------------------------------------------------------

template <class T> __device__ T warp_sum_xor(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

__global__ void warp_xor_kernel(const float* fin, float* fout, const double* din, double* dout, const int* iin,
                                int* iout, const unsigned* uin, unsigned* uout) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  fout[g] = warp_sum_xor(fin[g]);
  dout[g] = warp_sum_xor(din[g]);
  iout[g] = warp_sum_xor(iin[g]);
  uout[g] = warp_sum_xor(uin[g]);
}

TEST(shfl_xor_warp_reduction) {
  const unsigned blocks = 2, threads = 128, n = blocks * threads;
  std::vector<float> fin(n), fout(n);
  std::vector<double> din(n), dout(n);
  std::vector<int> iin(n), iout(n);
  std::vector<unsigned> uin(n), uout(n);
  for (unsigned i = 0; i < n; ++i) {
    fin[i] = static_cast<float>(i % 13) - 6.0f;
    din[i] = 0.25 * i + 1e-9;
    iin[i] = static_cast<int>(i * 7) - 500;
    uin[i] = 0x10000000u + i * 3;
  }
  simt::launch(warp_xor_kernel, blocks, threads, 0, fin.data(), fout.data(), din.data(), dout.data(), iin.data(),
               iout.data(), uin.data(), uout.data());
  int64_t bad = 0;
  for (unsigned w = 0; w < n / 32; ++w) {
    double fs = 0, ds = 0;
    int is = 0;
    unsigned us = 0;
    for (unsigned l = 0; l < 32; ++l) {
      fs += fin[w * 32 + l];
      ds += din[w * 32 + l];
      is += iin[w * 32 + l];
      us += uin[w * 32 + l];
    }
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = w * 32 + l;
      bad += fout[g] != fs;
      bad += std::abs(dout[g] - ds) > 1e-12 * std::abs(ds);
      bad += iout[g] != is;
      bad += uout[g] != us;
    }
  }
  CHECK(bad == 0, bad << " lanes with a wrong butterfly sum");
}

// One launch runs every shuffle mode; out[g * kModes + m] is mode m's result in lane g.
constexpr unsigned kModes = 12;

__global__ void shuffle_modes_kernel(const int* in, int* out) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = in[g];
  int* o = out + static_cast<size_t>(g) * kModes;
  o[0] = __shfl_sync(kFull, v, 5);         // broadcast lane 5
  o[1] = __shfl_sync(kFull, v, 37);        // srcLane is taken mod 32
  o[2] = __shfl_sync(kFull, v, 3, 8);      // lane 3 of each group of 8
  o[3] = __shfl_xor_sync(kFull, v, 1);
  o[4] = __shfl_xor_sync(kFull, v, 16, 16);  // later group: own value; earlier group: allowed
  o[5] = __shfl_down_sync(kFull, v, 4);
  o[6] = __shfl_down_sync(kFull, v, 4, 16);
  o[7] = __shfl_up_sync(kFull, v, 3);
  o[8] = __shfl_up_sync(kFull, v, 3, 8);
  o[9] = __shfl_down_sync(kFull, v, 0);
  // inclusive prefix sum with __shfl_up_sync
  int x = v;
  for (unsigned d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(kFull, x, d);
    if ((threadIdx.x & 31) >= d) x += y;
  }
  o[10] = x;
  // tree reduction with __shfl_down_sync: lane 0 gets the warp sum
  int s = v;
  for (unsigned d = 16; d > 0; d /= 2) s += __shfl_down_sync(kFull, s, d);
  o[11] = s;
}

// CUDA's documented semantics, written independently of the PTX formulas the layer uses.
int ref_idx(const int* w, int lane, int src, int width) { return w[(lane & ~(width - 1)) + (src & (width - 1))]; }
int ref_xor(const int* w, int lane, int m, int width) {
  const int j = lane ^ m;
  return (j & ~(width - 1)) > (lane & ~(width - 1)) ? w[lane] : w[j];
}
int ref_down(const int* w, int lane, int d, int width) {
  const int j = lane + d;
  return j > (lane | (width - 1)) ? w[lane] : w[j];
}
int ref_up(const int* w, int lane, int d, int width) {
  const int j = lane - d;
  return j < (lane & ~(width - 1)) ? w[lane] : w[j];
}

TEST(shfl_modes_and_widths) {
  const unsigned blocks = 3, threads = 64, n = blocks * threads;
  std::vector<int> in(n), out(static_cast<size_t>(n) * kModes, -1);
  for (unsigned i = 0; i < n; ++i) in[i] = static_cast<int>(i * 7 + 3);
  simt::launch(shuffle_modes_kernel, blocks, threads, 0, in.data(), out.data());
  int64_t bad = 0;
  std::string first;
  for (unsigned g = 0; g < n; ++g) {
    const int* w = &in[g / 32 * 32];
    const int lane = static_cast<int>(g % 32);
    int prefix = 0;
    for (int l = 0; l <= lane; ++l) prefix += w[l];
    int sum = 0;
    for (int l = 0; l < 32; ++l) sum += w[l];
    const int want[kModes] = {ref_idx(w, lane, 5, 32),  ref_idx(w, lane, 37, 32), ref_idx(w, lane, 3, 8),
                              ref_xor(w, lane, 1, 32),  ref_xor(w, lane, 16, 16), ref_down(w, lane, 4, 32),
                              ref_down(w, lane, 4, 16), ref_up(w, lane, 3, 32),   ref_up(w, lane, 3, 8),
                              w[lane],                  prefix,                   sum};
    for (unsigned m = 0; m < kModes; ++m) {
      if (m == 11 && lane != 0) continue;  // only lane 0 holds the tree sum
      const int got = out[static_cast<size_t>(g) * kModes + m];
      if (got != want[m]) {
        if (bad++ == 0)
          first = "lane " + std::to_string(g) + " mode " + std::to_string(m) + ": " + std::to_string(got) +
                  " != " + std::to_string(want[m]);
      }
    }
  }
  CHECK(bad == 0, bad << " wrong shuffle results, first: " << first);
}

// ---- votes ------------------------------------------------------------------------------------

__global__ void vote_kernel(const int* pred, unsigned* ballot, int* any, int* all) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = pred[g];
  ballot[g] = __ballot_sync(kFull, p);
  any[g] = __any_sync(kFull, p);
  all[g] = __all_sync(kFull, p);
}

TEST(ballot_any_all) {
  const unsigned blocks = 2, threads = 64, n = blocks * threads;
  std::vector<int> pred(n);
  for (unsigned g = 0; g < n; ++g) {
    const unsigned w = g / 32, l = g % 32;
    pred[g] = w == 0 ? static_cast<int>(l % 2) * 5 : w == 1 ? 1 : w == 2 ? 0 : (l == 31 ? -3 : 0);
  }
  std::vector<unsigned> ballot(n);
  std::vector<int> any(n), all(n);
  simt::launch(vote_kernel, blocks, threads, 0, pred.data(), ballot.data(), any.data(), all.data());
  const unsigned want_ballot[4] = {0xaaaaaaaau, 0xffffffffu, 0u, 0x80000000u};
  const int want_any[4] = {1, 1, 0, 1};
  const int want_all[4] = {0, 1, 0, 0};
  int64_t bad = 0;
  for (unsigned g = 0; g < n; ++g) {
    const unsigned w = g / 32;
    bad += ballot[g] != want_ballot[w];
    bad += (any[g] != 0) != (want_any[w] != 0);
    bad += (all[g] != 0) != (want_all[w] != 0);
  }
  CHECK(bad == 0, bad << " wrong votes");
}

// ---- dynamic shared memory ---------------------------------------------------------------------

__global__ void dynamic_smem_kernel(unsigned bytes, unsigned* not_garbage, unsigned* misaligned, unsigned* out) {
  unsigned char* smem = static_cast<unsigned char*>(simt_dynamic_shared());
  const unsigned t = threadIdx.x, n = blockDim.x;
  if (reinterpret_cast<uintptr_t>(smem) % 64 != 0) atomicAdd(misaligned, 1u);
  // Every byte is the 0xCD garbage pattern at block start, also after the previous block wrote.
  for (unsigned i = t; i < bytes; i += n)
    if (smem[i] != 0xCD) atomicAdd(not_garbage, 1u);
  __syncthreads();
  unsigned* words = reinterpret_cast<unsigned*>(smem);
  words[t] = blockIdx.x * 1000 + t;
  __syncthreads();
  out[blockIdx.x * n + t] = words[(t + 1) % n];
}

TEST(dynamic_shared_memory) {
  const unsigned blocks = 3, threads = 96, bytes = 1000;  // not a multiple of 64
  unsigned not_garbage = 0, misaligned = 0;
  std::vector<unsigned> out(blocks * threads, 0);
  simt::launch(dynamic_smem_kernel, blocks, threads, bytes, bytes, &not_garbage, &misaligned, out.data());
  CHECK(not_garbage == 0, not_garbage << " bytes were not 0xCD at block start");
  CHECK(misaligned == 0, misaligned);
  int64_t bad = 0;
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) bad += out[b * threads + t] != b * 1000 + (t + 1) % threads;
  CHECK(bad == 0, bad << " wrong words exchanged through dynamic shared memory");
}

// ---- atomics ------------------------------------------------------------------------------------

__global__ void atomics_kernel(float* fsum, double* dsum, int* counter, int* tickets, int* imax, int* imin,
                               unsigned* umax) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(fsum, 1.0f);
  atomicAdd(dsum, 0.5);
  tickets[g] = atomicAdd(counter, 1);
  atomicMax(imax, static_cast<int>((g * 37) % 1000) - 300);
  atomicMin(imin, static_cast<int>((g * 37) % 1000) - 300);
  atomicMax(umax, g * 3u);
}

TEST(atomics_across_blocks) {
  const unsigned blocks = 6, threads = 128, n = blocks * threads;
  float fsum = 0;
  double dsum = 0;
  int counter = 0, imax = std::numeric_limits<int>::min(), imin = std::numeric_limits<int>::max();
  unsigned umax = 0;
  std::vector<int> tickets(n, -1);
  simt::launch(atomics_kernel, blocks, threads, 0, &fsum, &dsum, &counter, tickets.data(), &imax, &imin, &umax);
  CHECK(fsum == static_cast<float>(n), fsum);
  CHECK(dsum == 0.5 * n, dsum);
  CHECK(counter == static_cast<int>(n), counter);
  std::vector<int> seen(n, 0);
  int64_t bad = 0;
  for (int t : tickets) {
    if (t < 0 || t >= static_cast<int>(n)) {
      ++bad;
      continue;
    }
    bad += seen[static_cast<size_t>(t)]++ != 0;
  }
  CHECK(bad == 0, "atomicAdd's old values are not a permutation: " << bad);
  int want_max = std::numeric_limits<int>::min(), want_min = std::numeric_limits<int>::max();
  for (unsigned g = 0; g < n; ++g) {
    want_max = std::max(want_max, static_cast<int>((g * 37) % 1000) - 300);
    want_min = std::min(want_min, static_cast<int>((g * 37) % 1000) - 300);
  }
  CHECK(imax == want_max, imax << " != " << want_max);
  CHECK(imin == want_min, imin << " != " << want_min);
  CHECK(umax == (n - 1) * 3u, umax);
}

// ---- WMMA ---------------------------------------------------------------------------------------

// Each warp multiplies its own tile: A (16 x K), B (K x 16), C and D (16 x 16),
// tile w at a + w * a_tile etc. Layout parameters pick the memory layouts.
template <class Elem, class Store, int K, class LA, class LB>
__global__ void wmma_kernel(const Store* a, unsigned lda, const Store* b, unsigned ldb, const float* c, unsigned ldc,
                            int c_col, float* d, unsigned ldd, int d_col, float scale) {
  using namespace nvcuda;
  const unsigned w = linear_block() * (blockDim.x / 32) + threadIdx.x / 32;
  const unsigned a_rows = std::is_same_v<LA, wmma::row_major> ? 16 : K;
  const unsigned b_rows = std::is_same_v<LB, wmma::row_major> ? K : 16;
  wmma::fragment<wmma::matrix_a, 16, 16, K, Elem, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, K, Elem, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::load_matrix_sync(fa, a + static_cast<size_t>(w) * a_rows * lda, lda);
  wmma::load_matrix_sync(fb, b + static_cast<size_t>(w) * b_rows * ldb, ldb);
  const wmma::layout_t c_layout = c_col ? wmma::mem_col_major : wmma::mem_row_major;
  const wmma::layout_t d_layout = d_col ? wmma::mem_col_major : wmma::mem_row_major;
  wmma::load_matrix_sync(acc, c + static_cast<size_t>(w) * 16 * ldc, ldc, c_layout);
  wmma::mma_sync(acc, fa, fb, acc);
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= scale;  // elementwise: valid for any lane mapping
  wmma::store_matrix_sync(d + static_cast<size_t>(w) * 16 * ldd, acc, ldd, d_layout);
}

double tf32_reference(float f) {  // round to 11 significant bits, ties away from zero
  if (f == 0 || !std::isfinite(f)) return f;
  int e = 0;
  const double m = std::frexp(static_cast<double>(f), &e);  // |m| in [0.5, 1)
  return std::ldexp(std::round(std::ldexp(m, 11)), e - 11);
}

struct Rounding {
  double (*round)(float);  // the input rounding of the element type, for the reference
  double unit;             // its unit roundoff
  const char* name;
};

template <class Elem, class Store, int K, class LA, class LB>
void check_wmma(Store (*to_store)(float), const Rounding& rounding, int c_col, int d_col) {
  constexpr bool a_row = std::is_same_v<LA, nvcuda::wmma::row_major>;
  constexpr bool b_row = std::is_same_v<LB, nvcuda::wmma::row_major>;
  constexpr unsigned kElem16 = 16 / sizeof(Store);  // ldm granule: 16 bytes
  const unsigned warps = 2, blocks = 2, tiles = warps * blocks;
  const unsigned lda = (a_row ? K : 16) + kElem16;  // padded leading dimensions
  const unsigned ldb = (b_row ? 16 : K) + 2 * kElem16;
  const unsigned ldc = 16 + 4, ldd = 16 + 8;
  const unsigned a_rows = a_row ? 16 : K, b_rows = b_row ? K : 16;
  Aligned<Store> a(static_cast<size_t>(tiles) * a_rows * lda), b(static_cast<size_t>(tiles) * b_rows * ldb);
  Aligned<float> c(static_cast<size_t>(tiles) * 16 * ldc), d(static_cast<size_t>(tiles) * 16 * ldd);
  std::vector<float> af(a.size), bf(b.size);  // the unrounded inputs
  std::mt19937 gen(1234);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (size_t i = 0; i < a.size; ++i) a[i] = to_store(af[i] = dist(gen));
  for (size_t i = 0; i < b.size; ++i) b[i] = to_store(bf[i] = dist(gen));
  for (size_t i = 0; i < c.size; ++i) c[i] = dist(gen);
  for (size_t i = 0; i < d.size; ++i) d[i] = -777.0f;
  const float scale = 2.0f;
  simt::launch(wmma_kernel<Elem, Store, K, LA, LB>, blocks, warps * 32, 0, a.data, lda, b.data, ldb, c.data, ldc,
               c_col, d.data, ldd, d_col, scale);

  auto A = [&](unsigned t, unsigned i, unsigned k) {
    return (static_cast<size_t>(t) * a_rows * lda) + (a_row ? i * lda + k : k * lda + i);
  };
  auto B = [&](unsigned t, unsigned k, unsigned j) {
    return (static_cast<size_t>(t) * b_rows * ldb) + (b_row ? k * ldb + j : j * ldb + k);
  };
  auto C = [&](unsigned t, unsigned i, unsigned j) {
    return static_cast<size_t>(t) * 16 * ldc + (c_col ? j * ldc + i : i * ldc + j);
  };
  auto D = [&](unsigned t, unsigned i, unsigned j) {
    return static_cast<size_t>(t) * 16 * ldd + (d_col ? j * ldd + i : i * ldd + j);
  };
  int64_t bad_tight = 0, bad_loose = 0, distinguishes = 0;
  std::string first;
  for (unsigned t = 0; t < tiles; ++t)
    for (unsigned i = 0; i < 16; ++i)
      for (unsigned j = 0; j < 16; ++j) {
        const double cv = c[C(t, i, j)];
        double rounded = cv, exact = cv, magnitude = std::abs(cv);
        for (unsigned k = 0; k < K; ++k) {
          rounded += rounding.round(af[A(t, i, k)]) * rounding.round(bf[B(t, k, j)]);
          exact += static_cast<double>(af[A(t, i, k)]) * bf[B(t, k, j)];
          magnitude += std::abs(static_cast<double>(af[A(t, i, k)]) * bf[B(t, k, j)]);
        }
        rounded *= scale;
        exact *= scale;
        magnitude *= scale;
        const double got = d[D(t, i, j)];
        // float products of the rounded inputs are exact; K + 1 float additions remain
        const double tight = 2.0 * (K + 1) * 0x1p-24 * magnitude;
        // plus each product's input rounding: |a b| (2u + u^2), and half's absolute subnormal spacing
        const double loose = tight + (2 * rounding.unit + rounding.unit * rounding.unit) * magnitude + 1e-6;
        if (std::abs(got - rounded) > tight && bad_tight++ == 0)
          first = "tile " + std::to_string(t) + " (" + std::to_string(i) + "," + std::to_string(j) +
                  "): " + std::to_string(got) + " vs rounded-input reference " + std::to_string(rounded);
        bad_loose += std::abs(got - exact) > loose;
        distinguishes += std::abs(rounded - exact) > 10 * tight;
      }
  CHECK(bad_tight == 0, rounding.name << ": " << bad_tight << " elements off the rounded-input reference, first "
                                      << first);
  CHECK(bad_loose == 0, rounding.name << ": " << bad_loose << " elements off the exact reference");
  CHECK(distinguishes > 0, rounding.name << ": the inputs' rounding is invisible, the check proves nothing");
  int64_t clobbered = 0;  // the padding of D is untouched
  for (unsigned t = 0; t < tiles; ++t)
    for (unsigned outer = 0; outer < 16; ++outer)
      for (unsigned inner = 16; inner < ldd; ++inner)
        clobbered += d[static_cast<size_t>(t) * 16 * ldd + outer * ldd + inner] != -777.0f;
  CHECK(clobbered == 0, rounding.name << ": store wrote " << clobbered << " padding elements");
}

double half_round(float f) { return __half2float(__float2half(f)); }
double bf16_round(float f) { return __bfloat162float(__float2bfloat16(f)); }
float tf32_store(float f) { return f; }  // tf32 inputs are float in memory

TEST(wmma_half_16x16x16) {
  using namespace nvcuda;
  const Rounding r{half_round, 0x1p-11, "half"};
  check_wmma<__half, __half, 16, wmma::row_major, wmma::col_major>(__float2half, r, 0, 0);
  check_wmma<__half, __half, 16, wmma::col_major, wmma::row_major>(__float2half, r, 1, 0);
}

TEST(wmma_bf16_16x16x16) {
  using namespace nvcuda;
  const Rounding r{bf16_round, 0x1p-8, "bf16"};
  check_wmma<__nv_bfloat16, __nv_bfloat16, 16, wmma::col_major, wmma::row_major>(__float2bfloat16, r, 1, 1);
  check_wmma<__nv_bfloat16, __nv_bfloat16, 16, wmma::row_major, wmma::row_major>(__float2bfloat16, r, 0, 1);
}

TEST(wmma_tf32_16x16x8) {
  using namespace nvcuda;
  const Rounding r{tf32_reference, 0x1p-11, "tf32"};
  check_wmma<wmma::precision::tf32, float, 8, wmma::row_major, wmma::row_major>(tf32_store, r, 0, 1);
  check_wmma<wmma::precision::tf32, float, 8, wmma::col_major, wmma::col_major>(tf32_store, r, 1, 0);
}

__global__ void wmma_fill_kernel(const __half* a, const __half* b, float* d) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.5f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

TEST(wmma_fill_fragment_and_fragment_size) {
  using namespace nvcuda;
  static_assert(wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>::num_elements == 256);
  static_assert(wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>::num_elements == 128);
  using TF32A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  static_assert(std::is_same_v<TF32A::storage_element_type, float> && TF32A::num_elements == 128);
  Aligned<__half> a(256), b(256);
  Aligned<float> d(256);
  for (unsigned i = 0; i < 256; ++i) {
    a[i] = __float2half(static_cast<float>(i % 16 == i / 16));  // identity
    b[i] = __float2half(static_cast<float>(i % 7));
  }
  simt::launch(wmma_fill_kernel, 1, 32, 0, a.data, b.data, d.data);
  int64_t bad = 0;
  for (unsigned i = 0; i < 256; ++i) bad += d[i] != 0.5f + static_cast<float>(i % 7);
  CHECK(bad == 0, bad << " elements of I * B + 0.5 wrong");
}

// ---- misuse the layer reports ----------------------------------------------------------------

__global__ void wmma_divergent_fragment_kernel(const __half* a, float* d) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, a, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  if (threadIdx.x == 3) acc.x[0] = 1.0f;  // relies on a per-lane mapping
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

__global__ void wmma_misaligned_kernel(const __half* a, unsigned offset) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + offset, 16);
}

__global__ void wmma_bad_ldm_kernel(const float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, c, 18, wmma::mem_row_major);
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0); }

__global__ void bad_width_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1, 3); }

__global__ void shfl_from_exited_lane_kernel(int* out) {
  if (threadIdx.x % 32 >= 20) return;  // the tail lanes of a warp leave...
  out[threadIdx.x] = __shfl_down_sync(kFull, 1, 16);  // ...and lane 4 reads lane 20
}

__global__ void wmma_with_exited_lane_kernel(const __half* a) {
  using namespace nvcuda;
  if (threadIdx.x == 31) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a, 16);
}

__global__ void noop_kernel() {}

TEST(misuse_is_reported) {
  Aligned<__half> a(1024);
  Aligned<float> d(1024);
  for (unsigned i = 0; i < 1024; ++i) a[i] = __float2half(1.0f);
  std::vector<int> out(64);
  CHECK_THROWS(std::logic_error, simt::launch(wmma_divergent_fragment_kernel, 1, 32, 0, a.data, d.data),
               "different fragment");
  CHECK_THROWS(std::invalid_argument, simt::launch(wmma_misaligned_kernel, 1, 32, 0, a.data, 8u), "aligned");
  CHECK_THROWS(std::invalid_argument, simt::launch(wmma_bad_ldm_kernel, 1, 32, 0, d.data), "ldm");
  CHECK_THROWS(std::logic_error, simt::launch(partial_mask_kernel, 1, 32, 0, out.data()), "full mask");
  CHECK_THROWS(std::logic_error, simt::launch(bad_width_kernel, 1, 32, 0, out.data()), "power of two");
  CHECK_THROWS(std::logic_error, simt::launch(shfl_from_exited_lane_kernel, 1, 64, 0, out.data()), "has exited");
  CHECK_THROWS(std::logic_error, simt::launch(wmma_with_exited_lane_kernel, 1, 32, 0, a.data), "has exited");
  CHECK_THROWS(std::invalid_argument, simt::launch(noop_kernel, 1, 48, 0), "multiple of 32");
  CHECK_THROWS(std::invalid_argument, simt::launch(noop_kernel, 1, dim3(32, 33), 0), "at most 1024");
  CHECK_THROWS(std::invalid_argument, simt::launch(noop_kernel, dim3(2, 0), 32, 0), ">= 1");
  CHECK_THROWS(std::invalid_argument, simt::launch(noop_kernel, 1, dim3(32, 1, 65), 0), "limits");
  CHECK_THROWS(std::logic_error, __syncthreads(), "outside simt::launch");
  CHECK_THROWS(std::logic_error, (void)simt_dynamic_shared(), "outside simt::launch");
}

// ---- early exit, exceptions, deadlocks ---------------------------------------------------------

__global__ void early_exit_kernel(unsigned live, unsigned* out) {
  __shared__ unsigned s[128];
  const unsigned t = threadIdx.x;
  if (t >= live) return;  // exited threads no longer hold up __syncthreads / __syncwarp
  s[t] = t * 3 + blockIdx.x;
  __syncthreads();
  __syncwarp();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % live];
}

TEST(early_exit_leaves_barriers) {
  const unsigned blocks = 2, threads = 128, live = 45;
  std::vector<unsigned> out(blocks * threads, 0xffffffffu);
  simt::launch(early_exit_kernel, blocks, threads, 0, live, out.data());
  int64_t bad = 0;
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      const unsigned want = t < live ? ((t + 1) % live) * 3 + b : 0xffffffffu;
      bad += out[b * threads + t] != want;
    }
  CHECK(bad == 0, bad);
}

__global__ void throwing_kernel(unsigned thrower_block, unsigned thrower_thread, int* blocks_started, float* sink) {
  if (threadIdx.x == 0) atomicAdd(blocks_started, 1);
  float v = static_cast<float>(threadIdx.x);
  for (int round = 0; round < 12; ++round) {
    __syncthreads();
    if (blockIdx.x == thrower_block && threadIdx.x == thrower_thread && round == 3)
      throw std::runtime_error("boom from thread " + std::to_string(threadIdx.x));
    v = warp_sum_xor(v) * 1e-3f;
    __syncwarp();
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

TEST(exception_in_kernel_is_rethrown) {
  const unsigned blocks = 4, threads = 128;
  std::vector<float> sink(blocks * threads);
  for (const unsigned thrower : {37u, 0u, 127u}) {
    int started = 0;
    CHECK_THROWS(std::runtime_error,
                 simt::launch(throwing_kernel, blocks, threads, 0, 1u, thrower, &started, sink.data()),
                 "boom from thread " + std::to_string(thrower));
    CHECK(started == 2, "blocks after the failing one must not start; started " << started);
  }
  // The layer is usable again afterwards.
  int started = 0;
  simt::launch(throwing_kernel, blocks, threads, 0, blocks, 0u, &started, sink.data());
  CHECK(started == static_cast<int>(blocks), started);
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0)
    __syncthreads();  // lane 0 waits for the block...
  else if (threadIdx.x < 32)
    __syncwarp();  // ...while its warp waits for lane 0
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

TEST(deadlock_is_reported) {
  const std::chrono::milliseconds saved = simt::deadlock_timeout();
  simt::set_deadlock_timeout(std::chrono::milliseconds(300));
  std::vector<int> out(64);
  CHECK_THROWS(simt::deadlock_error, simt::launch(deadlock_kernel, 1, 64, 0, out.data()),
               "deadlock in block (0,0,0): no thread reached or left a barrier for 300 ms");
  simt::set_deadlock_timeout(saved);
  CHECK(simt::deadlock_timeout() == saved, "restored");
}

// ---- kernel arguments ----------------------------------------------------------------------------

struct Params {
  int n;
  float alpha;
  const float* x;
};

template <class T> __global__ void __launch_bounds__(64) params_kernel(Params p, T beta, float* __restrict__ y) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < static_cast<unsigned>(p.n)) y[i] = p.alpha * p.x[i] + static_cast<float>(beta);
}

TEST(kernel_arguments_by_value) {
  std::vector<float> x(100), y(128, -1.0f);
  for (unsigned i = 0; i < 100; ++i) x[i] = static_cast<float>(i);
  simt::launch(params_kernel<double>, 2, 64, 0, Params{100, 2.0f, x.data()}, 1, y.data());  // int -> double
  int64_t bad = 0;
  for (unsigned i = 0; i < 128; ++i) bad += y[i] != (i < 100 ? 2.0f * static_cast<float>(i) + 1.0f : -1.0f);
  CHECK(bad == 0, bad);
}

// ---- math ------------------------------------------------------------------------------------------

__device__ float device_math(float x) {
  return expf(x) + tanhf(x) + erff(x) + fmaxf(x, 0.5f) + fminf(x, 0.5f) + sqrtf(x) + log1pf(x) + fmaf(x, x, x) +
         rsqrtf(x) + __expf(x) + __fdividef(x, 3.0f) + __frcp_rn(x) + __saturatef(x);
}

__global__ void math_kernel(const float* x, float* y) { y[threadIdx.x] = device_math(x[threadIdx.x]); }

TEST(math_functions) {
  CHECK(rsqrtf(4.0f) == 0.5f, rsqrtf(4.0f));
  CHECK(__fdividef(1.0f, 4.0f) == 0.25f, "");
  CHECK(__frcp_rn(8.0f) == 0.125f, "");
  CHECK(__saturatef(-1.0f) == 0.0f && __saturatef(2.0f) == 1.0f && __saturatef(0.25f) == 0.25f, "");
  CHECK(__saturatef(std::numeric_limits<float>::quiet_NaN()) == 0.0f, "NaN saturates to 0");
  CHECK(__expf(0.0f) == 1.0f && std::abs(__expf(1.0f) - 2.7182817f) < 1e-6f, __expf(1.0f));
  std::vector<float> x(32), y(32);
  for (unsigned i = 0; i < 32; ++i) x[i] = 0.1f + 0.05f * static_cast<float>(i);
  simt::launch(math_kernel, 1, 32, 0, x.data(), y.data());
  int64_t bad = 0;
  for (unsigned i = 0; i < 32; ++i) {
    const double v = x[i];
    const double want = std::exp(v) + std::tanh(v) + std::erf(v) + std::max(v, 0.5) + std::min(v, 0.5) +
                        std::sqrt(v) + std::log1p(v) + (v * v + v) + 1 / std::sqrt(v) + std::exp(v) + v / 3 + 1 / v +
                        std::clamp(v, 0.0, 1.0);
    bad += std::abs(y[i] - want) > 1e-5 * std::abs(want);
  }
  CHECK(bad == 0, bad);
}

// ---- conversions -------------------------------------------------------------------------------------

uint16_t f16_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // g++'s software conversion: IEEE round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
float f16_value(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
bool same_float(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

TEST(half_conversions_match_ieee) {
  int64_t bad = 0;
  std::string first;
  // every half -> float, and back
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const __half h = __ushort_as_half(static_cast<unsigned short>(b));
    const float f = __half2float(h);
    const bool nan = (b & 0x7fff) > 0x7c00;
    const bool ok = nan ? std::isnan(f) : same_float(f, f16_value(static_cast<uint16_t>(b))) &&
                                              __half_as_ushort(__float2half(f)) == b;
    if (!ok && bad++ == 0) first = "half bits " + std::to_string(b);
  }
  // float -> half on a stride through [2^-26, 2^17), both signs, and at every halfway point
  auto check_one = [&](float f) {
    const uint16_t got = __half_as_ushort(__float2half_rn(f));
    if (got != f16_bits(f) && bad++ == 0) first = "float " + std::to_string(std::bit_cast<uint32_t>(f));
  };
  for (uint32_t u = 0x32800000u; u < 0x48000000u; u += 97) {
    check_one(std::bit_cast<float>(u));
    check_one(-std::bit_cast<float>(u));
  }
  for (uint32_t b = 0; b < 0x7c00; ++b) {
    const double lo = f16_value(static_cast<uint16_t>(b)), hi = f16_value(static_cast<uint16_t>(b + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // exact: at most 12 significant bits
    for (const float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      check_one(f);
      check_one(-f);
    }
  }
  for (const float f : {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e30f, std::numeric_limits<float>::max(),
                        std::numeric_limits<float>::denorm_min(), 0x1p-25f, 0x1.000002p-25f, 0x1p-24f,
                        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    check_one(f);
  CHECK(bad == 0, bad << " wrong half conversions, first: " << first);
  CHECK(__half_as_ushort(__float2half(std::numeric_limits<float>::quiet_NaN())) == 0x7e00, "quiet NaN");
  CHECK(__half_as_ushort(__float2half(-std::numeric_limits<float>::quiet_NaN())) == 0xfe00, "negative NaN");
  CHECK(__half_as_ushort(__float2half(std::bit_cast<float>(0x7f800001u))) == 0x7e00, "signalling NaN stays a NaN");
  CHECK(std::isnan(__half2float(__ushort_as_half(0x7c01))), "signalling half NaN");
}

TEST(bfloat16_conversions) {
  int64_t bad = 0;
  std::string first;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
    const bool nan = (b & 0x7fff) > 0x7f80;
    const bool ok =
        nan ? std::isnan(f) : std::bit_cast<uint32_t>(f) == b << 16 && __bfloat16_as_ushort(__float2bfloat16(f)) == b;
    if (!ok && bad++ == 0)
      first = "bf16 bits " + std::to_string(b);
  }
  std::mt19937 gen(7);
  for (int i = 0; i < 1000000; ++i) {
    const float f = std::bit_cast<float>(static_cast<uint32_t>(gen()));
    if (__bfloat16_as_ushort(__float2bfloat16_rn(f)) != seqfuse::kernels::float_to_bf16(f).bits && bad++ == 0)
      first = "float " + std::to_string(std::bit_cast<uint32_t>(f));
  }
  CHECK(bad == 0, bad << " wrong bfloat16 conversions, first: " << first);
  // halfway cases round to even; overflow rounds to inf; NaN stays a quiet NaN
  CHECK(__bfloat16_as_ushort(__float2bfloat16(1.0f + 0x1p-8f)) == 0x3f80, "tie to even (down)");
  CHECK(__bfloat16_as_ushort(__float2bfloat16(1.0f + 3 * 0x1p-8f)) == 0x3f82, "tie to even (up)");
  CHECK(__bfloat16_as_ushort(__float2bfloat16(1.0f + 0x1p-8f + 0x1p-20f)) == 0x3f81, "above the tie");
  CHECK(__bfloat16_as_ushort(__float2bfloat16(std::numeric_limits<float>::max())) == 0x7f80, "overflow to inf");
  const unsigned short nan_bits = __bfloat16_as_ushort(__float2bfloat16(std::bit_cast<float>(0x7f800001u)));
  CHECK((nan_bits & 0x7fc0) == 0x7fc0, "quiet NaN, got " << nan_bits);
}

TEST(tf32_rounding) {
  using nvcuda::wmma::__float_to_tf32;
  int64_t bad = 0;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  for (int i = 0; i < 200000; ++i) {
    const float f = dist(gen);
    const float got = __float_to_tf32(f);
    bad += (std::bit_cast<uint32_t>(got) & 0x1fffu) != 0 || static_cast<double>(got) != tf32_reference(f);
  }
  CHECK(bad == 0, bad << " wrong tf32 roundings");
  CHECK(__float_to_tf32(1.0f + 0x1p-11f) == 1.0f + 0x1p-10f, "ties away from zero");
  CHECK(__float_to_tf32(-(1.0f + 0x1p-11f)) == -(1.0f + 0x1p-10f), "ties away from zero (negative)");
  CHECK(__float_to_tf32(1.0f + 0x1p-12f) == 1.0f, "below the tie");
  CHECK(std::isinf(__float_to_tf32(std::numeric_limits<float>::infinity())), "inf");
  CHECK(std::isnan(__float_to_tf32(std::bit_cast<float>(0x7f800001u))), "a NaN with only low payload bits stays NaN");
}

}  // namespace

int main() { return check::run_all(); }
