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

#include "../kernels/cuda/device.cuh"
#include "../spec_adapter.h"

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

// The tensors of a packing call, all on one CUDA device, copied to the host.
inline std::vector<at::Tensor> host_copies(const char* op, at::TensorList tensors, c10::Device* device) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": no tensors");
  *device = tensors[0].device();
  std::vector<at::Tensor> host;
  host.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK_VALUE(t.device() == *device, op, ": tensors on ", *device, " and ", t.device());
    host.push_back(t.to(at::kCPU));
  }
  return host;
}

// The packed buffer a forward receives: bytes of the spec's layout on the input's device.
inline void check_packed(const char* op, const at::Tensor& packed, const at::Tensor& input, int64_t bytes) {
  TORCH_CHECK(packed.device() == input.device() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == bytes && reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 64 == 0,
              op, ": packed buffer does not match the spec and the input's device, or is not 64-byte aligned (",
              packed.numel(), " bytes on ",
              packed.device(), ", ", bytes, " expected on ", input.device(), ")");
}

}  // namespace seqfuse::cuda_adapter
