// The 16-bit float storage types of the torch-free kernel cores: bfloat16
// (every CPU kernel) and float16 (packing only: CUDA runs it).
//
// Bit-compatible with c10::BFloat16 / c10::Half (a raw uint16_t), so adapters
// can reinterpret tensor data pointers. Arithmetic always happens in float:
// the kernels widen on load and round on store.
#pragma once

#include <cstdint>
#include <cstring>

namespace seqfuse::kernels {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// The type arithmetic is carried out in for a storage type.
template <typename T> struct AccumulateType { using type = T; };
template <> struct AccumulateType<bf16> { using type = float; };
template <> struct AccumulateType<fp16> { using type = float; };
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

// IEEE binary16 <-> float, round-to-nearest-even (subnormals, inf and NaN as c10::Half).
inline float fp16_to_float(fp16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline fp16 float_to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16{static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};
  if (abs >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504: inf
  if (abs < 0x38800000u) {  // below the smallest normal: round into a subnormal (or zero)
    if (abs < 0x33000000u) return fp16{sign};
    const uint32_t shift = 126 - (abs >> 23), mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t h = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return fp16{static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return fp16{static_cast<uint16_t>(sign | h)};
}

template <typename To, typename From> inline To convert(From v) { return static_cast<To>(v); }
template <> inline float convert<float, bf16>(bf16 v) { return bf16_to_float(v); }
template <> inline bf16 convert<bf16, float>(float v) { return float_to_bf16(v); }
template <> inline float convert<float, fp16>(fp16 v) { return fp16_to_float(v); }
template <> inline fp16 convert<fp16, float>(float v) { return float_to_fp16(v); }

}  // namespace

}  // namespace seqfuse::kernels
