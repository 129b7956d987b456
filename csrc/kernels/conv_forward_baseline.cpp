// The fused conv stages compiled for the x86-64 baseline, SSE2 (16 xmm registers), or any other CPU.
// Standard headers come first so that only our own code is built for the target.
// The conv stages get a namespace of their own: the shared GEMM templates
// (kernel_impl.h) are instantiated here under a different register budget
// than in the MLP translation unit, and must not be merged with those.
#include "conv_forward.h"
#include "isa_prelude.h"

#define SEQFUSE_ISA_ENABLED 1

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::baseline::conv {
#define SEQFUSE_VECTOR_BYTES 16
#define SEQFUSE_ACC_REGISTERS 12
#include "conv_forward_impl.h"
}  // namespace seqfuse::kernels::baseline::conv
#endif
