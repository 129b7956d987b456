// What every per-ISA translation unit includes before its target pragma, so
// that only seqfuse's own code (kernel_impl.h and the *_impl.h files it is
// included with, inside an ISA namespace) is compiled for the target. The
// vector types themselves are per ISA: see NativeVec in kernel_impl.h.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // masked partial loads/stores (kernel_impl.h)
#endif

#include "bf16.h"
#include "mlp_spec.h"
