// The fused MLP forward compiled for the x86-64 baseline, SSE2 (16 xmm registers), or any other CPU.
// Standard headers come first so that only our own code is built for the target.
#include "mlp_forward.h"
#include "isa_prelude.h"

#define SEQFUSE_ISA_ENABLED 1

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::baseline {
#define SEQFUSE_VECTOR_BYTES 16
#define SEQFUSE_ACC_REGISTERS 12
#include "mlp_forward_impl.h"
}  // namespace seqfuse::kernels::baseline
#endif
