// PlanGuard (see plan_guard.h).
#include "runtime/plan_guard.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <optional>
#include <string>

#include "runtime/eager_context.h"

namespace seqfuse {
namespace {

bool same_sequence(const py::dict& d, const std::vector<py::object>& values) {
  if (PyDict_GET_SIZE(d.ptr()) != static_cast<Py_ssize_t>(values.size())) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(d.ptr(), &pos, &key, &value))
    if (value != values[i++].ptr()) return false;
  return true;
}

}  // namespace

PlanGuard::PlanGuard(py::dict modules, py::list children, std::vector<at::Tensor> fused_tensors,
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

py::object PlanGuard::run(py::handle input) const {
  if (!single_ && !single_train_) return py::none();
  const int route = check(input);
  try {
    std::optional<at::Tensor> y;
    if (route == kInference && single_) y = single_->try_call(input);
    if (route == kTrain && single_train_) y = single_train_->try_call(input);
    if (y) return py::reinterpret_steal<py::object>(THPVariable_Wrap(*y));
  } catch (const std::exception&) {
    PyErr_Clear();  // the Python path repeats the call and raises properly
  }
  return py::none();
}

int PlanGuard::check(py::handle input) const {
  if (!same_sequence(modules_, module_values_)) return kStale;
  for (const Child& c : children_)
    if (!c.unchanged()) return kStale;
  bool values_changed = false;
  for (const WatchedTensor& w : tensors_) {
    if (w.tensor.requires_grad() != w.requires_grad) return kStale;
    values_changed = values_changed || !w.unchanged();
    if (w.tensor._fw_grad(/*level=*/0).defined()) return kEager;  // forward-mode tangent on a parameter
  }
  for (const auto& [t, rg] : grad_tensors_)
    if (t.requires_grad() != rg) return kStale;
  for (const auto& [d, size] : global_hooks_)
    if (PyDict_GET_SIZE(d.ptr()) != size) return kStale;
  // Under autocast eager computes in the autocast dtype: the modules run
  // eagerly, except where inference under CPU autocast runs a segment's
  // bfloat16 run (container._FusedRun.run_autocast), which is packed from the
  // values: a changed value re-plans then (not with autograd on, where the
  // modules run eagerly and read the values as they are).
  if (at::autocast::is_autocast_enabled(at::kCPU) || at::autocast::is_autocast_enabled(at::kCUDA))
    return values_changed && !at::GradMode::is_enabled() ? kStale : kEager;
  if (needs_eager_context(input)) return kEager;
  if (batch_stats_) return kTrain;
  if (at::GradMode::is_enabled()) {
    if (any_requires_grad_) return kTrain;
    if (THPVariable_Check(input.ptr()) && THPVariable_Unpack(input.ptr()).requires_grad()) return kTrain;
  }
  return values_changed ? kStale : kInference;
}

bool PlanGuard::Child::unchanged() const {
  if (Py_TYPE(module.ptr()) != type) return false;
  if (!same_sequence(attrs, attr_values)) return false;
  for (const auto& [d, size] : sized)
    if (PyDict_GET_SIZE(d.ptr()) != size) return false;
  for (const auto& [d, values] : tables)
    if (!same_sequence(d, values)) return false;
  return true;
}

PlanGuard::Child PlanGuard::snapshot_child(py::handle module) {
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

bool PlanGuard::WatchedTensor::unchanged() const {
  auto* impl = tensor.unsafeGetTensorImpl();
  return !impl->is_inference() && impl->version_counter().current_version() == version &&
         tensor.const_data_ptr() == data && tensor.requires_grad() == requires_grad;
}

PlanGuard::WatchedTensor PlanGuard::snapshot_tensor(const at::Tensor& t) {
  auto* impl = t.unsafeGetTensorImpl();
  return {t, impl->is_inference() ? 0 : static_cast<int64_t>(impl->version_counter().current_version()),
          t.const_data_ptr(), t.requires_grad()};
}

}  // namespace seqfuse
