// The fully fused MLP kernel: one launch runs every stage of a chain whose
// widths fit on chip (tiny-cuda-nn's idea, for any widths, batch sizes and the
// whole stage set of mlp_spec.h).
//
// A block is kWarps warps; each warp owns 16 rows of the batch for the whole
// chain. The warp's activations live in shared memory (two buffers, ping-pong,
// [16][ld] in the activation type S), so stages only order the warp's own lanes
// (__syncwarp), never the block. Per Linear stage and 16-column output tile:
//   - half/bfloat16: WMMA 16x16x16 products with fp32 accumulation, the A tile
//     from the warp's activations, the B tile straight from the packed weight
//     panel ([panel][k][16], mlp_spec.h's layout: row-major, ld 16);
//   - float / double: SIMT products, each lane owning 8 of the tile's 256 outputs
//     (exact fp32: no TF32);
// the tile goes through a float scratch tile, then the epilogue
// (y = act(acc * scale + shift), scale/shift from the packed buffer) writes it
// to the other activation buffer, rounded to S. ScaleShift / Pointwise stages
// run in place. Rows past the batch are zero and never stored; columns past a
// stage's width (up to its 16-column padding, the next stage's K tiles) are
// written as zeros, and a stage reads no column past its input's padding.
#pragma once

#include "../mlp_spec.h"
#include "activation.cuh"
#include "device.cuh"

namespace seqfuse::cuda {

constexpr int kFusedWarps = 4;
constexpr int kFusedRowsPerWarp = 16;
constexpr int kFusedRowsPerBlock = kFusedWarps * kFusedRowsPerWarp;
constexpr int kFusedMaxStages = 24;
// Activation buffers are [16][width + kSkew]: the skew keeps the 16 rows of a
// WMMA tile load in different banks.
constexpr int kSkew = 8;

// One stage as the kernel reads it (built from kernels::StageDesc on the host;
// passed by value in the launch parameters).
struct FusedStage {
  int32_t kind;  // kernels::StageKind
  int32_t in, out;
  int32_t activation;
  double alpha;  // LeakyReLU slope, kept in double: the float64 kernel applies it unrounded, as eager does
  int64_t weight_offset, scale_offset, shift_offset;  // bytes into the packed buffer, -1 if absent
};

struct FusedMlpArgs {
  const void* x;
  int64_t ld_x;
  void* y;
  int64_t ld_y;
  int64_t rows;
  const uint8_t* packed;
  int32_t n_stages;
  int32_t width;  // the widest activation, a multiple of 16 (MlpDesc::max_width)
  FusedStage stages[kFusedMaxStages];
};

// The activation type between stages: the data type for half types (WMMA reads
// it), the accumulate type otherwise.
template <typename T> using fused_act_t = std::conditional_t<kIsHalfType<T>, T, acc_of<T>>;

template <typename T> SEQFUSE_HD int64_t fused_row_ld(int width) { return width + kSkew; }

// Dynamic shared memory per block: per warp two activation buffers, a float
// 16x16 scratch tile and a 16x16 staging tile of T (a partial K tile of weights).
template <typename T> SEQFUSE_HD int64_t fused_mlp_smem_bytes(int width) {
  using S = fused_act_t<T>;
  using A = acc_of<T>;
  const int64_t per_warp = 2 * kFusedRowsPerWarp * fused_row_ld<T>(width) * int64_t(sizeof(S)) +
                           256 * int64_t(sizeof(A)) + 256 * int64_t(sizeof(T));
  return kFusedWarps * ((per_warp + 127) / 128 * 128);
}

namespace fused_detail {

template <typename T> SEQFUSE_DEVICE const acc_of<T>* section(const FusedMlpArgs& a, int64_t off) {
  return reinterpret_cast<const acc_of<T>*>(a.packed + off);
}

// out tile [16][16] in scratch (ld 16) -> act(acc * scale + shift) -> dst columns [c0, c0 + 16).
template <typename T, typename S>
SEQFUSE_DEVICE void epilogue_tile(const acc_of<T>* scratch, const FusedStage& st, const FusedMlpArgs& a, int c0,
                                  S* dst, int64_t ld, int lane) {
  using A = acc_of<T>;
  const A* scale = section<T>(a, st.scale_offset);
  const A* shift = section<T>(a, st.shift_offset);
  const auto act = static_cast<Activation>(st.activation);
  for (int e = lane; e < 256; e += kWarpSize) {
    const int r = e >> 4, c = e & 15;
    // Columns past the stage's width are exact zeros: the next stage's padded
    // K tile multiplies them by zero weights, which must not make a NaN of an inf.
    const A v = c0 + c < st.out ? activate<A>(scratch[e] * scale[c0 + c] + shift[c0 + c], act, A(st.alpha)) : A(0);
    dst[r * ld + c0 + c] = Storage<S>::store(v);
  }
}

// SIMT product of one 16x16 output tile: lane owns column lane % 16 and rows
// (lane / 16) * 8 + i. Weights of panel p at [k][16].
template <typename T, typename S>
SEQFUSE_DEVICE void simt_tile(const S* act, int64_t ld, const T* panel, int K, acc_of<T>* scratch, int lane) {
  using A = acc_of<T>;
  const int c = lane & 15, r0 = (lane >> 4) * 8;
  A acc[8];
SEQFUSE_UNROLL
  for (int i = 0; i < 8; ++i) acc[i] = A(0);
  for (int k = 0; k < K; ++k) {
    const A w = Storage<T>::load(panel[k * 16 + c]);
SEQFUSE_UNROLL
    for (int i = 0; i < 8; ++i) acc[i] += Storage<S>::load(act[(r0 + i) * ld + k]) * w;
  }
SEQFUSE_UNROLL
  for (int i = 0; i < 8; ++i) scratch[(r0 + i) * 16 + c] = acc[i];
}

// WMMA product of one 16x16 output tile over K (activations zero-padded to a
// multiple of 16). A weight tile goes through the warp's staging tile when
// WMMA cannot load it in place: the last partial K tile of a K that is not a
// multiple of 16 (zero-filled, so no read passes the panel), and every tile of
// a panel that is not 32-byte aligned (panels are 16 * K * 2 bytes apart, a
// multiple of 32, in 64-byte aligned sections: only a packed buffer that is
// not itself 32-byte aligned misaligns them, whatever K).
template <typename T>
SEQFUSE_DEVICE void wmma_tile(const T* act, int64_t ld, const T* panel, int K, float* scratch, T* stage, int lane) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
  const bool aligned = reinterpret_cast<uintptr_t>(panel) % 32 == 0;
  for (int k0 = 0; k0 < K; k0 += 16) {
    wmma::load_matrix_sync(fa, act + k0, static_cast<unsigned>(ld));
    if (aligned && k0 + 16 <= K) {
      wmma::load_matrix_sync(fb, panel + k0 * 16, 16u);
    } else {
      __syncwarp();  // the previous tile's loads of `stage` are done
      for (int e = lane; e < 256; e += kWarpSize) {
        const int k = k0 + (e >> 4);
        stage[e] = k < K ? panel[k * 16 + (e & 15)] : Storage<T>::store(0.0f);
      }
      __syncwarp();
      wmma::load_matrix_sync(fb, stage, 16u);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(scratch, acc, 16u, wmma::mem_row_major);
}

}  // namespace fused_detail

template <typename T> __global__ void __launch_bounds__(kFusedWarps * kWarpSize) fused_mlp_kernel(FusedMlpArgs a) {
  using S = fused_act_t<T>;
  using A = acc_of<T>;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t ld = fused_row_ld<T>(a.width);
  const int64_t warp_bytes = fused_mlp_smem_bytes<T>(a.width) / kFusedWarps;
  unsigned char* base = dynamic_shared<unsigned char>() + warp * warp_bytes;
  // Two pointers swapped per Linear, not an array indexed at run time (which
  // would live in local memory).
  S* cur = reinterpret_cast<S*>(base);
  S* next = cur + kFusedRowsPerWarp * ld;
  A* scratch = reinterpret_cast<A*>(next + kFusedRowsPerWarp * ld);
  T* stage = reinterpret_cast<T*>(scratch + 256);

  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kFusedWarps + warp) * kFusedRowsPerWarp;
  if (row0 >= a.rows) return;  // a whole warp past the batch: no barrier below involves it
  const int valid_rows = static_cast<int>(a.rows - row0 < kFusedRowsPerWarp ? a.rows - row0 : kFusedRowsPerWarp);

  // Input rows, zero-padded to the full width (and zero rows past the batch).
  const T* x = static_cast<const T*>(a.x);
  for (int64_t e = lane; e < kFusedRowsPerWarp * ld; e += kWarpSize) {
    const int r = static_cast<int>(e / ld), c = static_cast<int>(e % ld);
    const int in = a.stages[0].in;
    cur[e] = (r < valid_rows && c < in) ? Storage<S>::store(Storage<T>::load(x[(row0 + r) * a.ld_x + c]))
                                           : Storage<S>::store(A(0));
  }
  __syncwarp();

  for (int si = 0; si < a.n_stages; ++si) {
    const FusedStage& st = a.stages[si];
    if (st.kind == static_cast<int32_t>(kernels::StageKind::Linear)) {
      const T* weights = reinterpret_cast<const T*>(a.packed + st.weight_offset);
      const int panels = (st.out + 15) / 16;
      for (int p = 0; p < panels; ++p) {
        const T* panel = weights + static_cast<int64_t>(p) * 16 * st.in;
        if constexpr (kIsHalfType<T>) {
          fused_detail::wmma_tile<T>(cur, ld, panel, st.in, scratch, stage, lane);
        } else {
          fused_detail::simt_tile<T, S>(cur, ld, panel, st.in, scratch, lane);
        }
        __syncwarp();
        fused_detail::epilogue_tile<T, S>(scratch, st, a, p * 16, next, ld, lane);
        __syncwarp();
      }
      S* done = cur;
      cur = next;
      next = done;
    } else {
      const bool affine = st.kind == static_cast<int32_t>(kernels::StageKind::ScaleShift);
      const A* scale = affine ? fused_detail::section<T>(a, st.scale_offset) : nullptr;
      const A* shift = affine ? fused_detail::section<T>(a, st.shift_offset) : nullptr;
      const auto act = static_cast<Activation>(st.activation);
      for (int e = lane; e < kFusedRowsPerWarp * st.out; e += kWarpSize) {
        const int r = e / st.out, c = e % st.out;
        A v = Storage<S>::load(cur[r * ld + c]);
        if (affine) v = v * scale[c] + shift[c];
        cur[r * ld + c] = Storage<S>::store(activate<A>(v, act, A(st.alpha)));
      }
      __syncwarp();
    }
  }

  T* y = static_cast<T*>(a.y);
  const int n_out = a.stages[a.n_stages - 1].out;
  for (int e = lane; e < valid_rows * n_out; e += kWarpSize) {
    const int r = e / n_out, c = e % n_out;
    y[(row0 + r) * a.ld_y + c] = Storage<T>::store(Storage<S>::load(cur[r * ld + c]));
  }
}

}  // namespace seqfuse::cuda
