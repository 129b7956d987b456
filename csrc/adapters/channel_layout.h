// The [outer][channels][inner] view (kernels/train_epilogue.h) of a dense
// activation, shared by the CPU adapters that run the per-channel epilogue
// over ATen's outputs (the training ops, conv engine 2).
#pragma once

#include <ATen/ATen.h>

#include "kernels/train_epilogue.h"

namespace seqfuse {

// (N, C) rows, NCHW maps (outer N, inner H*W) and channels_last maps (outer
// N*H*W, inner 1); the caller makes sure `t` is one of these.
inline kernels::ChannelLayout layout_of(const at::Tensor& t) {
  if (t.dim() == 2) return {t.size(0), t.size(1), 1};
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  return t.is_contiguous() ? kernels::ChannelLayout{n, c, hw} : kernels::ChannelLayout{n * hw, c, 1};
}

}  // namespace seqfuse
