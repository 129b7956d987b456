// The fused conv stages compiled for AVX2 + FMA (16 ymm registers; 12 for accumulators).
// Standard headers come first so that only our own code is built for the target.
// The conv stages get a namespace of their own: the shared GEMM templates
// (kernel_impl.h) are instantiated here under a different register budget
// than in the MLP translation unit, and must not be merged with those.
#include "conv_forward.h"
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,bmi2")
#define SEQFUSE_ISA_ENABLED 1
#endif

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::avx2::conv {
#define SEQFUSE_VECTOR_BYTES 32
#define SEQFUSE_ACC_REGISTERS 12
#include "conv_forward_impl.h"
}  // namespace seqfuse::kernels::avx2::conv
#endif
