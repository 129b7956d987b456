// Packing of Linear weights into kernel panels and folding of bias + eval
// BatchNorm into the per-channel epilogue. Runs once per plan, not per call.
#include <cmath>

#include "mlp_forward.h"

namespace seqfuse::kernels {

template <typename T> void pack_linear_weight(const T* weight, int64_t out_features, int64_t in_features, T* packed) {
  const int64_t panels = panel_count(out_features);
  const T zero = convert<T>(acc_t<T>(0));
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < in_features; ++k) {
      T* dst = packed + (p * in_features + k) * kPanelWidth;
      for (int64_t j = 0; j < kPanelWidth; ++j) {
        const int64_t n = p * kPanelWidth + j;
        dst[j] = n < out_features ? weight[n * in_features + k] : zero;
      }
    }
}

template <typename T>
void fold_scale_shift(int64_t channels, const T* bias, const T* bn_weight, const T* bn_bias, const T* bn_mean,
                      const T* bn_var, double eps, acc_t<T>* scale, acc_t<T>* shift) {
  using A = acc_t<T>;
  auto get = [](const T* p, int64_t i, double dflt) {
    return p ? static_cast<double>(convert<A>(p[i])) : dflt;
  };
  const int64_t padded = round_up(channels, kPanelWidth);
  for (int64_t c = 0; c < padded; ++c) {
    if (c >= channels) {
      scale[c] = A(0);
      shift[c] = A(0);
      continue;
    }
    const double b = get(bias, c, 0.0);
    if (bn_var == nullptr) {
      scale[c] = A(1);
      shift[c] = static_cast<A>(b);
      continue;
    }
    // eval BatchNorm: (v - mean) / sqrt(var + eps) * gamma + beta, with v = acc + b
    const double s = get(bn_weight, c, 1.0) / std::sqrt(get(bn_var, c, 1.0) + eps);
    scale[c] = static_cast<A>(s);
    shift[c] = static_cast<A>((b - get(bn_mean, c, 0.0)) * s + get(bn_bias, c, 0.0));
  }
}

#define SEQFUSE_INSTANTIATE_PACK(T)                                                                     \
  template void pack_linear_weight<T>(const T*, int64_t, int64_t, T*);                                  \
  template void fold_scale_shift<T>(int64_t, const T*, const T*, const T*, const T*, const T*, double, \
                                    acc_t<T>*, acc_t<T>*);
SEQFUSE_INSTANTIATE_PACK(float)
SEQFUSE_INSTANTIATE_PACK(double)
SEQFUSE_INSTANTIATE_PACK(bf16)
SEQFUSE_INSTANTIATE_PACK(fp16)
#undef SEQFUSE_INSTANTIATE_PACK

}  // namespace seqfuse::kernels
