// The bound fused inference calls: FusedCall (one fused segment and its
// packed parameters, with the engine choice of its calls) and its MLP and conv
// segments, FusedMlpCall and FusedConvCall.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/conv_spec.h"
#include "kernels/mlp_spec.h"
#include "runtime/engine_choice.h"

namespace seqfuse {

// One fused segment bound to its packed parameters: calling it runs its op
// (seqfuse::mlp_forward or seqfuse::conv_forward) through the dispatcher (so
// profiling, autograd and every other dispatch key see it) without the
// per-call argument parsing of a torch.ops call from Python.
//
// The segment lives on its packed buffer's device (any device the op has
// kernels for); calls big enough that the engine matters run the engine
// chosen by measurement for their shape class on that device type (see
// EngineChoices).
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
  std::optional<at::Tensor> try_call(py::handle input);

  // try_call for Python: None for the eager path, c10::Errors as Python exceptions.
  py::object call(py::handle input);

  const at::Tensor& packed() const { return packed_; }

  // What has been measured for this segment's shapes on its device type:
  // (min batch, max batch, threads, engine, extra shape key: (H, W) for conv
  // runs, () for MLP runs).
  std::vector<std::tuple<int64_t, int64_t, int, int, std::vector<int64_t>>> measured_engines() const;

 protected:
  FusedCall(int op_kind, const char* op_name, at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
            std::vector<double> fparams, at::ScalarType dtype);

  // The size of a call and its engine-choice class.
  struct Shape {
    int64_t macs;
    int64_t batch;              // bucketed by powers of two
    std::vector<int64_t> extra;  // further shape key (conv: H, W)
    bool tunable;               // both engines can run it
  };
  // nullopt: this input runs eagerly. May reshape x (a flatten view).
  virtual std::optional<Shape> prepare(at::Tensor& x) const = 0;
  // How many engines the op offers for this segment (all measured; at most kMaxEngines).
  virtual int engine_count() const { return 2; }

  at::Tensor run(const at::Tensor& x, int engine) const;

  // The measured engine for a shape class, -1 when not measured yet.
  int measured_engine(int64_t batch, const std::vector<int64_t>& extra) const;

 private:
  static int bucket(int64_t rows) { return rows <= 0 ? 0 : std::min(kBuckets - 1, 64 - __builtin_clzll(rows)); }

  // The EngineChoices key of a shape class of this segment's calls.
  EngineChoices::Key choice_key(int64_t batch, const std::vector<int64_t>& extra) const;

  // Runs x on the engine chosen for its shape class (see EngineChoices): a
  // trial of one engine while the class is undecided on the CPU.
  std::optional<at::Tensor> run_chosen(const at::Tensor& x, const Shape& shape);

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
               std::vector<double> fparams, std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d);

  // The engine the next call with `rows` rows will use (-1: not measured yet).
  int engine_for(int64_t rows) const;

 private:
  FusedMlpCall(const kernels::MlpDesc& d, at::Tensor packed, std::vector<at::Tensor> weights,
               std::vector<int64_t> spec, std::vector<double> fparams,
               std::optional<std::pair<int64_t, int64_t>> flatten, bool needs_2d);

  // 3-D input to a run with BatchNorm1d runs eagerly (it normalizes dim 1).
  std::optional<Shape> prepare(at::Tensor& x) const override;

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
                std::vector<double> fparams);

 private:
  FusedConvCall(kernels::ConvDesc d, at::Tensor packed, std::vector<at::Tensor> weights, std::vector<int64_t> spec,
                std::vector<double> fparams);

  // An empty batch runs eagerly too: there is nothing to compute, and eager's
  // output strides for it are each op's own choice.
  std::optional<Shape> prepare(at::Tensor& x) const override;

  // Engine 2 (ATen in the input's layout) serves float32 and float64 runs.
  int engine_count() const override;

  kernels::ConvDesc desc_;
  bool has_conv_ = false;
  bool has_winograd_ = false;  // a stage packs a Winograd weight: engine 3 is offered
};

}  // namespace seqfuse
