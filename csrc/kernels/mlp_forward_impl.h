// The fused MLP forward, written once and compiled per ISA.
//
// A caller hands over a tile of rows; the tile is carried through every stage
// with its activations in two ping-pong buffers that stay in L1/L2, so no
// intermediate ever goes back to memory. A Linear stage is a register-blocked
// GEMM over weights packed into 16-column panels ([panel][k][16]); bias and a
// folded BatchNorm are one multiply-add in the accumulator registers, and the
// cheap activations (RegisterActivation) are applied there too. Other
// activations run over the fresh, cache-hot rows.
//
// Included by mlp_forward_<isa>.cpp inside `namespace seqfuse::kernels::<isa>`
// after that file set its target pragma and defined:
//   SEQFUSE_VECTOR_BYTES   width of one hardware vector register
//   SEQFUSE_ACC_REGISTERS  how many of them the accumulators may use
// Everything here must be header-only templates or inline: it gets a separate
// copy per ISA namespace, which is what keeps the variants apart at link time.

#include "kernel_impl.h"

// A bfloat16 run's Linear multiplies bfloat16 by bfloat16, as eager's does:
// the tile's rows are rounded to bfloat16 into `rounded` (rows x K rounded up
// to even) first; with the bfloat16 dot product its bfloat16 panels are
// paired on load (Operands::RowPairs), elsewhere widened.
template <typename A, typename TI, typename TW>
void run_linear_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows, A* out,
                      int64_t ld_out, bf16* rounded) {
  constexpr int MR = rows_per_tile<A>();
  const int64_t K = st.in_features;
  const int64_t n_panels = panel_count(st.out_features);
  const TW* weight = reinterpret_cast<const TW*>(packed + st.weight_offset);
  const A* scale = reinterpret_cast<const A*>(packed + st.scale_offset);
  const A* shift = reinterpret_cast<const A*>(packed + st.shift_offset);
  const RegisterActivation<A> act(st.activation, st.alpha);
  // Row blocks outer, panels inner: a row block's inputs stay in L1 while the
  // weights stream from L2, which the packed panel layout makes sequential.
  if constexpr (std::is_same_v<TW, bf16>) {
    const int64_t Kp = round_up(K, 2);
    round_rows_to_bf16(in, ld_in, rows, K, Kp, rounded);
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const int mr = static_cast<int>(rows - r0 < MR ? rows - r0 : MR);
#if SEQFUSE_DPBF16
      gemm_rows<MR, Operands::RowPairs>(mr, act, rounded + r0 * Kp, Kp, weight, K, n_panels * kPanelWidth, scale,
                                        shift, out + r0 * ld_out, ld_out);
#else
      gemm_rows<MR>(mr, act, rounded + r0 * Kp, Kp, weight, K, n_panels * kPanelWidth, scale, shift,
                    out + r0 * ld_out, ld_out);
#endif
    }
  } else {
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const int mr = static_cast<int>(rows - r0 < MR ? rows - r0 : MR);
      gemm_rows<MR>(mr, act, in + r0 * ld_in, ld_in, weight, K, n_panels * kPanelWidth, scale, shift,
                    out + r0 * ld_out, ld_out);
    }
  }
  if (!act.on)
    for (int64_t r = 0; r < rows; ++r) activate_row(out + r * ld_out, st.out_features, st.activation, st.alpha);
}

// out = act(in * scale + shift) per channel (Linear epilogue or ScaleShift), or
// act(in) (Pointwise), computed in A and stored as TO. In place is allowed.
template <typename A, typename TI, typename TO>
void run_elementwise_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows,
                           TO* out, int64_t ld_out) {
  const bool affine = st.kind != StageKind::Pointwise;
  const A* scale = affine ? reinterpret_cast<const A*>(packed + st.scale_offset) : nullptr;
  const A* shift = affine ? reinterpret_cast<const A*>(packed + st.shift_offset) : nullptr;
  elementwise_rows<A, TI, TO>(st.out_features, scale, shift, st.activation, st.alpha, in, ld_in, rows, out, ld_out);
}

template <typename A, typename TI, typename TW>
void run_stage(const StageDesc& st, const uint8_t* packed, const TI* in, int64_t ld_in, int64_t rows, A* out,
               int64_t ld_out, bf16* rounded) {
  if (st.kind == StageKind::Linear)
    run_linear_stage<A, TI, TW>(st, packed, in, ld_in, rows, out, ld_out, rounded);
  else
    run_elementwise_stage<A, TI, A>(st, packed, in, ld_in, rows, out, ld_out);
}

// Runs `rows` rows (at most desc's tile size) through every stage.
// workspace: mlp_workspace_elems(desc, rows) accumulate-type elements (two
// activation buffers, and a bfloat16 run's rounded rows after them).
template <typename T>
void mlp_forward_tile(const MlpDesc& desc, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                      int64_t rows, acc_t<T>* workspace) {
  using A = acc_t<T>;
  const int64_t ld = desc.max_width;
  A* buffers[2] = {workspace, workspace + rows * ld};
  bf16* rounded = reinterpret_cast<bf16*>(workspace + 2 * rows * ld);
  const size_t n_stages = desc.stages.size();
  for (size_t i = 0; i < n_stages; ++i) {
    A* out = buffers[i % 2];
    if (i == 0)
      run_stage<A, T, T>(desc.stages[i], packed, x, ld_x, rows, out, ld, rounded);
    else
      run_stage<A, A, T>(desc.stages[i], packed, buffers[(i - 1) % 2], ld, rows, out, ld, rounded);
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
