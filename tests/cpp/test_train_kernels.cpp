// Unit tests of the training-path epilogue kernels (kernels/train_epilogue.h)
// against scalar double references written from the definitions: batch
// moments, the forward epilogue, the backward reduce pass for every
// activation and argument source, and BatchNorm's input gradient. Every ISA
// variant, float and double, both layouts ((N, C) rows / channels_last and
// NCHW planes), split outer ranges (the adapter's thread chunks), NaN and inf.
#include "check.h"
#include "train_epilogue.h"

namespace {

using namespace test_util;
using sk::ActSource;
using sk::ChannelLayout;

int64_t channel_of(const ChannelLayout& l, int64_t i) { return (i / l.inner) % l.channels; }

double act_ref(Activation a, double x, double alpha) {
  switch (a) {
    case Activation::None: return x;
    case Activation::ReLU: return x > 0 ? x : (std::isnan(x) ? x : 0.0);
    case Activation::LeakyReLU: return x > 0 ? x : x * alpha;
    case Activation::ReLU6: return std::isnan(x) ? x : std::min(std::max(x, 0.0), 6.0);
    case Activation::Sigmoid: return 1 / (1 + std::exp(-x));
    case Activation::Tanh: return std::tanh(x);
    case Activation::GeluErf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::GeluTanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::SiLU: return x / (1 + std::exp(-x));
    case Activation::Hardswish: return x * std::min(std::max(x + 3, 0.0), 6.0) / 6;
    case Activation::Hardsigmoid: return std::min(std::max(x + 3, 0.0), 6.0) / 6;
    case Activation::Mish: return x * std::tanh(std::log1p(std::exp(x)));
  }
  return x;
}

// d act / dx at the pre-activation x, by the textbook formulas (the kernels
// follow ATen's, which agree away from the kinks the inputs avoid).
double act_grad_ref(Activation a, double x, double alpha) {
  switch (a) {
    case Activation::None: return 1;
    case Activation::ReLU: return x > 0 ? 1 : 0;
    case Activation::LeakyReLU: return x > 0 ? 1 : alpha;
    case Activation::ReLU6: return x > 0 && x < 6 ? 1 : 0;
    case Activation::Sigmoid: {
      const double s = 1 / (1 + std::exp(-x));
      return s * (1 - s);
    }
    case Activation::Tanh: return 1 - std::tanh(x) * std::tanh(x);
    case Activation::GeluErf: return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-x * x / 2) / std::sqrt(2 * M_PI);
    case Activation::GeluTanh: {
      const double k = std::sqrt(2 / M_PI), t = std::tanh(k * (x + 0.044715 * x * x * x));
      return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
    }
    case Activation::SiLU: {
      const double s = 1 / (1 + std::exp(-x));
      return s * (1 + x * (1 - s));
    }
    case Activation::Hardswish: return x < -3 ? 0 : x <= 3 ? x / 3 + 0.5 : 1;
    case Activation::Hardsigmoid: return x > -3 && x < 3 ? 1.0f / 6.0f : 0;  // eager's slope, rounded to float
    case Activation::Mish: {  // d/dx x tanh(sp(x)) = tanh(sp(x)) + x sech^2(sp(x)) sigmoid(x)
      const double t = std::tanh(std::log1p(std::exp(x))), s = 1 / (1 + std::exp(-x));
      return t + x * (1 - t * t) * s;
    }
  }
  return 1;
}

// Values away from the activations' kinks (0, +-3, 6), where the derivative is ambiguous.
template <typename T> std::vector<T> away_from_kinks(Rng& rng, int64_t n, double scale) {
  std::vector<T> v(static_cast<size_t>(n));
  for (T& e : v) {
    double x;
    do x = rng.uniform(-scale, scale);
    while (std::abs(x) < 1e-3 || std::abs(std::abs(x) - 3) < 1e-3 || std::abs(x - 6) < 1e-3);
    e = static_cast<T>(x);
  }
  return v;
}

template <typename T> double tol_for(double magnitude) {
  return (sizeof(T) == 4 ? 2e-5 : 1e-12) * std::max(1.0, magnitude);
}

// The adapter splits the outer range over threads: every test runs the
// kernel over [0, outer) in three uneven pieces.
template <typename F> void in_pieces(int64_t outer, F&& f) {
  const int64_t a = outer / 3, b = outer - outer / 4;
  f(int64_t{0}, a);
  f(a, b);
  f(b, outer);
}

const ChannelLayout kLayouts[] = {{7, 5, 1}, {3, 4, 9}, {2, 19, 1}, {2, 3, 37}, {1, 33, 1}, {5, 1, 600}};

template <typename T> void check_moments(const ChannelLayout& l, Rng& rng) {
  const std::vector<T> z = random_values<T>(rng, l.numel(), 90.0, 110.0);  // a large mean: shifted moments matter
  std::vector<T> ref(static_cast<size_t>(l.channels));
  for (int64_t c = 0; c < l.channels; ++c) ref[static_cast<size_t>(c)] = z[static_cast<size_t>(c * l.inner)];
  std::vector<double> sum(static_cast<size_t>(l.channels)), sumsq(static_cast<size_t>(l.channels));
  in_pieces(l.outer, [&](int64_t o0, int64_t o1) {
    sk::channel_moments<T>(l, z.data(), ref.data(), sum.data(), sumsq.data(), o0, o1);
  });
  for (int64_t c = 0; c < l.channels; ++c) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < l.numel(); ++i)
      if (channel_of(l, i) == c) {
        const double d = static_cast<double>(z[static_cast<size_t>(i)]) - static_cast<double>(ref[static_cast<size_t>(c)]);
        s += d;
        q += d * d;
      }
    CHECK(matches(sum[static_cast<size_t>(c)], s, 1e-9 * (1 + std::abs(s))), "sum c=" << c);
    CHECK(matches(sumsq[static_cast<size_t>(c)], q, 1e-9 * (1 + q)), "sumsq c=" << c);
  }
}

// `centered`: a BatchNorm's form, y = (z - center) * scale + shift, with a
// center of the size of the values (the folded form would lose digits there).
template <typename T>
void check_forward(const ChannelLayout& l, Activation act, bool affine, bool keep_pre, bool centered, Rng& rng) {
  const double alpha = 0.07;
  std::vector<T> z = away_from_kinks<T>(rng, l.numel(), 4.0);
  const std::vector<T> scale = random_values<T>(rng, l.channels, 0.5, 1.5);
  const std::vector<T> shift = random_values<T>(rng, l.channels, -0.01, 0.01);  // keeps y away from the kinks too
  const std::vector<T> center = random_values<T>(rng, l.channels, 50.0, 60.0);
  if (centered)
    for (int64_t i = 0; i < l.numel(); ++i)
      z[static_cast<size_t>(i)] += center[static_cast<size_t>(channel_of(l, i))];
  std::vector<T> out(z.size()), pre(z.size());
  in_pieces(l.outer, [&](int64_t o0, int64_t o1) {
    sk::epilogue_forward<T>(l, z.data(), centered ? center.data() : nullptr, affine ? scale.data() : nullptr,
                            affine ? shift.data() : nullptr, act, alpha, keep_pre ? pre.data() : nullptr, out.data(),
                            o0, o1);
  });
  for (int64_t i = 0; i < l.numel(); ++i) {
    const size_t c = static_cast<size_t>(channel_of(l, i));
    const double zc = static_cast<double>(z[static_cast<size_t>(i)]) - (centered ? static_cast<double>(center[c]) : 0.0);
    const double y = affine ? zc * scale[c] + shift[c] : zc;
    const double want = act_ref(act, y, alpha);
    CHECK(matches(out[static_cast<size_t>(i)], want, tol_for<T>(std::abs(want))),
          "act " << static_cast<int>(act) << " i=" << i << " got " << out[static_cast<size_t>(i)] << " want " << want);
    if (keep_pre) CHECK(matches(pre[static_cast<size_t>(i)], y, tol_for<T>(std::abs(y))), "pre i=" << i);
  }
}

// The backward reduce pass: dy = g * act'(y) with y from each source, and the
// per-channel sums the bias and BatchNorm gradients use.
template <typename T> void check_backward_reduce(const ChannelLayout& l, Activation act, ActSource source, Rng& rng) {
  const double alpha = 0.07;
  const std::vector<T> z = away_from_kinks<T>(rng, l.numel(), 4.0);
  const std::vector<T> scale = random_values<T>(rng, l.channels, 0.5, 1.5);
  const std::vector<T> shift = random_values<T>(rng, l.channels, -0.01, 0.01);
  const std::vector<T> center = random_values<T>(rng, l.channels, -1.0, 1.0);
  const std::vector<T> g = random_values<T>(rng, l.numel(), -1.0, 1.0);
  std::vector<T> y(z.size()), a(z.size());
  for (int64_t i = 0; i < l.numel(); ++i) {
    const size_t c = static_cast<size_t>(channel_of(l, i)), k = static_cast<size_t>(i);
    // Recompute with a center: the BatchNorm form epilogue_forward computed.
    y[k] = source == ActSource::Recompute ? static_cast<T>((z[k] - center[c]) * scale[c] + shift[c]) : z[k];
    a[k] = static_cast<T>(act_ref(act, y[k], alpha));
  }
  // The argument sources the adapter pairs with each activation.
  if ((source == ActSource::Output) != sk::derivative_from_output(act)) return;
  const T* src = source == ActSource::Output ? a.data() : source == ActSource::PreActivation ? y.data() : nullptr;
  std::vector<T> dy(z.size());
  std::vector<double> sum_dy(static_cast<size_t>(l.channels)), sum_xc(static_cast<size_t>(l.channels));
  in_pieces(l.outer, [&](int64_t o0, int64_t o1) {
    sk::epilogue_backward_reduce<T>(l, g.data(), act, alpha, source, src, z.data(), scale.data(), shift.data(),
                                    center.data(), dy.data(), sum_dy.data(), sum_xc.data(), o0, o1);
  });
  std::vector<double> want_dy(static_cast<size_t>(l.channels)), want_xc(static_cast<size_t>(l.channels));
  for (int64_t i = 0; i < l.numel(); ++i) {
    const size_t c = static_cast<size_t>(channel_of(l, i)), k = static_cast<size_t>(i);
    const double want = static_cast<double>(g[k]) * act_grad_ref(act, y[k], alpha);
    CHECK(matches(dy[k], want, tol_for<T>(std::abs(want)) * 4),
          "act " << static_cast<int>(act) << " source " << static_cast<int>(source) << " i=" << i << " got " << dy[k]
                 << " want " << want);
    want_dy[c] += dy[k];
    want_xc[c] += static_cast<double>(dy[k]) * (static_cast<double>(z[k]) - center[c]);
  }
  for (size_t c = 0; c < static_cast<size_t>(l.channels); ++c) {
    CHECK(matches(sum_dy[c], want_dy[c], 1e-9 * (1 + std::abs(want_dy[c]))), "sum_dy c=" << c);
    CHECK(matches(sum_xc[c], want_xc[c], 1e-9 * (1 + std::abs(want_xc[c]))), "sum_dy_xc c=" << c);
  }
}

template <typename T> void check_batchnorm_apply(const ChannelLayout& l, bool training, Rng& rng) {
  const std::vector<T> dy = random_values<T>(rng, l.numel(), -1.0, 1.0);
  const std::vector<T> z = random_values<T>(rng, l.numel(), -2.0, 2.0);
  const std::vector<T> center = random_values<T>(rng, l.channels, -1.0, 1.0);
  const std::vector<T> k_mean = random_values<T>(rng, l.channels, -0.5, 0.5);
  const std::vector<T> k_xc = random_values<T>(rng, l.channels, -0.5, 0.5);
  const std::vector<T> k_dy = random_values<T>(rng, l.channels, 0.5, 2.0);
  std::vector<T> dz(z.size());
  std::vector<double> sum_dz(static_cast<size_t>(l.channels));
  in_pieces(l.outer, [&](int64_t o0, int64_t o1) {
    sk::batchnorm_backward_apply<T>(l, dy.data(), z.data(), center.data(), training ? k_mean.data() : nullptr,
                                    training ? k_xc.data() : nullptr, k_dy.data(), dz.data(), sum_dz.data(), o0, o1);
  });
  std::vector<double> want_sum(static_cast<size_t>(l.channels));
  for (int64_t i = 0; i < l.numel(); ++i) {
    const size_t c = static_cast<size_t>(channel_of(l, i)), k = static_cast<size_t>(i);
    const double inner = training ? static_cast<double>(dy[k]) - k_mean[c] - (static_cast<double>(z[k]) - center[c]) * k_xc[c]
                                  : static_cast<double>(dy[k]);
    const double want = inner * k_dy[c];
    CHECK(matches(dz[k], want, tol_for<T>(4.0)), "i=" << i << " got " << dz[k] << " want " << want);
    want_sum[c] += dz[k];
  }
  for (size_t c = 0; c < static_cast<size_t>(l.channels); ++c)
    CHECK(matches(sum_dz[c], want_sum[c], 1e-9 * (1 + std::abs(want_sum[c]))), "sum_dz c=" << c);
}

template <typename T> void run_all_kernels(uint64_t seed) {
  Rng rng(seed);
  for (const ChannelLayout& l : kLayouts) {
    check_moments<T>(l, rng);
    for (Activation act : all_activations()) {
      for (bool affine : {false, true})
        for (bool keep_pre : {false, true})
          for (bool centered : {false, true}) check_forward<T>(l, act, affine, keep_pre, centered, rng);
      for (ActSource source : {ActSource::Output, ActSource::PreActivation, ActSource::Recompute})
        check_backward_reduce<T>(l, act, source, rng);
    }
    for (bool training : {false, true}) check_batchnorm_apply<T>(l, training, rng);
  }
}

TEST(training_kernels_match_references_on_every_isa) {
  for (const std::string& isa : supported_isas()) {
    ScopedIsa scoped(isa);
    run_all_kernels<float>(1);
    run_all_kernels<double>(2);
  }
}

// NaN and inf pass through the forward as eager's activations pass them, and
// a NaN gradient reaches dy and the channel's sums.
TEST(training_kernels_propagate_nan_and_inf) {
  const ChannelLayout l{1, 4, 1};
  const float z[4] = {static_cast<float>(kNaN), static_cast<float>(kInf), -static_cast<float>(kInf), 1.0f};
  float out[4];
  sk::epilogue_forward<float>(l, z, nullptr, nullptr, nullptr, Activation::ReLU, 0.0, nullptr, out, 0, 1);
  CHECK(std::isnan(out[0]) && out[1] == static_cast<float>(kInf) && out[2] == 0.0f && out[3] == 1.0f, "relu nan/inf");
  const float g[4] = {static_cast<float>(kNaN), 1.0f, 1.0f, 1.0f};
  float dy[4];
  double sum[4] = {}, sum_xc[4] = {};
  const float center[4] = {0, 0, 0, 0};
  sk::epilogue_backward_reduce<float>(l, g, Activation::None, 0.0, ActSource::Output, out, z, nullptr, nullptr, center,
                                      dy, sum, sum_xc, 0, 1);
  CHECK(std::isnan(dy[0]) && std::isnan(sum[0]) && std::isnan(sum_xc[1]) == false, "nan gradient reaches its sums");
}

}  // namespace

int main() { return check::run_all(); }
