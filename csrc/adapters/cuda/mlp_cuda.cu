// CUDA adapters of the fused MLP ops: checks, device guard, current stream,
// launch; the device code is in kernels/cuda/.
//
// engine 0: the fully fused kernel (kernels/cuda/mlp_fused.cuh) when the
//           chain's widths fit in shared memory, otherwise engine 1;
// engine 1: each Linear's product by ATen's GEMM (cuBLAS), each epilogue by
//           the fused per-channel epilogue kernel, in place on the product;
//           a bias alone goes into cuBLASLt's epilogue (at::addmm).
#include <torch/library.h>

#include <array>
#include <mutex>

#include "kernels/cuda/epilogue.cuh"
#include "kernels/cuda/mlp_fused.cuh"
#include "adapters/cuda/launch.cuh"

namespace seqfuse {
namespace {

using kernels::MlpDesc;
using kernels::StageDesc;
using kernels::StageKind;
namespace dev = seqfuse::cuda;

// Shared memory the fused kernel may ask for: what every sm_80+ part grants
// with the opt-in (sm_86/89 allow 99 KB per block).
constexpr int64_t kFusedSmemLimit = 99 * 1024;

at::Tensor mlp_pack_cuda(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  return cuda_adapter::pack_on_host("seqfuse::mlp_pack", tensors, spec, fparams);
}

template <typename T> bool fused_kernel_serves(const MlpDesc& d) {
  return static_cast<int64_t>(d.stages.size()) <= dev::kFusedMaxStages &&
         dev::fused_mlp_smem_bytes<T>(static_cast<int>(d.max_width)) <= kFusedSmemLimit;
}

template <typename T>
void launch_fused(const MlpDesc& d, const uint8_t* packed, const T* x, int64_t ld_x, T* y, int64_t rows) {
  dev::FusedMlpArgs a{};
  a.x = x;
  a.ld_x = ld_x;
  a.y = y;
  a.ld_y = d.out_features;
  a.rows = rows;
  a.packed = packed;
  a.n_stages = static_cast<int32_t>(d.stages.size());
  a.width = static_cast<int32_t>(d.max_width);
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const StageDesc& s = d.stages[i];
    a.stages[i] = dev::FusedStage{static_cast<int32_t>(s.kind),       static_cast<int32_t>(s.in_features),
                                  static_cast<int32_t>(s.out_features), static_cast<int32_t>(s.activation),
                                  s.alpha,                              s.weight_offset,
                                  s.scale_offset,                       s.shift_offset};
  }
  const int64_t smem = dev::fused_mlp_smem_bytes<T>(a.width);
  if (smem > 48 * 1024) {
    // The opt-in is per kernel and device; raised once to the limit, not per
    // launch (so a launch under CUDA-graph capture makes no such call).
    static std::array<std::once_flag, 64> raised;
    const int device = static_cast<int>(c10::cuda::current_device());
    TORCH_CHECK(device < static_cast<int>(raised.size()), "seqfuse: device index ", device, " out of range");
    std::call_once(raised[device], [] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(dev::fused_mlp_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kFusedSmemLimit)));
    });
  }
  const unsigned blocks = static_cast<unsigned>(dev::ceil_div(rows, dev::kFusedRowsPerBlock));
  dev::fused_mlp_kernel<T><<<blocks, dev::kFusedWarps * dev::kWarpSize, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_epilogue(const StageDesc& s, const uint8_t* packed, const T* in, int64_t ld_in, T* out, int64_t ld_out,
                     int64_t rows) {
  using A = dev::acc_of<T>;
  dev::ChannelEpilogueArgs<T> a{};
  a.in = in;
  a.ld_in = ld_in;
  a.out = out;
  a.ld_out = ld_out;
  a.rows = rows;
  a.channels = s.out_features;
  a.scale = s.scale_offset >= 0 ? reinterpret_cast<const A*>(packed + s.scale_offset) : nullptr;
  a.shift = s.shift_offset >= 0 ? reinterpret_cast<const A*>(packed + s.shift_offset) : nullptr;
  a.activation = static_cast<int32_t>(s.activation);
  a.alpha = static_cast<A>(s.alpha);
  constexpr int kThreads = 256;
  dev::channel_epilogue_kernel<T>
      <<<cuda_adapter::grid_for(rows * s.out_features, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using kernels::Activation;

// A Linear stage whose whole epilogue is its bias: at::addmm, the very call
// eager's nn.Linear makes (cuBLASLt adds the bias in the GEMM's epilogue).
// cuBLASLt's ReLU/GELU epilogues are not used: their NaN handling is not
// eager's (a NaN must pass a ReLU), so activations stay in our epilogue.
bool bias_only(const StageDesc& s) {
  return s.kind == StageKind::Linear && (s.flags & kernels::kHasBias) && !(s.flags & kernels::kHasBatchNorm) &&
         s.activation == Activation::None;
}

template <typename T>
at::Tensor gemm_epilogue(const MlpDesc& d, const at::Tensor& packed, const at::Tensor& x, at::TensorList weights,
                         int64_t rows) {
  const uint8_t* pk = packed.const_data_ptr<uint8_t>();
  // A bias-only Linear is one addmm (the bias is the packed shift: no BatchNorm, the scale is 1).
  auto finished = [&](const StageDesc& s, const at::Tensor& cur, const at::Tensor& w) -> std::optional<at::Tensor> {
    if (!bias_only(s)) return std::nullopt;
    const at::Tensor bias = packed.narrow(0, s.shift_offset, s.out_features * int64_t(sizeof(dev::acc_of<T>)))
                                .view(c10::CppTypeToScalarType<dev::acc_of<T>>::value)
                                .to(x.scalar_type());
    return at::addmm(bias, cur, w.t());
  };
  return gemm_epilogue_walk(d, x, weights, rows, finished, [&](size_t i, const at::Tensor& cur, at::Tensor& out) {
    launch_epilogue<T>(d.stages[i], pk, static_cast<const T*>(cur.const_data_ptr()), cur.stride(0),
                       static_cast<T*>(out.mutable_data_ptr()), out.stride(0), rows);
  });
}

at::Tensor mlp_forward_cuda(const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                            at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t engine) {
  const MlpDesc d = decode_mlp_spec(spec, fparams);
  check_packed("seqfuse::mlp_forward", packed, input, d.packed_bytes);
  TORCH_CHECK_VALUE(engine == kernels::kEngineFused || engine == kernels::kEngineGemmEpilogue,
                    "seqfuse::mlp_forward: unknown engine ", engine);
  const c10::cuda::CUDAGuard guard(input.device());
  const MlpRows in = mlp_rows(d, input);
  const int64_t K = d.in_features;
  const at::Tensor& x = in.x;
  const int64_t rows = in.rows, ld_x = in.ld;
  const auto& out_shape = in.out_shape;
  if (rows == 0) return at::empty(out_shape, input.options());

  return cuda_adapter::dispatch_device_dtype(d.dtype, [&]<typename T>() {
    const uint8_t* pk = packed.const_data_ptr<uint8_t>();
    if (engine == 0 && fused_kernel_serves<T>(d)) {
      at::Tensor y = at::empty(out_shape, input.options());
      launch_fused<T>(d, pk, static_cast<const T*>(x.const_data_ptr()), ld_x, static_cast<T*>(y.mutable_data_ptr()),
                      rows);
      return y;
    }
    const at::Tensor x2 = x.dim() == 2 ? x : x.view({rows, K});
    return gemm_epilogue<T>(d, packed, x2, weights, rows).view(out_shape);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("mlp_pack", &mlp_pack_cuda);
  m.impl("mlp_forward", &mlp_forward_cuda);
}

}  // namespace seqfuse
