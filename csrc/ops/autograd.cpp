// Autograd for the training ops: seqfuse::{mlp,conv}_train_forward get a
// derivative that calls seqfuse::{mlp,conv}_backward with what the forward
// returned. Registered for the Autograd key in C++, so eager autograd,
// torch.compile (AOTAutograd traces through it) and opcheck all see one
// formula, and an eager training step pays no Python on the autograd path.
//
// The backward ops get an Autograd kernel too: their outputs refuse to be
// differentiated (double backward) with a clear error rather than autograd
// warning and dropping the gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "kernels/conv_spec.h"
#include "kernels/train_epilogue.h"

namespace seqfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(const at::Tensor&, at::TensorList, at::TensorList,
                                                                   at::IntArrayRef, at::ArrayRef<double>);
using BackwardSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, at::TensorList, at::TensorList,
                                                                    at::IntArrayRef, at::ArrayRef<double>,
                                                                    const c10::List<bool>&);

enum class RunKind { Mlp, Conv };

const c10::TypedOperatorHandle<ForwardSig>& forward_op(RunKind kind) {
  static const auto mlp =
      c10::Dispatcher::singleton().findSchemaOrThrow("seqfuse::mlp_train_forward", "").typed<ForwardSig>();
  static const auto conv =
      c10::Dispatcher::singleton().findSchemaOrThrow("seqfuse::conv_train_forward", "").typed<ForwardSig>();
  return kind == RunKind::Mlp ? mlp : conv;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op(RunKind kind) {
  static const auto mlp =
      c10::Dispatcher::singleton().findSchemaOrThrow("seqfuse::mlp_backward", "").typed<BackwardSig>();
  static const auto conv =
      c10::Dispatcher::singleton().findSchemaOrThrow("seqfuse::conv_backward", "").typed<BackwardSig>();
  return kind == RunKind::Mlp ? mlp : conv;
}

// The non-tensor arguments, one value so that autograd counts them as one input.
struct RunArgs {
  RunKind kind;
  std::vector<int64_t> spec;
  std::vector<double> fparams;
};

// Whether the last stage's backward reads the run's output (a ReLU, Sigmoid
// or Tanh after it). The spec was validated by the forward kernel that ran.
bool backward_reads_output(const RunArgs& args) {
  const std::vector<int64_t>& spec = args.spec;
  if (spec.size() < 3) return true;
  const bool mlp = args.kind == RunKind::Mlp;
  const int64_t per_stage = mlp ? kernels::kSpecPerStage : kernels::kConvSpecPerStage;
  const int64_t header = mlp ? kernels::kSpecHeader : kernels::kConvSpecHeader;
  const size_t at = static_cast<size_t>(header + per_stage * (spec[2] - 1) + 2);
  if (spec[2] < 1 || at >= spec.size() || spec[at] < 0 || spec[at] >= kernels::kNumActivations) return true;
  return kernels::derivative_reads_output(static_cast<kernels::Activation>(spec[at]));
}

class TrainRunFunction : public torch::autograd::Function<TrainRunFunction> {
 public:
  // Inputs as autograd numbers them: input, each param, each running statistic, args.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::TensorList params,
                               at::TensorList running, const RunArgs& args) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, saved] = forward_op(args.kind).call(input, params, running, args.spec, args.fparams);
    // The output is saved only when the backward reads its values, so that a
    // caller may modify it in place (a residual `out += x`) as eager allows.
    std::vector<at::Tensor> to_save{input, backward_reads_output(args) ? output : at::Tensor()};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    to_save.insert(to_save.end(), params.begin(), params.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["kind"] = static_cast<int64_t>(args.kind);
    ctx->saved_data["spec"] = args.spec;
    ctx->saved_data["fparams"] = args.fparams;
    ctx->saved_data["n_saved"] = static_cast<int64_t>(saved.size());
    ctx->saved_data["n_running"] = static_cast<int64_t>(running.size());
    ctx->mark_non_differentiable(saved);
    // The saved outputs never get gradients: no zero-filled stand-ins for them.
    ctx->set_materialize_grads(false);
    variable_list out{output};
    out.insert(out.end(), saved.begin(), saved.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list vars = ctx->get_saved_variables();
    const int64_t n_saved = ctx->saved_data["n_saved"].toInt();
    const int64_t n_running = ctx->saved_data["n_running"].toInt();
    const at::Tensor& input = vars[0];
    const at::Tensor output = vars[1].defined() ? vars[1] : at::empty({0}, input.options());
    const std::vector<at::Tensor> saved(vars.begin() + 2, vars.begin() + 2 + n_saved);
    const std::vector<at::Tensor> params(vars.begin() + 2 + n_saved, vars.end());
    const size_t n_params = params.size();
    variable_list result(1 + n_params + static_cast<size_t>(n_running) + 1);  // all undefined
    if (!grads[0].defined()) return result;
    // Only the gradients autograd needs (frozen parameters, an input without grad).
    c10::List<bool> mask;
    for (size_t k = 0; k < 1 + n_params; ++k) mask.push_back(ctx->needs_input_grad(k));
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const std::vector<double> fparams = ctx->saved_data["fparams"].toDoubleVector();
    const auto kind = static_cast<RunKind>(ctx->saved_data["kind"].toInt());
    auto [grad_input, grad_params] =
        backward_op(kind).call(grads[0], input, output, saved, params, spec, fparams, mask);
    if (mask.get(0)) result[0] = grad_input;
    for (size_t k = 0; k < n_params; ++k)
      if (mask.get(1 + k)) result[1 + k] = grad_params[k];
    return result;
  }
};

template <RunKind kKind>
std::tuple<at::Tensor, std::vector<at::Tensor>> train_forward_autograd(const at::Tensor& input,
                                                                       at::TensorList params,
                                                                       at::TensorList running, at::IntArrayRef spec,
                                                                       at::ArrayRef<double> fparams) {
  variable_list out = TrainRunFunction::apply(input, params, running, RunArgs{kKind, spec.vec(), fparams.vec()});
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

// The update has no derivative; below the ADInplaceOrView key nothing bumps
// the buffers' versions, so this does (saved-tensor checks and seqfuse's plan
// guard rely on them). Registered for Autograd and ADInplaceOrView: it
// dispatches below both, so the versions move once either way.
void update_running_stats_autograd(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfuse::update_running_stats", "")
                             .typed<void(at::TensorList, at::TensorList, at::ArrayRef<double>)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(buffers, stats, momentum);
  }
  for (const at::Tensor& b : buffers) torch::autograd::increment_version(b);
}

// The backward ops under autograd (create_graph=True, or AOTAutograd tracing
// a joint graph): their outputs get a node whose own backward raises, so
// computing gradients with create_graph works and only differentiating them
// again (double backward) fails, with a message saying so.
class BackwardRunFunction : public torch::autograd::Function<BackwardRunFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& output, at::TensorList saved, at::TensorList params,
                               const RunArgs& args, const c10::List<bool>& grad_mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["kind"] = static_cast<int64_t>(args.kind);
    auto [grad_input, grad_params] =
        backward_op(args.kind).call(grad_output, input, output, saved, params, args.spec, args.fparams, grad_mask);
    variable_list out{grad_input};
    out.insert(out.end(), grad_params.begin(), grad_params.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    const bool mlp = static_cast<RunKind>(ctx->saved_data["kind"].toInt()) == RunKind::Mlp;
    TORCH_CHECK(false, mlp ? "seqfuse::mlp_backward" : "seqfuse::conv_backward",
                ": double backward through a fused FusedSequential segment is not supported (the gradient of a "
                "gradient taken with create_graph=True). Run the model eagerly (nn.Sequential) for "
                "higher-order gradients.");
    return {};
  }
};

template <RunKind kKind>
std::tuple<at::Tensor, std::vector<at::Tensor>> backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output, at::TensorList saved,
    at::TensorList params, at::IntArrayRef spec, at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
  variable_list out = BackwardRunFunction::apply(grad_output, input, output, saved, params,
                                                 RunArgs{kKind, spec.vec(), fparams.vec()}, grad_mask);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, Autograd, m) {
  m.impl("mlp_train_forward", &train_forward_autograd<RunKind::Mlp>);
  m.impl("conv_train_forward", &train_forward_autograd<RunKind::Conv>);
  m.impl("mlp_backward", &backward_autograd<RunKind::Mlp>);
  m.impl("conv_backward", &backward_autograd<RunKind::Conv>);
  m.impl("update_running_stats", &update_running_stats_autograd);
}

// Under torch.inference_mode the Autograd key is skipped but ADInplaceOrView
// still runs for ordinary tensors: the update bumps the versions there too.
TORCH_LIBRARY_IMPL(seqfuse, ADInplaceOrView, m) {
  m.impl("update_running_stats", &update_running_stats_autograd);
}

}  // namespace seqfuse
