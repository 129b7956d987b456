// The description of a fused convolution run shared by Python, the op adapters
// and the kernels: the integer "spec" carried by the seqfuse::conv_* ops,
// decoded in one place, the packed parameter layout, and the per-stage shapes
// for a given input size.
//
// spec = [kConvSpecVersion, dtype, n_stages, in_channels,
//         then per stage (kConvSpecPerStage values):
//           kind, out_channels, activation, flags,
//           kernel_h, kernel_w, stride_h, stride_w,
//           pad_top, pad_left, pad_bottom, pad_right,
//           dilation_h, dilation_w, param, options]
// fparams = per stage: [activation alpha, batchnorm eps]
//
// param is the Conv's groups, the AvgPool's divisor_override (0: none), or the
// Linear's in_features. options are the pools' ceil_mode / count_include_pad.
//
// A stage is one of
//   Conv          y = act(conv(x, W) * scale + shift)   bias and eval BatchNorm2d folded
//   ScaleShift    y = act(x * scale + shift)            a BatchNorm not after a Conv/Linear
//   Pointwise     y = act(x)
//   MaxPool, AvgPool, GlobalAvgPool (AdaptiveAvgPool2d(1)), each then act
//   Flatten       (N, C, H, W) -> (N, C*H*W) in NCHW order
//   Linear        after a Flatten: a 1x1 convolution of the (N, F, 1, 1) rows
// Activations live between stages in NHWC order (channels contiguous), in the
// accumulate type; packed weights and scale/shift are in the accumulate type
// too, except a bfloat16 run's GEMM weights, in bfloat16 pairs
// (packs_bf16_pairs), and the Winograd weights beside some 3x3 ones
// (winograd_eligible).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlp_spec.h"

namespace seqfuse::kernels {

constexpr int64_t kConvSpecVersion = 1;
constexpr int64_t kConvSpecHeader = 4;
constexpr int64_t kConvSpecPerStage = 16;
constexpr int64_t kMaxKernel = int64_t{1} << 12;
constexpr int64_t kMaxSpatial = int64_t{1} << 20;

enum class ConvStageKind : int64_t {
  Conv = 0,
  ScaleShift = 1,
  Pointwise = 2,
  MaxPool = 3,
  AvgPool = 4,
  GlobalAvgPool = 5,
  Flatten = 6,
  Linear = 7,
};
constexpr int64_t kNumConvStageKinds = 8;

// Pool options.
constexpr int64_t kCeilMode = 1;
constexpr int64_t kCountIncludePad = 2;

struct ConvStage {
  ConvStageKind kind;
  int64_t in_channels;
  int64_t out_channels;
  Activation activation;
  int64_t flags;  // kHasBias / kHasBatchNorm / kBatchNormAffine (mlp_spec.h)
  double alpha;
  double eps;
  int64_t kernel_h, kernel_w, stride_h, stride_w;
  int64_t pad_top, pad_left, pad_bottom, pad_right;
  int64_t dilation_h, dilation_w;
  int64_t groups;           // Conv (1 otherwise)
  int64_t divisor;          // AvgPool divisor_override, 0 for none
  int64_t options;          // pools: kCeilMode | kCountIncludePad
  bool depthwise;           // Conv with one input and one output channel per group
  int64_t weight_offset;    // -1 when the stage packs no weight
  int64_t scale_offset;     // -1 when the stage has no scale/shift
  int64_t shift_offset;
  int64_t winograd_offset;  // the Winograd-transformed weight (see winograd_eligible), -1 when none

  bool has_weights() const { return kind == ConvStageKind::Conv || kind == ConvStageKind::Linear; }
  // Rows of the GEMM's reduction: what one output value sums over.
  int64_t reduction() const { return kernel_h * kernel_w * (in_channels / groups); }
};

struct ConvDesc {
  DType dtype;
  int64_t in_channels;
  int64_t out_channels;
  int64_t flatten_stage;  // index of the Flatten stage, -1 if none
  int64_t packed_bytes;
  std::vector<ConvStage> stages;
};

// Geometry of one stage for a given input size (per image, NHWC).
struct StageShape {
  int64_t in_h, in_w, in_c;
  int64_t out_h, out_w, out_c;
  bool winograd = false;  // this call runs the stage as Winograd F(2x2, 3x3) tiles (select_winograd)
  int64_t out_pixels() const { return out_h * out_w; }
  int64_t in_elems() const { return in_h * in_w * in_c; }
  int64_t out_elems() const { return out_h * out_w * out_c; }
};

struct ConvGeometry {
  std::vector<StageShape> stages;
  int64_t max_image_elems;  // largest activation of one image between stages
  int64_t macs_per_image;   // multiply-adds (one per value for other stages): the size of a call
};

// The shape rules below are templates over the size type: int64_t for the
// kernels, and a symbolic size (c10::SymInt, in the ops' Meta kernels, for
// torch.compile and torch.export with dynamic shapes), so each rule is
// written once. Int needs +, -, * and / by int64_t, and comparisons with
// int64_t that give bool; only non-negative values are divided.

// Output size of a convolution or pooling window along one dimension, as ATen
// computes it (pooling_output_shape for pools, with its ceil_mode rule).
template <typename Int>
Int window_output_size(const Int& in, int64_t k, int64_t s, int64_t pad_before, int64_t pad_after, int64_t d,
                       bool ceil_mode) {
  // Division rounding toward -infinity (ATen's div_rtn): with ceil_mode a
  // window overhanging the padded input by less than a stride still counts.
  const Int num = in + (pad_before + pad_after - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0));
  Int out = num >= 0 ? num / s + 1 : Int(1) - (Int(0) - num + (s - 1)) / s;
  if (ceil_mode && (out - 1) * s >= in + pad_before) out = out - 1;
  return out < 0 ? Int(0) : out;
}

// A stage's output (channels, height, width) for its input's: the shape rule
// of each stage kind. (The checks that an input fits are resolve_conv_geometry's.)
template <typename Int> struct MapShape {
  Int out_c, out_h, out_w;
};
template <typename Int>
MapShape<Int> stage_output_shape(const ConvStage& st, const Int& c, const Int& h, const Int& w) {
  MapShape<Int> out{Int(st.out_channels), h, w};
  const bool ceil_mode = st.options & kCeilMode;
  switch (st.kind) {
    case ConvStageKind::Conv:
    case ConvStageKind::MaxPool:
    case ConvStageKind::AvgPool:
      out.out_h = window_output_size(h, st.kernel_h, st.stride_h, st.pad_top, st.pad_bottom, st.dilation_h, ceil_mode);
      out.out_w = window_output_size(w, st.kernel_w, st.stride_w, st.pad_left, st.pad_right, st.dilation_w, ceil_mode);
      break;
    case ConvStageKind::GlobalAvgPool: out.out_h = out.out_w = Int(1); break;
    case ConvStageKind::Flatten:
      out.out_h = out.out_w = Int(1);
      out.out_c = h * w * c;
      break;
    default: break;  // Linear, ScaleShift, Pointwise: out_channels, the map as it is
  }
  return out;
}

// Every stage's output shape for an input of (c, h, w).
template <typename Int>
std::vector<MapShape<Int>> stage_output_shapes(const ConvDesc& d, Int c, Int h, Int w) {
  std::vector<MapShape<Int>> out;
  out.reserve(d.stages.size());
  for (const ConvStage& st : d.stages) {
    out.push_back(stage_output_shape(st, c, h, w));
    c = out.back().out_c, h = out.back().out_h, w = out.back().out_w;
  }
  return out;
}

// Values in one patch tile (64 KiB of float): a tile of output pixels whose
// patches are gathered once and then multiplied by every weight panel.
constexpr int64_t kIm2colBudget = 16384;

// Scratch values (of the accumulate type) conv_gemm needs for a reduction
// of K: the patch tile, and for bfloat16 pairs the tile's rows rounded to
// bfloat16 after it (at most twice the tile's values with K rounded up to
// even, counted in halves of a float).
inline int64_t conv_scratch_elems(int64_t K, bool pairs) {
  const int64_t tile = std::max<int64_t>(kIm2colBudget, kPanelWidth * K);
  return pairs ? 2 * tile + 32 : tile;
}

// Whether the direct grouped kernel (conv_grouped) runs a stage: groups of
// at most one panel of outputs (RegNet, ResNeXt); other grouped stages run
// conv_gemm per group.
inline bool grouped_direct(const ConvStage& st) {
  return st.groups > 1 && !st.depthwise && st.out_channels / st.groups <= kPanelWidth;
}

// Whether a stage's weight is packed as bfloat16 pairs, [group][panel][K/2][16][2]
// with K rounded up to even (the GEMMs of bfloat16 runs multiply bfloat16
// operands: kernel_impl.h's Operands::Pairs): every Conv/Linear of a bfloat16 run
// that conv_gemm runs. Depthwise and direct grouped stages keep float weights.
inline bool packs_bf16_pairs(DType dtype, const ConvStage& st) {
  return dtype == DType::BFloat16 && st.has_weights() && !st.depthwise && !grouped_direct(st);
}

// Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 3x3 stride-1 convolution as
// 16 independent products per 4x4 input tile (2x2 outputs), V = B^T d B
// times U = G g G^T, summed over input channels (16 GEMMs of
// [tiles x in] x [in x out]), then Y = A^T M A: 16 multiply-adds per 2x2
// outputs instead of 36, 2.25x fewer. Its rounding stays within a few
// units of the direct sum's (the transforms' coefficients are 0, +-1 and
// +-1/2); F(4x4, 3x3)'s (4x fewer, coefficients up to 8) does not.
constexpr int64_t kWinogradPoints = 16;  // the 4x4 transformed tile
constexpr int64_t kWinogradOut = 2;      // output rows and columns per tile
// Tiles per block. Where the transformed weight (16 x in x out values) fits
// kWinogradBudget, it stays in the core's L2 from block to block, and a
// block's transformed inputs [16][tiles][in] and products [tiles][16][out]
// are sized to fit beside it. A larger weight streams from L3 or memory
// once per block: the blocks are then as long as kWinogradMaxTiles (a
// resnet's 14x14 and 7x7 maps at batch 1 in one block per thread), and
// only each point's slices of them need to stay in cache.
constexpr int64_t kWinogradBudget = 98304;
constexpr int64_t kWinogradMaxTiles = 64;

// Whether a stage packs a Winograd-transformed weight (so that engine 3 can
// run it that way): an ungrouped 3x3 stride-1 undilated Conv of at least 16
// input and output channels, in float32 or float64. Fewer channels (the
// first layer's 3) leave the products too small to pay for the transforms.
inline bool winograd_eligible(DType dtype, const ConvStage& st) {
  return (dtype == DType::Float32 || dtype == DType::Float64) && st.kind == ConvStageKind::Conv && st.groups == 1 &&
         st.kernel_h == 3 && st.kernel_w == 3 && st.stride_h == 1 && st.stride_w == 1 && st.dilation_h == 1 &&
         st.dilation_w == 1 && st.in_channels >= 16 && st.out_channels >= 16;
}

// Tiles per block for a Winograd stage of `in` input and `out` output channels.
inline int64_t winograd_block_tiles(int64_t in, int64_t out) {
  if (kWinogradPoints * in * out > kWinogradBudget) return kWinogradMaxTiles;
  return std::clamp<int64_t>(kWinogradBudget / (kWinogradPoints * (in + out)), 8, kWinogradMaxTiles);
}
// Scratch values a Winograd stage needs: a block's transformed inputs and
// products, and the ones and zeros its GEMMs' epilogue reads.
inline int64_t winograd_scratch_elems(int64_t in, int64_t out) {
  return kWinogradPoints * winograd_block_tiles(in, out) * (in + out) + 2 * (round_up(out, kPanelWidth) + kPanelWidth);
}

inline ConvDesc decode_conv_spec(const int64_t* spec, size_t spec_len, const double* fparams, size_t fparams_len) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("seqfuse: malformed conv spec: " + m); };
  if (spec_len < static_cast<size_t>(kConvSpecHeader)) fail("too short");
  if (spec[0] != kConvSpecVersion) fail("version " + std::to_string(spec[0]));
  if (spec[1] < 0 || spec[1] > 3) fail("dtype code " + std::to_string(spec[1]));
  ConvDesc d{};
  d.dtype = static_cast<DType>(spec[1]);
  d.flatten_stage = -1;
  const int64_t n = spec[2];
  if (n < 1 || n > kMaxStages) fail("stage count " + std::to_string(n));
  const size_t stage_values = spec_len - static_cast<size_t>(kConvSpecHeader);
  if (stage_values % kConvSpecPerStage != 0 || stage_values / kConvSpecPerStage != static_cast<size_t>(n))
    fail("length does not match stage count");
  if (fparams_len != static_cast<size_t>(kFParamsPerStage * n)) fail("fparams length does not match stage count");
  d.in_channels = spec[3];
  if (d.in_channels < 1 || d.in_channels > kMaxWidth) fail("in_channels out of range");
  const int64_t asize = accumulate_size(d.dtype);
  int64_t offset = 0, channels = d.in_channels;
  bool width_known = true;
  auto section_bytes = [&](int64_t bytes) {
    const int64_t at = offset;
    offset = round_up(offset + bytes, kSectionAlign);
    return at;
  };
  auto section = [&](int64_t elems) { return section_bytes(elems * asize); };
  auto in_range = [](int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* s = spec + kConvSpecHeader + kConvSpecPerStage * i;
    const std::string where = "stage " + std::to_string(i) + ": ";
    ConvStage st{};
    if (!in_range(s[0], 0, kNumConvStageKinds - 1)) fail(where + "kind " + std::to_string(s[0]));
    if (!in_range(s[2], 0, kNumActivations - 1)) fail(where + "activation " + std::to_string(s[2]));
    st.kind = static_cast<ConvStageKind>(s[0]);
    st.out_channels = s[1];
    st.activation = static_cast<Activation>(s[2]);
    st.flags = s[3];
    st.kernel_h = s[4], st.kernel_w = s[5], st.stride_h = s[6], st.stride_w = s[7];
    st.pad_top = s[8], st.pad_left = s[9], st.pad_bottom = s[10], st.pad_right = s[11];
    st.dilation_h = s[12], st.dilation_w = s[13];
    st.groups = st.kind == ConvStageKind::Conv ? s[14] : 1;
    st.divisor = st.kind == ConvStageKind::AvgPool ? s[14] : 0;
    st.options = s[15];
    st.alpha = fparams[kFParamsPerStage * i];
    st.eps = fparams[kFParamsPerStage * i + 1];
    st.weight_offset = st.scale_offset = st.shift_offset = st.winograd_offset = -1;
    st.in_channels = st.kind == ConvStageKind::Linear ? s[14] : channels;
    if (*stage_flags_error(st.flags)) fail(where + stage_flags_error(st.flags));
    if (!in_range(st.in_channels, 1, kMaxWidth) || !in_range(st.out_channels, 1, kMaxWidth))
      fail(where + "channels out of range");
    for (int64_t v : {st.kernel_h, st.kernel_w, st.stride_h, st.stride_w, st.dilation_h, st.dilation_w})
      if (!in_range(v, 1, kMaxKernel)) fail(where + "kernel, stride or dilation out of range");
    for (int64_t v : {st.pad_top, st.pad_left, st.pad_bottom, st.pad_right})
      if (!in_range(v, 0, kMaxKernel)) fail(where + "padding out of range");
    if (!in_range(st.divisor, 0, kMaxWidth) || !in_range(st.options, 0, kCeilMode | kCountIncludePad))
      fail(where + "pool options out of range");
    const bool after_flatten = d.flatten_stage >= 0;
    // After the Flatten the width is known only once a Linear or a
    // BatchNorm1d (checked against the flattened width at run time) sets it.
    if (after_flatten && !width_known && st.kind != ConvStageKind::Linear && st.kind != ConvStageKind::ScaleShift)
      fail(where + "stage between Flatten and the first Linear or BatchNorm");
    const bool sets_width = after_flatten && !width_known;
    switch (st.kind) {
      case ConvStageKind::Conv:
        if (after_flatten) fail(where + "Conv after Flatten");
        if (!in_range(st.groups, 1, st.in_channels) || st.in_channels % st.groups || st.out_channels % st.groups)
          fail(where + "groups do not divide the channels");
        break;
      case ConvStageKind::Linear:
        if (!after_flatten) fail(where + "Linear before Flatten");
        break;
      case ConvStageKind::Flatten:
        if (after_flatten) fail(where + "second Flatten");
        d.flatten_stage = i;
        width_known = false;
        break;
      case ConvStageKind::MaxPool:
      case ConvStageKind::AvgPool:
      case ConvStageKind::GlobalAvgPool:
        if (after_flatten) fail(where + "pooling after Flatten");
        [[fallthrough]];
      default:
        if (st.kind != ConvStageKind::Flatten && st.out_channels != channels && !sets_width)
          fail(where + "changes channels");
        break;
    }
    if (after_flatten) width_known = true;
    const bool windowed =
        st.kind == ConvStageKind::Conv || st.kind == ConvStageKind::MaxPool || st.kind == ConvStageKind::AvgPool;
    const bool pool = st.kind == ConvStageKind::MaxPool || st.kind == ConvStageKind::AvgPool;
    if (!windowed && (st.kernel_h != 1 || st.kernel_w != 1 || st.stride_h != 1 || st.stride_w != 1 || st.pad_top ||
                      st.pad_left || st.pad_bottom || st.pad_right || st.dilation_h != 1 || st.dilation_w != 1))
      fail(where + "window parameters on a stage without a window");
    if (st.kind == ConvStageKind::AvgPool && (st.dilation_h != 1 || st.dilation_w != 1))
      fail(where + "dilated average pool");
    if (!pool && st.options) fail(where + "pool options on a stage that is not a pool");
    if (st.kind == ConvStageKind::Flatten && st.activation != Activation::None) fail(where + "activation on Flatten");
    st.depthwise = st.kind == ConvStageKind::Conv && st.groups == st.in_channels && st.groups == st.out_channels;
    const int64_t padded = round_up(st.out_channels, kPanelWidth);
    if (st.has_weights()) {
      if (st.depthwise)  // [kernel_h * kernel_w][channels padded to a panel]
        st.weight_offset = section(st.kernel_h * st.kernel_w * padded);
      else if (packs_bf16_pairs(d.dtype, st))  // per group: [panel][reduction / 2][kPanelWidth][2], bfloat16
        st.weight_offset = section_bytes(st.groups * panel_count(st.out_channels / st.groups) * kPanelWidth *
                                         round_up(st.reduction(), 2) * 2);
      else  // per group: [panel][reduction][kPanelWidth]
        st.weight_offset = section(st.groups * panel_count(st.out_channels / st.groups) * kPanelWidth *
                                   st.reduction());
      if (winograd_eligible(d.dtype, st))  // [16 points][panel][in][kPanelWidth]
        st.winograd_offset = section(kWinogradPoints * panel_count(st.out_channels) * kPanelWidth * st.in_channels);
    }
    if (st.has_weights() || st.kind == ConvStageKind::ScaleShift) {
      if (st.kind == ConvStageKind::ScaleShift && !(st.flags & kHasBatchNorm)) fail(where + "ScaleShift without BatchNorm");
      // One panel of slack: a group's last panel may start anywhere in the row.
      st.scale_offset = section(padded + kPanelWidth);
      st.shift_offset = section(padded + kPanelWidth);
    } else if (st.flags) {
      fail(where + "flags on a stage without parameters");
    }
    channels = st.out_channels;
    d.stages.push_back(st);
  }
  d.out_channels = channels;
  d.packed_bytes = offset;
  return d;
}

// Per-stage shapes for an (in_h, in_w) input. Throws std::invalid_argument
// naming the stage when a window does not fit or a Linear's in_features
// differs from the flattened width (the caller reports eager's error).
inline ConvGeometry resolve_conv_geometry(const ConvDesc& d, int64_t in_h, int64_t in_w) {
  auto fail = [](size_t i, const std::string& m) {
    throw std::invalid_argument("seqfuse::conv_forward: stage " + std::to_string(i) + ": " + m);
  };
  if (in_h < 1 || in_w < 1 || in_h > kMaxSpatial || in_w > kMaxSpatial)
    throw std::invalid_argument("seqfuse::conv_forward: spatial size " + std::to_string(in_h) + "x" +
                                std::to_string(in_w) + " out of range");
  ConvGeometry g{};
  int64_t h = in_h, w = in_w, c = d.in_channels;
  g.max_image_elems = h * w * c;
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const ConvStage& st = d.stages[i];
    const MapShape<int64_t> o = stage_output_shape<int64_t>(st, c, h, w);
    StageShape s{h, w, c, o.out_h, o.out_w, o.out_c};
    switch (st.kind) {
      case ConvStageKind::Conv:
      case ConvStageKind::MaxPool:
      case ConvStageKind::AvgPool:
        if (s.out_h < 1 || s.out_w < 1)
          fail(i, "input " + std::to_string(h) + "x" + std::to_string(w) + " is smaller than the window");
        break;
      case ConvStageKind::Linear:
        if (c != st.in_channels)
          fail(i, "flattened width " + std::to_string(c) + " differs from in_features " +
                      std::to_string(st.in_channels));
        break;
      case ConvStageKind::ScaleShift:
        if (c != st.out_channels)  // a BatchNorm1d straight after the Flatten
          fail(i, "flattened width " + std::to_string(c) + " differs from num_features " +
                      std::to_string(st.out_channels));
        break;
      default: break;
    }
    g.macs_per_image += s.out_pixels() * (st.has_weights() ? s.out_c * st.reduction()
                                          : st.kind == ConvStageKind::MaxPool || st.kind == ConvStageKind::AvgPool
                                              ? s.out_c * st.kernel_h * st.kernel_w
                                              : s.out_c);
    g.max_image_elems = std::max(g.max_image_elems, s.out_elems());
    h = s.out_h, w = s.out_w, c = s.out_c;
    g.stages.push_back(s);
  }
  return g;
}

// Marks the stages of `g` that have a Winograd weight to run as Winograd
// tiles (engine 3); the rest run as they would on engine 0.
inline void select_winograd(const ConvDesc& d, ConvGeometry& g) {
  for (size_t i = 0; i < d.stages.size(); ++i) g.stages[i].winograd = d.stages[i].winograd_offset >= 0;
}

// Output tiles of a stage that runs as Winograd tiles, per image: ceil(h/2) x ceil(w/2).
inline int64_t winograd_tile_rows(const StageShape& s) { return (s.out_h + kWinogradOut - 1) / kWinogradOut; }
inline int64_t winograd_tile_cols(const StageShape& s) { return (s.out_w + kWinogradOut - 1) / kWinogradOut; }

}  // namespace seqfuse::kernels
