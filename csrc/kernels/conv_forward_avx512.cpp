// The fused conv stages compiled for AVX-512 (24 accumulator registers; see isa_variant.h).
#include "conv_forward.h"
#define SEQFUSE_VARIANT(X) X(avx512, conv, conv_forward_impl.h, 24)
#include "isa_variant.h"
