// The residual addition that closes a captured chain, relu(chain(x) + identity),
// in one call from Python (seqfuse/capture/rewrite.py, Chain.__call__).
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace seqfuse {

// y += residual in place, then y.relu_() when `relu`, and returns y: when y
// and residual are plain tensors (no subclass) of one shape and dtype, y is
// not x and is no view, autograd records nothing for them (grad mode off,
// or neither requires grad), and no torch.func transform, TorchFunctionMode
// or forward-mode tangent is active. Otherwise None, and the caller runs its
// general path. Between fused calls the same checks in Python touch a
// dozen tensor attributes, each a cache miss after the kernels ran: ~15 us
// a block.
py::object add_residual_(py::handle y, py::handle residual, py::handle x, bool relu);

}  // namespace seqfuse
