// Tests of the CUDA device kernels (csrc/kernels/cuda/*.cuh) on the CPU: the
// kernels are compiled by g++ against the SIMT emulation layer
// (csrc/kernels/cuda/simt/simt_emulation.h, brought in by device.cuh) and launched
// with simt::launch in the geometry the adapters in csrc/adapters/cuda/ use.
//
//   fused_mlp_kernel<T>        for float, double, __half, __nv_bfloat16
//   channel_epilogue_kernel<T> (in place and not, strided rows)
//   pool_kernel<T, kMax>       NHWC max / avg pools (padding, dilation, ceil mode,
//                              count_include_pad, divisor_override)
//   global_avg_pool_kernel<T>
//   fused_mlp_smem_bytes<T>    within the 99 KiB csrc/adapters/cuda/mlp_cuda.cu allows
//
// Every result is checked against a double-precision reference written here
// from the definitions (eager PyTorch / ATen semantics), not from the kernels.
// The 16-bit references start from the 16-bit-rounded inputs and parameters, as
// the kernels do, so only the kernels' own roundings make the difference. A NaN
// reference needs a NaN, an infinite one the same infinity; a finite one a
// result within a tolerance derived from those roundings: the accumulate
// type's (u = 2^-24 for float and the half types, 2^-53 for double) in each
// product, partial sum, affine step and activation, and for the 16-bit types
// the store of every activation to 16 bits (half an ulp: 2^-11 relative for
// float16, 2^-8 for bfloat16, plus float16's subnormal spacing).
//   * Single-stage kernels (channel epilogue, pools): twice the worst-case
//     bound of those roundings.
//   * Fused chains: worst-case bounds multiply through the stages (by every
//     stage's sum |w|) far past what chains make, so the tolerance is 6 times
//     the probabilistic error scale S = sqrt(sum_j (g_j b_j)^2) over every
//     rounding j (bound b_j, sensitivity g_j of the output from a backward
//     pass through the chain): Hoeffding's bound for independent rounding
//     errors (Higham & Mary's model) puts an error past it below 3e-8. That is
//     about 1e-5 relative for float32, 3e-14 for float64 and 4 ulps of the
//     16-bit output (median; more where a sum cancels) for float16 / bfloat16.
// Each test prints, per kernel and type, the largest |error| / tolerance seen.
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/epilogue.cuh"
#include "kernels/cuda/mlp_fused.cuh"
// check.h after the device code: device.cuh brings the emulation layer first.
#include "check.h"
#include "mlp_forward.h"
#include "mlp_spec.h"

namespace {

namespace cu = seqfuse::cuda;
using sk::Activation;
using sk::DType;
using sk::StageKind;
using test_util::Rng;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- storage types ---------------------------------------------------------------

// packed: the kernels:: type the host packers are instantiated for (bit-compatible).
template <typename T> struct Ty;
template <> struct Ty<float> {
  using packed = float;
  static constexpr DType dtype = DType::Float32;
  static constexpr const char* name = "float32";
  static constexpr double u_acc = 0x1p-24;  // unit roundoff of the accumulate type
  static constexpr double u_store = 0.0;    // rounding of a stored activation (relative)
  static constexpr double tiny = 0.0;       // ... and its absolute part (subnormal spacing / 2)
};
template <> struct Ty<double> {
  using packed = double;
  static constexpr DType dtype = DType::Float64;
  static constexpr const char* name = "float64";
  static constexpr double u_acc = 0x1p-53;
  static constexpr double u_store = 0.0;
  static constexpr double tiny = 0.0;
};
template <> struct Ty<__half> {
  using packed = sk::fp16;
  static constexpr DType dtype = DType::Float16;
  static constexpr const char* name = "float16";
  static constexpr double u_acc = 0x1p-24;
  static constexpr double u_store = 0x1p-11;
  static constexpr double tiny = 0x1p-25;
};
template <> struct Ty<__nv_bfloat16> {
  using packed = sk::bf16;
  static constexpr DType dtype = DType::BFloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr double u_acc = 0x1p-24;
  static constexpr double u_store = 0x1p-8;
  static constexpr double tiny = 0x1p-134;
};
static_assert(sizeof(__half) == sizeof(sk::fp16) && sizeof(__nv_bfloat16) == sizeof(sk::bf16));

inline double to_d(float v) { return v; }
inline double to_d(double v) { return v; }
inline double to_d(__half v) { return __half2float(v); }
inline double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> T from_d(double v);
template <> float from_d<float>(double v) { return static_cast<float>(v); }
template <> double from_d<double>(double v) { return v; }
template <> __half from_d<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }

template <typename T> bool same_bits(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

// 64-byte aligned bytes filled with 0xff (NaN in every float type), so that a
// kernel reading what nobody wrote shows up as NaN.
struct Bytes {
  explicit Bytes(int64_t n) : size(n) {
    const size_t bytes = static_cast<size_t>((std::max<int64_t>(n, 1) + 63) / 64 * 64);
    data.reset(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
    if (!data) throw std::bad_alloc();
    std::memset(data.get(), 0xff, bytes);
  }
  int64_t size;
  std::unique_ptr<uint8_t, test_util::FreeDeleter> data;
};

// ---- the reference ---------------------------------------------------------------------

// A reference value and the scale of the kernel's error for it (a worst-case
// bound, or the fused chains' probabilistic S). A non-finite value must be met
// exactly, so its e is 0.
struct Val {
  double v = 0.0;
  double e = 0.0;
};

const char* act_name(Activation a) { return test_util::activation_name(a); }

// Eager's definitions, in double. The plain formulas give eager's limits at
// +-inf too (GELU, SiLU and Hardswish are NaN at -inf: -inf * 0).
double act_ref(Activation act, double x, double alpha) {
  constexpr double kPi = 3.14159265358979323846;
  auto clamp06 = [](double t) { return std::isnan(t) ? t : t < 0.0 ? 0.0 : t > 6.0 ? 6.0 : t; };
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return std::isnan(x) ? x : x > 0.0 ? x : 0.0;
    case Activation::LeakyReLU: return std::isnan(x) || x > 0.0 ? x : x * alpha;
    case Activation::ReLU6: return clamp06(x);
    case Activation::Sigmoid: return 1.0 / (1.0 + std::exp(-x));
    case Activation::Tanh: return std::tanh(x);
    case Activation::GeluErf: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::GeluTanh: return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / kPi) * (x + 0.044715 * x * x * x)));
    case Activation::SiLU: return x / (1.0 + std::exp(-x));
    case Activation::Hardswish: return x * clamp06(x + 3.0) / 6.0;
    case Activation::Hardsigmoid: return clamp06(x + 3.0) / 6.0;
    case Activation::Mish: return x * std::tanh(std::log1p(std::exp(x)));
  }
  return kNaN;
}

// The largest slope of each activation (how much it can grow an input error).
double act_gain(Activation act, double alpha) {
  switch (act) {
    case Activation::LeakyReLU: return std::max(1.0, std::abs(alpha));
    case Activation::Sigmoid: return 0.25;
    case Activation::GeluErf:
    case Activation::GeluTanh: return 1.13;
    case Activation::SiLU: return 1.1;
    case Activation::Mish: return 1.09;
    case Activation::Hardswish: return 1.5;
    case Activation::Hardsigmoid: return 1.0 / 6.0;
    default: return 1.0;
  }
}

// act(y) in the accumulate type with unit roundoff u: the input's error times
// the slope, plus the rounding of the formula (none for the piecewise-linear
// clamps, one multiply for LeakyReLU, a few ulps of the transcendental
// formulas, absolute near zero where 1 + tanh / 1 + erf cancel).
Val act_val(Activation act, Val y, double alpha, double u) {
  Val z{act_ref(act, y.v, alpha), 0.0};
  if (!std::isfinite(y.v) || !std::isfinite(z.v)) return z;  // inf in, saturated or inf/NaN out: exact
  z.e = act_gain(act, alpha) * y.e;
  switch (act) {
    case Activation::None:
    case Activation::ReLU:
    case Activation::ReLU6: break;
    case Activation::LeakyReLU: z.e += 2 * u * std::abs(z.v); break;
    default: z.e += 8 * u * (std::abs(z.v) + std::abs(y.v) + 1.0); break;
  }
  return z;
}

// The rounding of act(y) = z itself in the accumulate type (as in act_val).
double act_rounding(Activation act, double y, double z, double u) {
  switch (act) {
    case Activation::None:
    case Activation::ReLU:
    case Activation::ReLU6: return 0.0;
    case Activation::LeakyReLU: return 2 * u * std::abs(z);
    default: return 8 * u * (std::abs(z) + std::abs(y) + 1.0);
  }
}

// |act'(y)|; within `window` of a kink, the steeper side's slope (an input that
// far off may be on the other side).
double act_slope(Activation act, double y, double alpha, double window) {
  if (!std::isfinite(y)) return 0.0;
  auto near = [&](double kink) { return std::abs(y - kink) <= window; };
  switch (act) {
    case Activation::None: return 1.0;
    case Activation::ReLU: return y > 0.0 || near(0.0) ? 1.0 : 0.0;
    case Activation::LeakyReLU: return near(0.0) ? std::max(1.0, std::abs(alpha)) : y > 0.0 ? 1.0 : std::abs(alpha);
    case Activation::ReLU6: return (y > 0.0 && y < 6.0) || near(0.0) || near(6.0) ? 1.0 : 0.0;
    case Activation::Sigmoid: {
      const double sg = 1.0 / (1.0 + std::exp(-y));
      return sg * (1.0 - sg);
    }
    case Activation::Tanh: {
      const double t = std::tanh(y);
      return 1.0 - t * t;
    }
    case Activation::GeluErf: {
      const double pdf = std::exp(-0.5 * y * y) / std::sqrt(2.0 * 3.14159265358979323846);
      return std::abs(0.5 * (1.0 + std::erf(y / std::sqrt(2.0))) + y * pdf);
    }
    case Activation::GeluTanh: {
      const double c = std::sqrt(2.0 / 3.14159265358979323846);
      const double t = std::tanh(c * (y + 0.044715 * y * y * y));
      return std::abs(0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * y * y));
    }
    case Activation::SiLU: {
      const double sg = 1.0 / (1.0 + std::exp(-y));
      return std::abs(sg * (1.0 + y * (1.0 - sg)));
    }
    case Activation::Hardswish:
      if (near(-3.0) || near(3.0)) return 1.5;
      return y < -3.0 ? 0.0 : y > 3.0 ? 1.0 : std::abs((2 * y + 3) / 6);
    case Activation::Hardsigmoid: return (y > -3.0 && y < 3.0) || near(-3.0) || near(3.0) ? 1.0 / 6.0 : 0.0;
    case Activation::Mish: {
      const double t = std::tanh(std::log1p(std::exp(y))), sg = 1.0 / (1.0 + std::exp(-y));
      return std::abs(t + y * (1.0 - t * t) * sg);
    }
  }
  return 1.0;
}

// Rounding of a stored value to T.
template <typename T> Val store_val(Val z) {
  if (std::isfinite(z.v)) z.e += Ty<T>::u_store * (std::abs(z.v) + z.e) + Ty<T>::tiny;
  return z;
}

// Per-channel affine part of a stage in double: y = (v + bias - mean) / sqrt(var + eps) * gamma + beta,
// from the (T-rounded) raw parameters; absent parts are identity.
struct Affine {
  std::vector<double> bias, gamma, beta, mean, var;
  double eps = 1e-5;
  bool bn() const { return !var.empty(); }
  double scale(int64_t c) const {
    return bn() ? (gamma.empty() ? 1.0 : gamma[c]) / std::sqrt(var[c] + eps) : 1.0;
  }
  // The size of the terms of the folded shift (bias - mean) * scale + beta: its
  // rounding (and its cancellation) is relative to them.
  double shift_terms(int64_t c) const {
    const double b = bias.empty() ? 0.0 : std::abs(bias[c]);
    return bn() ? (b + std::abs(mean[c])) * std::abs(scale(c)) + (beta.empty() ? 0.0 : std::abs(beta[c])) : b;
  }
  // The kernel computes v * scale + shift in the accumulate type (u), both folded
  // in double and rounded to it.
  Val apply(Val x, int64_t c, double u) const {
    const double b = bias.empty() ? 0.0 : bias[c];
    Val y;
    y.v = bn() ? (x.v + b - mean[c]) * scale(c) + (beta.empty() ? 0.0 : beta[c]) : x.v + b;
    if (std::isfinite(y.v))
      y.e = std::abs(scale(c)) * x.e + 4 * u * (std::abs(x.v * scale(c)) + shift_terms(c));
    return y;
  }
};

// Compares got against the reference with tolerance factor * e (exact for non-finite).
struct Compare {
  double factor = 2.0;  // tolerance = factor * e
  int64_t count = 0, bad = 0;
  double worst = 0.0;  // largest |got - want| / tolerance over finite values
  std::string first;
  void add(double got, Val want, const std::function<std::string()>& where) {
    ++count;
    bool ok;
    if (std::isnan(want.v)) {
      ok = std::isnan(got);
    } else if (std::isinf(want.v)) {
      ok = got == want.v;
    } else {
      const double err = std::abs(got - want.v), tol = factor * want.e + 1e-300;
      ok = err <= tol;  // false for a NaN got
      if (ok) worst = std::max(worst, err / tol);
    }
    if (!ok && bad++ == 0) {
      char buf[160];
      std::snprintf(buf, sizeof(buf), ": got %.17g, want %.17g (tolerance %.3g)", got, want.v, factor * want.e);
      first = where() + buf;
    }
  }
};

// ---- fused MLP -----------------------------------------------------------------------------

struct StageCfg {
  StageKind kind;
  int64_t out;
  Activation act = Activation::None;
  bool bias = false;
  bool bn = false;
  bool bn_affine = false;
  double alpha = 0.01;
};
StageCfg linear(int64_t out, Activation act, bool bias = false, bool bn = false, bool affine = false,
                double alpha = 0.01) {
  return {StageKind::Linear, out, act, bias, bn, affine, alpha};
}
StageCfg scale_shift(int64_t width, Activation act, bool affine, double alpha = 0.01) {
  return {StageKind::ScaleShift, width, act, false, true, affine, alpha};
}
StageCfg pointwise(int64_t width, Activation act, double alpha = 0.01) {
  return {StageKind::Pointwise, width, act, false, false, false, alpha};
}

struct ChainCfg {
  std::string name;
  int64_t in;
  std::vector<StageCfg> stages;
};

// A chain's parameters (rounded to T), their packed buffer, and the reference forward.
template <typename T> struct Model {
  using P = typename Ty<T>::packed;
  using Acc = sk::acc_t<P>;
  ChainCfg cfg;
  sk::MlpDesc desc;
  std::vector<std::vector<T>> weights;   // [out][in] per stage (empty if not Linear)
  std::vector<std::vector<double>> wd;   // the same, in double
  std::vector<Affine> affine;
  std::unique_ptr<Bytes> buffer;
  uint8_t* packed = nullptr;  // buffer + packed_offset

  Model(const ChainCfg& c, Rng& rng, int64_t packed_offset = 0) : cfg(c) {
    std::vector<int64_t> spec{sk::kSpecVersion, static_cast<int64_t>(Ty<T>::dtype),
                              static_cast<int64_t>(c.stages.size()), c.in};
    std::vector<double> fparams;
    for (const StageCfg& s : c.stages) {
      const int64_t flags = (s.bias ? sk::kHasBias : 0) | (s.bn ? sk::kHasBatchNorm | sk::kRunningStats : 0) |
                            (s.bn && s.bn_affine ? sk::kBatchNormAffine : 0);
      spec.insert(spec.end(), {static_cast<int64_t>(s.kind), s.out, static_cast<int64_t>(s.act), flags});
      fparams.insert(fparams.end(), {s.alpha, 1e-5});
    }
    desc = sk::decode_mlp_spec(spec.data(), spec.size(), fparams.data(), fparams.size());
    buffer = std::make_unique<Bytes>(desc.packed_bytes + packed_offset);
    packed = buffer->data.get() + packed_offset;

    auto values = [&](int64_t n, double lo, double hi, std::vector<T>& t, std::vector<double>& d) {
      t.resize(static_cast<size_t>(n));
      d.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        t[i] = from_d<T>(rng.uniform(lo, hi));
        d[i] = to_d(t[i]);
      }
    };
    for (size_t i = 0; i < c.stages.size(); ++i) {
      const StageCfg& s = c.stages[i];
      const sk::StageDesc& st = desc.stages[i];
      const int64_t K = st.in_features, N = st.out_features;
      std::vector<T> w;
      std::vector<double> w_d;
      Affine aff;
      aff.eps = st.eps;
      std::vector<T> bias, gamma, beta, mean, var;
      if (s.kind == StageKind::Linear) {
        const double bound = 1.5 / std::sqrt(static_cast<double>(K));  // keeps activations O(1)
        values(N * K, -bound, bound, w, w_d);
        sk::pack_linear_weight<P>(reinterpret_cast<const P*>(w.data()), N, K,
                                  reinterpret_cast<P*>(packed + st.weight_offset));
        if (s.bias) values(N, -0.5, 0.5, bias, aff.bias);
      }
      if (s.bn) {
        values(N, -0.5, 0.5, mean, aff.mean);
        values(N, 0.3, 2.0, var, aff.var);
        if (s.bn_affine) {
          values(N, 0.5, 1.5, gamma, aff.gamma);
          values(N, -0.5, 0.5, beta, aff.beta);
        }
      }
      if (s.kind != StageKind::Pointwise) {
        auto p = [](const std::vector<T>& v) { return v.empty() ? nullptr : reinterpret_cast<const P*>(v.data()); };
        sk::fold_scale_shift<P>(N, p(bias), p(gamma), p(beta), p(mean), p(var), st.eps,
                                reinterpret_cast<Acc*>(packed + st.scale_offset),
                                reinterpret_cast<Acc*>(packed + st.shift_offset));
      }
      weights.push_back(std::move(w));
      wd.push_back(std::move(w_d));
      affine.push_back(std::move(aff));
    }
  }

  // The reference of one row (x: the T-rounded input values, in double): the
  // chain's exact values and, for each output, the scale S of the kernel's
  // error. Worst-case bounds multiply through a chain (every stage's sum |w|),
  // far past the errors a chain really makes, so S is the probabilistic one
  // (Higham & Mary's model of rounding errors as independent bounded
  // variables): every rounding the kernel makes - each product and partial
  // sum of a Linear, the affine step, the activation, the 16-bit store - is a
  // source with bound b_j, the output moves by g_j (its sensitivity, from a
  // backward pass through the linearized chain) per unit of it, and
  // S = sqrt(sum (g_j b_j)^2). By Hoeffding P(|error| > lambda S) <= 2 exp(-lambda^2 / 2).
  std::vector<Val> forward(const std::vector<double>& x) const {
    const double u = Ty<T>::u_acc;
    struct Trace {
      std::vector<double> z;      // the stage's output
      std::vector<double> b_v;    // bound of the accumulation's roundings (Hoeffding scale of its terms)
      std::vector<double> b_y;    // ... of the affine step's
      std::vector<double> b_z;    // ... of the activation's and the store's
      std::vector<double> scale;  // dy / dv
      std::vector<double> slope;  // |dz / dy|
    };
    std::vector<Trace> tr(desc.stages.size());
    std::vector<double> cur = x, sigma(x.size(), 0.0);  // sigma: a forward error estimate, for the kink windows
    for (size_t i = 0; i < desc.stages.size(); ++i) {
      const sk::StageDesc& st = desc.stages[i];
      const int64_t K = st.in_features, N = st.out_features;
      Trace& t = tr[i];
      t.z.resize(N);
      t.b_v.assign(N, 0.0);
      t.b_y.assign(N, 0.0);
      t.b_z.assign(N, 0.0);
      t.scale.assign(N, 1.0);
      t.slope.assign(N, 0.0);
      std::vector<double> next_sigma(N);
      for (int64_t n = 0; n < N; ++n) {
        double v = cur[n < K ? n : 0], sv2 = 0.0;
        if (st.kind == StageKind::Linear) {
          // Recursive summation in k order: each product rounds by <= u |x_k w_k|,
          // each partial sum by <= u |partial|.
          double acc = 0.0, b2 = 0.0;
          for (int64_t k = 0; k < K; ++k) {
            const double w = wd[i][n * K + k], p = cur[k] * w;
            acc += p;
            b2 += p * p + (k > 0 ? acc * acc : 0.0);
            sv2 += w * w * sigma[k] * sigma[k];
          }
          v = acc;
          if (std::isfinite(v)) t.b_v[n] = u * std::sqrt(b2);
        } else {
          sv2 = sigma[n] * sigma[n];
        }
        double y = v;
        if (st.kind != StageKind::Pointwise) {
          const Val ya = affine[i].apply(Val{v, 0.0}, n, u);  // its e: the affine step's rounding bound
          y = ya.v;
          t.b_y[n] = ya.e;
          t.scale[n] = affine[i].scale(n);
        }
        const double sy = std::sqrt(t.scale[n] * t.scale[n] * (sv2 + t.b_v[n] * t.b_v[n]) + t.b_y[n] * t.b_y[n]);
        t.slope[n] = act_slope(st.activation, y, st.alpha, 10 * sy + 1e-300);
        const double z = act_ref(st.activation, y, st.alpha);
        t.z[n] = z;
        if (std::isfinite(y) && std::isfinite(z))
          t.b_z[n] = act_rounding(st.activation, y, z, u) + Ty<T>::u_store * std::abs(z) + Ty<T>::tiny;
        next_sigma[n] = std::sqrt(t.slope[n] * t.slope[n] * sy * sy + t.b_z[n] * t.b_z[n]);
      }
      cur = t.z;
      sigma = std::move(next_sigma);
    }
    // One backward pass per output: the sensitivities of every source.
    // A float64 reference rounds as often as the float64 kernel: its own errors
    // (independent of the kernel's, same model) count once more.
    const double ref_factor = std::is_same_v<T, double> ? std::sqrt(2.0) : 1.0;
    std::vector<Val> out(cur.size());
    for (size_t o = 0; o < cur.size(); ++o) {
      out[o].v = cur[o];
      if (!std::isfinite(cur[o])) continue;  // must be met exactly
      std::vector<double> g(cur.size(), 0.0);
      g[o] = 1.0;
      double s2 = 0.0;
      for (size_t i = desc.stages.size(); i-- > 0;) {
        const sk::StageDesc& st = desc.stages[i];
        const Trace& t = tr[i];
        const int64_t K = st.in_features, N = st.out_features;
        std::vector<double> gv(N);
        for (int64_t n = 0; n < N; ++n) {
          const double gz = g[n], gy = gz * t.slope[n];
          gv[n] = gy * t.scale[n];
          s2 += gz * t.b_z[n] * gz * t.b_z[n] + gy * t.b_y[n] * gy * t.b_y[n] + gv[n] * t.b_v[n] * gv[n] * t.b_v[n];
        }
        if (st.kind == StageKind::Linear) {
          g.assign(K, 0.0);
          for (int64_t n = 0; n < N; ++n)
            if (gv[n] != 0.0)
              for (int64_t k = 0; k < K; ++k) g[k] += gv[n] * wd[i][n * K + k];
        } else {
          g = std::move(gv);
        }
      }
      out[o].e = ref_factor * std::sqrt(s2);
    }
    return out;
  }
};

// The fused chains' tolerance: lambda * S, a chance below 2 exp(-18) = 3e-8 per value
// for an error past it under the model.
constexpr double kLambda = 6.0;

// The launch csrc/adapters/cuda/mlp_cuda.cu's launch_fused makes.
template <typename T>
void launch_fused(const sk::MlpDesc& d, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t rows) {
  cu::FusedMlpArgs a{};
  a.x = x;
  a.ld_x = ld_x;
  a.y = y;
  a.ld_y = d.out_features;
  a.rows = rows;
  a.packed = packed;
  a.n_stages = static_cast<int32_t>(d.stages.size());
  a.width = static_cast<int32_t>(d.max_width);
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const sk::StageDesc& s = d.stages[i];
    a.stages[i] = cu::FusedStage{static_cast<int32_t>(s.kind),
                                 static_cast<int32_t>(s.in_features),
                                 static_cast<int32_t>(s.out_features),
                                 static_cast<int32_t>(s.activation),
                                 static_cast<decltype(cu::FusedStage::alpha)>(s.alpha),
                                 s.weight_offset,
                                 s.scale_offset,
                                 s.shift_offset};
  }
  const int64_t smem = cu::fused_mlp_smem_bytes<T>(a.width);
  const unsigned blocks = static_cast<unsigned>(cu::ceil_div(rows, cu::kFusedRowsPerBlock));
  simt::launch(cu::fused_mlp_kernel<T>, dim3(blocks), dim3(cu::kFusedWarps * cu::kWarpSize),
               static_cast<size_t>(smem), a);
}

struct RunOpts {
  int64_t x_pad = 0;         // ld_x = in + x_pad (the padding columns are NaN: must not be read)
  bool specials = false;     // NaN / +-inf in a few rows
  int64_t packed_offset = 0;  // bytes the packed buffer starts past a 64-byte boundary
};

struct Summary {
  int64_t values = 0, launches = 0;
  double worst = 0.0;
};

// Runs the chain for each row count, checks every output and that nothing past the last row is written.
template <typename T>
void check_chain(const ChainCfg& cfg, const std::vector<int64_t>& row_counts, const RunOpts& o, uint64_t seed,
                 Summary& sum) {
  Rng rng(seed);
  const Model<T> m(cfg, rng, o.packed_offset);
  const int64_t in = cfg.in, out = m.desc.out_features, ld_x = in + o.x_pad;
  for (int64_t rows : row_counts) {
    std::vector<T> x(static_cast<size_t>(rows * ld_x), from_d<T>(kNaN));
    std::vector<std::vector<double>> xd(static_cast<size_t>(rows), std::vector<double>(static_cast<size_t>(in)));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < in; ++c) {
        double v = rng.uniform(-2.0, 2.0);
        if (o.specials) {
          // Rows 3, 7, 11 and 13 of every 16: a NaN, +inf, -inf, and +inf with -inf.
          const int64_t rr = r % 16;
          if (rr == 3 && c == in / 2) v = kNaN;
          if (rr == 7 && c == in - 1) v = kInf;
          if (rr == 11 && c == 0) v = -kInf;
          if (rr == 13 && in >= 2 && c == 0) v = kInf;
          if (rr == 13 && in >= 2 && c == in - 1) v = -kInf;
        }
        x[r * ld_x + c] = from_d<T>(v);
        xd[r][c] = to_d(x[r * ld_x + c]);
      }
    const T sentinel = from_d<T>(-12345.0);
    std::vector<T> y(static_cast<size_t>((rows + 1) * out), sentinel);
    launch_fused<T>(m.desc, m.packed, x.data(), ld_x, y.data(), rows);
    ++sum.launches;
    Compare cmp;
    cmp.factor = kLambda;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<Val> want = m.forward(xd[r]);
      for (int64_t c = 0; c < out; ++c)
        cmp.add(to_d(y[r * out + c]), want[c], [&] {
          return cfg.name + " " + Ty<T>::name + " rows=" + std::to_string(rows) + " y[" + std::to_string(r) + "][" +
                 std::to_string(c) + "]";
        });
    }
    int64_t clobbered = 0;
    for (int64_t c = 0; c < out; ++c) clobbered += !same_bits(y[rows * out + c], sentinel);
    CHECK(cmp.bad == 0, cmp.bad << " of " << cmp.count << " outside the tolerance; first: " << cmp.first);
    CHECK(clobbered == 0, cfg.name << " " << Ty<T>::name << " rows=" << rows << ": " << clobbered
                                   << " values written past the last row");
    sum.values += cmp.count;
    sum.worst = std::max(sum.worst, cmp.worst);
  }
}

template <typename T> void report(const char* what, const Summary& s) {
  std::printf("    %-9s %-28s %3" PRId64 " launches, %7" PRId64 " values, worst |err| / tol %.3f\n", Ty<T>::name,
              what, s.launches, s.values, s.worst);
}

const std::vector<int64_t> kRowSweep{1, 15, 17, 70, 130};

// Widths 1, 3, 15, 16, 17, 33, 63 (partial K tiles, odd K, several panels), every
// epilogue form (none, bias, BatchNorm with and without bias / affine).
ChainCfg widths_chain() {
  return {"widths",
          1,
          {linear(1, Activation::None), linear(3, Activation::ReLU, true), linear(15, Activation::Tanh, true, true),
           linear(16, Activation::Sigmoid), linear(17, Activation::GeluErf, true),
           linear(33, Activation::LeakyReLU, false, true, true, 0.01), linear(63, Activation::SiLU, true, true, true),
           linear(1, Activation::None, true)}};
}

// ScaleShift and Pointwise stages between Linears, first stage not a Linear.
ChainCfg mix_chain() {
  return {"stage-mix",
          17,
          {scale_shift(17, Activation::Hardswish, true), pointwise(17, Activation::GeluTanh),
           linear(33, Activation::ReLU6, false, true, false), scale_shift(33, Activation::None, false),
           pointwise(33, Activation::Hardsigmoid), linear(15, Activation::LeakyReLU, true, false, false, 0.2),
           linear(16, Activation::None), scale_shift(16, Activation::LeakyReLU, true, 0.3)}};
}

// Narrow stages inside a 64-wide chain: the columns past a narrow stage's
// padding hold a wider stage's values (or the 0xCD fill) and must not be read.
ChainCfg narrow_chain() {
  return {"narrow-in-wide",
          40,
          {linear(3, Activation::Tanh, true), pointwise(3, Activation::ReLU), linear(63, Activation::GeluErf, true, true),
           linear(3, Activation::Sigmoid), linear(40, Activation::None, true),
           scale_shift(40, Activation::SiLU, true), linear(5, Activation::Hardswish, false, true, true)}};
}

template <typename T> void fused_chains() {
  const uint64_t seed = 1000 + static_cast<uint64_t>(Ty<T>::dtype) * 100;
  RunOpts specials;
  specials.specials = true;
  specials.x_pad = 3;
  for (const ChainCfg& c : {widths_chain(), mix_chain(), narrow_chain()}) {
    Summary s;
    check_chain<T>(c, {1, 15}, RunOpts{}, seed + 1, s);
    check_chain<T>(c, {17, 70, 130}, specials, seed + 2, s);
    report<T>(c.name.c_str(), s);
  }
}

// Every activation after a Pointwise stage (inputs over [-2, 2] scaled to [-8, 8] by
// a ScaleShift: saturation, the kinks at -3, 0, 3, 6) and after a Linear.
template <typename T> void fused_activations() {
  Summary s;
  for (Activation act : test_util::all_activations()) {
    const double alpha = act == Activation::LeakyReLU ? 0.01 : 0.0;
    const ChainCfg pw{std::string("pointwise-") + act_name(act), 33,
                      {pointwise(33, Activation::None), pointwise(33, act, alpha)}};
    const ChainCfg lin{std::string("linear-") + act_name(act), 33,
                       {linear(17, act, true, true, true, alpha), linear(3, act, false, false, false, alpha)}};
    RunOpts o;
    o.specials = true;
    check_chain<T>(pw, {17}, o, 2000 + static_cast<uint64_t>(act), s);
    check_chain<T>(lin, {17}, o, 3000 + static_cast<uint64_t>(act), s);
  }
  // Inputs spread over [-9, 9] through a BatchNorm-like ScaleShift of scale ~4:
  // Pointwise stages then see the saturation ranges of every activation.
  for (Activation act : test_util::all_activations()) {
    const ChainCfg wide{std::string("spread-") + act_name(act), 16,
                        {linear(16, Activation::None, true, true, true), pointwise(16, act, 0.01)}};
    Rng rng(4000 + static_cast<uint64_t>(act));
    Model<T> m(wide, rng);
    // Scale the folded epilogue of stage 0 by 4 in place (and the reference with it).
    using Acc = typename Model<T>::Acc;
    Acc* scale = reinterpret_cast<Acc*>(m.packed + m.desc.stages[0].scale_offset);
    Acc* shift = reinterpret_cast<Acc*>(m.packed + m.desc.stages[0].shift_offset);
    for (int64_t c = 0; c < 16; ++c) {
      scale[c] *= 4;
      shift[c] *= 4;
      m.affine[0].gamma[c] *= 4;  // gamma/beta scaled by 4 scale the stage's output by 4
      m.affine[0].beta[c] *= 4;
    }
    const int64_t rows = 16;
    std::vector<T> x(static_cast<size_t>(rows * 16));
    std::vector<double> xd(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = from_d<T>(rng.uniform(-2.0, 2.0));
      xd[i] = to_d(x[i]);
    }
    std::vector<T> y(x.size());
    launch_fused<T>(m.desc, m.packed, x.data(), 16, y.data(), rows);
    ++s.launches;
    Compare cmp;
    cmp.factor = kLambda;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<Val> want =
          m.forward(std::vector<double>(xd.begin() + r * 16, xd.begin() + (r + 1) * 16));
      for (int64_t c = 0; c < 16; ++c)
        cmp.add(to_d(y[r * 16 + c]), want[c],
                [&] { return wide.name + " " + Ty<T>::name + " y[" + std::to_string(r) + "][" + std::to_string(c) + "]"; });
    }
    CHECK(cmp.bad == 0, cmp.bad << " of " << cmp.count << " outside the tolerance; first: " << cmp.first);
    s.values += cmp.count;
    s.worst = std::max(s.worst, cmp.worst);
  }
  report<T>("every activation", s);
}

// The most stages a launch carries, and a packed buffer whose panels are not
// 32-byte aligned (half types: WMMA cannot read them in place, the kernel stages them).
template <typename T> void fused_limits() {
  Summary s;
  ChainCfg longest{"24-stages", 16, {}};
  for (int i = 0; longest.stages.size() < static_cast<size_t>(cu::kFusedMaxStages); ++i) {
    const Activation act = static_cast<Activation>(i % sk::kNumActivations);
    if (i % 3 == 2)
      longest.stages.push_back(pointwise(16, act, 0.05));
    else
      longest.stages.push_back(linear(16, act, i % 2 == 0, i % 4 == 1, true, 0.05));
  }
  check_chain<T>(longest, {17}, RunOpts{}, 5001, s);
  RunOpts shifted;
  shifted.packed_offset = 16;
  shifted.specials = true;
  check_chain<T>(widths_chain(), {17}, shifted, 5002, s);
  check_chain<T>(narrow_chain(), {17}, shifted, 5003, s);
  report<T>("24 stages, unaligned panels", s);
}

// The widest chain each type admits: compute the largest width with
// fused_mlp_smem_bytes<T>(width) <= 99 KiB (mlp_cuda.cu's kFusedSmemLimit).
constexpr int64_t kFusedSmemLimit = 99 * 1024;
template <typename T> int64_t max_fused_width() {
  int64_t w = 16;
  while (cu::fused_mlp_smem_bytes<T>(static_cast<int>(w + 16)) <= kFusedSmemLimit) w += 16;
  return w;
}

template <typename T> void smem_limit() {
  const int64_t w = max_fused_width<T>();
  const int64_t bytes = cu::fused_mlp_smem_bytes<T>(static_cast<int>(w));
  std::printf("    %-9s largest fused width %4" PRId64 ": %6" PRId64 " bytes of dynamic shared memory (limit %" PRId64
              ")\n",
              Ty<T>::name, w, bytes, kFusedSmemLimit);
  CHECK(bytes <= kFusedSmemLimit, Ty<T>::name << ": " << bytes);
  CHECK(w >= 64, Ty<T>::name << ": the fused kernel should serve widths up to 64 at least, got " << w);
  // Monotone in the width, so every width the adapter lets through fits.
  for (int64_t v = 16; v <= w; v += 16)
    CHECK(cu::fused_mlp_smem_bytes<T>(static_cast<int>(v)) <= bytes, Ty<T>::name << " width " << v);
  CHECK(cu::fused_mlp_smem_bytes<T>(static_cast<int>(w + 16)) > kFusedSmemLimit, Ty<T>::name);
  // And a chain of that width runs (every activation buffer column and the
  // scratch / staging tiles inside the block's shared memory).
  Summary s;
  RunOpts o;
  o.specials = true;
  check_chain<T>({"max-width", w - 1, {linear(w, Activation::ReLU, true), linear(5, Activation::None, true)}}, {16}, o,
                 6000, s);
  report<T>("widest chain", s);
}

TEST(fused_mlp_smem_within_limit) {
  smem_limit<float>();
  smem_limit<double>();
  smem_limit<__half>();
  smem_limit<__nv_bfloat16>();
}

TEST(fused_mlp_float32) {
  fused_chains<float>();
  fused_activations<float>();
  fused_limits<float>();
}
TEST(fused_mlp_float64) {
  fused_chains<double>();
  fused_activations<double>();
  fused_limits<double>();
}
TEST(fused_mlp_float16) {
  fused_chains<__half>();
  fused_activations<__half>();
  fused_limits<__half>();
}
TEST(fused_mlp_bfloat16) {
  fused_chains<__nv_bfloat16>();
  fused_activations<__nv_bfloat16>();
  fused_limits<__nv_bfloat16>();
}

// ---- channel epilogue -----------------------------------------------------------------------

template <typename T> void channel_epilogue_case(int64_t rows, int64_t channels, bool affine, bool in_place,
                                                 Activation act, double alpha, uint64_t seed, Summary& sum) {
  using P = typename Ty<T>::packed;
  using Acc = sk::acc_t<P>;
  Rng rng(seed);
  const int64_t ld_in = channels + 3, ld_out = in_place ? ld_in : channels + 1;
  std::vector<T> in(static_cast<size_t>(rows * ld_in), from_d<T>(kNaN));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      double v = rng.uniform(-8.0, 8.0);
      if (r == 1 && c == channels / 2) v = kNaN;
      if (r == 2) v = c % 2 ? kInf : -kInf;
      in[r * ld_in + c] = from_d<T>(v);
    }
  Affine aff;
  std::vector<Acc> scale, shift;
  if (affine) {
    std::vector<T> bias, gamma, beta, mean, var;
    auto values = [&](double lo, double hi, std::vector<T>& t, std::vector<double>& d) {
      for (int64_t c = 0; c < channels; ++c) {
        t.push_back(from_d<T>(rng.uniform(lo, hi)));
        d.push_back(to_d(t.back()));
      }
    };
    values(-0.5, 0.5, bias, aff.bias);
    values(-0.5, 0.5, mean, aff.mean);
    values(0.3, 2.0, var, aff.var);
    values(0.5, 1.5, gamma, aff.gamma);
    values(-0.5, 0.5, beta, aff.beta);
    const size_t padded = static_cast<size_t>(sk::round_up(channels, sk::kPanelWidth));
    scale.resize(padded);
    shift.resize(padded);
    auto p = [](const std::vector<T>& v) { return reinterpret_cast<const P*>(v.data()); };
    sk::fold_scale_shift<P>(channels, p(bias), p(gamma), p(beta), p(mean), p(var), aff.eps, scale.data(),
                            shift.data());
  }
  const T sentinel = from_d<T>(-12345.0);
  std::vector<T> out_buf(in_place ? 0 : static_cast<size_t>(rows * ld_out), sentinel);
  std::vector<T> expected_in = in;
  T* out = in_place ? in.data() : out_buf.data();
  cu::ChannelEpilogueArgs<T> a{};
  a.in = in.data();
  a.ld_in = ld_in;
  a.out = out;
  a.ld_out = ld_out;
  a.rows = rows;
  a.channels = channels;
  a.scale = affine ? scale.data() : nullptr;
  a.shift = affine ? shift.data() : nullptr;
  a.activation = static_cast<int32_t>(act);
  a.alpha = static_cast<cu::acc_of<T>>(alpha);
  // 2 blocks of 64 threads: fewer threads than values, the grid-stride loop runs several rounds.
  simt::launch(cu::channel_epilogue_kernel<T>, dim3(2), dim3(64), 0, a);
  ++sum.launches;
  Compare cmp;
  int64_t clobbered = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < channels; ++c) {
      Val x{to_d(expected_in[r * ld_in + c]), 0.0};
      if (affine) x = aff.apply(x, c, Ty<T>::u_acc);
      const Val want = store_val<T>(act_val(act, x, alpha, Ty<T>::u_acc));
      cmp.add(to_d(out[r * ld_out + c]), want, [&] {
        return std::string("channel epilogue ") + Ty<T>::name + " " + act_name(act) + " C=" +
               std::to_string(channels) + (affine ? " affine" : "") + (in_place ? " in place" : "") + " [" +
               std::to_string(r) + "][" + std::to_string(c) + "]";
      });
    }
    for (int64_t c = channels; c < ld_out; ++c)
      clobbered += !same_bits(out[r * ld_out + c], in_place ? expected_in[r * ld_in + c] : sentinel);
  }
  CHECK(cmp.bad == 0, cmp.bad << " of " << cmp.count << " outside the tolerance; first: " << cmp.first);
  CHECK(clobbered == 0, "channel epilogue " << Ty<T>::name << ": " << clobbered << " row-padding values written");
  sum.values += cmp.count;
  sum.worst = std::max(sum.worst, cmp.worst);
}

template <typename T> void channel_epilogue_all() {
  Summary s;
  uint64_t seed = 7000;
  for (Activation act : test_util::all_activations()) {
    const double alpha = 0.01;
    channel_epilogue_case<T>(37, 17, true, false, act, alpha, ++seed, s);
    channel_epilogue_case<T>(5, 1, true, true, act, alpha, ++seed, s);
    channel_epilogue_case<T>(9, 64, false, act == Activation::ReLU, act, alpha, ++seed, s);
  }
  report<T>("channel epilogue", s);
}

TEST(channel_epilogue_kernel_all_types) {
  channel_epilogue_all<float>();
  channel_epilogue_all<double>();
  channel_epilogue_all<__half>();
  channel_epilogue_all<__nv_bfloat16>();
}

// ---- pools --------------------------------------------------------------------------------------

// ATen's pooling_output_shape (div_rtn, and with ceil_mode the last window must
// start inside the input or its left padding).
int64_t pool_out(int64_t in, int64_t k, int64_t s, int64_t pad, int64_t d, bool ceil_mode) {
  const int64_t num = in + 2 * pad - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + pad) --out;
  return out;
}

struct PoolCfg {
  bool max;
  int64_t h, w, c;
  int kh, kw, sh, sw, ph, pw, dh, dw;
  bool ceil_mode, count_include_pad;
  int64_t divisor;
  Activation act;
};

template <typename T> void pool_case(const PoolCfg& p, uint64_t seed, Summary& sum) {
  const double u = Ty<T>::u_acc;
  Rng rng(seed);
  const int64_t n = 2;
  const int64_t oh = pool_out(p.h, p.kh, p.sh, p.ph, p.dh, p.ceil_mode);
  const int64_t ow = pool_out(p.w, p.kw, p.sw, p.pw, p.dw, p.ceil_mode);
  std::vector<T> in(static_cast<size_t>(n * p.h * p.w * p.c));
  for (size_t i = 0; i < in.size(); ++i) in[i] = from_d<T>(rng.uniform(-3.0, 3.0));
  // Specials in channel 0 of image 1: a NaN (wins a max, poisons an average), +inf and -inf
  // (an average of both is NaN).
  auto at = [&](int64_t img, int64_t y, int64_t x, int64_t c) { return ((img * p.h + y) * p.w + x) * p.c + c; };
  in[at(1, 1, 1, 0)] = from_d<T>(kNaN);
  in[at(1, p.h - 1, p.w - 1, 0)] = from_d<T>(kInf);
  in[at(1, p.h - 1, p.w - 2, 0)] = from_d<T>(-kInf);
  if (p.c > 1) in[at(0, 0, 0, 1)] = from_d<T>(-kInf);
  std::vector<T> out(static_cast<size_t>(n * oh * ow * p.c + 1), from_d<T>(-12345.0));
  const cu::PoolGeometry g{n,
                           p.h,
                           p.w,
                           oh,
                           ow,
                           p.c,
                           p.kh,
                           p.kw,
                           p.sh,
                           p.sw,
                           p.ph,
                           p.pw,
                           p.ph,
                           p.pw,
                           p.dh,
                           p.dw,
                           p.divisor,
                           p.count_include_pad,
                           static_cast<int32_t>(p.act),
                           static_cast<decltype(cu::PoolGeometry::alpha)>(0.01)};
  if (p.max)
    simt::launch(cu::pool_kernel<T, true>, dim3(3), dim3(32), 0, static_cast<const T*>(in.data()), out.data(), g);
  else
    simt::launch(cu::pool_kernel<T, false>, dim3(3), dim3(32), 0, static_cast<const T*>(in.data()), out.data(), g);
  ++sum.launches;
  Compare cmp;
  for (int64_t img = 0; img < n; ++img)
    for (int64_t oy = 0; oy < oh; ++oy)
      for (int64_t ox = 0; ox < ow; ++ox)
        for (int64_t c = 0; c < p.c; ++c) {
          Val r;
          if (p.max) {
            // ATen: start at -inf, take a value that is greater or NaN (so a NaN stays).
            double m = -kInf;
            for (int64_t i = 0; i < p.kh; ++i)
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t y = oy * p.sh - p.ph + i * p.dh, x = ox * p.sw - p.pw + j * p.dw;
                if (y < 0 || y >= p.h || x < 0 || x >= p.w) continue;
                const double v = to_d(in[at(img, y, x, c)]);
                if (v > m || std::isnan(v)) m = v;
              }
            r = Val{m, 0.0};
          } else {
            // ATen's avg_pool2d: the window clipped to the padded input sizes
            // pool_size; clipped to the input, the valid count; the divisor is
            // divisor_override, else pool_size with count_include_pad, else the valid count.
            int64_t hs = oy * p.sh - p.ph, ws = ox * p.sw - p.pw;
            int64_t he = std::min<int64_t>(hs + p.kh, p.h + p.ph), we = std::min<int64_t>(ws + p.kw, p.w + p.pw);
            const int64_t pool_size = (he - hs) * (we - ws);
            hs = std::max<int64_t>(hs, 0);
            ws = std::max<int64_t>(ws, 0);
            he = std::min<int64_t>(he, p.h);
            we = std::min<int64_t>(we, p.w);
            if (hs >= he || ws >= we) {
              r = Val{0.0, 0.0};
            } else {
              double s = 0.0, mag = 0.0;
              for (int64_t y = hs; y < he; ++y)
                for (int64_t x = ws; x < we; ++x) {
                  s += to_d(in[at(img, y, x, c)]);
                  mag += std::abs(to_d(in[at(img, y, x, c)]));
                }
              const int64_t div = p.divisor ? p.divisor : p.count_include_pad ? pool_size : (he - hs) * (we - ws);
              const double avg = s / static_cast<double>(div);
              const double cnt = static_cast<double>((he - hs) * (we - ws));
              r = Val{avg, std::isfinite(avg) ? (cnt + 1) * u * mag / static_cast<double>(div) + u * std::abs(avg)
                                              : 0.0};
            }
          }
          const Val want = store_val<T>(act_val(p.act, r, 0.01, u));
          const int64_t o = ((img * oh + oy) * ow + ox) * p.c + c;
          cmp.add(to_d(out[o]), want, [&] {
            return std::string(p.max ? "max" : "avg") + " pool " + Ty<T>::name + " " + std::to_string(p.kh) + "x" +
                   std::to_string(p.kw) + " out [" + std::to_string(img) + "][" + std::to_string(oy) + "][" +
                   std::to_string(ox) + "][" + std::to_string(c) + "]";
          });
        }
  CHECK(cmp.bad == 0, cmp.bad << " of " << cmp.count << " outside the tolerance; first: " << cmp.first);
  CHECK(same_bits(out.back(), from_d<T>(-12345.0)), "pool " << Ty<T>::name << ": wrote past the output");
  sum.values += cmp.count;
  sum.worst = std::max(sum.worst, cmp.worst);
}

template <typename T> void pools_all() {
  using A = Activation;
  // max, h, w, c, kh, kw, sh, sw, ph, pw, dh, dw, ceil, include_pad, divisor, act
  const std::vector<PoolCfg> cfgs{
      {true, 7, 7, 5, 3, 3, 2, 2, 1, 1, 1, 1, false, false, 0, A::None},
      {true, 5, 7, 3, 2, 2, 2, 2, 0, 0, 1, 1, true, false, 0, A::ReLU},         // ceil: partial last windows
      {true, 6, 5, 17, 3, 2, 1, 2, 1, 0, 2, 1, false, false, 0, A::LeakyReLU},  // dilated, rectangular
      {true, 8, 6, 2, 3, 3, 3, 2, 1, 1, 2, 2, true, false, 0, A::Sigmoid},      // dilated + ceil
      {true, 4, 4, 1, 1, 1, 1, 1, 0, 0, 1, 1, false, false, 0, A::Tanh},        // 1x1 window
      {false, 7, 7, 5, 3, 3, 2, 2, 1, 1, 1, 1, false, true, 0, A::None},        // count_include_pad
      {false, 7, 7, 5, 3, 3, 2, 2, 1, 1, 1, 1, false, false, 0, A::GeluErf},    // excluded padding
      {false, 6, 6, 3, 3, 3, 2, 2, 1, 1, 1, 1, true, true, 0, A::Hardswish},    // ceil: past the padding
      {false, 6, 6, 3, 3, 3, 2, 2, 1, 1, 1, 1, true, false, 0, A::ReLU6},
      {false, 5, 4, 17, 2, 3, 2, 1, 1, 1, 1, 1, true, true, 5, A::SiLU},        // divisor_override
      {false, 5, 4, 2, 2, 2, 2, 2, 0, 0, 1, 1, true, false, 3, A::GeluTanh},
      {false, 5, 5, 4, 2, 2, 1, 1, 0, 0, 1, 1, false, false, 0, A::Hardsigmoid},
  };
  Summary s;
  uint64_t seed = 8000;
  for (const PoolCfg& p : cfgs) pool_case<T>(p, ++seed, s);
  report<T>("max / avg pools", s);
}

TEST(pool_kernel_all_types) {
  pools_all<float>();
  pools_all<double>();
  pools_all<__half>();
  pools_all<__nv_bfloat16>();
}

template <typename T> void global_avg_pool_all() {
  const double u = Ty<T>::u_acc;
  Summary s;
  uint64_t seed = 9000;
  struct Case {
    int64_t n, hw, c;
    Activation act;
  };
  for (const Case& k : {Case{2, 49, 17, Activation::None}, Case{3, 1, 5, Activation::ReLU},
                        Case{1, 9, 64, Activation::Sigmoid}, Case{2, 7, 3, Activation::LeakyReLU}}) {
    Rng rng(++seed);
    std::vector<T> in(static_cast<size_t>(k.n * k.hw * k.c));
    for (T& v : in) v = from_d<T>(rng.uniform(-3.0, 3.0));
    in[static_cast<size_t>(k.c)] = from_d<T>(kNaN);  // image 0, pixel 1 (or image 1), channel 0
    if (k.c > 2) {
      in[2] = from_d<T>(kInf);
      in[in.size() - 1] = from_d<T>(-kInf);
    }
    std::vector<T> out(static_cast<size_t>(k.n * k.c + 1), from_d<T>(-12345.0));
    simt::launch(cu::global_avg_pool_kernel<T>, dim3(2), dim3(32), 0, static_cast<const T*>(in.data()), out.data(),
                 k.n, k.hw, k.c, static_cast<int32_t>(k.act), 0.01);
    ++s.launches;
    Compare cmp;
    for (int64_t img = 0; img < k.n; ++img)
      for (int64_t c = 0; c < k.c; ++c) {
        double sum = 0.0, mag = 0.0;
        for (int64_t p = 0; p < k.hw; ++p) {
          const double v = to_d(in[(img * k.hw + p) * k.c + c]);
          sum += v;
          mag += std::abs(v);
        }
        const double avg = sum / static_cast<double>(k.hw);
        const Val r{avg, std::isfinite(avg) ? (static_cast<double>(k.hw) + 1) * u * mag / static_cast<double>(k.hw) +
                                                  u * std::abs(avg)
                                            : 0.0};
        cmp.add(to_d(out[img * k.c + c]), store_val<T>(act_val(k.act, r, 0.01, u)), [&] {
          return std::string("global avg pool ") + Ty<T>::name + " [" + std::to_string(img) + "][" +
                 std::to_string(c) + "]";
        });
      }
    CHECK(cmp.bad == 0, cmp.bad << " of " << cmp.count << " outside the tolerance; first: " << cmp.first);
    CHECK(same_bits(out.back(), from_d<T>(-12345.0)), "global avg pool " << Ty<T>::name << ": wrote past the output");
    s.values += cmp.count;
    s.worst = std::max(s.worst, cmp.worst);
  }
  report<T>("global avg pool", s);
}

TEST(global_avg_pool_kernel_all_types) {
  global_avg_pool_all<float>();
  global_avg_pool_all<double>();
  global_avg_pool_all<__half>();
  global_avg_pool_all<__nv_bfloat16>();
}

}  // namespace

int main() {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  int64_t failed_tests = 0;
  for (const check::TestCase& test : check::tests()) {
    const int64_t failed_before = check::counters().failed;
    const auto t0 = clock::now();
    try {
      test.fn();
    } catch (const std::exception& e) {
      check::record(false, __FILE__, __LINE__, test.name, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      check::record(false, __FILE__, __LINE__, test.name, "uncaught non-standard exception");
    }
    const bool ok = check::counters().failed == failed_before;
    failed_tests += !ok;
    std::printf("%s %s (%.0f ms)\n", ok ? "[  OK  ]" : "[FAILED]", test.name,
                std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    std::fflush(stdout);
  }
  const check::Counters& c = check::counters();
  std::printf("%" PRId64 " passed, %" PRId64 " failed (%.1f s)\n", c.passed, c.failed,
              std::chrono::duration<double>(clock::now() - start).count());
  return c.failed == 0 && failed_tests == 0 ? 0 : 1;
}
