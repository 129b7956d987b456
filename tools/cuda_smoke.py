"""A small run of every seqfuse CUDA kernel, for compute-sanitizer (memcheck,
racecheck) in `make gpu-check`: the fully fused MLP in each dtype with odd
widths and partial tiles, the layer-by-layer MLP path, a conv run with every
stage kind, and a training step through the fused backward. Exits non-zero if
an output disagrees with eager."""

import sys

import torch
from torch import nn

import seqfuse
from seqfuse import ops

torch.backends.cudnn.allow_tf32 = False  # eager and the fused path may pick different cuDNN kernels
torch.backends.cuda.matmul.allow_tf32 = False
seqfuse.verify.set_kernel_check("off", "cuda")  # compared below, once, without the sanitizer's cost twice
dev = torch.device("cuda")
bad = []


def check(name, fused, eager, tol):
    if not torch.allclose(fused.float(), eager.float(), rtol=tol, atol=tol, equal_nan=True):
        bad.append(f"{name}: max diff {(fused.float() - eager.float()).abs().max().item():.3g}")


torch.manual_seed(0)
with torch.inference_mode():
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)):
        for widths in ((17, 33, 5), (64, 64, 64, 16), (3, 200, 7)):
            mods = []
            for a, b in zip(widths, widths[1:]):
                mods += [nn.Linear(a, b), nn.GELU()]
            model = nn.Sequential(*mods).to(dev, dtype).eval()
            x = torch.randn(70, widths[0], device=dev, dtype=dtype)
            for engine in (0, 1):
                ops.set_engine_override(engine)
                check(f"mlp {widths} {dtype} engine {engine}", seqfuse.FusedSequential(*model)(x), model(x), tol)
    ops.set_engine_override(None)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish(), nn.AvgPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(dev).eval()
    x = torch.randn(2, 3, 11, 11, device=dev)
    check("conv run", seqfuse.FusedSequential(*conv)(x), conv(x), 1e-4)

model = nn.Sequential(nn.Linear(9, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3)).to(dev).train()
fused = seqfuse.fuse(model)
x = torch.randn(40, 9, device=dev, requires_grad=True)
fused(x).square().sum().backward()
conv_t = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2)).to(dev).train()
seqfuse.fuse(conv_t)(torch.randn(3, 3, 9, 9, device=dev)).sum().backward()
torch.cuda.synchronize()
print("\n".join(bad) or "cuda_smoke: every kernel ran and matched eager")
sys.exit(1 if bad else 0)
