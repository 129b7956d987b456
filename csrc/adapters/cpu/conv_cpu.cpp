// CPU adapters of the fused convolution ops: argument checks, layout at the
// run's boundaries, allocation and at::parallel_for; the arithmetic is in
// kernels/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels/conv_forward.h"
#include "adapters/conv_output_layout.h"
#include "adapters/spec_adapter.h"
#include "adapters/channel_layout.h"
#include "runtime/host_cache.h"
#include "runtime/stage_profile.h"

namespace seqfuse {
namespace {

using kernels::ConvDesc;
using kernels::ConvGeometry;
using kernels::ConvStage;
using kernels::ConvStageKind;

// Below this many multiply-adds a stage stays on the calling thread.
constexpr int64_t kParallelMinMacs = int64_t{1} << 18;

at::Tensor conv_pack_cpu(at::TensorList tensors, at::IntArrayRef spec, at::ArrayRef<double> fparams) {
  const ConvDesc d = decode_conv_spec(spec, fparams);
  for (const ConvStage& s : d.stages)
    TORCH_CHECK_VALUE(!(s.flags & kernels::kBatchStats), "seqfuse::conv_pack: a BatchNorm using batch statistics ",
                      "(training mode) runs only in seqfuse::conv_train_forward");
  const at::ScalarType dtype = scalar_type_of(d.dtype);
  at::Tensor packed = at::zeros({d.packed_bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* base = packed.data_ptr<uint8_t>();
  PackInputs inputs("seqfuse::conv_pack", tensors, dtype);
  dispatch_pack_dtype(d.dtype, [&]<typename T>() {
    for (size_t i = 0; i < d.stages.size(); ++i) {
      const ConvStage& s = d.stages[i];
      const int64_t si = static_cast<int64_t>(i), n = s.out_channels;
      const T* weight = nullptr;
      if (s.kind == ConvStageKind::Conv)
        weight = inputs.take<T>(si, "weight", {n, s.in_channels / s.groups, s.kernel_h, s.kernel_w});
      else if (s.kind == ConvStageKind::Linear)
        weight = inputs.take<T>(si, "weight", {n, s.in_channels});
      const auto e = inputs.take_epilogue<T>(si, s.flags, n, weight != nullptr);
      kernels::pack_conv_stage<T>(s, weight, e.bias, e.gamma, e.beta, e.mean, e.var, base);
    }
  });
  inputs.finish();
  return packed;
}

// Splits [0, n) across the pool when `work` multiply-adds justify it.
template <typename F> void parallel_range(int64_t n, int64_t work, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && n > 1 && work >= kParallelMinMacs)
    at::parallel_for(0, n, (n + threads - 1) / threads, f);
  else if (n > 0)
    f(0, n);
}

struct RunContext {
  const ConvDesc& d;
  const ConvGeometry& g;
  const uint8_t* packed;
  int64_t images;
  at::TensorList weights;  // the Conv weights in stage order (ATen engine)
  int64_t* stage_ns;       // profiled calls: nanoseconds per stage, else null
  // The StageClock of stage i (a no-op unless the call is profiled).
  int64_t* clock_slot(size_t i) const { return stage_ns ? stage_ns + i : nullptr; }
};

// Whether engine 1 runs stage i through ATen (a Conv2d ATen can express:
// asymmetric 'same' padding cannot be).
bool aten_runs_stage(const ConvStage& st, int engine) {
  return engine == kernels::kEngineGemmEpilogue && st.kind == ConvStageKind::Conv && st.pad_top == st.pad_bottom &&
         st.pad_left == st.pad_right;
}

// Engine 1's Conv stage: ATen's convolution (oneDNN) on the raw weight in the
// weight's dtype, then the folded bias/BatchNorm and activation by the fused
// epilogue kernel. `cur` holds the stage's input, compact NHWC, in T or A.
// The result is compact NHWC in A, or in T when `keep_storage_type` (the next
// stage is another ATen convolution: bfloat16 activations then pass between
// them without conversions, rounded to bfloat16 as eager's are).
template <typename T, typename A>
at::Tensor aten_conv_stage(const RunContext& ctx, size_t i, const at::Tensor& cur, size_t weight_index,
                           bool keep_storage_type) {
  const ConvStage& st = ctx.d.stages[i];
  const kernels::StageShape& s = ctx.g.stages[i];
  TORCH_CHECK_VALUE(weight_index < ctx.weights.size(), "seqfuse::conv_forward: engine 1 needs the weight of stage ",
                    i);
  const at::Tensor& w = ctx.weights[weight_index];
  const at::Tensor x = cur.as_strided({ctx.images, s.in_c, s.in_h, s.in_w},
                                      {s.in_h * s.in_w * s.in_c, 1, s.in_w * s.in_c, s.in_c});
  at::Tensor y = at::convolution(x.to(w.scalar_type()), w, std::nullopt, {st.stride_h, st.stride_w},
                                 {st.pad_top, st.pad_left}, {st.dilation_h, st.dilation_w}, false, {0, 0}, st.groups)
                     .contiguous(at::MemoryFormat::ChannelsLast);
  const T* yp = reinterpret_cast<const T*>(y.const_data_ptr());
  at::Tensor out = y;
  if (!std::is_same_v<T, A> && !keep_storage_type)
    out = at::empty_like(y, y.options().dtype(c10::CppTypeToScalarType<A>::value), at::MemoryFormat::ChannelsLast);
  const int64_t pixels = ctx.images * s.out_pixels();
  parallel_range(pixels, pixels * s.out_c, [&](int64_t b, int64_t e) {
    if (out.scalar_type() == y.scalar_type())
      kernels::conv_stage_epilogue<T, T>(ctx.d, ctx.g, i, ctx.packed, yp, reinterpret_cast<T*>(out.data_ptr()), b,
                                         e);
    else
      kernels::conv_stage_epilogue<T, A>(ctx.d, ctx.g, i, ctx.packed, yp, reinterpret_cast<A*>(out.data_ptr()), b,
                                         e);
  });
  return out;
}

// Stages [first, stop) over the whole batch, stage by stage, each split over
// output pixels. Returns the tensor holding the last stage's output, compact
// NHWC: `final_holder` when the last stage wrote into `final_out`, else a new
// tensor in A, or in T when the last stage ran on ATen.
template <typename T, typename A>
at::Tensor run_stages_batched(const RunContext& ctx, size_t first, size_t stop, at::Tensor cur, A* final_out,
                              const at::Tensor& final_holder, int engine) {
  size_t weight_index = 0;
  for (size_t i = 0; i < first; ++i) weight_index += ctx.d.stages[i].kind == ConvStageKind::Conv;
  for (size_t i = first; i < stop; ++i) {
    const StageClock clock(ctx.clock_slot(i));
    const ConvStage& st = ctx.d.stages[i];
    const kernels::StageShape& s = ctx.g.stages[i];
    if (aten_runs_stage(st, engine)) {
      // Stay in T into the next ATen convolution, and out of the run's last
      // stage (the caller's copy into the output converts what it must).
      const bool keep = i + 1 == stop || aten_runs_stage(ctx.d.stages[i + 1], engine);
      cur = aten_conv_stage<T, A>(ctx, i, cur, weight_index++, keep);
      continue;
    }
    if (st.kind == ConvStageKind::Conv) ++weight_index;
    at::Tensor out;
    A* op = nullptr;
    if (i + 1 == stop && final_out) {
      out = final_holder, op = final_out;
    } else {
      out = host_empty({ctx.images * s.out_elems()}, c10::CppTypeToScalarType<A>::value);
      op = out.mutable_data_ptr<A>();
    }
    const A* in = cur.const_data_ptr<A>();
    const int64_t pixels = ctx.images * s.out_pixels();
    const int64_t work = ctx.g.macs_per_image * ctx.images;  // whole-run size: a stage of it is worth splitting
    if (kernels::gemm_splits_channels(ctx.d, ctx.g, i, ctx.images, at::get_num_threads())) {
      parallel_range(kernels::panel_count(st.out_channels), work, [&](int64_t b, int64_t e) {
        kernels::conv_stage_forward<A>(ctx.d, ctx.g, i, ctx.packed, in, op, 0, pixels, b, e);
      });
    } else if (s.winograd) {  // split on tile rows: no tile computed twice
      const int64_t tile_rows = kernels::winograd_tile_rows(s);
      auto first_pixel = [&](int64_t k) {
        return k / tile_rows * s.out_pixels() + std::min(k % tile_rows * kernels::kWinogradOut, s.out_h) * s.out_w;
      };
      parallel_range(ctx.images * tile_rows, work, [&](int64_t b, int64_t e) {
        kernels::conv_stage_forward<A>(ctx.d, ctx.g, i, ctx.packed, in, op, first_pixel(b), first_pixel(e));
      });
    } else {
      parallel_range(pixels, work, [&](int64_t b, int64_t e) {
        kernels::conv_stage_forward<A>(ctx.d, ctx.g, i, ctx.packed, in, op, b, e);
      });
    }
    cur = out;
  }
  return cur;
}

// ATen's in-place op for the activations engine 2 leaves to ATen (the
// `aten` column of activation_table.h), else null.
using InPlaceActivation = void (*)(at::Tensor&);
InPlaceActivation aten_activation(kernels::Activation a) {
#define SEQFUSE_ATEN(op, ...) [](at::Tensor& t) { at::op(t __VA_OPT__(, ) __VA_ARGS__); }
#define SEQFUSE_NO_ATEN nullptr
#define SEQFUSE_ATEN_CASE(name, id, python_name, from_output, piecewise, registers, aten) \
  case kernels::Activation::name: return aten;
  switch (a) { SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ATEN_CASE) }
#undef SEQFUSE_ATEN_CASE
#undef SEQFUSE_NO_ATEN
#undef SEQFUSE_ATEN
  return nullptr;
}

// Engine 2: each stage through ATen in the layout the input comes in (for
// NCHW input the contiguous layout eager runs, where oneDNN's blocked NCHW
// kernels beat its NHWC ones on some CPUs), the folded bias/BatchNorm and the
// activation by the fused epilogue in place over that layout. No layout
// conversion between stages; a Flatten head gets its rows in NCHW order.
// Only for T == A (float32, float64): the epilogue reads scale/shift in T.
template <typename T>
at::Tensor run_stages_aten_layout(const RunContext& ctx, size_t stop, const at::Tensor& input) {
  at::Tensor cur = input;
  if (!cur.is_contiguous() && !cur.is_contiguous(at::MemoryFormat::ChannelsLast)) cur = cur.contiguous();
  bool owned = false;  // cur may be written in place (not the caller's input)
  size_t weight_index = 0;
  for (size_t i = 0; i < stop; ++i) {
    const StageClock clock(ctx.clock_slot(i));
    const ConvStage& st = ctx.d.stages[i];
    const T* scale = nullptr;
    const T* shift = nullptr;
    switch (st.kind) {
      case ConvStageKind::Conv: {
        const at::Tensor& w = ctx.weights[weight_index++];
        at::Tensor x = cur;
        int64_t ph = st.pad_top, pw = st.pad_left;
        if (st.pad_top != st.pad_bottom || st.pad_left != st.pad_right) {  // 'same' with an even kernel
          x = at::constant_pad_nd(cur, {st.pad_left, st.pad_right, st.pad_top, st.pad_bottom}, 0);
          ph = pw = 0;
        }
        cur = at::convolution(x, w, std::nullopt, {st.stride_h, st.stride_w}, {ph, pw},
                              {st.dilation_h, st.dilation_w}, false, {0, 0}, st.groups);
        if (!cur.is_contiguous() && !cur.is_contiguous(at::MemoryFormat::ChannelsLast)) cur = cur.contiguous();
        owned = true;
        break;
      }
      case ConvStageKind::MaxPool:
        cur = at::max_pool2d(cur, {st.kernel_h, st.kernel_w}, {st.stride_h, st.stride_w}, {st.pad_top, st.pad_left},
                             {st.dilation_h, st.dilation_w}, st.options & kernels::kCeilMode);
        owned = true;
        break;
      case ConvStageKind::AvgPool:
        cur = at::avg_pool2d(cur, {st.kernel_h, st.kernel_w}, {st.stride_h, st.stride_w}, {st.pad_top, st.pad_left},
                             st.options & kernels::kCeilMode, st.options & kernels::kCountIncludePad,
                             st.divisor ? std::optional<int64_t>(st.divisor) : std::nullopt);
        owned = true;
        break;
      case ConvStageKind::GlobalAvgPool:
        cur = at::adaptive_avg_pool2d(cur, {1, 1});  // as eager's AdaptiveAvgPool2d(1)
        owned = true;
        break;
      default: break;  // ScaleShift, Pointwise: the epilogue below
    }
    if (!cur.is_contiguous() && !cur.is_contiguous(at::MemoryFormat::ChannelsLast)) cur = cur.contiguous();
    if (st.scale_offset >= 0) {
      scale = reinterpret_cast<const T*>(ctx.packed + st.scale_offset);
      shift = reinterpret_cast<const T*>(ctx.packed + st.shift_offset);
    }
    if (!scale && st.activation == kernels::Activation::None) continue;
    if (!owned) {  // a leading BatchNorm or activation: never write the caller's input
      cur = cur.clone(at::MemoryFormat::Preserve);
      owned = true;
    }
    // The exp/erf/tanh activations run as ATen's vectorized in-place ops after
    // the scale/shift pass: measured several times faster here than the
    // epilogue's own polynomial over NCHW planes, and eager's own values.
    const bool aten_act = aten_activation(st.activation) != nullptr;
    const kernels::Activation fused_act = aten_act ? kernels::Activation::None : st.activation;
    if (scale || fused_act != kernels::Activation::None) {
      const kernels::ChannelLayout l = layout_of(cur);
      T* p = reinterpret_cast<T*>(cur.mutable_data_ptr());
      parallel_range(l.outer, l.numel(), [&](int64_t b, int64_t e) {
        kernels::epilogue_forward<T>(l, p, nullptr, scale, shift, fused_act, st.alpha, nullptr, p, b, e);
      });
    }
    if (aten_act) aten_activation(st.activation)(cur);
  }
  return cur;
}

at::Tensor conv_forward_cpu(const at::Tensor& input, const at::Tensor& packed, at::TensorList weights,
                            at::IntArrayRef spec, at::ArrayRef<double> fparams, int64_t engine) {
  // A profiled call (seqfuse.profile) is timed whole, decoding and checks
  // included; each stage into stage_ns, the layout conversions into its last slot.
  const bool profiled = stage_profile_on();
  const int64_t t_start = profiled ? kernels::monotonic_ns() : 0;
  const ConvForwardStart start = start_conv_forward(input, packed, weights, spec, fparams, engine);
  const ConvDesc& d = start.d;
  // Engine 3 is engine 0 with the stages that have a Winograd weight run as
  // Winograd tiles: its own copy of the geometry, so other engines copy nothing.
  ConvGeometry winograd_geometry;
  if (engine == kernels::kEngineWinograd) {
    winograd_geometry = start.g;
    kernels::select_winograd(d, winograd_geometry);
  }
  const ConvGeometry& g = engine == kernels::kEngineWinograd ? winograd_geometry : start.g;
  const bool flat = start.flat, channels_last = start.channels_last;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const kernels::StageShape& last = g.stages.back();
  // Outputs and intermediates from the host cache: recycled blocks whose pages are mapped already.
  at::Tensor y = host_empty(start.out_sizes, input.scalar_type(),
                            channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (N == 0) return y;

  std::vector<int64_t> stage_ns(profiled ? d.stages.size() + 1 : 0, 0);
  int64_t* const layout_ns = profiled ? &stage_ns.back() : nullptr;
  // Per-image runs: each thread's own slots, averaged into stage_ns after.
  std::vector<int64_t> thread_ns;
  auto thread_slots = [&](size_t stop) -> int64_t* {
    return profiled ? thread_ns.data() + at::get_thread_num() * (stop + 1) : nullptr;
  };
  auto average_threads = [&](size_t stop) {
    if (!profiled) return;
    const size_t width = stop + 1;
    int64_t ran = 0;
    for (size_t t = 0; t * width < thread_ns.size(); ++t) {
      bool any = false;
      for (size_t k = 0; k < width; ++k) any = any || thread_ns[t * width + k] != 0;
      ran += any;
    }
    if (ran == 0) return;
    for (size_t t = 0; t * width < thread_ns.size(); ++t) {
      for (size_t k = 0; k < stop; ++k) stage_ns[k] += thread_ns[t * width + k] / ran;
      *layout_ns += thread_ns[t * width + stop] / ran;
    }
  };

  dispatch_mlp_dtype(d.dtype, [&]<typename T>() {
    using A = kernels::acc_t<T>;
    constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<A>::value;
    const T* xp = reinterpret_cast<const T*>(input.const_data_ptr());
    T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
    const int64_t x_strides[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
    const int64_t oh = flat ? 1 : last.out_h, ow = flat ? 1 : last.out_w;
    const int64_t y_strides[4] = {y.stride(0), y.stride(1), flat ? 1 : y.stride(2), flat ? 1 : y.stride(3)};
    const RunContext ctx{d, g, packed.const_data_ptr<uint8_t>(), N, weights, profiled ? stage_ns.data() : nullptr};
    const int run_engine = static_cast<int>(engine == kernels::kEngineWinograd ? kernels::kEngineFused : engine);
    const size_t n_stages = d.stages.size();
    const size_t spatial_stop = flat ? static_cast<size_t>(d.flatten_stage) + 1 : n_stages;
    if constexpr (std::is_same_v<T, A>) {
      if (run_engine == kernels::kEngineAtenLayout) {
        const size_t aten_stop = flat ? static_cast<size_t>(d.flatten_stage) : n_stages;
        at::Tensor mid = run_stages_aten_layout<T>(ctx, aten_stop, input);
        if (!flat) {
          if (mid.sizes() == y.sizes() && mid.strides() == y.strides()) {
            y = mid;  // the last stage's output is already in eager's layout
          } else {
            const StageClock clock(layout_ns);
            y.copy_(mid);
          }
          return;
        }
        // The Flatten (NCHW feature order), then the head on those rows as engine 1 runs it.
        at::Tensor rows = mid.contiguous().reshape({-1});
        at::Tensor head = run_stages_batched<T, A>(ctx, spatial_stop, n_stages, rows,
                                                   reinterpret_cast<A*>(yp), y, 1);
        if (head.const_data_ptr() != y.const_data_ptr()) y.copy_(head.view({N, last.out_c}));
        return;
      }
    }
    TORCH_CHECK_VALUE(run_engine != kernels::kEngineAtenLayout, "seqfuse::conv_forward: engine 2 runs float32 and float64 only");
    const int64_t threads = at::get_num_threads();
    // One image per task carries every stage, and the layout conversions at
    // both ends, in the core's cache: chosen when the images split evenly
    // enough over the threads.
    const bool per_image = run_engine == kernels::kEngineFused && (threads == 1 || N % threads == 0 || N >= 4 * threads ||
                                           N * g.macs_per_image < kParallelMinMacs);
    if (profiled && per_image) thread_ns.assign(at::get_num_threads() * (spatial_stop + 1), 0);
    if (per_image && spatial_stop == n_stages) {
      parallel_range(N, N * g.macs_per_image, [&](int64_t b, int64_t e) {
        kernels::conv_forward_images<T, A, T>(d, g, ctx.packed, xp + b * x_strides[0], x_strides,
                                              yp + b * y_strides[0], y_strides, e - b, spatial_stop,
                                              thread_slots(spatial_stop));
      });
      average_threads(spatial_stop);
      return;
    }
    // The last stage writes into y when y's layout is compact NHWC in A.
    const bool direct_out = std::is_same_v<T, A> && (flat || channels_last);
    at::Tensor staging = direct_out ? y : host_empty({N * last.out_elems()}, acc_type);
    A* out = reinterpret_cast<A*>(staging.mutable_data_ptr());
    at::Tensor cur;
    if (per_image) {  // the spatial stages per image, then the head over the batch
      const int64_t mid_elems = g.stages[spatial_stop - 1].out_elems();
      at::Tensor mid = host_empty({N * mid_elems}, acc_type);
      A* mp = mid.mutable_data_ptr<A>();
      const int64_t mid_strides[4] = {mid_elems, 1, 1, 1};
      parallel_range(N, N * g.macs_per_image, [&](int64_t b, int64_t e) {
        kernels::conv_forward_images<T, A, A>(d, g, ctx.packed, xp + b * x_strides[0], x_strides,
                                              mp + b * mid_elems, mid_strides, e - b, spatial_stop,
                                              thread_slots(spatial_stop));
      });
      average_threads(spatial_stop);
      cur = run_stages_batched<T, A>(ctx, spatial_stop, n_stages, mid, out, staging, run_engine);
    } else {
      // NHWC input in A: the input itself when it already is, else one converting pass.
      at::Tensor x_nhwc = input;
      if (!std::is_same_v<T, A> || !input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
        const StageClock clock(layout_ns);
        x_nhwc = host_empty({N * H * W * C}, acc_type);
        A* dst = x_nhwc.mutable_data_ptr<A>();
        parallel_range(N, N * H * W * C * 64, [&](int64_t b, int64_t e) {
          kernels::load_nhwc<T, A>(xp, x_strides, C, H, W, b, e, dst);
        });
      }
      cur = run_stages_batched<T, A>(ctx, 0, n_stages, x_nhwc, out, staging, run_engine);
    }
    if (direct_out && cur.const_data_ptr() == y.const_data_ptr()) return;
    const StageClock clock(layout_ns);
    if (cur.scalar_type() != acc_type) {  // a last ATen convolution's output, in T (spatial, NHWC)
      y.copy_(cur.as_strided(y.sizes(), {last.out_elems(), 1, ow * last.out_c, last.out_c}));
      return;
    }
    const A* src = cur.const_data_ptr<A>();
    parallel_range(N, N * last.out_elems() * 64, [&](int64_t b, int64_t e) {
      kernels::store_nhwc<A, T>(src, last.out_c, oh, ow, y_strides, b, e, yp);
    });
  });
  if (profiled) {
    const int64_t t_end = kernels::monotonic_ns();
    CallTiming t = conv_call_timing(d, g, N, engine, packed.const_data_ptr());
    std::copy(stage_ns.begin(), stage_ns.end() - 1, t.ns.begin());
    t.layout_ns = *layout_ns;
    t.start_ns = t_start;
    t.total_ns = t_end - t_start;
    t.record_ns = kernels::monotonic_ns() - t_end;
    record_call_timing(std::move(t));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("conv_pack", &conv_pack_cpu);
  m.impl("conv_forward", &conv_forward_cpu);
}

}  // namespace seqfuse
