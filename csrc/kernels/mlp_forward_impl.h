// The fused MLP forward, written once and compiled per ISA.
//
// A caller hands over a tile of rows; the tile is carried through every stage
// with its activations in two ping-pong buffers that stay in L1/L2, so no
// intermediate ever goes back to memory. A Linear stage is a register-blocked
// GEMM over weights packed into 16-column panels ([panel][k][16]); bias and a
// folded BatchNorm are one multiply-add in the accumulator registers, and ReLU
// is applied there too. Other activations run over the fresh, cache-hot rows.
//
// Included by mlp_forward_<isa>.cpp inside `namespace seqfuse::kernels::<isa>`
// after that file set its target pragma and defined:
//   SEQFUSE_VECTOR_BYTES   width of one hardware vector register
//   SEQFUSE_ACC_REGISTERS  how many of them the accumulators may use
// Everything here must be header-only templates or inline: it gets a separate
// copy per ISA namespace, which is what keeps the variants apart at link time.

template <typename A> inline Vec<A> splat(A v) {
  Vec<A> r = {};
  return r + v;
}

// Loads 16 consecutive values of storage type T widened to the accumulate type.
template <typename A, typename T> inline Vec<A> load_vec(const T* p) {
  Vec<A> r;
  __builtin_memcpy(&r, p, sizeof(r));
  return r;
}
template <> inline Vec<float> load_vec<float, bf16>(const bf16* p) {
  U16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  Vec<float> r;
  __builtin_memcpy(&r, &w, sizeof(r));
  return r;
}

template <typename A> inline void store_vec(A* p, Vec<A> v) { __builtin_memcpy(p, &v, sizeof(v)); }


#include "activations.h"

template <typename A> constexpr int registers_per_panel() {
  return static_cast<int>(kPanelWidth * sizeof(A)) / SEQFUSE_VECTOR_BYTES;
}
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

// out[r][16p + j] = epilogue(sum_k in[r][k] * panel_p[k][j]) for r < MR, p < NP.
template <int MR, int NP, bool kReLU, typename TI, typename TW, typename A>
inline void gemm_micro_tile(const TI* __restrict in, int64_t ld_in, const TW* __restrict panels, int64_t K,
                            const A* __restrict scale, const A* __restrict shift, A* __restrict out,
                            int64_t ld_out) {
  Vec<A> acc[MR][NP];
  unroll<MR>([&](auto r) SEQFUSE_INLINE { unroll<NP>([&](auto p) SEQFUSE_INLINE { acc[r][p] = Vec<A>{}; }); });
  for (int64_t k = 0; k < K; ++k) {
    Vec<A> b[NP];
    unroll<NP>([&](auto p) SEQFUSE_INLINE { b[p] = load_vec<A>(panels + (p * K + k) * kPanelWidth); });
    unroll<MR>([&](auto r) SEQFUSE_INLINE {
      const A a = convert<A>(in[r * ld_in + k]);
      unroll<NP>([&](auto p) SEQFUSE_INLINE { acc[r][p] += a * b[p]; });
    });
  }
  unroll<NP>([&](auto p) SEQFUSE_INLINE {
    const Vec<A> sc = load_vec<A>(scale + p * kPanelWidth);
    const Vec<A> sh = load_vec<A>(shift + p * kPanelWidth);
    unroll<MR>([&](auto r) SEQFUSE_INLINE {
      Vec<A> v = acc[r][p] * sc + sh;
      if constexpr (kReLU) v = v < A(0) ? Vec<A>{} : v;  // NaN stays NaN, as in eager
      store_vec(out + r * ld_out + p * kPanelWidth, v);
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
template <int MR, typename TI, typename TW, typename A>
inline void gemm_row_block(bool relu, const TI* in, int64_t ld_in, const TW* weight, int64_t K, int64_t n_panels,
                           const A* scale, const A* shift, A* out, int64_t ld_out) {
  constexpr int NP = panels_for_rows<A>(MR);
  int64_t p = 0;
  for (; p + NP <= n_panels; p += NP) {
    if (relu)
      gemm_micro_tile<MR, NP, true>(in, ld_in, weight + p * K * kPanelWidth, K, scale + p * kPanelWidth,
                                    shift + p * kPanelWidth, out + p * kPanelWidth, ld_out);
    else
      gemm_micro_tile<MR, NP, false>(in, ld_in, weight + p * K * kPanelWidth, K, scale + p * kPanelWidth,
                                     shift + p * kPanelWidth, out + p * kPanelWidth, ld_out);
  }
  for (; p < n_panels; ++p) {
    if (relu)
      gemm_micro_tile<MR, 1, true>(in, ld_in, weight + p * K * kPanelWidth, K, scale + p * kPanelWidth,
                                   shift + p * kPanelWidth, out + p * kPanelWidth, ld_out);
    else
      gemm_micro_tile<MR, 1, false>(in, ld_in, weight + p * K * kPanelWidth, K, scale + p * kPanelWidth,
                                    shift + p * kPanelWidth, out + p * kPanelWidth, ld_out);
  }
}

// Picks the row-block instantiation for `mr` rows at run time.
template <int MR, typename TI, typename TW, typename A>
inline void gemm_rows(int mr, bool relu, const TI* in, int64_t ld_in, const TW* weight, int64_t K, int64_t n_panels,
                      const A* scale, const A* shift, A* out, int64_t ld_out) {
  if constexpr (MR > 0) {
    if (mr == MR)
      gemm_row_block<MR>(relu, in, ld_in, weight, K, n_panels, scale, shift, out, ld_out);
    else
      gemm_rows<MR - 1>(mr, relu, in, ld_in, weight, K, n_panels, scale, shift, out, ld_out);
  }
}

template <typename A, typename TI, typename TW>
void run_linear_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows, A* out,
                      int64_t ld_out) {
  constexpr int MR = rows_per_tile<A>();
  const int64_t K = st.in_features;
  const int64_t n_panels = panel_count(st.out_features);
  const TW* weight = reinterpret_cast<const TW*>(packed + st.weight_offset);
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset);
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset);
  const bool relu = st.activation == Activation::ReLU;
  // Row blocks outer, panels inner: a row block's inputs stay in L1 while the
  // weights stream from L2, which the packed panel layout makes sequential.
  for (int64_t r0 = 0; r0 < rows; r0 += MR) {
    const int mr = static_cast<int>(rows - r0 < MR ? rows - r0 : MR);
    gemm_rows<MR>(mr, relu, in + r0 * ld_in, ld_in, weight, K, n_panels, scale, shift, out + r0 * ld_out, ld_out);
  }
  if (!relu)
    for (int64_t r = 0; r < rows; ++r) activate_row(out + r * ld_out, st.out_features, st.activation, st.alpha);
}

// out = act(in * scale + shift) per channel (Linear epilogue or ScaleShift), or
// act(in) (Pointwise), computed in A and stored as TO. In place is allowed.
template <typename A, typename TI, typename TO>
void run_elementwise_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows,
                           TO* out, int64_t ld_out) {
  constexpr int64_t kChunk = 16 * kPanelWidth;
  const int64_t n = st.out_features;
  const bool affine = st.kind != StageKind::Pointwise;
  const A* scale = affine ? reinterpret_cast<const A*>(packed + st.scale_offset) : nullptr;
  const A* shift = affine ? reinterpret_cast<const A*>(packed + st.shift_offset) : nullptr;
  alignas(64) A chunk[kChunk];
  for (int64_t r = 0; r < rows; ++r) {
    const TI* src = in + r * ld_in;
    TO* dst = out + r * ld_out;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t len = n - j0 < kChunk ? n - j0 : kChunk;
      if (affine)
        for (int64_t j = 0; j < len; ++j) chunk[j] = convert<A>(src[j0 + j]) * scale[j0 + j] + shift[j0 + j];
      else
        for (int64_t j = 0; j < len; ++j) chunk[j] = convert<A>(src[j0 + j]);
      activate_row(chunk, len, st.activation, st.alpha);
      for (int64_t j = 0; j < len; ++j) dst[j0 + j] = convert<TO>(chunk[j]);
    }
  }
}

template <typename A, typename TI, typename TW>
void run_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows, A* out,
               int64_t ld_out) {
  if (st.kind == StageKind::Linear)
    run_linear_stage<A, TI, TW>(st, packed, in, ld_in, rows, out, ld_out);
  else
    run_elementwise_stage<A, TI, A>(st, packed, in, ld_in, rows, out, ld_out);
}

// Runs `rows` rows (at most desc's tile size) through every stage.
// workspace: 2 * rows * desc.max_width accumulate-type elements.
template <typename T>
void mlp_forward_tile(const MlpDesc& desc, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                      int64_t rows, acc_t<T>* workspace) {
  using A = acc_t<T>;
  const int64_t ld = desc.max_width;
  A* buffers[2] = {workspace, workspace + rows * ld};
  const size_t n_stages = desc.stages.size();
  for (size_t i = 0; i < n_stages; ++i) {
    A* out = buffers[i % 2];
    if (i == 0)
      run_stage<A, T, T>(desc.stages[i], packed, x, ld_x, rows, out, ld);
    else
      run_stage<A, A, T>(desc.stages[i], packed, buffers[(i - 1) % 2], ld, rows, out, ld);
  }
  const A* last = buffers[(n_stages - 1) % 2];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < desc.out_features; ++j) y[r * ld_y + j] = convert<T>(last[r * ld + j]);
}

int micro_tile_rows_f32() { return rows_per_tile<float>(); }

// One stage's epilogue over rows whose product was computed elsewhere.
template <typename T>
void mlp_epilogue(const MlpDesc& d, size_t stage, const uint8_t* packed, const T* in, int64_t ld_in, T* out,
                  int64_t ld_out, int64_t rows) {
  run_elementwise_stage<acc_t<T>, T, T>(d.stages[stage], packed, in, ld_in, rows, out, ld_out);
}
void mlp_epilogue_f32(const MlpDesc& d, size_t s, const uint8_t* p, const float* in, int64_t ldi, float* out,
                      int64_t ldo, int64_t rows) {
  mlp_epilogue<float>(d, s, p, in, ldi, out, ldo, rows);
}
void mlp_epilogue_f64(const MlpDesc& d, size_t s, const uint8_t* p, const double* in, int64_t ldi, double* out,
                      int64_t ldo, int64_t rows) {
  mlp_epilogue<double>(d, s, p, in, ldi, out, ldo, rows);
}
void mlp_epilogue_bf16(const MlpDesc& d, size_t s, const uint8_t* p, const bf16* in, int64_t ldi, bf16* out,
                       int64_t ldo, int64_t rows) {
  mlp_epilogue<bf16>(d, s, p, in, ldi, out, ldo, rows);
}

void mlp_forward_tile_f32(const MlpDesc& d, const uint8_t* p, const float* x, int64_t ldx, float* y, int64_t ldy,
                          int64_t rows, float* ws) {
  mlp_forward_tile<float>(d, p, x, ldx, y, ldy, rows, ws);
}
void mlp_forward_tile_f64(const MlpDesc& d, const uint8_t* p, const double* x, int64_t ldx, double* y, int64_t ldy,
                          int64_t rows, double* ws) {
  mlp_forward_tile<double>(d, p, x, ldx, y, ldy, rows, ws);
}
void mlp_forward_tile_bf16(const MlpDesc& d, const uint8_t* p, const bf16* x, int64_t ldx, bf16* y, int64_t ldy,
                           int64_t rows, float* ws) {
  mlp_forward_tile<bf16>(d, p, x, ldx, y, ldy, rows, ws);
}
