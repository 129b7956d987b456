// The CUDA training backend's kernels on the CPU: a torch extension that
// re-registers seqfuse's training ops for the CPU key with the device walk
// (train/train_run.h + adapters/cuda/train_backend.h) over a launch policy of the SIMT
// emulation (csrc/kernels/cuda/simt), so the whole CUDA epilogue path (the kernels
// of kernels/cuda/train_epilogue.cuh, their launch shapes, the sums in
// tensors, the device update of the running statistics) runs with CPU
// tensors. Loaded after seqfuse, it replaces the CPU kernels (the dispatcher
// warns about the override); tests/test_train_simt.py builds it and runs the
// training comparisons against eager through it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "adapters/cuda/train_backend.h"  // brings simt_emulation.h through kernels/cuda/device.cuh

namespace {

using namespace seqfuse;

// Threads per block and the block budget of a pass (CUDA: 256 threads, 8
// blocks per SM). The default, one warp and a few blocks, runs every
// reduction tree level and blocks of one channel meeting in the atomics at
// the cost of few emulated threads; -DSEQFUSE_SIMT_THREADS=256 also runs the
// wide plane tiles the GPU uses.
#ifndef SEQFUSE_SIMT_THREADS
#define SEQFUSE_SIMT_THREADS 32
#endif
#ifndef SEQFUSE_SIMT_BLOCKS
#define SEQFUSE_SIMT_BLOCKS 8
#endif

struct SimtLaunch {
  static constexpr int32_t kThreads = SEQFUSE_SIMT_THREADS;
  static int64_t max_blocks() { return SEQFUSE_SIMT_BLOCKS; }
  template <typename... P, typename... A> static void run(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    simt::launch(kernel, grid, block, 0, std::forward<A>(args)...);
  }
};

using Backend = train::DeviceEpilogue<SimtLaunch>;

void update_running_stats_simt(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum) {
  train::check_running_stats_update(buffers, stats, momentum, at::kCPU);
  train::update_running_stats_device<SimtLaunch>(buffers, stats, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("mlp_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                 at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train::train_forward<Backend>(train::mlp_run(spec, fparams), input, params, running);
  });
  m.impl("conv_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                  at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train::train_forward<Backend>(train::conv_run(spec, fparams), input, params, running);
  });
  m.impl("update_running_stats", &update_running_stats_simt);
  m.impl("mlp_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                            at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                            at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return train::backward<Backend>(train::mlp_run(spec, fparams), grad_output, input, output, saved, params,
                                    grad_mask);
  });
  m.impl("conv_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                             at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                             at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return train::backward<Backend>(train::conv_run(spec, fparams), grad_output, input, output, saved, params,
                                    grad_mask);
  });
}
