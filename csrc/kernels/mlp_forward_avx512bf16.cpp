// The fused MLP forward compiled for AVX-512 with the bfloat16 dot product (16 accumulator registers; see isa_variant.h).
#include "mlp_forward.h"
#define SEQFUSE_VARIANT(X) X(avx512bf16, mlp, mlp_forward_impl.h, 16)
#include "isa_variant.h"
