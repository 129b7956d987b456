// The training epilogue kernels compiled for AVX-512 with the bfloat16 dot product (24 accumulator registers; see isa_variant.h).
#include <type_traits>
#include "train_epilogue.h"
#define SEQFUSE_VARIANT(X) X(avx512bf16, train, train_epilogue_impl.h, 24)
#include "isa_variant.h"
