// The stages of a fused convolution run, written once and compiled per ISA.
//
// Every stage maps a range of output pixels of NHWC activations (channels
// contiguous, compact) to the next stage's NHWC activations, in the
// accumulate type A (float or double). A pixel index runs over
// images * out_h * out_w, so one call serves a whole batch or one image.
//
// Conv is an implicit GEMM: a tile of output pixels is gathered into a
// [pixels][kernel_h * kernel_w * in_channels/groups] patch matrix (im2col) in
// a small cache-resident scratch, then multiplied by the packed weight panels
// with the MLP's register-blocked micro-kernel, whose epilogue applies the
// folded bias/BatchNorm and ReLU while the accumulators are still in
// registers. 1x1 stride-1 convolutions and the Linear head skip the gather.
// Depthwise convolutions run a direct kernel vectorized over channels.
//
// Included by conv_forward_<isa>.cpp inside `namespace seqfuse::kernels::<isa>`
// (see kernel_impl.h for the contract).

#include "kernel_impl.h"

namespace conv_detail {

// Decomposes consecutive pixel indices into (image, row, column) without a
// division per pixel.
struct PixelCursor {
  int64_t n, y, x, h, w;
  PixelCursor(int64_t p, int64_t h_, int64_t w_) : h(h_), w(w_) {
    n = p / (h * w);
    const int64_t rem = p - n * h * w;
    y = rem / w;
    x = rem - y * w;
  }
  void next() {
    if (++x == w) {
      x = 0;
      if (++y == h) y = 0, ++n;
    }
  }
};

// dst[0, n) = src[0, n) in vector moves, the tail masked: the gathers below
// copy runs of a few values (a 3-channel image's kernel row is 9 floats),
// where a call to memcpy per run cost more than the GEMM after it (the
// 3x3/2 3->32 stems of mobilenet and efficientnet).
template <typename A> SEQFUSE_INLINE inline void copy_values(A* dst, const A* src, int64_t n) {
  constexpr int L = kLanes<A>;
  int64_t i = 0;
  for (; i + L <= n; i += L) store_vec(dst + i, load_vec<A>(src + i));
  if (i < n) store_partial(dst + i, load_partial(src + i, n - i), n - i);
}


// rows x K patch matrix of output pixels [p0, p0 + rows), group g.
template <typename A>
void im2col(const ConvStage& st, const StageShape& g, const A* in, int64_t group, int64_t p0, int64_t rows,
            A* patches) {
  const int64_t cin_g = st.in_channels / st.groups, K = st.reduction();
  PixelCursor px(p0, g.out_h, g.out_w);
  for (int64_t r = 0; r < rows; ++r, px.next()) {
    A* dst = patches + r * K;
    const A* image = in + px.n * g.in_h * g.in_w * g.in_c + group * cin_g;
    const int64_t ix0 = px.x * st.stride_w - st.pad_left;
    // One group spanning the pixel and undilated columns all inside the
    // input: a kernel row's taps are adjacent pixels, one copy.
    const bool row_copy = cin_g == g.in_c && st.dilation_w == 1 && ix0 >= 0 && ix0 + st.kernel_w <= g.in_w;
    for (int64_t kh = 0; kh < st.kernel_h; ++kh) {
      const int64_t iy = px.y * st.stride_h - st.pad_top + kh * st.dilation_h;
      if (row_copy && iy >= 0 && iy < g.in_h) {
        copy_values(dst, image + (iy * g.in_w + ix0) * g.in_c, st.kernel_w * cin_g);
        dst += st.kernel_w * cin_g;
        continue;
      }
      for (int64_t kw = 0; kw < st.kernel_w; ++kw, dst += cin_g) {
        const int64_t ix = px.x * st.stride_w - st.pad_left + kw * st.dilation_w;
        if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w)
          for (int64_t c = 0; c < cin_g; ++c) dst[c] = A(0);
        else
          copy_values(dst, image + (iy * g.in_w + ix) * g.in_c, cin_g);
      }
    }
  }
}

// Output channels [16 * panel0, 16 * panel1) of pixels [p0, p1) (panel1 < 0:
// every channel). A channel range splits a stage whose weights outweigh its
// pixels between threads by weights instead of by pixels (see
// gemm_splits_channels); it is for ungrouped stages only.
// A bfloat16 run's Conv/Linear (packs_bf16_pairs) multiplies bfloat16 pairs:
// each tile's patch rows (or input rows) are rounded to bfloat16 into the
// scratch after the patch tile, and the weights are the bfloat16 pairs.
template <typename A>
void conv_gemm(const ConvStage& st, const StageShape& g, const uint8_t* packed, const A* in, A* out, int64_t p0,
               int64_t p1, A* scratch, int64_t panel0, int64_t panel1, bool pairs) {
  constexpr int MR = rows_per_tile<A>();
  const int64_t G = st.groups, cout_g = st.out_channels / G;
  const int64_t K = st.reduction(), np = panel_count(cout_g), C = g.out_c, Kp = pairs ? round_up(K, 2) : K;
  if (panel1 < 0 || G != 1) panel0 = 0, panel1 = np;
  const int64_t col0 = panel0 * kPanelWidth, cols = std::min(cout_g, panel1 * kPanelWidth) - col0;
  if (cols <= 0) return;
  const bool direct = st.kernel_h == 1 && st.kernel_w == 1 && st.stride_h == 1 && st.stride_w == 1 &&
                      !st.pad_top && !st.pad_left && !st.pad_bottom && !st.pad_right && G == 1;
  const A* weight = reinterpret_cast<const A*>(packed + st.weight_offset);
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset);
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset);
  const RegisterActivation<A> act(st.activation, st.alpha);
  int64_t tile = kIm2colBudget / K / MR * MR;
  if (tile < MR) tile = MR;
  if (p1 > p0) {  // patch tiles of equal size too (see the row tiles below)
    const int64_t n_chunks = (p1 - p0 + tile - 1) / tile;
    tile = (p1 - p0 + n_chunks - 1) / n_chunks;
  }
  for (int64_t t0 = p0; t0 < p1; t0 += tile) {
    const int64_t rows = p1 - t0 < tile ? p1 - t0 : tile;
    for (int64_t grp = 0; grp < G; ++grp) {
      const A* a = in + t0 * g.in_c;
      int64_t lda = g.in_c;
      if (!direct) {
        im2col(st, g, in, grp, t0, rows, scratch);
        a = scratch, lda = K;
      }
      const int64_t c = grp * cout_g + col0;
      // Row tiles of equal size (within one row): each tile streams its
      // panels' weights once, so 49 rows (a 7x7 map) run as 5 tiles of 10 or
      // 9 rows instead of 4 of 12 and one of 1, which costs nearly a full tile.
      const int64_t n_tiles = (rows + MR - 1) / MR, base = rows / n_tiles, extra = rows % n_tiles;
      if constexpr (std::is_same_v<A, float>) {
        if (pairs) {
          bf16* rows16 = reinterpret_cast<bf16*>(scratch + conv_scratch_elems(K, false));
          round_rows_to_bf16(a, lda, rows, K, Kp, rows16);
          const bf16* w16 = reinterpret_cast<const bf16*>(packed + st.weight_offset) + (grp * np + panel0) * Kp * kPanelWidth;
          for (int64_t t = 0, r0 = 0; t < n_tiles; ++t) {
            const int mr = static_cast<int>(base + (t < extra));
            gemm_rows<MR, Operands::Pairs>(mr, act, rows16 + r0 * Kp, Kp, w16, Kp, cols, scale + c, shift + c,
                                out + (t0 + r0) * C + c, C);
            r0 += mr;
          }
          continue;
        }
      }
      const A* w = weight + (grp * np + panel0) * K * kPanelWidth;
      for (int64_t t = 0, r0 = 0; t < n_tiles; ++t) {
        const int mr = static_cast<int>(base + (t < extra));
        gemm_rows<MR>(mr, act, a + r0 * lda, lda, w, K, cols, scale + c, shift + c, out + (t0 + r0) * C + c, C);
        r0 += mr;
      }
    }
    if (!act.on) {
      const int64_t c = G == 1 ? col0 : 0, n = G == 1 ? cols : C;
      for (int64_t r = 0; r < rows; ++r) activate_row(out + (t0 + r) * C + c, n, st.activation, st.alpha);
    }
  }
}

// Winograd F(2x2, 3x3) (conv_spec.h) for output pixels [p0, p1) and output
// channels [16 * panel0, 16 * panel1) (panel1 < 0: all): the tiles whose
// rows cover those pixels, in blocks of winograd_block_tiles. Per block, the
// input transform V = B^T d B into [16][tiles][in]; 16 GEMMs on the
// micro-kernel, M = V x U per point, into [tiles][16][cols]; then the output
// transform Y = A^T M A with the epilogue (folded bias/BatchNorm, activation)
// while in registers, storing only pixels inside the map and in [p0, p1).
// The caller's pixel ranges start and end on tile rows (2 output rows) where
// it splits a stage between threads; any other range is still right (a tile
// row shared by two ranges is computed by both, each storing its own pixels).
template <typename A>
void conv_winograd(const ConvStage& st, const StageShape& g, const uint8_t* packed, const A* in, A* out, int64_t p0,
                   int64_t p1, A* scratch, int64_t panel0, int64_t panel1) {
  constexpr int L = kLanes<A>, MR = rows_per_tile<A>();
  constexpr int64_t P = kWinogradPoints;
  const int64_t Cin = g.in_c, C = g.out_c, np = panel_count(C), H = g.in_h, W = g.in_w;
  if (panel1 < 0) panel0 = 0, panel1 = np;
  const int64_t col0 = panel0 * kPanelWidth, cols = std::min(C, panel1 * kPanelWidth) - col0;
  if (cols <= 0 || p1 <= p0) return;
  const A* U = reinterpret_cast<const A*>(packed + st.winograd_offset) + panel0 * Cin * kPanelWidth;
  const int64_t point_stride = np * Cin * kPanelWidth;  // between the points' weight matrices
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset) + col0;
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset) + col0;
  const RegisterActivation<A> act(st.activation, st.alpha);
  const RegisterActivation<A> raw(Activation::None);
  const int64_t T = winograd_block_tiles(Cin, C);
  A* V = scratch;              // [16][T][Cin]
  A* M = V + P * T * Cin;      // [T][16][cols]
  A* ones = M + T * P * C;     // the GEMMs' epilogue is the identity: acc * 1 + 0 (winograd_scratch_elems)
  A* zeros = ones + round_up(C, kPanelWidth) + kPanelWidth;
  for (int64_t c = 0; c < round_up(cols, kPanelWidth); ++c) ones[c] = A(1), zeros[c] = A(0);

  const int64_t plane = g.out_h * g.out_w, trows = winograd_tile_rows(g), tcols = winograd_tile_cols(g);
  const int64_t image_tiles = trows * tcols;
  auto tile_row_of = [&](int64_t p) { return (p / plane) * trows + (p % plane) / g.out_w / kWinogradOut; };
  const int64_t first = tile_row_of(p0) * tcols, last = (tile_row_of(p1 - 1) + 1) * tcols;
  for (int64_t t0 = first; t0 < last; t0 += T) {
    const int64_t nt = std::min(T, last - t0);
    for (int64_t t = 0; t < nt; ++t) {  // input transform
      const int64_t k = t0 + t, n = k / image_tiles, ty = k % image_tiles / tcols, tx = k % tcols;
      const int64_t iy0 = ty * kWinogradOut - st.pad_top, ix0 = tx * kWinogradOut - st.pad_left;
      const A* image = in + n * H * W * Cin;
      const bool inside = iy0 >= 0 && ix0 >= 0 && iy0 + 4 <= H && ix0 + 4 <= W;
      for (int64_t c0 = 0; c0 < Cin; c0 += L) {
        const int64_t len = std::min<int64_t>(L, Cin - c0);
        Vec<A> d[4][4];
        unroll<4>([&](auto i) SEQFUSE_INLINE {
          unroll<4>([&](auto j) SEQFUSE_INLINE {
            const int64_t iy = iy0 + i, ix = ix0 + j;
            const A* src = image + (iy * W + ix) * Cin + c0;
            if (inside && len == L)
              d[i][j] = load_vec<A>(src);
            else if (iy < 0 || iy >= H || ix < 0 || ix >= W)
              d[i][j] = Vec<A>{};
            else
              d[i][j] = len == L ? load_vec<A>(src) : load_partial(src, len);
          });
        });
        Vec<A> r[4][4];  // B^T d, then (B^T d) B
        unroll<4>([&](auto j) SEQFUSE_INLINE {
          r[0][j] = d[0][j] - d[2][j], r[1][j] = d[1][j] + d[2][j];
          r[2][j] = d[2][j] - d[1][j], r[3][j] = d[1][j] - d[3][j];
        });
        unroll<4>([&](auto i) SEQFUSE_INLINE {
          const Vec<A> v[4] = {r[i][0] - r[i][2], r[i][1] + r[i][2], r[i][2] - r[i][1], r[i][1] - r[i][3]};
          unroll<4>([&](auto j) SEQFUSE_INLINE {
            A* dst = V + ((i * 4 + j) * T + t) * Cin + c0;
            if (len == L)
              store_vec(dst, v[j]);
            else
              store_partial(dst, v[j], len);
          });
        });
      }
    }
    // The 16 products, in row tiles of equal size (as conv_gemm's), each
    // point's weight panels outermost: a chunk of panels is read from
    // memory once and stays in L1/L2 while every row tile passes over it.
    constexpr int64_t kChunk = panels_for_rows<A>(MR) * kPanelWidth;
    const int64_t n_tiles = (nt + MR - 1) / MR, base = nt / n_tiles, extra = nt % n_tiles;
    for (int64_t xi = 0; xi < P; ++xi)
      for (int64_t c = 0; c < cols; c += kChunk)
        for (int64_t q = 0, r0 = 0; q < n_tiles; ++q) {
          const int mr = static_cast<int>(base + (q < extra));
          gemm_rows<MR>(mr, raw, V + (xi * T + r0) * Cin, Cin, U + xi * point_stride + c * Cin, Cin,
                        std::min(kChunk, cols - c), ones, zeros, M + (r0 * P + xi) * cols + c, P * cols);
          r0 += mr;
        }
    for (int64_t t = 0; t < nt; ++t) {  // output transform and epilogue
      const int64_t k = t0 + t, n = k / image_tiles, ty = k % image_tiles / tcols, tx = k % tcols;
      int64_t pix[2][2];  // the tile's output pixels, -1 where outside the map or [p0, p1)
      unroll<2>([&](auto a) SEQFUSE_INLINE {
        unroll<2>([&](auto b) SEQFUSE_INLINE {
          const int64_t oy = ty * kWinogradOut + a, ox = tx * kWinogradOut + b, p = n * plane + oy * g.out_w + ox;
          pix[a][b] = oy < g.out_h && ox < g.out_w && p >= p0 && p < p1 ? p : -1;
        });
      });
      const A* mt = M + t * P * cols;
      for (int64_t c = 0; c < cols; c += L) {
        const int64_t len = std::min<int64_t>(L, cols - c);
        Vec<A> m[16];
        unroll<16>([&](auto xi) SEQFUSE_INLINE {
          m[xi] = len == L ? load_vec<A>(mt + xi * cols + c) : load_partial(mt + xi * cols + c, len);
        });
        Vec<A> r[2][4];  // A^T m, then (A^T m) A
        unroll<4>([&](auto j) SEQFUSE_INLINE {
          r[0][j] = m[j] + m[4 + j] + m[8 + j];
          r[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
        });
        const Vec<A> sc = load_vec<A>(scale + c), sh = load_vec<A>(shift + c);
        unroll<2>([&](auto a) SEQFUSE_INLINE {
          const Vec<A> y[2] = {r[a][0] + r[a][1] + r[a][2], r[a][1] - r[a][2] - r[a][3]};
          unroll<2>([&](auto b) SEQFUSE_INLINE {
            if (pix[a][b] < 0) return;
            Vec<A> v = y[b] * sc + sh;
            if (act.on) v = act(v);
            A* dst = out + pix[a][b] * C + col0 + c;
            if (len == L)
              store_vec(dst, v);
            else
              store_partial(dst, v, len);
          });
        });
      }
      if (!act.on)
        for (const int64_t* p : {pix[0], pix[1]})
          for (int b = 0; b < 2; ++b)
            if (p[b] >= 0) activate_row(out + p[b] * C + col0, cols, st.activation, st.alpha);
    }
  }
}

// Calls row(n, oy, ox0, ox1, p) for the output-row segments of pixels [p0, p1).
template <typename F> inline void for_each_row_segment(const StageShape& g, int64_t p0, int64_t p1, F&& row) {
  const int64_t plane = g.out_h * g.out_w;
  for (int64_t p = p0; p < p1;) {
    const int64_t n = p / plane, oy = (p - n * plane) / g.out_w, ox = p - n * plane - oy * g.out_w;
    const int64_t stop = std::min(p1, p - ox + g.out_w);
    row(n, oy, ox, ox + (stop - p), p);
    p = stop;
  }
}

// For output row oy, columns [ox0, ox1): the kernel rows whose input row
// exists, [kh_lo, kh_hi), and the columns whose whole window lies inside the
// input, [in_lo, in_hi) (the direct kernels' unchecked path).
struct RowWindow {
  int64_t iy0, kh_lo, kh_hi, in_lo, in_hi;
  RowWindow(const ConvStage& st, const StageShape& g, int64_t oy, int64_t ox0, int64_t ox1)
      : iy0(oy * st.stride_h - st.pad_top), kh_lo(0), kh_hi(st.kernel_h), in_lo(ox0), in_hi(ox1) {
    while (kh_lo < kh_hi && iy0 + kh_lo * st.dilation_h < 0) ++kh_lo;
    while (kh_hi > kh_lo && iy0 + (kh_hi - 1) * st.dilation_h >= g.in_h) --kh_hi;
    const int64_t span = (st.kernel_w - 1) * st.dilation_w;
    while (in_lo < ox1 && in_lo * st.stride_w - st.pad_left < 0) ++in_lo;
    while (in_hi > in_lo && (in_hi - 1) * st.stride_w - st.pad_left + span >= g.in_w) --in_hi;
  }
};

// Direct depthwise convolution over output rows: per row segment, one vector
// of channels at a time across the segment's pixels, so the channel block's
// taps stay in L1 (in registers for the 3x3 and 5x5 instantiations, whose tap
// loops unroll; 7x7 unrolls too). Pixels whose window lies inside the input take the unchecked
// path; only the border pixels test each tap. Activations RegisterActivation
// does not apply in registers run over the finished row segment while it is
// cache-hot.
template <typename A, int KH, int KW>
void depthwise_row(const ConvStage& st, const StageShape& g, const A* weight, int64_t cpad, const A* scale,
                   const A* shift, const RegisterActivation<A>& act, const A* image, int64_t oy, int64_t ox0,
                   int64_t ox1, A* out) {
  constexpr int L = kLanes<A>;
  const int64_t C = g.out_c, W = g.in_w, kh_n = KH ? KH : st.kernel_h, kw_n = KW ? KW : st.kernel_w;
  const int64_t sw = st.stride_w, dh = st.dilation_h, dw = st.dilation_w;
  const RowWindow rw(st, g, oy, ox0, ox1);
  const int64_t iy0 = rw.iy0, kh_lo = rw.kh_lo, kh_hi = rw.kh_hi, in_lo = rw.in_lo, in_hi = rw.in_hi;
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int64_t len = C - c0 < L ? C - c0 : L;
    const A* wc = weight + c0;
    const Vec<A> sc = load_vec<A>(scale + c0), sh = load_vec<A>(shift + c0);
    auto finish = [&](Vec<A> acc, A* dst) SEQFUSE_INLINE {
      Vec<A> v = acc * sc + sh;
      if (act.on) v = act(v);
      if (len == L)
        store_vec(dst, v);
      else
        store_partial(dst, v, len);
    };
    auto border = [&](int64_t ox) SEQFUSE_INLINE {
      const int64_t ix0 = ox * sw - st.pad_left;
      Vec<A> acc = {};
      for (int64_t kh = kh_lo; kh < kh_hi; ++kh)
        for (int64_t kw = 0; kw < kw_n; ++kw) {
          const int64_t ix = ix0 + kw * dw;
          if (ix < 0 || ix >= W) continue;
          const A* src = image + ((iy0 + kh * dh) * W + ix) * C + c0;
          acc += (len == L ? load_vec<A>(src) : load_partial(src, len)) * load_vec<A>(wc + (kh * kw_n + kw) * cpad);
        }
      finish(acc, out + (ox - ox0) * C + c0);
    };
    int64_t ox = ox0;
    for (; ox < in_lo; ++ox) border(ox);
    if (len == L) {
      if constexpr (KH > 0 && KW > 0) {
        // Fixed taps, every kernel row inside the input: the taps' weights
        // held in registers across the segment and P pixels at a time, P
        // independent accumulation chains (8 on AVX-512 for 3x3: two FMA
        // pipes of 4-cycle latency; one chain per pixel is bound by the
        // latency). Unstrided, the P + KW - 1 input vectors of a kernel row
        // are loaded once and shared by the kernel's columns (P * KW loads
        // otherwise: the loads, not the FMAs, bound the loop). Each output
        // sums its taps in the order (kh, kw), as every path here: the same
        // bits whichever path computes a pixel.
        if (kh_lo == 0 && kh_hi == KH) {
          constexpr bool kWide = L * sizeof(A) >= 64;  // 32 vector registers
          constexpr int T = KH * KW, kMaxP = T <= 9 ? (kWide ? 8 : 4) : (kWide ? 4 : 2);
          Vec<A> wv[T];
          unroll<T>([&](auto t) SEQFUSE_INLINE { wv[t] = load_vec<A>(wc + t * cpad); });
          const bool dense = sw == 1 && dw == 1;
          auto block = [&]<int P>(int64_t px) SEQFUSE_INLINE {
            const A* src = image + (iy0 * W + px * sw - st.pad_left) * C + c0;
            Vec<A> acc[P];
            unroll<P>([&](auto i) SEQFUSE_INLINE { acc[i] = Vec<A>{}; });
            unroll<KH>([&](auto kh) SEQFUSE_INLINE {
              const A* row = src + kh * dh * W * C;
              if (dense) {
                Vec<A> x[P + KW - 1];
                unroll<P + KW - 1>([&](auto j) SEQFUSE_INLINE { x[j] = load_vec<A>(row + j * C); });
                unroll<KW>([&](auto kw) SEQFUSE_INLINE {
                  unroll<P>([&](auto i) SEQFUSE_INLINE { acc[i] += x[i + kw] * wv[kh * KW + kw]; });
                });
              } else {
                unroll<KW>([&](auto kw) SEQFUSE_INLINE {
                  const A* tap = row + kw * dw * C;
                  unroll<P>([&](auto i) SEQFUSE_INLINE { acc[i] += load_vec<A>(tap + i * sw * C) * wv[kh * KW + kw]; });
                });
              }
            });
            unroll<P>([&](auto i) SEQFUSE_INLINE { finish(acc[i], out + (px + i - ox0) * C + c0); });
          };
          for (; ox + kMaxP <= in_hi; ox += kMaxP) block.template operator()<kMaxP>(ox);
          if constexpr (kMaxP > 4)
            for (; ox + 4 <= in_hi; ox += 4) block.template operator()<4>(ox);
          for (; ox + 2 <= in_hi; ox += 2) block.template operator()<2>(ox);
        }
      }
      for (; ox < in_hi; ++ox) {
        const A* src = image + (iy0 * W + ox * sw - st.pad_left) * C + c0;
        Vec<A> acc = {};
        if (kh_lo == 0 && kh_hi == kh_n) {  // the common case: every tap (unrolled when KH, KW are fixed)
          for (int64_t kh = 0; kh < kh_n; ++kh)
            for (int64_t kw = 0; kw < kw_n; ++kw)
              acc += load_vec<A>(src + (kh * dh * W + kw * dw) * C) * load_vec<A>(wc + (kh * kw_n + kw) * cpad);
        } else {
          for (int64_t kh = kh_lo; kh < kh_hi; ++kh)
            for (int64_t kw = 0; kw < kw_n; ++kw)
              acc += load_vec<A>(src + (kh * dh * W + kw * dw) * C) * load_vec<A>(wc + (kh * kw_n + kw) * cpad);
        }
        finish(acc, out + (ox - ox0) * C + c0);
      }
    }
    for (; ox < ox1; ++ox) border(ox);
  }
  if (!act.on) activate_row(out, (ox1 - ox0) * C, st.activation, st.alpha);
}

template <typename A>
void conv_depthwise(const ConvStage& st, const StageShape& g, const uint8_t* packed, const A* in, A* out,
                    int64_t p0, int64_t p1) {
  const int64_t C = g.out_c, cpad = round_up(C, kPanelWidth);
  const A* weight = reinterpret_cast<const A*>(packed + st.weight_offset);
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset);
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset);
  const RegisterActivation<A> act(st.activation, st.alpha);
  auto row = depthwise_row<A, 0, 0>;
  if (st.kernel_h == 3 && st.kernel_w == 3) row = depthwise_row<A, 3, 3>;
  if (st.kernel_h == 5 && st.kernel_w == 5) row = depthwise_row<A, 5, 5>;
  if (st.kernel_h == 7 && st.kernel_w == 7) row = depthwise_row<A, 7, 7>;  // ConvNeXt
  for_each_row_segment(g, p0, p1, [&](int64_t n, int64_t oy, int64_t ox0, int64_t ox1, int64_t p) {
    row(st, g, weight, cpad, scale, shift, act, in + n * g.in_h * g.in_w * C, oy, ox0, ox1, out + p * C);
  });
}

template <typename A, int NV>
void grouped_row(const ConvStage& st, const StageShape& g, const A* weight, const A* scale, const A* shift,
                 const RegisterActivation<A>& act, const A* image, int64_t oy, int64_t ox0, int64_t ox1, A* out) {
  constexpr int L = kLanes<A>;
  // Pixels per block: independent accumulators enough to cover the FMA
  // latency on two FMA ports (8 chains) whether a group's outputs take one
  // register or two.
  constexpr int64_t kPixels = NV == 1 ? 8 : 4;
  const int64_t G = st.groups, cin_g = st.in_channels / G, cout_g = st.out_channels / G, K = st.reduction();
  const int64_t C = g.out_c, Cin = g.in_c, W = g.in_w, kw_n = st.kernel_w, sw = st.stride_w;
  const int64_t dh = st.dilation_h, dw = st.dilation_w;
  const RowWindow rw(st, g, oy, ox0, ox1);
  const int64_t iy0 = rw.iy0, kh_lo = rw.kh_lo, kh_hi = rw.kh_hi, in_lo = rw.in_lo, in_hi = rw.in_hi;
  for (int64_t grp = 0; grp < G; ++grp) {
    const A* wg = weight + grp * K * kPanelWidth;  // one panel per group: [k][16]
    const A* sc = scale + grp * cout_g;
    const A* sh = shift + grp * cout_g;
    // P pixels starting at ox; `checked`: test each tap's column.
    auto block = [&]<int P>(int64_t ox, bool checked) SEQFUSE_INLINE {
      Vec<A> acc[P][NV];
      unroll<P>([&](auto i) SEQFUSE_INLINE { unroll<NV>([&](auto q) SEQFUSE_INLINE { acc[i][q] = Vec<A>{}; }); });
      for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
        const A* row = image + (iy0 + kh * dh) * W * Cin + grp * cin_g;
        for (int64_t kw = 0; kw < kw_n; ++kw) {
          const int64_t ix = ox * sw - st.pad_left + kw * dw;
          if (checked && (ix < 0 || ix >= W)) continue;
          const A* src = row + ix * Cin;
          const A* wk = wg + (kh * kw_n + kw) * cin_g * kPanelWidth;
          for (int64_t c = 0; c < cin_g; ++c) {
            Vec<A> wv[NV];
            unroll<NV>([&](auto q) SEQFUSE_INLINE { wv[q] = load_vec<A>(wk + c * kPanelWidth + q * L); });
            unroll<P>([&](auto i) SEQFUSE_INLINE {
              const A a = src[i * sw * Cin + c];
              unroll<NV>([&](auto q) SEQFUSE_INLINE { acc[i][q] += a * wv[q]; });
            });
          }
        }
      }
      unroll<NV>([&](auto q) SEQFUSE_INLINE {
        const int64_t valid = cout_g - q * L < L ? cout_g - q * L : L;
        if (valid <= 0) return;
        const Vec<A> s = load_vec<A>(sc + q * L), t = load_vec<A>(sh + q * L);
        unroll<P>([&](auto i) SEQFUSE_INLINE {
          Vec<A> v = acc[i][q] * s + t;
          if (act.on) v = act(v);
          A* dst = out + (ox + i - ox0) * C + grp * cout_g + q * L;
          if (valid == L)
            store_vec(dst, v);
          else
            store_partial(dst, v, valid);
        });
      });
    };
    int64_t ox = ox0;
    for (; ox < in_lo; ++ox) block.template operator()<1>(ox, true);
    for (; ox + kPixels <= in_hi; ox += kPixels) block.template operator()<kPixels>(ox, false);
    if constexpr (kPixels > 4)
      for (; ox + 4 <= in_hi; ox += 4) block.template operator()<4>(ox, false);
    for (; ox < in_hi; ++ox) block.template operator()<1>(ox, false);
    for (; ox < ox1; ++ox) block.template operator()<1>(ox, true);
  }
  if (!act.on) activate_row(out, (ox1 - ox0) * C, st.activation, st.alpha);
}

template <typename A>
void conv_grouped(const ConvStage& st, const StageShape& g, const uint8_t* packed, const A* in, A* out, int64_t p0,
                  int64_t p1) {
  const A* weight = reinterpret_cast<const A*>(packed + st.weight_offset);
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset);
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset);
  const RegisterActivation<A> act(st.activation, st.alpha);
  // Vectors per group's outputs: 1, 2 or a whole panel's.
  const int64_t nv = (st.out_channels / st.groups + kLanes<A> - 1) / kLanes<A>;
  auto row = grouped_row<A, kVecsPerPanel<A>>;
  if (nv == 1) row = grouped_row<A, 1>;
  if (nv == 2 && kVecsPerPanel<A> >= 2) row = grouped_row<A, (kVecsPerPanel<A> >= 2 ? 2 : 1)>;
  for_each_row_segment(g, p0, p1, [&](int64_t n, int64_t oy, int64_t ox0, int64_t ox1, int64_t p) {
    row(st, g, weight, scale, shift, act, in + n * g.in_h * g.in_w * g.in_c, oy, ox0, ox1, out + p * g.out_c);
  });
}

// Max or average over each window, one vector of channels at a time, as ATen's CPU
// pooling computes it (NaN wins a max; the average's divisor per
// count_include_pad / divisor_override, windows clipped to the padded input).
template <typename A, bool kMax>
void pool(const ConvStage& st, const StageShape& g, const A* in, A* out, int64_t p0, int64_t p1) {
  const int64_t C = g.out_c;
  const bool include_pad = st.options & kCountIncludePad;
  PixelCursor px(p0, g.out_h, g.out_w);
  for (int64_t p = p0; p < p1; ++p, px.next()) {
    const A* image = in + px.n * g.in_h * g.in_w * C;
    A* dst = out + p * C;
    const int64_t y0 = px.y * st.stride_h - st.pad_top, x0 = px.x * st.stride_w - st.pad_left;
    // Average divisor (unused by max).
    const int64_t y_end_pad = std::min(y0 + st.kernel_h, g.in_h + st.pad_bottom);
    const int64_t x_end_pad = std::min(x0 + st.kernel_w, g.in_w + st.pad_right);
    const int64_t padded_count = (y_end_pad - y0) * (x_end_pad - x0);
    const int64_t valid_count = std::max<int64_t>(std::min(y_end_pad, g.in_h) - std::max<int64_t>(y0, 0), 0) *
                                std::max<int64_t>(std::min(x_end_pad, g.in_w) - std::max<int64_t>(x0, 0), 0);
    const A divisor = static_cast<A>(st.divisor ? st.divisor : include_pad ? padded_count : valid_count);
    for (int64_t c0 = 0; c0 < C; c0 += kLanes<A>) {
      const int64_t len = C - c0 < kLanes<A> ? C - c0 : kLanes<A>;
      Vec<A> acc = kMax ? splat<A>(-__builtin_inf()) : Vec<A>{};
      for (int64_t kh = 0; kh < st.kernel_h; ++kh) {
        const int64_t iy = y0 + kh * st.dilation_h;
        if (iy < 0 || iy >= g.in_h) continue;
        for (int64_t kw = 0; kw < st.kernel_w; ++kw) {
          const int64_t ix = x0 + kw * st.dilation_w;
          if (ix < 0 || ix >= g.in_w) continue;
          const A* src = image + (iy * g.in_w + ix) * C + c0;
          const Vec<A> x = len == kLanes<A> ? load_vec<A>(src) : load_partial(src, len);
          if constexpr (kMax)
            acc = (x > acc) | (x != x) ? x : acc;
          else
            acc += x;
        }
      }
      if constexpr (!kMax) acc = valid_count > 0 ? acc / divisor : Vec<A>{};
      if (len == kLanes<A>)
        store_vec(dst + c0, acc);
      else
        store_partial(dst + c0, acc, len);
    }
    activate_row(dst, C, st.activation, st.alpha);
  }
}

template <typename A>
void global_avg_pool(const ConvStage& st, const StageShape& g, const A* in, A* out, int64_t n0, int64_t n1) {
  const int64_t C = g.out_c, hw = g.in_h * g.in_w;
  for (int64_t n = n0; n < n1; ++n) {
    const A* image = in + n * hw * C;
    A* dst = out + n * C;
    for (int64_t c = 0; c < C; ++c) dst[c] = A(0);
    for (int64_t p = 0; p < hw; ++p)
      for (int64_t c = 0; c < C; ++c) dst[c] += image[p * C + c];
    for (int64_t c = 0; c < C; ++c) dst[c] /= static_cast<A>(hw);
    activate_row(dst, C, st.activation, st.alpha);
  }
}

// NHWC -> the NCHW order of torch.flatten(x, 1).
template <typename A> void flatten_nchw(const StageShape& g, const A* in, A* out, int64_t n0, int64_t n1) {
  const int64_t C = g.in_c, hw = g.in_h * g.in_w;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < hw; ++p) out[n * C * hw + c * hw + p] = in[(n * hw + p) * C + c];
}

}  // namespace conv_detail

// One stage over output pixels [p0, p1) (images for GlobalAvgPool and
// Flatten, whose output is one pixel per image). `scratch` holds
// conv_scratch_elems or winograd_scratch_elems values (scratch_elems in conv_forward.cpp).
// in and out never alias.
template <typename A>
void conv_stage(const ConvDesc& d, const ConvGeometry& geom, size_t i, const uint8_t* packed, const A* in, A* out,
                int64_t p0, int64_t p1, A* scratch, int64_t panel0 = 0, int64_t panel1 = -1) {
  using namespace conv_detail;
  const ConvStage& st = d.stages[i];
  const StageShape& g = geom.stages[i];
  switch (st.kind) {
    case ConvStageKind::Conv:
    case ConvStageKind::Linear:
      if (g.winograd)
        conv_winograd(st, g, packed, in, out, p0, p1, scratch, panel0, panel1);
      else if (st.depthwise)
        conv_depthwise(st, g, packed, in, out, p0, p1);
      else if (grouped_direct(st))
        conv_grouped(st, g, packed, in, out, p0, p1);
      else
        conv_gemm(st, g, packed, in, out, p0, p1, scratch, panel0, panel1, packs_bf16_pairs(d.dtype, st));
      break;
    case ConvStageKind::ScaleShift:
    case ConvStageKind::Pointwise: {
      const bool affine = st.kind == ConvStageKind::ScaleShift;
      elementwise_rows<A, A, A>(g.out_c, affine ? reinterpret_cast<const A*>(packed + st.scale_offset) : nullptr,
                                affine ? reinterpret_cast<const A*>(packed + st.shift_offset) : nullptr,
                                st.activation, st.alpha, in + p0 * g.in_c, g.in_c, p1 - p0, out + p0 * g.out_c,
                                g.out_c);
      break;
    }
    case ConvStageKind::MaxPool: pool<A, true>(st, g, in, out, p0, p1); break;
    case ConvStageKind::AvgPool: pool<A, false>(st, g, in, out, p0, p1); break;
    case ConvStageKind::GlobalAvgPool: global_avg_pool(st, g, in, out, p0, p1); break;
    case ConvStageKind::Flatten: flatten_nchw(g, in, out, p0, p1); break;
  }
}

// The epilogue of a Conv stage whose convolution ran elsewhere (ATen) over
// pixels [p0, p1): out = act(in * scale + shift), read as TI and written as TO
// (bfloat16 in, bfloat16 or float out, for bfloat16 runs); in place allowed.
template <typename TI, typename TO>
void conv_epilogue(const ConvDesc& d, const ConvGeometry& geom, size_t i, const uint8_t* packed, const TI* in,
                   TO* out, int64_t p0, int64_t p1) {
  using A = acc_t<TI>;
  const ConvStage& st = d.stages[i];
  const int64_t C = geom.stages[i].out_c;
  elementwise_rows<A, TI, TO>(C, reinterpret_cast<const A*>(packed + st.scale_offset),
                              reinterpret_cast<const A*>(packed + st.shift_offset), st.activation, st.alpha,
                              in + p0 * C, C, p1 - p0, out + p0 * C, C);
}


void conv_stage_f32(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* pk, const float* in,
                    float* out, int64_t p0, int64_t p1, float* scratch, int64_t panel0, int64_t panel1) {
  conv_stage<float>(d, g, i, pk, in, out, p0, p1, scratch, panel0, panel1);
}
void conv_stage_f64(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* pk, const double* in,
                    double* out, int64_t p0, int64_t p1, double* scratch, int64_t panel0, int64_t panel1) {
  conv_stage<double>(d, g, i, pk, in, out, p0, p1, scratch, panel0, panel1);
}
#define SEQFUSE_EPILOGUE_ENTRY(TI, TO)                                                                         \
  void conv_epilogue_io(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* pk, const TI* in,      \
                        TO* out, int64_t p0, int64_t p1) {                                                       \
    conv_epilogue<TI, TO>(d, g, i, pk, in, out, p0, p1);                                                         \
  }
SEQFUSE_EPILOGUE_ENTRY(float, float)
SEQFUSE_EPILOGUE_ENTRY(double, double)
SEQFUSE_EPILOGUE_ENTRY(bf16, bf16)
SEQFUSE_EPILOGUE_ENTRY(bf16, float)
#undef SEQFUSE_EPILOGUE_ENTRY

// Layout conversions at a run's boundaries, (N, C, H, W) with any element
// strides <-> compact NHWC in the accumulate type. They walk 8 channels at a
// time: NCHW channel rows are H*W elements apart, often a multiple of 4 KiB,
// so they share an L1 set, and more concurrent rows than the cache's ways
// would evict each other. Unit-stride rows get their own loop so the compiler
// vectorizes it (gathers/scatters within a cache-resident row).
namespace conv_detail {
constexpr int64_t kChannelBlock = 8;

template <typename T, typename A>
void load_nhwc(const T* x, const int64_t* s, int64_t C, int64_t H, int64_t W, int64_t n0, int64_t n1, A* out) {
  // Rows already in NHWC order (channels_last input, the bfloat16 chains of a
  // channels_last run): one contiguous conversion per row, which vectorizes;
  // the per-channel gather below was 5x slower on them.
  const bool nhwc_rows = s[1] == 1 && s[3] == C;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t h = 0; h < H; ++h) {
      A* __restrict row = out + ((n * H + h) * W) * C;
      const T* __restrict src = x + n * s[0] + h * s[2];
      if (nhwc_rows) {
        for (int64_t i = 0; i < W * C; ++i) row[i] = convert<A>(src[i]);
        continue;
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t cn = C - c0 < kChannelBlock ? C - c0 : kChannelBlock;
        for (int64_t c = 0; c < cn; ++c) {
          const T* __restrict in = src + (c0 + c) * s[1];
          A* __restrict dst = row + c0 + c;
          if (s[3] == 1)
            for (int64_t w = 0; w < W; ++w) dst[w * C] = convert<A>(in[w]);
          else
            for (int64_t w = 0; w < W; ++w) dst[w * C] = convert<A>(in[w * s[3]]);
        }
      }
    }
}

template <typename A, typename T>
void store_nhwc(const A* y, int64_t C, int64_t H, int64_t W, const int64_t* s, int64_t n0, int64_t n1, T* out) {
  const bool nhwc_rows = s[1] == 1 && s[3] == C;  // as load_nhwc
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const A* __restrict row = y + ((n * H + h) * W) * C;
      T* __restrict dst = out + n * s[0] + h * s[2];
      if (nhwc_rows) {
        for (int64_t i = 0; i < W * C; ++i) dst[i] = convert<T>(row[i]);
        continue;
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t cn = C - c0 < kChannelBlock ? C - c0 : kChannelBlock;
        for (int64_t c = 0; c < cn; ++c) {
          const A* __restrict src = row + c0 + c;
          T* __restrict o = dst + (c0 + c) * s[1];
          if (s[3] == 1)
            for (int64_t w = 0; w < W; ++w) o[w] = convert<T>(src[w * C]);
          else
            for (int64_t w = 0; w < W; ++w) o[w * s[3]] = convert<T>(src[w * C]);
        }
      }
    }
}
}  // namespace conv_detail

#define SEQFUSE_LAYOUT_ENTRY(T)                                                                                  \
  void conv_load_nhwc(const T* x, const int64_t* s, int64_t C, int64_t H, int64_t W, int64_t n0, int64_t n1,     \
                      acc_t<T>* out) {                                                                           \
    conv_detail::load_nhwc<T, acc_t<T>>(x, s, C, H, W, n0, n1, out);                                             \
  }                                                                                                              \
  void conv_store_nhwc(const acc_t<T>* y, int64_t C, int64_t H, int64_t W, const int64_t* s, int64_t n0,         \
                       int64_t n1, T* out) {                                                                     \
    conv_detail::store_nhwc<acc_t<T>, T>(y, C, H, W, s, n0, n1, out);                                            \
  }
SEQFUSE_LAYOUT_ENTRY(float)
SEQFUSE_LAYOUT_ENTRY(double)
SEQFUSE_LAYOUT_ENTRY(bf16)
#undef SEQFUSE_LAYOUT_ENTRY
