// Unit tests of the torch-free convolution kernels (csrc/kernels/conv_*):
// spec decoding and the packed layout, output geometry, parameter packing,
// every stage kind through conv_stage_forward (stage by stage, split over
// pixel ranges) and conv_forward_images (one image at a time), for float32,
// float64 and bfloat16 I/O on every ISA variant the CPU allows, against a
// naive double-precision NHWC reference written here from PyTorch's
// definitions; and the NCHW <-> NHWC conversions at a run's boundaries.
//
// The check framework and the shared helpers live in check.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "conv_forward.h"

namespace {

using namespace test_util;
using sk::Activation;
using sk::bf16;
using sk::DType;
using Kind = sk::ConvStageKind;

constexpr int64_t kBias = sk::kHasBias;
constexpr int64_t kBn = sk::kHasBatchNorm;                              // eval BatchNorm, not affine
constexpr int64_t kBnAffine = sk::kHasBatchNorm | sk::kBatchNormAffine;  // eval BatchNorm with gamma/beta
constexpr int64_t kCeil = sk::kCeilMode;
constexpr int64_t kIncludePad = sk::kCountIncludePad;

// ---- specs ------------------------------------------------------------------------------

// A stage's window: the ten window values of the spec, in its order.
struct Window {
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
};

// Kernel k, stride s, padding p on every side, dilation d.
Window square(int64_t k, int64_t s = 1, int64_t p = 0, int64_t d = 1) { return {k, k, s, s, p, p, p, p, d, d}; }

struct StageSpec {
  Kind kind;
  int64_t out_channels;
  Activation activation = Activation::None;
  int64_t flags = 0;
  Window window = {};
  int64_t param = 0;    // Conv: groups; AvgPool: divisor_override (0: none); Linear: in_features
  int64_t options = 0;  // pools: kCeil | kIncludePad
  double alpha = 0.1;   // LeakyReLU slope
  double eps = 1e-5;    // BatchNorm eps
};

// A conv run, built one stage at a time. Channels are tracked the way the
// planner encodes them: a Flatten keeps its input's channel count, the Linear
// after it names its in_features.
struct ConvSpec {
  explicit ConvSpec(int64_t in) : in_channels(in) {}
  int64_t in_channels;
  std::vector<StageSpec> stages;

  int64_t channels() const { return stages.empty() ? in_channels : stages.back().out_channels; }
  // The channels stage i reads (a Linear: its in_features).
  int64_t stage_in_channels(size_t i) const {
    if (stages[i].kind == Kind::Linear) return stages[i].param;
    return i == 0 ? in_channels : stages[i - 1].out_channels;
  }

  ConvSpec& add(const StageSpec& s) {
    stages.push_back(s);
    return *this;
  }
  ConvSpec& conv(int64_t out, Window w, int64_t groups = 1, Activation act = Activation::None, int64_t flags = kBias) {
    return add({Kind::Conv, out, act, flags, w, groups});
  }
  ConvSpec& scale_shift(Activation act = Activation::None, int64_t flags = kBnAffine) {
    return add({Kind::ScaleShift, channels(), act, flags});
  }
  ConvSpec& pointwise(Activation act) { return add({Kind::Pointwise, channels(), act}); }
  ConvSpec& max_pool(Window w, int64_t options = 0, Activation act = Activation::None) {
    return add({Kind::MaxPool, channels(), act, 0, w, 0, options});
  }
  ConvSpec& avg_pool(Window w, int64_t options = 0, int64_t divisor = 0, Activation act = Activation::None) {
    return add({Kind::AvgPool, channels(), act, 0, w, divisor, options});
  }
  ConvSpec& global_avg_pool(Activation act = Activation::None) {
    return add({Kind::GlobalAvgPool, channels(), act});
  }
  ConvSpec& flatten() { return add({Kind::Flatten, channels()}); }
  ConvSpec& linear(int64_t out, int64_t in_features, Activation act = Activation::None, int64_t flags = kBias) {
    return add({Kind::Linear, out, act, flags, {}, in_features});
  }

  std::string describe() const {
    static const char* const kinds[] = {"Conv",    "ScaleShift",    "Pointwise", "MaxPool",
                                        "AvgPool", "GlobalAvgPool", "Flatten",   "Linear"};
    std::ostringstream os;
    os << "in=" << in_channels;
    for (const StageSpec& s : stages) {
      const Window& w = s.window;
      os << " | " << kinds[static_cast<int>(s.kind)] << "(" << s.out_channels;
      if (s.kind == Kind::Conv || s.kind == Kind::MaxPool || s.kind == Kind::AvgPool)
        os << " k" << w.kernel_h << "x" << w.kernel_w << " s" << w.stride_h << "x" << w.stride_w << " p" << w.pad_top
           << "," << w.pad_left << "," << w.pad_bottom << "," << w.pad_right << " d" << w.dilation_h << "x"
           << w.dilation_w;
      if (s.kind == Kind::Conv) os << " g" << s.param;
      if (s.kind == Kind::Linear) os << " in" << s.param;
      if (s.kind == Kind::AvgPool && s.param) os << " div" << s.param;
      if (s.options & kCeil) os << " ceil";
      if (s.options & kIncludePad) os << " include_pad";
      if (s.activation != Activation::None) os << " " << activation_name(s.activation);
      if (s.flags & kBias) os << " bias";
      if (s.flags & kBn) os << ((s.flags & sk::kBatchNormAffine) ? " bn" : " bn-noaffine");
      os << ")";
    }
    return os.str();
  }
};

// The int64 spec and double fparams lists, in conv_spec.h's format.
struct EncodedSpec {
  std::vector<int64_t> spec;
  std::vector<double> fparams;
};

EncodedSpec encode(const ConvSpec& c, DType dtype) {
  EncodedSpec e;
  e.spec = {sk::kConvSpecVersion, static_cast<int64_t>(dtype), static_cast<int64_t>(c.stages.size()), c.in_channels};
  for (const StageSpec& s : c.stages) {
    const Window& w = s.window;
    e.spec.insert(e.spec.end(), {static_cast<int64_t>(s.kind), s.out_channels, static_cast<int64_t>(s.activation),
                                 s.flags, w.kernel_h, w.kernel_w, w.stride_h, w.stride_w, w.pad_top, w.pad_left,
                                 w.pad_bottom, w.pad_right, w.dilation_h, w.dilation_w, s.param, s.options});
    e.fparams.insert(e.fparams.end(), {s.alpha, s.eps});
  }
  return e;
}

sk::ConvDesc decode(const EncodedSpec& e) {
  return sk::decode_conv_spec(e.spec.data(), e.spec.size(), e.fparams.data(), e.fparams.size());
}

// ---- geometry, by definition -------------------------------------------------------------

// Windows along one dimension, counted one start position at a time. A window
// starting at t = 0, s, 2s, ... (padded coordinates) covers [t, t + extent)
// and counts when it lies inside the padded input. With ceil_mode the first
// window that runs past the end counts too, when the window one stride before
// it (for t = 0, the one at -s) ends before the end of the padded input; and
// the last window must start inside the input or the left padding (else it is
// dropped). This is PyTorch's ceil((in + pads - extent) / s) + 1 rule.
int64_t count_windows(int64_t in, int64_t k, int64_t s, int64_t pad_before, int64_t pad_after, int64_t d,
                      bool ceil_mode) {
  const int64_t padded = in + pad_before + pad_after, extent = d * (k - 1) + 1;
  int64_t count = 0, t = 0;
  for (; t + extent <= padded; t += s) ++count;
  if (!ceil_mode) return count;
  if ((t - s) + extent < padded) ++count, t += s;
  if (count > 0 && t - s >= in + pad_before) --count;  // t - s: the last window's start
  return count;
}

struct Shape {
  int64_t h, w, c;
  int64_t elems() const { return h * w * c; }
};

// A stage's output shape for input `in`, from the stage's PyTorch definition.
Shape reference_out_shape(const StageSpec& s, Shape in) {
  const Window& w = s.window;
  const bool ceil_mode = s.kind != Kind::Conv && (s.options & kCeil);
  switch (s.kind) {
    case Kind::Conv:
    case Kind::MaxPool:
    case Kind::AvgPool:
      return {count_windows(in.h, w.kernel_h, w.stride_h, w.pad_top, w.pad_bottom, w.dilation_h, ceil_mode),
              count_windows(in.w, w.kernel_w, w.stride_w, w.pad_left, w.pad_right, w.dilation_w, ceil_mode),
              s.out_channels};
    case Kind::GlobalAvgPool: return {1, 1, in.c};
    case Kind::Flatten: return {1, 1, in.elems()};
    case Kind::Linear: return {1, 1, s.out_channels};
    default: return in;
  }
}

// ---- models: spec + random parameters + packed buffer -------------------------------------

template <typename T> struct StageParams {
  std::vector<T> weight;  // Conv: [out][in/groups][kh][kw]; Linear: [out][in]
  std::vector<T> bias;    // empty when absent
  std::vector<T> bn_weight, bn_bias, bn_mean, bn_var;
};

// Weights in +-2/sqrt(reduction) and inputs in [-4, 4] keep activations O(1)
// yet reach the interesting ranges of the activations.
template <typename T> StageParams<T> random_params(const ConvSpec& spec, size_t i, Rng& rng) {
  const StageSpec& s = spec.stages[i];
  StageParams<T> p;
  const int64_t n = s.out_channels;
  if (s.kind == Kind::Conv || s.kind == Kind::Linear) {
    const int64_t groups = s.kind == Kind::Conv ? s.param : 1;
    const int64_t reduction = spec.stage_in_channels(i) / groups * s.window.kernel_h * s.window.kernel_w;
    const double bound = 2.0 / std::sqrt(static_cast<double>(reduction));
    p.weight = random_values<T>(rng, n * reduction, -bound, bound);
    if (s.flags & kBias) p.bias = random_values<T>(rng, n, -0.5, 0.5);
  }
  if (s.flags & kBn) {
    p.bn_mean = random_values<T>(rng, n, -0.5, 0.5);
    p.bn_var = random_values<T>(rng, n, 0.25, 2.0);
    if (s.flags & sk::kBatchNormAffine) {
      p.bn_weight = random_values<T>(rng, n, 0.5, 1.5);
      p.bn_bias = random_values<T>(rng, n, -0.5, 0.5);
    }
  }
  return p;
}

template <typename T> struct ConvModel {
  ConvSpec spec;
  sk::ConvDesc desc;
  std::vector<StageParams<T>> params;
  AlignedBytes packed;
};

// Decodes the spec for T and packs random parameters into a zero-filled
// buffer, as pack_conv_stage expects.
template <typename T> ConvModel<T> make_model(const ConvSpec& spec, Rng& rng) {
  sk::ConvDesc desc = decode(encode(spec, TypeInfo<T>::dtype));
  std::vector<StageParams<T>> params;
  for (size_t i = 0; i < spec.stages.size(); ++i) params.push_back(random_params<T>(spec, i, rng));
  AlignedBytes packed(desc.packed_bytes);
  std::memset(packed.data.get(), 0, static_cast<size_t>(desc.packed_bytes));
  for (size_t i = 0; i < desc.stages.size(); ++i) {
    const StageParams<T>& p = params[i];
    sk::pack_conv_stage<T>(desc.stages[i], data_or_null(p.weight), data_or_null(p.bias), data_or_null(p.bn_weight),
                           data_or_null(p.bn_bias), data_or_null(p.bn_mean), data_or_null(p.bn_var),
                           packed.data.get());
  }
  return ConvModel<T>{spec, std::move(desc), std::move(params), std::move(packed)};
}

// ---- the double-precision reference ---------------------------------------------------------

// A batch of NHWC activations, with for each value the total size of the
// (finite) terms that went into it: rounding errors of the kernels'
// arithmetic are proportional to it.
struct Nhwc {
  int64_t n = 0, h = 0, w = 0, c = 0;
  std::vector<double> value, magnitude;

  Nhwc(int64_t n_, Shape s) : n(n_), h(s.h), w(s.w), c(s.c), value(size()), magnitude(size()) {}
  Shape shape() const { return {h, w, c}; }
  size_t size() const { return static_cast<size_t>(n * h * w * c); }
  size_t index(int64_t i, int64_t y, int64_t x, int64_t ch) const {
    return static_cast<size_t>(((i * h + y) * w + x) * c + ch);
  }
};

template <typename T> Nhwc to_reference_input(const std::vector<T>& x, int64_t n, Shape s) {
  Nhwc r(n, s);
  for (size_t i = 0; i < r.size(); ++i) {
    r.value[i] = to_double(x[i]);
    r.magnitude[i] = std::isfinite(r.value[i]) ? std::abs(r.value[i]) : 0.0;
  }
  return r;
}

// Output channel j's bias and eval BatchNorm ((v - mean) / sqrt(var + eps) *
// gamma + beta), then the activation, applied to acc and its magnitude.
template <typename T>
void reference_epilogue(const StageSpec& s, const StageParams<T>& p, int64_t j, bool float_kernel, double& acc,
                        double& mag) {
  auto param = [j](const std::vector<T>& v, double absent) { return v.empty() ? absent : to_double(v[j]); };
  const double b = param(p.bias, 0.0);
  acc += b;
  mag += std::abs(b);
  if (s.flags & kBn) {
    const double scale = param(p.bn_weight, 1.0) / std::sqrt(param(p.bn_var, 1.0) + s.eps);
    const double mean = param(p.bn_mean, 0.0), beta = param(p.bn_bias, 0.0);
    acc = (acc - mean) * scale + beta;
    mag = (mag + std::abs(mean)) * std::abs(scale) + std::abs(beta);
  }
  acc = activation_reference(s.activation, acc, s.alpha, float_kernel);
  mag *= kActivationGain * std::max(1.0, std::abs(s.alpha));
}

// Convolution with zero padding (PyTorch's Conv2d), groups of in/groups input
// and out/groups output channels. A Linear is the same over 1x1 images.
template <typename T>
void reference_conv(const StageSpec& s, const StageParams<T>& p, const Nhwc& in, Nhwc& out, bool float_kernel) {
  const Window& w = s.window;
  const int64_t groups = s.kind == Kind::Conv ? s.param : 1;
  const int64_t cin_g = in.c / groups, cout_g = out.c / groups;
  for (int64_t i = 0; i < out.n; ++i)
    for (int64_t oy = 0; oy < out.h; ++oy)
      for (int64_t ox = 0; ox < out.w; ++ox)
        for (int64_t co = 0; co < out.c; ++co) {
          const int64_t g = co / cout_g;
          double acc = 0.0, mag = 0.0;
          for (int64_t ky = 0; ky < w.kernel_h; ++ky) {
            const int64_t iy = oy * w.stride_h - w.pad_top + ky * w.dilation_h;
            if (iy < 0 || iy >= in.h) continue;
            for (int64_t kx = 0; kx < w.kernel_w; ++kx) {
              const int64_t ix = ox * w.stride_w - w.pad_left + kx * w.dilation_w;
              if (ix < 0 || ix >= in.w) continue;
              for (int64_t ci = 0; ci < cin_g; ++ci) {
                const double wt = to_double(p.weight[((co * cin_g + ci) * w.kernel_h + ky) * w.kernel_w + kx]);
                const size_t at = in.index(i, iy, ix, g * cin_g + ci);
                acc += wt * in.value[at];
                mag += std::abs(wt) * in.magnitude[at];
              }
            }
          }
          reference_epilogue(s, p, co, float_kernel, acc, mag);
          const size_t at = out.index(i, oy, ox, co);
          out.value[at] = acc;
          out.magnitude[at] = mag;
        }
}

// PyTorch's max / average pooling. Max: padding never wins, a NaN does.
// Average: the sum over the window's in-bounds values divided by
// divisor_override, else by the window clipped to the input plus padding
// (count_include_pad) or by its in-bounds count.
void reference_pool(const StageSpec& s, const Nhwc& in, Nhwc& out, bool float_kernel) {
  const Window& w = s.window;
  const bool is_max = s.kind == Kind::MaxPool;
  for (int64_t i = 0; i < out.n; ++i)
    for (int64_t oy = 0; oy < out.h; ++oy)
      for (int64_t ox = 0; ox < out.w; ++ox) {
        const int64_t y0 = oy * w.stride_h - w.pad_top, x0 = ox * w.stride_w - w.pad_left;
        const int64_t padded_h = std::min(y0 + w.kernel_h, in.h + w.pad_bottom) - y0;
        const int64_t padded_w = std::min(x0 + w.kernel_w, in.w + w.pad_right) - x0;
        for (int64_t ch = 0; ch < out.c; ++ch) {
          double acc = is_max ? -kInf : 0.0, mag = 0.0;
          int64_t count = 0;
          for (int64_t ky = 0; ky < w.kernel_h; ++ky) {
            const int64_t iy = y0 + ky * w.dilation_h;
            if (iy < 0 || iy >= in.h) continue;
            for (int64_t kx = 0; kx < w.kernel_w; ++kx) {
              const int64_t ix = x0 + kx * w.dilation_w;
              if (ix < 0 || ix >= in.w) continue;
              const size_t at = in.index(i, iy, ix, ch);
              const double v = in.value[at];
              ++count;
              if (is_max) {
                acc = std::isnan(acc) || std::isnan(v) ? kNaN : std::max(acc, v);
                mag = std::max(mag, in.magnitude[at]);
              } else {
                acc += v;
                mag += in.magnitude[at];
              }
            }
          }
          if (!is_max) {
            const int64_t divisor = s.param ? s.param : (s.options & kIncludePad) ? padded_h * padded_w : count;
            acc /= static_cast<double>(divisor);
            mag /= static_cast<double>(divisor);
          }
          acc = activation_reference(s.activation, acc, s.alpha, float_kernel);
          mag *= kActivationGain * std::max(1.0, std::abs(s.alpha));
          const size_t at = out.index(i, oy, ox, ch);
          out.value[at] = acc;
          out.magnitude[at] = mag;
        }
      }
}

template <typename T>
Nhwc reference_stage(const StageSpec& s, const StageParams<T>& p, const Nhwc& in, bool float_kernel) {
  Nhwc out(in.n, reference_out_shape(s, in.shape()));
  switch (s.kind) {
    case Kind::Conv:
    case Kind::Linear: reference_conv(s, p, in, out, float_kernel); break;
    case Kind::MaxPool:
    case Kind::AvgPool: reference_pool(s, in, out, float_kernel); break;
    case Kind::ScaleShift:
    case Kind::Pointwise:
      for (int64_t i = 0; i < in.n; ++i)
        for (int64_t y = 0; y < in.h; ++y)
          for (int64_t x = 0; x < in.w; ++x)
            for (int64_t ch = 0; ch < in.c; ++ch) {
              const size_t at = in.index(i, y, x, ch);
              double v = in.value[at], mag = in.magnitude[at];
              reference_epilogue(s, p, ch, float_kernel, v, mag);  // no bias; Pointwise: no BatchNorm either
              out.value[at] = v;
              out.magnitude[at] = mag;
            }
      break;
    case Kind::GlobalAvgPool:
      for (int64_t i = 0; i < in.n; ++i)
        for (int64_t ch = 0; ch < in.c; ++ch) {
          double sum = 0.0, mag = 0.0;
          for (int64_t y = 0; y < in.h; ++y)
            for (int64_t x = 0; x < in.w; ++x) {
              sum += in.value[in.index(i, y, x, ch)];
              mag += in.magnitude[in.index(i, y, x, ch)];
            }
          const double area = static_cast<double>(in.h * in.w);
          out.value[out.index(i, 0, 0, ch)] = activation_reference(s.activation, sum / area, s.alpha, float_kernel);
          out.magnitude[out.index(i, 0, 0, ch)] = mag / area * kActivationGain * std::max(1.0, std::abs(s.alpha));
        }
      break;
    case Kind::Flatten:  // torch.flatten(x, 1) of NCHW: feature c * H * W + y * W + x
      for (int64_t i = 0; i < in.n; ++i)
        for (int64_t y = 0; y < in.h; ++y)
          for (int64_t x = 0; x < in.w; ++x)
            for (int64_t ch = 0; ch < in.c; ++ch) {
              const size_t from = in.index(i, y, x, ch), to = out.index(i, 0, 0, (ch * in.h + y) * in.w + x);
              out.value[to] = in.value[from];
              out.magnitude[to] = in.magnitude[from];
            }
      break;
  }
  return out;
}

// The output of every stage in turn.
template <typename T> std::vector<Nhwc> reference_run(const ConvModel<T>& m, const Nhwc& x) {
  std::vector<Nhwc> outs;
  const Nhwc* cur = &x;
  for (size_t i = 0; i < m.spec.stages.size(); ++i) {
    outs.push_back(reference_stage(m.spec.stages[i], m.params[i], *cur, !std::is_same_v<T, double>));
    cur = &outs.back();
  }
  return outs;
}

// ---- comparing with the reference --------------------------------------------------------------

// Most terms any one output sums over in the run: a Conv/Linear reduction, a
// pooling window or a global pool's area. Scales the tolerance.
int64_t max_terms(const sk::ConvDesc& d, const sk::ConvGeometry& g) {
  int64_t terms = 1;
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const sk::ConvStage& st = d.stages[i];
    if (st.has_weights()) terms = std::max(terms, st.reduction());
    if (st.kind == Kind::MaxPool || st.kind == Kind::AvgPool) terms = std::max(terms, st.kernel_h * st.kernel_w);
    if (st.kind == Kind::GlobalAvgPool) terms = std::max(terms, g.stages[i].in_h * g.stages[i].in_w);
  }
  return terms;
}

// |got - want| allowed for an output whose computation summed terms of total
// size `magnitude`, through stages summing at most `terms` terms each.
template <typename T> double tolerance(double want, double magnitude, int64_t terms) {
  return TypeInfo<T>::arithmetic_rtol * std::sqrt(static_cast<double>(terms)) * (1.0 + magnitude) +
         TypeInfo<T>::input_rtol * magnitude + TypeInfo<T>::storage_rtol * std::abs(want);
}

// Counts the values outside their tolerance; got(i) is the kernel's value at
// the reference's NHWC index i.
template <typename T>
Mismatches compare(const Nhwc& ref, int64_t terms, const std::function<double(size_t)>& got) {
  Mismatches bad;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got(i), want = ref.value[i], tol = tolerance<T>(want, ref.magnitude[i], terms);
    if (matches(g, want, tol)) continue;
    if (bad.count++ == 0) {
      const int64_t k = static_cast<int64_t>(i), ch = k % ref.c, x = k / ref.c % ref.w, y = k / ref.c / ref.w % ref.h;
      std::ostringstream os;
      os.precision(17);
      os << "image " << k / ref.c / ref.w / ref.h << " y " << y << " x " << x << " channel " << ch << ": " << g
         << ", expected " << want << " (tolerance " << tol << ")";
      bad.first = os.str();
    }
  }
  return bad;
}

template <typename A> Mismatches compare_nhwc(const Nhwc& ref, int64_t terms, const A* got) {
  return compare<A>(ref, terms, [got](size_t i) { return to_double(got[i]); });
}

// Values in [begin, end) of v that are not bit-for-bit the sentinel.
template <typename A> int64_t count_not_sentinel(const std::vector<A>& v, int64_t begin, int64_t end) {
  int64_t n = 0;
  for (int64_t i = begin; i < end; ++i) n += !same_bits(v[static_cast<size_t>(i)], sentinel<A>());
  return n;
}

// ---- running the kernels -------------------------------------------------------------------------

// Every stage over the whole batch, each stage's output pixels in two calls,
// [q, P) then [0, q) at a random q; each stage reads the kernels' previous
// output and must match the reference's output of that stage. Neither call
// may write outside its range (a guard pixel follows the output).
template <typename A>
void check_stage_by_stage(const ConvModel<A>& m, const sk::ConvGeometry& g, const std::vector<A>& x,
                          const std::vector<Nhwc>& ref, int64_t terms, Rng& rng, const std::string& label) {
  const int64_t n = ref.front().n;
  std::vector<A> cur = x;
  for (size_t i = 0; i < m.desc.stages.size(); ++i) {
    const int64_t pixels = n * g.stages[i].out_pixels(), C = g.stages[i].out_c;
    std::vector<A> out(static_cast<size_t>((pixels + 1) * C), sentinel<A>());
    const int64_t q = rng.integer(0, pixels);
    sk::conv_stage_forward<A>(m.desc, g, i, m.packed.data.get(), cur.data(), out.data(), q, pixels);
    int64_t stray = count_not_sentinel(out, 0, q * C) + count_not_sentinel(out, pixels * C, (pixels + 1) * C);
    const std::vector<A> upper(out.begin() + q * C, out.begin() + pixels * C);
    sk::conv_stage_forward<A>(m.desc, g, i, m.packed.data.get(), cur.data(), out.data(), 0, q);
    for (int64_t j = q * C; j < pixels * C; ++j) stray += !same_bits(out[j], upper[j - q * C]);
    stray += count_not_sentinel(out, pixels * C, (pixels + 1) * C);
    std::ostringstream where;
    where << label << " stage " << i << " (pixels [" << q << ", " << pixels << ") then [0, " << q << "))";
    CHECK(stray == 0, where.str() << ": " << stray << " values written outside the pixel range");
    const Mismatches bad = compare_nhwc(ref[i], terms, out.data());
    CHECK(bad.count == 0, where.str() << ": " << bad.count << " outputs differ from the reference; first: " << bad.first);
    // An ungrouped Conv/Linear split by output channels instead: two calls
    // over channel panels [pq, np) then [0, pq), all pixels, must give the
    // same bits and write nothing else.
    const sk::ConvStage& st = m.desc.stages[i];
    if (st.has_weights() && !st.depthwise && st.groups == 1) {
      const int64_t np = sk::panel_count(st.out_channels), pq = rng.integer(0, np);
      std::vector<A> split(out.size(), sentinel<A>());
      sk::conv_stage_forward<A>(m.desc, g, i, m.packed.data.get(), cur.data(), split.data(), 0, pixels, pq, np);
      sk::conv_stage_forward<A>(m.desc, g, i, m.packed.data.get(), cur.data(), split.data(), 0, pixels, 0, pq);
      int64_t differ = count_not_sentinel(split, pixels * C, (pixels + 1) * C);
      for (int64_t j = 0; j < pixels * C; ++j) differ += !same_bits(split[j], out[j]);
      CHECK(differ == 0, label << " stage " << i << " (channel panels [" << pq << ", " << np << ") then [0, " << pq
                                << ")): " << differ << " values differ from the pixel-split run");
    }
    out.resize(static_cast<size_t>(pixels * C));
    cur = std::move(out);
  }
}

// Stages [0, stop) one image at a time; the output must match the
// reference's output of stage stop - 1 and nothing past it may change.
template <typename A>
void check_images(const ConvModel<A>& m, const sk::ConvGeometry& g, const std::vector<A>& x,
                  const std::vector<Nhwc>& ref, int64_t terms, size_t stop, const std::string& label) {
  const Nhwc& want = ref[stop - 1];
  constexpr int64_t kGuard = 17;
  std::vector<A> out(want.size() + kGuard, sentinel<A>());
  const sk::StageShape& first = g.stages.front();
  const int64_t in_strides[4] = {first.in_elems(), 1, first.in_w * first.in_c, first.in_c};  // compact NHWC
  const int64_t out_strides[4] = {want.h * want.w * want.c, 1, want.w * want.c, want.c};
  sk::conv_forward_images<A, A, A>(m.desc, g, m.packed.data.get(), x.data(), in_strides, out.data(), out_strides,
                                   want.n, stop);
  std::ostringstream where;
  where << label << " conv_forward_images stop=" << stop;
  const Mismatches bad = compare_nhwc(want, terms, out.data());
  CHECK(bad.count == 0, where.str() << ": " << bad.count << " outputs differ from the reference; first: " << bad.first);
  const int64_t end = static_cast<int64_t>(want.size());
  CHECK(count_not_sentinel(out, end, end + kGuard) == 0, where.str() << ": wrote past the last image");
}

// bfloat16 I/O: an NCHW bfloat16 batch loaded to NHWC float, every stage one
// image at a time, stored back to NCHW (or (N, features)) bfloat16.
void check_bf16_run(const ConvModel<bf16>& m, const sk::ConvGeometry& g, const std::vector<bf16>& x_nhwc,
                    const std::vector<Nhwc>& ref, int64_t terms, const std::string& label) {
  const Nhwc& want = ref.back();
  const sk::StageShape& first = g.stages.front();
  const int64_t n = want.n, C = first.in_c, H = first.in_h, W = first.in_w;
  std::vector<bf16> x_nchw(x_nhwc.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t c = 0; c < C; ++c) x_nchw[((i * C + c) * H + y) * W + xx] = x_nhwc[((i * H + y) * W + xx) * C + c];
  const int64_t in_strides[4] = {C * H * W, H * W, W, 1};
  const int64_t oc = want.c, oh = want.h, ow = want.w;
  const int64_t out_strides[4] = {oc * oh * ow, oh * ow, ow, 1};
  std::vector<bf16> y(want.size());
  // The layout conversions happen per image inside the run.
  sk::conv_forward_images<bf16, float, bf16>(m.desc, g, m.packed.data.get(), x_nchw.data(), in_strides, y.data(),
                                             out_strides, n, m.desc.stages.size());
  const Mismatches bad = compare<bf16>(want, terms, [&](size_t i) {
    const int64_t k = static_cast<int64_t>(i), c = k % oc, xx = k / oc % ow, yy = k / oc / ow % oh, img = k / oc / ow / oh;
    return to_double(y[((img * oc + c) * oh + yy) * ow + xx]);
  });
  CHECK(bad.count == 0, label << " (NCHW bfloat16 in and out): " << bad.count
                              << " outputs differ from the reference; first: " << bad.first);
}

// The model on input x (NHWC, n images of `in`) against the reference, on
// every ISA: stage by stage and image by image for float32 / float64, the
// bfloat16 I/O path for bfloat16.
template <typename T>
void check_model_on(const ConvModel<T>& m, int64_t n, Shape in, const std::vector<T>& x, Rng& rng,
                    const std::string& what = "") {
  std::ostringstream base;
  base << TypeInfo<T>::name << " N=" << n << " " << in.h << "x" << in.w << " [" << m.spec.describe() << "]" << what;
  sk::ConvGeometry g;
  try {
    g = sk::resolve_conv_geometry(m.desc, in.h, in.w);
  } catch (const std::invalid_argument& e) {
    CHECK(false, base.str() << ": resolve_conv_geometry threw: " << e.what());
    return;
  }
  const std::vector<Nhwc> ref = reference_run(m, to_reference_input(x, n, in));
  for (size_t i = 0; i < ref.size(); ++i) {
    const sk::StageShape& s = g.stages[i];
    const bool same = s.out_h == ref[i].h && s.out_w == ref[i].w && s.out_c == ref[i].c;
    CHECK(same, base.str() << ": stage " << i << " output " << s.out_h << "x" << s.out_w << "x" << s.out_c
                           << ", expected " << ref[i].h << "x" << ref[i].w << "x" << ref[i].c);
    if (!same) return;
  }
  const int64_t terms = max_terms(m.desc, g);
  const size_t n_stages = m.desc.stages.size();
  const size_t spatial_stop = m.desc.flatten_stage >= 0 ? static_cast<size_t>(m.desc.flatten_stage) + 1 : n_stages;
  for (const std::string& isa : supported_isas()) {
    ScopedIsa scoped(isa);
    const std::string label = base.str() + " isa=" + isa;
    if constexpr (std::is_same_v<T, bf16>) {
      check_bf16_run(m, g, x, ref, terms, label);
    } else {
      // As engine 0 runs it, and (where a stage has a Winograd weight) as engine 3 does.
      sk::ConvGeometry winograd = g;
      sk::select_winograd(m.desc, winograd);
      const bool any = std::any_of(winograd.stages.begin(), winograd.stages.end(),
                                   [](const sk::StageShape& s) { return s.winograd; });
      for (const sk::ConvGeometry* run : {&g, any ? &winograd : nullptr}) {
        if (!run) continue;
        const std::string how = label + (run == &g ? "" : " winograd");
        check_stage_by_stage(m, *run, x, ref, terms, rng, how);
        check_images(m, *run, x, ref, terms, spatial_stop, how);
        if (spatial_stop != n_stages) check_images(m, *run, x, ref, terms, n_stages, how);
      }
    }
  }
}

struct ConvCase {
  ConvSpec spec;
  int64_t n, h, w;
};

// The case with random parameters and a random input in [-4, 4).
template <typename T> void check_case(const ConvCase& c, Rng& rng) {
  const ConvModel<T> m = make_model<T>(c.spec, rng);
  const Shape in{c.h, c.w, c.spec.in_channels};
  check_model_on(m, c.n, in, random_values<T>(rng, c.n * in.elems(), -4, 4), rng);
}

template <typename T> void check_cases(const std::vector<ConvCase>& cases, uint64_t seed) {
  Rng rng(seed);
  for (const ConvCase& c : cases) check_case<T>(c, rng);
}

// ---- random runs ---------------------------------------------------------------------------------

Activation random_activation(Rng& rng) { return static_cast<Activation>(rng.integer(0, sk::kNumActivations - 1)); }

// One dimension of a window that fits an input of `in` padded: a Conv's
// (kernel 1..5, padding 0..2 per side, dilation 1..2) or a pool's (kernel
// 1..4, padding at most half the kernel, as PyTorch requires); stride 1..3.
// (ceil_mode windows larger than the padded input have their own test,
// pool_ceil_mode_window_past_the_input.)
struct Dim {
  int64_t k, s, before, after, d;
};
Dim random_dim(Rng& rng, int64_t in, bool pool, bool dilate) {
  for (;;) {
    const int64_t k = rng.integer(1, pool ? 4 : 5), max_pad = pool ? k / 2 : 2;
    const Dim x{k, rng.integer(1, 3), rng.integer(0, max_pad), rng.integer(0, max_pad), dilate ? rng.integer(1, 2) : 1};
    if (x.d * (x.k - 1) + 1 <= in + x.before + x.after) return x;
  }
}
Window random_window(Rng& rng, Shape in, bool pool, bool dilate) {
  const Dim y = random_dim(rng, in.h, pool, dilate), x = random_dim(rng, in.w, pool, dilate);
  return {y.k, x.k, y.s, x.s, y.before, x.before, y.after, x.after, y.d, x.d};
}

// Whether some max pool window has no tap inside the input (its output would
// be -inf; a dilated window can skip over a small input).
bool has_empty_window(const StageSpec& s, Shape in) {
  const Window& w = s.window;
  const Shape out = reference_out_shape(s, in);
  auto covered = [](int64_t o, int64_t stride, int64_t pad, int64_t k, int64_t d, int64_t size) {
    for (int64_t j = 0; j < k; ++j)
      if (o * stride - pad + j * d >= 0 && o * stride - pad + j * d < size) return true;
    return false;
  };
  for (int64_t oy = 0; oy < out.h; ++oy)
    if (!covered(oy, w.stride_h, w.pad_top, w.kernel_h, w.dilation_h, in.h)) return true;
  for (int64_t ox = 0; ox < out.w; ++ox)
    if (!covered(ox, w.stride_w, w.pad_left, w.kernel_w, w.dilation_w, in.w)) return true;
  return false;
}

void add_random_conv(ConvSpec& spec, Shape in, Rng& rng) {
  const int64_t c = in.c;
  int64_t groups = 1, out = rng.integer(1, 20);
  switch (rng.integer(0, 3)) {
    case 0: break;  // dense
    case 1: {       // grouped: a divisor of the input channels other than 1 and all (if any)
      std::vector<int64_t> divisors;
      for (int64_t d = 2; d < c; ++d)
        if (c % d == 0) divisors.push_back(d);
      if (divisors.empty()) break;
      groups = divisors[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(divisors.size()) - 1))];
      out = groups * rng.integer(1, std::max<int64_t>(1, 20 / groups));
      break;
    }
    case 2: groups = out = c; break;                              // depthwise
    case 3: groups = c, out = c * rng.integer(2, 3); break;       // channel multiplier
  }
  const int64_t flag_choices[] = {0, kBias, kBn, kBias | kBn, kBias | kBnAffine, kBnAffine};
  spec.conv(out, random_window(rng, in, false, true), groups, random_activation(rng), flag_choices[rng.integer(0, 5)]);
}

void add_random_pool(ConvSpec& spec, Shape in, bool is_max, Rng& rng) {
  const int64_t options = is_max ? (rng.integer(0, 1) ? kCeil : 0) : rng.integer(0, kCeil | kIncludePad);
  for (;;) {
    const Window w = random_window(rng, in, true, is_max);
    if (is_max) {
      spec.max_pool(w, options, random_activation(rng));
      if (!has_empty_window(spec.stages.back(), in)) return;
      spec.stages.pop_back();
    } else {
      spec.avg_pool(w, options, rng.integer(0, 3) == 0 ? rng.integer(1, 9) : 0, random_activation(rng));
      return;
    }
  }
}

// 1..4 spatial stages (Conv most often) on 1..20 channels of up to 13x13,
// then half the time a head: [GlobalAvgPool,] Flatten, Linear, and maybe a
// ScaleShift / Pointwise and a second Linear.
ConvCase random_case(Rng& rng) {
  ConvCase c{ConvSpec{rng.integer(1, 20)}, rng.integer(1, 3), rng.integer(1, 13), rng.integer(1, 13)};
  ConvSpec& spec = c.spec;
  Shape cur{c.h, c.w, spec.in_channels};
  const int64_t spatial = rng.integer(1, 4);
  for (int64_t s = 0; s < spatial; ++s) {
    const int64_t r = rng.integer(0, 99);
    if (r < 45)
      add_random_conv(spec, cur, rng);
    else if (r < 55)
      spec.scale_shift(random_activation(rng), rng.integer(0, 1) ? kBnAffine : kBn);
    else if (r < 65)
      spec.pointwise(random_activation(rng));
    else if (r < 95)
      add_random_pool(spec, cur, r < 80, rng);
    else
      spec.global_avg_pool(random_activation(rng));
    spec.stages.back().alpha = rng.uniform(0.01, 0.5);
    spec.stages.back().eps = rng.integer(0, 1) ? 1e-5 : 1e-3;
    cur = reference_out_shape(spec.stages.back(), cur);
  }
  const int64_t head = rng.integer(0, 3);
  if (head >= 2) {
    if (head == 3 && (cur.h > 1 || cur.w > 1)) {
      spec.global_avg_pool(random_activation(rng));
      cur = reference_out_shape(spec.stages.back(), cur);
    }
    spec.flatten();
    const int64_t features = cur.elems();
    spec.linear(rng.integer(1, 20), features, random_activation(rng), rng.integer(0, 1) ? kBias : kBias | kBnAffine);
    if (rng.integer(0, 1)) {
      if (rng.integer(0, 1))
        spec.scale_shift(random_activation(rng));
      else
        spec.pointwise(random_activation(rng));
      spec.linear(rng.integer(1, 20), spec.channels(), random_activation(rng), rng.integer(0, 1) ? kBias : 0);
    }
  }
  return c;
}

std::vector<ConvCase> random_cases(uint64_t seed, int count) {
  Rng rng(seed);
  std::vector<ConvCase> cases;
  for (int i = 0; i < count; ++i) cases.push_back(random_case(rng));
  return cases;
}

// ---- tests: spec decoding -------------------------------------------------------------------------

// A run with every stage kind (float32 offsets worked out by hand from
// conv_spec.h's rules below).
ConvSpec layout_spec() {
  return ConvSpec{3}
      .conv(20, square(3, 1, 1), 1, Activation::ReLU, kBias)        // 0: dense, 2 panels x K 27
      .conv(20, square(3, 2, 1), 20, Activation::ReLU6, kBias | kBn)  // 1: depthwise
      .max_pool(square(2, 2), kCeil)                                // 2
      .scale_shift(Activation::None, kBn)                           // 3
      .conv(6, square(1), 2, Activation::None, 0)                   // 4: 2 groups of 10 -> 3
      .global_avg_pool(Activation::Tanh)                            // 5
      .flatten()                                                    // 6
      .linear(5, 6, Activation::Sigmoid, kBias | kBnAffine);         // 7
}

TEST(conv_decode_layout) {
  const ConvSpec spec = layout_spec();
  const sk::ConvDesc d = decode(encode(spec, DType::Float32));
  CHECK(d.dtype == DType::Float32 && d.in_channels == 3 && d.out_channels == 5 && d.flatten_stage == 6,
        "in " << d.in_channels << " out " << d.out_channels << " flatten at " << d.flatten_stage);
  CHECK(d.stages.size() == 8, d.stages.size() << " stages");
  if (d.stages.size() != 8) return;
  struct Expect {
    Kind kind;
    int64_t in, out, groups, weight, scale, shift;
    bool depthwise;
  };
  const Expect expected[8] = {
      // weight 2 panels x 27 x 16 x 4 B = 3456; scale/shift (32 + 16) x 4 B = 192 each
      {Kind::Conv, 3, 20, 1, 0, 3456, 3648, false},
      // weight 3 x 3 taps x 32 channels x 4 B = 1152
      {Kind::Conv, 20, 20, 20, 3840, 4992, 5184, true},
      {Kind::MaxPool, 20, 20, 1, -1, -1, -1, false},
      {Kind::ScaleShift, 20, 20, 1, -1, 5376, 5568, false},
      // 2 groups x 1 panel x K 10 x 16 x 4 B = 1280; (16 + 16) x 4 B = 128 each
      {Kind::Conv, 20, 6, 2, 5760, 7040, 7168, false},
      {Kind::GlobalAvgPool, 6, 6, 1, -1, -1, -1, false},
      {Kind::Flatten, 6, 6, 1, -1, -1, -1, false},
      // 1 panel x 6 x 16 x 4 B = 384
      {Kind::Linear, 6, 5, 1, 7296, 7680, 7808, false},
  };
  for (size_t i = 0; i < 8; ++i) {
    const sk::ConvStage& st = d.stages[i];
    const Expect& e = expected[i];
    CHECK(st.kind == e.kind && st.in_channels == e.in && st.out_channels == e.out && st.groups == e.groups &&
              st.weight_offset == e.weight && st.scale_offset == e.scale && st.shift_offset == e.shift &&
              st.depthwise == e.depthwise,
          "stage " << i << ": kind " << static_cast<int>(st.kind) << " " << st.in_channels << " -> "
                   << st.out_channels << " groups " << st.groups << " weight@" << st.weight_offset << " scale@"
                   << st.scale_offset << " shift@" << st.shift_offset << " depthwise " << st.depthwise);
  }
  CHECK(d.packed_bytes == 7936, "packed_bytes " << d.packed_bytes);
  const sk::ConvStage& conv = d.stages[1];
  CHECK(conv.kernel_h == 3 && conv.kernel_w == 3 && conv.stride_h == 2 && conv.stride_w == 2 && conv.pad_top == 1 &&
            conv.pad_left == 1 && conv.pad_bottom == 1 && conv.pad_right == 1 && conv.dilation_h == 1 &&
            conv.dilation_w == 1 && conv.flags == (kBias | kBn) && conv.activation == Activation::ReLU6,
        "stage 1's window, flags or activation not decoded");
  CHECK(d.stages[2].options == kCeil && d.stages[0].alpha == 0.1 && d.stages[7].eps == 1e-5,
        "options / fparams not decoded");

  // float64 doubles every section (all are multiples of 64 bytes in float32);
  // bfloat16 packs in float, like float32, except the GEMM weights
  // (packs_bf16_pairs), in bfloat16 pairs.
  const sk::ConvDesc d64 = decode(encode(spec, DType::Float64)), b16 = decode(encode(spec, DType::BFloat16));
  CHECK(d64.packed_bytes == 2 * d.packed_bytes, "float64 " << d64.packed_bytes << " bytes");
  for (size_t i = 0; i < 8; ++i) {
    const sk::ConvStage &f = d.stages[i], &g = d64.stages[i];
    auto twice = [](int64_t v) { return v < 0 ? v : 2 * v; };
    CHECK(g.weight_offset == twice(f.weight_offset) && g.scale_offset == twice(f.scale_offset) &&
              g.shift_offset == twice(f.shift_offset),
          "float64 stage " << i << ": weight@" << g.weight_offset << " scale@" << g.scale_offset);
  }
  // Stage 0 (3 -> 20, K 27 -> 28): 2 panels x 28 x 16 x 2 B = 1792; stage 1
  // depthwise, stage 4 direct grouped: float; stage 7 (K 6): 1 panel x 6 x 16 x 2 B = 192.
  const int64_t b16_offsets[8][3] = {{0, 1792, 1984},     {2176, 3328, 3520}, {-1, -1, -1},
                                     {-1, 3712, 3904},    {4096, 5376, 5504}, {-1, -1, -1},
                                     {-1, -1, -1},        {5632, 5824, 5952}};
  for (size_t i = 0; i < 8; ++i) {
    const sk::ConvStage& b = b16.stages[i];
    CHECK(b.weight_offset == b16_offsets[i][0] && b.scale_offset == b16_offsets[i][1] &&
              b.shift_offset == b16_offsets[i][2],
          "bfloat16 stage " << i << ": weight@" << b.weight_offset << " scale@" << b.scale_offset << " shift@"
                            << b.shift_offset);
    CHECK(sk::packs_bf16_pairs(DType::BFloat16, b) == (i == 0 || i == 7), "bfloat16 stage " << i << " pairs");
  }
  CHECK(b16.packed_bytes == 6080, "bfloat16 packed_bytes " << b16.packed_bytes);

  // A Conv with in == out == groups == 1 is depthwise too; a channel multiplier is not.
  CHECK(decode(encode(ConvSpec{1}.conv(1, square(3), 1), DType::Float32)).stages[0].depthwise, "1 -> 1 conv");
  CHECK(!decode(encode(ConvSpec{4}.conv(8, square(3), 4), DType::Float32)).stages[0].depthwise, "multiplier 2");
}

// The layout rules of conv_spec.h on random runs: sections 64-byte aligned,
// in stage order, back to back, each of its documented size, and
// packed_bytes the end of the last one.
TEST(conv_decode_random_layouts) {
  const std::vector<ConvCase> cases = random_cases(101, 60);
  int64_t bad = 0;
  std::string first;
  for (const ConvCase& c : cases)
    for (DType dtype : {DType::Float32, DType::Float64, DType::BFloat16}) {
      const sk::ConvDesc d = decode(encode(c.spec, dtype));
      const int64_t asize = dtype == DType::Float64 ? 8 : 4;
      int64_t end = 0;
      auto section = [&](int64_t offset, int64_t elems, const char* what, size_t i) {
        if (offset == end && offset % 64 == 0) {
          end = sk::round_up(offset + elems * asize, 64);
          return;
        }
        if (bad++ == 0) first = c.spec.describe() + ": stage " + std::to_string(i) + " " + what + "@" +
                                std::to_string(offset) + ", expected @" + std::to_string(end);
      };
      for (size_t i = 0; i < d.stages.size(); ++i) {
        const sk::ConvStage& st = d.stages[i];
        const StageSpec& s = c.spec.stages[i];
        const int64_t padded = sk::round_up(st.out_channels, 16);
        const bool scaled = st.has_weights() || st.kind == Kind::ScaleShift;
        if (st.kind != s.kind || st.out_channels != s.out_channels || (st.weight_offset >= 0) != st.has_weights() ||
            (st.scale_offset >= 0) != scaled || (st.shift_offset >= 0) != scaled) {
          if (bad++ == 0) first = c.spec.describe() + ": stage " + std::to_string(i) + " has the wrong sections";
          continue;
        }
        if (st.has_weights()) {
          const int64_t panels = st.groups * sk::panel_count(st.out_channels / st.groups) * 16;
          if (sk::packs_bf16_pairs(dtype, st))  // bfloat16 pairs: half the bytes of float per value, K even
            section(st.weight_offset, panels * sk::round_up(st.reduction(), 2) / 2, "weight", i);
          else
            section(st.weight_offset, st.depthwise ? st.kernel_h * st.kernel_w * padded : panels * st.reduction(),
                    "weight", i);
          if (sk::winograd_eligible(dtype, st))  // [16 points][panel][in][16]
            section(st.winograd_offset, 16 * sk::panel_count(st.out_channels) * 16 * st.in_channels, "winograd", i);
          else if (st.winograd_offset >= 0 && bad++ == 0)
            first = c.spec.describe() + ": stage " + std::to_string(i) + " has a Winograd section";
        }
        if (scaled) {
          section(st.scale_offset, padded + 16, "scale", i);
          section(st.shift_offset, padded + 16, "shift", i);
        }
      }
      if (d.packed_bytes != end && bad++ == 0)
        first = c.spec.describe() + ": packed_bytes " + std::to_string(d.packed_bytes) + ", expected " +
                std::to_string(end);
    }
  CHECK(bad == 0, bad << " layout errors; first: " << first);
}

TEST(conv_decode_rejects_malformed_specs) {
  // stage 0 Conv, 1 MaxPool, 2 Pointwise, 3 Flatten, 4 Linear: stage i's values start at 4 + 16 i.
  const ConvSpec good = ConvSpec{6}
                            .conv(12, square(3, 1, 1), 3, Activation::ReLU, kBias | kBn)
                            .max_pool(square(2, 2))
                            .pointwise(Activation::Tanh)
                            .flatten()
                            .linear(10, 12 * 4 * 4);
  const EncodedSpec base = encode(good, DType::Float32);
  CHECK(decode(base).stages.size() == 5, "the unmodified spec must decode");
  auto at = [](int64_t stage, int64_t field) { return static_cast<size_t>(4 + 16 * stage + field); };
  constexpr int64_t kKind = 0, kOut = 1, kAct = 2, kFlags = 3, kKernelH = 4, kStrideW = 7, kPadTop = 8,
                    kPadRight = 11, kDilationH = 12, kParam = 14, kOptions = 15;

  struct Case {
    std::string what;
    std::function<void(EncodedSpec&)> mutate;
  };
  auto set = [&](const std::string& what, int64_t stage, int64_t field, int64_t value) {
    return Case{what, [=](EncodedSpec& e) { e.spec[at(stage, field)] = value; }};
  };
  const int64_t conv = static_cast<int64_t>(Kind::Conv), linear = static_cast<int64_t>(Kind::Linear);
  const int64_t flatten = static_cast<int64_t>(Kind::Flatten), avg = static_cast<int64_t>(Kind::AvgPool);
  const int64_t global = static_cast<int64_t>(Kind::GlobalAvgPool), scale = static_cast<int64_t>(Kind::ScaleShift);
  const std::vector<Case> cases = {
      {"version 0", [](EncodedSpec& e) { e.spec[0] = 0; }},
      {"version 2", [](EncodedSpec& e) { e.spec[0] = sk::kConvSpecVersion + 1; }},
      {"the MLP spec's layout", [](EncodedSpec& e) { e.spec.resize(4 + 4); }},
      {"dtype code -1", [](EncodedSpec& e) { e.spec[1] = -1; }},
      {"dtype code 4", [](EncodedSpec& e) { e.spec[1] = 4; }},
      {"empty", [](EncodedSpec& e) { e.spec.clear(); }},
      {"header only", [](EncodedSpec& e) { e.spec.resize(4); }},
      {"zero stages", [](EncodedSpec& e) { e.spec[2] = 0; }},
      {"stage count larger than the list", [](EncodedSpec& e) { e.spec[2] = 6; }},
      {"stage count smaller than the list", [](EncodedSpec& e) { e.spec[2] = 4; }},
      {"huge stage count", [](EncodedSpec& e) { e.spec[2] = (int64_t{1} << 62) + 1; }},
      {"spec one value too long", [](EncodedSpec& e) { e.spec.push_back(0); }},
      {"spec one value too short", [](EncodedSpec& e) { e.spec.pop_back(); }},
      {"fparams too short", [](EncodedSpec& e) { e.fparams.pop_back(); }},
      {"fparams too long", [](EncodedSpec& e) { e.fparams.push_back(0.0); }},
      {"in_channels 0", [](EncodedSpec& e) { e.spec[3] = 0; }},
      {"in_channels above kMaxWidth", [](EncodedSpec& e) { e.spec[3] = sk::kMaxWidth + 1; }},
      set("stage kind -1", 0, kKind, -1),
      set("stage kind 8", 2, kKind, sk::kNumConvStageKinds),
      set("activation -1", 0, kAct, -1),
      set("activation kNumActivations", 2, kAct, sk::kNumActivations),
      set("Conv out_channels 0", 0, kOut, 0),
      set("unknown flag bit", 0, kFlags, 32),
      set("batch-statistics flag without a BatchNorm", 0, kFlags, 8),
      set("groups 0", 0, kParam, 0),
      set("groups -3", 0, kParam, -3),
      set("groups not dividing in_channels", 0, kParam, 4),  // 6 in, 12 out
      {"groups not dividing out_channels", [&](EncodedSpec& e) {  // 3 groups, 13 channels throughout
         for (int64_t stage : {0, 1, 2}) e.spec[at(stage, kOut)] = 13;
       }},
      set("groups above in_channels", 0, kParam, 12),
      {"Conv after Flatten", [&](EncodedSpec& e) {
         e.spec[at(4, kKind)] = conv;
         e.spec[at(4, kParam)] = 1;
       }},
      {"Linear before Flatten", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = linear;
         e.spec[at(2, kParam)] = 12;
       }},
      {"second Flatten", [&](EncodedSpec& e) {
         e.spec[at(4, kKind)] = flatten;
         e.spec[at(4, kFlags)] = 0;
       }},
      {"pool after Flatten", [&](EncodedSpec& e) {
         e.spec[at(4, kKind)] = global;
         e.spec[at(4, kOut)] = 12;
         e.spec[at(4, kFlags)] = e.spec[at(4, kParam)] = 0;
       }},
      {"MaxPool changes channels", [&](EncodedSpec& e) { e.spec[at(1, kOut)] = e.spec[at(2, kOut)] = 13; }},
      set("Pointwise changes channels", 2, kOut, 11),
      {"ScaleShift changes channels", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = scale;
         e.spec[at(2, kFlags)] = kBn;
         e.spec[at(2, kOut)] = 24;
       }},
      {"AvgPool changes channels", [&](EncodedSpec& e) {
         e.spec[at(1, kKind)] = avg;
         e.spec[at(1, kOut)] = e.spec[at(2, kOut)] = 6;
       }},
      {"GlobalAvgPool changes channels", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = global;
         e.spec[at(2, kOut)] = 1;
       }},
      set("kernel on a Pointwise stage", 2, kKernelH, 3),
      set("stride on a Pointwise stage", 2, kStrideW, 2),
      set("padding on a Pointwise stage", 2, kPadRight, 1),
      set("dilation on a Pointwise stage", 2, kDilationH, 2),
      set("kernel on a Flatten stage", 3, kKernelH, 2),
      {"padding on a ScaleShift stage", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = scale;
         e.spec[at(2, kFlags)] = kBn;
         e.spec[at(2, kPadTop)] = 1;
       }},
      {"stride on a GlobalAvgPool stage", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = global;
         e.spec[at(2, kStrideW)] = 2;
       }},
      set("negative padding on a Conv", 0, kPadTop, -1),
      set("negative padding on a MaxPool", 1, kPadRight, -1),
      set("kernel 0", 0, kKernelH, 0),
      set("kernel above kMaxKernel", 1, kKernelH, sk::kMaxKernel + 1),
      set("stride 0", 1, kStrideW, 0),
      set("dilation 0", 0, kDilationH, 0),
      set("padding above kMaxKernel", 0, kPadRight, sk::kMaxKernel + 1),
      set("flags on a MaxPool", 1, kFlags, kBias),
      {"flags on an AvgPool", [&](EncodedSpec& e) {
         e.spec[at(1, kKind)] = avg;
         e.spec[at(1, kFlags)] = kBn;
       }},
      set("flags on a Pointwise", 2, kFlags, kBn),
      set("flags on a Flatten", 3, kFlags, kBias),
      {"ScaleShift without BatchNorm", [&](EncodedSpec& e) {
         e.spec[at(2, kKind)] = scale;
         e.spec[at(2, kFlags)] = kBias;
       }},
      set("pool options 4", 1, kOptions, 4),
      set("pool options -1", 1, kOptions, -1),
      {"negative divisor_override", [&](EncodedSpec& e) {
         e.spec[at(1, kKind)] = avg;
         e.spec[at(1, kParam)] = -2;
       }},
      set("Linear in_features 0", 4, kParam, 0),
      set("Linear out_features 0", 4, kOut, 0),
  };
  for (const Case& c : cases) {
    EncodedSpec bad = base;
    c.mutate(bad);
    CHECK_THROWS(std::invalid_argument, decode(bad), c.what);
  }
}

// Specs no planner writes, which decode_conv_spec / resolve_conv_geometry
// accept although the kernels would then compute something other than what
// the spec describes: each must be rejected (std::invalid_argument).
TEST(conv_rejects_specs_the_kernels_would_misrun) {
  auto rejected = [](const ConvSpec& spec, int64_t h, int64_t w) {
    try {
      sk::resolve_conv_geometry(decode(encode(spec, DType::Float32)), h, w);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  // The window is a Conv's or a pool's: a Linear is a 1x1 convolution of the rows.
  ConvSpec linear_window = ConvSpec{4}.flatten().linear(3, 4, Activation::None);
  linear_window.stages.back().window = square(3, 1, 1);
  CHECK(rejected(linear_window, 1, 1), "window parameters on a Linear [" << linear_window.describe() << "]");
  // A Flatten has no activation: flatten_nchw never applies one.
  ConvSpec flatten_act = ConvSpec{4}.flatten().linear(3, 4 * 2 * 2);
  flatten_act.stages[0].activation = Activation::ReLU;
  CHECK(rejected(flatten_act, 2, 2), "an activation on a Flatten, which the kernel ignores");
  // ceil_mode is a pool's option: on a Conv it changes the output size.
  ConvSpec conv_ceil = ConvSpec{2}.conv(3, square(2, 2));
  conv_ceil.stages[0].options = kCeil;
  CHECK(rejected(conv_ceil, 5, 5), "ceil_mode on a Conv (5x5, kernel 2, stride 2: 3x3 output instead of 2x2)");
  // PyTorch's AvgPool2d has no dilation; the kernel would dilate the taps but not the divisor.
  ConvSpec avg_dilated = ConvSpec{2}.avg_pool(square(2, 1, 0, 2));
  CHECK(rejected(avg_dilated, 5, 5), "dilation on an AvgPool");
  // An elementwise stage straight after the Flatten (the planner moves
  // activations before it) keeps the Flatten's declared channel count, not the
  // flattened width: it would read rows of 36 values as rows of 4.
  const ConvSpec after_flatten = ConvSpec{4}.flatten().pointwise(Activation::ReLU);
  bool consistent = rejected(after_flatten, 3, 3);
  if (!consistent) {
    const sk::ConvGeometry g = sk::resolve_conv_geometry(decode(encode(after_flatten, DType::Float32)), 3, 3);
    consistent = g.stages[1].out_c == g.stages[1].in_c;
  }
  CHECK(consistent, "a Pointwise right after a Flatten of 4x3x3: neither rejected nor 36 channels wide");
}

// ---- tests: geometry -------------------------------------------------------------------------------

TEST(window_output_size_matches_its_definition) {
  for (bool ceil_mode : {false, true}) {
    int64_t bad = 0, cases = 0;
    std::string first;
    for (int64_t in = 1; in <= 16; ++in)
      for (int64_t k = 1; k <= 6; ++k)
        for (int64_t s = 1; s <= 4; ++s)
          for (int64_t before = 0; before <= 3; ++before)
            for (int64_t after = 0; after <= 3; ++after)
              for (int64_t d = 1; d <= 3; ++d, ++cases) {
                const int64_t got = sk::window_output_size(in, k, s, before, after, d, ceil_mode);
                const int64_t want = count_windows(in, k, s, before, after, d, ceil_mode);
                if (got != want && bad++ == 0) {
                  std::ostringstream os;
                  os << "in=" << in << " kernel=" << k << " stride=" << s << " pad=" << before << "/" << after
                     << " dilation=" << d << ": " << got << ", expected " << want;
                  first = os.str();
                }
              }
    CHECK(bad == 0, (ceil_mode ? "ceil_mode: " : "floor mode: ") << bad << " of " << cases
                                                                 << " sizes differ; first: " << first);
  }
  // Spelled out, as PyTorch computes them.
  CHECK(sk::window_output_size(7, 3, 2, 0, 0, 1, false) == 3, "MaxPool2d(3, 2) of 7");
  CHECK(sk::window_output_size(8, 3, 2, 0, 0, 1, true) == 4, "MaxPool2d(3, 2, ceil_mode=True) of 8");
  CHECK(sk::window_output_size(7, 3, 2, 1, 1, 1, true) == 4, "MaxPool2d(3, 2, 1, ceil_mode=True) of 7");
  CHECK(sk::window_output_size(6, 2, 2, 1, 1, 1, true) == 4,
        "AvgPool2d(2, 2, 1, ceil_mode=True) of 6: the last window would start in the right padding");
  CHECK(sk::window_output_size(9, 3, 1, 0, 0, 3, false) == 3, "Conv2d(k=3, dilation=3) of 9");
  // torch.nn.functional.max_pool2d(torch.randn(1, 1, 2, 2), 3, 2, ceil_mode=True) has shape (1, 1, 1, 1).
  CHECK(sk::window_output_size(2, 3, 2, 0, 0, 1, true) == 1,
        "MaxPool2d(3, 2, ceil_mode=True) of 2: 1 window (PyTorch), got " << sk::window_output_size(2, 3, 2, 0, 0, 1, true));
}

TEST(resolve_conv_geometry_shapes) {
  // Every stage's shape on random runs, against the definitions.
  int64_t bad = 0;
  std::string first;
  for (const ConvCase& c : random_cases(102, 200)) {
    const sk::ConvGeometry g = sk::resolve_conv_geometry(decode(encode(c.spec, DType::Float32)), c.h, c.w);
    Shape cur{c.h, c.w, c.spec.in_channels};
    int64_t max_elems = cur.elems();
    for (size_t i = 0; i < c.spec.stages.size(); ++i) {
      const Shape out = reference_out_shape(c.spec.stages[i], cur);
      const sk::StageShape& s = g.stages[i];
      if ((s.in_h != cur.h || s.in_w != cur.w || s.in_c != cur.c || s.out_h != out.h || s.out_w != out.w ||
           s.out_c != out.c) &&
          bad++ == 0) {
        std::ostringstream os;
        os << c.h << "x" << c.w << " [" << c.spec.describe() << "] stage " << i << ": " << s.in_h << "x" << s.in_w
           << "x" << s.in_c << " -> " << s.out_h << "x" << s.out_w << "x" << s.out_c << ", expected " << cur.h << "x"
           << cur.w << "x" << cur.c << " -> " << out.h << "x" << out.w << "x" << out.c;
        first = os.str();
      }
      max_elems = std::max(max_elems, out.elems());
      cur = out;
    }
    if (g.max_image_elems != max_elems && bad++ == 0)
      first = c.spec.describe() + ": max_image_elems " + std::to_string(g.max_image_elems) + ", expected " +
              std::to_string(max_elems);
  }
  CHECK(bad == 0, bad << " shape errors; first: " << first);

  auto geometry = [](const ConvSpec& spec, int64_t h, int64_t w) {
    return sk::resolve_conv_geometry(decode(encode(spec, DType::Float32)), h, w);
  };
  const sk::ConvGeometry g =
      geometry(ConvSpec{3}.conv(8, square(3, 2, 1)).max_pool(square(2, 2), kCeil).flatten().linear(4, 8 * 3 * 2), 9, 7);
  CHECK(g.stages[0].out_h == 5 && g.stages[0].out_w == 4 && g.stages[1].out_h == 3 && g.stages[1].out_w == 2 &&
            g.stages[2].out_c == 48 && g.stages[3].in_c == 48 && g.stages[3].out_c == 4 &&
            g.stages[3].out_pixels() == 1,
        "9x7 -> conv 5x4 -> pool 3x2 -> 48 -> 4");

  // Windows larger than the padded input, and a Linear of the wrong width.
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.conv(2, square(5)), 4, 9), "Conv kernel 5 on 4 rows");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.conv(2, square(3, 1, 0, 2)), 9, 4),
               "Conv kernel 3 dilation 2 (extent 5) on 4 columns");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.conv(2, {6, 1, 1, 1, 1, 0, 1, 0, 1, 1}), 3, 3),
               "Conv kernel 6 on 3 rows padded to 5");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.max_pool(square(3)), 2, 2), "MaxPool 3 on 2x2");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.avg_pool(square(3, 1), kCeil), 2, 2),
               "AvgPool 3 stride 1 ceil_mode on 2x2 (PyTorch: output size too small)");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.conv(3, square(3, 2, 1)).flatten().linear(4, 3 * 4 * 4), 9, 9),
               "Linear in_features 48 after a flatten to 3x5x5 = 75");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.global_avg_pool().flatten().linear(4, 3), 5, 5),
               "Linear in_features 3 after a flatten to 2");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.pointwise(Activation::ReLU), 0, 5), "height 0");
  CHECK_THROWS(std::invalid_argument, geometry(ConvSpec{2}.pointwise(Activation::ReLU), 5, sk::kMaxSpatial + 1),
               "width above kMaxSpatial");
  CHECK(geometry(ConvSpec{2}.conv(2, square(3, 1, 1)), 1, 1).stages[0].out_pixels() == 1, "3x3 pad 1 on 1x1");
}

// PyTorch's ceil_mode counts a window that starts inside the input even when
// the kernel is larger than the padded input (by less than the stride):
// max_pool2d / avg_pool2d(x of 2x2, 3, 2, ceil_mode=True) give 1x1 outputs.
TEST(pool_ceil_mode_window_past_the_input) {
  Rng rng(103);
  const ConvSpec specs[] = {
      ConvSpec{3}.max_pool(square(3, 2), kCeil),
      ConvSpec{3}.avg_pool(square(3, 2), kCeil | kIncludePad),
      ConvSpec{3}.avg_pool(square(3, 2), kCeil),
      ConvSpec{3}.avg_pool({4, 4, 3, 3, 1, 1, 1, 1, 1, 1}, kCeil | kIncludePad),
  };
  for (const ConvSpec& spec : specs) {
    const ConvModel<float> m = make_model<float>(spec, rng);
    check_model_on(m, 2, Shape{2, 2, 3}, random_values<float>(rng, 2 * 2 * 2 * 3, -4, 4), rng);
  }
}

// ---- tests: packing ----------------------------------------------------------------------------------

// pack_conv_stage writes inside its own stage's sections only.
template <typename T> void check_pack_stays_in_its_sections() {
  Rng rng(104);
  const ConvSpec spec = layout_spec();
  const ConvModel<T> m = make_model<T>(spec, rng);
  const sk::ConvDesc& d = m.desc;
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const sk::ConvStage& st = d.stages[i];
    const int64_t begin = st.weight_offset >= 0 ? st.weight_offset : st.scale_offset;
    if (begin < 0) continue;
    int64_t end = d.packed_bytes;  // the next stage's first section
    for (size_t j = i + 1; j < d.stages.size() && end == d.packed_bytes; ++j)
      for (int64_t off : {d.stages[j].weight_offset, d.stages[j].scale_offset})
        if (off >= 0) {
          end = off;
          break;
        }
    AlignedBytes buf(d.packed_bytes);  // 0xff
    const StageParams<T>& p = m.params[i];
    sk::pack_conv_stage<T>(st, data_or_null(p.weight), data_or_null(p.bias), data_or_null(p.bn_weight),
                           data_or_null(p.bn_bias), data_or_null(p.bn_mean), data_or_null(p.bn_var), buf.data.get());
    int64_t outside = 0;
    for (int64_t b = 0; b < d.packed_bytes; ++b) outside += (b < begin || b >= end) && buf.data.get()[b] != 0xff;
    CHECK(outside == 0, TypeInfo<T>::name << " stage " << i << ": " << outside << " bytes written outside ["
                                          << begin << ", " << end << ")");
  }
}

TEST(pack_conv_stage_stays_in_its_sections) {
  check_pack_stays_in_its_sections<float>();
  check_pack_stays_in_its_sections<double>();
  check_pack_stays_in_its_sections<bf16>();
}

// ---- tests: forward ----------------------------------------------------------------------------------

// Every activation after a Conv of each kind (dense, grouped, depthwise,
// channel multiplier, 1x1, 1 -> 1), cycling through windows and the
// bias/BatchNorm flags; after a ScaleShift and a Pointwise; after pools.
std::vector<ConvCase> every_activation_cases() {
  const Window windows[] = {square(3, 1, 1), {5, 3, 3, 1, 2, 0, 1, 2, 1, 2}, square(1), square(3, 2, 0, 2),
                            {2, 4, 1, 3, 0, 2, 1, 0, 2, 1}, {1, 3, 2, 1, 0, 1, 0, 1, 1, 1}};
  const int64_t flags[] = {0, kBias, kBn, kBias | kBn, kBias | kBnAffine, kBnAffine};
  struct Groups {
    int64_t in, out, groups;
  };
  const Groups kinds[] = {{5, 7, 1}, {6, 9, 3}, {12, 12, 12}, {4, 8, 4}, {20, 17, 1}, {1, 1, 1}, {8, 20, 4}};
  std::vector<ConvCase> cases;
  int64_t i = 0;
  for (Activation act : all_activations()) {
    for (int64_t j = 0; j < 2; ++j, ++i) {
      const Groups& g = kinds[i % 7];
      ConvSpec spec = ConvSpec{g.in}.conv(g.out, windows[i % 6], g.groups, act, flags[i % 6]);
      spec.stages[0].alpha = 0.05 + 0.1 * static_cast<double>(j);
      cases.push_back({spec, 1 + i % 3, 5 + i % 7, 13 - i % 5});
    }
    cases.push_back({ConvSpec{7}.scale_shift(act, i % 2 ? kBn : kBnAffine).pointwise(act), 2, 3, 4});
    cases.push_back({ConvSpec{17}.max_pool(square(3, 2, 1), 0, act).avg_pool(square(2, 1), kIncludePad, 0, act)
                         .global_avg_pool(act),
                     3, 9, 8});
  }
  return cases;
}

TEST(conv_forward_every_activation_and_conv_kind) {
  const std::vector<ConvCase> cases = every_activation_cases();
  check_cases<float>(cases, 201);
  check_cases<double>(cases, 202);
  check_cases<bf16>(cases, 203);
}

// Max and average pools over every option: ceil_mode, count_include_pad,
// divisor_override, dilation (max), asymmetric padding, on sizes where
// ceil_mode adds a window.
std::vector<ConvCase> pool_cases() {
  const Window windows[] = {square(2, 2), square(3, 2, 1), {3, 2, 2, 1, 1, 0, 0, 1, 1, 1}, square(3, 3, 1),
                            {4, 3, 3, 2, 2, 1, 1, 1, 1, 1}};
  std::vector<ConvCase> cases;
  for (const Window& w : windows) {
    for (int64_t options = 0; options <= (kCeil | kIncludePad); ++options)
      for (int64_t divisor : {0, 3})
        cases.push_back({ConvSpec{5}.avg_pool(w, options, divisor), 2, 8, 7});
    for (int64_t options : {int64_t{0}, kCeil})
      for (int64_t d : {1, 2}) {
        Window dilated = w;
        dilated.dilation_h = dilated.dilation_w = d;
        cases.push_back({ConvSpec{18}.max_pool(dilated, options), 2, 9, 10});
      }
  }
  return cases;
}

TEST(conv_forward_pools) {
  const std::vector<ConvCase> cases = pool_cases();
  check_cases<float>(cases, 211);
  check_cases<double>(cases, 212);
  check_cases<bf16>(cases, 213);
}

// Random runs (see random_case), float32 / float64 and a third of them with bfloat16 I/O.
TEST(conv_forward_random_runs) {
  const std::vector<ConvCase> cases = random_cases(221, 300);
  check_cases<float>(cases, 222);
  check_cases<double>(cases, 223);
  std::vector<ConvCase> some;
  for (size_t i = 0; i < cases.size(); i += 3) some.push_back(cases[i]);
  check_cases<bf16>(some, 224);
}

// Sizes around the kernels' internal limits: a reduction longer than the
// im2col tile budget (one micro-tile of rows per tile), several tiles per call,
// wide outputs (several panels, partial last), groups of more than one panel,
// a depthwise conv of several vectors, a long Linear.
// Depthwise convolutions through every path of the direct kernel: rows long
// enough for blocks of 8, 4 and 2 pixels and single ones, unstrided (input
// vectors shared by the kernel columns), strided and dilated, 3x3, 5x5 and
// 7x7 taps, full and partial channel vectors, windows cut by the borders.
TEST(conv_forward_depthwise_blocks) {
  std::vector<ConvCase> cases;
  for (int64_t k : {3, 5, 7})
    for (int64_t c : {16, 33})
      for (int64_t stride : {1, 2}) {
        cases.push_back({ConvSpec{c}.conv(c, square(k, stride, k / 2), c, Activation::ReLU6, kBias | kBn), 2, 9, 29});
        Window dilated = square(k, 1, k - 1);
        dilated.dilation_h = dilated.dilation_w = 2;
        cases.push_back({ConvSpec{c}.conv(c, dilated, c, Activation::SiLU, kBias), 1, 15, 23});
      }
  check_cases<float>(cases, 234);
  check_cases<double>(cases, 235);
  check_cases<bf16>(cases, 236);
}

// Winograd F(2x2, 3x3) stages (engine 3; check_model_on runs every model
// with such a stage both ways): odd and even map sizes down to 1x1 (partial
// tiles at the right and bottom edges), every padding 0..2 per side, channel
// counts off the vector width, several tile blocks, GELU (an epilogue not in
// registers), and a Winograd stage between others.
TEST(conv_forward_winograd) {
  std::vector<ConvCase> cases;
  const int64_t sizes[][2] = {{1, 1}, {2, 3}, {5, 7}, {8, 8}, {13, 11}, {30, 3}};
  const int64_t channels[][2] = {{16, 16}, {17, 33}, {40, 24}, {64, 70}};
  int k = 0;
  for (const auto& hw : sizes)
    for (const auto& cc : channels) {
      Window w = square(3, 1, 1);
      w.pad_top = k % 3, w.pad_left = (k + 1) % 3, w.pad_bottom = (k + 2) % 3, w.pad_right = k % 2;
      const int64_t out_h = hw[0] + w.pad_top + w.pad_bottom - 2, out_w = hw[1] + w.pad_left + w.pad_right - 2;
      if (out_h < 1 || out_w < 1) w = square(3, 1, 1);
      const Activation act = k % 4 == 0 ? Activation::GeluErf : k % 4 == 1 ? Activation::ReLU : Activation::None;
      cases.push_back({ConvSpec{cc[0]}.conv(cc[1], w, 1, act, (k % 2 ? kBias : 0) | kBn), 1 + k % 3, hw[0], hw[1]});
      ++k;
    }
  // Between other stages, and a map of many tile blocks.
  cases.push_back({ConvSpec{8}.conv(32, square(1), 1, Activation::ReLU, kBn).conv(32, square(3, 1, 1), 1,
                                                                                   Activation::ReLU, kBn)
                       .conv(48, square(3, 1, 1), 1, Activation::SiLU, kBias).max_pool(square(2, 2, 0)),
                   2, 37, 29});
  check_cases<float>(cases, 251);
  check_cases<double>(cases, 252);
}

TEST(conv_forward_wide_and_long) {
  const std::vector<ConvCase> cases = {
      {ConvSpec{300}.conv(3, square(5, 1, 2), 1, Activation::Tanh, kBias | kBnAffine), 1, 5, 4},
      {ConvSpec{20}.conv(37, square(3, 1, 1), 1, Activation::GeluTanh), 3, 13, 11},
      {ConvSpec{8}.conv(40, square(3, 2, 1), 2, Activation::ReLU), 2, 11, 13},
      {ConvSpec{40}.conv(40, square(3, 1, 1), 40, Activation::SiLU, kBn).conv(40, square(3, 2, 1), 40), 2, 9, 9},
      {ConvSpec{64}.conv(20, square(1), 1, Activation::ReLU6), 3, 13, 13},
      {ConvSpec{20}.conv(48, square(1), 1, Activation::None, 0).scale_shift(Activation::ReLU), 3, 13, 13},
      {ConvSpec{20}.flatten().linear(17, 20 * 13 * 13, Activation::LeakyReLU).pointwise(Activation::Sigmoid)
           .linear(33, 17, Activation::None, kBias | kBn),
       3, 13, 13},
  };
  check_cases<float>(cases, 231);
  check_cases<double>(cases, 232);
  check_cases<bf16>(cases, 233);
}

// Max pooling: a NaN anywhere in a window wins; +-inf go through; padding
// never wins over negative inputs.
template <typename T> void check_max_pool_special_values() {
  Rng rng(241);
  const int64_t n = 2, C = 5;
  const Shape in{7, 6, C};
  for (const ConvSpec& spec : {ConvSpec{C}.max_pool(square(3, 2, 1), kCeil),
                               ConvSpec{C}.max_pool({2, 3, 2, 2, 1, 1, 1, 1, 2, 1}),
                               ConvSpec{C}.max_pool(square(3, 1, 1), 0, Activation::ReLU6)}) {
    const ConvModel<T> m = make_model<T>(spec, rng);
    std::vector<T> x = random_values<T>(rng, n * in.elems(), -4, -1);  // all negative
    x[0] = from_double<T>(kNaN);                                      // image 0, corner, channel 0
    x[((0 * in.h + 3) * in.w + 4) * C + 2] = from_double<T>(kNaN);
    x[((1 * in.h + 6) * in.w + 5) * C + 4] = from_double<T>(kNaN);     // image 1, last pixel
    x[((1 * in.h + 2) * in.w + 2) * C + 1] = from_double<T>(kInf);
    x[((0 * in.h + 5) * in.w + 1) * C + 3] = from_double<T>(-kInf);
    check_model_on(m, n, in, x, rng, " special values");
  }
}

TEST(conv_forward_max_pool_nan_inf_and_padding) {
  check_max_pool_special_values<float>();
  check_max_pool_special_values<double>();
  check_max_pool_special_values<bf16>();
}

// One stage over [p0, p1) writes exactly output pixels [p0, p1): every stage
// kind, ranges of every sort (empty, at either end, in the middle, all).
template <typename A> void check_stage_pixel_ranges() {
  Rng rng(251);
  const ConvSpec spec = ConvSpec{6}
                            .conv(12, square(3, 1, 1), 1, Activation::ReLU)    // im2col
                            .conv(12, square(3, 2, 1), 12, Activation::Sigmoid)  // depthwise
                            .conv(24, square(1), 1, Activation::Tanh)            // 1x1 direct
                            .conv(8, square(3, 1, 1), 4)                         // grouped
                            .scale_shift()
                            .pointwise(Activation::GeluErf)
                            .max_pool(square(2, 2), kCeil)
                            .avg_pool(square(3, 1, 1), kIncludePad)
                            .global_avg_pool()
                            .flatten()
                            .linear(10, 8)
                            .pointwise(Activation::SiLU);
  const ConvModel<A> m = make_model<A>(spec, rng);
  const int64_t n = 3;
  const sk::ConvGeometry g = sk::resolve_conv_geometry(m.desc, 11, 11);
  for (const std::string& isa : supported_isas()) {
    ScopedIsa scoped(isa);
    for (size_t i = 0; i < spec.stages.size(); ++i) {
      const sk::StageShape& s = g.stages[i];
      const int64_t pixels = n * s.out_pixels(), C = s.out_c;
      const std::vector<A> in = random_values<A>(rng, n * s.in_elems(), -4, 4);
      const int64_t ranges[][2] = {{0, 0},           {0, pixels},     {0, 1},
                                   {pixels - 1, pixels}, {1, pixels - 1}, {pixels / 3, 2 * pixels / 3}};
      for (const auto& r : ranges) {
        const int64_t p0 = r[0], p1 = std::max(r[0], r[1]);
        // One guard pixel before pixel 0 and one after the last.
        std::vector<A> out(static_cast<size_t>((pixels + 2) * C), sentinel<A>());
        sk::conv_stage_forward<A>(m.desc, g, i, m.packed.data.get(), in.data(), out.data() + C, p0, p1);
        const int64_t outside = count_not_sentinel(out, 0, (p0 + 1) * C) +
                                count_not_sentinel(out, (p1 + 1) * C, (pixels + 2) * C);
        const int64_t unwritten = (p1 - p0) * C - count_not_sentinel(out, (p0 + 1) * C, (p1 + 1) * C);
        CHECK(outside == 0 && unwritten == 0,
              TypeInfo<A>::name << " isa=" << isa << " stage " << i << " [" << spec.describe() << "] pixels [" << p0
                                << ", " << p1 << ") of " << pixels << ": " << outside << " values written outside, "
                                << unwritten << " left unwritten");
      }
    }
  }
}

TEST(conv_stage_writes_only_its_pixel_range) {
  check_stage_pixel_ranges<float>();
  check_stage_pixel_ranges<double>();
}

// conv_stage_epilogue: act(x * scale + shift) in place over pixels [p0, p1)
// of a convolution computed elsewhere; nothing else changes.
template <typename A> void check_conv_epilogue() {
  Rng rng(261);
  ConvSpec spec{5};
  for (int64_t i = 0; i < sk::kNumActivations; ++i) {
    const int64_t flags = i % 3 == 0 ? kBias : i % 3 == 1 ? kBias | kBnAffine : kBn;
    spec.conv(5 + 3 * (i % 4), square(1 + i % 3, 1, i % 3 / 2), 1, static_cast<Activation>(i), flags);
  }
  const ConvModel<A> m = make_model<A>(spec, rng);
  const int64_t n = 2;
  const sk::ConvGeometry g = sk::resolve_conv_geometry(m.desc, 6, 5);
  for (const std::string& isa : supported_isas()) {
    ScopedIsa scoped(isa);
    for (size_t s = 0; s < spec.stages.size(); ++s) {
      const sk::StageShape& shape = g.stages[s];
      const int64_t pixels = n * shape.out_pixels(), C = shape.out_c;
      const std::vector<A> conv = random_values<A>(rng, pixels * C, -4, 4);
      const int64_t p0 = rng.integer(0, pixels), p1 = rng.integer(p0, pixels);
      std::vector<A> io = conv;
      sk::conv_stage_epilogue<A, A>(m.desc, g, s, m.packed.data.get(), io.data(), io.data(), p0, p1);
      Nhwc ref(1, Shape{1, pixels, C});  // pixels as one row
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t c = 0; c < C; ++c) {
          double v = to_double(conv[p * C + c]), mag = std::abs(v);
          if (p >= p0 && p < p1) reference_epilogue(spec.stages[s], m.params[s], c, !std::is_same_v<A, double>, v, mag);
          ref.value[ref.index(0, 0, p, c)] = v;
          ref.magnitude[ref.index(0, 0, p, c)] = mag;
        }
      const Mismatches bad = compare_nhwc(ref, 1, io.data());
      CHECK(bad.count == 0, TypeInfo<A>::name << " isa=" << isa << " epilogue of stage " << s << " ["
                                              << spec.describe() << "] pixels [" << p0 << ", " << p1 << "): "
                                              << bad.count << " values wrong; first: " << bad.first);
    }
  }
}

TEST(conv_stage_epilogue_in_place) {
  check_conv_epilogue<float>();
  check_conv_epilogue<double>();
}

// ---- tests: layout conversions -------------------------------------------------------------------------

// load_nhwc of images [n0, n1) of an (N, C, H, W) tensor with the given
// strides writes exactly those images of the compact NHWC buffer, converted
// exactly; store_nhwc writes them back to exactly the strided positions.
template <typename T> void check_layout_round_trip() {
  using A = sk::acc_t<T>;
  Rng rng(271);
  const int64_t shapes[][4] = {{3, 5, 4, 6}, {2, 1, 1, 1}, {4, 17, 3, 2}, {1, 3, 7, 1}, {3, 20, 1, 1}};
  for (const auto& shape : shapes) {
    const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
    struct Layout {
      const char* name;
      int64_t strides[4];
    };
    const Layout layouts[] = {
        {"NCHW", {C * H * W, H * W, W, 1}},
        {"channels_last", {H * W * C, 1, W * C, C}},
        {"NCHW with gaps", {C * H * (W + 3) + 5, H * (W + 3) + 1, W + 3, 1}},
        {"CNHW (a permuted view)", {H * W, N * H * W, W, 1}},
    };
    for (const Layout& layout : layouts) {
      const int64_t* s = layout.strides;
      const int64_t span = (N - 1) * s[0] + (C - 1) * s[1] + (H - 1) * s[2] + (W - 1) * s[3] + 1;
      const std::vector<T> x = random_values<T>(rng, span, -100, 100);
      const int64_t n0 = rng.integer(0, N), n1 = rng.integer(n0, N);
      std::ostringstream label;
      label << TypeInfo<T>::name << " " << N << "x" << C << "x" << H << "x" << W << " " << layout.name << " images ["
            << n0 << ", " << n1 << ")";
      auto strided = [&](int64_t n, int64_t c, int64_t h, int64_t w) { return n * s[0] + c * s[1] + h * s[2] + w * s[3]; };
      auto compact = [&](int64_t n, int64_t c, int64_t h, int64_t w) { return ((n * H + h) * W + w) * C + c; };

      constexpr int64_t kGuard = 5;
      std::vector<A> nhwc(static_cast<size_t>(N * C * H * W + kGuard), sentinel<A>());
      sk::load_nhwc<T, A>(x.data(), s, C, H, W, n0, n1, nhwc.data());
      int64_t wrong = 0;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w)
              wrong += to_double(nhwc[compact(n, c, h, w)]) != to_double(x[strided(n, c, h, w)]);
      const int64_t stray = count_not_sentinel(nhwc, 0, n0 * H * W * C) +
                            count_not_sentinel(nhwc, n1 * H * W * C, N * H * W * C + kGuard);
      CHECK(wrong == 0 && stray == 0, label.str() << " load_nhwc: " << wrong << " values wrong, " << stray
                                                  << " written outside the images");

      std::vector<T> back(static_cast<size_t>(span + kGuard), sentinel<T>());
      sk::store_nhwc<A, T>(nhwc.data(), C, H, W, s, n0, n1, back.data());
      std::vector<bool> target(back.size(), false);
      wrong = 0;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) {
              const int64_t at = strided(n, c, h, w);
              target[at] = true;
              wrong += !same_bits(back[at], x[at]);
            }
      int64_t stray_store = 0;
      for (size_t i = 0; i < back.size(); ++i) stray_store += !target[i] && !same_bits(back[i], sentinel<T>());
      CHECK(wrong == 0 && stray_store == 0, label.str() << " store_nhwc: " << wrong << " values differ from the input, "
                                                        << stray_store << " written outside the images");
    }
  }
}

TEST(load_store_nhwc_round_trip) {
  check_layout_round_trip<float>();
  check_layout_round_trip<double>();
  check_layout_round_trip<bf16>();
  // Storing float to bfloat16 rounds to nearest even, NaN kept.
  const std::vector<float> y = {1.0f, 1.00390625f, 1.01171875f, -3.14159f, 1e-30f, static_cast<float>(kNaN), 65504.0f};
  const int64_t C = static_cast<int64_t>(y.size()), strides[4] = {C, 1, 1, 1};
  std::vector<bf16> out(y.size());
  sk::store_nhwc<float, bf16>(y.data(), C, 1, 1, strides, 0, 1, out.data());
  int64_t wrong = 0;
  for (size_t i = 0; i < y.size(); ++i) wrong += !same_bits(out[i], sk::float_to_bf16(y[i]));
  CHECK(wrong == 0, wrong << " float -> bfloat16 values not rounded like float_to_bf16");
}

}  // namespace

int main() { return check::run_all(); }
