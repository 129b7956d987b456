// The training ops' walk over a run's stages (seqfuse::{mlp,conv}_train_forward
// and seqfuse::{mlp,conv}_backward), written once for every device: one walk
// serves both spec kinds. Each Linear / Conv2d product runs in ATen's GEMM /
// convolution (MKL / oneDNN on the CPU, cuBLAS / cuDNN on CUDA); around it,
// bias, BatchNorm (batch or running statistics) and the activation run as one
// fused epilogue pass forward, and as one reduce pass (plus one apply pass with
// BatchNorm) backward. Pools use ATen's kernels and their backward.
//
// What differs by device is the epilogue backend `B`: a class of static
// member templates over T (float or double, the run's dtype) doing the
// per-channel work around the products. Pointers are B's device pointers to
// dense data, null where optional and absent; `l` is the [outer][C][inner]
// view of the stage's activation (adapters/channel_layout.h); `opts` the options
// (dtype, device) of the tensors a call returns.
//
//   using Sums;  a pass's per-channel double sums, [n][C] (opaque to the walk)
//   at::Tensor batch_statistics<T>(l, z, bias, eps, opts)
//       [4, C]: {center, invstd, batch mean + bias, unbiased batch variance}
//       of z, its moments centered (about each channel's first value) in double
//   at::Tensor running_statistics<T>(running_mean, running_var, bias, C, eps, opts)
//       [2, C]: {running_mean - bias, 1 / sqrt(running_var + eps)}
//   std::pair<at::Tensor, at::Tensor> bn_scale_shift<T>(gamma, beta, invstd, C, opts)
//       [C] scale = gamma * invstd, [C] shift = beta (gamma 1, beta 0 when null)
//   void epilogue_forward<T>(l, z, center, scale, shift, act, alpha, pre, out)
//       y = (z - center) * scale + shift into `pre` (if given), act(y) into `out`
//   Sums backward_reduce<T>(l, g, act, alpha, source, src, z, scale, shift, center, dy, reduce, opts)
//       dy = g * act'(.); with `reduce` row 0 sums dy and, with a center,
//       row 1 sums dy * (z - center)
//   BnGradCoefficients bn_backward_coefficients<T>(sums, C, invstd, gamma, count, opts)
//       k_dy = invstd * gamma; count > 0 (batch statistics over count values):
//       k_mean = sums[0] / count, k_xc = sums[1] * invstd^2 / count
//   Sums batchnorm_backward_apply<T>(l, dy, z, center, k_mean, k_xc, k_dy, dz, reduce, opts)
//       dz = (dy - k_mean - (z - center) * k_xc) * k_dy; row 0 sums dz with `reduce`
//   at::Tensor grad_from_sums<T>(sums, row, factor, C, opts)
//       [C] sums[row] (times factor[c] when given), rounded to T
//
// The math of each is kernels/train_epilogue.h's: adapters/cpu/train_cpu.cpp's backend
// runs those torch-free cores over threads; adapters/cuda/train_backend.h's launches
// the device kernels of kernels/cuda/train_epilogue.cuh (on the current CUDA
// stream from adapters/cuda/train_cuda.cu; under the SIMT emulation with CPU tensors
// from tests/cpp/train_simt_backend.cpp).
//
// The forward returns, next to the output, what the backward reads; per
// stage i three entries (empty tensors where a stage has none):
//   saved[3i]     the stage output a_i, for every stage but the last (the
//                 op's output) and an epilogue-free Flatten (a view: rebuilt);
//   saved[3i + 1] the product / pool output z_i when the backward needs it
//                 and the stage output does not give it: with a BatchNorm
//                 (the input it normalized), or before an activation whose
//                 derivative needs its argument (then holding y = z + bias);
//   saved[3i + 2] BatchNorm: [2, C] {center, invstd}, where center is the
//                 mean the stage subtracted from z (batch mean, or
//                 running_mean - bias), and with batch statistics two more
//                 rows, the batch mean (bias included) and unbiased variance
//                 that seqfuse::update_running_stats folds into the running
//                 buffers; MaxPool: the argmax indices.
// The forward mutates nothing: the caller updates the running statistics
// after a successful call.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "adapters/channel_layout.h"
#include "kernels/conv_spec.h"
#include "kernels/train_epilogue.h"
#include "adapters/spec_adapter.h"

namespace seqfuse::train {

using kernels::Activation;
using kernels::ActSource;
using kernels::ChannelLayout;
using kernels::ConvStage;
using kernels::ConvStageKind;

constexpr int64_t kSavedPerStage = 3;

// A run of stages in the conv spec's terms (MLP stages map onto Linear,
// ScaleShift and Pointwise); `rows`: an MLP run over the input's last dim.
struct TrainRun {
  const char* forward_name;
  const char* backward_name;
  kernels::DType dtype;
  bool rows;
  int64_t in_channels;
  std::vector<ConvStage> stages;
};

// What a backend's bn_backward_coefficients returns (k_mean and k_xc
// undefined with running statistics).
struct BnGradCoefficients {
  at::Tensor k_dy, k_mean, k_xc;
};

// A stage that computes nothing (an activation-free Pointwise, a ScaleShift
// without its BatchNorm) would have no output of its own to save: the
// training ops refuse it (the planner never emits one).
inline void check_trainable(const TrainRun& run) {
  for (size_t i = 0; i < run.stages.size(); ++i) {
    const ConvStage& st = run.stages[i];
    TORCH_CHECK_VALUE(!(st.kind == ConvStageKind::Pointwise && st.activation == Activation::None) &&
                          !(st.kind == ConvStageKind::ScaleShift && !(st.flags & kernels::kHasBatchNorm)),
                      run.forward_name, ": stage ", i, " computes nothing (a Pointwise without activation or a ",
                      "ScaleShift without BatchNorm)");
  }
}

inline TrainRun mlp_run(at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  const kernels::MlpDesc d = decode_mlp_spec(spec, fparams);
  TrainRun run{"seqfuse::mlp_train_forward", "seqfuse::mlp_backward", d.dtype, true, d.in_features, {}};
  for (const kernels::StageDesc& s : d.stages) {
    ConvStage st{};
    st.kind = s.kind == kernels::StageKind::Linear       ? ConvStageKind::Linear
              : s.kind == kernels::StageKind::ScaleShift ? ConvStageKind::ScaleShift
                                                         : ConvStageKind::Pointwise;
    st.in_channels = s.in_features;
    st.out_channels = s.out_features;
    st.activation = s.activation;
    st.flags = s.flags;
    st.alpha = s.alpha;
    st.eps = s.eps;
    st.groups = 1;
    run.stages.push_back(st);
  }
  check_trainable(run);
  return run;
}

inline TrainRun conv_run(at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  kernels::ConvDesc d = decode_conv_spec(spec, fparams);
  TrainRun run{"seqfuse::conv_train_forward", "seqfuse::conv_backward", d.dtype, false, d.in_channels,
               std::move(d.stages)};
  check_trainable(run);
  return run;
}

// Checks the input's shape against the run and returns each stage's output
// element count (the forward and the backward check the same way).
inline std::vector<int64_t> stage_sizes(const TrainRun& run, const at::Tensor& input, const char* op) {
  std::vector<int64_t> sizes;
  if (run.rows) {
    TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == run.in_channels, op, ": input of shape ",
                      input.sizes(), " does not end in ", run.in_channels, " features");
    const int64_t rows = input.numel() / run.in_channels;
    for (const ConvStage& st : run.stages) sizes.push_back(rows * st.out_channels);
    return sizes;
  }
  TORCH_CHECK_VALUE(input.dim() == 4 && input.size(0) > 0 && input.size(1) == run.in_channels, op,
                    ": expected (N > 0, ", run.in_channels, ", H, W) input, got ", input.sizes());
  kernels::ConvDesc d{};
  d.stages = run.stages;
  d.in_channels = run.in_channels;
  d.flatten_stage = -1;
  for (size_t i = 0; i < run.stages.size(); ++i)
    if (run.stages[i].kind == ConvStageKind::Flatten) d.flatten_stage = static_cast<int64_t>(i);
  kernels::ConvGeometry g;
  try {
    g = kernels::resolve_conv_geometry(d, input.size(2), input.size(3));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, op, ": input of shape ", input.sizes(), ": ", e.what());
  }
  for (const kernels::StageShape& sh : g.stages) sizes.push_back(input.size(0) * sh.out_elems());
  return sizes;
}

// stage_sizes for the forward, which also runs as the ops' Meta kernel
// (ops/meta.cpp) on symbolic sizes (torch.compile, torch.export with dynamic
// dimensions): the same rules on c10::SymInt, their checks as guards.
inline std::vector<c10::SymInt> stage_sym_sizes(const TrainRun& run, const at::Tensor& input, const char* op) {
  std::vector<c10::SymInt> sizes;
  if (!input.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    for (int64_t s : stage_sizes(run, input, op)) sizes.emplace_back(s);
    return sizes;
  }
  if (run.rows) {
    TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least 1 dimension");
    TORCH_SYM_CHECK(input.sym_size(-1).sym_eq(run.in_channels), op, ": input of shape ", input.sym_sizes(),
                    " does not end in ", run.in_channels, " features");
    const c10::SymInt rows = input.sym_numel() / run.in_channels;
    for (const ConvStage& st : run.stages) sizes.push_back(rows * st.out_channels);
    return sizes;
  }
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected (N > 0, ", run.in_channels, ", H, W) input, got ",
                    input.sym_sizes());
  TORCH_SYM_CHECK(input.sym_size(0).sym_gt(0).sym_and(input.sym_size(1).sym_eq(run.in_channels)), op,
                  ": expected (N > 0, ", run.in_channels, ", H, W) input, got ", input.sym_sizes());
  kernels::ConvDesc d{};
  d.stages = run.stages;
  for (const auto& s : kernels::stage_output_shapes<c10::SymInt>(d, input.sym_size(1), input.sym_size(2),
                                                                  input.sym_size(3))) {
    TORCH_SYM_CHECK(s.out_h.sym_ge(1).sym_and(s.out_w.sym_ge(1)), op, ": input of shape ", input.sym_sizes(),
                    " is smaller than a stage's window");
    sizes.push_back(input.sym_size(0) * s.out_c * s.out_h * s.out_w);
  }
  return sizes;
}

inline bool has_bn(const ConvStage& st) { return st.flags & kernels::kHasBatchNorm; }
inline bool batch_stats(const ConvStage& st) { return has_bn(st) && (st.flags & kernels::kBatchStats); }
inline bool has_bias(const ConvStage& st) { return st.has_weights() && (st.flags & kernels::kHasBias); }
inline bool is_pool(const ConvStage& st) {
  return st.kind == ConvStageKind::MaxPool || st.kind == ConvStageKind::AvgPool ||
         st.kind == ConvStageKind::GlobalAvgPool;
}
// The stage computes a fresh tensor before its epilogue (z is its own).
inline bool owns_product(const ConvStage& st) { return st.has_weights() || is_pool(st); }
inline bool has_epilogue(const ConvStage& st) {
  return has_bn(st) || has_bias(st) || st.activation != Activation::None;
}

// A stage's parameters and buffers, with their positions in the params list.
struct StageParams {
  at::Tensor weight, bias, gamma, beta, running_mean, running_var;
  int64_t weight_at = -1, bias_at = -1, gamma_at = -1, beta_at = -1;
};

// Binds the params list (per stage: Conv/Linear weight, [bias], then
// [BatchNorm weight, bias] when affine) and, when given, the running list
// (per BatchNorm normalizing with running statistics: running_mean,
// running_var), checking each tensor against the spec.
inline std::vector<StageParams> bind_params(const TrainRun& run, const char* op, at::TensorList params,
                                            const at::TensorList* running, const at::Tensor& input) {
  const at::ScalarType dtype = scalar_type_of(run.dtype);
  size_t next_param = 0, next_buffer = 0;
  auto take = [&](at::TensorList list, size_t& next, int64_t stage, const char* what, std::vector<int64_t> shape,
                  at::ScalarType type) {
    TORCH_CHECK_VALUE(next < list.size(), op, ": stage ", stage, " needs a ", what, " but the list ended after ",
                      list.size());
    const at::Tensor& t = list[next++];
    TORCH_CHECK_VALUE(t.device() == input.device(), op, ": stage ", stage, " ", what, " is on ", t.device(),
                      ", the input on ", input.device());
    TORCH_CHECK_TYPE(t.scalar_type() == type, op, ": stage ", stage, " ", what, " has dtype ", t.scalar_type(),
                     ", expected ", type);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": stage ", stage, " ", what, " has shape ",
                      t.sizes(), ", expected ", at::IntArrayRef(shape));
    return t;
  };
  std::vector<StageParams> out(run.stages.size());
  for (size_t i = 0; i < run.stages.size(); ++i) {
    const ConvStage& st = run.stages[i];
    const int64_t si = static_cast<int64_t>(i), n = st.out_channels;
    StageParams& p = out[i];
    if (st.has_weights()) {
      std::vector<int64_t> shape{n, st.in_channels};
      if (st.kind == ConvStageKind::Conv) shape = {n, st.in_channels / st.groups, st.kernel_h, st.kernel_w};
      p.weight_at = static_cast<int64_t>(next_param);
      p.weight = take(params, next_param, si, "weight", shape, dtype);
      if (has_bias(st)) {
        p.bias_at = static_cast<int64_t>(next_param);
        p.bias = take(params, next_param, si, "bias", {n}, dtype);
      }
    }
    if (!has_bn(st)) continue;
    if (st.flags & kernels::kBatchNormAffine) {
      p.gamma_at = static_cast<int64_t>(next_param);
      p.gamma = take(params, next_param, si, "batchnorm weight", {n}, dtype);
      p.beta_at = static_cast<int64_t>(next_param);
      p.beta = take(params, next_param, si, "batchnorm bias", {n}, dtype);
    }
    TORCH_CHECK_VALUE(st.flags & (kernels::kBatchStats | kernels::kRunningStats), op, ": stage ", si,
                      " BatchNorm has neither batch statistics nor running statistics");
    if (running && !batch_stats(st)) {
      p.running_mean = take(*running, next_buffer, si, "running_mean", {n}, dtype);
      p.running_var = take(*running, next_buffer, si, "running_var", {n}, dtype);
    }
  }
  TORCH_CHECK_VALUE(next_param == params.size(), op, ": got ", params.size(), " parameters, the spec uses ",
                    next_param);
  TORCH_CHECK_VALUE(!running || next_buffer == running->size(), op, ": got ", running->size(),
                    " running statistics, the spec uses ", next_buffer);
  return out;
}

// NCHW-contiguous and channels_last maps and (N, C) rows as they are; any
// other strides are made contiguous first.
inline at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast))) return t;
  return t.contiguous();
}

// `t` with the strides of `like` (copying when they differ): what the Meta
// kernels promise for gradients (empty_like of the input / parameter).
inline at::Tensor strided_like(const at::Tensor& t, const at::Tensor& like) {
  // empty_like keeps a dense tensor's strides: no allocation when they already agree.
  if (like.is_non_overlapping_and_dense() && t.sizes() == like.sizes() && t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_like(like);
  if (t.strides() == out.strides()) return t;
  return out.copy_(t);
}

inline at::Tensor empty_saved(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The data a backend reads or writes: none for undefined tensors, and none
// for meta tensors (the forward's walk also runs as a Meta kernel, which
// computes no values: ops/meta.cpp).
template <typename T> const T* data_of(const at::Tensor& t) {
  return t.defined() && !t.is_meta() ? t.template const_data_ptr<T>() : nullptr;
}
template <typename T> T* mutable_data_of(at::Tensor& t) {
  return t.defined() && !t.is_meta() ? t.template data_ptr<T>() : nullptr;
}

// A [C] parameter as a pointer a backend reads (null when undefined); the
// contiguous copy, if any, lives in `keep`.
template <typename T> const T* channel_ptr(const at::Tensor& t, at::Tensor& keep) {
  if (!t.defined()) return nullptr;
  keep = t.contiguous();
  return data_of<T>(keep);
}

// (pad_h, pad_w) of a window when its padding is symmetric, nullopt otherwise.
inline std::optional<std::vector<int64_t>> symmetric_padding(const ConvStage& st) {
  if (st.pad_top != st.pad_bottom || st.pad_left != st.pad_right) return std::nullopt;
  return std::vector<int64_t>{st.pad_top, st.pad_left};
}

// The conv input as ATen's convolution takes it: explicitly padded when the
// padding is asymmetric (Conv2d's padding='same' with an even kernel).
inline at::Tensor conv_input(const ConvStage& st, const at::Tensor& x) {
  if (symmetric_padding(st)) return x;
  return at::constant_pad_nd(x, {st.pad_left, st.pad_right, st.pad_top, st.pad_bottom}, 0);
}
inline std::vector<int64_t> conv_padding(const ConvStage& st) {
  return symmetric_padding(st).value_or(std::vector<int64_t>{0, 0});
}

// MaxPool's input gradient: each output's gradient added at its argmax.
// ATen's max_pool2d_with_indices returns an out-of-range index for a window
// that lies entirely in the padding (possible with dilation), which its own
// backward would write through; here such windows contribute nothing.
// (Device-generic: on CUDA scatter_add_ adds in a nondeterministic order
// where windows overlap.)
inline at::Tensor max_pool_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices) {
  const int64_t n = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  const at::Tensor idx = indices.reshape({n, c, -1});
  const at::Tensor valid = idx.ge(0).logical_and(idx.lt(plane));
  const at::Tensor g = at::where(valid, grad.reshape({n, c, -1}), at::zeros({}, grad.options()));
  at::Tensor dx = at::zeros({n, c, plane}, x.options());
  dx.scatter_add_(2, at::where(valid, idx, at::zeros({}, idx.options())), g);
  return dx.view(x.sizes());
}

// The per-channel arrays of a stage's epilogue, y = (z - center) * scale + shift.
template <typename T> struct Epilogue {
  at::Tensor scale, shift, center, invstd;  // undefined where absent
  const T* scale_ptr() const { return data_of<T>(scale); }
  const T* shift_ptr() const { return data_of<T>(shift); }
  const T* center_ptr() const { return data_of<T>(center); }
  const T* invstd_ptr() const { return data_of<T>(invstd); }
};

// scale = gamma * invstd, shift = beta, for y = (z - center) * scale + shift
// (the mean subtracted first, as eager does): the forward and the backward's
// recomputation both build them here, so y comes out bit-identical.
template <typename B, typename T>
Epilogue<T> bn_epilogue(const StageParams& p, const at::Tensor& center, const at::Tensor& invstd) {
  Epilogue<T> e;
  e.center = center;
  e.invstd = invstd;
  at::Tensor gamma, beta;
  const T* ga = channel_ptr<T>(p.gamma, gamma);
  const T* be = channel_ptr<T>(p.beta, beta);
  std::tie(e.scale, e.shift) =
      B::template bn_scale_shift<T>(ga, be, e.invstd_ptr(), center.size(0), center.options());
  return e;
}

template <typename B, typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>> train_forward_impl(const TrainRun& run, const at::Tensor& input,
                                                                   at::TensorList params, at::TensorList running) {
  const at::ScalarType dtype = scalar_type_of(run.dtype);
  TORCH_CHECK_TYPE(input.scalar_type() == dtype, run.forward_name, ": input has dtype ", input.scalar_type(),
                   " but the spec says ", dtype);
  TORCH_CHECK_VALUE(input.layout() == at::kStrided, run.forward_name, ": input must be strided");
  const std::vector<StageParams> sp = bind_params(run, run.forward_name, params, &running, input);
  const size_t n_stages = run.stages.size();

  // Shape checks first: a bad input fails before any work.
  const std::vector<c10::SymInt> sizes = stage_sym_sizes(run, input, run.forward_name);
  for (size_t i = 0; i < n_stages; ++i)
    TORCH_CHECK_VALUE(!batch_stats(run.stages[i]) || sizes[i] / run.stages[i].out_channels > 1, run.forward_name,
                      ": Expected more than 1 value per channel when training, got input size ", input.sym_sizes(),
                      " at stage ", i);
  at::Tensor x = run.rows ? input.reshape({-1, run.in_channels}) : input;
  std::vector<c10::SymInt> out_sizes;
  if (run.rows) {
    out_sizes = input.sym_sizes().vec();
    out_sizes.back() = run.stages.back().out_channels;
  }

  std::vector<at::Tensor> saved;
  saved.reserve(kSavedPerStage * n_stages);
  for (size_t i = 0; i < n_stages; ++i) {
    const ConvStage& st = run.stages[i];
    const StageParams& p = sp[i];
    at::Tensor z, aux;
    switch (st.kind) {
      case ConvStageKind::Linear: z = at::mm(x, p.weight.t()); break;
      case ConvStageKind::Conv:
        z = at::convolution(conv_input(st, x), p.weight, std::nullopt, {st.stride_h, st.stride_w}, conv_padding(st),
                            {st.dilation_h, st.dilation_w}, false, {0, 0}, st.groups);
        break;
      case ConvStageKind::MaxPool:
        std::tie(z, aux) = at::max_pool2d_with_indices(x, {st.kernel_h, st.kernel_w}, {st.stride_h, st.stride_w},
                                                       {st.pad_top, st.pad_left}, {st.dilation_h, st.dilation_w},
                                                       st.options & kernels::kCeilMode);
        break;
      case ConvStageKind::AvgPool:
        z = at::avg_pool2d(x, {st.kernel_h, st.kernel_w}, {st.stride_h, st.stride_w}, {st.pad_top, st.pad_left},
                           st.options & kernels::kCeilMode, st.options & kernels::kCountIncludePad,
                           st.divisor ? std::optional<int64_t>(st.divisor) : std::nullopt);
        break;
      case ConvStageKind::GlobalAvgPool: z = at::adaptive_avg_pool2d(x, {1, 1}); break;
      case ConvStageKind::Flatten: z = x.flatten(1); break;
      case ConvStageKind::ScaleShift:
      case ConvStageKind::Pointwise: z = x; break;
    }
    const bool owned = owns_product(st);
    at::Tensor a = z, zsave;
    if (has_epilogue(st)) {
      z = dense(z);
      // A Meta kernel's walk (ops/meta.cpp) computes no values: only the channel count is read.
      const ChannelLayout l = z.is_meta() ? ChannelLayout{0, st.out_channels, 0} : layout_of(z);
      const T* zp = data_of<T>(z);
      Epilogue<T> e;
      at::Tensor bias;
      const T* bias_ptr = channel_ptr<T>(p.bias, bias);
      if (has_bn(st)) {
        // Rows 0 and 1: what the stage normalizes with; with batch
        // statistics rows 2 and 3, what a running-statistics update reads.
        if (batch_stats(st)) {
          aux = B::template batch_statistics<T>(l, zp, bias_ptr, st.eps, z.options());
        } else {
          at::Tensor rm, rv;
          const T* rm_ptr = channel_ptr<T>(p.running_mean, rm);
          const T* rv_ptr = channel_ptr<T>(p.running_var, rv);
          aux = B::template running_statistics<T>(rm_ptr, rv_ptr, bias_ptr, l.channels, st.eps, z.options());
        }
        e = bn_epilogue<B, T>(p, aux[0], aux[1]);
      } else if (p.bias.defined()) {
        e.shift = bias;
      }
      // Where y and a go (see the file comment for what is saved).
      T* pre = nullptr;
      if (has_bn(st)) {
        a = at::empty_like(z);
        if (owned) zsave = z;
      } else if (!kernels::derivative_from_output(st.activation) && owned) {
        // y (z + bias) overwrites z, which is kept; a stage without a product
        // (a lone activation) has its input as y.
        zsave = z;
        pre = mutable_data_of<T>(zsave);
        a = at::empty_like(z);
      } else {
        a = owned ? z : at::empty_like(z);
      }
      B::template epilogue_forward<T>(l, zp, has_bn(st) ? e.center_ptr() : nullptr, e.scale_ptr(), e.shift_ptr(),
                                      st.activation, st.alpha, pre, mutable_data_of<T>(a));
    }
    const bool last = i + 1 == n_stages;
    const bool a_is_view = !owned && !has_epilogue(st);  // an epilogue-free Flatten
    saved.push_back(last || a_is_view ? empty_saved(input) : a);
    saved.push_back(zsave.defined() ? zsave : empty_saved(input));
    saved.push_back(aux.defined() ? aux : empty_saved(input));
    x = a;
  }

  at::Tensor output = x;
  if (!owns_product(run.stages.back()) && !has_epilogue(run.stages.back())) output = x.clone();
  if (run.rows) output = output.view_symint(out_sizes);

  return {output, saved};
}

template <typename B, typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>> backward_impl(const TrainRun& run, const at::Tensor& grad_output,
                                                              const at::Tensor& input, const at::Tensor& output,
                                                              at::TensorList saved, at::TensorList params,
                                                              const c10::List<bool>& grad_mask) {
  const size_t n_stages = run.stages.size();
  TORCH_CHECK_VALUE(saved.size() == kSavedPerStage * n_stages, run.backward_name, ": expected ",
                    kSavedPerStage * n_stages, " saved tensors, got ", saved.size());
  TORCH_CHECK_VALUE(grad_mask.size() == params.size() + 1, run.backward_name, ": grad_mask needs ",
                    params.size() + 1, " entries (input, then each parameter), got ", grad_mask.size());
  // Buffers are not read backward: the statistics a BatchNorm used are in its saved {center, invstd}.
  const std::vector<StageParams> sp = bind_params(run, run.backward_name, params, nullptr, input);
  auto wants = [&](int64_t at) { return at >= 0 && grad_mask.get(static_cast<size_t>(at + 1)); };
  auto stage_wants = [&](size_t i) {
    const StageParams& p = sp[i];
    return wants(p.weight_at) || wants(p.bias_at) || wants(p.gamma_at) || wants(p.beta_at);
  };
  // The lowest stage the gradient must reach (-1: the input).
  int64_t lowest = static_cast<int64_t>(n_stages);
  if (grad_mask.get(0)) {
    lowest = -1;
  } else {
    for (size_t i = 0; i < n_stages; ++i)
      if (stage_wants(i)) {
        lowest = static_cast<int64_t>(i);
        break;
      }
  }
  std::vector<at::Tensor> grads(params.size());
  for (size_t k = 0; k < params.size(); ++k) grads[k] = at::empty({0}, params[k].options());
  at::Tensor grad_input = at::empty({0}, input.options());
  if (lowest == static_cast<int64_t>(n_stages)) return {grad_input, grads};

  // Every tensor the walk reads must have the size the forward gave it.
  const std::vector<int64_t> sizes = stage_sizes(run, input, run.backward_name);
  const int64_t out_c = run.stages.back().out_channels;
  TORCH_CHECK_VALUE(grad_output.numel() == sizes.back() && (!run.rows || grad_output.size(-1) == out_c),
                    run.backward_name, ": grad_output of shape ", grad_output.sizes(), " does not match the output");
  TORCH_CHECK_VALUE(output.numel() == 0 || output.numel() == sizes.back(), run.backward_name, ": output of shape ",
                    output.sizes(), " does not match the run");
  for (size_t i = 0; i < n_stages; ++i) {
    const ConvStage& st = run.stages[i];
    for (size_t k = 0; k < 2; ++k) {
      const at::Tensor& t = saved[kSavedPerStage * i + k];
      TORCH_CHECK_VALUE(t.numel() == 0 || (t.numel() == sizes[i] && t.scalar_type() == input.scalar_type()),
                        run.backward_name, ": saved tensor ", kSavedPerStage * i + k, " of shape ", t.sizes(),
                        " does not match stage ", i);
    }
    const at::Tensor& aux = saved[kSavedPerStage * i + 2];
    if (has_bn(st))
      TORCH_CHECK_VALUE(aux.dim() == 2 && (aux.size(0) == 2 || aux.size(0) == 4) && aux.size(1) == st.out_channels &&
                            aux.scalar_type() == input.scalar_type(),
                        run.backward_name, ": saved statistics of stage ", i, " have shape ", aux.sizes());
    if (st.kind == ConvStageKind::MaxPool)
      TORCH_CHECK_VALUE(aux.numel() == sizes[i] && aux.scalar_type() == at::kLong, run.backward_name,
                        ": saved indices of stage ", i, " have shape ", aux.sizes());
    const bool reads_output = kernels::derivative_reads_output(st.activation);
    const at::Tensor& out = i + 1 == n_stages ? output : saved[kSavedPerStage * i];
    TORCH_CHECK_VALUE(!reads_output || out.numel() == sizes[i], run.backward_name, ": stage ", i,
                      " needs its output (its activation's backward reads it)");
  }

  // Stage inputs and outputs as the forward saw them (the run's output only
  // when the last stage's backward reads it: see ops/autograd.cpp).
  const at::Tensor x0 = run.rows ? input.reshape({-1, run.in_channels}) : input;
  std::vector<at::Tensor> outputs(n_stages);
  for (size_t i = 0; i < n_stages; ++i) {
    if (i + 1 == n_stages) {
      if (output.numel()) outputs[i] = run.rows ? output.reshape({-1, out_c}) : output;
    } else if (saved[kSavedPerStage * i].numel() == 0 && run.stages[i].kind == ConvStageKind::Flatten) {
      outputs[i] = (i == 0 ? x0 : outputs[i - 1]).flatten(1);
    } else {
      outputs[i] = saved[kSavedPerStage * i];
    }
  }
  auto stage_input = [&](size_t i) { return i == 0 ? x0 : outputs[i - 1]; };

  at::Tensor g = run.rows ? grad_output.reshape({-1, run.stages.back().out_channels}) : grad_output;
  for (int64_t ii = static_cast<int64_t>(n_stages) - 1; ii >= 0 && ii >= lowest; --ii) {
    const size_t i = static_cast<size_t>(ii);
    const ConvStage& st = run.stages[i];
    const StageParams& p = sp[i];
    const bool need_dx = ii > lowest;
    const at::Tensor x = stage_input(i);
    at::Tensor dz = g;
    if (has_epilogue(st)) {
      const at::Tensor zs = saved[kSavedPerStage * i + 1];
      // z: the product output, or the stage input when the stage computed none.
      const at::Tensor z = zs.numel() ? zs : dense(st.kind == ConvStageKind::Flatten ? x.flatten(1) : x);
      // The stage output where its values are read; else a tensor of its
      // shape and layout: the saved z, the stage input it was computed from,
      // or (the run's output, not kept) the gradient itself, made dense.
      const bool layout_of_grad = !outputs[i].defined() && !zs.numel() && owns_product(st);
      const at::Tensor a = outputs[i].defined()  ? dense(outputs[i])
                           : zs.numel()          ? zs
                           : !layout_of_grad     ? z
                                                 : g.contiguous(g.suggest_memory_format());
      const ChannelLayout l = layout_of(a);
      // The gradient in that layout (autograd may hand an expanded, stride-0 one).
      const at::Tensor gd = layout_of_grad ? a : strided_like(g, a);
      Epilogue<T> e;
      at::Tensor bias;
      const at::Tensor aux = saved[kSavedPerStage * i + 2];
      if (has_bn(st)) e = bn_epilogue<B, T>(p, aux[0].contiguous(), aux[1].contiguous());
      else if (p.bias.defined()) channel_ptr<T>(p.bias, e.shift);
      ActSource source = ActSource::PreActivation;
      const T* src = z.const_data_ptr<T>();
      if (kernels::derivative_from_output(st.activation)) {
        source = ActSource::Output;
        src = a.const_data_ptr<T>();
      } else if (has_bn(st)) {
        source = ActSource::Recompute;
      }
      const bool bn = has_bn(st);
      const bool need_dz = need_dx || wants(p.weight_at) || wants(p.bias_at);
      // Without an activation or BatchNorm the pass only reduces the bias
      // gradient: dz is the incoming gradient itself, no copy.
      const bool in_place = st.activation == Activation::None && !bn;
      at::Tensor dy = in_place ? gd : at::empty_like(a);
      // [sum dy | sum dy * (z - center)]: the bias / BatchNorm gradients' sums.
      const bool reduce = bn || wants(p.bias_at);
      const T* ce = bn ? e.center_ptr() : nullptr;
      typename B::Sums sums{};
      if (reduce || !in_place)
        sums = B::template backward_reduce<T>(l, gd.const_data_ptr<T>(), st.activation, st.alpha, source, src,
                                              z.const_data_ptr<T>(), e.scale_ptr(), e.shift_ptr(), ce,
                                              dy.data_ptr<T>(), reduce, a.options());
      auto to_grad = [&](const typename B::Sums& s, int row, const T* factor, const at::Tensor& like) {
        return strided_like(B::template grad_from_sums<T>(s, row, factor, l.channels, like.options()), like);
      };
      if (bn) {
        const T* is = e.invstd_ptr();
        if (wants(p.gamma_at)) grads[static_cast<size_t>(p.gamma_at)] = to_grad(sums, 1, is, p.gamma);
        if (wants(p.beta_at)) grads[static_cast<size_t>(p.beta_at)] = to_grad(sums, 0, nullptr, p.beta);
        if (need_dz) {
          at::Tensor gamma;
          const T* ga = channel_ptr<T>(p.gamma, gamma);
          const double count = batch_stats(st) ? static_cast<double>(l.outer * l.inner) : 0.0;
          const BnGradCoefficients k =
              B::template bn_backward_coefficients<T>(sums, l.channels, is, ga, count, a.options());
          const bool bias_grad = wants(p.bias_at);
          const typename B::Sums sum_dz = B::template batchnorm_backward_apply<T>(
              l, dy.const_data_ptr<T>(), z.const_data_ptr<T>(), ce,
              k.k_mean.defined() ? k.k_mean.template const_data_ptr<T>() : nullptr,
              k.k_xc.defined() ? k.k_xc.template const_data_ptr<T>() : nullptr, k.k_dy.template const_data_ptr<T>(),
              dy.data_ptr<T>(), bias_grad, a.options());
          if (bias_grad) grads[static_cast<size_t>(p.bias_at)] = to_grad(sum_dz, 0, nullptr, p.bias);
        }
      } else if (wants(p.bias_at)) {
        grads[static_cast<size_t>(p.bias_at)] = to_grad(sums, 0, nullptr, p.bias);
      }
      dz = dy;
    }
    at::Tensor dx;
    switch (st.kind) {
      case ConvStageKind::Linear:
        if (wants(p.weight_at)) grads[static_cast<size_t>(p.weight_at)] = strided_like(at::mm(dz.t(), x), p.weight);
        if (need_dx) dx = at::mm(dz, p.weight);
        break;
      case ConvStageKind::Conv: {
        if (!need_dx && !wants(p.weight_at)) break;
        const at::Tensor xp = conv_input(st, x);
        auto [gx, gw, gb] = at::convolution_backward(dz, xp, p.weight, std::nullopt, {st.stride_h, st.stride_w},
                                                     conv_padding(st), {st.dilation_h, st.dilation_w}, false,
                                                     {0, 0}, st.groups, {need_dx, wants(p.weight_at), false});
        if (wants(p.weight_at)) grads[static_cast<size_t>(p.weight_at)] = strided_like(gw, p.weight);
        if (need_dx)
          dx = symmetric_padding(st) ? gx : gx.narrow(2, st.pad_top, x.size(2)).narrow(3, st.pad_left, x.size(3));
        break;
      }
      case ConvStageKind::MaxPool:
        if (need_dx) dx = max_pool_backward(dz, x, saved[kSavedPerStage * i + 2]);
        break;
      case ConvStageKind::AvgPool:
        if (need_dx)
          dx = at::avg_pool2d_backward(dz, x, {st.kernel_h, st.kernel_w}, {st.stride_h, st.stride_w},
                                       {st.pad_top, st.pad_left}, st.options & kernels::kCeilMode,
                                       st.options & kernels::kCountIncludePad,
                                       st.divisor ? std::optional<int64_t>(st.divisor) : std::nullopt);
        break;
      case ConvStageKind::GlobalAvgPool:
        if (need_dx) dx = (dz / static_cast<double>(x.size(2) * x.size(3))).expand(x.sizes());
        break;
      case ConvStageKind::Flatten:
        if (need_dx) dx = dz.reshape(x.sizes());
        break;
      case ConvStageKind::ScaleShift:
      case ConvStageKind::Pointwise: dx = dz; break;
    }
    g = dx;
  }
  if (grad_mask.get(0)) grad_input = strided_like(run.rows ? g.reshape(input.sizes()) : g, input);
  return {grad_input, grads};
}

// The training ops run float32 and float64 (the planner sends nothing else).
template <typename Fn> decltype(auto) dispatch_train_dtype(const TrainRun& run, Fn&& fn) {
  TORCH_CHECK_TYPE(run.dtype == kernels::DType::Float32 || run.dtype == kernels::DType::Float64, run.forward_name,
                   ": ", scalar_type_of(run.dtype), " training is not supported (float32 and float64 are)");
  if (run.dtype == kernels::DType::Float64) return fn.template operator()<double>();
  return fn.template operator()<float>();
}

template <typename B>
std::tuple<at::Tensor, std::vector<at::Tensor>> train_forward(const TrainRun& run, const at::Tensor& input,
                                                              at::TensorList params, at::TensorList running) {
  return dispatch_train_dtype(run,
                              [&]<typename T>() { return train_forward_impl<B, T>(run, input, params, running); });
}

template <typename B>
std::tuple<at::Tensor, std::vector<at::Tensor>> backward(const TrainRun& run, const at::Tensor& grad_output,
                                                         const at::Tensor& input, const at::Tensor& output,
                                                         at::TensorList saved, at::TensorList params,
                                                         const c10::List<bool>& grad_mask) {
  return dispatch_train_dtype(run, [&]<typename T>() {
    return backward_impl<B, T>(run, grad_output, input, output, saved, params, grad_mask);
  });
}

// seqfuse::update_running_stats's arguments, checked before any BatchNorm is
// updated (all or nothing): per BatchNorm, buffers running_mean,
// running_var, num_batches_tracked on `device_type`, and its saved [4, C]
// statistics (rows 2 and 3: the batch mean with any bias before it and the
// unbiased batch variance) on the buffers' device.
inline void check_running_stats_update(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum,
                                       at::DeviceType device_type) {
  const char* op = "seqfuse::update_running_stats";
  TORCH_CHECK_VALUE(buffers.size() == 3 * stats.size() && momentum.size() == stats.size(), op,
                    ": expected 3 buffers and a momentum per statistics tensor, got ", buffers.size(), ", ",
                    momentum.size(), " and ", stats.size());
  for (size_t k = 0; k < stats.size(); ++k) {
    const at::Tensor &rm = buffers[3 * k], &rv = buffers[3 * k + 1], &tracked = buffers[3 * k + 2];
    TORCH_CHECK_VALUE(stats[k].dim() == 2 && stats[k].size(0) == 4 && rm.dim() == 1 &&
                          rm.size(0) == stats[k].size(1) && rv.sizes() == rm.sizes() && rm.is_contiguous() &&
                          rv.is_contiguous() && rm.is_floating_point() && rv.scalar_type() == rm.scalar_type() &&
                          rm.device().type() == device_type && tracked.numel() == 1 &&
                          tracked.scalar_type() == at::kLong,
                      op, ": BatchNorm ", k, ": statistics of shape ", stats[k].sizes(), " do not fit buffers of shape ",
                      rm.sizes());
    TORCH_CHECK_VALUE(rv.device() == rm.device() && tracked.device() == rm.device() &&
                          stats[k].device() == rm.device(),
                      op, ": BatchNorm ", k, ": buffers and statistics on different devices (running_mean on ",
                      rm.device(), ", running_var on ", rv.device(), ", num_batches_tracked on ", tracked.device(),
                      ", statistics on ", stats[k].device(), ")");
  }
}

}  // namespace seqfuse::train
