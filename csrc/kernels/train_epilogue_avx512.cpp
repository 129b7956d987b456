// The training epilogue kernels compiled for AVX-512.
// Standard headers come first so that only our own code is built for the target.
#include <type_traits>

#include "train_epilogue.h"
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#define SEQFUSE_ISA_ENABLED 1
#endif

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::avx512::train {
#define SEQFUSE_VECTOR_BYTES 64
#define SEQFUSE_ACC_REGISTERS 24
#include "train_epilogue_impl.h"
}  // namespace seqfuse::kernels::avx512::train
#endif
