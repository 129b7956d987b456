// The fused conv stages compiled for the x86-64 baseline (SSE2) or any other CPU (12 accumulator registers; see isa_variant.h).
#include "conv_forward.h"
#define SEQFUSE_VARIANT(X) X(baseline, conv, conv_forward_impl.h, 12)
#include "isa_variant.h"
