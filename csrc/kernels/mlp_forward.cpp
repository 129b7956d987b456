// ISA dispatch and row tiling for the fused MLP forward. The arithmetic lives
// in mlp_forward_impl.h, compiled once per ISA by mlp_forward_<isa>.cpp.
#include "mlp_forward.h"
#include "workspace.h"

#include <algorithm>
#include <type_traits>

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
SEQFUSE_FOR_EACH_ISA(SEQFUSE_DECLARE_ISA, mlp)
#undef SEQFUSE_DECLARE_ISA

namespace {

// The tile kernel and the epilogue of the active ISA for storage type T.
template <typename T>
void forward_tile(const MlpDesc& d, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y, int64_t n,
                  acc_t<T>* ws) {
  SEQFUSE_ISA_DISPATCH(mlp, {
    if constexpr (std::is_same_v<T, float>) return isa::mlp_forward_tile_f32(d, packed, x, ld_x, y, ld_y, n, ws);
    else if constexpr (std::is_same_v<T, double>) return isa::mlp_forward_tile_f64(d, packed, x, ld_x, y, ld_y, n, ws);
    else return isa::mlp_forward_tile_bf16(d, packed, x, ld_x, y, ld_y, n, ws);
  })
}

int micro_tile_rows() { SEQFUSE_ISA_DISPATCH(mlp, return isa::micro_tile_rows_f32();) }

}  // namespace

int64_t mlp_tile_rows(const MlpDesc& desc) {
  // Two activation buffers of tile_rows x max_width floats within ~256 KiB.
  const int64_t micro = micro_tile_rows();
  int64_t rows = (32 * 1024) / std::max<int64_t>(desc.max_width, 1);
  rows = std::clamp<int64_t>(rows, 16, 256);
  return std::max<int64_t>(rows / micro * micro, micro);
}

template <typename T>
void mlp_forward_rows(const MlpDesc& desc, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t ld_y,
                      int64_t rows) {
  using A = acc_t<T>;
  const int64_t tile = mlp_tile_rows(desc);
  A* ws = thread_workspace<A>(static_cast<size_t>(mlp_workspace_elems(desc, std::min(tile, rows))));
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t n = std::min(tile, rows - r0);
    forward_tile<T>(desc, packed, x + r0 * ld_x, ld_x, y + r0 * ld_y, ld_y, n, ws);
  }
}

template <typename T>
void mlp_stage_epilogue(const MlpDesc& desc, size_t stage, const uint8_t* packed, const T* in, int64_t ld_in, T* out,
                        int64_t ld_out, int64_t rows) {
  SEQFUSE_ISA_DISPATCH(mlp, {
    if constexpr (std::is_same_v<T, float>) return isa::mlp_epilogue_f32(desc, stage, packed, in, ld_in, out, ld_out, rows);
    else if constexpr (std::is_same_v<T, double>) return isa::mlp_epilogue_f64(desc, stage, packed, in, ld_in, out, ld_out, rows);
    else return isa::mlp_epilogue_bf16(desc, stage, packed, in, ld_in, out, ld_out, rows);
  })
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
