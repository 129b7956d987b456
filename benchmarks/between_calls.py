#!/usr/bin/env python
"""What one block of a captured model costs around its fused call.

Calls mobilenet_v2's features.16 (7x7x160, a residual block) and features.3
(56x56x24) of seqfuse.fuse(model) inside a channels_last run, at three
depths (the block's captured forward, the chain with its residual addition,
the fused container alone), with warm caches and after a 16 MiB copy has
flushed them (what the kernels between two blocks do), and prints the
median of each (400 calls). The differences between the depths are the
Python (and glue) between two fused calls.

    python benchmarks/between_calls.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torchvision

import seqfuse
from seqfuse.capture import layout


def main() -> int:
    torch.manual_seed(0)
    model = seqfuse.fuse(torchvision.models.mobilenet_v2().eval())
    big = torch.randn(4 << 20)
    sink = torch.empty_like(big)
    with torch.inference_mode():
        layout._run_layout.active = True  # as inside a captured model's channels_last run
        try:
            for idx, shape in ((16, (1, 160, 7, 7)), (3, (1, 24, 56, 56))):
                block = model.features[idx]
                chain = block.__dict__["forward"].traced().chains[0]
                x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
                depths = {"block": lambda: block(x), "chain": lambda: chain(x, x), "container": lambda: chain.seq(x)}
                times = {(d, f): [] for d in depths for f in (False, True)}
                for _ in range(400):  # interleaved, so drifts hit every depth alike
                    for d, fn in depths.items():
                        for flush in (False, True):
                            if flush:
                                sink.copy_(big)
                            t0 = time.perf_counter_ns()
                            fn()
                            times[d, flush].append(time.perf_counter_ns() - t0)
                print(f"features.{idx} {tuple(shape)}: median us, warm / after a cache flush")
                for d in depths:
                    warm, cold = (statistics.median(times[d, f]) / 1e3 for f in (False, True))
                    print(f"  {d:10s} {warm:7.1f} / {cold:7.1f}")
        finally:
            layout._run_layout.active = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
