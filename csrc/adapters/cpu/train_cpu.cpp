// CPU adapters of the training ops (seqfuse::{mlp,conv}_train_forward,
// seqfuse::{mlp,conv}_backward, seqfuse::update_running_stats). The walk over
// a run's stages and the saved layout are device-generic (train/train_run.h); here
// is its CPU epilogue backend: the torch-free per-channel cores of
// kernels/train_epilogue.h split over at::parallel_for, with per-chunk double
// sums added in chunk order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "train/train_run.h"

namespace seqfuse {
namespace {

using kernels::Activation;
using kernels::ActSource;
using kernels::ChannelLayout;
using train::TrainRun;

// Elements per parallel chunk of an epilogue pass.
constexpr int64_t kChunkElems = int64_t{1} << 15;

// Runs fn(o_begin, o_end, sums) over the outer dimension in chunks, each with
// its own zeroed `n_sums` x C double accumulators, then adds the chunks'
// accumulators in order into `total` (n_sums x C): deterministic for a given
// thread count.
template <typename Fn>
void parallel_over_outer(const ChannelLayout& l, int n_sums, std::vector<double>& total, Fn&& fn) {
  const int64_t per_outer = std::max<int64_t>(1, l.channels * l.inner);
  const int64_t outer_per_chunk = std::max<int64_t>(1, kChunkElems / per_outer);
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>((l.outer + outer_per_chunk - 1) / outer_per_chunk, at::get_num_threads()));
  const size_t width = static_cast<size_t>(n_sums * l.channels);
  total.assign(width, 0.0);
  if (chunks == 1) {
    fn(int64_t{0}, l.outer, total.data());
    return;
  }
  std::vector<double> partial(width * static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      fn(l.outer * k / chunks, l.outer * (k + 1) / chunks, partial.data() + width * static_cast<size_t>(k));
  });
  for (int64_t k = 0; k < chunks; ++k)
    for (size_t j = 0; j < width; ++j) total[j] += partial[width * static_cast<size_t>(k) + j];
}

// The CPU epilogue backend of train/train_run.h (its comment has the interface).
struct CpuEpilogue {
  using Sums = std::vector<double>;

  template <typename T>
  static at::Tensor batch_statistics(const ChannelLayout& l, const T* z, const T* bias, double eps,
                                     const at::TensorOptions& opts) {
    // Moments about each channel's first value: no cancellation whatever the mean.
    std::vector<T> ref(static_cast<size_t>(l.channels));
    for (int64_t c = 0; c < l.channels; ++c) ref[static_cast<size_t>(c)] = z[c * l.inner];
    std::vector<double> sums;
    parallel_over_outer(l, 2, sums, [&](int64_t o0, int64_t o1, double* s) {
      kernels::channel_moments<T>(l, z, ref.data(), s, s + l.channels, o0, o1);
    });
    at::Tensor aux = at::empty({4, l.channels}, opts);
    T* ce = aux.data_ptr<T>();
    T* is = ce + l.channels;
    T* batch_mean = is + l.channels;
    T* batch_var = batch_mean + l.channels;
    const double count = static_cast<double>(l.outer * l.inner);
    for (int64_t c = 0; c < l.channels; ++c) {
      const double d_mean = sums[static_cast<size_t>(c)] / count;
      const double var = std::max(0.0, sums[static_cast<size_t>(l.channels + c)] / count - d_mean * d_mean);
      const double mean = static_cast<double>(ref[static_cast<size_t>(c)]) + d_mean;
      ce[c] = static_cast<T>(mean);
      is[c] = static_cast<T>(1.0 / std::sqrt(var + eps));
      batch_mean[c] = static_cast<T>(mean + (bias ? static_cast<double>(bias[c]) : 0.0));
      batch_var[c] = static_cast<T>(var * count / (count - 1));
    }
    return aux;
  }

  template <typename T>
  static at::Tensor running_statistics(const T* running_mean, const T* running_var, const T* bias, int64_t channels,
                                       double eps, const at::TensorOptions& opts) {
    at::Tensor aux = at::empty({2, channels}, opts);
    T* ce = aux.data_ptr<T>();
    T* is = ce + channels;
    for (int64_t c = 0; c < channels; ++c) {
      ce[c] = running_mean[c] - (bias ? bias[c] : T(0));
      is[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps));
    }
    return aux;
  }

  template <typename T>
  static std::pair<at::Tensor, at::Tensor> bn_scale_shift(const T* gamma, const T* beta, const T* invstd,
                                                          int64_t channels, const at::TensorOptions& opts) {
    at::Tensor scale = at::empty({channels}, opts), shift = at::empty({channels}, opts);
    T* sc = scale.data_ptr<T>();
    T* sh = shift.data_ptr<T>();
    for (int64_t k = 0; k < channels; ++k) {
      sc[k] = gamma ? gamma[k] * invstd[k] : invstd[k];
      sh[k] = beta ? beta[k] : T(0);
    }
    return {scale, shift};
  }

  template <typename T>
  static void epilogue_forward(const ChannelLayout& l, const T* z, const T* center, const T* scale, const T* shift,
                               Activation act, double alpha, T* pre, T* out) {
    at::parallel_for(0, l.outer, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, l.channels * l.inner)),
                     [&](int64_t o0, int64_t o1) {
                       kernels::epilogue_forward<T>(l, z, center, scale, shift, act, alpha, pre, out, o0, o1);
                     });
  }

  template <typename T>
  static Sums backward_reduce(const ChannelLayout& l, const T* g, Activation act, double alpha, ActSource source,
                              const T* src, const T* z, const T* scale, const T* shift, const T* center, T* dy,
                              bool reduce, const at::TensorOptions&) {
    Sums sums;
    parallel_over_outer(l, 2, sums, [&](int64_t o0, int64_t o1, double* s) {
      kernels::epilogue_backward_reduce<T>(l, g, act, alpha, source, src, z, scale, shift, center, dy,
                                           reduce ? s : nullptr, reduce && center ? s + l.channels : nullptr, o0,
                                           o1);
    });
    return sums;
  }

  template <typename T>
  static train::BnGradCoefficients bn_backward_coefficients(const Sums& sums, int64_t channels, const T* invstd,
                                                            const T* gamma, double count,
                                                            const at::TensorOptions& opts) {
    train::BnGradCoefficients k;
    k.k_dy = at::empty({channels}, opts);
    T* k_dy = k.k_dy.data_ptr<T>();
    for (int64_t c = 0; c < channels; ++c) k_dy[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
    if (count > 0) {
      k.k_mean = at::empty({channels}, opts);
      k.k_xc = at::empty({channels}, opts);
      T* k_mean = k.k_mean.data_ptr<T>();
      T* k_xc = k.k_xc.data_ptr<T>();
      for (int64_t c = 0; c < channels; ++c) {
        const double inv = static_cast<double>(invstd[c]);
        k_mean[c] = static_cast<T>(sums[static_cast<size_t>(c)] / count);
        k_xc[c] = static_cast<T>(sums[static_cast<size_t>(channels + c)] * inv * inv / count);
      }
    }
    return k;
  }

  template <typename T>
  static Sums batchnorm_backward_apply(const ChannelLayout& l, const T* dy, const T* z, const T* center,
                                       const T* k_mean, const T* k_xc, const T* k_dy, T* dz, bool reduce,
                                       const at::TensorOptions&) {
    Sums sums;
    parallel_over_outer(l, 1, sums, [&](int64_t o0, int64_t o1, double* s) {
      kernels::batchnorm_backward_apply<T>(l, dy, z, center, k_mean, k_xc, k_dy, dz, reduce ? s : nullptr, o0, o1);
    });
    return sums;
  }

  template <typename T>
  static at::Tensor grad_from_sums(const Sums& sums, int row, const T* factor, int64_t channels,
                                   const at::TensorOptions& opts) {
    at::Tensor out = at::empty({channels}, opts);
    T* o = out.data_ptr<T>();
    const double* v = sums.data() + static_cast<size_t>(row) * static_cast<size_t>(channels);
    for (int64_t c = 0; c < channels; ++c)
      o[c] = static_cast<T>(factor ? v[c] * static_cast<double>(factor[c]) : v[c]);
    return out;
  }
};

// Eager's running-statistics update (in double), per BatchNorm: buffers
// running_mean, running_var, num_batches_tracked; stats the BatchNorm's saved
// statistics, rows 2 and 3 the batch mean (with any bias before it) and the
// unbiased batch variance.
void update_running_stats_cpu(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum) {
  // Every BatchNorm is checked before any is updated: all or nothing.
  train::check_running_stats_update(buffers, stats, momentum, at::kCPU);
  for (size_t k = 0; k < stats.size(); ++k) {
    const at::Tensor &rm = buffers[3 * k], &rv = buffers[3 * k + 1], &tracked = buffers[3 * k + 2];
    const at::Tensor s = stats[k].to(at::kDouble);
    int64_t& count = *tracked.data_ptr<int64_t>();
    count += 1;
    const double f = momentum[k] < 0 ? 1.0 / static_cast<double>(count) : momentum[k];
    const double* mean = s[2].const_data_ptr<double>();
    const double* var = s[3].const_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(rm.scalar_type(), "update_running_stats", [&] {
      scalar_t* m = rm.data_ptr<scalar_t>();
      scalar_t* v = rv.data_ptr<scalar_t>();
      for (int64_t c = 0; c < rm.size(0); ++c) {
        m[c] = static_cast<scalar_t>(f * mean[c] + (1 - f) * static_cast<double>(m[c]));
        v[c] = static_cast<scalar_t>(f * var[c] + (1 - f) * static_cast<double>(v[c]));
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("mlp_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                 at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train::train_forward<CpuEpilogue>(train::mlp_run(spec, fparams), input, params, running);
  });
  m.impl("conv_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                  at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train::train_forward<CpuEpilogue>(train::conv_run(spec, fparams), input, params, running);
  });
  m.impl("update_running_stats", &update_running_stats_cpu);
  m.impl("mlp_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                            at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                            at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return train::backward<CpuEpilogue>(train::mlp_run(spec, fparams), grad_output, input, output, saved, params,
                                        grad_mask);
  });
  m.impl("conv_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                             at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                             at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return train::backward<CpuEpilogue>(train::conv_run(spec, fparams), grad_output, input, output, saved, params,
                                        grad_mask);
  });
}

}  // namespace seqfuse
