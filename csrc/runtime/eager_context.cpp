// needs_eager_context (see eager_context.h).
#include "runtime/eager_context.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

namespace seqfuse {

bool needs_eager_context(py::handle input) {
  // functorch includes its front-mode key in the thread's dispatch keys while a transform is active.
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) return true;
  // A TorchFunctionMode must see the stock modules' torch calls.
  if (at::impl::torch_function_mode_enabled()) return true;
  return THPVariable_Check(input.ptr()) && THPVariable_Unpack(input.ptr())._fw_grad(/*level=*/0).defined();
}

}  // namespace seqfuse
