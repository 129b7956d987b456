// The body of every per-ISA translation unit <family>_<isa>.cpp. Such a unit
// includes its family's header, then defines
//   SEQFUSE_VARIANT(X) as X(isa, family, impl_header, accumulator_registers)
// (isa: avx512bf16, avx512, avx2 or baseline; family: the namespace <isa>::<family> of
// the entry points its dispatch calls, see isa.h; impl_header: the family's
// arithmetic, unquoted; accumulator_registers: how many vector registers the
// family's GEMM tiles may keep accumulators in) and includes this file. Only
// what is included below is compiled for the ISA: standard headers come
// first (isa_prelude.h), so that they are compiled for the baseline.
#include "isa_prelude.h"

#define SEQFUSE_STR_(x) #x
#define SEQFUSE_STR(x) SEQFUSE_STR_(x)
#define SEQFUSE_CAT_(a, b) a##b
#define SEQFUSE_CAT(a, b) SEQFUSE_CAT_(a, b)
#define SEQFUSE_VARIANT_ISA(isa, family, impl, regs) isa
#define SEQFUSE_VARIANT_NAMESPACE(isa, family, impl, regs) isa::family
#define SEQFUSE_VARIANT_IMPL(isa, family, impl, regs) SEQFUSE_STR(impl)
#define SEQFUSE_VARIANT_REGISTERS(isa, family, impl, regs) regs

// Vector width in bytes of each ISA.
#define SEQFUSE_VECTOR_BYTES_avx512 64
#define SEQFUSE_VECTOR_BYTES_avx512bf16 64
#define SEQFUSE_VECTOR_BYTES_avx2 32
#define SEQFUSE_VECTOR_BYTES_baseline 16
#define SEQFUSE_VECTOR_BYTES SEQFUSE_CAT(SEQFUSE_VECTOR_BYTES_, SEQFUSE_VARIANT(SEQFUSE_VARIANT_ISA))
// Whether the ISA multiplies bfloat16 pairs (vdpbf16ps): 1 for avx512bf16 only.
#define SEQFUSE_DPBF16_avx512bf16 1
#define SEQFUSE_DPBF16_avx512 0
#define SEQFUSE_DPBF16_avx2 0
#define SEQFUSE_DPBF16_baseline 0
#define SEQFUSE_DPBF16 SEQFUSE_CAT(SEQFUSE_DPBF16_, SEQFUSE_VARIANT(SEQFUSE_VARIANT_ISA))
#define SEQFUSE_ACC_REGISTERS SEQFUSE_VARIANT(SEQFUSE_VARIANT_REGISTERS)

#if SEQFUSE_VECTOR_BYTES == 16
#define SEQFUSE_ISA_ENABLED 1  // SSE2 on x86-64, or any other CPU
#elif defined(__x86_64__) || defined(_M_X64)
#define SEQFUSE_ISA_ENABLED 1
#if SEQFUSE_DPBF16
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi2")
#elif SEQFUSE_VECTOR_BYTES == 64
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#else
#pragma GCC target("avx2,fma,bmi2")
#endif
#endif

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::SEQFUSE_VARIANT(SEQFUSE_VARIANT_NAMESPACE) {
#include SEQFUSE_VARIANT(SEQFUSE_VARIANT_IMPL)
}  // namespace seqfuse::kernels::<isa>::<family>
#endif
