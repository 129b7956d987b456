// The activations on the device: the CUDA kernels' context of
// activation_math.h (the activations' math, written once for the CPU and the
// CUDA kernels), in the accumulate type: float for float/half/bfloat16 data,
// double for double. The formulas are eager's (its CUDA kernels compute the
// same expressions: GELU-erf with erf, GELU-tanh with tanh, Mish with
// log1p), so the fused results stay within the test suite's tolerances of eager.
#pragma once

#include <limits>

#include "../mlp_spec.h"
#include "device.cuh"

namespace seqfuse::cuda {

using kernels::Activation;

namespace math {
SEQFUSE_HD float exp_(float x) { return expf(x); }
SEQFUSE_HD double exp_(double x) { return exp(x); }
SEQFUSE_HD float tanh_(float x) { return tanhf(x); }
SEQFUSE_HD double tanh_(double x) { return tanh(x); }
SEQFUSE_HD float erf_(float x) { return erff(x); }
SEQFUSE_HD double erf_(double x) { return erf(x); }
SEQFUSE_HD float log1p_(float x) { return log1pf(x); }
SEQFUSE_HD double log1p_(double x) { return log1p(x); }
}  // namespace math

namespace activation_detail {

using math::erf_;
using math::exp_;
using math::log1p_;
using math::tanh_;

template <typename T> SEQFUSE_HD T where(bool mask, T a, T b) { return mask ? a : b; }
template <typename T> SEQFUSE_HD T infinity() { return std::numeric_limits<T>::infinity(); }
template <typename T> SEQFUSE_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }
// Eager's CUDA GELU gives +inf at +inf, in float as in double.
template <typename T> SEQFUSE_HD T gelu_erf_pos_inf(T) { return infinity<T>(); }

#define SEQFUSE_ACTIVATION_FN SEQFUSE_HD
#include "../activation_math.h"
#undef SEQFUSE_ACTIVATION_FN

}  // namespace activation_detail

// act(x), and the training backward's g * act'(v): v is the activation's
// output for the rows whose derivative reads it (kernels::derivative_from_output)
// and its argument for the others.
using activation_detail::activate;
using activation_detail::activation_grad;

}  // namespace seqfuse::cuda
