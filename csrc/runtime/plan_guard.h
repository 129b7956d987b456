// The plan guard: PlanGuard decides on every forward whether a cached plan is
// still valid and which route its fused segments take, and runs the whole
// forward of a one-segment plan.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "runtime/fused_call.h"
#include "runtime/train_call.h"

namespace seqfuse {

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
            std::vector<at::Tensor> all_parameters, py::list global_hook_dicts, bool batch_stats);

  // Plans that are one fused segment register it here: run() then does the
  // whole forward in one call from Python.
  void set_single_fused(std::shared_ptr<FusedCall> call) { single_ = std::move(call); }
  void set_single_train(std::shared_ptr<FusedTrainCall> call) { single_train_ = std::move(call); }

  // The forward of a single-segment plan when the plan is valid and the call
  // may run fused (inference or training route); None otherwise (also on any
  // error: the Python path then repeats the call and reports the error with
  // eager's wording; a failed training call has changed nothing).
  py::object run(py::handle input) const;

  // Which route a call takes (a Route; Python reads the values from
  // seqfuse._C.vocabulary()). The training ops read the parameters as they
  // are, so edits to parameter values (optimizer steps) re-plan only for the
  // inference ops' packing.
  enum Route : int {
    kStale = 0,      // re-plan
    kInference = 1,  // valid: fused segments run the inference ops
    kEager = 2,      // valid, but fused modules run eagerly (a forward-mode tangent, a torch.func transform,
                     // autocast; inference under CPU bfloat16 autocast runs bfloat16 runs instead)
    kTrain = 3,      // valid: fused segments run the training ops (the call needs autograd, or a BatchNorm uses
                     // batch statistics)
  };
  int check(py::handle input) const;

 private:
  struct Child {
    py::object module;
    PyTypeObject* type;
    py::dict attrs;  // the instance __dict__
    std::vector<py::object> attr_values;
    std::vector<std::pair<py::dict, Py_ssize_t>> sized;               // hook dicts
    std::vector<std::pair<py::dict, std::vector<py::object>>> tables;  // _parameters, _buffers

    bool unchanged() const;
  };

  static Child snapshot_child(py::handle module);

  struct WatchedTensor {
    at::Tensor tensor;
    int64_t version;
    const void* data;
    bool requires_grad;
    // Inference tensors carry no version counter: an in-place edit of one is
    // invisible, so a plan over them is never reused.
    bool unchanged() const;
  };

  static WatchedTensor snapshot_tensor(const at::Tensor& t);

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

}  // namespace seqfuse
