// The fused MLP forward compiled for the x86-64 baseline (SSE2) or any other CPU (12 accumulator registers; see isa_variant.h).
#include "mlp_forward.h"
#define SEQFUSE_VARIANT(X) X(baseline, mlp, mlp_forward_impl.h, 12)
#include "isa_variant.h"
