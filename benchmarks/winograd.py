#!/usr/bin/env python
"""Winograd F(2x2, 3x3) (engine 3) against the direct kernels (engine 0).

1. A 3x3 stride-1 convolution + BatchNorm + ReLU alone, at the shapes of a
   resnet's stages, batch 1 and 8, channels_last input; the two engines
   alternate and the caches are flushed before each call (a read of 64 MiB:
   in a model the weights come from L3 or memory), median of 25 calls each.
2. Which chains of resnet18, resnet50, vgg11_bn and densenet121 the engine
   trials give to Winograd (batch 1, 224x224): chains with a 3x3 stride-1
   convolution that run engine 3 once the choice is made.

    python benchmarks/winograd.py [--batch 1]
"""

from __future__ import annotations

import argparse
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
from torch import nn

import seqfuse
from seqfuse import ops
from seqfuse.spec import CONV_ENGINE_NAMES, ENGINE_WINOGRAD

STAGES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]
MODELS = ["resnet18", "resnet50", "vgg11_bn", "densenet121"]


def stages(batches) -> None:
    torch.manual_seed(0)
    flush = torch.randn(16 << 20)
    print("3x3 convolution + BatchNorm + ReLU, cold caches: ms per call, direct / Winograd")
    for b in batches:
        for cin, cout, hw in STAGES:
            m = seqfuse.fuse(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                           nn.ReLU()).eval())
            x = torch.randn(b, cin, hw, hw).contiguous(memory_format=torch.channels_last)
            times = {ops.ENGINE_FUSED: [], ENGINE_WINOGRAD: []}
            try:
                with torch.no_grad():
                    for e in times:
                        ops.set_engine_override(e)
                        m(x), m(x)
                    for _ in range(25):
                        for e, t in times.items():
                            ops.set_engine_override(e)
                            flush.sum()
                            t0 = time.perf_counter()
                            m(x)
                            t.append(time.perf_counter() - t0)
            finally:
                ops.set_engine_override(None)
            direct, wino = (statistics.median(t) * 1e3 for t in times.values())
            print(f"  {cin}->{cout} {hw}x{hw} batch {b}: {direct:.3f} / {wino:.3f}  ({direct / wino:.2f}x)")


def chains(batch: int) -> None:
    print(f"chains with a 3x3 stride-1 convolution that run Winograd once the engine trials decide (batch {batch})")
    for name in MODELS:
        model = seqfuse.fuse(torchvision.models.get_model(name, weights=None).eval())
        p = seqfuse.profile(model, torch.randn(batch, 3, 224, 224), repeats=1)
        eligible = [c for c in p.chains if any(s.label.startswith("conv 3x3 ") for s in c.stages)]
        wino = [c for c in eligible if c.engine == CONV_ENGINE_NAMES[ENGINE_WINOGRAD]]
        print(f"  {name}: {len(wino)} of {len(eligible)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="batch of the model part (default 1)")
    args = ap.parse_args()
    stages([1, 8])
    chains(args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
