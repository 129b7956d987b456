// The check framework and the small helpers shared by the C++ unit tests of
// the torch-free kernel cores (test_kernels.cpp, test_conv_kernels.cpp).
//
// Self-contained: a tiny check framework instead of GoogleTest. Each CHECK
// counts as one check; check::run_all() runs every TEST of the executable,
// prints "N passed, M failed" last and returns a non-zero exit status when any
// check failed. Header-only: everything here is inline.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlp_forward.h"

// ---- check framework ---------------------------------------------------------

namespace check {

struct TestCase {
  const char* name;
  void (*fn)();
};

struct Counters {
  int64_t passed = 0;
  int64_t failed = 0;
};

inline std::vector<TestCase>& tests() {
  static std::vector<TestCase> all;
  return all;
}

inline Counters& counters() {
  static Counters c;
  return c;
}

inline bool add(const char* name, void (*fn)()) {
  tests().push_back({name, fn});
  return true;
}

constexpr int64_t kMaxReported = 100;  // failures printed in full; later ones are only counted

inline void record(bool ok, const char* file, int line, const char* expr, const std::string& message) {
  Counters& c = counters();
  if (ok) {
    ++c.passed;
    return;
  }
  ++c.failed;
  if (c.failed <= kMaxReported) std::printf("%s:%d: CHECK(%s) failed: %s\n", file, line, expr, message.c_str());
  if (c.failed == kMaxReported) std::printf("(further failures are counted but not printed)\n");
}

// Runs every registered test in registration order (an exception escaping a
// test counts as one failed check), restoring the detected ISA after each.
// The return value is main's exit status.
inline int run_all() {
  for (const TestCase& test : tests()) {
    const int64_t failed_before = counters().failed;
    try {
      test.fn();
    } catch (const std::exception& e) {
      record(false, __FILE__, __LINE__, test.name, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      record(false, __FILE__, __LINE__, test.name, "uncaught non-standard exception");
    }
    seqfuse::kernels::set_isa_override("");
    std::printf("%s %s\n", counters().failed == failed_before ? "[  OK  ]" : "[FAILED]", test.name);
  }
  const Counters& c = counters();
  std::printf("%lld passed, %lld failed\n", static_cast<long long>(c.passed), static_cast<long long>(c.failed));
  return c.failed == 0 ? 0 : 1;
}

}  // namespace check

// CHECK(condition, message): `message` is a stream expression (`"x=" << x`),
// evaluated only when the check fails.
#define CHECK(cond, message)                                               \
  do {                                                                     \
    const bool check_ok_ = static_cast<bool>(cond);                        \
    std::string check_msg_;                                                \
    if (!check_ok_) {                                                      \
      std::ostringstream check_os_;                                        \
      check_os_ << message;                                                \
      check_msg_ = check_os_.str();                                        \
    }                                                                      \
    ::check::record(check_ok_, __FILE__, __LINE__, #cond, check_msg_);     \
  } while (0)

// CHECK_THROWS(Exception, statement, message)
#define CHECK_THROWS(Exception, statement, message)                                     \
  do {                                                                                  \
    bool check_thrown_ = false;                                                         \
    try {                                                                               \
      statement;                                                                        \
    } catch (const Exception&) {                                                        \
      check_thrown_ = true;                                                             \
    } catch (...) {                                                                     \
    }                                                                                   \
    CHECK(check_thrown_, "expected " #Exception " from `" #statement "`: " << message); \
  } while (0)

#define TEST(name)                                                              \
  static void name();                                                           \
  [[maybe_unused]] static const bool name##_registered_ = ::check::add(#name, name); \
  static void name()

// ---- shared helpers ------------------------------------------------------------

namespace sk = seqfuse::kernels;

namespace test_util {

using sk::Activation;
using sk::bf16;
using sk::DType;

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
inline constexpr double kInf = std::numeric_limits<double>::infinity();

// Per storage type: the spec dtype code and the forward's error budget.
//   arithmetic_rtol  rounding of the accumulate-type arithmetic, relative to the
//                    size of the terms summed (see the references' magnitudes)
//   storage_rtol     rounding of the result to the storage type, relative to it
//   input_rtol       rounding of the GEMMs' inputs to the storage type (bfloat16
//                    runs multiply bfloat16 by bfloat16, as eager does), relative
//                    to the size of the terms summed: half an ulp per term, through
//                    every stage of a run
template <typename T> struct TypeInfo;
template <> struct TypeInfo<float> {
  static constexpr DType dtype = DType::Float32;
  static constexpr const char* name = "float32";
  static constexpr double arithmetic_rtol = 1e-5;
  static constexpr double storage_rtol = 0.0;
  static constexpr double input_rtol = 0.0;
};
template <> struct TypeInfo<double> {
  static constexpr DType dtype = DType::Float64;
  static constexpr const char* name = "float64";
  static constexpr double arithmetic_rtol = 1e-12;
  static constexpr double storage_rtol = 0.0;
  static constexpr double input_rtol = 0.0;
};
template <> struct TypeInfo<bf16> {
  static constexpr DType dtype = DType::BFloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr double arithmetic_rtol = 1e-5;  // activations are carried in float
  static constexpr double storage_rtol = 1.0 / 256;  // rounded once, to nearest: half an ulp of 8 bits
  static constexpr double input_rtol = 1.0 / 128;
};

inline double to_double(float v) { return v; }
inline double to_double(double v) { return v; }
inline double to_double(bf16 v) { return sk::bf16_to_float(v); }

template <typename T> inline T from_double(double v) { return static_cast<T>(v); }
template <> inline bf16 from_double<bf16>(double v) { return sk::float_to_bf16(static_cast<float>(v)); }

template <typename T> inline bool same_bits(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

// NaN must meet NaN, an infinity the same infinity, a finite value be within tol.
inline bool matches(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::abs(got - want) <= tol;
}

// Output buffers are prefilled with this value where a test checks that
// nothing outside the output range changes.
template <typename T> inline T sentinel() { return from_double<T>(-12345.0); }

// Outputs outside their tolerance: how many, and a description of the first.
struct Mismatches {
  int64_t count = 0;
  std::string first;
};

struct Rng {
  explicit Rng(uint64_t seed) : gen(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }
  std::mt19937_64 gen;
};

// n values uniform in [lo, hi), rounded to T.
template <typename T> inline std::vector<T> random_values(Rng& rng, int64_t n, double lo, double hi) {
  std::vector<T> v(static_cast<size_t>(n));
  for (T& e : v) e = from_double<T>(rng.uniform(lo, hi));
  return v;
}

template <typename T> inline const T* data_or_null(const std::vector<T>& v) { return v.empty() ? nullptr : v.data(); }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A 64-byte aligned byte buffer, filled with 0xff (NaN in every float type) so
// that reading a byte packing did not write shows up in the results.
struct AlignedBytes {
  explicit AlignedBytes(int64_t n) : size(n) {
    const size_t bytes = static_cast<size_t>(sk::round_up(std::max<int64_t>(n, 1), sk::kSectionAlign));
    data.reset(static_cast<uint8_t*>(std::aligned_alloc(static_cast<size_t>(sk::kSectionAlign), bytes)));
    if (!data) throw std::bad_alloc();
    std::memset(data.get(), 0xff, bytes);
  }
  int64_t size;
  std::unique_ptr<uint8_t, FreeDeleter> data;
};

// ---- ISA variants ----------------------------------------------------------------

inline std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (sk::Isa isa : {sk::Isa::Baseline, sk::Isa::Avx2, sk::Isa::Avx512, sk::Isa::Avx512Bf16})
    if (static_cast<int>(isa) <= static_cast<int>(sk::detect_isa())) names.emplace_back(sk::isa_name(isa));
  return names;
}

// Forces one kernel variant for its lifetime, then restores the detected one.
struct ScopedIsa {
  explicit ScopedIsa(const std::string& name) { sk::set_isa_override(name); }
  ~ScopedIsa() { sk::set_isa_override(""); }
  ScopedIsa(const ScopedIsa&) = delete;
  ScopedIsa& operator=(const ScopedIsa&) = delete;
};

// ---- activations -------------------------------------------------------------------

inline const char* activation_name(Activation a) {
  switch (a) {
#define SEQFUSE_TEST_ACTIVATION_NAME(name, ...) \
  case Activation::name: return #name;
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_TEST_ACTIVATION_NAME)
#undef SEQFUSE_TEST_ACTIVATION_NAME
  }
  return "?";
}

inline std::vector<Activation> all_activations() {
  std::vector<Activation> all;
  for (int64_t a = 0; a < sk::kNumActivations; ++a) all.push_back(static_cast<Activation>(a));
  return all;
}

// The double-precision reference of every activation.
// `float_kernel`: kept for kernels whose float and float64 limits differ (none
// since torch 2.14, whose float GELU gives inf at +inf as float64 does).
inline double activation_reference(Activation act, double x, double alpha, bool float_kernel) {
  constexpr double kPi = 3.14159265358979323846;
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return std::isnan(x) ? x : std::max(x, 0.0);
    case Activation::LeakyReLU: return std::isnan(x) || x >= 0.0 ? x : alpha * x;
    case Activation::ReLU6: return std::isnan(x) ? x : std::clamp(x, 0.0, 6.0);
    case Activation::Sigmoid: return 1.0 / (1.0 + std::exp(-x));
    case Activation::Tanh: return std::tanh(x);
    case Activation::GeluErf:
      (void)float_kernel;  // eager's float and float64 GELU agree at the limits since torch 2.14
      if (std::isinf(x)) return x > 0 ? x : kNaN;  // inf at +inf; -inf * 0 = NaN at -inf
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::GeluTanh: return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / kPi) * (x + 0.044715 * x * x * x)));
    case Activation::SiLU: return x / (1.0 + std::exp(-x));
    case Activation::Hardswish: return std::isnan(x) ? x : x * std::clamp(x + 3.0, 0.0, 6.0) / 6.0;
    case Activation::Hardsigmoid: return std::isnan(x) ? x : std::clamp(x + 3.0, 0.0, 6.0) / 6.0;
    case Activation::Mish: return x * std::tanh(std::log1p(std::exp(x)));  // NaN at -inf, as eager
  }
  return kNaN;
}

// No activation grows a difference of its input by more than this (Hardswish: 1.5).
inline constexpr double kActivationGain = 1.5;

}  // namespace test_util
