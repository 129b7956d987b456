// add_residual_ (see residual.h).
#include "runtime/residual.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

#include "runtime/eager_context.h"

namespace seqfuse {

py::object add_residual_(py::handle y_obj, py::handle r_obj, py::handle x_obj, bool relu) {
  if (y_obj.ptr() == x_obj.ptr() || !THPVariable_CheckExact(y_obj.ptr()) || !THPVariable_CheckExact(r_obj.ptr()))
    return py::none();
  if (needs_eager_context(y_obj) || needs_eager_context(r_obj)) return py::none();
  at::Tensor y = THPVariable_Unpack(y_obj.ptr());
  const at::Tensor& r = THPVariable_Unpack(r_obj.ptr());
  if (at::GradMode::is_enabled() && (y.requires_grad() || r.requires_grad())) return py::none();
  if (y.is_view() || y.sizes() != r.sizes() || y.scalar_type() != r.scalar_type()) return py::none();
  {
    py::gil_scoped_release no_gil;
    y.add_(r);
    if (relu) y.relu_();
  }
  return py::reinterpret_borrow<py::object>(y_obj);
}

}  // namespace seqfuse
