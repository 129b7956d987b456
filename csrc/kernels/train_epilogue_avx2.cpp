// The training epilogue kernels compiled for AVX2 + FMA (12 accumulator registers; see isa_variant.h).
#include <type_traits>
#include "train_epilogue.h"
#define SEQFUSE_VARIANT(X) X(avx2, train, train_epilogue_impl.h, 12)
#include "isa_variant.h"
