// Torch-side helpers shared by the backend adapters: decoding the spec and
// mapping between torch dtypes and the kernels' storage types.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/conv_spec.h"
#include "kernels/mlp_spec.h"

namespace seqfuse {

inline kernels::MlpDesc decode_mlp_spec(at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  try {
    return kernels::decode_mlp_spec(spec.data(), spec.size(), fparams.data(), fparams.size());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

inline kernels::ConvDesc decode_conv_spec(at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  try {
    return kernels::decode_conv_spec(spec.data(), spec.size(), fparams.data(), fparams.size());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

inline at::ScalarType scalar_type_of(kernels::DType d) {
  switch (d) {
    case kernels::DType::Float32: return at::kFloat;
    case kernels::DType::Float64: return at::kDouble;
    case kernels::DType::BFloat16: return at::kBFloat16;
    case kernels::DType::Float16: return at::kHalf;
  }
  return at::kFloat;
}

// Kernel storage type for a torch scalar type.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<at::BFloat16> { using type = kernels::bf16; };
template <> struct KernelType<at::Half> { using type = kernels::fp16; };
static_assert(sizeof(at::BFloat16) == sizeof(kernels::bf16), "bf16 must be bit-compatible with at::BFloat16");
static_assert(sizeof(at::Half) == sizeof(kernels::fp16), "fp16 must be bit-compatible with at::Half");

// Calls fn.template operator()<T>() with T the kernel storage type of `d`:
// the dtypes of the CPU kernels (float16 is rejected: CUDA serves it).
template <typename Fn> decltype(auto) dispatch_mlp_dtype(kernels::DType d, Fn&& fn) {
  switch (d) {
    case kernels::DType::Float64: return fn.template operator()<double>();
    case kernels::DType::BFloat16: return fn.template operator()<kernels::bf16>();
    case kernels::DType::Float16:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "seqfuse: the CPU kernels have no float16 (it runs fused on CUDA only)");
    case kernels::DType::Float32: break;
  }
  return fn.template operator()<float>();
}

// The same over the dtypes packing serves: every dtype of every device.
template <typename Fn> decltype(auto) dispatch_pack_dtype(kernels::DType d, Fn&& fn) {
  if (d == kernels::DType::Float16) return fn.template operator()<kernels::fp16>();
  return dispatch_mlp_dtype(d, std::forward<Fn>(fn));
}

// The packed buffer a forward op receives: the spec's bytes on the input's
// device, 64-byte aligned (the kernels read sections as vectors). Every
// device's forward checks it the same way.
inline void check_packed(const char* op, const at::Tensor& packed, const at::Tensor& input, int64_t bytes) {
  TORCH_CHECK(packed.device() == input.device() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == bytes && reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 64 == 0,
              op, ": packed buffer does not match the spec and the input's device, or is not 64-byte aligned (",
              packed.numel(), " bytes on ", packed.device(), ", ", bytes, " expected on ", input.device(), ")");
}

// seqfuse::mlp_forward's input on every device: checked against the spec and
// seen as `rows` rows of in_features values `ld` apart (copied once when
// they are not). No reshape/view on the common path: each costs a TensorImpl.
struct MlpRows {
  at::Tensor x;
  int64_t rows;
  int64_t ld;
  c10::SmallVector<int64_t, 6> out_shape;
};
inline MlpRows mlp_rows(const kernels::MlpDesc& d, const at::Tensor& input) {
  const at::ScalarType dtype = scalar_type_of(d.dtype);
  TORCH_CHECK(input.scalar_type() == dtype, "seqfuse::mlp_forward: input dtype ", input.scalar_type(),
              " does not match the fused parameters' dtype ", dtype);
  TORCH_CHECK(input.dim() >= 1, "seqfuse::mlp_forward: input must have at least 1 dimension, got shape ",
              input.sizes());
  TORCH_CHECK(input.size(-1) == d.in_features, "seqfuse::mlp_forward: input shape ", input.sizes(),
              " does not end in in_features=", d.in_features);
  const int64_t K = d.in_features;
  const bool row_major = input.stride(-1) == 1 && (input.dim() == 1 || input.is_contiguous() ||
                                                   (input.dim() == 2 && input.stride(0) >= K));
  MlpRows r{row_major ? input : input.contiguous(), 0, K, {}};
  r.rows = r.x.numel() / K;
  if (r.x.dim() == 2) r.ld = r.x.stride(0);
  r.out_shape.assign(input.sizes().begin(), input.sizes().end());
  r.out_shape.back() = d.out_features;
  return r;
}

// The weight engine 1 multiplies stage i of an MLP run by: the next of
// `weights`, checked against the stage and the input `x` (every device).
inline const at::Tensor& engine_weight(at::TensorList weights, size_t& next, size_t i, const kernels::StageDesc& s,
                                       const at::Tensor& x) {
  TORCH_CHECK_VALUE(next < weights.size(), "seqfuse::mlp_forward: engine 1 needs the weight of stage ", i);
  const at::Tensor& w = weights[next++];
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == s.out_features && w.size(1) == s.in_features &&
                        w.scalar_type() == x.scalar_type() && w.device() == x.device(),
                    "seqfuse::mlp_forward: weight of stage ", i, " has shape ", w.sizes(), ", dtype ",
                    w.scalar_type(), " and device ", w.device(), ", expected [", s.out_features, ", ", s.in_features,
                    "] ", x.scalar_type(), " on ", x.device());
  return w;
}

// Engine 1's walk of an MLP run on every device: each Linear's product by
// ATen's GEMM on its weight, then epilogue(i, in, out) for stage i (bias,
// folded BatchNorm, activation; in place on a product). finished(s, x, w) may
// instead return a Linear stage's whole output (a device's shortcut), or nullopt.
template <typename Finished, typename Epilogue>
at::Tensor gemm_epilogue_walk(const kernels::MlpDesc& d, const at::Tensor& x, at::TensorList weights, int64_t rows,
                              Finished&& finished, Epilogue&& epilogue) {
  at::Tensor cur = x;
  size_t next_weight = 0;
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const kernels::StageDesc& s = d.stages[i];
    at::Tensor out;
    if (s.kind == kernels::StageKind::Linear) {
      const at::Tensor& w = engine_weight(weights, next_weight, i, s, x);
      if (std::optional<at::Tensor> y = finished(s, cur, w)) {
        cur = *y;
        continue;
      }
      out = at::mm(cur, w.t());
      cur = out;  // the epilogue runs in place on the product
    } else {
      out = cur.is_same(x) ? at::empty({rows, s.out_features}, x.options()) : cur;
    }
    epilogue(i, cur, out);
    cur = out;
  }
  return cur;
}

// seqfuse::conv_forward's input on every device, checked against the spec;
// returns the per-stage geometry for its spatial size.
inline kernels::ConvGeometry conv_geometry(const kernels::ConvDesc& d, const at::Tensor& input) {
  const at::ScalarType dtype = scalar_type_of(d.dtype);
  TORCH_CHECK(input.scalar_type() == dtype, "seqfuse::conv_forward: input dtype ", input.scalar_type(),
              " does not match the fused parameters' dtype ", dtype);
  TORCH_CHECK_VALUE(input.dim() == 4, "seqfuse::conv_forward: expected 4-D (N, C, H, W) input, got shape ",
                    input.sizes());
  TORCH_CHECK(input.size(1) == d.in_channels, "seqfuse::conv_forward: expected input with ", d.in_channels,
              " channels, got shape ", input.sizes());
  try {
    return kernels::resolve_conv_geometry(d, input.size(2), input.size(3));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what(), " (input shape ", input.sizes(), ")");
  }
}

// Reads a packing op's `tensors` list in order, checking each tensor's
// device, dtype and shape against what the spec says the stage needs, and
// keeps contiguous copies alive until packing is done.
class PackInputs {
 public:
  PackInputs(const char* op, at::TensorList tensors, at::ScalarType dtype)
      : op_(op), tensors_(tensors), dtype_(dtype) {}

  template <typename T> const T* take(int64_t stage, const char* what, std::vector<int64_t> shape) {
    TORCH_CHECK_VALUE(next_ < tensors_.size(), op_, ": stage ", stage, " needs a ", what,
                      " tensor but the list ended after ", tensors_.size());
    const at::Tensor& t = tensors_[next_++];
    TORCH_CHECK_VALUE(t.device().is_cpu(), op_, ": stage ", stage, " ", what, " is on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype_, op_, ": stage ", stage, " ", what, " has dtype ", t.scalar_type(),
                     " but the spec says ", dtype_);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op_, ": stage ", stage, " ", what, " has shape ",
                      t.sizes(), ", expected ", at::IntArrayRef(shape));
    keep_.push_back(t.contiguous());
    return static_cast<const T*>(keep_.back().const_data_ptr());
  }

  // The per-channel epilogue inputs of a stage, in the order every packing op
  // lists them: [bias] (stages with a weight), [bn_weight, bn_bias]?,
  // [running_mean, running_var] (presence per the stage's flags).
  template <typename T> struct Epilogue {
    const T *bias = nullptr, *gamma = nullptr, *beta = nullptr, *mean = nullptr, *var = nullptr;
  };
  template <typename T> Epilogue<T> take_epilogue(int64_t stage, int64_t flags, int64_t channels, bool has_weight) {
    Epilogue<T> e;
    if (has_weight && (flags & kernels::kHasBias)) e.bias = take<T>(stage, "bias", {channels});
    if (flags & kernels::kHasBatchNorm) {
      if (flags & kernels::kBatchNormAffine) {
        e.gamma = take<T>(stage, "batchnorm weight", {channels});
        e.beta = take<T>(stage, "batchnorm bias", {channels});
      }
      e.mean = take<T>(stage, "running_mean", {channels});
      e.var = take<T>(stage, "running_var", {channels});
    }
    return e;
  }

  // Every tensor must have been used.
  void finish() const {
    TORCH_CHECK_VALUE(next_ == tensors_.size(), op_, ": got ", tensors_.size(), " tensors, the spec uses ", next_);
  }

 private:
  const char* op_;
  at::TensorList tensors_;
  at::ScalarType dtype_;
  size_t next_ = 0;
  std::vector<at::Tensor> keep_;
};

}  // namespace seqfuse
