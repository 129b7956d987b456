// The training epilogue kernels compiled for the x86-64 baseline (SSE2) or any other CPU.
// Standard headers come first so that only our own code is built for the target.
#include <type_traits>

#include "train_epilogue.h"
#include "isa_prelude.h"

#define SEQFUSE_ISA_ENABLED 1

#ifdef SEQFUSE_ISA_ENABLED
namespace seqfuse::kernels::baseline::train {
#define SEQFUSE_VECTOR_BYTES 16
#define SEQFUSE_ACC_REGISTERS 12
#include "train_epilogue_impl.h"
}  // namespace seqfuse::kernels::baseline::train
#endif
