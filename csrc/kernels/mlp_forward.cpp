// ISA selection and row tiling for the fused MLP forward. The arithmetic lives
// in mlp_forward_impl.h, compiled once per ISA by mlp_forward_<isa>.cpp.
#include "mlp_forward.h"
#include "workspace.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <stdexcept>

namespace seqfuse::kernels {

#define SEQFUSE_DECLARE_ISA(ns)                                                                                  \
  namespace ns {                                                                                                 \
  int micro_tile_rows_f32();                                                                                     \
  void mlp_forward_tile_f32(const MlpDesc&, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t,    \
                            float*);                                                                             \
  void mlp_forward_tile_f64(const MlpDesc&, const uint8_t*, const double*, int64_t, double*, int64_t, int64_t,  \
                            double*);                                                                            \
  void mlp_forward_tile_bf16(const MlpDesc&, const uint8_t*, const bf16*, int64_t, bf16*, int64_t, int64_t,     \
                             float*);                                                                            \
  void mlp_epilogue_f32(const MlpDesc&, size_t, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t); \
  void mlp_epilogue_f64(const MlpDesc&, size_t, const uint8_t*, const double*, int64_t, double*, int64_t,        \
                        int64_t);                                                                                \
  void mlp_epilogue_bf16(const MlpDesc&, size_t, const uint8_t*, const bf16*, int64_t, bf16*, int64_t, int64_t); \
  }
SEQFUSE_DECLARE_ISA(baseline)
#if defined(__x86_64__) || defined(_M_X64)
#define SEQFUSE_HAVE_X86_VARIANTS 1
SEQFUSE_DECLARE_ISA(avx2)
SEQFUSE_DECLARE_ISA(avx512)
#endif
#undef SEQFUSE_DECLARE_ISA

namespace {

struct IsaKernels {
  int (*micro_tile_rows)();
  void (*f32)(const MlpDesc&, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t, float*);
  void (*f64)(const MlpDesc&, const uint8_t*, const double*, int64_t, double*, int64_t, int64_t, double*);
  void (*bf16)(const MlpDesc&, const uint8_t*, const struct bf16*, int64_t, struct bf16*, int64_t, int64_t, float*);
  void (*epilogue_f32)(const MlpDesc&, size_t, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t);
  void (*epilogue_f64)(const MlpDesc&, size_t, const uint8_t*, const double*, int64_t, double*, int64_t, int64_t);
  void (*epilogue_bf16)(const MlpDesc&, size_t, const uint8_t*, const struct bf16*, int64_t, struct bf16*, int64_t,
                        int64_t);
};

const IsaKernels& kernels_for(Isa isa) {
  static const IsaKernels base{baseline::micro_tile_rows_f32, baseline::mlp_forward_tile_f32,
                               baseline::mlp_forward_tile_f64,  baseline::mlp_forward_tile_bf16,
                               baseline::mlp_epilogue_f32,      baseline::mlp_epilogue_f64,
                               baseline::mlp_epilogue_bf16};
#ifdef SEQFUSE_HAVE_X86_VARIANTS
  static const IsaKernels v2{avx2::micro_tile_rows_f32, avx2::mlp_forward_tile_f32, avx2::mlp_forward_tile_f64,
                             avx2::mlp_forward_tile_bf16,  avx2::mlp_epilogue_f32,     avx2::mlp_epilogue_f64,
                             avx2::mlp_epilogue_bf16};
  static const IsaKernels v512{avx512::micro_tile_rows_f32, avx512::mlp_forward_tile_f32,
                               avx512::mlp_forward_tile_f64,  avx512::mlp_forward_tile_bf16,
                               avx512::mlp_epilogue_f32,      avx512::mlp_epilogue_f64,
                               avx512::mlp_epilogue_bf16};
  if (isa == Isa::Avx512) return v512;
  if (isa == Isa::Avx2) return v2;
#endif
  (void)isa;
  return base;
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::Avx512;
  if (name == "avx2") return Isa::Avx2;
  if (name == "baseline") return Isa::Baseline;
  throw std::invalid_argument("seqfuse: unknown CPU capability '" + name +
                              "' (expected 'avx512', 'avx2', 'baseline' or '')");
}

// Environment override, read once: SEQFUSE_CPU_CAPABILITY=avx2 etc.
Isa initial_isa() {
  const char* env = std::getenv("SEQFUSE_CPU_CAPABILITY");
  if (env && *env) {
    Isa want = parse_isa(env);
    if (static_cast<int>(want) <= static_cast<int>(detect_isa())) return want;
  }
  return detect_isa();
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state{static_cast<int>(initial_isa())};
  return state;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Baseline: return "baseline";
  }
  return "baseline";
}

Isa detect_isa() {
#if defined(SEQFUSE_HAVE_X86_VARIANTS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Baseline;
}

Isa active_isa() { return static_cast<Isa>(isa_state().load(std::memory_order_relaxed)); }

void set_isa_override(const std::string& name) {
  Isa want = name.empty() ? detect_isa() : parse_isa(name);
  if (static_cast<int>(want) > static_cast<int>(detect_isa()))
    throw std::invalid_argument(std::string("seqfuse: this CPU does not support '") + name + "'");
  isa_state().store(static_cast<int>(want), std::memory_order_relaxed);
}

int64_t mlp_tile_rows(const MlpDesc& desc) {
  // Two activation buffers of tile_rows x max_width floats within ~256 KiB.
  const int64_t micro = kernels_for(active_isa()).micro_tile_rows();
  int64_t rows = (32 * 1024) / std::max<int64_t>(desc.max_width, 1);
  rows = std::clamp<int64_t>(rows, 16, 256);
  return std::max<int64_t>(rows / micro * micro, micro);
}

template <typename T>
void mlp_forward_rows(const MlpDesc& desc, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                      int64_t rows) {
  using A = acc_t<T>;
  const IsaKernels& k = kernels_for(active_isa());
  const int64_t tile = mlp_tile_rows(desc);
  A* ws = thread_workspace<A>(static_cast<size_t>(2 * std::min(tile, rows) * desc.max_width));
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t n = std::min(tile, rows - r0);
    if constexpr (std::is_same_v<T, float>)
      k.f32(desc, packed, x + r0 * ld_x, ld_x, y + r0 * ld_y, ld_y, n, ws);
    else if constexpr (std::is_same_v<T, double>)
      k.f64(desc, packed, x + r0 * ld_x, ld_x, y + r0 * ld_y, ld_y, n, ws);
    else
      k.bf16(desc, packed, x + r0 * ld_x, ld_x, y + r0 * ld_y, ld_y, n, ws);
  }
}

template <typename T>
void mlp_stage_epilogue(const MlpDesc& desc, size_t stage, const uint8_t* packed, const T* in, int64_t ld_in, T* out,
                        int64_t ld_out, int64_t rows) {
  const IsaKernels& k = kernels_for(active_isa());
  if constexpr (std::is_same_v<T, float>)
    k.epilogue_f32(desc, stage, packed, in, ld_in, out, ld_out, rows);
  else if constexpr (std::is_same_v<T, double>)
    k.epilogue_f64(desc, stage, packed, in, ld_in, out, ld_out, rows);
  else
    k.epilogue_bf16(desc, stage, packed, in, ld_in, out, ld_out, rows);
}

template void mlp_stage_epilogue<float>(const MlpDesc&, size_t, const uint8_t*, const float*, int64_t, float*,
                                        int64_t, int64_t);
template void mlp_stage_epilogue<double>(const MlpDesc&, size_t, const uint8_t*, const double*, int64_t, double*,
                                         int64_t, int64_t);
template void mlp_stage_epilogue<bf16>(const MlpDesc&, size_t, const uint8_t*, const bf16*, int64_t, bf16*, int64_t,
                                       int64_t);

template void mlp_forward_rows<float>(const MlpDesc&, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t);
template void mlp_forward_rows<double>(const MlpDesc&, const uint8_t*, const double*, int64_t, double*, int64_t,
                                       int64_t);
template void mlp_forward_rows<bf16>(const MlpDesc&, const uint8_t*, const bf16*, int64_t, bf16*, int64_t, int64_t);

}  // namespace seqfuse::kernels
