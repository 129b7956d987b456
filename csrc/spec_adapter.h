// Torch-side helpers shared by the backend adapters: decoding the spec and
// mapping between torch dtypes and the kernels' storage types.
#pragma once

#include <ATen/ATen.h>

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
