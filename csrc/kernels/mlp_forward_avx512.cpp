// The fused MLP forward compiled for AVX-512 (32 zmm registers; 16 for accumulators).
// Standard headers come first so that only our own code is built for the target.
#include "mlp_forward.h"
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#define SEQFUSE_ISA_ENABLED 1
#endif

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::avx512 {
#define SEQFUSE_VECTOR_BYTES 64
#define SEQFUSE_ACC_REGISTERS 16
#include "mlp_forward_impl.h"
}  // namespace seqfuse::kernels::avx512
#endif
