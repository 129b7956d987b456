// The seqfuse._C Python module. Importing it loads the operator library
// (ops.cpp and the backend registrations linked into the same shared object).
// It also carries what the Python front needs at C speed: the plan guard that
// decides on every forward whether a cached plan is still valid, and a few
// introspection helpers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "kernels/fma_peak.h"
#include "kernels/mlp_forward.h"
#include "spec_adapter.h"

namespace seqfuse {
namespace {

// Calls the fused ops cannot serve, whatever the plan: inside a torch.func
// transform (vmap, grad, jvp: tensors are functorch wrappers), under a
// TorchFunctionMode (including `with torch.device(...)`), or with a
// forward-mode tangent on the input (the ops have no forward-AD formula).
bool needs_eager_context(py::handle input) {
  // functorch includes its front-mode key in the thread's dispatch keys while a transform is active.
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) return true;
  // A TorchFunctionMode must see the stock modules' torch calls.
  if (at::impl::torch_function_mode_enabled()) return true;
  return THPVariable_Check(input.ptr()) && THPVariable_Unpack(input.ptr())._fw_grad(/*level=*/0).defined();
}

// Raises a c10::Error as the Python exception type torch would use.
[[noreturn]] void rethrow_as_python(const c10::Error& e) {
  const std::string msg = e.what_without_backtrace();
  if (dynamic_cast<const c10::TypeError*>(&e)) throw py::type_error(msg);
  if (dynamic_cast<const c10::ValueError*>(&e)) throw py::value_error(msg);
  if (dynamic_cast<const c10::IndexError*>(&e)) throw py::index_error(msg);
  throw std::runtime_error(msg);
}

// Which engine runs a call: -1 lets FusedMlpCall decide (by measurement), 0 or
// 1 forces one (tests, studies). Process-wide.
std::atomic<int>& engine_override() {
  static std::atomic<int> value{-1};
  return value;
}

// One fused segment bound to its packed parameters: calling it runs its op
// (seqfuse::mlp_forward or seqfuse::conv_forward) through the dispatcher (so
// profiling, autograd and every other dispatch key see it) without the
// per-call argument parsing of a torch.ops call from Python.
//
// For calls big enough that the engine matters, the first call of each shape
// class (batch size bucketed by powers of two; for conv runs also the spatial
// size) times both engines and keeps the faster one for that class and thread
// count. Choices are shared by every segment with the same spec (shapes,
// dtype, stages), so re-planning after a parameter update never measures again.
class EngineChoices {
 public:
  // (op, shape key, bucket, threads): the op tells an MLP spec from a conv one.
  using Key = std::tuple<int, std::vector<int64_t>, int, int>;
  // -1 when not measured yet.
  int get(const Key& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = choices_.find(key);
    return it == choices_.end() ? -1 : it->second;
  }
  void set(const Key& key, int engine) {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_[key] = engine;
  }
  // (shape key, bucket, threads, engine) for every key of `op` starting with `prefix`.
  std::vector<std::tuple<std::vector<int64_t>, int, int, int>> with_prefix(int op,
                                                                           const std::vector<int64_t>& prefix) const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::tuple<std::vector<int64_t>, int, int, int>> out;
    for (const auto& [key, engine] : choices_) {
      const auto& shape = std::get<1>(key);
      if (std::get<0>(key) == op && shape.size() >= prefix.size() &&
          std::equal(prefix.begin(), prefix.end(), shape.begin()))
        out.emplace_back(shape, std::get<2>(key), std::get<3>(key), engine);
    }
    return out;
  }
  static EngineChoices& global() {
    static EngineChoices instance;
    return instance;
  }

 private:
  mutable std::mutex mutex_;
  std::map<Key, int> choices_;
};

class FusedCall {
 public:
  // Below this many multiply-adds per call the fused kernel always wins: the
  // per-layer engine pays an ATen call and a memory round trip per stage.
  static constexpr int64_t kTuneMinMacs = int64_t{1} << 20;
  // Releasing the GIL costs ~0.1 us: worth it only for calls that compute longer.
  static constexpr int64_t kReleaseGilMacs = int64_t{1} << 16;
  static constexpr int kBuckets = 64;

  virtual ~FusedCall() = default;

  // Empty result: this input must take the eager path (a shape the op does
  // not serve, or input that is not a tensor).
  //
  // Inputs the kernels do not serve also go eagerly, silently: tensor
  // subclasses (their __torch_function__ must run), a dtype, device or layout
  // other than the segment's (a mixed-precision model feeding a float32
  // BatchNorm a bfloat16 activation; meta, sparse or mkldnn tensors), and an
  // input that requires grad under grad mode (it may come from an eager
  // module in front of this segment; the op has no autograd formula).
  std::optional<at::Tensor> try_call(py::handle input) {
    if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
    at::Tensor x = THPVariable_Unpack(input.ptr());
    if (x.scalar_type() != dtype_ || x.device() != packed_.device() || x.layout() != at::kStrided) return std::nullopt;
    if (x.requires_grad() && at::GradMode::is_enabled()) return std::nullopt;
    std::optional<Shape> shape = prepare(x);
    if (!shape) return std::nullopt;
    // Other Python threads may run while a call of real size computes.
    std::optional<py::gil_scoped_release> no_gil;
    if (shape->macs >= kReleaseGilMacs) no_gil.emplace();
    int engine = engine_override().load(std::memory_order_relaxed);
    if (engine < 0) engine = choose_engine(x, *shape);
    else engine = std::min(engine, engine_count() - 1);  // an override past this op's engines: its last
    return run(x, engine);
  }

  py::object call(py::handle input) {
    try {
      std::optional<at::Tensor> y = try_call(input);
      return y ? py::reinterpret_steal<py::object>(THPVariable_Wrap(*y)) : py::none();
    } catch (const c10::Error& e) {
      rethrow_as_python(e);
    }
  }

  const at::Tensor& packed() const { return packed_; }

  // What has been measured for this segment's shapes: (min batch, max batch,
  // threads, engine, extra shape key: (H, W) for conv runs, () for MLP runs).
  std::vector<std::tuple<int64_t, int64_t, int, int, std::vector<int64_t>>> measured_engines() const {
    std::vector<std::tuple<int64_t, int64_t, int, int, std::vector<int64_t>>> out;
    for (const auto& [key, b, threads, engine] : EngineChoices::global().with_prefix(op_kind_, spec_))
      out.emplace_back(int64_t{1} << (b - 1), (int64_t{1} << b) - 1, threads, engine,
                       std::vector<int64_t>(key.begin() + static_cast<int64_t>(spec_.size()), key.end()));
    return out;
  }

 protected:
  FusedCall(int op_kind, const char* op_name, at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
            std::vector<double> fparams, at::ScalarType dtype)
      : op_kind_(op_kind),
        op_(c10::Dispatcher::singleton()
                .findSchemaOrThrow(op_name, "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef,
                                  at::ArrayRef<double>, int64_t)>()),
        packed_(std::move(packed)), weights_(std::move(weights)), spec_(std::move(spec)),
        fparams_(std::move(fparams)), dtype_(dtype) {}

  // The size of a call and its engine-choice class.
  struct Shape {
    int64_t macs;
    int64_t batch;              // bucketed by powers of two
    std::vector<int64_t> extra;  // further shape key (conv: H, W)
    bool tunable;               // both engines can run it
  };
  // nullopt: this input runs eagerly. May reshape x (a flatten view).
  virtual std::optional<Shape> prepare(at::Tensor& x) const = 0;
  // How many engines the op offers for this segment (all measured).
  static constexpr int kMaxEngines = 3;
  virtual int engine_count() const { return 2; }

  at::Tensor run(const at::Tensor& x, int engine) const {
    return op_.call(x, packed_, weights_, spec_, fparams_, engine);
  }

  // The measured engine for a shape class, -1 when not measured yet.
  int measured_engine(int64_t batch, const std::vector<int64_t>& extra) const {
    std::vector<int64_t> key_shape = spec_;
    key_shape.insert(key_shape.end(), extra.begin(), extra.end());
    return EngineChoices::global().get({op_kind_, std::move(key_shape), bucket(batch), at::get_num_threads()});
  }

 private:
  static int bucket(int64_t rows) { return rows <= 0 ? 0 : std::min(kBuckets - 1, 64 - __builtin_clzll(rows)); }

  int choose_engine(const at::Tensor& x, const Shape& shape) {
    if (!shape.tunable || shape.macs < kTuneMinMacs) return 0;
    const int known = measured_engine(shape.batch, shape.extra);
    if (known >= 0) return known;
    std::vector<int64_t> key_shape = spec_;
    key_shape.insert(key_shape.end(), shape.extra.begin(), shape.extra.end());
    const EngineChoices::Key key{op_kind_, std::move(key_shape), bucket(shape.batch), at::get_num_threads()};
    // Measure: alternate the engines after one warm-up each; median of 3, or
    // one timing each for calls long enough (> 20 ms) to be stable.
    using clock = std::chrono::steady_clock;
    auto timed = [&](int e) {
      const auto t0 = clock::now();
      run(x, e);
      return std::chrono::duration<double>(clock::now() - t0).count();
    };
    const int n = engine_count();
    double warm = 0;
    for (int e = 0; e < n; ++e) warm = std::max(warm, timed(e));
    const int reps = warm > 0.02 ? 1 : 3;
    double times[kMaxEngines][3];
    for (int rep = 0; rep < reps; ++rep)
      for (int e = 0; e < n; ++e) times[e][rep] = timed(e);
    int best = 0;
    for (int e = 0; e < n; ++e) {
      std::sort(times[e], times[e] + reps);
      if (times[e][reps / 2] < times[best][reps / 2]) best = e;
    }
    EngineChoices::global().set(key, best);
    return best;
  }

  int op_kind_;  // 0: seqfuse::mlp_forward, 1: seqfuse::conv_forward
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef,
                                      at::ArrayRef<double>, int64_t)>
      op_;
  at::Tensor packed_;
  std::vector<at::Tensor> weights_;
  std::vector<int64_t> spec_;
  std::vector<double> fparams_;
  at::ScalarType dtype_;
};

// A fused MLP segment: rows of the input's last dimension.
class FusedMlpCall final : public FusedCall {
 public:
  FusedMlpCall(at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
               std::vector<double> fparams, std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d)
      // spec/fparams copied, not moved: argument evaluation order is unspecified.
      : FusedMlpCall(decode_mlp_spec(spec, fparams), std::move(packed), std::move(weights), spec, fparams, flatten,
                     needs_2d) {}

  // The engine the next call with `rows` rows will use (-1: not measured yet).
  int engine_for(int64_t rows) const {
    if (!has_linear_ || rows * macs_per_row_ < kTuneMinMacs) return 0;
    return measured_engine(rows, {});
  }

 private:
  FusedMlpCall(const kernels::MlpDesc& d, at::Tensor packed, std::vector<at::Tensor> weights,
               std::vector<int64_t> spec, std::vector<double> fparams,
               std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d)
      : FusedCall(0, "seqfuse::mlp_forward", std::move(packed), std::move(weights), std::move(spec), std::move(fparams),
                  scalar_type_of(d.dtype)),
        flatten_(flatten), needs_2d_(needs_2d), in_features_(d.in_features), macs_per_row_(d.macs_per_row),
        has_linear_(d.has_linear) {}

  // 3-D input to a run with BatchNorm1d runs eagerly (it normalizes dim 1).
  std::optional<Shape> prepare(at::Tensor& x) const override {
    if (flatten_) x = x.flatten(flatten_->first, flatten_->second);
    if (needs_2d_ && x.dim() != 2) return std::nullopt;
    const int64_t rows = x.dim() > 0 && in_features_ > 0 ? x.numel() / in_features_ : 0;
    return Shape{rows * macs_per_row_, rows, {}, has_linear_};
  }

  std::optional<std::pair<int64_t, int64_t>> flatten_;
  bool needs_2d_;
  int64_t in_features_;
  int64_t macs_per_row_;
  bool has_linear_;
};

// A fused conv segment: 4-D (N, C, H, W) input with N > 0; anything else (an
// unbatched 3-D input, which Conv2d accepts) runs eagerly.
class FusedConvCall final : public FusedCall {
 public:
  FusedConvCall(at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
                std::vector<double> fparams)
      // spec/fparams copied, not moved: argument evaluation order is unspecified.
      : FusedConvCall(decode_conv_spec(spec, fparams), std::move(packed), std::move(weights), spec, fparams) {}

 private:
  FusedConvCall(kernels::ConvDesc d, at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
                std::vector<double> fparams)
      : FusedCall(1, "seqfuse::conv_forward", std::move(packed), std::move(weights), std::move(spec),
                  std::move(fparams), scalar_type_of(d.dtype)),
        desc_(std::move(d)) {
    for (const auto& st : desc_.stages) has_conv_ = has_conv_ || st.kind == kernels::ConvStageKind::Conv;
  }

  // An empty batch runs eagerly too: there is nothing to compute, and eager's
  // output strides for it are each op's own choice.
  std::optional<Shape> prepare(at::Tensor& x) const override {
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

  // Engine 2 (ATen in the input's layout) serves float32 and float64 runs.
  int engine_count() const override { return desc_.dtype == kernels::DType::BFloat16 ? 2 : 3; }

  kernels::ConvDesc desc_;
  bool has_conv_ = false;
};

// A fused segment's training route, bound to its live parameters: one
// seqfuse::{mlp,conv}_train_forward call through the dispatcher (so autograd
// records its fused backward) and, when BatchNorms update running statistics,
// one seqfuse::update_running_stats call with the statistics it returned.
class FusedTrainCall {
 public:
  using ForwardSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(const at::Tensor&, at::TensorList, at::TensorList,
                                                                     at::IntArrayRef, at::ArrayRef<double>);
  FusedTrainCall(const std::string& op, std::vector<at::Tensor> params, std::vector<at::Tensor> running,
                 std::vector<int64_t> spec, std::vector<double> fparams, std::vector<at::Tensor> update_buffers,
                 std::vector<int64_t> update_stages, std::vector<double> momentum,
                 std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d)
      : conv_(op == "conv"),
        forward_(c10::Dispatcher::singleton()
                     .findSchemaOrThrow(conv_ ? "seqfuse::conv_train_forward" : "seqfuse::mlp_train_forward", "")
                     .typed<ForwardSig>()),
        update_(c10::Dispatcher::singleton()
                    .findSchemaOrThrow("seqfuse::update_running_stats", "")
                    .typed<void(at::TensorList, at::TensorList, at::ArrayRef<double>)>()),
        params_(std::move(params)), running_(std::move(running)), spec_(std::move(spec)),
        fparams_(std::move(fparams)), update_buffers_(std::move(update_buffers)),
        update_stages_(std::move(update_stages)), momentum_(std::move(momentum)), flatten_(flatten),
        needs_2d_(needs_2d), dtype_(scalar_type_of(static_cast<kernels::DType>(spec_.at(1)))) {}

  // Empty result: this input takes the eager path (a tensor subclass, another
  // dtype/device/layout, an empty batch, or a shape the op does not serve).
  std::optional<at::Tensor> try_call(py::handle input) const {
    if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
    at::Tensor x = THPVariable_Unpack(input.ptr());
    if (x.scalar_type() != dtype_ || !x.device().is_cpu() || x.layout() != at::kStrided || x.numel() == 0)
      return std::nullopt;
    if (conv_) {
      if (x.dim() != 4) return std::nullopt;
    } else {
      if (flatten_) x = x.flatten(flatten_->first, flatten_->second);
      if (needs_2d_ && x.dim() != 2) return std::nullopt;
    }
    std::optional<py::gil_scoped_release> no_gil;
    if (x.numel() >= kReleaseGilElements) no_gil.emplace();
    auto [y, saved] = forward_.call(x, params_, running_, spec_, fparams_);
    if (!update_stages_.empty()) {
      std::vector<at::Tensor> stats;
      for (int64_t i : update_stages_) stats.push_back(saved.at(static_cast<size_t>(3 * i + 2)));
      update_.call(update_buffers_, stats, momentum_);
    }
    return y;
  }

  py::object call(py::handle input) const {
    try {
      std::optional<at::Tensor> y = try_call(input);
      return y ? py::reinterpret_steal<py::object>(THPVariable_Wrap(*y)) : py::none();
    } catch (const c10::Error& e) {
      rethrow_as_python(e);
    }
  }

 private:
  static constexpr int64_t kReleaseGilElements = int64_t{1} << 14;
  bool conv_;
  c10::TypedOperatorHandle<ForwardSig> forward_;
  c10::TypedOperatorHandle<void(at::TensorList, at::TensorList, at::ArrayRef<double>)> update_;
  std::vector<at::Tensor> params_, running_;
  std::vector<int64_t> spec_;
  std::vector<double> fparams_;
  std::vector<at::Tensor> update_buffers_;
  std::vector<int64_t> update_stages_;
  std::vector<double> momentum_;
  std::optional<std::pair<int64_t, int64_t>> flatten_;
  bool needs_2d_;
  at::ScalarType dtype_;
};

// Everything a cached plan depends on, snapshotted when the plan is built and
// compared on each call. A mismatch anywhere means "re-plan"; the check never
// has to be exact in the other direction (a harmless change may re-plan).
//
// - the container's children, by identity and order;
// - each child's class and its whole instance __dict__ by value identity
//   (training flag, config such as eps or negative_slope, an instance-level
//   forward), the sizes of its hook dicts, and its _parameters/_buffers
//   entries by identity;
// - each fused tensor's version counter (in-place edits, optimizer steps),
//   data pointer (.data swaps, .to()) and requires_grad;
// - requires_grad of every parameter of the container, and whether the global
//   module hooks are empty.
class PlanGuard {
 public:
  PlanGuard(py::dict modules, py::list children, std::vector<at::Tensor> fused_tensors,
            std::vector<at::Tensor> all_parameters, py::list global_hook_dicts, bool batch_stats)
      : modules_(modules), batch_stats_(batch_stats) {
    for (auto v : modules) module_values_.push_back(py::reinterpret_borrow<py::object>(v.second));
    for (py::handle child : children) children_.push_back(snapshot_child(child));
    for (const at::Tensor& t : fused_tensors) tensors_.push_back(snapshot_tensor(t));
    for (const at::Tensor& t : all_parameters) {
      grad_tensors_.push_back({t, t.requires_grad()});
      any_requires_grad_ = any_requires_grad_ || t.requires_grad();
    }
    for (py::handle d : global_hook_dicts)
      global_hooks_.push_back({py::reinterpret_borrow<py::dict>(d), PyDict_GET_SIZE(d.ptr())});
  }

  // Plans that are one fused segment register it here: run() then does the
  // whole forward in one call from Python.
  void set_single_fused(std::shared_ptr<FusedCall> call) { single_ = std::move(call); }
  void set_single_train(std::shared_ptr<FusedTrainCall> call) { single_train_ = std::move(call); }

  // The forward of a single-segment plan when the plan is valid and the call
  // may run fused (inference or training route); None otherwise (also on any
  // error: the Python path then repeats the call and reports the error with
  // eager's wording; a failed training call has changed nothing).
  py::object run(py::handle input) const {
    if (!single_ && !single_train_) return py::none();
    const int route = check(input);
    try {
      std::optional<at::Tensor> y;
      if (route == 1 && single_) y = single_->try_call(input);
      if (route == 3 && single_train_) y = single_train_->try_call(input);
      if (y) return py::reinterpret_steal<py::object>(THPVariable_Wrap(*y));
    } catch (const std::exception&) {
      PyErr_Clear();  // the Python path repeats the call and raises properly
    }
    return py::none();
  }

  // 0: stale, re-plan. 1: valid, fused segments run the inference ops.
  // 2: valid, but fused modules must run eagerly (a forward-mode tangent, a
  // torch.func transform, autocast). 3: valid, fused segments run the
  // training ops: the call needs autograd (grad mode on and a parameter or
  // the input requires grad) or a BatchNorm uses batch statistics. The
  // training ops read the parameters as they are, so edits to parameter
  // values (optimizer steps) re-plan only for the inference ops' packing.
  int check(py::handle input) const {
    if (!same_sequence(modules_, module_values_)) return 0;
    for (const Child& c : children_)
      if (!c.unchanged()) return 0;
    bool values_changed = false;
    for (const WatchedTensor& w : tensors_) {
      if (w.tensor.requires_grad() != w.requires_grad) return 0;
      values_changed = values_changed || !w.unchanged();
      if (w.tensor._fw_grad(/*level=*/0).defined()) return 2;  // forward-mode tangent on a parameter
    }
    for (const auto& [t, rg] : grad_tensors_)
      if (t.requires_grad() != rg) return 0;
    for (const auto& [d, size] : global_hooks_)
      if (PyDict_GET_SIZE(d.ptr()) != size) return 0;
    // Under autocast eager computes in the autocast dtype: run eagerly.
    if (at::autocast::is_autocast_enabled(at::kCPU) || at::autocast::is_autocast_enabled(at::kCUDA)) return 2;
    if (needs_eager_context(input)) return 2;
    if (batch_stats_) return 3;
    if (at::GradMode::is_enabled()) {
      if (any_requires_grad_) return 3;
      if (THPVariable_Check(input.ptr()) && THPVariable_Unpack(input.ptr()).requires_grad()) return 3;
    }
    return values_changed ? 0 : 1;
  }

 private:
  static bool same_sequence(const py::dict& d, const std::vector<py::object>& values) {
    if (PyDict_GET_SIZE(d.ptr()) != static_cast<Py_ssize_t>(values.size())) return false;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(d.ptr(), &pos, &key, &value))
      if (value != values[i++].ptr()) return false;
    return true;
  }

  struct Child {
    py::object module;
    PyTypeObject* type;
    py::dict attrs;  // the instance __dict__
    std::vector<py::object> attr_values;
    std::vector<std::pair<py::dict, Py_ssize_t>> sized;               // hook dicts
    std::vector<std::pair<py::dict, std::vector<py::object>>> tables;  // _parameters, _buffers

    bool unchanged() const {
      if (Py_TYPE(module.ptr()) != type) return false;
      if (!same_sequence(attrs, attr_values)) return false;
      for (const auto& [d, size] : sized)
        if (PyDict_GET_SIZE(d.ptr()) != size) return false;
      for (const auto& [d, values] : tables)
        if (!same_sequence(d, values)) return false;
      return true;
    }
  };

  static Child snapshot_child(py::handle module) {
    Child c;
    c.module = py::reinterpret_borrow<py::object>(module);
    c.type = Py_TYPE(module.ptr());
    PyObject* dict = PyObject_GenericGetDict(module.ptr(), nullptr);  // None children have no __dict__
    if (!dict) {
      PyErr_Clear();
      return c;
    }
    c.attrs = py::reinterpret_steal<py::dict>(dict);
    for (auto item : c.attrs) {
      c.attr_values.push_back(py::reinterpret_borrow<py::object>(item.second));
      const std::string name = py::str(item.first);
      if (!PyDict_Check(item.second.ptr())) continue;
      auto d = py::reinterpret_borrow<py::dict>(item.second);
      if (name == "_parameters" || name == "_buffers") {
        std::vector<py::object> values;
        for (auto v : d) values.push_back(py::reinterpret_borrow<py::object>(v.second));
        c.tables.push_back({d, std::move(values)});
      } else if (name.find("hooks") != std::string::npos) {
        c.sized.push_back({d, PyDict_GET_SIZE(d.ptr())});
      }
    }
    return c;
  }

  struct WatchedTensor {
    at::Tensor tensor;
    int64_t version;
    const void* data;
    bool requires_grad;
    // Inference tensors carry no version counter: an in-place edit of one is
    // invisible, so a plan over them is never reused.
    bool unchanged() const {
      auto* impl = tensor.unsafeGetTensorImpl();
      return !impl->is_inference() && impl->version_counter().current_version() == version &&
             tensor.const_data_ptr() == data && tensor.requires_grad() == requires_grad;
    }
  };

  static WatchedTensor snapshot_tensor(const at::Tensor& t) {
    auto* impl = t.unsafeGetTensorImpl();
    return {t, impl->is_inference() ? 0 : static_cast<int64_t>(impl->version_counter().current_version()),
            t.const_data_ptr(), t.requires_grad()};
  }

  py::dict modules_;
  std::vector<py::object> module_values_;
  std::vector<Child> children_;
  std::vector<WatchedTensor> tensors_;
  std::vector<std::pair<at::Tensor, bool>> grad_tensors_;
  std::vector<std::pair<py::dict, Py_ssize_t>> global_hooks_;
  bool any_requires_grad_ = false;
  bool batch_stats_;  // a fused segment has a BatchNorm using batch statistics
  std::shared_ptr<FusedCall> single_;
  std::shared_ptr<FusedTrainCall> single_train_;
};

}  // namespace
}  // namespace seqfuse

PYBIND11_MODULE(_C, m) {
  using namespace seqfuse;
  m.doc() = "seqfuse native extension: operator registrations and plan guard";
  py::class_<FusedCall, std::shared_ptr<FusedCall>>(m, "FusedCall")
      .def("__call__", &FusedCall::call, py::arg("input"), "Runs the segment; None when this input must run eagerly.")
      .def("measured_engines", &FusedCall::measured_engines,
           "(min batch, max batch, threads, engine, (H, W) or ()) for every shape class measured so far.")
      .def_property_readonly("packed", &FusedCall::packed);
  py::class_<FusedMlpCall, FusedCall, std::shared_ptr<FusedMlpCall>>(m, "FusedMlpCall")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>,
                    std::optional<std::pair<int64_t, int64_t>>, bool>(),
           py::arg("packed"), py::arg("weights"), py::arg("spec"), py::arg("fparams"), py::arg("flatten"),
           py::arg("needs_2d"))
      .def("engine_for", &FusedMlpCall::engine_for, py::arg("rows"),
           "Engine for a call with this many rows: 0 fused kernel, 1 GEMM + fused epilogue, -1 not measured yet.");
  py::class_<FusedConvCall, FusedCall, std::shared_ptr<FusedConvCall>>(m, "FusedConvCall")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>(),
           py::arg("packed"), py::arg("weights"), py::arg("spec"), py::arg("fparams"));
  py::class_<FusedTrainCall, std::shared_ptr<FusedTrainCall>>(m, "FusedTrainCall")
      .def(py::init<const std::string&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<double>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>,
                    std::optional<std::pair<int64_t, int64_t>>, bool>(),
           py::arg("op"), py::arg("params"), py::arg("running"), py::arg("spec"), py::arg("fparams"),
           py::arg("update_buffers"), py::arg("update_stages"), py::arg("momentum"), py::arg("flatten"),
           py::arg("needs_2d"))
      .def("__call__", &FusedTrainCall::call, py::arg("input"),
           "Runs the segment's training op; None when this input must run eagerly.");
  m.def(
      "set_engine_override", [](int engine) { engine_override().store(engine); }, py::arg("engine"),
      "Force an engine for every fused MLP call (0 or 1), or -1 to choose by measurement.");
  py::class_<PlanGuard>(m, "PlanGuard")
      .def(py::init<py::dict, py::list, std::vector<at::Tensor>, std::vector<at::Tensor>, py::list, bool>())
      .def("check", &PlanGuard::check, py::arg("input"))
      .def("set_single_fused", &PlanGuard::set_single_fused)
      .def("set_single_train", &PlanGuard::set_single_train)
      .def("run", &PlanGuard::run, py::arg("input"));
  m.def(
      "needs_eager_context", [](py::handle input) { return needs_eager_context(input); }, py::arg("input"),
      "True inside a torch.func transform or for an input with a forward-mode tangent.");
  m.def(
      "conv_packed_nbytes",
      [](std::vector<int64_t> spec, std::vector<double> fparams) {
        return decode_conv_spec(spec, fparams).packed_bytes;
      },
      "Size in bytes of the buffer seqfuse::conv_pack returns for this spec.");
  m.def(
      "mlp_packed_nbytes",
      [](std::vector<int64_t> spec, std::vector<double> fparams) {
        return decode_mlp_spec(spec, fparams).packed_bytes;
      },
      "Size in bytes of the buffer seqfuse::mlp_pack returns for this spec.");
  m.def(
      "cpu_capability", [] { return std::string(kernels::isa_name(kernels::active_isa())); },
      "The CPU kernel variant in use: 'avx512', 'avx2' or 'baseline'.");
  m.def(
      "detected_cpu_capability", [] { return std::string(kernels::isa_name(kernels::detect_isa())); },
      "The best CPU kernel variant this CPU supports.");
  m.def(
      "set_cpu_capability",
      [](const std::string& name) {
        try {
          kernels::set_isa_override(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"), "Force a CPU kernel variant ('avx512', 'avx2', 'baseline'; '' for the detected one).");
  m.def("fma_peak_gflops", [](int threads, double seconds) { return kernels::fma_peak_gflops(threads, seconds); },
        py::arg("threads") = 1, py::arg("seconds") = 0.2, py::call_guard<py::gil_scoped_release>(),
        "Measured float32 FMA peak (GFLOP/s) of `threads` concurrent threads over ~`seconds`, best ISA of this CPU.");
}
