// The description of a fused MLP run that Python, the op adapters and the
// kernels share: the integer "spec" list carried by the seqfuse::mlp_* ops,
// decoded in one place, and the byte layout of the packed parameter buffer.
//
// spec = [kSpecVersion, dtype, n_stages, in_features,
//         then per stage: kind, out_features, activation, flags]
// fparams = per stage: [activation alpha, batchnorm eps]
//
// A stage is one of
//   Linear      y = act((x @ W^T) * scale + shift)   (bias and an eval BatchNorm folded
//                                                     into per-channel scale/shift)
//   ScaleShift  y = act(x * scale + shift)           (a BatchNorm not after a Linear)
//   Pointwise   y = act(x)                           (an activation not after a stage)
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "activation_table.h"

namespace seqfuse::kernels {

constexpr int64_t kSpecVersion = 1;
constexpr int64_t kSpecHeader = 4;
constexpr int64_t kSpecPerStage = 4;
constexpr int64_t kFParamsPerStage = 2;

// Bounds that keep every size computed from a spec far from int64 overflow
// (a width of 2^24 and 2^16 stages still size buffers below 2^60 bytes).
constexpr int64_t kMaxWidth = int64_t{1} << 24;
constexpr int64_t kMaxStages = int64_t{1} << 16;

// Weight panels hold this many output columns, whatever the ISA, so a packed
// buffer is valid for every kernel variant.
constexpr int64_t kPanelWidth = 16;
constexpr int64_t kSectionAlign = 64;

// Float16 is served by the CUDA kernels only (the CPU adapters reject it; packing accepts it).
enum class DType : int64_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };
enum class StageKind : int64_t { Linear = 0, ScaleShift = 1, Pointwise = 2 };
// Activation and kNumActivations: activation_table.h.

// float32 GELU (erf form) at +inf: eager's value depends on the CPU kernel
// ATen dispatches to (its AVX-512 erf gives NaN there, its AVX2 one and the
// exact formula +inf). The Python front asks eager once at import and sets
// it, so the fused kernels give eager's value on every machine. (float64 and
// the CUDA kernels give +inf, as eager does.)
inline std::atomic<float> gelu_erf_at_pos_inf{__builtin_inff()};

// The `engine` argument of seqfuse::mlp_forward / conv_forward (csrc/ops/schema.cpp).
enum Engine : int64_t {
  kEngineFused = 0,         // the fused kernels: every stage in one pass
  kEngineGemmEpilogue = 1,  // ATen's GEMM / convolution per Linear / Conv2d + the fused epilogue
  kEngineAtenLayout = 2,    // conv runs: ATen in the input's own layout + the epilogue in place
  kEngineWinograd = 3,      // conv runs: engine 0, the 3x3 stages with a Winograd weight as Winograd tiles
};

// Stage flags: which inputs the packing op receives for the stage.
constexpr int64_t kHasBias = 1;       // Linear bias
constexpr int64_t kHasBatchNorm = 2;  // a BatchNorm after the product (folded into scale/shift for inference)
constexpr int64_t kBatchNormAffine = 4;
// Training-op flags of a BatchNorm (only the seqfuse::*_train_forward ops accept
// kBatchStats; the inference ops read the running statistics regardless):
constexpr int64_t kBatchStats = 8;     // normalize with the batch's statistics (training, or no running stats)
constexpr int64_t kRunningStats = 16;  // running statistics are given: read without kBatchStats, updated with it
constexpr int64_t kKnownStageFlags = kHasBias | kHasBatchNorm | kBatchNormAffine | kBatchStats | kRunningStats;

// Checks the flag combinations both spec decoders accept; "" when valid.
inline const char* stage_flags_error(int64_t flags) {
  if (flags & ~kKnownStageFlags) return "unknown stage flags";
  if ((flags & (kBatchNormAffine | kBatchStats | kRunningStats)) && !(flags & kHasBatchNorm))
    return "BatchNorm flags without a BatchNorm";
  return "";
}

struct StageDesc {
  StageKind kind;
  int64_t in_features;
  int64_t out_features;
  Activation activation;
  int64_t flags;
  double alpha;  // LeakyReLU negative slope
  double eps;   // BatchNorm eps
  // Byte offsets into the packed buffer (-1 when the stage has no such section).
  int64_t weight_offset;
  int64_t scale_offset;
  int64_t shift_offset;
};

struct MlpDesc {
  DType dtype;
  int64_t in_features;
  int64_t out_features;
  int64_t max_width;  // widest activation row a stage reads or writes, padded to a panel
  int64_t packed_bytes;
  int64_t macs_per_row;  // multiply-adds (elementwise stages count one per value): the size of a call
  bool has_linear;
  std::vector<StageDesc> stages;
};

inline int64_t element_size(DType d) { return d == DType::Float32 ? 4 : d == DType::Float64 ? 8 : 2; }
// Scale/shift are kept in the accumulate type: float for bfloat16.
inline int64_t accumulate_size(DType d) { return d == DType::Float64 ? 8 : 4; }
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t panel_count(int64_t out_features) { return (out_features + kPanelWidth - 1) / kPanelWidth; }

// Decodes and validates a spec; computes the packed layout. Throws
// std::invalid_argument with a readable message on a malformed spec.
inline MlpDesc decode_mlp_spec(const int64_t* spec, size_t spec_len, const double* fparams,
                               size_t fparams_len) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("seqfuse: malformed mlp spec: " + m); };
  if (spec_len < static_cast<size_t>(kSpecHeader)) fail("too short");
  if (spec[0] != kSpecVersion) fail("version " + std::to_string(spec[0]));
  if (spec[1] < 0 || spec[1] > 3) fail("dtype code " + std::to_string(spec[1]));
  MlpDesc d{};
  d.dtype = static_cast<DType>(spec[1]);
  const int64_t n = spec[2];
  if (n < 1) fail("no stages");
  if (n > kMaxStages) fail("more than " + std::to_string(kMaxStages) + " stages");
  // Divide rather than multiply: a huge n must not overflow before it is rejected.
  const size_t stage_values = spec_len - static_cast<size_t>(kSpecHeader);
  if (stage_values % kSpecPerStage != 0 || stage_values / kSpecPerStage != static_cast<size_t>(n))
    fail("length does not match stage count");
  if (fparams_len != static_cast<size_t>(kFParamsPerStage * n)) fail("fparams length does not match stage count");
  d.in_features = spec[3];
  if (d.in_features < 1 || d.in_features > kMaxWidth) fail("in_features out of range");
  const int64_t esize = element_size(d.dtype), asize = accumulate_size(d.dtype);
  int64_t offset = 0, width = d.in_features, max_width = round_up(d.in_features, kPanelWidth);
  auto section = [&](int64_t bytes) {
    int64_t at = offset;
    offset = round_up(offset + bytes, kSectionAlign);
    return at;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* s = spec + kSpecHeader + kSpecPerStage * i;
    StageDesc st{};
    if (s[0] < 0 || s[0] > 2) fail("stage kind " + std::to_string(s[0]));
    if (s[2] < 0 || s[2] >= kNumActivations) fail("activation code " + std::to_string(s[2]));
    st.kind = static_cast<StageKind>(s[0]);
    st.in_features = width;
    st.out_features = s[1];
    st.activation = static_cast<Activation>(s[2]);
    st.flags = s[3];
    st.alpha = fparams[kFParamsPerStage * i];
    st.eps = fparams[kFParamsPerStage * i + 1];
    st.weight_offset = st.scale_offset = st.shift_offset = -1;
    if (st.kind != StageKind::Linear && st.out_features != width) fail("elementwise stage changes width");
    if (st.out_features < 1 || st.out_features > kMaxWidth) fail("out_features out of range");
    if (*stage_flags_error(st.flags)) fail(stage_flags_error(st.flags));
    const int64_t padded = round_up(st.out_features, kPanelWidth);
    if (st.kind == StageKind::Linear) {
      st.weight_offset = section(panel_count(st.out_features) * kPanelWidth * width * esize);
    }
    if (st.kind != StageKind::Pointwise) {
      st.scale_offset = section(padded * asize);
      st.shift_offset = section(padded * asize);
    }
    d.macs_per_row += st.kind == StageKind::Linear ? st.in_features * st.out_features : st.out_features;
    d.has_linear = d.has_linear || st.kind == StageKind::Linear;
    width = st.out_features;
    if (padded > max_width) max_width = padded;
    d.stages.push_back(st);
  }
  d.out_features = width;
  d.max_width = max_width;
  d.packed_bytes = offset;
  return d;
}

// Workspace (accumulate-type values) of a tile of `rows` rows: two
// activation buffers of rows x max_width, and for bfloat16 the rows rounded
// to bfloat16 for a Linear (rows x max_width bfloat16, max_width even).
inline int64_t mlp_workspace_elems(const MlpDesc& d, int64_t rows) {
  return 2 * rows * d.max_width + (d.dtype == DType::BFloat16 ? rows * d.max_width / 2 + 16 : 0);
}

}  // namespace seqfuse::kernels
