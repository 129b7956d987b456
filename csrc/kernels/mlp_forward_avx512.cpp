// The fused MLP forward compiled for AVX-512 (16 accumulator registers; see isa_variant.h).
#include "mlp_forward.h"
#define SEQFUSE_VARIANT(X) X(avx512, mlp, mlp_forward_impl.h, 16)
#include "isa_variant.h"
