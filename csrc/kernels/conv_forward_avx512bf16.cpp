// The fused conv stages compiled for AVX-512 with the bfloat16 dot product (24 accumulator registers; see isa_variant.h).
#include "conv_forward.h"
#define SEQFUSE_VARIANT(X) X(avx512bf16, conv, conv_forward_impl.h, 24)
#include "isa_variant.h"
