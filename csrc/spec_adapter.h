// Torch-side helpers shared by the backend adapters: decoding the spec and
// mapping between torch dtypes and the kernels' storage types.
#pragma once

#include <ATen/ATen.h>

#include <stdexcept>

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
  }
  return at::kFloat;
}

// Kernel storage type for a torch scalar type.
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<at::BFloat16> { using type = kernels::bf16; };
static_assert(sizeof(at::BFloat16) == sizeof(kernels::bf16), "bf16 must be bit-compatible with at::BFloat16");

// Calls fn.template operator()<T>() with T the kernel storage type of `d`.
template <typename Fn> decltype(auto) dispatch_mlp_dtype(kernels::DType d, Fn&& fn) {
  switch (d) {
    case kernels::DType::Float64: return fn.template operator()<double>();
    case kernels::DType::BFloat16: return fn.template operator()<kernels::bf16>();
    case kernels::DType::Float32: break;
  }
  return fn.template operator()<float>();
}

}  // namespace seqfuse
