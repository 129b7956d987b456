// The training epilogue kernels compiled for AVX2 + FMA.
// Standard headers come first so that only our own code is built for the target.
#include <type_traits>

#include "train_epilogue.h"
#include "isa_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,bmi2")
#define SEQFUSE_ISA_ENABLED 1
#endif

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::avx2::train {
#define SEQFUSE_VECTOR_BYTES 32
#define SEQFUSE_ACC_REGISTERS 12
#include "train_epilogue_impl.h"
}  // namespace seqfuse::kernels::avx2::train
#endif
