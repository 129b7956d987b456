// CPU adapters of the fused MLP ops: argument checks, allocation and
// at::parallel_for over rows; the arithmetic is in kernels/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels/mlp_forward.h"
#include "adapters/spec_adapter.h"
#include "runtime/host_cache.h"
#include "runtime/stage_profile.h"

namespace seqfuse {
namespace {

using kernels::MlpDesc;
using kernels::StageDesc;
using kernels::StageKind;

// Below this many multiply-adds a call stays on the calling thread: waking the
// pool costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t{1} << 20;

at::Tensor mlp_pack_cpu(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  const MlpDesc d = decode_mlp_spec(spec, fparams);
  for (const StageDesc& s : d.stages)
    TORCH_CHECK_VALUE(!(s.flags & kernels::kBatchStats), "seqfuse::mlp_pack: a BatchNorm using batch statistics ",
                      "(training mode) runs only in seqfuse::mlp_train_forward");
  const at::ScalarType dtype = scalar_type_of(d.dtype);
  // Zeroed: alignment gaps between sections must not carry stale bytes (the
  // buffer is a deterministic function of the parameters).
  at::Tensor packed = at::zeros({d.packed_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* base = packed.data_ptr<uint8_t>();
  PackInputs inputs("seqfuse::mlp_pack", tensors, dtype);
  dispatch_pack_dtype(d.dtype, [&]<typename T>() {
    using A = kernels::acc_t<T>;
    for (size_t i = 0; i < d.stages.size(); ++i) {
      const StageDesc& s = d.stages[i];
      const int64_t si = static_cast<int64_t>(i), n = s.out_features;
      if (s.kind == StageKind::Pointwise) continue;
      const T* weight = nullptr;
      if (s.kind == StageKind::Linear)
        weight = inputs.take<T>(si, "weight", {n, s.in_features});
      else
        TORCH_CHECK_VALUE(s.flags & kernels::kHasBatchNorm, "seqfuse::mlp_pack: ScaleShift stage ", si,
                          " without BatchNorm flag");
      const auto e = inputs.take_epilogue<T>(si, s.flags, n, weight != nullptr);
      if (weight) kernels::pack_linear_weight(weight, n, s.in_features, reinterpret_cast<T*>(base + s.weight_offset));
      kernels::fold_scale_shift(n, e.bias, e.gamma, e.beta, e.mean, e.var, s.eps,
                                reinterpret_cast<A*>(base + s.scale_offset),
                                reinterpret_cast<A*>(base + s.shift_offset));
    }
  });
  inputs.finish();
  return packed;
}

// Engine 1: vendor GEMM per Linear, fused epilogue kernel per stage.
template <typename T>
at::Tensor mlp_forward_gemm_epilogue(const MlpDesc& d, const uint8_t* pk, const at::Tensor& x, at::TensorList weights,
                                     int64_t rows) {
  return gemm_epilogue_walk(
      d, x, weights, rows, [](const StageDesc&, const at::Tensor&, const at::Tensor&) { return std::optional<at::Tensor>(); },
      [&](size_t i, const at::Tensor& cur, at::Tensor& out) {
        const StageDesc& s = d.stages[i];
        const T* in = reinterpret_cast<const T*>(cur.const_data_ptr());
        T* o = reinterpret_cast<T*>(out.mutable_data_ptr());
        const int64_t ld_in = cur.stride(0), ld_out = out.stride(0);
        at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 15) / s.out_features), [&](int64_t b, int64_t e) {
          kernels::mlp_stage_epilogue<T>(d, i, pk, in + b * ld_in, ld_in, o + b * ld_out, ld_out, e - b);
        });
      });
}

at::Tensor mlp_forward_run(const MlpDesc& d, const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                           int64_t engine) {
  const MlpRows in = mlp_rows(d, input);
  check_packed("seqfuse::mlp_forward", packed, input, d.packed_bytes);
  const int64_t K = d.in_features, N = d.out_features;
  const at::Tensor& x = in.x;
  const int64_t rows = in.rows, ld_x = in.ld;
  const auto& out_shape = in.out_shape;
  TORCH_CHECK_VALUE(engine == kernels::kEngineFused || engine == kernels::kEngineGemmEpilogue,
                    "seqfuse::mlp_forward: unknown engine ", engine);
  if (engine == kernels::kEngineGemmEpilogue && rows > 0) {
    const at::Tensor x2 = x.dim() == 2 ? x : x.view({rows, K});
    return dispatch_mlp_dtype(d.dtype, [&]<typename T>() {
      return mlp_forward_gemm_epilogue<T>(d, packed.const_data_ptr<uint8_t>(), x2, weights, rows);
    }).view(out_shape);
  }
  at::Tensor y = host_empty(out_shape, input.scalar_type());
  if (rows == 0) return y;

  dispatch_mlp_dtype(d.dtype, [&]<typename T>() {
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
    const uint8_t* pk = packed.const_data_ptr<uint8_t>();
    const int64_t threads = at::get_num_threads();
    if (threads > 1 && rows > 1 && rows * d.macs_per_row >= kParallelMinMacs) {
      const int64_t grain = std::max<int64_t>((rows + threads - 1) / threads, 1);
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        kernels::mlp_forward_rows<T>(d, pk, xp + begin * ld_x, ld_x, yp + begin * N, N, end - begin);
      });
    } else {
      kernels::mlp_forward_rows<T>(d, pk, xp, ld_x, yp, N, rows);
    }
  });
  return y.view(out_shape);
}

at::Tensor mlp_forward_cpu(const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                           at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t engine) {
  if (!stage_profile_on()) return mlp_forward_run(decode_mlp_spec(spec, fparams), input, packed, weights, engine);
  // Profiled (seqfuse.profile): the whole call, decoding included, whose
  // stages engine 0 runs together over row tiles (not timed apart).
  const int64_t t0 = kernels::monotonic_ns();
  const MlpDesc d = decode_mlp_spec(spec, fparams);
  at::Tensor y = mlp_forward_run(d, input, packed, weights, engine);
  const int64_t t_end = kernels::monotonic_ns();
  const int64_t rows = input.numel() / std::max<int64_t>(d.in_features, 1);
  CallTiming t = mlp_call_timing(d, rows, engine, packed.const_data_ptr());
  t.start_ns = t0;
  t.total_ns = t_end - t0;
  t.record_ns = kernels::monotonic_ns() - t_end;
  record_call_timing(std::move(t));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("mlp_pack", &mlp_pack_cpu);
  m.impl("mlp_forward", &mlp_forward_cpu);
}

}  // namespace seqfuse
