"""What bounds a small training step: the fixed cost of autograd over the
parameters, and the products, measured on this machine.

For train_mlp_small_b32 (Linear 64->128->128->10, ReLU; 32 rows) prints, as
medians over interleaved calls:
  * the eager and the fused training step (zero_grad + forward + sum().backward());
  * the floor no fusion removes: zero_grad, a sum and a backward that reaches
    the same six parameter leaves through a single node (cat + sum);
  * the eight GEMMs of the step (3 forward, 3 weight gradients, 2 input
    gradients) called alone through ATen.

    python benchmarks/training_floor.py [--rounds 3000]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from seqfuse import FusedSequential


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3000)
    rounds = ap.parse_args().rounds
    torch.manual_seed(0)
    mods = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)]
    eager, fused = nn.Sequential(*copy.deepcopy(mods)), FusedSequential(*copy.deepcopy(mods))
    x = torch.randn(32, 64)
    leaves = [p.detach().clone().requires_grad_() for p in eager.parameters()]
    w = [p.detach() for p in eager.parameters() if p.dim() == 2]
    h = [torch.randn(32, 64), torch.randn(32, 128), torch.randn(32, 128)]
    g = [torch.randn(32, 128), torch.randn(32, 128), torch.randn(32, 10)]

    def step(model):
        params = list(model.parameters())

        def run():
            for p in params:
                p.grad = None
            model(x).sum().backward()

        return run

    def floor():
        for p in leaves:
            p.grad = None
        torch.cat([p.view(-1) for p in leaves]).sum().backward()

    def gemms():
        with torch.no_grad():
            for i in range(3):
                torch.mm(h[i], w[i].t())  # forward
                torch.mm(g[i].t(), h[i])  # weight gradient
            for i in (1, 2):
                torch.mm(g[i], w[i])  # input gradient

    fns = {"eager step": step(eager), "fused step": step(fused), "autograd floor": floor, "8 GEMMs": gemms}
    for f in fns.values():
        for _ in range(200):
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        v.sort()
        print(f"{k:>15}: {v[len(v) // 2] * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
