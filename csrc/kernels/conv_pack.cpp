// Packing of Conv/Linear weights into the conv kernels' layouts and folding of
// bias + eval BatchNorm into the per-channel epilogue. Runs once per plan.
#include "conv_forward.h"

#include <type_traits>

namespace seqfuse::kernels {

namespace {
// U = G g G^T for each (out, in) channel pair's 3x3 kernel g (conv_spec.h's
// Winograd F(2x2, 3x3)), computed in double, stored [point][panel][in][16]:
// each point's matrix in the layout of a 1x1 convolution's panels, so the
// products run on the GEMM micro-kernel.
template <typename T, typename A> void pack_winograd(const ConvStage& st, const T* weight, A* dst) {
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  const int64_t cin = st.in_channels, np = panel_count(st.out_channels);
  for (int64_t co = 0; co < st.out_channels; ++co)
    for (int64_t ci = 0; ci < cin; ++ci) {
      const T* g = weight + (co * cin + ci) * 9;
      double gg[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 3; ++j)
          gg[i][j] = G[i][0] * static_cast<double>(convert<A>(g[j])) +
                     G[i][1] * static_cast<double>(convert<A>(g[3 + j])) +
                     G[i][2] * static_cast<double>(convert<A>(g[6 + j]));
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const double u = gg[i][0] * G[j][0] + gg[i][1] * G[j][1] + gg[i][2] * G[j][2];
          dst[(((i * 4 + j) * np + co / kPanelWidth) * cin + ci) * kPanelWidth + co % kPanelWidth] =
              static_cast<A>(u);
        }
    }
}
}  // namespace

template <typename T>
void pack_conv_stage(const ConvStage& st, const T* weight, const T* bias, const T* bn_weight, const T* bn_bias,
                     const T* bn_mean, const T* bn_var, uint8_t* packed) {
  using A = acc_t<T>;
  if (st.scale_offset >= 0)
    fold_scale_shift(st.out_channels, bias, bn_weight, bn_bias, bn_mean, bn_var, st.eps,
                     reinterpret_cast<A*>(packed + st.scale_offset), reinterpret_cast<A*>(packed + st.shift_offset));
  if (!st.has_weights()) return;
  A* dst = reinterpret_cast<A*>(packed + st.weight_offset);
  const int64_t khw = st.kernel_h * st.kernel_w;
  if (st.depthwise) {  // [kh * kw][channel]: one vector of taps per window position
    const int64_t cpad = round_up(st.out_channels, kPanelWidth);
    for (int64_t c = 0; c < st.out_channels; ++c)
      for (int64_t t = 0; t < khw; ++t) dst[t * cpad + c] = convert<A>(weight[c * khw + t]);
    return;
  }
  if (st.winograd_offset >= 0) pack_winograd(st, weight, reinterpret_cast<A*>(packed + st.winograd_offset));
  // Per group, [panel][k][16] with k = (kh * kernel_w + kw) * cin_g + ci: the
  // order of the patch rows im2col gathers from NHWC activations. bfloat16
  // pairs (packs_bf16_pairs): [panel][k / 2][16][2], K rounded up to even,
  // the weight's own bfloat16 values.
  const int64_t cin_g = st.in_channels / st.groups, cout_g = st.out_channels / st.groups;
  const int64_t K = st.reduction(), np = panel_count(cout_g);
  const bool pairs = std::is_same_v<T, bf16> && packs_bf16_pairs(DType::BFloat16, st);
  const int64_t Kp = pairs ? round_up(K, 2) : K;
  for (int64_t grp = 0; grp < st.groups; ++grp)
    for (int64_t p = 0; p < np; ++p)
      for (int64_t t = 0; t < khw; ++t)
        for (int64_t ci = 0; ci < cin_g; ++ci) {
          const int64_t k = t * cin_g + ci, panel = (grp * np + p) * Kp * kPanelWidth;
          for (int64_t j = 0; j < kPanelWidth; ++j) {
            const int64_t co = p * kPanelWidth + j;
            if (co >= cout_g) continue;
            const T w = weight[((grp * cout_g + co) * cin_g + ci) * khw + t];
            if constexpr (std::is_same_v<T, bf16>) {
              if (pairs) {
                reinterpret_cast<bf16*>(packed + st.weight_offset)[panel + (k / 2) * 2 * kPanelWidth + 2 * j + k % 2] = w;
                continue;
              }
            }
            dst[panel + k * kPanelWidth + j] = convert<A>(w);
          }
        }
}

#define SEQFUSE_INSTANTIATE_PACK(T)                                                                          \
  template void pack_conv_stage<T>(const ConvStage&, const T*, const T*, const T*, const T*, const T*, const T*, \
                                   uint8_t*);
SEQFUSE_INSTANTIATE_PACK(float)
SEQFUSE_INSTANTIATE_PACK(double)
SEQFUSE_INSTANTIATE_PACK(bf16)
SEQFUSE_INSTANTIATE_PACK(fp16)
#undef SEQFUSE_INSTANTIATE_PACK

}  // namespace seqfuse::kernels
