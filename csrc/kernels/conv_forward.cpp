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
  void conv_stage_f32(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const float*, float*, int64_t, \
                      int64_t, float*, int64_t, int64_t);                                                         \
  void conv_stage_f64(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const double*, double*,       \
                      int64_t, int64_t, double*, int64_t, int64_t);                                               \
  void conv_epilogue_io(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const float*, float*,        \
                        int64_t, int64_t);                                                                        \
  void conv_epilogue_io(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const double*, double*,      \
                        int64_t, int64_t);                                                                        \
  void conv_epilogue_io(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const bf16*, bf16*, int64_t, \
                        int64_t);                                                                                 \
  void conv_epilogue_io(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const bf16*, float*,         \
                        int64_t, int64_t);                                                                        \
  }
SEQFUSE_FOR_EACH_ISA(SEQFUSE_DECLARE_ISA, conv)
#undef SEQFUSE_DECLARE_ISA

#define SEQFUSE_DECLARE_LAYOUT(ns, T)                                                                             \
  namespace ns {                                                                                                  \
  void conv_load_nhwc(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t<T>*);          \
  void conv_store_nhwc(const acc_t<T>*, int64_t, int64_t, int64_t, const int64_t*, int64_t, int64_t, T*);         \
  }
#define SEQFUSE_DECLARE_LAYOUTS(ns) \
  SEQFUSE_DECLARE_LAYOUT(ns, float) SEQFUSE_DECLARE_LAYOUT(ns, double) SEQFUSE_DECLARE_LAYOUT(ns, bf16)
SEQFUSE_FOR_EACH_ISA(SEQFUSE_DECLARE_LAYOUTS, conv)
#undef SEQFUSE_DECLARE_LAYOUTS
#undef SEQFUSE_DECLARE_LAYOUT

namespace {

// The active ISA's stage kernel for accumulate type A.
template <typename A>
void stage_kernel(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const A* in, A* out,
                  int64_t p0, int64_t p1, A* scratch, int64_t panel0, int64_t panel1) {
  SEQFUSE_ISA_DISPATCH(conv, {
    if constexpr (std::is_same_v<A, float>)
      return isa::conv_stage_f32(d, g, i, packed, in, out, p0, p1, scratch, panel0, panel1);
    else
      return isa::conv_stage_f64(d, g, i, packed, in, out, p0, p1, scratch, panel0, panel1);
  })
}

// Scratch for the patch tile of stage i, or its Winograd blocks (the same for every ISA).
int64_t scratch_elems(const ConvDesc& d, const ConvGeometry& g, size_t i) {
  const ConvStage& st = d.stages[i];
  if (g.stages[i].winograd) return winograd_scratch_elems(st.in_channels, st.out_channels);
  if (!st.has_weights() || st.depthwise) return 0;
  return conv_scratch_elems(st.reduction(), packs_bf16_pairs(d.dtype, st));
}

}  // namespace

template <typename A>
void conv_stage_forward(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const A* in,
                        A* out, int64_t p0, int64_t p1, int64_t panel0, int64_t panel1) {
  A* scratch = thread_workspace<A>(static_cast<size_t>(scratch_elems(d, g, i)));
  stage_kernel<A>(d, g, i, packed, in, out, p0, p1, scratch, panel0, panel1);
}

bool gemm_splits_channels(const ConvDesc& d, const ConvGeometry& g, size_t i, int64_t images, int64_t parts) {
  const ConvStage& st = d.stages[i];
  const StageShape& s = g.stages[i];
  if (!st.has_weights() || st.depthwise || st.groups != 1 || parts < 2) return false;
  // A Winograd stage's GEMM rows are its tiles.
  const int64_t rows = images * (s.winograd ? winograd_tile_rows(s) * winograd_tile_cols(s) : s.out_pixels());
  return st.out_channels > rows && panel_count(st.out_channels) >= parts;
}

template <typename TI, typename TO>
void conv_stage_epilogue(const ConvDesc& d, const ConvGeometry& g, size_t i, const uint8_t* packed, const TI* in,
                         TO* out, int64_t p0, int64_t p1) {
  SEQFUSE_ISA_DISPATCH(conv, return isa::conv_epilogue_io(d, g, i, packed, in, out, p0, p1);)
}

namespace {
// Element strides of compact NHWC (N, C, H, W).
bool is_compact_nhwc(const int64_t* s, int64_t C, int64_t H, int64_t W) {
  return (s[1] == 1 || C == 1) && (s[3] == C || W == 1) && (s[2] == W * C || H == 1) && s[0] == H * W * C;
}
}  // namespace

template <typename TI, typename A, typename TO>
void conv_forward_images(const ConvDesc& d, const ConvGeometry& g, const uint8_t* packed, const TI* in,
                         const int64_t* in_strides, TO* out, const int64_t* out_strides, int64_t n_images,
                         size_t stop, int64_t* stage_ns) {
  int64_t scratch = 0;
  for (size_t i = 0; i < stop; ++i) scratch = std::max(scratch, scratch_elems(d, g, i));
  const int64_t image = g.max_image_elems;
  A* ws = thread_workspace<A>(static_cast<size_t>(2 * image + scratch));
  A* buffers[2] = {ws, ws + image};
  const StageShape& first = g.stages[0];
  const StageShape& last = g.stages[stop - 1];
  // After a Flatten the output is (N, F) rows: no transposition on the way out.
  const int64_t out_h = last.out_h, out_w = last.out_w;
  const bool in_direct = std::is_same_v<TI, A> && is_compact_nhwc(in_strides, first.in_c, first.in_h, first.in_w);
  const bool out_direct = std::is_same_v<TO, A> && is_compact_nhwc(out_strides, last.out_c, out_h, out_w);
  // Profiled calls time each step into stage_ns (a clock read per step).
  int64_t t = stage_ns ? monotonic_ns() : 0;
  auto lap = [&](size_t slot) {
    if (!stage_ns) return;
    const int64_t now = monotonic_ns();
    stage_ns[slot] += now - t;
    t = now;
  };
  for (int64_t n = 0; n < n_images; ++n) {
    const A* cur;
    if (in_direct) {
      cur = reinterpret_cast<const A*>(in) + n * in_strides[0];
    } else {  // stage 0 writes buffers[0], so its input may sit in buffers[1]
      load_nhwc<TI, A>(in + n * in_strides[0], in_strides, first.in_c, first.in_h, first.in_w, 0, 1, buffers[1]);
      cur = buffers[1];
      lap(stop);
    }
    for (size_t i = 0; i < stop; ++i) {
      A* next = i + 1 == stop && out_direct ? reinterpret_cast<A*>(out) + n * out_strides[0] : buffers[i % 2];
      stage_kernel<A>(d, g, i, packed, cur, next, 0, g.stages[i].out_pixels(), ws + 2 * image, 0, -1);
      cur = next;
      lap(i);
    }
    if (!out_direct) {
      store_nhwc<A, TO>(cur, last.out_c, out_h, out_w, out_strides, 0, 1, out + n * out_strides[0]);
      lap(stop);
    }
  }
}

template <typename T, typename A>
void load_nhwc(const T* x, const int64_t* s, int64_t C, int64_t H, int64_t W, int64_t n0, int64_t n1, A* out) {
  SEQFUSE_ISA_DISPATCH(conv, return isa::conv_load_nhwc(x, s, C, H, W, n0, n1, out);)
}

template <typename A, typename T>
void store_nhwc(const A* y, int64_t C, int64_t H, int64_t W, const int64_t* s, int64_t n0, int64_t n1, T* out) {
  SEQFUSE_ISA_DISPATCH(conv, return isa::conv_store_nhwc(y, C, H, W, s, n0, n1, out);)
}

#define SEQFUSE_INSTANTIATE_ACC(A)                                                                               \
  template void conv_stage_forward<A>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const A*, A*, \
                                      int64_t, int64_t, int64_t, int64_t);                                        \
  template void conv_stage_epilogue<A, A>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*, const A*, \
                                          A*, int64_t, int64_t);
SEQFUSE_INSTANTIATE_ACC(float)
SEQFUSE_INSTANTIATE_ACC(double)
#undef SEQFUSE_INSTANTIATE_ACC
template void conv_stage_epilogue<bf16, bf16>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*,
                                              const bf16*, bf16*, int64_t, int64_t);
template void conv_stage_epilogue<bf16, float>(const ConvDesc&, const ConvGeometry&, size_t, const uint8_t*,
                                               const bf16*, float*, int64_t, int64_t);

#define SEQFUSE_INSTANTIATE_IO(T)                                                                               \
  template void conv_forward_images<T, acc_t<T>, T>(const ConvDesc&, const ConvGeometry&, const uint8_t*,        \
                                                    const T*, const int64_t*, T*, const int64_t*, int64_t, size_t, \
                                                    int64_t*);                                                  \
  template void load_nhwc<T, acc_t<T>>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                       acc_t<T>*);                                                              \
  template void store_nhwc<acc_t<T>, T>(const acc_t<T>*, int64_t, int64_t, int64_t, const int64_t*, int64_t,    \
                                        int64_t, T*);
SEQFUSE_INSTANTIATE_IO(float)
SEQFUSE_INSTANTIATE_IO(double)
SEQFUSE_INSTANTIATE_IO(bf16)
#undef SEQFUSE_INSTANTIATE_IO
// bfloat16 runs with a Linear head hand the flattened rows over in float.
template void conv_forward_images<bf16, float, float>(const ConvDesc&, const ConvGeometry&, const uint8_t*,
                                                      const bf16*, const int64_t*, float*, const int64_t*, int64_t,
                                                      size_t, int64_t*);

}  // namespace seqfuse::kernels
