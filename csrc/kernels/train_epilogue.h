// Torch-free kernels of the training path: the per-channel work around each
// product of a fused run (the Linear / Conv2d products themselves run in a
// vendor GEMM / convolution, chosen by the adapter).
//
// Forward:  batch moments of the product output z, then one pass
//           y = z * scale + shift, a = act(y)   (bias and BatchNorm folded into
//           per-channel scale/shift, batch or running statistics alike).
// Backward: one pass  dy = g * act'(.)  that also reduces the per-channel sums
//           the bias and BatchNorm gradients need, then (BatchNorm only) one
//           pass  dz = (dy - k_mean - (z - center) * k_xc) * k_dy  that also
//           reduces sum(dz) for the product's bias.
//
// Every function takes a range [o_begin, o_end) of the outer dimension so the
// adapter can split a call over threads; reductions add into caller-owned
// per-channel double arrays (one set per thread, summed by the caller).
#pragma once

#include <cstdint>

#include "mlp_spec.h"

namespace seqfuse::kernels {

// A dense activation seen as [outer][channels][inner]: (N, C) rows and
// channels_last maps have inner == 1, NCHW maps have outer == N, inner == H*W.
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  int64_t numel() const { return outer * channels * inner; }
};

// Which value the backward reads an activation's derivative from
// (derivative_from_output, derivative_reads_output): activation_table.h.

// sum[c] += sum (z - ref[c]), sumsq[c] += sum (z - ref[c])^2: shifted moments,
// exact enough in double for float and double data whatever the mean.
template <typename T>
void channel_moments(const ChannelLayout& l, const T* z, const T* ref, double* sum, double* sumsq, int64_t o_begin,
                     int64_t o_end);

// y = (z - center[c]) * scale[c] + shift[c] (a missing center is 0, a missing
// scale 1, a missing shift 0), a = act(y). A BatchNorm passes its mean as the
// center: subtracting it first keeps the digits a folded z * scale + shift
// loses where a channel's mean is large against its spread (eager's order).
// Writes y to `pre` when given and a to `out`; either may be z itself.
template <typename T>
void epilogue_forward(const ChannelLayout& l, const T* z, const T* center, const T* scale, const T* shift,
                      Activation act, double alpha, T* pre, T* out, int64_t o_begin, int64_t o_end);

// Where the backward finds the activation's argument: the output for the
// derivative_from_output activations, the pre-activation y for the others.
enum class ActSource {
  Output,         // `src` is the stage output a
  PreActivation,  // `src` is y
  Recompute,      // y = z * scale + shift, recomputed as the forward computed it
};

// dy = g * act'(.) written to `dy` (may be g itself); sum_dy[c] += dy and,
// when `center` is given, sum_dy_xc[c] += dy * (z - center[c]). Null sums are
// skipped. ActSource::Recompute recomputes y as epilogue_forward did, with
// `center` (when given) subtracted first.
template <typename T>
void epilogue_backward_reduce(const ChannelLayout& l, const T* g, Activation act, double alpha, ActSource source,
                              const T* src, const T* z, const T* scale, const T* shift, const T* center, T* dy,
                              double* sum_dy, double* sum_dy_xc, int64_t o_begin, int64_t o_end);

// BatchNorm's input gradient: dz = (dy - k_mean[c] - (z - center[c]) * k_xc[c]) * k_dy[c]
// (training; eval passes null k_mean / k_xc: dz = dy * k_dy[c]). dz may be dy.
// sum_dz[c] += dz when given (the gradient of a bias before the BatchNorm).
template <typename T>
void batchnorm_backward_apply(const ChannelLayout& l, const T* dy, const T* z, const T* center, const T* k_mean,
                              const T* k_xc, const T* k_dy, T* dz, double* sum_dz, int64_t o_begin, int64_t o_end);

}  // namespace seqfuse::kernels
