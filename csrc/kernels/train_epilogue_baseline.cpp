// The training epilogue kernels compiled for the x86-64 baseline (SSE2) or any other CPU (12 accumulator registers; see isa_variant.h).
#include <type_traits>
#include "train_epilogue.h"
#define SEQFUSE_VARIANT(X) X(baseline, train, train_epilogue_impl.h, 12)
#include "isa_variant.h"
