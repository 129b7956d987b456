#include "stage_profile.h"

#include <mutex>

#include "kernels/activation_table.h"

namespace seqfuse {

namespace detail {
thread_local bool stage_profile_flag = false;
}

namespace {

std::mutex timings_mutex;
std::vector<CallTiming> timings;

// Calls recorded between two takes at most: a profile forgotten on never
// grows without bound.
constexpr size_t kMaxTimings = size_t{1} << 16;

const char* activation_label(kernels::Activation a) {
  switch (a) {
#define SEQFUSE_ACTIVATION_LABEL(name, ...) \
  case kernels::Activation::name: return #name;
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_LABEL)
#undef SEQFUSE_ACTIVATION_LABEL
  }
  return "?";
}

std::string with_activation(std::string s, kernels::Activation a) {
  if (a != kernels::Activation::None) s += std::string(" +") + activation_label(a);
  return s;
}

std::string dims(int64_t a, int64_t b) { return std::to_string(a) + "x" + std::to_string(b); }

std::string conv_label(const kernels::ConvStage& st, const kernels::StageShape& s) {
  using K = kernels::ConvStageKind;
  const std::string map = " " + dims(s.out_h, s.out_w);
  std::string t;
  switch (st.kind) {
    case K::Conv:
      t = "conv " + dims(st.kernel_h, st.kernel_w) + (st.stride_h > 1 || st.stride_w > 1 ? "/" + std::to_string(st.stride_h) : "") +
          " " + std::to_string(st.in_channels) + "->" + std::to_string(st.out_channels);
      if (st.depthwise)
        t += " depthwise";
      else if (st.groups > 1)
        t += " g" + std::to_string(st.groups);
      if (s.winograd) t += " winograd";
      t += map;
      break;
    case K::Linear: t = "linear " + std::to_string(st.in_channels) + "->" + std::to_string(st.out_channels); break;
    case K::ScaleShift: t = "batchnorm " + std::to_string(s.out_c) + map; break;
    case K::Pointwise: t = "activation " + std::to_string(s.out_c) + map; break;
    case K::MaxPool: t = "maxpool " + dims(st.kernel_h, st.kernel_w) + map; break;
    case K::AvgPool: t = "avgpool " + dims(st.kernel_h, st.kernel_w) + map; break;
    case K::GlobalAvgPool: t = "global avgpool " + std::to_string(s.out_c); break;
    case K::Flatten: t = "flatten " + std::to_string(s.out_c); break;
  }
  return with_activation(t, st.activation);
}

}  // namespace

void set_stage_profile(bool on) { detail::stage_profile_flag = on; }

void record_call_timing(CallTiming&& t) {
  std::lock_guard<std::mutex> lock(timings_mutex);
  if (timings.size() < kMaxTimings) timings.push_back(std::move(t));
}

std::vector<CallTiming> take_call_timings() {
  std::lock_guard<std::mutex> lock(timings_mutex);
  std::vector<CallTiming> out;
  out.swap(timings);
  return out;
}

CallTiming conv_call_timing(const kernels::ConvDesc& d, const kernels::ConvGeometry& g, int64_t images, int64_t engine,
                            const void* packed) {
  CallTiming t;
  t.op = "conv";
  t.plan = reinterpret_cast<uintptr_t>(packed);
  t.engine = engine;
  t.batch = images;
  const int64_t elem = kernels::element_size(d.dtype) == 2 ? 4 : kernels::element_size(d.dtype);  // accumulate type
  for (size_t i = 0; i < d.stages.size(); ++i) {
    const kernels::ConvStage& st = d.stages[i];
    const kernels::StageShape& s = g.stages[i];
    const int64_t per_value = st.has_weights()                                                     ? st.reduction()
                              : st.kind == kernels::ConvStageKind::MaxPool || st.kind == kernels::ConvStageKind::AvgPool
                                  ? st.kernel_h * st.kernel_w
                                  : 1;
    t.stages.push_back(conv_label(st, s));
    t.macs.push_back(images * s.out_elems() * per_value);
    const int64_t weights = st.has_weights() ? st.out_channels * st.reduction() : 0;
    t.bytes.push_back((images * (s.in_elems() + s.out_elems()) + weights) * elem);
    t.ns.push_back(-1);
  }
  return t;
}

CallTiming mlp_call_timing(const kernels::MlpDesc& d, int64_t rows, int64_t engine, const void* packed) {
  CallTiming t;
  t.op = "mlp";
  t.plan = reinterpret_cast<uintptr_t>(packed);
  t.engine = engine;
  t.batch = rows;
  const int64_t elem = kernels::element_size(d.dtype) == 2 ? 4 : kernels::element_size(d.dtype);
  for (const kernels::StageDesc& st : d.stages) {
    const bool linear = st.kind == kernels::StageKind::Linear;
    std::string label = linear ? "linear " + std::to_string(st.in_features) + "->" + std::to_string(st.out_features)
                               : (st.flags & kernels::kHasBatchNorm ? "batchnorm " : "activation ") +
                                     std::to_string(st.out_features);
    t.stages.push_back(with_activation(label, st.activation));
    t.macs.push_back(rows * (linear ? st.in_features * st.out_features : st.out_features));
    t.bytes.push_back((rows * (st.in_features + st.out_features) + (linear ? st.in_features * st.out_features : 0)) *
                      elem);
    t.ns.push_back(-1);
  }
  return t;
}

}  // namespace seqfuse
