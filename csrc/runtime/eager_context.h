// needs_eager_context: the calling contexts no fused op can serve, whatever
// the plan (read by the plan guard and by the Python front).
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace seqfuse {

// Calls the fused ops cannot serve, whatever the plan: inside a torch.func
// transform (vmap, grad, jvp: tensors are functorch wrappers), under a
// TorchFunctionMode (including `with torch.device(...)`), or with a
// forward-mode tangent on the input (the ops have no forward-AD formula).
bool needs_eager_context(py::handle input);

}  // namespace seqfuse
