// Unit tests of the torch-free kernel cores (csrc/kernels): spec decoding,
// weight packing, scale/shift folding and the fused MLP forward of every dtype
// and every ISA variant the CPU allows, against a naive double-precision
// reference computed here. The check framework and the shared helpers live in
// check.h; the conv kernels are tested by test_conv_kernels.cpp.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "mlp_forward.h"

// ---- tolerance ------------------------------------------------------------------

namespace {

using namespace test_util;
using sk::Activation;
using sk::bf16;
using sk::DType;
using sk::StageKind;

// |got - want| allowed for a forward output `want` whose computation summed
// terms of total size `magnitude`, through stages at most `k` inputs wide.
template <typename T> double forward_tolerance(double want, double magnitude, int64_t k) {
  const double arithmetic = TypeInfo<T>::arithmetic_rtol * (1.0 + static_cast<double>(k) / 16.0) * (1.0 + magnitude);
  return arithmetic + TypeInfo<T>::input_rtol * magnitude + TypeInfo<T>::storage_rtol * std::abs(want);
}

// ---- MLP specs -----------------------------------------------------------------------

struct StageSpec {
  StageKind kind;
  int64_t out_features;  // for elementwise stages: the width they keep
  Activation activation = Activation::None;
  int64_t flags = 0;
  double alpha = 0.1;  // LeakyReLU slope
  double eps = 1e-5;   // BatchNorm eps
};

StageSpec linear(int64_t out, Activation act, int64_t flags = sk::kHasBias) {
  return {StageKind::Linear, out, act, flags};
}
StageSpec scale_shift(int64_t width, Activation act, int64_t flags = sk::kHasBatchNorm | sk::kBatchNormAffine) {
  return {StageKind::ScaleShift, width, act, flags};
}
StageSpec pointwise(int64_t width, Activation act) { return {StageKind::Pointwise, width, act, 0}; }

struct MlpSpec {
  int64_t in_features;
  std::vector<StageSpec> stages;

  std::string describe() const {
    static const char* const kinds[] = {"Linear", "ScaleShift", "Pointwise"};
    std::ostringstream os;
    os << "in=" << in_features;
    for (const StageSpec& s : stages) {
      os << " | " << kinds[static_cast<int>(s.kind)] << "(" << s.out_features << "," << activation_name(s.activation);
      if (s.flags & sk::kHasBias) os << ",bias";
      if (s.flags & sk::kHasBatchNorm) os << ((s.flags & sk::kBatchNormAffine) ? ",bn" : ",bn-noaffine");
      os << ")";
    }
    return os.str();
  }
};

// The int64 spec and double fparams lists, in mlp_spec.h's format.
struct EncodedSpec {
  std::vector<int64_t> spec;
  std::vector<double> fparams;
};

EncodedSpec encode(const MlpSpec& mlp, DType dtype) {
  EncodedSpec e;
  e.spec = {sk::kSpecVersion, static_cast<int64_t>(dtype), static_cast<int64_t>(mlp.stages.size()), mlp.in_features};
  for (const StageSpec& s : mlp.stages) {
    e.spec.insert(e.spec.end(),
                  {static_cast<int64_t>(s.kind), s.out_features, static_cast<int64_t>(s.activation), s.flags});
    e.fparams.insert(e.fparams.end(), {s.alpha, s.eps});
  }
  return e;
}

sk::MlpDesc decode(const EncodedSpec& e) {
  return sk::decode_mlp_spec(e.spec.data(), e.spec.size(), e.fparams.data(), e.fparams.size());
}

// ---- models: spec + random parameters + packed buffer ---------------------------------

template <typename T> struct StageParams {
  std::vector<T> weight;  // [out][in], Linear only
  std::vector<T> bias;    // empty when absent
  std::vector<T> bn_weight, bn_bias, bn_mean, bn_var;
};

template <typename T> struct Model {
  MlpSpec spec;
  sk::MlpDesc desc;
  std::vector<StageParams<T>> params;
  AlignedBytes packed;

  // Widest stage input: the longest dot product, which scales the tolerance.
  int64_t max_k() const {
    int64_t k = 1;
    for (const sk::StageDesc& st : desc.stages) k = std::max(k, st.in_features);
    return k;
  }
};

// Inputs roughly in [-4, 4] and weights in +-2/sqrt(in) keep activations O(1)
// yet reach the interesting ranges (ReLU6 and Hardswish clamps, saturation).
template <typename T> StageParams<T> random_params(const sk::StageDesc& st, Rng& rng) {
  StageParams<T> p;
  const int64_t n = st.out_features;
  if (st.kind == StageKind::Linear) {
    const double bound = 2.0 / std::sqrt(static_cast<double>(st.in_features));
    p.weight = random_values<T>(rng, n * st.in_features, -bound, bound);
  }
  if (st.kind == StageKind::Pointwise) return p;
  if (st.flags & sk::kHasBias) p.bias = random_values<T>(rng, n, -0.5, 0.5);
  if (st.flags & sk::kHasBatchNorm) {
    p.bn_mean = random_values<T>(rng, n, -0.5, 0.5);
    p.bn_var = random_values<T>(rng, n, 0.25, 2.0);
    if (st.flags & sk::kBatchNormAffine) {
      p.bn_weight = random_values<T>(rng, n, 0.5, 1.5);
      p.bn_bias = random_values<T>(rng, n, -0.5, 0.5);
    }
  }
  return p;
}

// Packs the parameters at the offsets decode_mlp_spec laid out.
template <typename T> void pack_model(const sk::MlpDesc& desc, const std::vector<StageParams<T>>& params, uint8_t* buf) {
  using A = sk::acc_t<T>;
  for (size_t i = 0; i < desc.stages.size(); ++i) {
    const sk::StageDesc& st = desc.stages[i];
    const StageParams<T>& p = params[i];
    if (st.weight_offset >= 0)
      sk::pack_linear_weight<T>(p.weight.data(), st.out_features, st.in_features,
                                reinterpret_cast<T*>(buf + st.weight_offset));
    if (st.scale_offset >= 0)
      sk::fold_scale_shift<T>(st.out_features, data_or_null(p.bias), data_or_null(p.bn_weight),
                              data_or_null(p.bn_bias), data_or_null(p.bn_mean), data_or_null(p.bn_var), st.eps,
                              reinterpret_cast<A*>(buf + st.scale_offset), reinterpret_cast<A*>(buf + st.shift_offset));
  }
}

template <typename T> Model<T> make_model(const MlpSpec& spec, Rng& rng) {
  sk::MlpDesc desc = decode(encode(spec, TypeInfo<T>::dtype));
  std::vector<StageParams<T>> params;
  for (const sk::StageDesc& st : desc.stages) params.push_back(random_params<T>(st, rng));
  AlignedBytes packed(desc.packed_bytes);
  pack_model(desc, params, packed.data.get());
  return Model<T>{spec, std::move(desc), std::move(params), std::move(packed)};
}

// ---- the double-precision reference ------------------------------------------------------

// Forward outputs, row-major [rows][out_features], with for each output the
// total size of the (finite) terms that went into it: rounding errors of the
// kernel's arithmetic are proportional to it.
struct Reference {
  int64_t rows = 0, cols = 0;
  std::vector<double> value, magnitude;
  double at(int64_t r, int64_t j) const { return value[static_cast<size_t>(r * cols + j)]; }
  double magnitude_at(int64_t r, int64_t j) const { return magnitude[static_cast<size_t>(r * cols + j)]; }
};

template <typename T>
void reference_stage(const sk::StageDesc& st, const StageParams<T>& p, std::vector<double>& v,
                     std::vector<double>& mag) {
  const int64_t in = st.in_features, out = st.out_features;
  std::vector<double> y(static_cast<size_t>(out)), ym(static_cast<size_t>(out));
  auto param = [](const std::vector<T>& vec, int64_t j, double absent) {
    return vec.empty() ? absent : to_double(vec[static_cast<size_t>(j)]);
  };
  for (int64_t j = 0; j < out; ++j) {
    double acc = 0.0, acc_mag = 0.0;
    if (st.kind == StageKind::Linear) {
      for (int64_t k = 0; k < in; ++k) {
        const double w = to_double(p.weight[static_cast<size_t>(j * in + k)]);
        acc += w * v[static_cast<size_t>(k)];
        acc_mag += std::abs(w) * mag[static_cast<size_t>(k)];
      }
    } else {
      acc = v[static_cast<size_t>(j)];
      acc_mag = mag[static_cast<size_t>(j)];
    }
    if (st.kind != StageKind::Pointwise) {
      const double b = param(p.bias, j, 0.0);
      acc += b;
      acc_mag += std::abs(b);
      if (st.flags & sk::kHasBatchNorm) {
        const double s = param(p.bn_weight, j, 1.0) / std::sqrt(param(p.bn_var, j, 1.0) + st.eps);
        const double mean = param(p.bn_mean, j, 0.0), beta = param(p.bn_bias, j, 0.0);
        acc = (acc - mean) * s + beta;
        acc_mag = (acc_mag + std::abs(mean)) * std::abs(s) + std::abs(beta);
      }
    }
    y[static_cast<size_t>(j)] = activation_reference(st.activation, acc, st.alpha, !std::is_same_v<T, double>);
    ym[static_cast<size_t>(j)] = acc_mag * kActivationGain * std::max(1.0, std::abs(st.alpha));
  }
  v = std::move(y);
  mag = std::move(ym);
}

// rows of x (ld_x apart) through `stages` in turn.
template <typename T>
Reference reference_rows(const std::vector<sk::StageDesc>& stages, const std::vector<StageParams<T>>& params,
                         const T* x, int64_t ld_x, int64_t rows) {
  Reference ref;
  ref.rows = rows;
  ref.cols = stages.back().out_features;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> v(static_cast<size_t>(stages.front().in_features)), mag(v.size());
    for (size_t k = 0; k < v.size(); ++k) {
      v[k] = to_double(x[static_cast<size_t>(r * ld_x) + k]);
      mag[k] = std::isfinite(v[k]) ? std::abs(v[k]) : 0.0;
    }
    for (size_t i = 0; i < stages.size(); ++i) reference_stage(stages[i], params[i], v, mag);
    ref.value.insert(ref.value.end(), v.begin(), v.end());
    ref.magnitude.insert(ref.magnitude.end(), mag.begin(), mag.end());
  }
  return ref;
}

template <typename T> Reference reference_forward(const Model<T>& m, const T* x, int64_t ld_x, int64_t rows) {
  return reference_rows(m.desc.stages, m.params, x, ld_x, rows);
}

// ---- running and checking the forward -------------------------------------------------------

// Output rows are written ld_y apart into a buffer one row longer than needed
// and prefilled with sentinel<T>(): nothing outside [rows) x [out_features) may change.
template <typename T> struct ForwardRun {
  int64_t rows = 0, cols = 0, ld_y = 0;
  std::vector<T> y;
  double at(int64_t r, int64_t j) const { return to_double(y[static_cast<size_t>(r * ld_y + j)]); }
};

template <typename T> ForwardRun<T> run_forward(const Model<T>& m, const std::vector<T>& x, int64_t ld_x, int64_t rows) {
  ForwardRun<T> run;
  run.rows = rows;
  run.cols = m.desc.out_features;
  run.ld_y = run.cols + 3;
  run.y.assign(static_cast<size_t>((rows + 1) * run.ld_y), sentinel<T>());
  sk::mlp_forward_rows<T>(m.desc, m.packed.data.get(), x.data(), ld_x, run.y.data(), run.ld_y, rows);
  return run;
}

// Counts outputs y[r * ld_y + j] (r < ref.rows, j < ref.cols) outside the
// reference's tolerance; describes the first.
template <typename T> Mismatches compare_with_reference(const Reference& ref, const T* y, int64_t ld_y, int64_t k) {
  Mismatches bad;
  for (int64_t r = 0; r < ref.rows; ++r)
    for (int64_t j = 0; j < ref.cols; ++j) {
      const double got = to_double(y[r * ld_y + j]), want = ref.at(r, j);
      const double tol = forward_tolerance<T>(want, ref.magnitude_at(r, j), k);
      if (matches(got, want, tol)) continue;
      if (bad.count++ == 0) {
        std::ostringstream os;
        os.precision(17);
        os << "y[" << r << "][" << j << "] = " << got << ", expected " << want << " (tolerance " << tol << ")";
        bad.first = os.str();
      }
    }
  return bad;
}

template <typename T> void check_untouched_outside_output(const ForwardRun<T>& run, const std::string& label) {
  int64_t changed = 0;
  for (int64_t r = 0; r <= run.rows; ++r)
    for (int64_t j = 0; j < run.ld_y; ++j)
      if ((r == run.rows || j >= run.cols) && !same_bits(run.y[static_cast<size_t>(r * run.ld_y + j)], sentinel<T>()))
        ++changed;
  CHECK(changed == 0, label << ": " << changed << " values written outside the output rows/columns");
}

// Runs the model on x with every supported ISA; each must match the reference,
// and all must agree with the baseline variant.
template <typename T>
void check_forward(const Model<T>& m, const std::vector<T>& x, int64_t ld_x, int64_t rows, const std::string& what) {
  const Reference ref = reference_forward(m, x.data(), ld_x, rows);
  const int64_t k = m.max_k();
  std::vector<ForwardRun<T>> runs;
  const std::vector<std::string> isas = supported_isas();
  for (const std::string& isa : isas) {
    ScopedIsa scoped(isa);
    std::ostringstream label;
    label << TypeInfo<T>::name << " isa=" << isa << " rows=" << rows << " ld_x=" << ld_x << " [" << m.spec.describe()
          << "]" << what;
    CHECK(sk::mlp_tile_rows(m.desc) >= 1 && sk::mlp_tile_rows(m.desc) < 300,
          label.str() << ": tile rows " << sk::mlp_tile_rows(m.desc) << " (300 rows must take several tiles)");
    runs.push_back(run_forward(m, x, ld_x, rows));
    const ForwardRun<T>& run = runs.back();
    const Mismatches bad = compare_with_reference(ref, run.y.data(), run.ld_y, k);
    CHECK(bad.count == 0, label.str() << ": " << bad.count << " outputs differ from the reference; first: " << bad.first);
    check_untouched_outside_output(run, label.str());
  }

  for (size_t i = 1; i < runs.size(); ++i) {
    Mismatches bad;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < runs[i].cols; ++j) {
        const double tol = 2 * forward_tolerance<T>(ref.at(r, j), ref.magnitude_at(r, j), k);
        if (!matches(runs[i].at(r, j), runs[0].at(r, j), tol)) ++bad.count;
      }
    CHECK(bad.count == 0, TypeInfo<T>::name << " [" << m.spec.describe() << "] rows=" << rows << ": " << bad.count
                                            << " outputs of isa=" << isas[i] << " differ from isa=" << isas[0]);
  }
}

// rows x ld_x inputs: random in the row's first in_features columns, NaN in
// the stride padding (which the kernel must not read).
template <typename T> std::vector<T> random_input(Rng& rng, int64_t rows, int64_t in_features, int64_t ld_x) {
  std::vector<T> x(static_cast<size_t>(std::max<int64_t>(rows * ld_x, 1)), from_double<T>(kNaN));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in_features; ++k) x[static_cast<size_t>(r * ld_x + k)] = from_double<T>(rng.uniform(-4, 4));
  return x;
}

constexpr int64_t kRowCounts[] = {0, 1, 7, 9, 33, 300};

// Every spec, for each row count, with dense rows and with a row stride > in_features.
template <typename T> void check_forward_specs(const std::vector<MlpSpec>& specs, uint64_t seed) {
  Rng rng(seed);
  for (const MlpSpec& spec : specs) {
    const Model<T> m = make_model<T>(spec, rng);
    for (int64_t rows : kRowCounts)
      for (int64_t ld_x : {spec.in_features, spec.in_features + 5}) {
        const std::vector<T> x = random_input<T>(rng, rows, spec.in_features, ld_x);
        check_forward(m, x, ld_x, rows, "");
      }
  }
}

// ---- spec suites -----------------------------------------------------------------------------------

// Each activation after each stage kind, cycling through widths (1..70, most
// not multiples of 16) and through the bias/BatchNorm combinations.
std::vector<MlpSpec> single_stage_specs() {
  const int64_t widths[][2] = {{1, 1}, {3, 17}, {16, 16}, {17, 33}, {70, 5}, {33, 70}, {64, 48}, {5, 31}};
  const int64_t linear_flags[] = {0,
                                  sk::kHasBias,
                                  sk::kHasBatchNorm,
                                  sk::kHasBias | sk::kHasBatchNorm,
                                  sk::kHasBias | sk::kHasBatchNorm | sk::kBatchNormAffine,
                                  sk::kHasBatchNorm | sk::kBatchNormAffine};
  const int64_t scale_shift_flags[] = {sk::kHasBatchNorm | sk::kBatchNormAffine, sk::kHasBatchNorm};
  std::vector<MlpSpec> specs;
  size_t i = 0;
  for (Activation act : all_activations()) {
    for (int kind = 0; kind < 3; ++kind, ++i) {
      const int64_t in = widths[i % 8][0], out = widths[i % 8][1];
      if (kind == 0) specs.push_back({in, {linear(out, act, linear_flags[i % 6])}});
      if (kind == 1) specs.push_back({in, {scale_shift(in, act, scale_shift_flags[i % 2])}});
      if (kind == 2) specs.push_back({in, {pointwise(in, act)}});
    }
  }
  return specs;
}

// Random chains of 2..5 stages, widths 1..70.
std::vector<MlpSpec> random_multi_stage_specs(uint64_t seed, int count) {
  Rng rng(seed);
  const std::vector<Activation> acts = all_activations();
  std::vector<MlpSpec> specs;
  for (int n = 0; n < count; ++n) {
    MlpSpec spec{rng.integer(1, 70), {}};
    int64_t width = spec.in_features;
    const int64_t stages = rng.integer(2, 5);
    for (int64_t s = 0; s < stages; ++s) {
      const Activation act = acts[static_cast<size_t>(rng.integer(0, sk::kNumActivations - 1))];
      const int64_t kind = s == 0 ? 0 : rng.integer(0, 2);  // start with a Linear
      if (kind == 0) {
        int64_t flags = rng.integer(0, 1) ? sk::kHasBias : 0;
        if (rng.integer(0, 2) == 0) flags |= sk::kHasBatchNorm | (rng.integer(0, 1) ? sk::kBatchNormAffine : 0);
        width = rng.integer(1, 70);
        spec.stages.push_back(linear(width, act, flags));
      } else if (kind == 1) {
        spec.stages.push_back(
            scale_shift(width, act, sk::kHasBatchNorm | (rng.integer(0, 1) ? sk::kBatchNormAffine : 0)));
      } else {
        spec.stages.push_back(pointwise(width, act));
      }
      spec.stages.back().alpha = rng.uniform(0.01, 0.5);
      spec.stages.back().eps = rng.integer(0, 1) ? 1e-5 : 1e-3;
    }
    specs.push_back(spec);
  }
  return specs;
}

// ---- tests: bfloat16 conversions ---------------------------------------------------------------------------

float float_from_bits(uint32_t u) { return std::bit_cast<float>(u); }

TEST(bf16_round_to_nearest_even) {
  struct Case {
    uint32_t f;
    uint16_t bf;
    const char* what;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80, "1.0 exact"},
      {0x3f808000u, 0x3f80, "tie rounds down to even"},
      {0x3f818000u, 0x3f82, "tie rounds up to even"},
      {0x3f808001u, 0x3f81, "above the tie rounds up"},
      {0x3f807fffu, 0x3f80, "below the tie rounds down"},
      {0xbf818000u, 0xbf82, "negative tie to even"},
      {0x80000000u, 0x8000, "-0 keeps its sign"},
      {0x7f800000u, 0x7f80, "+inf"},
      {0xff800000u, 0xff80, "-inf"},
      {0x7f7fffffu, 0x7f80, "FLT_MAX rounds to inf"},
      {0x00000001u, 0x0000, "smallest subnormal rounds to 0"},
  };
  for (const Case& c : cases) {
    const uint16_t got = sk::float_to_bf16(float_from_bits(c.f)).bits;
    CHECK(got == c.bf, c.what << ": 0x" << std::hex << c.f << " -> 0x" << got << ", expected 0x" << c.bf);
  }
  for (uint32_t nan : {0x7f800001u, 0x7fc00000u, 0xffffffffu, 0x7f810000u}) {
    const bf16 b = sk::float_to_bf16(float_from_bits(nan));
    CHECK(std::isnan(sk::bf16_to_float(b)) && (b.bits & 0x0040),
          "NaN 0x" << std::hex << nan << " -> 0x" << b.bits << ", expected a quiet NaN");
  }
  // Every non-NaN bfloat16 widens exactly and converts back to itself.
  int64_t round_trip_errors = 0;
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const bf16 b{static_cast<uint16_t>(bits)};
    const float f = sk::bf16_to_float(b);
    if (std::isnan(f)) continue;
    round_trip_errors += std::bit_cast<uint32_t>(f) != bits << 16 || sk::float_to_bf16(f).bits != bits;
  }
  CHECK(round_trip_errors == 0, round_trip_errors << " bfloat16 values do not round-trip through float");
}

// ---- tests: spec decoding --------------------------------------------------------------------------------

TEST(decode_layout) {
  // Offsets worked out by hand from mlp_spec.h's rules (float32: 4-byte elements and scale/shift).
  const MlpSpec spec{20,
                     {linear(33, Activation::ReLU), scale_shift(33, Activation::Tanh), pointwise(33, Activation::SiLU),
                      linear(5, Activation::None, 0)}};
  const sk::MlpDesc d = decode(encode(spec, DType::Float32));
  CHECK(d.dtype == DType::Float32, "dtype");
  CHECK(d.in_features == 20 && d.out_features == 5, d.in_features << " -> " << d.out_features);
  CHECK(d.max_width == 48, "max_width " << d.max_width);
  CHECK(d.stages.size() == 4, d.stages.size() << " stages");
  if (d.stages.size() != 4) return;
  const int64_t expected[4][5] = {
      // in, weight, scale, shift, out
      {20, 0, 3840, 4032, 33},        // 3 panels x 20 x 16 x 4 = 3840; 48 x 4 = 192 each
      {33, -1, 4224, 4416, 33},       //
      {33, -1, -1, -1, 33},           // Pointwise: no sections
      {33, 4608, 6720, 6784, 5},      // 1 panel x 33 x 16 x 4 = 2112; 16 x 4 = 64 each
  };
  for (size_t i = 0; i < 4; ++i) {
    const sk::StageDesc& st = d.stages[i];
    CHECK(st.in_features == expected[i][0] && st.weight_offset == expected[i][1] &&
              st.scale_offset == expected[i][2] && st.shift_offset == expected[i][3] &&
              st.out_features == expected[i][4],
          "stage " << i << ": in=" << st.in_features << " weight@" << st.weight_offset << " scale@" << st.scale_offset
                   << " shift@" << st.shift_offset << " out=" << st.out_features);
  }
  CHECK(d.packed_bytes == 6848, "packed_bytes " << d.packed_bytes);
  CHECK(d.stages[1].alpha == 0.1 && d.stages[1].eps == 1e-5, "fparams not decoded");

  // bfloat16: 2-byte weights, float scale/shift.
  const sk::MlpDesc b = decode(encode(MlpSpec{3, {linear(17, Activation::None)}}, DType::BFloat16));
  CHECK(b.stages[0].weight_offset == 0 && b.stages[0].scale_offset == 192 && b.stages[0].shift_offset == 320 &&
            b.packed_bytes == 448,
        "bf16 layout: scale@" << b.stages[0].scale_offset << " shift@" << b.stages[0].shift_offset << " bytes "
                              << b.packed_bytes);
}

TEST(decode_rejects_malformed_specs) {
  const MlpSpec good{8, {linear(12, Activation::ReLU), pointwise(12, Activation::Tanh)}};
  const EncodedSpec base = encode(good, DType::Float32);
  CHECK(decode(base).out_features == 12, "the unmodified spec must decode");

  struct Case {
    const char* what;
    void (*mutate)(EncodedSpec&);
  };
  const Case cases[] = {
      {"wrong version", [](EncodedSpec& e) { e.spec[0] = sk::kSpecVersion + 1; }},
      {"version 0", [](EncodedSpec& e) { e.spec[0] = 0; }},
      {"too short", [](EncodedSpec& e) { e.spec.resize(3); }},
      {"empty", [](EncodedSpec& e) { e.spec.clear(); }},
      {"dtype code 4", [](EncodedSpec& e) { e.spec[1] = 4; }},
      {"dtype code -1", [](EncodedSpec& e) { e.spec[1] = -1; }},
      {"zero stages", [](EncodedSpec& e) { e.spec[2] = 0; }},
      {"negative stage count", [](EncodedSpec& e) { e.spec[2] = -1; }},
      {"stage count larger than the list", [](EncodedSpec& e) { e.spec[2] = 3; }},
      {"stage count smaller than the list", [](EncodedSpec& e) { e.spec[2] = 1; }},
      {"huge stage count", [](EncodedSpec& e) { e.spec[2] = (int64_t{1} << 62) + 1; }},
      {"spec one element too long", [](EncodedSpec& e) { e.spec.push_back(0); }},
      {"spec one element too short", [](EncodedSpec& e) { e.spec.pop_back(); }},
      {"fparams too short", [](EncodedSpec& e) { e.fparams.pop_back(); }},
      {"fparams too long", [](EncodedSpec& e) { e.fparams.push_back(0.0); }},
      {"in_features 0", [](EncodedSpec& e) { e.spec[3] = 0; }},
      {"stage kind 3", [](EncodedSpec& e) { e.spec[4] = 3; }},
      {"stage kind -1", [](EncodedSpec& e) { e.spec[4] = -1; }},
      {"Linear out_features 0", [](EncodedSpec& e) { e.spec[5] = 0; }},
      {"Linear out_features -4", [](EncodedSpec& e) { e.spec[5] = -4; }},
      {"activation code kNumActivations", [](EncodedSpec& e) { e.spec[6] = sk::kNumActivations; }},
      {"activation code -1", [](EncodedSpec& e) { e.spec[10] = -1; }},
      {"Pointwise changes width", [](EncodedSpec& e) { e.spec[9] = 13; }},
      {"ScaleShift changes width", [](EncodedSpec& e) {
         e.spec[8] = static_cast<int64_t>(StageKind::ScaleShift);
         e.spec[9] = 11;
       }},
      {"elementwise first stage changes width",
       [](EncodedSpec& e) { e.spec[4] = static_cast<int64_t>(StageKind::Pointwise); }},  // 8 -> 12
  };
  for (const Case& c : cases) {
    EncodedSpec bad = base;
    c.mutate(bad);
    CHECK_THROWS(std::invalid_argument, decode(bad), c.what);
  }
}

// ---- tests: packing --------------------------------------------------------------------------------------

template <typename T> void check_pack_linear_weight() {
  Rng rng(11);
  const int64_t shapes[][2] = {{21, 5}, {16, 3}, {1, 1}, {33, 7}, {70, 2}};  // out, in
  for (const auto& shape : shapes) {
    const int64_t out = shape[0], in = shape[1], panels = sk::panel_count(out);
    const std::vector<T> w = random_values<T>(rng, out * in, 0.5, 1.5);  // never zero
    constexpr int64_t kGuard = 16;
    std::vector<T> packed(static_cast<size_t>(panels * in * sk::kPanelWidth + kGuard), sentinel<T>());
    sk::pack_linear_weight<T>(w.data(), out, in, packed.data());

    Mismatches bad;
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t k = 0; k < in; ++k)
        for (int64_t j = 0; j < sk::kPanelWidth; ++j) {
          const int64_t n = p * sk::kPanelWidth + j;
          const T want = n < out ? w[static_cast<size_t>(n * in + k)] : from_double<T>(0.0);
          const T got = packed[static_cast<size_t>((p * in + k) * sk::kPanelWidth + j)];
          if (!same_bits(got, want) && bad.count++ == 0)
            bad.first = "panel " + std::to_string(p) + " k " + std::to_string(k) + " column " + std::to_string(j) +
                        ": got " + std::to_string(to_double(got)) + ", expected " + std::to_string(to_double(want));
        }
    CHECK(bad.count == 0, TypeInfo<T>::name << " out=" << out << " in=" << in << ": " << bad.count
                                            << " misplaced values; first: " << bad.first);
    const bool guard_intact = std::all_of(packed.end() - kGuard, packed.end(),
                                          [](const T& v) { return same_bits(v, sentinel<T>()); });
    CHECK(guard_intact, TypeInfo<T>::name << " out=" << out << " in=" << in << ": wrote past the packed panels");
  }
}

TEST(pack_linear_weight_layout) {
  check_pack_linear_weight<float>();
  check_pack_linear_weight<double>();
  check_pack_linear_weight<bf16>();
}

template <typename T> void check_fold_scale_shift() {
  using A = sk::acc_t<T>;
  const double rtol = std::is_same_v<A, double> ? 1e-14 : 1e-6;
  constexpr int64_t kChannels = 19, kPadded = 32, kGuard = 8;
  constexpr double kEps = 1e-3;
  Rng rng(12);
  const std::vector<T> bias = random_values<T>(rng, kChannels, -1, 1), gamma = random_values<T>(rng, kChannels, 0.5, 2),
                       beta = random_values<T>(rng, kChannels, -1, 1), mean = random_values<T>(rng, kChannels, -1, 1),
                       var = random_values<T>(rng, kChannels, 0.1, 3);
  for (bool has_bias : {false, true})
    for (int bn : {0, 1, 2}) {  // none, not affine, affine
      const bool affine = bn == 2;
      std::vector<A> scale(kPadded + kGuard, A(-7)), shift(kPadded + kGuard, A(-7));
      sk::fold_scale_shift<T>(kChannels, has_bias ? bias.data() : nullptr, affine ? gamma.data() : nullptr,
                              affine ? beta.data() : nullptr, bn ? mean.data() : nullptr, bn ? var.data() : nullptr,
                              kEps, scale.data(), shift.data());
      std::ostringstream label;
      label << TypeInfo<T>::name << (has_bias ? " bias" : " no-bias")
            << (bn == 0 ? " no-bn" : affine ? " bn-affine" : " bn-not-affine");
      Mismatches bad;
      for (int64_t c = 0; c < kChannels; ++c) {
        const size_t i = static_cast<size_t>(c);
        const double b = has_bias ? to_double(bias[i]) : 0.0;
        double want_scale = 1.0, want_shift = b;
        if (bn) {
          want_scale = (affine ? to_double(gamma[i]) : 1.0) / std::sqrt(to_double(var[i]) + kEps);
          want_shift = (b - to_double(mean[i])) * want_scale + (affine ? to_double(beta[i]) : 0.0);
        }
        const bool ok = matches(scale[i], want_scale, rtol * std::abs(want_scale)) &&
                        matches(shift[i], want_shift, rtol * (1.0 + std::abs(want_shift)));
        if (!ok && bad.count++ == 0) {
          std::ostringstream os;
          os.precision(17);
          os << "channel " << c << ": scale " << scale[i] << " shift " << shift[i] << ", expected " << want_scale
             << " / " << want_shift;
          bad.first = os.str();
        }
      }
      CHECK(bad.count == 0, label.str() << ": " << bad.count << " channels wrong; first: " << bad.first);
      bool padding_zero = true, guard_intact = true;
      for (int64_t c = kChannels; c < kPadded; ++c)
        padding_zero &= scale[static_cast<size_t>(c)] == A(0) && shift[static_cast<size_t>(c)] == A(0);
      for (int64_t c = kPadded; c < kPadded + kGuard; ++c)
        guard_intact &= scale[static_cast<size_t>(c)] == A(-7) && shift[static_cast<size_t>(c)] == A(-7);
      CHECK(padding_zero, label.str() << ": channels " << kChannels << ".." << kPadded << " not zero padded");
      CHECK(guard_intact, label.str() << ": wrote past the padded panel");
    }
}

TEST(fold_scale_shift_bias_and_batchnorm) {
  check_fold_scale_shift<float>();
  check_fold_scale_shift<double>();
  check_fold_scale_shift<bf16>();
}

// ---- tests: ISA selection --------------------------------------------------------------------------------

TEST(isa_override) {
  std::printf("  detected ISA: %s; testing:", sk::isa_name(sk::detect_isa()));
  for (const std::string& isa : supported_isas()) std::printf(" %s", isa.c_str());
  std::printf("\n");
  for (const std::string& isa : supported_isas()) {
    ScopedIsa scoped(isa);
    CHECK(sk::isa_name(sk::active_isa()) == isa, "override " << isa << " gave " << sk::isa_name(sk::active_isa()));
  }
  CHECK(sk::active_isa() == sk::detect_isa(), "\"\" must restore the detected ISA");
  CHECK_THROWS(std::invalid_argument, sk::set_isa_override("sse9"), "unknown name");
  CHECK_THROWS(std::invalid_argument, sk::set_isa_override("AVX2"), "names are lower case");
  for (sk::Isa isa : {sk::Isa::Avx2, sk::Isa::Avx512, sk::Isa::Avx512Bf16})
    if (static_cast<int>(isa) > static_cast<int>(sk::detect_isa()))
      CHECK_THROWS(std::invalid_argument, sk::set_isa_override(sk::isa_name(isa)), "unsupported by this CPU");
  CHECK(sk::active_isa() == sk::detect_isa(), "a rejected override must not change the active ISA");
}

// ---- tests: forward --------------------------------------------------------------------------------------

TEST(forward_single_stage_every_activation) {
  const std::vector<MlpSpec> specs = single_stage_specs();
  check_forward_specs<float>(specs, 21);
  check_forward_specs<double>(specs, 22);
  check_forward_specs<bf16>(specs, 23);
}

TEST(forward_random_multi_stage) {
  const std::vector<MlpSpec> specs = random_multi_stage_specs(31, 14);
  check_forward_specs<float>(specs, 32);
  check_forward_specs<double>(specs, 33);
  check_forward_specs<bf16>(specs, 34);
}

TEST(forward_wide_and_narrow_chains) {
  // Widths around the panel edges and a 1-wide bottleneck, every stage kind.
  const std::vector<MlpSpec> specs = {
      {70, {linear(1, Activation::ReLU), linear(70, Activation::GeluErf), scale_shift(70, Activation::ReLU6),
            linear(16, Activation::Sigmoid, sk::kHasBias | sk::kHasBatchNorm)}},
      {1, {linear(15, Activation::Hardswish), pointwise(15, Activation::LeakyReLU), linear(17, Activation::SiLU),
           linear(32, Activation::ReLU, 0), linear(47, Activation::Tanh)}},
      {48, {scale_shift(48, Activation::None, sk::kHasBatchNorm), linear(64, Activation::GeluTanh),
            linear(65, Activation::ReLU, sk::kHasBias | sk::kHasBatchNorm | sk::kBatchNormAffine)}},
  };
  check_forward_specs<float>(specs, 41);
  check_forward_specs<double>(specs, 42);
  check_forward_specs<bf16>(specs, 43);
}

// NaN and infinities go through every activation the way the eager ops (and
// the reference formulas) take them: one value per column, two rows.
template <typename T> void check_nonfinite_elementwise() {
  const std::vector<double> values = {kNaN, kInf, -kInf, 0.0, 1.0, -1.0, 3.5, -3.5, 7.0, -7.0, 100.0, -100.0};
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<T> x;
  for (double v : values) x.push_back(from_double<T>(v));
  for (auto it = values.rbegin(); it != values.rend(); ++it) x.push_back(from_double<T>(*it));
  Rng rng(51);
  for (Activation act : all_activations()) {
    check_forward(make_model<T>(MlpSpec{n, {pointwise(n, act)}}, rng), x, n, 2, " non-finite");
    check_forward(make_model<T>(MlpSpec{n, {scale_shift(n, act)}}, rng), x, n, 2, " non-finite");
  }
}

// A NaN or infinity in a Linear stage's input spreads over its own row only.
template <typename T> void check_nonfinite_linear() {
  Rng rng(52);
  const int64_t in = 20, rows = 9;
  for (Activation act : {Activation::ReLU, Activation::None, Activation::Sigmoid, Activation::Tanh}) {
    const Model<T> m = make_model<T>(MlpSpec{in, {linear(37, act, sk::kHasBias | sk::kHasBatchNorm)}}, rng);
    std::vector<T> x = random_input<T>(rng, rows, in, in);
    x[3 * in + 5] = from_double<T>(kNaN);
    x[6 * in + 0] = from_double<T>(kInf);
    x[7 * in + 19] = from_double<T>(-kInf);
    check_forward(m, x, in, rows, " non-finite");
    const ForwardRun<T> run = run_forward(m, x, in, rows);
    int64_t nan_in_row3 = 0, nonfinite_elsewhere = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < run.cols; ++j) {
        if (r == 3) nan_in_row3 += std::isnan(run.at(r, j));
        if (r != 3 && r != 6 && r != 7) nonfinite_elsewhere += !std::isfinite(run.at(r, j));
      }
    CHECK(nan_in_row3 == run.cols, TypeInfo<T>::name << " " << activation_name(act) << ": only " << nan_in_row3
                                                     << " of " << run.cols << " outputs of the NaN row are NaN");
    CHECK(nonfinite_elsewhere == 0, TypeInfo<T>::name << " " << activation_name(act) << ": " << nonfinite_elsewhere
                                                      << " non-finite outputs in rows without one");
  }
}

// The documented special values, spelled out.
template <typename T> void check_documented_special_values() {
  struct Expect {
    Activation act;
    double x, y;
  };
  const Expect table[] = {
      {Activation::ReLU, kNaN, kNaN},        {Activation::ReLU, -kInf, 0.0},       {Activation::ReLU, kInf, kInf},
      {Activation::LeakyReLU, kNaN, kNaN},   {Activation::LeakyReLU, -kInf, -kInf}, {Activation::ReLU6, kNaN, kNaN},
      {Activation::ReLU6, kInf, 6.0},        {Activation::ReLU6, -kInf, 0.0},      {Activation::Sigmoid, -kInf, 0.0},
      {Activation::Sigmoid, kInf, 1.0},      {Activation::Sigmoid, kNaN, kNaN},    {Activation::Tanh, kInf, 1.0},
      {Activation::Tanh, -kInf, -1.0},       {Activation::Tanh, kNaN, kNaN},
      {Activation::GeluErf, kInf, kInf},     {Activation::GeluErf, -kInf, kNaN},
      {Activation::GeluErf, kNaN, kNaN},     {Activation::GeluTanh, kInf, kInf},   {Activation::GeluTanh, kNaN, kNaN},
      {Activation::SiLU, kInf, kInf},        {Activation::SiLU, kNaN, kNaN},       {Activation::Hardswish, kInf, kInf},
      {Activation::Hardswish, kNaN, kNaN},   {Activation::None, kNaN, kNaN},       {Activation::None, -kInf, -kInf},
      {Activation::Mish, kInf, kInf},        {Activation::Mish, -kInf, kNaN},      {Activation::Mish, kNaN, kNaN},
  };
  Rng rng(53);
  for (const Expect& e : table) {
    const Model<T> m = make_model<T>(MlpSpec{1, {pointwise(1, e.act)}}, rng);
    const std::vector<T> x = {from_double<T>(e.x)};
    for (const std::string& isa : supported_isas()) {
      ScopedIsa scoped(isa);
      const double got = run_forward(m, x, 1, 1).at(0, 0);
      CHECK(matches(got, e.y, 1e-6), TypeInfo<T>::name << " isa=" << isa << " " << activation_name(e.act) << "("
                                                        << e.x << ") = " << got << ", expected " << e.y);
    }
  }
}

TEST(forward_nonfinite_inputs) {
  check_nonfinite_elementwise<float>();
  check_nonfinite_elementwise<double>();
  check_nonfinite_elementwise<bf16>();
  check_nonfinite_linear<float>();
  check_nonfinite_linear<double>();
  check_nonfinite_linear<bf16>();
  check_documented_special_values<float>();
  check_documented_special_values<double>();
  check_documented_special_values<bf16>();
}

// mlp_stage_epilogue: a stage's epilogue over rows whose Linear product was
// computed elsewhere, so its reference is the stage taken as an elementwise
// one, act(in * scale + shift). Out of place (into a sentinel-filled buffer)
// and in place, for every stage kind and ISA.
template <typename T> void check_stage_epilogue() {
  Rng rng(71);
  const int64_t bn_affine = sk::kHasBatchNorm | sk::kBatchNormAffine;
  const MlpSpec spec{13,
                     {linear(37, Activation::GeluTanh, sk::kHasBias | bn_affine), scale_shift(37, Activation::ReLU6),
                      pointwise(37, Activation::SiLU), linear(5, Activation::ReLU), linear(300, Activation::Tanh, 0),
                      scale_shift(300, Activation::LeakyReLU, sk::kHasBatchNorm)}};
  const Model<T> m = make_model<T>(spec, rng);
  constexpr int64_t kRows = 33;
  for (size_t s = 0; s < m.desc.stages.size(); ++s) {
    sk::StageDesc elementwise = m.desc.stages[s];
    const int64_t n = elementwise.out_features, ld = n + 4;
    if (elementwise.kind == StageKind::Linear) {
      elementwise.kind = StageKind::ScaleShift;
      elementwise.in_features = n;
    }
    const std::vector<T> in = random_input<T>(rng, kRows, n, ld);  // NaN between n and ld
    const Reference ref = reference_rows<T>({elementwise}, {m.params[s]}, in.data(), ld, kRows);
    for (const std::string& isa : supported_isas()) {
      ScopedIsa scoped(isa);
      std::ostringstream label;
      label << TypeInfo<T>::name << " isa=" << isa << " epilogue of stage " << s << " [" << spec.describe() << "]";

      ForwardRun<T> run{kRows, n, n + 3, {}};
      run.y.assign(static_cast<size_t>((kRows + 1) * run.ld_y), sentinel<T>());
      sk::mlp_stage_epilogue<T>(m.desc, s, m.packed.data.get(), in.data(), ld, run.y.data(), run.ld_y, kRows);
      const Mismatches bad = compare_with_reference(ref, run.y.data(), run.ld_y, 1);
      CHECK(bad.count == 0, label.str() << ": " << bad.count << " outputs wrong; first: " << bad.first);
      check_untouched_outside_output(run, label.str());

      std::vector<T> inplace = in;
      sk::mlp_stage_epilogue<T>(m.desc, s, m.packed.data.get(), inplace.data(), ld, inplace.data(), ld, kRows);
      const Mismatches bad_inplace = compare_with_reference(ref, inplace.data(), ld, 1);
      CHECK(bad_inplace.count == 0,
            label.str() << " in place: " << bad_inplace.count << " outputs wrong; first: " << bad_inplace.first);
      int64_t padding_changed = 0;
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = n; j < ld; ++j)
          padding_changed += !same_bits(inplace[static_cast<size_t>(r * ld + j)], in[static_cast<size_t>(r * ld + j)]);
      CHECK(padding_changed == 0, label.str() << " in place: " << padding_changed << " values changed past the row");
    }
  }
}

TEST(stage_epilogue) {
  check_stage_epilogue<float>();
  check_stage_epilogue<double>();
  check_stage_epilogue<bf16>();
}

// The thread-local workspaces: concurrent calls on models of different widths
// give bit-for-bit the results of sequential calls.
TEST(forward_concurrent_threads) {
  Rng rng(61);
  const std::vector<MlpSpec> specs = {
      {5, {linear(9, Activation::ReLU)}},
      {70, {linear(70, Activation::GeluErf), linear(70, Activation::Tanh)}},
      {33, {linear(48, Activation::SiLU), scale_shift(48, Activation::None)}},
      {16, {pointwise(16, Activation::Sigmoid), linear(3, Activation::None)}},
  };
  constexpr int64_t kRows = 300;
  std::vector<Model<float>> models;
  std::vector<std::vector<float>> inputs, expected;
  for (const MlpSpec& spec : specs) {
    models.push_back(make_model<float>(spec, rng));
    inputs.push_back(random_input<float>(rng, kRows, spec.in_features, spec.in_features));
    expected.push_back(run_forward(models.back(), inputs.back(), spec.in_features, kRows).y);
  }
  std::vector<int64_t> differing(specs.size(), 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < specs.size(); ++t)
    threads.emplace_back([&, t] {
      for (int iteration = 0; iteration < 20; ++iteration) {
        // Each thread walks the models in its own order, so workspaces grow and shrink.
        const size_t i = (t + static_cast<size_t>(iteration)) % specs.size();
        const std::vector<float> y = run_forward(models[i], inputs[i], specs[i].in_features, kRows).y;
        differing[t] += std::memcmp(y.data(), expected[i].data(), y.size() * sizeof(float)) != 0;
      }
    });
  for (std::thread& th : threads) th.join();
  for (size_t t = 0; t < specs.size(); ++t)
    CHECK(differing[t] == 0, "thread " << t << ": " << differing[t] << " of 20 runs differ from the sequential run");
}

}  // namespace

int main() { return check::run_all(); }
