"""Shared helpers: random fusible chains, a guard that proves the fused path
ran (eager forwards of fusible modules raise while it is active), and
dtype-aware comparison against nn.Sequential."""

from __future__ import annotations

import contextlib
import random
from typing import List, Optional

import pytest
import torch
from torch import nn

import seqfuse

FUSIBLE_TYPES = (
    nn.Linear,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


class EagerCalled(AssertionError):
    pass


@contextlib.contextmanager
def forbid_eager(*types):
    """Makes the class-level forward of every fusible module type raise, so a
    test fails if seqfuse silently ran a module eagerly."""
    types = types or FUSIBLE_TYPES
    saved = {t: t.forward for t in types}

    def make(t):
        def forward(self, *args, **kwargs):
            raise EagerCalled(f"{t.__name__}.forward ran eagerly inside a fused segment")

        return forward

    try:
        for t in types:
            t.forward = make(t)
        yield
    finally:
        for t, f in saved.items():
            t.forward = f


ACTIVATIONS = [
    lambda: nn.ReLU(),
    lambda: nn.LeakyReLU(0.07),
    lambda: nn.ReLU6(),
    lambda: nn.Sigmoid(),
    lambda: nn.Tanh(),
    lambda: nn.GELU(),
    lambda: nn.GELU(approximate="tanh"),
    lambda: nn.SiLU(),
    lambda: nn.Hardswish(),
]


def randomize_batchnorm(bn: nn.BatchNorm1d, gen: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.3)


def random_chain(rng: random.Random, max_depth: int = 8, max_width: int = 300, in_features: Optional[int] = None):
    """A random list of fusible modules (eval mode) and its input width."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    width = in_features or rng.randint(1, max_width)
    in_width = width
    mods: List[nn.Module] = []
    depth = rng.randint(1, max_depth)
    for i in range(depth):
        kind = rng.random()
        if kind < 0.55 or i == 0:
            out = rng.randint(1, max_width)
            lin = nn.Linear(width, out, bias=rng.random() < 0.8)
            with torch.no_grad():  # default init keeps values tiny in deep chains; widen the range
                lin.weight.copy_(torch.randn(out, width, generator=gen) / max(width, 1) ** 0.5)
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(out, generator=gen) * 0.2)
            mods.append(lin)
            width = out
        elif kind < 0.7:
            bn = nn.BatchNorm1d(width, eps=rng.choice([1e-5, 1e-3]), affine=rng.random() < 0.8)
            randomize_batchnorm(bn, gen)
            mods.append(bn)
        elif kind < 0.95:
            mods.append(rng.choice(ACTIVATIONS)())
        else:
            mods.append(rng.choice([nn.Identity(), nn.Dropout(0.3)]))
    for m in mods:
        m.eval()
    return mods, in_width


def _reference(eager_mods, x, dtype):
    """The chain evaluated in a wider dtype (float64 for float32, float32 for bfloat16)."""
    import copy

    mods = [copy.deepcopy(m).to(dtype) for m in eager_mods]
    with torch.no_grad():
        return nn.Sequential(*mods)(x.to(dtype))


def assert_matches_eager(fused_out: torch.Tensor, eager_mods, x: torch.Tensor):
    """float64: assert_close to nn.Sequential. float32: assert_close defaults,
    or, where summation order and BatchNorm folding round differently in a
    deep chain, no further from a float64 reference than 2x eager's own error.
    bfloat16: no further from a float32 reference than 2x eager bf16's error
    (flash-attention's rule), with slack for the output rounding."""
    with torch.no_grad():
        eager_out = nn.Sequential(*eager_mods)(x)
    assert fused_out.shape == eager_out.shape and fused_out.dtype == eager_out.dtype
    if x.numel() == 0 or fused_out.numel() == 0:
        return
    if x.dtype == torch.float64:
        torch.testing.assert_close(fused_out, eager_out, equal_nan=True, rtol=1e-7, atol=1e-7)
        return
    if x.dtype == torch.float32:
        try:
            torch.testing.assert_close(fused_out, eager_out, equal_nan=True)
            return
        except AssertionError:
            ref = _reference(eager_mods, x, torch.float64)
            slack = 1e-6
    else:
        ref = _reference(eager_mods, x, torch.float32)
        slack = 1e-2
    assert torch.equal(fused_out.isnan(), eager_out.isnan())
    finite = ref.isfinite() & eager_out.isfinite()
    fused_err = (fused_out.to(ref.dtype) - ref).abs()[finite]
    eager_err = (eager_out.to(ref.dtype) - ref).abs()[finite]
    scale = ref.abs()[finite].max().clamp_min(1.0) if finite.any() else 1.0
    assert fused_err.max() <= 2 * eager_err.max() + slack * scale, (fused_err.max(), eager_err.max())


@pytest.fixture
def rng(request):
    return random.Random(hash(request.node.nodeid) & 0xFFFFFFFF)


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def cpu_capability(request):
    """Runs a test once per kernel variant this CPU supports."""
    order = ["baseline", "avx2", "avx512"]
    detected = seqfuse.ops._C.detected_cpu_capability()
    if order.index(request.param) > order.index(detected):
        pytest.skip(f"CPU does not support {request.param}")
    before = seqfuse.ops.cpu_capability()
    seqfuse.ops.set_cpu_capability(request.param)
    yield request.param
    seqfuse.ops.set_cpu_capability(before)


@pytest.fixture(params=["fused", "gemm_epilogue"])
def engine(request):
    """Runs a test once per fused-MLP engine, forced."""
    from seqfuse import ops

    code = {"fused": ops.ENGINE_FUSED, "gemm_epilogue": ops.ENGINE_GEMM_EPILOGUE}[request.param]
    ops.set_engine_override(code)
    yield request.param
    ops.set_engine_override(None)
