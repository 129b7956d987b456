// What every CUDA adapter shares: the device of a call, its current stream,
// grid sizing for the grid-stride kernels, the torch <-> device type map, and
// the packing route (packing runs once per plan, on the host, with the same
// torch-free cores as the CPU, then the buffer moves to the device).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "kernels/cuda/device.cuh"
#include "adapters/spec_adapter.h"

namespace seqfuse::cuda_adapter {

// The device storage type of a spec dtype.
template <typename Fn> decltype(auto) dispatch_device_dtype(kernels::DType d, Fn&& fn) {
  switch (d) {
    case kernels::DType::Float64: return fn.template operator()<double>();
    case kernels::DType::BFloat16: return fn.template operator()<__nv_bfloat16>();
    case kernels::DType::Float16: return fn.template operator()<__half>();
    case kernels::DType::Float32: break;
  }
  return fn.template operator()<float>();
}

// Blocks for a grid-stride loop over `total` elements: enough to fill the
// device, never more than the work.
inline unsigned grid_for(int64_t total, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (total + threads - 1) / threads);
  return static_cast<unsigned>(std::min<int64_t>(want, sms * 16));
}

// A packing op on CUDA: its tensors (all on one CUDA device) copied to the
// host, packed there by the op's CPU kernel (the torch-free packing cores every
// device shares), and the buffer moved to that device. Once per plan.
inline at::Tensor pack_on_host(const char* op, at::TensorList tensors, at::IntArrayRef spec,
                               at::ArrayRef<double> fparams) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": no tensors");
  const c10::Device device = tensors[0].device();
  std::vector<at::Tensor> host;
  host.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.device() == device, op, ": tensors on ", device, " and ", t.device());
    host.push_back(t.to(at::kCPU));
  }
  const auto pack = c10::Dispatcher::singleton()
                        .findSchemaOrThrow(op, "")
                        .typed<at::Tensor(at::TensorList, at::IntArrayRef, at::ArrayRef<double>)>();
  return pack.call(host, spec, fparams).to(device);
}

}  // namespace seqfuse::cuda_adapter
