// CUDA adapters of the fused convolution ops: checks, device guard, current
// stream, launch; the device code is in kernels/cuda/.
//
// A conv run on CUDA runs stage by stage over the whole batch, activations
// channels_last in the data type between stages (rounded per stage, as
// eager's are): each Conv by ATen's convolution (cuDNN) on the raw weight,
// then its folded bias/BatchNorm and activation by the fused per-channel
// epilogue kernel in place on cuDNN's output; BatchNorm/activation stages by
// the same kernel; pools by the NHWC pool kernels (activation fused); the
// Flatten as NCHW-ordered rows; the Linear head by ATen's GEMM (cuBLAS) plus
// the epilogue kernel. Every engine number runs this one path.
#include <torch/library.h>

#include "adapters/conv_output_layout.h"
#include "kernels/cuda/epilogue.cuh"
#include "adapters/cuda/launch.cuh"

namespace seqfuse {
namespace {

using kernels::ConvDesc;
using kernels::ConvGeometry;
using kernels::ConvStage;
using kernels::ConvStageKind;
namespace dev = seqfuse::cuda;

constexpr int kThreads = 256;

at::Tensor conv_pack_cuda(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  // The weight sections are unused here (cuDNN and cuBLAS read the weights
  // themselves); the buffer keeps the one layout every device shares.
  return cuda_adapter::pack_on_host("seqfuse::conv_pack", tensors, spec, fparams);
}

// y = act(x * scale + shift) over `rows` rows of `channels` (scale/shift of the stage, if any).
template <typename T>
void channel_epilogue(const ConvStage& st, const uint8_t* packed, const at::Tensor& in, at::Tensor& out, int64_t rows,
                      int64_t channels) {
  using A = dev::acc_of<T>;
  if (st.scale_offset < 0 && st.activation == kernels::Activation::None && in.is_same(out)) return;
  dev::ChannelEpilogueArgs<T> a{};
  a.in = static_cast<const T*>(in.const_data_ptr());
  a.ld_in = channels;
  a.out = static_cast<T*>(out.mutable_data_ptr());
  a.ld_out = channels;
  a.rows = rows;
  a.channels = channels;
  a.scale = st.scale_offset >= 0 ? reinterpret_cast<const A*>(packed + st.scale_offset) : nullptr;
  a.shift = st.shift_offset >= 0 ? reinterpret_cast<const A*>(packed + st.shift_offset) : nullptr;
  a.activation = static_cast<int32_t>(st.activation);
  a.alpha = static_cast<A>(st.alpha);
  dev::channel_epilogue_kernel<T>
      <<<cuda_adapter::grid_for(rows * channels, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
at::Tensor pool_stage(const ConvStage& st, const kernels::StageShape& s, const at::Tensor& cur, int64_t n) {
  at::Tensor out = at::empty({n, s.out_c, s.out_h, s.out_w}, cur.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* in = static_cast<const T*>(cur.const_data_ptr());
  T* o = static_cast<T*>(out.mutable_data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (st.kind == ConvStageKind::GlobalAvgPool) {
    dev::global_avg_pool_kernel<T><<<cuda_adapter::grid_for(n * s.out_c, kThreads), kThreads, 0, stream>>>(
        in, o, n, s.in_h * s.in_w, s.out_c, static_cast<int32_t>(st.activation), st.alpha);
  } else {
    const dev::PoolGeometry g{n,
                              s.in_h,
                              s.in_w,
                              s.out_h,
                              s.out_w,
                              s.out_c,
                              static_cast<int32_t>(st.kernel_h),
                              static_cast<int32_t>(st.kernel_w),
                              static_cast<int32_t>(st.stride_h),
                              static_cast<int32_t>(st.stride_w),
                              static_cast<int32_t>(st.pad_top),
                              static_cast<int32_t>(st.pad_left),
                              static_cast<int32_t>(st.pad_bottom),
                              static_cast<int32_t>(st.pad_right),
                              static_cast<int32_t>(st.dilation_h),
                              static_cast<int32_t>(st.dilation_w),
                              st.divisor,
                              (st.options & kernels::kCountIncludePad) != 0,
                              static_cast<int32_t>(st.activation),
                              st.alpha};
    const unsigned grid = cuda_adapter::grid_for(n * s.out_elems(), kThreads);
    if (st.kind == ConvStageKind::MaxPool)
      dev::pool_kernel<T, true><<<grid, kThreads, 0, stream>>>(in, o, g);
    else
      dev::pool_kernel<T, false><<<grid, kThreads, 0, stream>>>(in, o, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor conv_forward_cuda(const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                             at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t engine) {
  const ConvForwardStart start = start_conv_forward(input, packed, weights, spec, fparams, engine);
  const ConvDesc& d = start.d;
  const ConvGeometry& g = start.g;
  const bool flat = start.flat;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::ScalarType dtype = scalar_type_of(d.dtype);
  const int64_t N = input.size(0);
  if (N == 0) return at::empty(start.out_sizes, start.out_options(input));

  const uint8_t* pk = packed.const_data_ptr<uint8_t>();
  at::Tensor cur = input.contiguous(at::MemoryFormat::ChannelsLast);
  bool owned = !cur.is_same(input);  // cur may be written in place
  size_t weight_index = 0;
  cuda_adapter::dispatch_device_dtype(d.dtype, [&]<typename T>() {
    for (size_t i = 0; i < d.stages.size(); ++i) {
      const ConvStage& st = d.stages[i];
      const kernels::StageShape& s = g.stages[i];
      switch (st.kind) {
        case ConvStageKind::Conv:
        case ConvStageKind::Linear: {
          TORCH_CHECK_VALUE(weight_index < weights.size(), "seqfuse::conv_forward: needs the weight of stage ", i);
          const at::Tensor& w = weights[weight_index++];
          TORCH_CHECK_VALUE(w.device() == input.device() && w.scalar_type() == dtype,
                            "seqfuse::conv_forward: weight of stage ", i, " is ", w.scalar_type(), " on ", w.device());
          if (st.kind == ConvStageKind::Linear) {
            cur = at::mm(cur, w.t());
          } else {
            at::Tensor x = cur;
            int64_t ph = st.pad_top, pw = st.pad_left;
            if (st.pad_top != st.pad_bottom || st.pad_left != st.pad_right) {  // 'same' with an even kernel
              x = at::constant_pad_nd(cur, {st.pad_left, st.pad_right, st.pad_top, st.pad_bottom}, 0);
              ph = pw = 0;
            }
            cur = at::convolution(x, w, std::nullopt,
                                  {st.stride_h, st.stride_w}, {ph, pw}, {st.dilation_h, st.dilation_w}, false, {0, 0},
                                  st.groups)
                      .contiguous(at::MemoryFormat::ChannelsLast);
          }
          owned = true;
          const int64_t rows = st.kind == ConvStageKind::Linear ? N : N * s.out_pixels();
          channel_epilogue<T>(st, pk, cur, cur, rows, s.out_c);
          break;
        }
        case ConvStageKind::ScaleShift:
        case ConvStageKind::Pointwise: {
          at::Tensor out = owned ? cur : at::empty_like(cur);
          channel_epilogue<T>(st, pk, cur, out, cur.numel() / s.out_c, s.out_c);
          cur = out;
          owned = true;
          break;
        }
        case ConvStageKind::MaxPool:
        case ConvStageKind::AvgPool:
        case ConvStageKind::GlobalAvgPool:
          cur = pool_stage<T>(st, s, cur, N);
          owned = true;
          break;
        case ConvStageKind::Flatten:
          // torch.flatten(x, 1) of an NCHW tensor: rows in (C, H, W) order.
          cur = cur.contiguous().view({N, s.in_c * s.in_h * s.in_w});
          owned = true;
          break;
      }
    }
  });
  if (flat) return cur;
  return cur.contiguous(start.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("conv_pack", &conv_pack_cuda);
  m.impl("conv_forward", &conv_forward_cuda);
}

}  // namespace seqfuse
