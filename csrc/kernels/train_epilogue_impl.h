// The training-path epilogue kernels (train_epilogue.h), written once and
// compiled per ISA: included inside `namespace seqfuse::kernels::<isa>` by
// train_epilogue_<isa>.cpp after its target pragma (see kernel_impl.h).
//
// Loops are plain per-element code over contiguous runs with the activation
// and the layout fixed at compile time, so the compiler vectorizes them for
// the ISA; forward activations reuse the inference kernels' vector code.

#include "kernel_impl.h"

namespace train_detail {

using seqfuse::kernels::Activation;
using seqfuse::kernels::ActSource;
using seqfuse::kernels::ChannelLayout;

using activation_detail::ActivationMath;
using activation_detail::with_activation;

// Calls body(lane, offset, n, c) for each contiguous run of the outer range:
// with inner == 1 a run is one row of all channels (lane is true: element k
// belongs to channel k), otherwise one channel's inner values (lane false:
// every element belongs to channel c).
template <typename Body> inline void for_each_run(const ChannelLayout& l, int64_t o0, int64_t o1, Body&& body) {
  if (l.inner == 1) {
    for (int64_t o = o0; o < o1; ++o) body(std::true_type{}, o * l.channels, l.channels, int64_t{0});
  } else {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t c = 0; c < l.channels; ++c) body(std::false_type{}, (o * l.channels + c) * l.inner, l.inner, c);
  }
}

// The per-channel value for element k of a run starting at channel c.
template <bool kLane, typename T> inline T channel_value(const T* p, int64_t c, int64_t k) {
  return kLane ? p[c + k] : p[c];
}

// sum_{k < n} term(k) in double with eight interleaved accumulators: a
// plain `s += x` loop is one dependency chain the compiler may not reorder
// (no -ffast-math), while eight independent ones vectorize. The order is
// fixed, so results are deterministic.
template <typename F> inline double sum_run(int64_t n, F&& term) {
  double acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += term(k + j);
  double s = 0;
  for (; k < n; ++k) s += term(k);
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// Runs longer than this are processed in pieces of it (stack buffers).
constexpr int64_t kPiece = 512;

}  // namespace train_detail

template <typename T>
void channel_moments(const ChannelLayout& l, const T* z, const T* ref, double* sum, double* sumsq, int64_t o0,
                     int64_t o1) {
  using namespace train_detail;
  for_each_run(l, o0, o1, [&](auto lane, int64_t off, int64_t n, int64_t c) {
    constexpr bool L = decltype(lane)::value;
    const T* p = z + off;
    if constexpr (L) {
      for (int64_t k = 0; k < n; ++k) {
        const double d = static_cast<double>(p[k]) - static_cast<double>(ref[k]);
        sum[k] += d;
        sumsq[k] += d * d;
      }
    } else {
      const double r = static_cast<double>(ref[c]);
      sum[c] += sum_run(n, [&](int64_t k) { return static_cast<double>(p[k]) - r; });
      sumsq[c] += sum_run(n, [&](int64_t k) {
        const double d = static_cast<double>(p[k]) - r;
        return d * d;
      });
    }
  });
}

template <typename T>
void epilogue_forward(const ChannelLayout& l, const T* z, const T* center, const T* scale, const T* shift,
                      Activation act, double alpha, T* pre, T* out, int64_t o0, int64_t o1) {
  using namespace train_detail;
  if (l.inner > 1 && !pre && !center && is_piecewise(act)) {
    // NCHW planes: one channel's scale, shift and activation over a run, in
    // one pass the compiler vectorizes (the inference engine 2 path).
    const T a = static_cast<T>(alpha);
    with_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      if constexpr (is_piecewise(A)) {
        for_each_run(l, o0, o1, [&](auto, int64_t off, int64_t n, int64_t c) {
          const T sc = scale ? scale[c] : T(1), sh = shift ? shift[c] : T(0);
          const T* zin = z + off;
          T* y = out + off;
          if (scale)
            for (int64_t k = 0; k < n; ++k) y[k] = ActivationMath<A>::forward(zin[k] * sc + sh, a);
          else if (shift)
            for (int64_t k = 0; k < n; ++k) y[k] = ActivationMath<A>::forward(zin[k] + sh, a);
          else
            for (int64_t k = 0; k < n; ++k) y[k] = ActivationMath<A>::forward(zin[k], a);
        });
      }
    });
    return;
  }
  for_each_run(l, o0, o1, [&](auto lane, int64_t off, int64_t n, int64_t c) {
    constexpr bool L = decltype(lane)::value;
    const T* zin = z + off;
    T* y = out + off;
    if (center) {
      for (int64_t k = 0; k < n; ++k)
        y[k] = (zin[k] - channel_value<L>(center, c, k)) * (scale ? channel_value<L>(scale, c, k) : T(1)) +
               (shift ? channel_value<L>(shift, c, k) : T(0));
    } else if (scale) {
      for (int64_t k = 0; k < n; ++k)
        y[k] = zin[k] * channel_value<L>(scale, c, k) + (shift ? channel_value<L>(shift, c, k) : T(0));
    } else if (shift) {
      for (int64_t k = 0; k < n; ++k) y[k] = zin[k] + channel_value<L>(shift, c, k);
    } else if (y != zin) {
      for (int64_t k = 0; k < n; ++k) y[k] = zin[k];
    }
    if (pre && pre + off != y)
      for (int64_t k = 0; k < n; ++k) pre[off + k] = y[k];
    activate_row(y, n, act, alpha);
  });
}

template <typename T>
void epilogue_backward_reduce(const ChannelLayout& l, const T* g, Activation act, double alpha_d, ActSource source,
                              const T* src, const T* z, const T* scale, const T* shift, const T* center, T* dy,
                              double* sum_dy, double* sum_dy_xc, int64_t o0, int64_t o1) {
  using namespace train_detail;
  const T alpha = static_cast<T>(alpha_d);
  with_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for_each_run(l, o0, o1, [&](auto lane, int64_t off, int64_t n_run, int64_t c_run) {
      constexpr bool L = decltype(lane)::value;
      for (int64_t k0 = 0; k0 < n_run; k0 += kPiece) {
        const int64_t n = n_run - k0 < kPiece ? n_run - k0 : kPiece;
        const int64_t at = off + k0;
        const int64_t c = L ? c_run + k0 : c_run;  // the channel of element 0 of the piece
        const T* gp = g + at;
        T* d = dy + at;
        const T* zp = z + at;
        // The activation's argument, recomputed as the forward computed it when not saved.
        alignas(64) T recomputed[kPiece];
        const T* v = src + at;
        if (A != Activation::None && source == ActSource::Recompute) {
          if (center)
            for (int64_t k = 0; k < n; ++k)
              recomputed[k] = (zp[k] - channel_value<L>(center, c, k)) * channel_value<L>(scale, c, k) +
                              channel_value<L>(shift, c, k);
          else
            for (int64_t k = 0; k < n; ++k)
              recomputed[k] = zp[k] * channel_value<L>(scale, c, k) + channel_value<L>(shift, c, k);
          v = recomputed;
        }
        if constexpr (A == Activation::None) {
          if (d != gp)
            for (int64_t k = 0; k < n; ++k) d[k] = gp[k];
        } else {
          for (int64_t k = 0; k < n; ++k) d[k] = ActivationMath<A>::grad(gp[k], v[k], alpha);
        }
        if constexpr (L) {
          if (sum_dy)
            for (int64_t k = 0; k < n; ++k) sum_dy[c + k] += static_cast<double>(d[k]);
          if (center)
            for (int64_t k = 0; k < n; ++k)
              sum_dy_xc[c + k] +=
                  static_cast<double>(d[k]) * (static_cast<double>(zp[k]) - static_cast<double>(center[c + k]));
        } else {
          if (sum_dy) sum_dy[c] += sum_run(n, [&](int64_t k) { return static_cast<double>(d[k]); });
          if (center) {
            const double m = static_cast<double>(center[c]);
            sum_dy_xc[c] += sum_run(n, [&](int64_t k) {
              return static_cast<double>(d[k]) * (static_cast<double>(zp[k]) - m);
            });
          }
        }
      }
    });
  });
}

template <typename T>
void batchnorm_backward_apply(const ChannelLayout& l, const T* dy, const T* z, const T* center, const T* k_mean,
                              const T* k_xc, const T* k_dy, T* dz, double* sum_dz, int64_t o0, int64_t o1) {
  using namespace train_detail;
  for_each_run(l, o0, o1, [&](auto lane, int64_t off, int64_t n, int64_t c) {
    constexpr bool L = decltype(lane)::value;
    const T* d = dy + off;
    const T* zp = z + off;
    T* out = dz + off;
    if (k_mean) {
      for (int64_t k = 0; k < n; ++k)
        out[k] = (d[k] - channel_value<L>(k_mean, c, k) -
                  (zp[k] - channel_value<L>(center, c, k)) * channel_value<L>(k_xc, c, k)) *
                 channel_value<L>(k_dy, c, k);
    } else {
      for (int64_t k = 0; k < n; ++k) out[k] = d[k] * channel_value<L>(k_dy, c, k);
    }
    if (!sum_dz) return;
    if constexpr (L) {
      for (int64_t k = 0; k < n; ++k) sum_dz[k] += static_cast<double>(out[k]);
    } else {
      sum_dz[c] += sum_run(n, [&](int64_t k) { return static_cast<double>(out[k]); });
    }
  });
}

#define SEQFUSE_INSTANTIATE_TRAIN(T)                                                                               \
  template void channel_moments<T>(const ChannelLayout&, const T*, const T*, double*, double*, int64_t, int64_t);  \
  template void epilogue_forward<T>(const ChannelLayout&, const T*, const T*, const T*, const T*, Activation,     \
                                    double, T*, T*, int64_t, int64_t);                                              \
  template void epilogue_backward_reduce<T>(const ChannelLayout&, const T*, Activation, double, ActSource,         \
                                            const T*, const T*, const T*, const T*, const T*, T*, double*,         \
                                            double*, int64_t, int64_t);                                             \
  template void batchnorm_backward_apply<T>(const ChannelLayout&, const T*, const T*, const T*, const T*,          \
                                            const T*, const T*, T*, double*, int64_t, int64_t);
SEQFUSE_INSTANTIATE_TRAIN(float)
SEQFUSE_INSTANTIATE_TRAIN(double)
#undef SEQFUSE_INSTANTIATE_TRAIN
