// The Meta kernels of the seqfuse ops: output shapes, dtypes and memory
// formats without computing anything, for torch.compile, torch.export and
// opcheck (FakeTensor runs these). They reuse the rules the real kernels use
// (the spec decoders, kernels::stage_output_shapes, output_channels_last),
// on symbolic sizes where torch.compile / export make a dimension dynamic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "adapters/conv_output_layout.h"
#include "adapters/spec_adapter.h"
#include "train/train_run.h"

namespace seqfuse {
namespace {

at::Tensor packed_meta(int64_t bytes, at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "seqfuse: a packing op needs the run's tensors");
  return at::empty({bytes}, tensors[0].options().dtype(at::kByte));
}

at::Tensor mlp_pack_meta(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  return packed_meta(decode_mlp_spec(spec, fparams).packed_bytes, tensors);
}

at::Tensor conv_pack_meta(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  return packed_meta(decode_conv_spec(spec, fparams).packed_bytes, tensors);
}

at::Tensor mlp_forward_meta(const at::Tensor& input, const at::Tensor& /*packed*/, at::TensorList /*weights*/,
                            at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t /*engine*/) {
  const kernels::MlpDesc d = decode_mlp_spec(spec, fparams);
  TORCH_CHECK(input.scalar_type() == scalar_type_of(d.dtype), "seqfuse::mlp_forward: input dtype ",
              input.scalar_type(), " does not match the fused parameters' dtype ", scalar_type_of(d.dtype));
  TORCH_CHECK(input.dim() >= 1, "seqfuse::mlp_forward: input must have at least 1 dimension");
  TORCH_SYM_CHECK(input.sym_size(-1).sym_eq(d.in_features), "seqfuse::mlp_forward: input shape ",
                  input.sym_sizes(), " does not end in in_features=", d.in_features);
  std::vector<c10::SymInt> sizes(input.sym_sizes().begin(), input.sym_sizes().end());
  sizes.back() = d.out_features;
  return at::empty_symint(sizes, input.options());
}

at::Tensor conv_forward_meta(const at::Tensor& input, const at::Tensor& /*packed*/, at::TensorList weights,
                             at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t /*engine*/) {
  const kernels::ConvDesc d = decode_conv_spec(spec, fparams);
  TORCH_CHECK(input.scalar_type() == scalar_type_of(d.dtype), "seqfuse::conv_forward: input dtype ",
              input.scalar_type(), " does not match the fused parameters' dtype ", scalar_type_of(d.dtype));
  TORCH_CHECK_VALUE(input.dim() == 4, "seqfuse::conv_forward: expected 4-D (N, C, H, W) input, got shape ",
                    input.sym_sizes());
  TORCH_SYM_CHECK(input.sym_size(1).sym_eq(d.in_channels), "seqfuse::conv_forward: expected input with ",
                  d.in_channels, " channels, got shape ", input.sym_sizes());
  const std::vector<kernels::MapShape<c10::SymInt>> shapes =
      kernels::stage_output_shapes<c10::SymInt>(d, input.sym_size(1), input.sym_size(2), input.sym_size(3));
  for (const auto& s : shapes)
    TORCH_SYM_CHECK(s.out_h.sym_ge(1).sym_and(s.out_w.sym_ge(1)), "seqfuse::conv_forward: input of shape ",
                    input.sym_sizes(), " is smaller than a stage's window");
  const auto& last = shapes.back();
  if (d.flatten_stage >= 0) return at::empty_symint({input.sym_size(0), last.out_c}, input.options());
  // The device is not known here (the tensors are meta): the CPU rule.
  const bool cl = output_channels_last(d, shapes, input, weights, /*on_cuda=*/false);
  return at::empty_symint({input.sym_size(0), last.out_c, last.out_h, last.out_w}, input.options(),
                          cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// The training forward's epilogue backend (train/train_run.h) for the Meta
// kernels: the walk itself runs (the same ATen ops on meta tensors, the same
// choice of what is saved), the backend only allocates what it returns.
struct MetaEpilogue {
  template <typename T>
  static at::Tensor batch_statistics(const kernels::ChannelLayout& l, const T*, const T*, double,
                                     const at::TensorOptions& opts) {
    return at::empty({4, l.channels}, opts);
  }
  template <typename T>
  static at::Tensor running_statistics(const T*, const T*, const T*, int64_t channels, double,
                                       const at::TensorOptions& opts) {
    return at::empty({2, channels}, opts);
  }
  template <typename T>
  static std::pair<at::Tensor, at::Tensor> bn_scale_shift(const T*, const T*, const T*, int64_t channels,
                                                          const at::TensorOptions& opts) {
    return {at::empty({channels}, opts), at::empty({channels}, opts)};
  }
  template <typename T>
  static void epilogue_forward(const kernels::ChannelLayout&, const T*, const T*, const T*, const T*,
                               kernels::Activation, double, T*, T*) {}
};

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_train_forward_meta(const at::Tensor& input,
                                                                       at::TensorList params, at::TensorList running,
                                                                       at::IntArrayRef spec,
                                                                       at::ArrayRef<double> fparams) {
  return train::train_forward<MetaEpilogue>(train::mlp_run(spec, fparams), input, params, running);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> conv_train_forward_meta(const at::Tensor& input,
                                                                        at::TensorList params,
                                                                        at::TensorList running, at::IntArrayRef spec,
                                                                        at::ArrayRef<double> fparams) {
  return train::train_forward<MetaEpilogue>(train::conv_run(spec, fparams), input, params, running);
}

// The gradients the backward ops return: like the input and each parameter
// where grad_mask asks for one, else empty.
std::tuple<at::Tensor, std::vector<at::Tensor>> backward_meta(const at::Tensor& /*grad_output*/,
                                                              const at::Tensor& input, const at::Tensor& /*output*/,
                                                              at::TensorList /*saved*/, at::TensorList params,
                                                              at::IntArrayRef /*spec*/,
                                                              at::ArrayRef<double> /*fparams*/,
                                                              const c10::List<bool>& grad_mask) {
  TORCH_CHECK_VALUE(grad_mask.size() == params.size() + 1, "seqfuse: grad_mask needs one entry for the input and ",
                    "one per parameter, got ", grad_mask.size(), " for ", params.size(), " parameters");
  at::Tensor grad_input = grad_mask.get(0) ? at::empty_like(input) : at::empty({0}, input.options());
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < params.size(); ++i)
    grads.push_back(grad_mask.get(i + 1) ? at::empty_like(params[i]) : at::empty({0}, params[i].options()));
  return {grad_input, grads};
}

void update_running_stats_meta(at::TensorList, at::TensorList, at::ArrayRef<double>) {}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, Meta, m) {
  m.impl("mlp_pack", &mlp_pack_meta);
  m.impl("conv_pack", &conv_pack_meta);
  m.impl("mlp_forward", &mlp_forward_meta);
  m.impl("conv_forward", &conv_forward_meta);
  m.impl("mlp_train_forward", &mlp_train_forward_meta);
  m.impl("conv_train_forward", &conv_train_forward_meta);
  m.impl("mlp_backward", &backward_meta);
  m.impl("conv_backward", &backward_meta);
  m.impl("update_running_stats", &update_running_stats_meta);
}

}  // namespace seqfuse
