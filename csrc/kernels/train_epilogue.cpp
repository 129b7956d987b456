// Per-ISA dispatch of the training epilogue kernels (train_epilogue_impl.h,
// compiled once per ISA by train_epilogue_<isa>.cpp).
#include "train_epilogue.h"

#include "isa.h"

namespace seqfuse::kernels {

#define SEQFUSE_DECLARE_TRAIN(ns)                                                                                 \
  namespace ns {                                                                                              \
  template <typename U>                                                                                              \
  void channel_moments(const ChannelLayout&, const U*, const U*, double*, double*, int64_t, int64_t);                \
  template <typename U>                                                                                              \
  void epilogue_forward(const ChannelLayout&, const U*, const U*, const U*, const U*, Activation, double, U*, U*,  \
                        int64_t, int64_t);                                                                           \
  template <typename U>                                                                                              \
  void epilogue_backward_reduce(const ChannelLayout&, const U*, Activation, double, ActSource, const U*, const U*,   \
                                const U*, const U*, const U*, U*, double*, double*, int64_t, int64_t);               \
  template <typename U>                                                                                              \
  void batchnorm_backward_apply(const ChannelLayout&, const U*, const U*, const U*, const U*, const U*, const U*, U*, \
                                double*, int64_t, int64_t);                                                          \
  }
SEQFUSE_FOR_EACH_ISA(SEQFUSE_DECLARE_TRAIN, train)
#undef SEQFUSE_DECLARE_TRAIN

// Forwards a call to the active ISA's instantiation.
#define SEQFUSE_ISA_CALL(fn, ...) SEQFUSE_ISA_DISPATCH(train, return isa::fn<T>(__VA_ARGS__);)

template <typename T>
void channel_moments(const ChannelLayout& l, const T* z, const T* ref, double* sum, double* sumsq, int64_t o0,
                     int64_t o1) {
  SEQFUSE_ISA_CALL(channel_moments, l, z, ref, sum, sumsq, o0, o1)
}

template <typename T>
void epilogue_forward(const ChannelLayout& l, const T* z, const T* center, const T* scale, const T* shift,
                      Activation act, double alpha, T* pre, T* out, int64_t o0, int64_t o1) {
  SEQFUSE_ISA_CALL(epilogue_forward, l, z, center, scale, shift, act, alpha, pre, out, o0, o1)
}

template <typename T>
void epilogue_backward_reduce(const ChannelLayout& l, const T* g, Activation act, double alpha, ActSource source,
                              const T* src, const T* z, const T* scale, const T* shift, const T* center, T* dy,
                              double* sum_dy, double* sum_dy_xc, int64_t o0, int64_t o1) {
  SEQFUSE_ISA_CALL(epilogue_backward_reduce, l, g, act, alpha, source, src, z, scale, shift, center, dy, sum_dy,
                   sum_dy_xc, o0, o1)
}

template <typename T>
void batchnorm_backward_apply(const ChannelLayout& l, const T* dy, const T* z, const T* center, const T* k_mean,
                              const T* k_xc, const T* k_dy, T* dz, double* sum_dz, int64_t o0, int64_t o1) {
  SEQFUSE_ISA_CALL(batchnorm_backward_apply, l, dy, z, center, k_mean, k_xc, k_dy, dz, sum_dz, o0, o1)
}
#undef SEQFUSE_ISA_CALL

#define SEQFUSE_INSTANTIATE(T)                                                                                      \
  template void channel_moments<T>(const ChannelLayout&, const T*, const T*, double*, double*, int64_t, int64_t);  \
  template void epilogue_forward<T>(const ChannelLayout&, const T*, const T*, const T*, const T*, Activation,     \
                                    double, T*, T*, int64_t, int64_t);                                              \
  template void epilogue_backward_reduce<T>(const ChannelLayout&, const T*, Activation, double, ActSource,         \
                                            const T*, const T*, const T*, const T*, const T*, T*, double*,         \
                                            double*, int64_t, int64_t);                                             \
  template void batchnorm_backward_apply<T>(const ChannelLayout&, const T*, const T*, const T*, const T*,          \
                                            const T*, const T*, T*, double*, int64_t, int64_t);
SEQFUSE_INSTANTIATE(float)
SEQFUSE_INSTANTIATE(double)
#undef SEQFUSE_INSTANTIATE

}  // namespace seqfuse::kernels
