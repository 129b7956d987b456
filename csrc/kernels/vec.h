// Fixed-width SIMD vectors written once with GCC/Clang vector extensions.
//
// A Vec<A> always holds kPanelWidth (16) lanes. Each ISA translation unit
// compiles the same code under its own target attributes, and the compiler
// maps one Vec onto one zmm (AVX-512, float), two ymm (AVX2) or four xmm
// (baseline SSE2). This keeps a single source for every ISA and dtype.
//
// Only types live here. Functions over them are defined in
// mlp_forward_impl.h, inside each ISA's namespace, so that no inline function
// compiled for AVX-512 can be merged by the linker into baseline code.
#pragma once

#include <cstdint>
#include <utility>

#include "bf16.h"
#include "mlp_spec.h"

namespace seqfuse::kernels {

template <typename A> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(kPanelWidth * sizeof(float))));
  typedef int32_t mask __attribute__((vector_size(kPanelWidth * sizeof(float))));
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(kPanelWidth * sizeof(double))));
  typedef int64_t mask __attribute__((vector_size(kPanelWidth * sizeof(double))));
};
template <typename A> using Vec = typename VecOf<A>::type;

typedef uint16_t U16x16 __attribute__((vector_size(kPanelWidth * sizeof(uint16_t))));
typedef uint32_t U32x16 __attribute__((vector_size(kPanelWidth * sizeof(uint32_t))));

}  // namespace seqfuse::kernels
