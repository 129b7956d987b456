// FusedCall, FusedMlpCall and FusedConvCall (see fused_call.h).
#include "runtime/fused_call.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <chrono>
#include <stdexcept>

#include "runtime/python_errors.h"
#include "adapters/spec_adapter.h"

namespace seqfuse {

std::optional<at::Tensor> FusedCall::try_call(py::handle input) {
  if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
  at::Tensor x = THPVariable_Unpack(input.ptr());
  if (x.scalar_type() != dtype_ || x.device() != packed_.device() || x.layout() != at::kStrided) return std::nullopt;
  if (x.requires_grad() && at::GradMode::is_enabled()) return std::nullopt;
  std::optional<Shape> shape = prepare(x);
  if (!shape) return std::nullopt;
  // Other Python threads may run while a call of real size computes.
  std::optional<py::gil_scoped_release> no_gil;
  if (shape->macs >= kReleaseGilMacs) no_gil.emplace();
  const int engine = engine_override().load(std::memory_order_relaxed);
  if (engine < 0) return run_chosen(x, *shape);
  return run(x, std::min(engine, engine_count() - 1));  // an override past this op's engines: its last
}

py::object FusedCall::call(py::handle input) {
  try {
    std::optional<at::Tensor> y = try_call(input);
    return y ? py::reinterpret_steal<py::object>(THPVariable_Wrap(*y)) : py::none();
  } catch (const c10::Error& e) {
    rethrow_as_python(e);
  }
}

std::vector<std::tuple<int64_t, int64_t, int, int, std::vector<int64_t>>> FusedCall::measured_engines() const {
  std::vector<std::tuple<int64_t, int64_t, int, int, std::vector<int64_t>>> out;
  for (const auto& [key, b, threads, engine] :
       EngineChoices::global().with_prefix(op_kind_, packed_.device().type(), spec_))
    out.emplace_back(int64_t{1} << (b - 1), (int64_t{1} << b) - 1, threads, engine,
                     std::vector<int64_t>(key.begin() + static_cast<int64_t>(spec_.size()), key.end()));
  return out;
}

FusedCall::FusedCall(int op_kind, const char* op_name, at::Tensor packed, std::vector<at::Tensor> weights,
                     std::vector<int64_t> spec, std::vector<double> fparams, at::ScalarType dtype)
    : op_kind_(op_kind),
      op_(c10::Dispatcher::singleton()
              .findSchemaOrThrow(op_name, "")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef,
                                at::ArrayRef<double>, int64_t)>()),
      packed_(std::move(packed)), weights_(std::move(weights)), spec_(std::move(spec)),
      fparams_(std::move(fparams)), dtype_(dtype) {}

at::Tensor FusedCall::run(const at::Tensor& x, int engine) const {
  return op_.call(x, packed_, weights_, spec_, fparams_, engine);
}

EngineChoices::Key FusedCall::choice_key(int64_t batch, const std::vector<int64_t>& extra) const {
  std::vector<int64_t> key_shape = spec_;
  key_shape.insert(key_shape.end(), extra.begin(), extra.end());
  return {op_kind_, packed_.device().type(), std::move(key_shape), bucket(batch), at::get_num_threads()};
}

int FusedCall::measured_engine(int64_t batch, const std::vector<int64_t>& extra) const {
  return EngineChoices::global().get(choice_key(batch, extra));
}

std::optional<at::Tensor> FusedCall::run_chosen(const at::Tensor& x, const Shape& shape) {
  if (!shape.tunable || shape.macs < kTuneMinMacs) return run(x, 0);
  const EngineChoices::Key key = choice_key(shape.batch, shape.extra);
  if (!x.device().is_cpu()) {
    int engine = EngineChoices::global().get(key);
    if (engine < 0) {
      engine = measure_fastest_engine(x.device(), engine_count(), [&](int e) { run(x, e); });
      if (engine < 0) return run(x, 0);  // nothing could be timed (a graph capture): engine 0, measured by a later call
      EngineChoices::global().set(key, engine);
    }
    return run(x, engine);
  }
  const EngineChoices::Pick pick = EngineChoices::global().pick(key, engine_count());
  if (!pick.trial) return run(x, pick.engine);
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor y = run(x, pick.engine);
  EngineChoices::global().record_trial(key, pick.engine,
                                       std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return y;
}

FusedMlpCall::FusedMlpCall(at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
                           std::vector<double> fparams, std::optional<std::pair<int64_t, int64_t>> flatten,
                           bool needs_2d)
    // spec/fparams copied, not moved: argument evaluation order is unspecified.
    : FusedMlpCall(decode_mlp_spec(spec, fparams), std::move(packed), std::move(weights), spec, fparams, flatten,
                   needs_2d) {}

FusedMlpCall::FusedMlpCall(const kernels::MlpDesc& d, at::Tensor packed, std::vector<at::Tensor> weights,
                           std::vector<int64_t> spec, std::vector<double> fparams,
                           std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d)
    : FusedCall(0, "seqfuse::mlp_forward", std::move(packed), std::move(weights), std::move(spec), std::move(fparams),
                scalar_type_of(d.dtype)),
      flatten_(flatten), needs_2d_(needs_2d), in_features_(d.in_features), macs_per_row_(d.macs_per_row),
      has_linear_(d.has_linear) {}

int FusedMlpCall::engine_for(int64_t rows) const {
  if (!has_linear_ || rows * macs_per_row_ < kTuneMinMacs) return 0;
  return measured_engine(rows, {});
}

std::optional<FusedCall::Shape> FusedMlpCall::prepare(at::Tensor& x) const {
  if (flatten_) x = x.flatten(flatten_->first, flatten_->second);
  if (needs_2d_ && x.dim() != 2) return std::nullopt;
  const int64_t rows = x.dim() > 0 && in_features_ > 0 ? x.numel() / in_features_ : 0;
  return Shape{rows * macs_per_row_, rows, {}, has_linear_};
}

FusedConvCall::FusedConvCall(at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
                             std::vector<double> fparams)
    // spec/fparams copied, not moved: argument evaluation order is unspecified.
    : FusedConvCall(decode_conv_spec(spec, fparams), std::move(packed), std::move(weights), spec, fparams) {}

FusedConvCall::FusedConvCall(kernels::ConvDesc d, at::Tensor packed, std::vector<at::Tensor> weights,
                             std::vector<int64_t> spec, std::vector<double> fparams)
    : FusedCall(1, "seqfuse::conv_forward", std::move(packed), std::move(weights), std::move(spec),
                std::move(fparams), scalar_type_of(d.dtype)),
      desc_(std::move(d)) {
  for (const auto& st : desc_.stages) {
    has_conv_ = has_conv_ || st.kind == kernels::ConvStageKind::Conv;
    has_winograd_ = has_winograd_ || st.winograd_offset >= 0;
  }
}

std::optional<FusedCall::Shape> FusedConvCall::prepare(at::Tensor& x) const {
  if (x.dim() != 4 || x.size(0) == 0) return std::nullopt;
  const int64_t h = x.size(2), w = x.size(3);
  int64_t macs = 0;
  if (x.size(1) == desc_.in_channels) {
    try {
      macs = x.size(0) * kernels::resolve_conv_geometry(desc_, h, w).macs_per_image;
    } catch (const std::invalid_argument&) {
      macs = 0;  // the op reports the bad shape
    }
  }
  // A large map costs engine 0 its layout conversion whatever the arithmetic
  // (a squeeze-excitation's global pool of a 112x112 map): count the input's
  // values too, so such calls are measured against engine 2, which reads it as it is.
  macs = std::max(macs, 16 * x.numel());
  // The input's layout is part of the class: which engine wins depends on it.
  const int64_t channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return Shape{macs, x.size(0), {h, w, channels_last}, has_conv_};
}

// On CUDA every engine number runs the one path (cuDNN + epilogue): nothing to measure.
int FusedConvCall::engine_count() const {
  if (!packed().device().is_cpu()) return 1;
  if (desc_.dtype == kernels::DType::BFloat16) return 2;
  return has_winograd_ ? 4 : 3;  // engine 3 only where a stage has a Winograd weight
}

}  // namespace seqfuse
