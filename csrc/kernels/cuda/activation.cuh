// Every activation of the fused kernels (mlp_spec.h's Activation), on the
// device, in the accumulate type: float for float/half/bfloat16 data, double
// for double. The formulas are eager's (ATen's CUDA kernels): GELU-erf with
// erf, GELU-tanh with tanh, Hardsigmoid as min(max(x + 3, 0), 6) / 6, so the
// fused results stay within the test suite's tolerances of eager.
#pragma once

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
}  // namespace math

template <typename A> SEQFUSE_HD A clamp06(A t) { return t < A(0) ? A(0) : (t > A(6) ? A(6) : t); }

// Comparisons are written so that NaN passes through every activation, as in eager.
template <typename A> SEQFUSE_HD A activate(A x, Activation act, A alpha) {
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return x < A(0) ? A(0) : x;
    case Activation::LeakyReLU: return x < A(0) ? x * alpha : x;
    case Activation::ReLU6: return x < A(0) ? A(0) : (x > A(6) ? A(6) : x);
    case Activation::Sigmoid: return A(1) / (A(1) + math::exp_(-x));
    case Activation::Tanh: return math::tanh_(x);
    case Activation::GeluErf: return A(0.5) * x * (A(1) + math::erf_(x * A(0.70710678118654752440)));
    case Activation::GeluTanh: {
      const A inner = A(0.79788456080286535588) * (x + A(0.044715) * x * x * x);
      return A(0.5) * x * (A(1) + math::tanh_(inner));
    }
    case Activation::SiLU: return x / (A(1) + math::exp_(-x));
    case Activation::Hardswish: return x * clamp06(x + A(3)) / A(6);
    case Activation::Hardsigmoid: return clamp06(x + A(3)) / A(6);
  }
  return x;
}

// The training backward's g * act'(v): v is the activation's output for the
// activations whose derivative reads it (None, ReLU, Sigmoid, Tanh:
// kernels::derivative_from_output) and its argument for the others. The
// formulas, their values at the kinks and for NaN are eager's (ATen's
// *_backward kernels), as in kernels/train_epilogue_impl.h: ReLU's
// threshold_backward passes the gradient of a NaN output, Hardswish's and
// Hardsigmoid's intervals, Hardsigmoid's slope 1/6 rounded to float even for
// double, GELU's derivatives as ATen writes them.
template <typename A> SEQFUSE_HD A activation_grad(A g, A v, Activation act, A alpha) {
  switch (act) {
    case Activation::None: return g;
    case Activation::ReLU: return v <= A(0) ? A(0) : g;
    case Activation::LeakyReLU: return v > A(0) ? g : g * alpha;
    case Activation::ReLU6: return (v <= A(0) || v >= A(6)) ? A(0) : g;
    case Activation::Sigmoid: return g * (A(1) - v) * v;
    case Activation::Tanh: return g * (A(1) - v * v);
    case Activation::GeluErf: {
      const A k_alpha = A(0.70710678118654752440);
      const A k_beta = A(1.12837916709551257390 * 0.70710678118654752440 * 0.5);
      const A cdf = A(0.5) * (A(1) + math::erf_(v * k_alpha));
      const A pdf = k_beta * math::exp_(A(-0.5) * v * v);
      return g * (cdf + v * pdf);
    }
    case Activation::GeluTanh: {
      const A k_beta = A(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
      const A k_kappa = A(0.044715);
      const A v2 = v * v;
      const A inner = k_beta * (v + k_kappa * v2 * v);
      const A t = math::tanh_(inner);
      const A left_derivative = A(0.5) * (A(1) + t);
      const A right_derivative = A(0.5) * v * (A(1) - t * t) * k_beta * (A(1) + A(3) * k_kappa * v2);
      return g * (left_derivative + right_derivative);
    }
    case Activation::SiLU: {
      const A s = A(1) / (A(1) + math::exp_(-v));
      return g * s * (A(1) + v * (A(1) - s));
    }
    case Activation::Hardswish: return v < A(-3) ? A(0) : (v <= A(3) ? g * (v / A(3) + A(0.5)) : g);
    case Activation::Hardsigmoid: return (v > A(-3) && v < A(3)) ? g * A(1.0f / 6.0f) : A(0);
  }
  return g;
}

}  // namespace seqfuse::cuda
