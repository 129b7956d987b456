// The fused MLP forward compiled for AVX2 + FMA (12 accumulator registers; see isa_variant.h).
#include "mlp_forward.h"
#define SEQFUSE_VARIANT(X) X(avx2, mlp, mlp_forward_impl.h, 12)
#include "isa_variant.h"
