"""Inference under torch.autocast("cpu", dtype=torch.bfloat16): a float32
model's fused segments with a Conv2d or Linear run as bfloat16 runs (their
parameters converted once), return bfloat16 as autocast's ops do, and keep
the numerics rule of bfloat16 models (at most 2x eager autocast's error
against the float32 model); everything autocast leaves alone runs as it
would without it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import seqfuse
from seqfuse import FusedSequential

from conftest import forbid_eager, randomize_batchnorm

pytestmark = pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch without get_autocast_dtype")


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """The model in eval mode, its BatchNorms away from their defaults (conftest's rule)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_batchnorm(m, g)
    return model.eval()


def _check(fused: nn.Module, ref: nn.Module, x: torch.Tensor, forbid=(nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
    """fused under autocast (its products not run eagerly) against ref under autocast and in float32."""
    with torch.no_grad():
        want32 = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = ref(x)
            with forbid_eager(*forbid):
                got = fused(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert got.shape == eager.shape
    scale = want32.abs().max().item()
    e_err = (eager.float() - want32).abs().max().item()
    f_err = (got.float() - want32).abs().max().item()
    assert f_err <= 2 * e_err + 1e-3 * scale, f"fused error {f_err:.3g}, eager autocast error {e_err:.3g}"
    return got


def test_conv_and_mlp_runs_are_bfloat16_runs():
    torch.manual_seed(0)
    conv = _randomize_batchnorm(FusedSequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.SiLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)))
    _check(conv, nn.Sequential(*conv), torch.randn(3, 8, 13, 11))
    _check(conv, nn.Sequential(*conv), torch.randn(2, 8, 13, 11).contiguous(memory_format=torch.channels_last))
    mlp = FusedSequential(nn.Linear(33, 64), nn.GELU(), nn.Linear(64, 17), nn.ReLU()).eval()
    _check(mlp, nn.Sequential(*mlp), torch.randn(7, 33))


def test_a_fused_model_under_autocast():
    torch.manual_seed(0)
    model = _randomize_batchnorm(torchvision.models.resnet18())
    fused = seqfuse.fuse(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused(x)  # traced here: the tracer reads the modules' own forwards, which the check forbids
    _check(fused, model, x)
    # The same model without autocast is float32 again (the bfloat16 run is an addition, not a conversion).
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_what_autocast_leaves_alone_runs_as_without_it():
    """A segment without a product (autocast keeps its float32), calls with
    autograd (eager's autocast, recorded), and autocast to another dtype run
    eagerly under autocast, as nn.Sequential does."""
    bn = _randomize_batchnorm(FusedSequential(nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    assert y.dtype == torch.float32
    conv = FusedSequential(nn.Conv2d(4, 8, 3), nn.ReLU()).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        want = nn.Sequential(*conv)(x)
    assert y.dtype == want.dtype == torch.bfloat16 and y.requires_grad
    torch.testing.assert_close(y, want)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        y, want = conv(x), nn.Sequential(*conv)(x)
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want)


def test_parameter_edits_reach_the_bfloat16_run():
    conv = FusedSequential(nn.Conv2d(4, 8, 3), nn.ReLU()).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = conv(x)
        conv[0].weight.mul_(-1)
        after = conv(x)
        want = nn.Sequential(*conv)(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=2e-2, atol=2e-2)
