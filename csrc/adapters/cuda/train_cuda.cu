// CUDA adapters of the training ops (seqfuse::{mlp,conv}_train_forward,
// seqfuse::{mlp,conv}_backward, seqfuse::update_running_stats): the
// device-generic walk of train/train_run.h (products by cuBLAS / cuDNN through
// ATen, pools by ATen's CUDA kernels) with the device epilogue backend of
// adapters/cuda/train_backend.h, whose kernels (kernels/cuda/train_epilogue.cuh) run
// here on the current stream of the input's device. float32 and float64, as
// on the CPU.
#include <torch/library.h>

#include "adapters/cuda/launch.cuh"
#include "adapters/cuda/train_backend.h"

namespace seqfuse {
namespace {

// train_backend.h's launch policy: the current stream, a launch check after
// every kernel.
struct CudaLaunch {
  static constexpr int32_t kThreads = 256;
  static_assert(kThreads <= cuda::train::kMaxThreads, "the pass kernels' shared arrays hold 256 threads");

  static int64_t max_blocks() {
    return int64_t{8} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }

  template <typename... P, typename... A> static void run(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using Backend = train::DeviceEpilogue<CudaLaunch>;

std::tuple<at::Tensor, std::vector<at::Tensor>> train_forward_cuda(const train::TrainRun& run,
                                                                   const at::Tensor& input, at::TensorList params,
                                                                   at::TensorList running) {
  const c10::cuda::CUDAGuard guard(input.device());
  return train::train_forward<Backend>(run, input, params, running);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> backward_cuda(const train::TrainRun& run,
                                                              const at::Tensor& grad_output, const at::Tensor& input,
                                                              const at::Tensor& output, at::TensorList saved,
                                                              at::TensorList params, const c10::List<bool>& grad_mask) {
  const c10::cuda::CUDAGuard guard(input.device());
  return train::backward<Backend>(run, grad_output, input, output, saved, params, grad_mask);
}

void update_running_stats_cuda(at::TensorList buffers, at::TensorList stats, at::ArrayRef<double> momentum) {
  // Every BatchNorm is checked before any is updated: all or nothing.
  train::check_running_stats_update(buffers, stats, momentum, at::kCUDA);
  if (stats.empty()) return;
  const c10::cuda::CUDAGuard guard(buffers[0].device());
  train::update_running_stats_device<CudaLaunch>(buffers, stats, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("mlp_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                 at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train_forward_cuda(train::mlp_run(spec, fparams), input, params, running);
  });
  m.impl("conv_train_forward", [](const at::Tensor& input, at::TensorList params, at::TensorList running,
                                  at::IntArrayRef spec, at::ArrayRef<double> fparams) {
    return train_forward_cuda(train::conv_run(spec, fparams), input, params, running);
  });
  m.impl("update_running_stats", &update_running_stats_cuda);
  m.impl("mlp_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                            at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                            at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return backward_cuda(train::mlp_run(spec, fparams), grad_output, input, output, saved, params, grad_mask);
  });
  m.impl("conv_backward", [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                             at::TensorList saved, at::TensorList params, at::IntArrayRef spec,
                             at::ArrayRef<double> fparams, const c10::List<bool>& grad_mask) {
    return backward_cuda(train::conv_run(spec, fparams), grad_output, input, output, saved, params, grad_mask);
  });
}

}  // namespace seqfuse
