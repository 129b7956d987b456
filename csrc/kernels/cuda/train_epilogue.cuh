// Device kernels of the training path's per-channel work (the CUDA epilogue
// backend of train/train_run.h; the math of kernels/train_epilogue.h): batch
// moments and the statistics they give, the forward epilogue pass, the
// backward reduce pass, BatchNorm's backward apply pass, and the per-channel
// coefficient kernels between them. Torch-free: raw pointers and a
// kernels::ChannelLayout ([outer][C][inner]: (N, C) rows and channels_last
// maps have inner == 1, NCHW maps outer == N, inner == H*W).
//
// Arithmetic in the data type (float or double; the training ops run no half
// types), every sum in double. y = (z - center) * scale + shift is one fma
// in the forward and in the backward's recomputation alike (one helper), so
// the recomputed y is the forward's bit for bit.
//
// Reductions: each thread sums its elements of one channel in double, the
// block adds its threads' sums in a fixed tree (shared memory), and one
// thread per channel atomically adds the block's sum into a zeroed [n][C]
// double buffer (sm_60+ double atomicAdd). The order in which the blocks'
// atomic adds land varies from run to run, so a channel's sum may differ in
// its last bits between runs (accepted: the CPU backend is the deterministic
// one).
//
// Only the CUDA features the SIMT emulation (csrc/kernels/cuda/simt) provides:
// __global__, static __shared__ arrays, the thread indices, __syncthreads,
// atomicAdd(double*); no run-time-indexed local arrays (no stack frame).
#pragma once

#include <cstdint>

#include "../mlp_spec.h"
#include "../train_epilogue.h"
#include "activation.cuh"
#include "device.cuh"

namespace seqfuse::cuda::train {

using kernels::ActSource;
using kernels::ChannelLayout;

// The most threads a block of the pass kernels may have (their shared
// reduction arrays); blocks are a power of two threads.
constexpr int kMaxThreads = 256;

namespace math {
SEQFUSE_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
SEQFUSE_HD double fma_(double a, double b, double c) { return fma(a, b, c); }
SEQFUSE_HD double sqrt_(double x) { return sqrt(x); }
}  // namespace math

// How a pass's threads cover the activation. The channel is fixed per thread
// (its per-channel values load once):
//   inner == 1: a block covers `tile` adjacent channels (blockIdx.x picks the
//               group; tile <= 32, adjacent threads on adjacent elements) of
//               blockDim.x / tile rows at a time;
//   inner > 1:  a block covers one channel (blockIdx.x), per outer index its
//               inner plane in strides of `tile` threads, blockDim.x / tile
//               outer indices at a time.
// blockIdx.y strides over the outer dimension. `tile` is a power of two that
// divides blockDim.x.
struct PassShape {
  ChannelLayout l;
  int32_t tile;
};

SEQFUSE_DEVICE int64_t thread_channel(const PassShape& p) {
  return p.l.inner == 1 ? int64_t(blockIdx.x) * p.tile + int64_t(threadIdx.x & unsigned(p.tile - 1))
                        : int64_t(blockIdx.x);
}

// Calls body(i) for each element index i of the thread (all of one channel,
// thread_channel's), none when that channel is past the last.
template <typename Body> SEQFUSE_DEVICE void for_each_element(const PassShape& p, Body&& body) {
  const ChannelLayout& l = p.l;
  const int64_t tc = threadIdx.x & unsigned(p.tile - 1), tr = threadIdx.x / unsigned(p.tile);
  const int64_t rows = blockDim.x / unsigned(p.tile);
  const int64_t o_step = rows * gridDim.y;
  const int64_t o_first = int64_t(blockIdx.y) * rows + tr;
  if (l.inner == 1) {
    const int64_t c = int64_t(blockIdx.x) * p.tile + tc;
    if (c >= l.channels) return;
    for (int64_t o = o_first; o < l.outer; o += o_step) body(o * l.channels + c);
  } else {
    const int64_t c = blockIdx.x;
    for (int64_t o = o_first; o < l.outer; o += o_step) {
      const int64_t base = (o * l.channels + c) * l.inner;
      for (int64_t k = tc; k < l.inner; k += p.tile) body(base + k);
    }
  }
}

// Adds the kSums partial sums of each thread over the block's threads that
// share its channel (a fixed tree), then atomically into sum0[c] (and
// sum1[c]). Every thread of the block must call it.
template <int kSums>
SEQFUSE_DEVICE void reduce_to_channels(const PassShape& p, double s0, double s1, double* sum0, double* sum1) {
  static_assert(kSums == 1 || kSums == 2, "one or two sums");
  __shared__ double red[2 * kMaxThreads];
  const unsigned t = threadIdx.x;
  red[t] = s0;
  if constexpr (kSums == 2) red[kMaxThreads + t] = s1;
  __syncthreads();
  // With inner == 1 threads t and t + s (s a multiple of tile) share a
  // channel; with inner > 1 every thread of the block does.
  const unsigned stop = p.l.inner == 1 ? unsigned(p.tile) : 1u;
  for (unsigned s = blockDim.x / 2; s >= stop; s >>= 1) {
    if (t < s) {
      red[t] += red[t + s];
      if constexpr (kSums == 2) red[kMaxThreads + t] += red[kMaxThreads + t + s];
    }
    __syncthreads();
  }
  if (t < stop) {
    const int64_t c = thread_channel(p);  // t < tile: thread t's channel
    if (c < p.l.channels) {
      atomicAdd(sum0 + c, red[t]);
      if constexpr (kSums == 2) atomicAdd(sum1 + c, red[kMaxThreads + t]);
    }
  }
}

// y = (z - center) * scale + shift of one channel, as the CPU core computes
// it (kernels::epilogue_forward): a missing center 0, scale 1, shift 0, and
// nothing added where nothing is given.
template <typename T> struct ChannelAffine {
  T center, scale, shift;
  bool has_center, has_scale, has_shift;

  SEQFUSE_DEVICE static ChannelAffine load(const T* center, const T* scale, const T* shift, int64_t c, bool live) {
    ChannelAffine a;
    a.has_center = center != nullptr;
    a.has_scale = scale != nullptr;
    a.has_shift = shift != nullptr;
    a.center = live && center ? center[c] : T(0);
    a.scale = live && scale ? scale[c] : T(1);
    a.shift = live && shift ? shift[c] : T(0);
    return a;
  }
  SEQFUSE_DEVICE T operator()(T z) const {
    if (has_center) return math::fma_(z - center, scale, shift);
    if (has_scale) return math::fma_(z, scale, shift);
    if (has_shift) return z + shift;
    return z;
  }
};

// ---- forward ----------------------------------------------------------------------

// sums[c] += sum (z - z_c0), sums[C + c] += sum (z - z_c0)^2, z_c0 being the
// channel's first value (centered moments: no cancellation whatever the mean).
template <typename T> __global__ void channel_moments_kernel(const T* z, PassShape p, double* sums) {
  const int64_t c = thread_channel(p);
  const double ref = c < p.l.channels ? double(z[c * p.l.inner]) : 0.0;
  double s0 = 0.0, s1 = 0.0;
  for_each_element(p, [&](int64_t i) {
    const double d = double(z[i]) - ref;
    s0 += d;
    s1 += d * d;
  });
  reduce_to_channels<2>(p, s0, s1, sums, sums + p.l.channels);
}

// One thread per channel (grid-stride): the batch statistics from the
// moments, aux [4][C] = {center (the batch mean), invstd, batch mean + bias,
// unbiased variance}; the variance clamped at 0 as std::max(0.0, v) does
// (NaN gives 0).
template <typename T>
__global__ void batch_statistics_kernel(const T* z, ChannelLayout l, const double* sums, const T* bias, double eps,
                                        T* aux) {
  const int64_t C = l.channels;
  const double count = double(l.outer * l.inner);
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    const double d_mean = sums[c] / count;
    const double v = sums[C + c] / count - d_mean * d_mean;
    const double var = 0.0 < v ? v : 0.0;
    const double mean = double(z[c * l.inner]) + d_mean;
    aux[c] = T(mean);
    aux[C + c] = T(1.0 / math::sqrt_(var + eps));
    aux[2 * C + c] = T(mean + (bias ? double(bias[c]) : 0.0));
    aux[3 * C + c] = T(var * count / (count - 1));
  }
}

// aux [2][C] = {running_mean - bias, 1 / sqrt(running_var + eps)}.
template <typename T>
__global__ void running_statistics_kernel(const T* running_mean, const T* running_var, const T* bias, int64_t C,
                                          double eps, T* aux) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    aux[c] = running_mean[c] - (bias ? bias[c] : T(0));
    aux[C + c] = T(1.0 / math::sqrt_(double(running_var[c]) + eps));
  }
}

// scale = gamma * invstd, shift = beta (gamma 1, beta 0 when null).
template <typename T>
__global__ void bn_scale_shift_kernel(const T* gamma, const T* beta, const T* invstd, int64_t C, T* scale, T* shift) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    scale[c] = gamma ? gamma[c] * invstd[c] : invstd[c];
    shift[c] = beta ? beta[c] : T(0);
  }
}

template <typename T> struct EpilogueForwardArgs {
  const T* z;
  const T *center, *scale, *shift;  // null where absent
  T* pre;                           // y, when given (may be z)
  T* out;                           // act(y) (may be z)
  PassShape p;
  int32_t activation;
  T alpha;
};

template <typename T> __global__ void epilogue_forward_kernel(EpilogueForwardArgs<T> a) {
  const int64_t c = thread_channel(a.p);
  const ChannelAffine<T> f = ChannelAffine<T>::load(a.center, a.scale, a.shift, c, c < a.p.l.channels);
  const auto act = static_cast<Activation>(a.activation);
  for_each_element(a.p, [&](int64_t i) {
    const T y = f(a.z[i]);
    if (a.pre) a.pre[i] = y;
    a.out[i] = activate<T>(y, act, a.alpha);
  });
}

// ---- backward ----------------------------------------------------------------------

template <typename T> struct BackwardReduceArgs {
  const T* g;
  const T* src;  // the output (ActSource::Output) or y (PreActivation)
  const T* z;
  const T *scale, *shift, *center;  // ActSource::Recompute's y; center: also the dy * (z - center) sum
  T* dy;                            // may be g
  double* sums;                     // [2][C] (kSums > 0)
  PassShape p;
  int32_t activation;
  int32_t source;  // ActSource
  T alpha;
};

// dy = g * act'(v); kSums 1: sums[c] += dy, 2: also sums[C + c] += dy * (z - center).
template <typename T, int kSums> __global__ void backward_reduce_kernel(BackwardReduceArgs<T> a) {
  const int64_t c = thread_channel(a.p);
  const bool live = c < a.p.l.channels;
  const ChannelAffine<T> f = ChannelAffine<T>::load(a.center, a.scale, a.shift, c, live);
  const double m = live && a.center ? double(a.center[c]) : 0.0;
  const auto act = static_cast<Activation>(a.activation);
  const bool recompute = static_cast<ActSource>(a.source) == ActSource::Recompute;
  const bool write = act != Activation::None || a.dy != a.g;
  double s0 = 0.0, s1 = 0.0;
  for_each_element(a.p, [&](int64_t i) {
    T d = a.g[i];
    if (act != Activation::None) d = activation_grad<T>(d, recompute ? f(a.z[i]) : a.src[i], act, a.alpha);
    if (write) a.dy[i] = d;
    if constexpr (kSums >= 1) s0 += double(d);
    if constexpr (kSums == 2) s1 += double(d) * (double(a.z[i]) - m);
  });
  if constexpr (kSums > 0) reduce_to_channels<kSums>(a.p, s0, s1, a.sums, a.sums + a.p.l.channels);
}

// k_dy = invstd * gamma; count > 0 (batch statistics): k_mean = sums[c] /
// count, k_xc = sums[C + c] * invstd^2 / count.
template <typename T>
__global__ void bn_backward_coefficients_kernel(const double* sums, int64_t C, const T* invstd, const T* gamma,
                                                double count, T* k_dy, T* k_mean, T* k_xc) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    k_dy[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
    if (count > 0) {
      const double inv = double(invstd[c]);
      k_mean[c] = T(sums[c] / count);
      k_xc[c] = T(sums[C + c] * inv * inv / count);
    }
  }
}

template <typename T> struct BatchnormApplyArgs {
  const T* dy;
  const T* z;
  const T* center;
  const T *k_mean, *k_xc;  // null: running statistics, dz = dy * k_dy
  const T* k_dy;
  T* dz;         // may be dy
  double* sums;  // [1][C] (kReduce)
  PassShape p;
};

// dz = (dy - k_mean - (z - center) * k_xc) * k_dy; kReduce: sums[c] += dz.
template <typename T, bool kReduce> __global__ void batchnorm_backward_apply_kernel(BatchnormApplyArgs<T> a) {
  const int64_t c = thread_channel(a.p);
  const bool live = c < a.p.l.channels;
  const bool batch = a.k_mean != nullptr;
  const T km = live && batch ? a.k_mean[c] : T(0);
  const T kxc = live && batch ? a.k_xc[c] : T(0);
  const T ce = live && batch ? a.center[c] : T(0);
  const T kdy = live ? a.k_dy[c] : T(0);
  double s0 = 0.0;
  for_each_element(a.p, [&](int64_t i) {
    const T out = batch ? (a.dy[i] - km - (a.z[i] - ce) * kxc) * kdy : a.dy[i] * kdy;
    a.dz[i] = out;
    if constexpr (kReduce) s0 += double(out);
  });
  if constexpr (kReduce) reduce_to_channels<1>(a.p, s0, 0.0, a.sums, nullptr);
}

// out[c] = sums[c] (times factor[c] when given), rounded to T.
template <typename T> __global__ void grad_from_sums_kernel(const double* sums, const T* factor, int64_t C, T* out) {
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step)
    out[c] = T(factor ? sums[c] * double(factor[c]) : sums[c]);
}

// ---- running statistics -------------------------------------------------------------

// Eager's running-statistics update, in double: x = f * batch + (1 - f) * x
// for the running mean and variance, f = momentum, or 1 / num_batches_tracked
// (already incremented) for momentum < 0 (a cumulative average).
template <typename T>
__global__ void running_stats_update_kernel(T* running_mean, T* running_var, const double* batch_mean,
                                            const double* batch_var, const int64_t* tracked, double momentum,
                                            int64_t C) {
  const double f = momentum < 0 ? 1.0 / double(*tracked) : momentum;
  const int64_t step = int64_t(blockDim.x) * gridDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += step) {
    running_mean[c] = T(f * batch_mean[c] + (1 - f) * double(running_mean[c]));
    running_var[c] = T(f * batch_var[c] + (1 - f) * double(running_var[c]));
  }
}

// ---- launch shapes (host) --------------------------------------------------------------

// The pass shape and grid of a pass kernel over `l` with `threads` (a power
// of two, <= kMaxThreads) per block and about `max_blocks` blocks in all.
struct PassLaunch {
  PassShape shape;
  unsigned grid_x, grid_y;
};

inline int32_t pow2_at_least(int64_t n, int32_t cap) {
  int32_t p = 1;
  while (p < cap && p < n) p *= 2;
  return p;
}

inline PassLaunch pass_launch(const ChannelLayout& l, int32_t threads, int64_t max_blocks) {
  PassLaunch r{};
  r.shape.l = l;
  int64_t gx;
  if (l.inner == 1) {
    r.shape.tile = pow2_at_least(l.channels, threads < 32 ? threads : 32);
    gx = (l.channels + r.shape.tile - 1) / r.shape.tile;
  } else {
    r.shape.tile = pow2_at_least(l.inner, threads);
    gx = l.channels;
  }
  const int64_t rows = threads / r.shape.tile;
  int64_t gy = (l.outer + rows - 1) / rows;
  const int64_t budget = max_blocks / (gx > 0 ? gx : 1);
  if (gy > budget) gy = budget;
  if (gy > 65535) gy = 65535;
  if (gy < 1) gy = 1;
  r.grid_x = static_cast<unsigned>(gx > 0 ? gx : 1);
  r.grid_y = static_cast<unsigned>(gy);
  return r;
}

}  // namespace seqfuse::cuda::train
