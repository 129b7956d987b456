// CPU variant detection and the process-wide choice (isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace seqfuse::kernels {
namespace {

Isa parse_isa(const std::string& name) {
  if (name == "avx512_bf16") return Isa::Avx512Bf16;
  if (name == "avx512") return Isa::Avx512;
  if (name == "avx2") return Isa::Avx2;
  if (name == "baseline") return Isa::Baseline;
  throw std::invalid_argument("seqfuse: unknown CPU capability '" + name +
                              "' (expected 'avx512_bf16', 'avx512', 'avx2', 'baseline' or '')");
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
    case Isa::Avx512Bf16: return "avx512_bf16";
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
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512;
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

}  // namespace seqfuse::kernels
