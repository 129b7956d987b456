#!/usr/bin/env python
"""Inference under torch.autocast("cpu", dtype=torch.bfloat16) against the
bfloat16-model path.

For each model (batch 1, 3x224x224): ``seqfuse.fuse(model)`` called under
CPU bfloat16 autocast, ``seqfuse.fuse(model.bfloat16())`` on the bfloat16
input, and the eager model under autocast; 15 alternating calls each after
8 warm-up rounds, medians in ms.

    python benchmarks/autocast.py [--models resnet18,mobilenet_v2,efficientnet_b0]
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0")
    args = ap.parse_args()
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        under_autocast = seqfuse.fuse(copy.deepcopy(model))
        bf16_model = seqfuse.fuse(copy.deepcopy(model).bfloat16())
        x = torch.randn(1, 3, 224, 224)
        xb = x.bfloat16()
        times = {"fused under autocast": [], "fused model.bfloat16()": [], "eager under autocast": []}
        calls = {
            "fused under autocast": lambda: under_autocast(x),
            "fused model.bfloat16()": lambda: bf16_model(xb),
            "eager under autocast": lambda: model(x),
        }
        with torch.no_grad():
            for rounds, record in ((8, False), (15, True)):
                for _ in range(rounds):
                    for what, call in calls.items():
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in what):
                            t0 = time.perf_counter()
                            call()
                            if record:
                                times[what].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()) +
              f"; autocast / bfloat16 model {med['fused under autocast'] / med['fused model.bfloat16()']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
