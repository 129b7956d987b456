"""GEMM rates on this machine: seqfuse's fused kernel against the engines ATen
offers (MKL through torch.addmm, oneDNN through mkldnn._linear_pointwise),
one Linear + ReLU of n x n at a batch of 512, in GFLOP/s. This is the ceiling
the GEMM-bound benchmark cases run into.

    python benchmarks/gemm_peak.py [--n 1024] [--batch 512] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import seqfuse


def rate(fn, flops, repeats=7, inner=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return flops / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, b = args.n, args.batch
    x, w, bias = torch.randn(b, n), torch.randn(n, n), torch.randn(n)
    flops = 2 * b * n * n
    fused = seqfuse.FusedSequential(nn.Linear(n, n), nn.ReLU()).eval()
    seqfuse.ops.set_engine_override(seqfuse.ops.ENGINE_FUSED)
    with torch.inference_mode():
        rows = {
            "seqfuse fused kernel": lambda: fused(x),
            "MKL (torch.addmm) + relu": lambda: torch.relu_(torch.addmm(bias, x, w.t())),
            "oneDNN (mkldnn._linear_pointwise relu)": lambda: torch.ops.mkldnn._linear_pointwise(
                x, w, bias, "relu", [], ""
            ),
        }
        print(f"n={n} batch={b} threads={torch.get_num_threads()} cpu={seqfuse.ops.cpu_capability()}")
        for name, fn in rows.items():
            print(f"  {name:40s} {rate(fn, flops):7.1f} GFLOP/s")
    seqfuse.ops.set_engine_override(None)


if __name__ == "__main__":
    main()
