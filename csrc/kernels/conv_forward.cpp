// ISA dispatch of the fused conv stages, the per-image runner and the layout
// conversions. The arithmetic lives in conv_forward_impl.h, compiled once per
// ISA by conv_forward_<isa>.cpp.
#include "conv_forward.h"

#include <algorithm>
#include <type_traits>

#include "workspace.h"

namespace seqfuse::kernels {

#define SEQFUSE_DECLARE_ISA(ns)                                                                                   \
  namespace ns {                                                                                                  \
  int64_t conv_im2col_budget();                                                                                   \
  void conv_stage_f32(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const float*, float*, int64_t, \
                      int64_t, float*);                                                                           \
  void conv_stage_f64(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const double*, double*,       \
                      int64_t, int64_t, double*);                                                                 \
  void conv_epilogue_f32(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, float*, int64_t, int64_t); \
  void conv_epilogue_f64(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, double*, int64_t,          \
                         int64_t);                                                                                \
  }
SEQFUSE_DECLARE_ISA(baseline)
#if defined(__x86_64__) || defined(_M_X64)
#define SEQFUSE_HAVE_X86_VARIANTS 1
SEQFUSE_DECLARE_ISA(avx2)
SEQFUSE_DECLARE_ISA(avx512)
#endif
#undef SEQFUSE_DECLARE_ISA

namespace {

template <typename A> struct ConvKernels {
  void (*stage)(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const A*, A*, int64_t, int64_t, A*);
  void (*epilogue)(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, A*, int64_t, int64_t);
};

template <typename A> ConvKernels<A> kernels_for(Isa isa) {
#define SEQFUSE_TABLE(ns)                                                  \
  if constexpr (std::is_same_v<A, float>)                                  \
    return {ns::conv_stage_f32, ns::conv_epilogue_f32};                    \
  else                                                                     \
    return {ns::conv_stage_f64, ns::conv_epilogue_f64};
#ifdef SEQFUSE_HAVE_X86_VARIANTS
  if (isa == Isa::Avx512) { SEQFUSE_TABLE(avx512) }
  if (isa == Isa::Avx2) { SEQFUSE_TABLE(avx2) }
#endif
  (void)isa;
  SEQFUSE_TABLE(baseline)
#undef SEQFUSE_TABLE
}

// Scratch for the patch tile of stage i (the same for every ISA).
int64_t scratch_elems(const ConvDesc& d, size_t i) {
  const ConvStage& st = d.stages[i];
  if (!st.has_weights() || st.depthwise) return 0;
  return std::max<int64_t>(baseline::conv_im2col_budget(), kPanelWidth * st.reduction());
}

}  // namespace

template <typename A>
void conv_stage_forward(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const A* in,
                        A* out, int64_t p0, int64_t p1) {
  A* scratch = thread_workspace<A>(static_cast<size_t>(scratch_elems(d, i)));
  kernels_for<A>(active_isa()).stage(d, g, i, packed, in, out, p0, p1, scratch);
}

template <typename A>
void conv_stage_epilogue(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, A* io,
                         int64_t p0, int64_t p1) {
  kernels_for<A>(active_isa()).epilogue(d, g, i, packed, io, p0, p1);
}

template <typename A>
void conv_forward_images(const ConvDesc& d, const ConvGeometry& g, const uint8_t* packed, const A* in, A* out,
                         int64_t n_images, size_t stop) {
  const ConvKernels<A> k = kernels_for<A>(active_isa());
  int64_t scratch = 0;
  for (size_t i = 0; i < stop; ++i) scratch = std::max(scratch, scratch_elems(d, i));
  const int64_t image = g.max_image_elems;
  A* ws = thread_workspace<A>(static_cast<size_t>(2 * image + scratch));
  A* buffers[2] = {ws, ws + image};
  const int64_t in_elems = g.stages[0].in_elems(), out_elems = g.stages[stop - 1].out_elems();
  for (int64_t n = 0; n < n_images; ++n) {
    const A* cur = in + n * in_elems;
    for (size_t i = 0; i < stop; ++i) {
      A* next = i + 1 == stop ? out + n * out_elems : buffers[i % 2];
      k.stage(d, g, i, packed, cur, next, 0, g.stages[i].out_pixels(), ws + 2 * image);
      cur = next;
    }
  }
}

template <typename T, typename A>
void load_nhwc(const T* x, const int64_t* s, int64_t C, int64_t H, int64_t W, int64_t n0, int64_t n1, A* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t h = 0; h < H; ++h) {
      A* row = out + ((n * H + h) * W) * C;
      const T* src = x + n * s[0] + h * s[2];
      // Channel-outer: reads follow W (contiguous in NCHW), writes stay in one row.
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < W; ++w) row[w * C + c] = convert<A>(src[c * s[1] + w * s[3]]);
    }
}

template <typename A, typename T>
void store_nhwc(const A* y, int64_t C, int64_t H, int64_t W, const int64_t* s, int64_t n0, int64_t n1, T* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const A* row = y + ((n * H + h) * W) * C;
      T* dst = out + n * s[0] + h * s[2];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < W; ++w) dst[c * s[1] + w * s[3]] = convert<T>(row[w * C + c]);
    }
}

#define SEQFUSE_INSTANTIATE_ACC(A)                                                                               \
  template void conv_stage_forward<A>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const A*, A*, \
                                      int64_t, int64_t);                                                          \
  template void conv_stage_epilogue<A>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, A*, int64_t, \
                                       int64_t);                                                                  \
  template void conv_forward_images<A>(const ConvDesc&, const ConvGeometry&, const uint8_t*, const A*, A*,       \
                                       int64_t, size_t);
SEQFUSE_INSTANTIATE_ACC(float)
SEQFUSE_INSTANTIATE_ACC(double)
#undef SEQFUSE_INSTANTIATE_ACC

#define SEQFUSE_INSTANTIATE_IO(T)                                                                               \
  template void load_nhwc<T, acc_t<T>>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                       acc_t<T>*);                                                              \
  template void store_nhwc<acc_t<T>, T>(const acc_t<T>*, int64_t, int64_t, int64_t, const int64_t*, int64_t,    \
                                        int64_t, T*);
SEQFUSE_INSTANTIATE_IO(float)
SEQFUSE_INSTANTIATE_IO(double)
SEQFUSE_INSTANTIATE_IO(bf16)
#undef SEQFUSE_INSTANTIATE_IO

}  // namespace seqfuse::kernels
