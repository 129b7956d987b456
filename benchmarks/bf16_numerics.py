#!/usr/bin/env python
"""bfloat16 numerics of the ten benchmark models against their float32 selves.

For each model (random weights, BatchNorm statistics and affine parameters
randomized away from their defaults) and three input seeds: the error of
eager ``model.bfloat16()`` and of ``seqfuse.fuse(model.bfloat16())``
against the float32 eager model, max |y - y_fp32| / max |y_fp32|, and
their ratio (the benchmark's goal: at most 1.5x eager bfloat16's own error;
the tests hold every model to 2x). Batch 1, 3x224x224.

    python benchmarks/bf16_numerics.py [--models resnet18,...]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torchvision
from torch import nn

import seqfuse

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "convnext_tiny", "densenet121", "shufflenet_v2_x1_0", "vgg11_bn"]


def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.75)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    return m.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    print(f"cpu {seqfuse.ops.cpu_capability()}; error = max|y - y_fp32| / max|y_fp32|, worst of 3 input seeds")
    print("| model | eager bf16 error | fused bf16 error | fused / eager |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for name in args.models.split(","):
        m32 = model(name)
        eager16 = copy.deepcopy(m32).bfloat16()
        fused16 = seqfuse.fuse(copy.deepcopy(m32).bfloat16())
        errs = {"eager": 0.0, "fused": 0.0}
        with torch.no_grad():
            for seed in range(3):
                x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(10 + seed))
                ref = m32(x)
                scale = ref.abs().max().item()
                for k, m in (("eager", eager16), ("fused", fused16)):
                    errs[k] = max(errs[k], (m(x.bfloat16()).float() - ref).abs().max().item() / scale)
        ratio = errs["fused"] / errs["eager"]
        worst = max(worst, ratio)
        print(f"| {name} | {errs['eager']:.2e} | {errs['fused']:.2e} | {ratio:.2f}x |", flush=True)
    print(f"worst fused / eager: {worst:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
