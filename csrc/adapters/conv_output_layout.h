// The memory format of a conv run's output: the one eager's chain of modules
// would give. Shared by the CPU and CUDA adapters of seqfuse::conv_forward
// and its Meta kernel (ops/meta.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/conv_spec.h"
#include "adapters/spec_adapter.h"

namespace seqfuse {

// The output memory format eager gives, found by following the layout of
// eager's intermediate tensors stage by stage: a convolution's output is
// channels_last when its input or its weight is (ATen's oneDNN and cuDNN
// rule, but for float64 on CUDA); pools
// keep their input's layout; an elementwise op (BatchNorm, activation) on a
// channels_last tensor that is also contiguous (one channel, or a 1x1 map)
// produces a contiguous one. Tested against eager on random chains.
//
// `shapes[i]` is stage i's output (out_c, out_h, out_w: kernels::StageShape,
// or kernels::MapShape of symbolic sizes); `on_cuda` the device the run is on
// (a Meta kernel does not know it and passes false: float64 runs on CUDA
// then promise channels_last where the real call returns NCHW).
template <typename Shapes>
bool output_channels_last(const kernels::ConvDesc& d, const Shapes& shapes, const at::Tensor& input,
                          at::TensorList weights, bool on_cuda) {
  bool cl = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  size_t conv_index = 0;
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const kernels::ConvStage& st = d.stages[i];
    const auto& s = shapes[i];
    if (st.kind == kernels::ConvStageKind::Flatten || st.kind == kernels::ConvStageKind::Linear) break;
    if (st.kind == kernels::ConvStageKind::Conv) {
      const bool weight_cl = conv_index < weights.size() && weights[conv_index].dim() == 4 &&
                             weights[conv_index].suggest_memory_format() == at::MemoryFormat::ChannelsLast;
      ++conv_index;
      cl = cl || weight_cl;
      // ATen's float64 depthwise kernel returns a 1x1 map contiguous; on
      // CUDA every float64 convolution returns NCHW (cuDNN's format rule).
      if (d.dtype == kernels::DType::Float64 && st.depthwise && s.out_h * s.out_w == 1) cl = false;
      if (d.dtype == kernels::DType::Float64 && on_cuda) cl = false;
    }
    const bool elementwise = st.kind == kernels::ConvStageKind::ScaleShift ||
                             st.kind == kernels::ConvStageKind::Pointwise || (st.flags & kernels::kHasBatchNorm) ||
                             st.activation != kernels::Activation::None;
    if (elementwise && (s.out_c == 1 || s.out_h * s.out_w == 1)) cl = false;
  }
  return cl;
}

// What every device's seqfuse::conv_forward starts with: the decoded spec,
// the geometry for the input (checked), the packed buffer and the engine
// checked, and the output's sizes and eager's memory format.
struct ConvForwardStart {
  kernels::ConvDesc d;
  kernels::ConvGeometry g;
  bool flat;                      // a Flatten: (N, F) rows out
  bool channels_last;             // eager's output memory format
  std::vector<int64_t> out_sizes;  // (N, F) or (N, C, H, W)
  at::TensorOptions out_options(const at::Tensor& input) const {
    return input.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                       : at::MemoryFormat::Contiguous);
  }
};

inline ConvForwardStart start_conv_forward(const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                                           at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t engine) {
  ConvForwardStart c{decode_conv_spec(spec, fparams), {}, false, false, {}};
  c.g = conv_geometry(c.d, input);
  check_packed("seqfuse::conv_forward", packed, input, c.d.packed_bytes);
  TORCH_CHECK_VALUE(engine >= kernels::kEngineFused && engine <= kernels::kEngineWinograd,
                    "seqfuse::conv_forward: unknown engine ", engine);
  const kernels::StageShape& last = c.g.stages.back();
  c.flat = c.d.flatten_stage >= 0;
  c.channels_last = !c.flat && output_channels_last(c.d, c.g.stages, input, weights, input.is_cuda());
  c.out_sizes = c.flat ? std::vector<int64_t>{input.size(0), last.out_c}
                       : std::vector<int64_t>{input.size(0), last.out_c, last.out_h, last.out_w};
  return c;
}

}  // namespace seqfuse
