// Activation functions over rows of the accumulate type.
//
// float runs one vector register at a time with polynomial exp/tanh/erf (errors of a few
// ulp, the same families ATen's vectorized CPU kernels use); double runs the
// C library per element so float64 results stay at libm accuracy (that is the
// precision gradcheck-style tests rely on). Every function propagates NaN the
// way the eager PyTorch op does: comparisons are written so a NaN falls through.
//
// This header is included inside an ISA namespace by the per-ISA translation
// units (see mlp_forward_impl.h), so it must only include headers that are
// already included before the target pragma.
#pragma once

namespace activation_detail {

using seqfuse::kernels::Activation;
using VF = Vec<float>;  // the ISA's register (kernel_impl.h)
using VI = NativeVec<float>::mask;

// Selects a where mask is set (all ones), b elsewhere.
__attribute__((always_inline)) inline VF select(VI mask, VF a, VF b) {
  return reinterpret_cast<VF>((mask & reinterpret_cast<VI>(a)) | (~mask & reinterpret_cast<VI>(b)));
}

// exp(x): range reduction x = n ln2 + r, degree-6 polynomial for e^r, scale by 2^n.
__attribute__((always_inline)) inline VF exp_vec(VF x) {
  const VF hi = splat(88.0f), lo = splat(-87.0f);
  VI overflow = x > hi, underflow = x < lo;
  VF xc = select(overflow, hi, select(underflow, lo, x));  // NaN passes through
  VF n = xc * 1.44269504088896341f;
  // round to nearest
  n = __builtin_convertvector(__builtin_convertvector(n + select(n < 0.0f, splat(-0.5f), splat(0.5f)), VI), VF);
  VF r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  __builtin_memcpy(&scale, &e, sizeof(scale));
  VF y = p * scale;
  y = select(overflow, splat(__builtin_inff()), y);
  return select(underflow, splat(0.0f), y);
}

// tanh: odd rational approximation on [-7.9, 7.9]; beyond, 1 - 2 / (e^{2|x|} + 1),
// which has no cancellation there and reaches exactly +-1 where float tanh does.
__attribute__((always_inline)) inline VF tanh_vec(VF x) {
  const VF c = splat(7.90531110763549805f);
  VF xc = select(x > c, c, select(x < -c, -c, x));
  VF x2 = xc * xc;
  VF p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  VF q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  VF t = p / q;
  VF ax = select(x < 0.0f, -x, x);
  VF far = 1.0f - 2.0f / (exp_vec(2.0f * ax) + 1.0f);
  far = select(x < 0.0f, -far, far);
  return select(ax < 0.0004f, x, select(ax > c, far, t));
}

// erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the form ATen vectorizes.
__attribute__((always_inline)) inline VF erf_vec(VF x) {
  VF ax = select(x < 0.0f, -x, x);
  VF t = 1.0f / (ax * 0.3275911f + 1.0f);
  VF p = splat(1.061405429f);
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  VF y = 1.0f - p * t * exp_vec(-ax * ax);
  return select(x < 0.0f, -y, y);
}

// Always inlined: with `act` a constant (activate_row's per-activation
// loops) the switch folds away and the loop body stays in registers; an
// out-of-line call per vector passes the vectors through memory.
__attribute__((always_inline)) inline VF activate_vec(VF x, Activation act, float alpha) {
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return select(x < 0.0f, splat(0.0f), x);
    case Activation::LeakyReLU: return select(x > 0.0f, x, x * alpha);
    case Activation::ReLU6: return select(x < 0.0f, splat(0.0f), select(x > 6.0f, splat(6.0f), x));
    case Activation::Sigmoid: return 1.0f / (1.0f + exp_vec(-x));
    case Activation::Tanh: return tanh_vec(x);
    case Activation::GeluErf: {
      // eager's GELU (erf) gives inf at +inf and NaN at -inf (-inf * 0), in
      // float as in float64; pinned here so no contraction or erf rounding
      // near the limits changes either.
      VF y = 0.5f * x * (1.0f + erf_vec(x * 0.70710678118654752f));
      y = select(x == __builtin_inff(),
                 splat(::seqfuse::kernels::gelu_erf_at_pos_inf.load(std::memory_order_relaxed)), y);
      return select(x == -__builtin_inff(), splat(__builtin_nanf("")), y);
    }
    case Activation::GeluTanh: {
      VF inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + tanh_vec(inner));
    }
    case Activation::SiLU: return x / (1.0f + exp_vec(-x));
    case Activation::Hardswish: {
      VF t = x + 3.0f;
      t = select(t < 0.0f, splat(0.0f), select(t > 6.0f, splat(6.0f), t));
      return x * t / 6.0f;
    }
    case Activation::Hardsigmoid: {  // as ATen: min(max(x + 3, 0), 6) / 6
      VF t = x + 3.0f;
      return select(t < 0.0f, splat(0.0f), select(t > 6.0f, splat(6.0f), t)) / 6.0f;
    }
  }
  return x;
}

inline double activate_scalar(double x, Activation act, double alpha) {
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return x < 0.0 ? 0.0 : x;
    case Activation::LeakyReLU: return x > 0.0 ? x : x * alpha;
    case Activation::ReLU6: return x < 0.0 ? 0.0 : (x > 6.0 ? 6.0 : x);
    case Activation::Sigmoid: return 1.0 / (1.0 + __builtin_exp(-x));
    case Activation::Tanh: return __builtin_tanh(x);
    case Activation::GeluErf:
      // +inf: inf, as eager's float64 GELU (the formula can contract to inf - inf).
      if (x == __builtin_inf()) return x;
      return 0.5 * x * (1.0 + __builtin_erf(x * 0.70710678118654752440));
    case Activation::GeluTanh: {
      double inner = 0.79788456080286535588 * (x + 0.044715 * x * x * x);
      return 0.5 * x * (1.0 + __builtin_tanh(inner));
    }
    case Activation::SiLU: return x / (1.0 + __builtin_exp(-x));
    case Activation::Hardswish: {
      double t = x + 3.0;
      t = t < 0.0 ? 0.0 : (t > 6.0 ? 6.0 : t);
      return x * t / 6.0;
    }
    case Activation::Hardsigmoid: {
      const double t = x + 3.0;
      return (t < 0.0 ? 0.0 : (t > 6.0 ? 6.0 : t)) / 6.0;
    }
  }
  return x;
}

}  // namespace activation_detail

// Applies `act` in place to n contiguous values; n may be any count.
template <seqfuse::kernels::Activation act>
inline void activate_row_as(float* p, int64_t n, float alpha) {
  using namespace activation_detail;
  int64_t i = 0;
  for (; i + kLanes<float> <= n; i += kLanes<float>) {
    VF v;
    __builtin_memcpy(&v, p + i, sizeof(v));
    v = activate_vec(v, act, alpha);
    __builtin_memcpy(p + i, &v, sizeof(v));
  }
  if (i < n) {
    VF v = {};
    __builtin_memcpy(&v, p + i, (n - i) * sizeof(float));
    v = activate_vec(v, act, alpha);
    __builtin_memcpy(p + i, &v, (n - i) * sizeof(float));
  }
}

// act(p[0..n)) in place, one loop per activation (see activate_vec).
inline void activate_row(float* p, int64_t n, seqfuse::kernels::Activation act, double alpha_d) {
  using A = seqfuse::kernels::Activation;
  const float alpha = static_cast<float>(alpha_d);
  switch (act) {
    case A::None: return;
    case A::ReLU: return activate_row_as<A::ReLU>(p, n, alpha);
    case A::LeakyReLU: return activate_row_as<A::LeakyReLU>(p, n, alpha);
    case A::ReLU6: return activate_row_as<A::ReLU6>(p, n, alpha);
    case A::Sigmoid: return activate_row_as<A::Sigmoid>(p, n, alpha);
    case A::Tanh: return activate_row_as<A::Tanh>(p, n, alpha);
    case A::GeluErf: return activate_row_as<A::GeluErf>(p, n, alpha);
    case A::GeluTanh: return activate_row_as<A::GeluTanh>(p, n, alpha);
    case A::SiLU: return activate_row_as<A::SiLU>(p, n, alpha);
    case A::Hardswish: return activate_row_as<A::Hardswish>(p, n, alpha);
    case A::Hardsigmoid: return activate_row_as<A::Hardsigmoid>(p, n, alpha);
  }
}

inline void activate_row(double* p, int64_t n, seqfuse::kernels::Activation act, double alpha) {
  using namespace activation_detail;
  if (act == Activation::None) return;
  for (int64_t i = 0; i < n; ++i) p[i] = activate_scalar(p[i], act, alpha);
}
