// The bound fused training call: FusedTrainCall (one fused segment's
// training op and running-statistics update, bound to its live parameters).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace seqfuse {

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
                 std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d);

  // Empty result: this input takes the eager path (a tensor subclass, another
  // dtype/device/layout, a device the training ops have no kernels for, an
  // empty batch, or a shape the op does not serve).
  std::optional<at::Tensor> try_call(py::handle input) const;

  // try_call for Python: None for the eager path, c10::Errors as Python exceptions.
  py::object call(py::handle input) const;

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
  at::Device device_;  // the segment's device: its tensors' (the planner gives them one)
  bool device_served_;  // the ops have kernels for device_ (a backend may lack the training ops)
};

}  // namespace seqfuse
