"""Shared helpers: random fusible chains, a guard that proves the fused path
ran (eager forwards of fusible modules raise while it is active), and
dtype-aware comparison against nn.Sequential."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import zlib
from typing import List, Optional

import pytest
import torch
from torch import nn

# Engine choices persisted by one test run never reach another, nor the user's
# own cache: a fresh folder per run (set before seqfuse reads it at import).
os.environ["SEQFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="seqfuse-test-cache-")

import seqfuse  # noqa: E402

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
    nn.Hardsigmoid,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


class EagerCalled(AssertionError):
    pass


def calls_until_decided(model, x, limit: int = 40) -> int:
    """Calls ``model(x)`` without autograd until no engine choice is on trial
    (the first calls of a new shape class time the engines, one per call);
    returns how many calls it took."""
    from seqfuse._loader import _C

    with torch.no_grad():
        for n in range(1, limit + 1):
            since = _C.engine_trial_clock()
            model(x)
            if not _C.engine_trials_pending(since):
                return n
    raise AssertionError(f"engine choices still on trial after {limit} calls")


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
    lambda: nn.Hardsigmoid(),
    lambda: nn.Mish(),
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
    # crc32, not hash(): str hashes change per process, and a failure must reproduce.
    return random.Random(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["avx512_bf16", "avx512", "avx2", "baseline"])
def cpu_capability(request):
    """Runs a test once per kernel variant this CPU supports."""
    order = ["baseline", "avx2", "avx512", "avx512_bf16"]
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


CONV_FUSIBLE_TYPES = FUSIBLE_TYPES + (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout2d,
)


def _output_shape(m: nn.Module, shape):
    """The shape eager gives ``m`` on a zero input of ``shape``, or None where
    eager rejects that input or the output is empty."""
    try:
        with torch.no_grad():
            y = m(torch.zeros(shape))
    except (RuntimeError, ValueError):
        return None
    return tuple(y.shape) if y.numel() else None


def _random_conv2d(rng: random.Random, gen: torch.Generator, c: int, max_channels: int) -> nn.Conv2d:
    """A Conv2d taking ``c`` channels with random geometry: kernel, stride,
    padding (ints, pairs, 'same', 'valid'), dilation, groups (including
    depthwise with a channel multiplier) and bias."""
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    groups = rng.choice([1, 1, c, rng.choice(divisors)])
    if groups == c and rng.random() < 0.7:
        out = c * rng.choice([m for m in (1, 1, 2, 3) if c * m <= max_channels])  # depthwise, maybe a multiplier
    else:
        out = groups * rng.randint(1, max(1, max_channels // groups))
    kernel = rng.choice([1, 1, 2, 3, 3, 3, 4, 5, 7, (1, 3), (3, 1), (2, 5)])
    sh, sw = stride = rng.choice([(1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (3, 3), (1, 2), (2, 1)])
    dh, dw = rng.choice([(1, 1), (1, 1), (1, 1), (2, 2), (3, 3), (1, 2)])
    # Never dilated and strided along one dimension: eager itself (oneDNN) segfaults on some
    # such convs (channels_last input of width 1, with padding).
    dilation = (dh if sh == 1 else 1, dw if sw == 1 else 1)
    pads = [0, 0, 1, 1, 2, 3, (0, 1), (2, 1), "valid"] + ["same"] * 2 * (stride == (1, 1))
    conv = nn.Conv2d(c, out, kernel, stride, rng.choice(pads), dilation, groups, bias=rng.random() < 0.7)
    with torch.no_grad():  # unit-variance outputs at any depth (the default init shrinks them)
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in**0.5)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(out, generator=gen) * 0.2)
    return conv


def _random_pool(rng: random.Random) -> nn.Module:
    """A MaxPool2d, AvgPool2d or AdaptiveAvgPool2d to 1x1 with random
    kernel, stride, padding (at most half the kernel), dilation and rounding."""
    kind = rng.random()
    if kind < 0.1:
        return nn.AdaptiveAvgPool2d(rng.choice([1, (1, 1)]))
    kernel = rng.choice([1, 2, 2, 3, 3, 4, 5, (2, 3), (3, 1)])
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    stride = rng.choice([None, None, 1, 2, 3, (1, 2)])
    padding = rng.choice([0, (kh // 2, kw // 2), (rng.randint(0, kh // 2), rng.randint(0, kw // 2))])
    ceil_mode = rng.random() < 0.4
    if kind < 0.55:
        return nn.MaxPool2d(kernel, stride, padding, rng.choice([1, 1, 2, (2, 1)]), ceil_mode=ceil_mode)
    divisor = rng.choice([None, None, rng.randint(1, 10)])
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode, rng.random() < 0.5, divisor)


def _random_linear(rng: random.Random, gen: torch.Generator, features: int) -> nn.Linear:
    """A Linear taking ``features`` inputs, with unit-variance outputs."""
    out = rng.randint(1, 32)
    lin = nn.Linear(features, out, bias=rng.random() < 0.8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, features, generator=gen) / features**0.5)
        if lin.bias is not None:
            lin.bias.copy_(torch.randn(out, generator=gen) * 0.2)
    return lin


def random_conv_chain(rng: random.Random, max_depth: int = 7, max_channels: int = 24, max_size: int = 57):
    """A random valid chain of conv-fusible modules (eval mode) and its input's
    (C, H, W): Conv2d, BatchNorm2d, activations, pooling and no-ops with at
    least one Conv2d or BatchNorm2d, then sometimes Flatten and a tail of
    Linear, activations and BatchNorm1d (after a Linear). Each module is drawn
    until eager accepts the shape reaching it, so the chain accepts its input.
    Spatial sizes are mostly at most 16, one chain in ten up to ``max_size``."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    size = max_size if rng.random() < 0.1 else min(max_size, 16)
    shape = (1, rng.randint(1, max_channels), rng.randint(1, size), rng.randint(1, size))
    in_shape = shape[1:]
    mods: List[nn.Module] = []
    depth = rng.randint(1, max_depth)
    for i in range(depth):
        needs_conv = i == depth - 1 and not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in mods)
        for _ in range(20):  # draws until one fits the current shape
            kind = rng.random() * (0.55 if needs_conv else 1.0)
            if kind < 0.4:
                m = _random_conv2d(rng, gen, shape[1], max_channels)
            elif kind < 0.55:
                m = nn.BatchNorm2d(shape[1], eps=rng.choice([1e-5, 1e-3]), affine=rng.random() < 0.8)
                randomize_batchnorm(m, gen)
            elif kind < 0.8:
                m = rng.choice(ACTIVATIONS)()
            elif kind < 0.92:
                m = _random_pool(rng)
            else:
                m = rng.choice([nn.Identity(), nn.Dropout(0.3), nn.Dropout2d(0.3)])
            out = _output_shape(m.eval(), shape)
            if out is not None:
                break
        else:  # nothing fitted (a 1x1 map with an unlucky draw): BatchNorm2d always does
            m = nn.BatchNorm2d(shape[1]).eval()
            randomize_batchnorm(m, gen)
            out = shape
        mods.append(m)
        shape = out
    features = shape[1] * shape[2] * shape[3]
    if features <= 1024 and rng.random() < 0.35:
        mods.append(nn.Flatten())
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.5:
                mods.append(_random_linear(rng, gen, features))
                features = mods[-1].out_features
            elif kind < 0.7 and any(isinstance(m, nn.Linear) for m in mods):
                mods.append(nn.BatchNorm1d(features, affine=rng.random() < 0.8))
                randomize_batchnorm(mods[-1], gen)
            else:
                mods.append(rng.choice(ACTIVATIONS)())
    for m in mods:
        m.eval()
    return mods, in_shape
