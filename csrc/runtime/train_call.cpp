// FusedTrainCall (see train_call.h).
#include "runtime/train_call.h"

#include <c10/core/TensorOptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <initializer_list>

#include "runtime/python_errors.h"
#include "adapters/spec_adapter.h"

namespace seqfuse {
namespace {

// The device of a segment's bound tensors: the first parameter's, else the
// first running statistic's. Every fused segment binds one (a Linear or Conv2d
// weight, or a BatchNorm's parameters or statistics); the CPU for none.
at::Device segment_device(std::initializer_list<const std::vector<at::Tensor>*> lists) {
  for (const auto* list : lists)
    for (const at::Tensor& t : *list)
      if (t.defined()) return t.device();
  return at::Device(at::kCPU);
}

// Whether `op` has a kernel of its own for strided tensors of this dtype on `device`.
template <typename Sig>
bool has_kernel(const c10::TypedOperatorHandle<Sig>& op, at::ScalarType dtype, at::Device device) {
  return op.hasKernelForDispatchKey(c10::computeDispatchKey(dtype, at::kStrided, device));
}

}  // namespace

FusedTrainCall::FusedTrainCall(const std::string& op, std::vector<at::Tensor> params, std::vector<at::Tensor> running,
                               std::vector<int64_t> spec, std::vector<double> fparams,
                               std::vector<at::Tensor> update_buffers, std::vector<int64_t> update_stages,
                               std::vector<double> momentum, std::optional<std::pair<int64_t, int64_t>> flatten,
                               bool needs_2d)
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
      needs_2d_(needs_2d), dtype_(scalar_type_of(static_cast<kernels::DType>(spec_.at(1)))),
      device_(segment_device({&params_, &running_, &update_buffers_})),
      device_served_(has_kernel(forward_, dtype_, device_) &&
                     (update_stages_.empty() || has_kernel(update_, dtype_, device_))) {}

std::optional<at::Tensor> FusedTrainCall::try_call(py::handle input) const {
  if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
  at::Tensor x = THPVariable_Unpack(input.ptr());
  if (x.scalar_type() != dtype_ || x.device() != device_ || !device_served_ || x.layout() != at::kStrided ||
      x.numel() == 0)
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

py::object FusedTrainCall::call(py::handle input) const {
  try {
    std::optional<at::Tensor> y = try_call(input);
    return y ? py::reinterpret_steal<py::object>(THPVariable_Wrap(*y)) : py::none();
  } catch (const c10::Error& e) {
    rethrow_as_python(e);
  }
}

}  // namespace seqfuse
