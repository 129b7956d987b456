// The device epilogue backend of the training walk (train/train_run.h, whose
// comment has the interface): the kernels of kernels/cuda/train_epilogue.cuh,
// launched through a launch policy `L`, per-channel sums in zeroed [n, C]
// double tensors on the run's device. Nothing here reads device memory on
// the host: a whole training call queues on the stream without a sync.
//
// L provides
//   static constexpr int32_t kThreads;   threads per block (a power of two <= 256)
//   static int64_t max_blocks();         about how many blocks fill the device
//   static void run(kernel, dim3 grid, dim3 block, args...);
// adapters/cuda/train_cuda.cu's CudaLaunch launches on the current stream; a policy
// over simt::launch (csrc/kernels/cuda/simt) runs the same kernels, and so the same
// walk, on the CPU with CPU tensors (tests/cpp/train_simt_backend.cpp).
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "kernels/cuda/train_epilogue.cuh"
#include "train/train_run.h"

namespace seqfuse::train {

template <typename L> struct DeviceEpilogue {
  // [n, C] float64 on the device (undefined where a pass reduced nothing).
  using Sums = at::Tensor;

  // Per-channel kernels: one thread per channel.
  static dim3 channel_grid(int64_t channels) {
    const int64_t blocks = (channels + L::kThreads - 1) / L::kThreads;
    return dim3(static_cast<unsigned>(blocks > 0 ? blocks : 1));
  }

  template <typename K, typename... A> static void pass(K kernel, const cuda::train::PassLaunch& s, A&&... args) {
    L::run(kernel, dim3(s.grid_x, s.grid_y), dim3(static_cast<unsigned>(L::kThreads)), std::forward<A>(args)...);
  }

  static cuda::train::PassLaunch shape(const ChannelLayout& l) {
    return cuda::train::pass_launch(l, L::kThreads, L::max_blocks());
  }

  static at::Tensor zeroed_sums(int64_t n, int64_t channels, const at::TensorOptions& opts) {
    return at::zeros({n, channels}, opts.dtype(at::kDouble));
  }

  template <typename T>
  static at::Tensor batch_statistics(const ChannelLayout& l, const T* z, const T* bias, double eps,
                                     const at::TensorOptions& opts) {
    const at::Tensor sums = zeroed_sums(2, l.channels, opts);
    const cuda::train::PassLaunch s = shape(l);
    pass(cuda::train::channel_moments_kernel<T>, s, z, s.shape, sums.data_ptr<double>());
    at::Tensor aux = at::empty({4, l.channels}, opts);
    L::run(cuda::train::batch_statistics_kernel<T>, channel_grid(l.channels), dim3(L::kThreads), z, l,
           sums.const_data_ptr<double>(), bias, eps, aux.data_ptr<T>());
    return aux;
  }

  template <typename T>
  static at::Tensor running_statistics(const T* running_mean, const T* running_var, const T* bias, int64_t channels,
                                       double eps, const at::TensorOptions& opts) {
    at::Tensor aux = at::empty({2, channels}, opts);
    L::run(cuda::train::running_statistics_kernel<T>, channel_grid(channels), dim3(L::kThreads), running_mean,
           running_var, bias, channels, eps, aux.data_ptr<T>());
    return aux;
  }

  template <typename T>
  static std::pair<at::Tensor, at::Tensor> bn_scale_shift(const T* gamma, const T* beta, const T* invstd,
                                                          int64_t channels, const at::TensorOptions& opts) {
    at::Tensor scale = at::empty({channels}, opts), shift = at::empty({channels}, opts);
    L::run(cuda::train::bn_scale_shift_kernel<T>, channel_grid(channels), dim3(L::kThreads), gamma, beta, invstd,
           channels, scale.data_ptr<T>(), shift.data_ptr<T>());
    return {scale, shift};
  }

  template <typename T>
  static void epilogue_forward(const ChannelLayout& l, const T* z, const T* center, const T* scale, const T* shift,
                               Activation act, double alpha, T* pre, T* out) {
    if (l.numel() == 0) return;
    const cuda::train::PassLaunch s = shape(l);
    const cuda::train::EpilogueForwardArgs<T> a{
        z, center, scale, shift, pre, out, s.shape, static_cast<int32_t>(act), static_cast<T>(alpha)};
    pass(cuda::train::epilogue_forward_kernel<T>, s, a);
  }

  template <typename T>
  static Sums backward_reduce(const ChannelLayout& l, const T* g, Activation act, double alpha, ActSource source,
                              const T* src, const T* z, const T* scale, const T* shift, const T* center, T* dy,
                              bool reduce, const at::TensorOptions& opts) {
    const int n_sums = !reduce ? 0 : center ? 2 : 1;
    Sums sums = n_sums ? zeroed_sums(2, l.channels, opts) : Sums();
    if (l.numel() == 0) return sums;
    const cuda::train::PassLaunch s = shape(l);
    const cuda::train::BackwardReduceArgs<T> a{g,
                                               src,
                                               z,
                                               scale,
                                               shift,
                                               center,
                                               dy,
                                               n_sums ? sums.data_ptr<double>() : nullptr,
                                               s.shape,
                                               static_cast<int32_t>(act),
                                               static_cast<int32_t>(source),
                                               static_cast<T>(alpha)};
    if (n_sums == 2)
      pass(cuda::train::backward_reduce_kernel<T, 2>, s, a);
    else if (n_sums == 1)
      pass(cuda::train::backward_reduce_kernel<T, 1>, s, a);
    else
      pass(cuda::train::backward_reduce_kernel<T, 0>, s, a);
    return sums;
  }

  template <typename T>
  static BnGradCoefficients bn_backward_coefficients(const Sums& sums, int64_t channels, const T* invstd,
                                                     const T* gamma, double count, const at::TensorOptions& opts) {
    BnGradCoefficients k;
    k.k_dy = at::empty({channels}, opts);
    if (count > 0) {
      k.k_mean = at::empty({channels}, opts);
      k.k_xc = at::empty({channels}, opts);
    }
    L::run(cuda::train::bn_backward_coefficients_kernel<T>, channel_grid(channels), dim3(L::kThreads),
           count > 0 ? sums.const_data_ptr<double>() : nullptr, channels, invstd, gamma, count, k.k_dy.data_ptr<T>(),
           count > 0 ? k.k_mean.data_ptr<T>() : nullptr, count > 0 ? k.k_xc.data_ptr<T>() : nullptr);
    return k;
  }

  template <typename T>
  static Sums batchnorm_backward_apply(const ChannelLayout& l, const T* dy, const T* z, const T* center,
                                       const T* k_mean, const T* k_xc, const T* k_dy, T* dz, bool reduce,
                                       const at::TensorOptions& opts) {
    Sums sums = reduce ? zeroed_sums(1, l.channels, opts) : Sums();
    if (l.numel() == 0) return sums;
    const cuda::train::PassLaunch s = shape(l);
    const cuda::train::BatchnormApplyArgs<T> a{
        dy, z, center, k_mean, k_xc, k_dy, dz, reduce ? sums.data_ptr<double>() : nullptr, s.shape};
    if (reduce)
      pass(cuda::train::batchnorm_backward_apply_kernel<T, true>, s, a);
    else
      pass(cuda::train::batchnorm_backward_apply_kernel<T, false>, s, a);
    return sums;
  }

  template <typename T>
  static at::Tensor grad_from_sums(const Sums& sums, int row, const T* factor, int64_t channels,
                                   const at::TensorOptions& opts) {
    at::Tensor out = at::empty({channels}, opts);
    L::run(cuda::train::grad_from_sums_kernel<T>, channel_grid(channels), dim3(L::kThreads),
           sums.const_data_ptr<double>() + static_cast<int64_t>(row) * channels, factor, channels,
           out.data_ptr<T>());
    return out;
  }
};

// seqfuse::update_running_stats on the device (checked by
// check_running_stats_update first): num_batches_tracked += 1 (in place, an
// ATen op), then per BatchNorm the update kernel reading the incremented
// count on the device.
template <typename L>
void update_running_stats_device(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum) {
  for (size_t k = 0; k < stats.size(); ++k) {
    const at::Tensor &rm = buffers[3 * k], &rv = buffers[3 * k + 1], &tracked = buffers[3 * k + 2];
    const at::Tensor s = stats[k].to(at::kDouble).contiguous();
    tracked.add_(1);
    const int64_t channels = rm.size(0);
    if (channels == 0) continue;
    const dim3 grid(static_cast<unsigned>((channels + L::kThreads - 1) / L::kThreads));
    AT_DISPATCH_FLOATING_TYPES(rm.scalar_type(), "update_running_stats", [&] {
      L::run(cuda::train::running_stats_update_kernel<scalar_t>, grid, dim3(L::kThreads), rm.data_ptr<scalar_t>(),
             rv.data_ptr<scalar_t>(), s.const_data_ptr<double>() + 2 * channels,
             s.const_data_ptr<double>() + 3 * channels, tracked.const_data_ptr<int64_t>(), momentum[k], channels);
    });
  }
}

}  // namespace seqfuse::train
