// The per-stage device kernels of the layer-by-layer paths: the fused epilogue
// of a GEMM or convolution (y = act(x * scale[c] + shift[c]) over rows of C
// channels, in place or not), and the pools of a conv run over NHWC
// activations, each followed by its activation. Arithmetic in the accumulate
// type, one rounding to the storage type per stage (as eager rounds each op).
//
// Every kernel walks its outputs with a grid-stride loop, so any grid size is
// correct; the adapters size grids for occupancy.
#pragma once

#include "../conv_spec.h"
#include "activation.cuh"
#include "device.cuh"

namespace seqfuse::cuda {

template <typename T> struct ChannelEpilogueArgs {
  const T* in;
  int64_t ld_in;  // elements between rows
  T* out;
  int64_t ld_out;
  int64_t rows, channels;
  const acc_of<T>* scale;  // nullptr: no affine part
  const acc_of<T>* shift;
  int32_t activation;
  acc_of<T> alpha;
};

template <typename T> __global__ void channel_epilogue_kernel(ChannelEpilogueArgs<T> a) {
  using A = acc_of<T>;
  const int64_t total = a.rows * a.channels;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const auto act = static_cast<Activation>(a.activation);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / a.channels, c = i % a.channels;
    A v = Storage<T>::load(a.in[r * a.ld_in + c]);
    if (a.scale) v = v * a.scale[c] + a.shift[c];
    a.out[r * a.ld_out + c] = Storage<T>::store(activate<A>(v, act, a.alpha));
  }
}

// A MaxPool or AvgPool window stage over NHWC images, as ATen pools (NaN wins
// a max; the average's divisor per count_include_pad / divisor_override, the
// window clipped to the padded input), then the stage's activation.
struct PoolGeometry {
  int64_t n, in_h, in_w, out_h, out_w, channels;
  int32_t kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right;
  int32_t dilation_h, dilation_w;
  int64_t divisor;  // divisor_override, 0: none
  bool count_include_pad;
  int32_t activation;
  double alpha;  // in double so that the float64 kernel applies the slope unrounded (as eager does)
};

template <typename T, bool kMax> __global__ void pool_kernel(const T* in, T* out, PoolGeometry g) {
  using A = acc_of<T>;
  const int64_t total = g.n * g.out_h * g.out_w * g.channels;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t c = i % g.channels, pix = i / g.channels;
    const int64_t ox = pix % g.out_w, oy = (pix / g.out_w) % g.out_h, n = pix / (g.out_w * g.out_h);
    const int64_t y0 = oy * g.stride_h - g.pad_top, x0 = ox * g.stride_w - g.pad_left;
    const T* image = in + n * g.in_h * g.in_w * g.channels + c;
    A acc = kMax ? A(-INFINITY) : A(0);
    for (int kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t iy = y0 + int64_t(kh) * g.dilation_h;
      if (iy < 0 || iy >= g.in_h) continue;
      for (int kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t ix = x0 + int64_t(kw) * g.dilation_w;
        if (ix < 0 || ix >= g.in_w) continue;
        const A x = Storage<T>::load(image[(iy * g.in_w + ix) * g.channels]);
        if constexpr (kMax)
          acc = (x > acc || x != x) ? x : acc;
        else
          acc += x;
      }
    }
    if constexpr (!kMax) {
      const int64_t y_end = y0 + g.kernel_h < g.in_h + g.pad_bottom ? y0 + g.kernel_h : g.in_h + g.pad_bottom;
      const int64_t x_end = x0 + g.kernel_w < g.in_w + g.pad_right ? x0 + g.kernel_w : g.in_w + g.pad_right;
      const int64_t padded = (y_end - y0) * (x_end - x0);
      const int64_t vy = (y_end < g.in_h ? y_end : g.in_h) - (y0 > 0 ? y0 : 0);
      const int64_t vx = (x_end < g.in_w ? x_end : g.in_w) - (x0 > 0 ? x0 : 0);
      const int64_t valid = (vy > 0 ? vy : 0) * (vx > 0 ? vx : 0);
      const int64_t divisor = g.divisor ? g.divisor : g.count_include_pad ? padded : valid;
      acc = valid > 0 ? acc / A(divisor) : A(0);
    }
    out[i] = Storage<T>::store(activate<A>(acc, static_cast<Activation>(g.activation), A(g.alpha)));
  }
}

// AdaptiveAvgPool2d(1) over NHWC images: one thread per (image, channel),
// adjacent threads on adjacent channels (coalesced), summing in the accumulate type.
template <typename T>
__global__ void global_avg_pool_kernel(const T* in, T* out, int64_t n, int64_t hw, int64_t channels,
                                       int32_t activation, double alpha) {
  using A = acc_of<T>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * channels; i += step) {
    const int64_t img = i / channels, c = i % channels;
    const T* src = in + img * hw * channels + c;
    A acc = A(0);
    for (int64_t p = 0; p < hw; ++p) acc += Storage<T>::load(src[p * channels]);
    out[i] = Storage<T>::store(activate<A>(acc / A(hw), static_cast<Activation>(activation), A(alpha)));
  }
}

}  // namespace seqfuse::cuda
