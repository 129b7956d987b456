// The fused conv stages compiled for AVX2 + FMA (12 accumulator registers; see isa_variant.h).
#include "conv_forward.h"
#define SEQFUSE_VARIANT(X) X(avx2, conv, conv_forward_impl.h, 12)
#include "isa_variant.h"
