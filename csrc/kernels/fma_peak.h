// Torch-free measurement of this CPU's float32 multiply-add peak: the ceiling
// against which the benchmark harness (python -m seqfuse.bench) reports every
// peer's achieved GFLOP/s, measured in the same run as the numbers it judges
// (a shared or throttled machine lowers both alike).
//
// Each thread runs enough independent FMA chains on the widest vectors of the
// ISA to cover the FMA latency on every FMA port, so the loop is bound by FMA
// throughput alone: no loads, no stores, no data beyond registers.
#pragma once

#include "isa.h"

namespace seqfuse::kernels {

// Float32 GFLOP/s (two flops per lane per multiply-add) of `threads` threads
// (at least 1) each running the FMA loop concurrently for about `seconds`
// (after a short warm-up), summed over the threads. `isa` picks the vector
// width; one this CPU does not support is lowered to detect_isa(). The
// baseline variant (SSE2 on x86-64: no FMA instruction) times a multiply and
// an add per multiply-add.
//
// Product::Bf16Dot measures the bfloat16 products instead (vdpbf16ps: two
// multiply-adds per lane per instruction) where `isa` is Avx512Bf16; on any
// other ISA a bfloat16 GEMM widens to float, and the float32 loop runs.
enum class Product { Float32Fma, Bf16Dot };
double fma_peak_gflops(int threads, double seconds = 0.2, Isa isa = detect_isa(),
                       Product product = Product::Float32Fma);

}  // namespace seqfuse::kernels
