// Torch-free entry points of the fused convolution kernels: packing, one
// stage over a range of output pixels, a whole run over a range of images,
// and the layout conversions at the run's boundaries. Adapters (csrc/adapters/cpu)
// and the C++ unit tests (tests/cpp) call only what is declared here.
#pragma once

#include <cstdint>

#include "bf16.h"
#include "conv_spec.h"
#include "isa.h"
#include "mlp_forward.h"

namespace seqfuse::kernels {

// ---- packing (conv_pack.cpp) -----------------------------------------------

// Packs a Conv/Linear stage's weight ([out][in/groups][kh][kw], or [out][in])
// into the stage's packed layout (see conv_spec.h), widened to the accumulate
// type, and folds its bias / eval BatchNorm into scale/shift. `packed` is the
// zero-filled buffer; the stage's sections are written.
template <typename T>
void pack_conv_stage(const ConvStage& st, const T* weight, const T* bias, const T* bn_weight, const T* bn_bias,
                     const T* bn_mean, const T* bn_var, uint8_t* packed);

// ---- forward (conv_forward.cpp) ----------------------------------------------

// Stage i over output pixels [p0, p1) of a batch (pixel = image * out_h *
// out_w + y * out_w + x; one pixel per image after GlobalAvgPool and Flatten)
// and, for a stage gemm_splits_channels accepts, only its output channels
// [16 * panel0, 16 * panel1) (panel1 < 0: all of them; other stages ignore the
// range). in and out are compact NHWC in the accumulate type A (float or
// double) and must not overlap. Thread-safe; uses a thread-local scratch.
template <typename A>
void conv_stage_forward(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const A* in,
                        A* out, int64_t p0, int64_t p1, int64_t panel0 = 0, int64_t panel1 = -1);

// Whether stage i, over `images` images split into `parts` tasks, is better
// split by output channels than by pixels: an ungrouped Conv/Linear whose
// weights are larger than its GEMM rows' values (out_channels > pixels, or
// tiles for a Winograd stage), so that each task streams only its share of
// the weights (late 7x7 layers, batch-1 Linear heads). Its channel panels
// then go to the tasks.
bool gemm_splits_channels(const ConvDesc& d, const ConvGeometry& g, size_t i, int64_t images, int64_t parts);

// Applies a Conv stage's epilogue (folded bias/BatchNorm, activation) to
// pixels [p0, p1) of a convolution computed elsewhere, compact NHWC: TI -> TO,
// (float, float), (double, double), (bf16, bf16) or (bf16, float); in == out
// is allowed when TI == TO.
template <typename TI, typename TO>
void conv_stage_epilogue(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const TI* in,
                         TO* out, int64_t p0, int64_t p1);

// Stages [0, stop) for `n_images` images, one image at a time, the activations
// carried between stages in per-thread buffers that stay in the core's cache.
// in: stage 0's input images, (N, C, H, W) element strides `in_strides` in any
// memory format; out: stage stop-1's output images, strides `out_strides`
// (after a Flatten, (N, F) as (N, F, 1, 1)). Layout conversion happens per
// image while it is cache-hot; compact NHWC in A is read and written in place.
// stage_ns (optional, stop + 1 slots): nanoseconds spent in each stage, and
// in the layout conversions (slot stop), added to.
template <typename TI, typename A, typename TO>
void conv_forward_images(const ConvDesc& d, const ConvGeometry& g, const uint8_t* packed, const TI* in,
                         const int64_t* in_strides, TO* out, const int64_t* out_strides, int64_t n_images,
                         size_t stop, int64_t* stage_ns = nullptr);

// ---- layout conversions (conv_forward.cpp) -----------------------------------

// Images [n0, n1) of a (N, C, H, W) tensor with element strides `strides`
// (any memory format) -> compact NHWC in A.
template <typename T, typename A>
void load_nhwc(const T* x, const int64_t* strides, int64_t C, int64_t H, int64_t W, int64_t n0, int64_t n1, A* out);

// Images [n0, n1) of compact NHWC values in A -> a (N, C, H, W) tensor with
// element strides `strides`, rounded to T.
template <typename A, typename T>
void store_nhwc(const A* y, int64_t C, int64_t H, int64_t W, const int64_t* strides, int64_t n0, int64_t n1, T* out);

}  // namespace seqfuse::kernels
