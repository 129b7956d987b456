// The activations over vector registers and rows of the accumulate type: the
// CPU kernels' context of activation_math.h (the activations' math, written
// once for the CPU and the CUDA kernels).
//
// float runs one vector register at a time with polynomial exp/tanh/erf
// (errors of a few ulp, the same families ATen's vectorized CPU kernels use);
// double runs the C library per element so float64 results stay at libm
// accuracy (that is the precision gradcheck-style tests rely on). Every
// function propagates NaN the way the eager PyTorch op does: comparisons are
// written so a NaN falls through.
//
// This header is included inside an ISA namespace by the per-ISA translation
// units (see mlp_forward_impl.h), so it must only include headers that are
// already included before the target pragma.
#pragma once

namespace activation_detail {

using seqfuse::kernels::Activation;
using VF = Vec<float>;  // the ISA's registers (kernel_impl.h)
using VI = NativeVec<float>::mask;
using VD = Vec<double>;
using VL = NativeVec<double>::mask;

// Selects a where mask is set (all ones), b elsewhere.
__attribute__((always_inline)) inline VF select(VI mask, VF a, VF b) {
  return reinterpret_cast<VF>((mask & reinterpret_cast<VI>(a)) | (~mask & reinterpret_cast<VI>(b)));
}
__attribute__((always_inline)) inline VD select(VL mask, VD a, VD b) {
  return reinterpret_cast<VD>((mask & reinterpret_cast<VL>(a)) | (~mask & reinterpret_cast<VL>(b)));
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

// The context activation_math.h is written against (see there): the
// scalars through the C library, the float vectors through the polynomials
// above; a scalar operand of where() stands for a vector of it.
#define SEQFUSE_ACTIVATION_FN __attribute__((always_inline)) inline

SEQFUSE_ACTIVATION_FN float exp_(float x) { return __builtin_expf(x); }
SEQFUSE_ACTIVATION_FN double exp_(double x) { return __builtin_exp(x); }
SEQFUSE_ACTIVATION_FN VF exp_(VF x) { return exp_vec(x); }
SEQFUSE_ACTIVATION_FN float tanh_(float x) { return __builtin_tanhf(x); }
SEQFUSE_ACTIVATION_FN double tanh_(double x) { return __builtin_tanh(x); }
SEQFUSE_ACTIVATION_FN VF tanh_(VF x) { return tanh_vec(x); }
SEQFUSE_ACTIVATION_FN float erf_(float x) { return __builtin_erff(x); }
SEQFUSE_ACTIVATION_FN double erf_(double x) { return __builtin_erf(x); }
SEQFUSE_ACTIVATION_FN VF erf_(VF x) { return erf_vec(x); }
SEQFUSE_ACTIVATION_FN float log1p_(float x) { return __builtin_log1pf(x); }
SEQFUSE_ACTIVATION_FN double log1p_(double x) { return __builtin_log1p(x); }

template <typename T> SEQFUSE_ACTIVATION_FN T infinity() { return static_cast<T>(__builtin_inf()); }
template <typename T> SEQFUSE_ACTIVATION_FN T quiet_nan() { return static_cast<T>(__builtin_nan("")); }
SEQFUSE_ACTIVATION_FN float gelu_erf_pos_inf(float) {
  return ::seqfuse::kernels::gelu_erf_at_pos_inf.load(std::memory_order_relaxed);
}
SEQFUSE_ACTIVATION_FN double gelu_erf_pos_inf(double) { return __builtin_inf(); }

// The vector of the mask's lane width (float lanes for 32-bit masks), and a
// scalar operand spread over it.
template <typename M> using VecOfMask = std::conditional_t<sizeof(std::declval<M&>()[0]) == 4, VF, VD>;
template <typename V, typename X> SEQFUSE_ACTIVATION_FN V as_vector(X x) {
  if constexpr (std::is_arithmetic_v<X>)
    return splat<std::remove_cvref_t<decltype(std::declval<V&>()[0])>>(x);
  else
    return x;
}

template <typename M, typename A, typename B> SEQFUSE_ACTIVATION_FN auto where(M mask, A a, B b) {
  if constexpr (std::is_same_v<M, bool>) {
    static_assert(std::is_same_v<A, B>, "scalar where(): both values of one type");
    return mask ? a : b;
  } else {
    using V = VecOfMask<M>;
    return select(mask, as_vector<V>(a), as_vector<V>(b));
  }
}

#include "activation_math.h"
#undef SEQFUSE_ACTIVATION_FN

// act(x) on one vector register of float or double (the rows in registers
// Always), in the row's vector form. Always inlined: with the activation a
// constant (activate_row's per-activation loops, RegisterActivation's cases)
// the loop body stays in registers; an out-of-line call per vector passes the
// vectors through memory.
template <Activation A, typename V, typename T> __attribute__((always_inline)) inline V activate_vec(V x, T alpha) {
  if constexpr (requires { ActivationMath<A>::vec(x, alpha); })
    return ActivationMath<A>::vec(x, alpha);
  else
    return ActivationMath<A>::forward(x, alpha);
}

// Calls fn(std::integral_constant<Activation, act>{}): the activation as a
// compile-time constant, one case per row.
template <typename Fn> inline void with_activation(Activation act, Fn&& fn) {
  switch (act) {
#define SEQFUSE_WITH_ACTIVATION_CASE(name, ...) \
  case Activation::name: return fn(std::integral_constant<Activation, Activation::name>{});
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_WITH_ACTIVATION_CASE)
#undef SEQFUSE_WITH_ACTIVATION_CASE
  }
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
    v = activate_vec<act>(v, alpha);
    __builtin_memcpy(p + i, &v, sizeof(v));
  }
  if (i < n) {
    VF v = {};
    __builtin_memcpy(&v, p + i, (n - i) * sizeof(float));
    v = activate_vec<act>(v, alpha);
    __builtin_memcpy(p + i, &v, (n - i) * sizeof(float));
  }
}

// act(p[0..n)) in place, one vector loop per activation.
inline void activate_row(float* p, int64_t n, seqfuse::kernels::Activation act, double alpha) {
  if (act == seqfuse::kernels::Activation::None) return;
  activation_detail::with_activation(
      act, [&](auto tag) { activate_row_as<decltype(tag)::value>(p, n, static_cast<float>(alpha)); });
}

// Double runs the C library per element, so float64 results stay at libm accuracy.
inline void activate_row(double* p, int64_t n, seqfuse::kernels::Activation act, double alpha) {
  using namespace activation_detail;
  if (act == Activation::None) return;
  with_activation(act, [&](auto tag) {
    for (int64_t i = 0; i < n; ++i) p[i] = ActivationMath<decltype(tag)::value>::forward(p[i], alpha);
  });
}
