// Torch-free entry points of the fused MLP kernels: packing and the forward
// over a range of rows (the ISA selection: isa.h). Adapters (csrc/adapters/cpu) and the C++ unit tests
// (tests/cpp) call only what is declared here.
#pragma once

#include <cstdint>
#include <string>

#include "bf16.h"
#include "isa.h"
#include "mlp_spec.h"

namespace seqfuse::kernels {

// ---- packing (mlp_pack.cpp) ------------------------------------------------

// Weight [out][in] row-major -> [panel][in][kPanelWidth], zero-padded columns.
template <typename T> void pack_linear_weight(const T* weight, int64_t out_features, int64_t in_features, T* packed);

// Per-channel epilogue of a stage, y = acc * scale + shift, from the optional
// Linear bias and the optional eval BatchNorm (gamma/beta may be null when not
// affine). Computed in double, stored in the accumulate type, zero padded to a
// whole panel.
template <typename T>
void fold_scale_shift(int64_t channels, const T* bias, const T* bn_weight, const T* bn_bias, const T* bn_mean,
                      const T* bn_var, double eps, acc_t<T>* scale, acc_t<T>* shift);

// ---- forward (mlp_forward.cpp) -----------------------------------------------

// Rows handed to one call of the per-tile kernel: a multiple of the micro-tile
// height, sized so the two activation buffers stay in the per-core cache.
int64_t mlp_tile_rows(const MlpDesc& desc);

// y[r] = mlp(x[r]) for r in [0, rows). x rows are ld_x elements apart (the
// in_features values of a row contiguous), y rows ld_y apart. Uses a
// thread-local workspace; safe to call concurrently from several threads.
template <typename T>
void mlp_forward_rows(const MlpDesc& desc, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                      int64_t rows);

// One stage's epilogue alone: out = act(in * scale + shift) for a Linear or
// ScaleShift stage (act(in) for Pointwise), in the storage type, rows ld apart.
// For engines that compute a Linear's product elsewhere (a vendor GEMM).
// In place (in == out, same ld) is allowed.
template <typename T>
void mlp_stage_epilogue(const MlpDesc& desc, size_t stage, const uint8_t* packed, const T* in, int64_t ld_in, T* out,
                        int64_t ld_out, int64_t rows);

}  // namespace seqfuse::kernels
