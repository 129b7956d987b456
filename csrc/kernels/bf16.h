// bfloat16 storage type for the torch-free kernel cores.
//
// Bit-compatible with c10::BFloat16 (a raw uint16_t holding the upper half of
// an IEEE float), so adapters can reinterpret tensor data pointers. Arithmetic
// always happens in float: the kernels widen on load and round on store.
#pragma once

#include <cstdint>
#include <cstring>

namespace seqfuse::kernels {

struct bf16 {
  uint16_t bits;
};

// The type arithmetic is carried out in for a storage type.
template <typename T> struct AccumulateType { using type = T; };
template <> struct AccumulateType<bf16> { using type = float; };
template <typename T> using acc_t = typename AccumulateType<T>::type;

// Conversions have internal linkage: each ISA translation unit compiles its own
// copy, so the linker can never hand baseline code an AVX-512 build of them.
namespace {

inline float bf16_to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept quiet: the same rounding as c10::BFloat16.
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <typename To, typename From> inline To convert(From v) { return static_cast<To>(v); }
template <> inline float convert<float, bf16>(bf16 v) { return bf16_to_float(v); }
template <> inline bf16 convert<bf16, float>(float v) { return float_to_bf16(v); }

}  // namespace

}  // namespace seqfuse::kernels
