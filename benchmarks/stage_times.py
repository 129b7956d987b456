#!/usr/bin/env python
"""Stage times of single-stage conv chains, as seqfuse.profile measures them.

Each case is a FusedSequential of one Conv2d (+ BatchNorm, activation) on a
channels_last input, run on the fused kernels; the printed time is the
stage's median over the profile's forwards, and its share of the FMA peak or
memory bandwidth measured in the same process. To compare two builds, run
this in each checkout alternately (the machine drifts between runs):

    python benchmarks/stage_times.py                      # every case
    python benchmarks/stage_times.py --cases dw3,dw7      # names containing these
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

import seqfuse


def _conv(cin, cout, k, stride=1, groups=1, act=None, bn=False):
    mods = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
    if bn:
        mods.append(nn.BatchNorm2d(cout))
    if act is not None:
        mods.append(act)
    return mods


#: name -> (modules, input shape)
CASES = {
    "dw3 144 56x56": (_conv(144, 144, 3, groups=144, act=nn.ReLU6()), (1, 144, 56, 56)),
    "dw3/2 96 112x112": (_conv(96, 96, 3, 2, groups=96, act=nn.ReLU6()), (1, 96, 112, 112)),
    "dw5 240 28x28": (_conv(240, 240, 5, groups=240, act=nn.SiLU()), (1, 240, 28, 28)),
    "dw7 96 56x56": (_conv(96, 96, 7, groups=96), (1, 96, 56, 56)),
    "stem 3x3/2 3->32 224": (_conv(3, 32, 3, 2, act=nn.ReLU6(), bn=True), (1, 3, 224, 224)),
    "stem 7x7/2 3->64 224": (_conv(3, 64, 7, 2, act=nn.ReLU(), bn=True), (1, 3, 224, 224)),
    "1x1 16->96 112x112 relu": (_conv(16, 96, 1, act=nn.ReLU()), (1, 16, 112, 112)),
    "1x1 16->96 112x112 silu": (_conv(16, 96, 1, act=nn.SiLU()), (1, 16, 112, 112)),
    "1x1 16->96 112x112 gelu": (_conv(16, 96, 1, act=nn.GELU()), (1, 16, 112, 112)),
    "3x3 512 7x7": (_conv(512, 512, 3, act=nn.ReLU()), (1, 512, 7, 7)),
    "1x1 160->960 7x7": (_conv(160, 960, 1, act=nn.ReLU6()), (1, 160, 7, 7)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="", help="comma list of substrings of case names (default: all)")
    ap.add_argument("--repeats", type=int, default=40, help="profiled forwards per case (default 40)")
    a = ap.parse_args()
    wanted = [w for w in a.cases.split(",") if w]
    seqfuse.ops.set_engine_override(seqfuse.ops.ENGINE_FUSED)
    torch.manual_seed(0)
    print(f"seqfuse {seqfuse.__version__}, {seqfuse.ops.cpu_capability()}, {torch.get_num_threads()} threads")
    for name, (mods, shape) in CASES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        model = seqfuse.FusedSequential(*mods).eval()
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        stage = seqfuse.profile(model, x, repeats=a.repeats).chains[0].stages[0]
        bound = "FMA peak" if stage.bound == "FMA" else "bandwidth"
        print(f"{name:28s} {stage.ms * 1e3:8.1f} us  {100 * stage.share:4.0f}% of {bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
