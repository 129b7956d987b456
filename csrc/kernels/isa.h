// The CPU kernel variants (ISAs): detection, the process-wide choice, and the
// one way every kernel family (MLP, conv, training epilogue) calls its
// variant. Each family's arithmetic is compiled once per ISA by a translation
// unit <family>_<isa>.cpp that opens the namespace <isa>::<family> (its
// target and register budget from isa_<isa>.h); the family's dispatch file
// declares those entry points with SEQFUSE_FOR_EACH_ISA and calls them with
// SEQFUSE_ISA_DISPATCH. Each family has a namespace of its own per ISA: the
// shared GEMM templates (kernel_impl.h) are instantiated by each family under
// its own register budget, and must not be merged with another's.
#pragma once

#include <string>

namespace seqfuse::kernels {

// Ordered: each level runs everything the ones before it do. Avx512Bf16 is
// Avx512 plus the bfloat16 dot product (vdpbf16ps), which the GEMMs of
// bfloat16 conv runs multiply with (kernel_impl.h).
enum class Isa { Baseline = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };
const char* isa_name(Isa isa);
Isa detect_isa();  // the best the CPU supports
Isa active_isa();  // detect_isa(), unless overridden (SEQFUSE_CPU_CAPABILITY, set_isa_override)
// Overrides the variant used from now on ("avx512_bf16", "avx512", "avx2", "baseline", or "" for
// the detected one). Throws std::invalid_argument for an unknown name or one the
// CPU does not support. Used by tests to force each variant.
void set_isa_override(const std::string& name);

}  // namespace seqfuse::kernels

// X(<isa>::family) for every variant this build has: x86-64 builds have all
// four, other CPUs the baseline only.
#if defined(__x86_64__) || defined(_M_X64)
#define SEQFUSE_HAVE_X86_VARIANTS 1
#define SEQFUSE_FOR_EACH_ISA(X, family) \
  X(baseline::family) X(avx2::family) X(avx512::family) X(avx512bf16::family)
#else
#define SEQFUSE_FOR_EACH_ISA(X, family) X(baseline::family)
#endif

// Runs the statement(s) with `isa` naming the active ISA's namespace of
// `family`, e.g. SEQFUSE_ISA_DISPATCH(conv, return isa::conv_stage_f32(...);).
#ifdef SEQFUSE_HAVE_X86_VARIANTS
#define SEQFUSE_ISA_DISPATCH(family, ...)         \
  switch (::seqfuse::kernels::active_isa()) {     \
    case ::seqfuse::kernels::Isa::Avx512Bf16: {   \
      namespace isa = avx512bf16::family;         \
      __VA_ARGS__                                 \
    } break;                                      \
    case ::seqfuse::kernels::Isa::Avx512: {       \
      namespace isa = avx512::family;             \
      __VA_ARGS__                                 \
    } break;                                      \
    case ::seqfuse::kernels::Isa::Avx2: {         \
      namespace isa = avx2::family;               \
      __VA_ARGS__                                 \
    } break;                                      \
    default: {                                    \
      namespace isa = baseline::family;           \
      __VA_ARGS__                                 \
    } break;                                      \
  }
#else
#define SEQFUSE_ISA_DISPATCH(family, ...) \
  {                                       \
    namespace isa = baseline::family;     \
    __VA_ARGS__                           \
  }
#endif
