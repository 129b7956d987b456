// The seqfuse operator library: every schema, in one place. Backends register
// implementations by dispatch key (cpu/*_cpu.cpp, cuda/*_cuda.cu); the
// training ops' autograd formulas are registered in ops/autograd.cpp; Python
// the Meta kernels (shapes only, for torch.compile / torch.export) are in ops/meta.cpp.
//
// The int[] spec / float[] fparams pair describing a fused MLP run is defined
// in kernels/mlp_spec.h, the one describing a fused conv run in
// kernels/conv_spec.h.
#include <torch/library.h>

TORCH_LIBRARY(seqfuse, m) {
  // Folds bias and eval BatchNorm into per-stage scale/shift and packs Linear
  // weights into kernel panels. `tensors` lists each stage's inputs in order:
  //   Linear:     weight, [bias], [bn_weight, bn_bias]?, [running_mean, running_var]?
  //   ScaleShift: [bn_weight, bn_bias]?, running_mean, running_var
  // (presence per the stage's flags). Returns an opaque uint8 buffer.
  m.def("mlp_pack(Tensor[] tensors, int[] spec, float[] fparams) -> Tensor");
  // Runs every stage of the spec over the last dimension of `input`.
  // engine 0: the fused kernel carries each row tile through every stage in
  //           one pass (`weights` unused, may be empty);
  // engine 1: each Linear's product by ATen's GEMM (MKL/oneDNN) on `weights`
  //           (the Linear weights, [out, in], in stage order), each epilogue
  //           (bias, folded BatchNorm, activation) by the fused epilogue kernel.
  // FusedSequential picks the engine per batch size by measurement.
  m.def(
      "mlp_forward(Tensor input, Tensor packed, Tensor[] weights, int[] spec, float[] fparams, int engine=0) -> Tensor");

  // The conv-run counterparts. conv_pack takes, per Conv/Linear stage:
  //   weight, [bias], [bn_weight, bn_bias]?, [running_mean, running_var]?
  // and per ScaleShift stage: [bn_weight, bn_bias]?, running_mean, running_var.
  m.def("conv_pack(Tensor[] tensors, int[] spec, float[] fparams) -> Tensor");
  // Runs every stage of the spec over a 4-D (N, C, H, W) input of any memory
  // format; the output has eager's memory format (channels_last when the input
  // or a Conv weight is). engine 0: the fused kernels (each image carried
  // through every stage when the batch splits evenly over the threads);
  // engine 1: each Conv by ATen's convolution on `weights` (the Conv weights
  // in stage order, then the Linear head's: the CUDA kernels multiply them
  // too), its epilogue and every other stage by the fused kernels
  // (for bfloat16, the activations are rounded to bfloat16 around it).
  m.def(
      "conv_forward(Tensor input, Tensor packed, Tensor[] weights, int[] spec, float[] fparams, int engine=0) -> Tensor");

  // Training. A run's forward with the parameters as they are (nothing folded
  // or packed), returning the output and what the backward needs (`saved`;
  // layout in train/train_run.h). The spec is the run's mlp / conv spec; a
  // BatchNorm stage flagged kBatchStats normalizes with the batch's
  // statistics, otherwise with its running statistics from `running`.
  //   params:  per stage, Linear/Conv weight, [bias], [bn_weight, bn_bias]
  //   running: per BatchNorm without kBatchStats, running_mean, running_var
  // The autograd formula (ops/autograd.cpp) calls the matching *_backward op,
  // which returns the gradient of the input and of each parameter for which
  // grad_mask ([input, params...]) is set, and empty tensors for the others.
  // The backward ops have no derivative: double backward raises.
  m.def(
      "mlp_train_forward(Tensor input, Tensor[] params, Tensor[] running, int[] spec, float[] fparams) "
      "-> (Tensor, Tensor[])");
  m.def(
      "mlp_backward(Tensor grad_output, Tensor input, Tensor output, Tensor[] saved, Tensor[] params, int[] spec, "
      "float[] fparams, bool[] grad_mask) -> (Tensor, Tensor[])");
  m.def(
      "conv_train_forward(Tensor input, Tensor[] params, Tensor[] running, int[] spec, float[] fparams) "
      "-> (Tensor, Tensor[])");
  m.def(
      "conv_backward(Tensor grad_output, Tensor input, Tensor output, Tensor[] saved, Tensor[] params, int[] spec, "
      "float[] fparams, bool[] grad_mask) -> (Tensor, Tensor[])");
  // Eager's running-statistics update after a training forward, per BatchNorm
  // with kBatchStats and kRunningStats: `buffers` running_mean, running_var,
  // num_batches_tracked; `stats` its saved statistics from the forward;
  // momentum < 0 is momentum=None (the cumulative average).
  m.def("update_running_stats(Tensor(a!)[] buffers, Tensor[] stats, float[] momentum) -> ()");
}
