// Per-ISA building blocks shared by the fused MLP and conv kernels: vector
// loads/stores, the activations, and the register-blocked GEMM over weights
// packed into 16-column panels ([panel][k][16]), each a few vector registers.
//
// Included inside `namespace seqfuse::kernels::<isa>` by mlp_forward_impl.h and
// conv_forward_impl.h after the translation unit set its target pragma and
// defined SEQFUSE_VECTOR_BYTES / SEQFUSE_ACC_REGISTERS. Header-only templates
// and inline functions only: each ISA namespace gets its own copy.

// One hardware vector register of A, SEQFUSE_VECTOR_BYTES wide (16 floats on
// AVX-512, 8 on AVX2, 4 on SSE2). A 16-column weight panel is kVecsPerPanel
// of them. Vectors are never wider than the ISA's registers: GCC keeps wider
// generic vectors (a 16-float vector on AVX2) in memory and moves them through
// general registers, several times slower than the split written out here.
template <typename A> struct NativeVec;
template <> struct NativeVec<float> {
  typedef float type __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
  typedef int32_t mask __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
};
template <> struct NativeVec<double> {
  typedef double type __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
  typedef int64_t mask __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
};
template <typename A> using Vec = typename NativeVec<A>::type;
template <typename A> inline constexpr int kLanes = SEQFUSE_VECTOR_BYTES / static_cast<int>(sizeof(A));
template <typename A> inline constexpr int kVecsPerPanel = static_cast<int>(kPanelWidth) / kLanes<A>;
static_assert(kPanelWidth % kLanes<float> == 0 && kPanelWidth % kLanes<double> == 0,
              "a weight panel must be a whole number of vector registers");

template <typename A> inline Vec<A> splat(A v) {
  Vec<A> r = {};
  return r + v;
}

// Loads kLanes<A> consecutive values of storage type T widened to the accumulate type.
template <typename A, typename T> inline Vec<A> load_vec(const T* p) {
  Vec<A> r;
  __builtin_memcpy(&r, p, sizeof(r));
  return r;
}
template <> inline Vec<float> load_vec<float, bf16>(const bf16* p) {
  typedef uint16_t Half __attribute__((vector_size(SEQFUSE_VECTOR_BYTES / 2)));
  typedef uint32_t Word __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
  Half h;
  __builtin_memcpy(&h, p, sizeof(h));
  Word w = __builtin_convertvector(h, Word) << 16;
  Vec<float> r;
  __builtin_memcpy(&r, &w, sizeof(r));
  return r;
}

template <typename A> inline void store_vec(A* p, Vec<A> v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Partial vectors at the end of a row of `n` (< kLanes) values: lanes past n
// read as 0 and are never written. Masked moves where the ISA has them: a
// memcpy of a run-time length is a libc call, and channel counts that are not
// a multiple of the vector width (24, 40, 58, 72, 104, 120, 184 in the
// mobilenets, shufflenet, regnet) take this path once per pixel and vector
// row; as memcpy it was 10-40% of those layers' time.
#if (defined(__x86_64__) || defined(_M_X64)) && SEQFUSE_VECTOR_BYTES == 64  // the AVX-512 units (target pragma)
#define SEQFUSE_PARTIAL_MOVES 512
inline unsigned first_lanes(int64_t n) { return (1u << n) - 1; }  // lanes [0, n) of a k-mask
#elif (defined(__x86_64__) || defined(_M_X64)) && SEQFUSE_VECTOR_BYTES == 32  // the AVX2 units
#define SEQFUSE_PARTIAL_MOVES 256
template <typename A> inline __m256i first_lanes(int64_t n) {  // lanes [0, n) all ones
  if constexpr (sizeof(A) == 4)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  else
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

template <typename A> inline Vec<A> load_partial(const A* p, int64_t n) {
#if SEQFUSE_PARTIAL_MOVES == 512
  if constexpr (std::is_same_v<A, float>) return _mm512_maskz_loadu_ps(static_cast<__mmask16>(first_lanes(n)), p);
  if constexpr (std::is_same_v<A, double>) return _mm512_maskz_loadu_pd(static_cast<__mmask8>(first_lanes(n)), p);
#elif SEQFUSE_PARTIAL_MOVES == 256
  if constexpr (std::is_same_v<A, float>) return _mm256_maskload_ps(p, first_lanes<A>(n));
  if constexpr (std::is_same_v<A, double>) return _mm256_maskload_pd(p, first_lanes<A>(n));
#endif
  Vec<A> r = {};
  __builtin_memcpy(&r, p, n * sizeof(A));
  return r;
}
template <typename A> inline void store_partial(A* p, Vec<A> v, int64_t n) {
#if SEQFUSE_PARTIAL_MOVES == 512
  if constexpr (std::is_same_v<A, float>) return _mm512_mask_storeu_ps(p, static_cast<__mmask16>(first_lanes(n)), v);
  if constexpr (std::is_same_v<A, double>) return _mm512_mask_storeu_pd(p, static_cast<__mmask8>(first_lanes(n)), v);
#elif SEQFUSE_PARTIAL_MOVES == 256
  if constexpr (std::is_same_v<A, float>) return _mm256_maskstore_ps(p, first_lanes<A>(n), v);
  if constexpr (std::is_same_v<A, double>) return _mm256_maskstore_pd(p, first_lanes<A>(n), v);
#endif
  __builtin_memcpy(p, &v, n * sizeof(A));
}
#undef SEQFUSE_PARTIAL_MOVES

#include "activations.h"

template <typename A> constexpr int registers_per_panel() { return kVecsPerPanel<A>; }
// Full row blocks use two panels (32 columns) when a panel fits one register.
template <typename A> constexpr int rows_per_tile() {
  return SEQFUSE_ACC_REGISTERS / ((registers_per_panel<A>() == 1 ? 2 : 1) * registers_per_panel<A>());
}

// Calls f(std::integral_constant<int, 0>) ... f(<N - 1>): a loop unrolled at
// compile time, so accumulator arrays are indexed by constants and live in
// registers (a `#pragma unroll` loop leaves them on the stack with GCC).
#define SEQFUSE_INLINE __attribute__((always_inline))
template <int N, typename F> SEQFUSE_INLINE inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) SEQFUSE_INLINE {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// The activation an epilogue applies while the values are still in
// registers (`on`), with the same vector code activate_row runs, so the values
// are the same bits either way: the rows of activation_table.h in registers
// Always, and in float those in registers Float (every activation of the
// models these kernels serve but GELU and Tanh). The rest run as one pass
// over the finished, cache-hot rows (activate_row). NaN passes through, as in eager.
template <typename A> struct RegisterActivation {
  Activation act;
  A alpha;
  bool on;
  explicit RegisterActivation(Activation a, double alpha_ = 0)
      : act(a), alpha(static_cast<A>(alpha_)), on(in_registers(a)) {}
  static constexpr bool in_registers(Activation a) {
    const RegisterUse use = register_use(a);
    return use == RegisterUse::Always || (use == RegisterUse::Float && std::is_same_v<A, float>);
  }
  SEQFUSE_INLINE Vec<A> operator()(Vec<A> v) const {
    switch (act) {  // each case inlines only its own activation
#define SEQFUSE_REGISTER_CASE(name, ...)                                            \
  case Activation::name:                                                            \
    if constexpr (in_registers(Activation::name))                                   \
      return activation_detail::activate_vec<Activation::name>(v, alpha);           \
    else                                                                            \
      return v;
      SEQFUSE_ACTIVATION_TABLE(SEQFUSE_REGISTER_CASE)
#undef SEQFUSE_REGISTER_CASE
    }
    return v;
  }
};

// How gemm_micro_tile reads its operands.
//   Dense     in[r][k] (any storage type) and panels [K][16], widened to A on load.
//   Pairs     bfloat16 in pairs along k (the GEMMs of bfloat16 conv runs):
//             in[r] is K bfloat16 values (K even), a panel [K/2][16][2], the
//             values of k and k + 1 adjacent. With the bfloat16 dot product
//             (SEQFUSE_DPBF16), one vdpbf16ps multiplies a row's pair by 16
//             columns' pairs (32 products, twice the float FMA's 16); other
//             ISAs widen each pair to two floats and multiply in float, odd
//             then even as vdpbf16ps adds them. The products of bfloat16
//             values are exact in float either way.
//   RowPairs  vdpbf16ps on bfloat16 panels in the Dense layout [K][16] (the
//             MLP's, which its CUDA kernels share): rows k and k + 1 paired
//             on load (two zero-extensions, a shift and an or per panel and
//             pair of k, shared by the tile's rows); in[r] as for Pairs, K
//             rounded up to even with a zero. SEQFUSE_DPBF16 only.
enum class Operands { Dense, Pairs, RowPairs };

// The two float values of a bfloat16 pair (k even, k + 1) held in 32 bits:
// the even one in the low half.
SEQFUSE_INLINE inline float pair_even(uint32_t w) { return __builtin_bit_cast(float, w << 16); }
SEQFUSE_INLINE inline float pair_odd(uint32_t w) { return __builtin_bit_cast(float, w & 0xffff0000u); }

// out[r][16p + j] = epilogue(sum_k in[r][k] * panel_p[k][j]) for r < MR, p < NP.
// The last panel stores only its first `cols_last` columns (1..16), so outputs
// need no padding columns (conv channels are stored compact).
//
// kOps (Operands) says how the operands are laid out; see there.
template <int MR, int NP, bool kAct, Operands kOps = Operands::Dense, typename TI, typename TW, typename A>
inline void gemm_micro_tile(const TI* __restrict in, int64_t ld_in, const TW* __restrict panels, int64_t K,
                            const A* __restrict scale, const A* __restrict shift, A* __restrict out,
                            int64_t ld_out, int64_t cols_last, const RegisterActivation<A>& act) {
  constexpr int V = kVecsPerPanel<A>, L = kLanes<A>, Q = NP * V;  // Q registers per row
  Vec<A> acc[MR][Q];
  unroll<MR>([&](auto r) SEQFUSE_INLINE { unroll<Q>([&](auto q) SEQFUSE_INLINE { acc[r][q] = Vec<A>{}; }); });
  if constexpr (kOps != Operands::Dense) {
    static_assert(std::is_same_v<TI, bf16> && std::is_same_v<TW, bf16> && std::is_same_v<A, float>);
    for (int64_t k = 0; k < K; k += 2) {
#if SEQFUSE_DPBF16
      static_assert(V == 1, "one register of 16 floats per panel");
      __m512bh b[NP];
      if constexpr (kOps == Operands::Pairs) {
        unroll<NP>([&](auto p) SEQFUSE_INLINE {
          b[p] = (__m512bh)_mm512_loadu_si512(panels + (p * K + k) * kPanelWidth);
        });
      } else {
        // Rows k and k + 1 (zeros past an odd K) interleaved, in vector code:
        // GCC 12's _mm512_cvtepu16_epi32 and _mm512_slli_epi32 start from an
        // "undefined" register it then warns about.
        typedef uint16_t Row __attribute__((vector_size(32)));
        typedef uint32_t PairVec __attribute__((vector_size(64)));
        const bool odd_tail = k + 1 == K;
        unroll<NP>([&](auto p) SEQFUSE_INLINE {
          const TW* row = panels + (p * K + k) * kPanelWidth;
          Row lo, hi = {};
          __builtin_memcpy(&lo, row, sizeof(lo));
          if (!odd_tail) __builtin_memcpy(&hi, row + kPanelWidth, sizeof(hi));
          b[p] = (__m512bh)(__builtin_convertvector(lo, PairVec) | (__builtin_convertvector(hi, PairVec) << 16));
        });
      }
      unroll<MR>([&](auto r) SEQFUSE_INLINE {
        uint32_t pair;
        __builtin_memcpy(&pair, in + r * ld_in + k, sizeof(pair));
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        unroll<NP>([&](auto p) SEQFUSE_INLINE { acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]); });
      });
#else
      static_assert(kOps == Operands::Pairs, "RowPairs needs the bfloat16 dot product");
      typedef uint32_t Word __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
      Vec<A> even[Q], odd[Q];
      unroll<Q>([&](auto q) SEQFUSE_INLINE {
        Word w;
        __builtin_memcpy(&w, panels + ((q / V) * K + k) * kPanelWidth + (q % V) * L * 2, sizeof(w));
        even[q] = __builtin_bit_cast(Vec<A>, w << 16);
        odd[q] = __builtin_bit_cast(Vec<A>, w & 0xffff0000u);
      });
      unroll<MR>([&](auto r) SEQFUSE_INLINE {
        uint32_t pair;
        __builtin_memcpy(&pair, in + r * ld_in + k, sizeof(pair));
        const A a_even = pair_even(pair), a_odd = pair_odd(pair);
        unroll<Q>([&](auto q) SEQFUSE_INLINE {
          acc[r][q] += a_odd * odd[q];
          acc[r][q] += a_even * even[q];
        });
      });
#endif
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      Vec<A> b[Q];
      unroll<Q>([&](auto q) SEQFUSE_INLINE {
        b[q] = load_vec<A>(panels + ((q / V) * K + k) * kPanelWidth + (q % V) * L);
      });
      unroll<MR>([&](auto r) SEQFUSE_INLINE {
        const A a = convert<A>(in[r * ld_in + k]);
        unroll<Q>([&](auto q) SEQFUSE_INLINE { acc[r][q] += a * b[q]; });
      });
    }
  }
  unroll<Q>([&](auto q) SEQFUSE_INLINE {
    constexpr int p = q / V, col = p * static_cast<int>(kPanelWidth) + (q % V) * L;
    // Columns of this register that exist: all of them except in the last panel.
    const int64_t valid = p == NP - 1 ? cols_last - (q % V) * L : L;
    if (valid <= 0) return;
    const Vec<A> sc = load_vec<A>(scale + col);
    const Vec<A> sh = load_vec<A>(shift + col);
    unroll<MR>([&](auto r) SEQFUSE_INLINE {
      Vec<A> v = acc[r][q] * sc + sh;
      if constexpr (kAct) v = act(v);
      if (valid >= L)
        store_vec(out + r * ld_out + col, v);
      else
        store_partial(out + r * ld_out + col, v, valid);
    });
  });
}

// Panels per micro-tile for an `mr`-row tile: enough independent accumulators
// to cover the FMA latency (one-row tiles, batch 1, are otherwise bound by a
// single dependency chain), within the accumulator register budget. At most 4:
// a one-row tile streams every weight once and is bound by L2 bandwidth, and
// more concurrent panel streams measured slower (7.1 vs 6.4 us for 600 KB).
template <typename A> constexpr int panels_for_rows(int mr) {
  const int fit = SEQFUSE_ACC_REGISTERS / (mr * registers_per_panel<A>());
  return fit < 1 ? 1 : (fit > 4 ? 4 : fit);
}

// All panels of an `MR`-row tile, NP panels at a time, then single panels.
// Columns at and beyond n_cols are not stored.
template <int MR, Operands kOps = Operands::Dense, typename TI, typename TW, typename A>
inline void gemm_row_block(const RegisterActivation<A>& act, const TI* in, int64_t ld_in, const TW* weight, int64_t K,
                           int64_t n_cols, const A* scale, const A* shift, A* out, int64_t ld_out) {
  constexpr int NP = panels_for_rows<A>(MR);
  const int64_t n_panels = panel_count(n_cols);
  auto tile = [&]<int P>(int64_t p) SEQFUSE_INLINE {
    const int64_t cols_last = n_cols - (p + P - 1) * kPanelWidth;
    const TW* w = weight + p * K * kPanelWidth;
    if (act.on)
      gemm_micro_tile<MR, P, true, kOps>(in, ld_in, w, K, scale + p * kPanelWidth, shift + p * kPanelWidth,
                                           out + p * kPanelWidth, ld_out, cols_last, act);
    else
      gemm_micro_tile<MR, P, false, kOps>(in, ld_in, w, K, scale + p * kPanelWidth, shift + p * kPanelWidth,
                                            out + p * kPanelWidth, ld_out, cols_last, act);
  };
  int64_t p = 0;
  for (; p + NP <= n_panels; p += NP) tile.template operator()<NP>(p);
  for (; p < n_panels; ++p) tile.template operator()<1>(p);
}

// Picks the row-block instantiation for `mr` rows at run time.
template <int MR, Operands kOps = Operands::Dense, typename TI, typename TW, typename A>
inline void gemm_rows(int mr, const RegisterActivation<A>& act, const TI* in, int64_t ld_in, const TW* weight,
                      int64_t K, int64_t n_cols, const A* scale, const A* shift, A* out, int64_t ld_out) {
  if constexpr (MR > 0) {
    if (mr == MR)
      gemm_row_block<MR, kOps>(act, in, ld_in, weight, K, n_cols, scale, shift, out, ld_out);
    else
      gemm_rows<MR - 1, kOps>(mr, act, in, ld_in, weight, K, n_cols, scale, shift, out, ld_out);
  }
}

// rows x K values (row stride lda) -> rows x Kp bfloat16 (Kp = K rounded up
// to even, the pad 0): the rows of a bfloat16 run's GEMM (Operands::Pairs,
// RowPairs), rounded to nearest even as eager's bfloat16 tensors are.
// float: vectors of kLanes<float> values at a time, float_to_bf16's rounding
// (NaN kept quiet) in vector code, the tail one by one; bfloat16: copied.
template <typename A>
void round_rows_to_bf16(const A* a, int64_t lda, int64_t rows, int64_t K, int64_t Kp, bf16* dst) {
  constexpr int L = kLanes<float>;
  typedef uint32_t Word __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
  typedef uint16_t Half __attribute__((vector_size(SEQFUSE_VECTOR_BYTES / 2)));
  for (int64_t r = 0; r < rows; ++r) {
    const A* src = a + r * lda;
    bf16* row = dst + r * Kp;
    int64_t k = 0;
    if constexpr (std::is_same_v<A, float>) {
      for (; k + L <= K; k += L) {
        const Word u = __builtin_bit_cast(Word, load_vec<float>(src + k));
        const Word nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where NaN
        const Word rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        const Half h = __builtin_convertvector((nan & ((u >> 16) | 0x40u)) | (~nan & rounded), Half);
        __builtin_memcpy(row + k, &h, sizeof(h));
      }
    }
    if constexpr (std::is_same_v<A, bf16>) {
      __builtin_memcpy(row, src, K * sizeof(bf16));
      k = K;
    }
    for (; k < K; ++k) row[k] = convert<bf16>(convert<float>(src[k]));
    if (Kp > K) row[K] = bf16{0};
  }
}

// out[r][j] = act(in[r][j] * scale[j] + shift[j]) (or act(in[r][j]) without
// scale/shift) for j < n, computed in A and stored as TO. In place is allowed.
template <typename A, typename TI, typename TO>
void elementwise_rows(int64_t n, const A* scale, const A* shift, Activation act, double alpha, const TI* in,
                      int64_t ld_in, int64_t rows, TO* out, int64_t ld_out) {
  constexpr int64_t kChunk = 16 * kPanelWidth;
  alignas(64) A chunk[kChunk];
  for (int64_t r = 0; r < rows; ++r) {
    const TI* src = in + r * ld_in;
    TO* dst = out + r * ld_out;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t len = n - j0 < kChunk ? n - j0 : kChunk;
      if (scale)
        for (int64_t j = 0; j < len; ++j) chunk[j] = convert<A>(src[j0 + j]) * scale[j0 + j] + shift[j0 + j];
      else
        for (int64_t j = 0; j < len; ++j) chunk[j] = convert<A>(src[j0 + j]);
      activate_row(chunk, len, act, alpha);
      for (int64_t j = 0; j < len; ++j) dst[j0 + j] = convert<TO>(chunk[j]);
    }
  }
}
