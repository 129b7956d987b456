"""Fused forward against nn.Sequential with the same modules: hundreds of
random chains, every activation, dtypes, kernel variants, shapes and values."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from seqfuse import FusedSequential

from conftest import ACTIVATIONS, assert_matches_eager, calls_until_decided, forbid_eager, random_chain, randomize_batchnorm

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def run_fused(mods, x):
    model = FusedSequential(*mods)
    with torch.no_grad(), forbid_eager():
        return model(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(40))
def test_random_chains(seed, dtype):
    rng = random.Random(seed * 7919 + DTYPES.index(dtype))
    for _ in range(4):
        mods, width = random_chain(rng)
        mods = [m.to(dtype) for m in mods]
        batch = rng.choice([0, 1, 2, 3, 7, 31, 64, 129, 700])
        x = torch.randn(batch, width, dtype=dtype) * rng.choice([0.5, 1.0, 3.0])
        assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("seed", range(6))
def test_random_chains_every_kernel_variant(seed, cpu_capability, engine):
    rng = random.Random(seed)
    for dtype in DTYPES:
        mods, width = random_chain(rng, max_width=100)
        mods = [m.to(dtype) for m in mods]
        x = torch.randn(rng.choice([1, 5, 40]), width, dtype=dtype)
        assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("make_act", ACTIVATIONS, ids=lambda f: repr(f()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_activation_wide_range(make_act, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(17, 33).to(dtype)
    mods = [lin, make_act(), nn.Linear(33, 5).to(dtype), make_act()]
    x = (torch.randn(50, 17) * 6).to(dtype)  # reaches the saturating ranges of sigmoid/tanh/gelu
    assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("width", [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 255, 257, 513, 1100])
def test_widths(width):
    torch.manual_seed(width)
    mods = [nn.Linear(width, width), nn.ReLU(), nn.Linear(width, (width * 3) % 97 + 1)]
    for batch in [1, 9, 130]:
        x = torch.randn(batch, width)
        assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("batch", [0, 1, 2, 5, 8, 9, 16, 17, 255, 256, 257, 1000, 5000])
def test_batches(batch):
    torch.manual_seed(batch)
    mods = [nn.Linear(40, 70), nn.SiLU(), nn.Linear(70, 3)]
    x = torch.randn(batch, 40)
    assert_matches_eager(run_fused(mods, x), mods, x)


def test_batchnorm_alone_and_after_activation():
    gen = torch.Generator().manual_seed(0)
    bns = [nn.BatchNorm1d(24, affine=a).eval() for a in (True, False, True)]
    for bn in bns:
        randomize_batchnorm(bn, gen)
    mods = [bns[0], nn.Linear(24, 24), nn.ReLU(), bns[1], nn.Tanh(), nn.Linear(24, 24), bns[2]]
    x = torch.randn(20, 24)
    assert_matches_eager(run_fused(mods, x), mods, x)


def test_leading_activation_and_noops():
    mods = [nn.Identity(), nn.Tanh(), nn.Dropout(0.5).eval(), nn.Linear(12, 8), nn.Identity(), nn.GELU()]
    x = torch.randn(6, 12)
    assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("shape", [(12,), (3, 12), (2, 3, 12), (2, 0, 12), (4, 1, 2, 12)])
def test_input_ranks(shape):
    mods = [nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5)]
    x = torch.randn(*shape)
    assert_matches_eager(run_fused(mods, x), mods, x)


def test_flatten_at_run_start():
    mods = [nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 2)]
    x = torch.randn(5, 3, 4)
    assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("kind", ["transposed", "sliced_rows", "sliced_cols", "expanded"])
def test_non_contiguous_inputs(kind):
    torch.manual_seed(1)
    mods = [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)]
    if kind == "transposed":
        x = torch.randn(16, 10).t()
    elif kind == "sliced_rows":
        x = torch.randn(30, 16)[::3]
    elif kind == "sliced_cols":
        x = torch.randn(10, 48)[:, 8:24]
    else:
        x = torch.randn(1, 16).expand(9, 16)
    assert not x.is_contiguous()
    assert_matches_eager(run_fused(mods, x), mods, x)


@pytest.mark.parametrize("make_act", ACTIVATIONS, ids=lambda f: repr(f()))
def test_nan_and_inf_propagate_like_eager(make_act):
    mods = [nn.Linear(4, 4), make_act()]
    with torch.no_grad():
        mods[0].weight.copy_(torch.eye(4))
        mods[0].bias.zero_()
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0], [1.0, -1.0, 80.0, -90.0]])
    assert_matches_eager(run_fused(mods, x), mods, x)


def test_repeated_module_runs_twice():
    lin = nn.Linear(8, 8)
    mods = [lin, nn.Tanh(), lin, nn.Tanh()]
    x = torch.randn(3, 8)
    assert_matches_eager(run_fused(mods, x), mods, x)


def test_engine_choice_is_measured_and_cached():
    torch.manual_seed(4)
    model = FusedSequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()).eval()
    x = torch.randn(512, 256)
    calls_until_decided(model, x)
    with torch.no_grad():
        out = model(x)
    call = model.__dict__["_seqfuse_plan"].runs[0].call
    assert call.engine_for(512) in (0, 1)  # measured by the first calls of this batch bucket
    assert call.engine_for(1) == 0  # tiny calls never leave the fused kernel
    model.invalidate_plan()
    with torch.no_grad():
        model(x)
    assert model.__dict__["_seqfuse_plan"].runs[0].call.engine_for(512) == call.engine_for(512)  # shared choice
    explanation = model.explain()
    (lo, hi, threads, name, extra), *_ = explanation.engines(explanation.fused_segments[0])
    assert lo <= 512 <= hi and threads == torch.get_num_threads() and extra == () and "(measured)" in str(explanation)
    assert_matches_eager(out, list(model), x)


def test_large_batch_uses_threads_consistently():
    torch.manual_seed(3)
    mods = [nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 100)]
    x = torch.randn(3001, 200)
    out = run_fused(mods, x)
    assert_matches_eager(out, mods, x)
    torch.set_num_threads(1)
    try:
        single = run_fused(mods, x)
    finally:
        torch.set_num_threads(2)
    torch.testing.assert_close(out, single, rtol=0, atol=0)  # row partitioning never changes a row's math


@pytest.mark.parametrize("make_act", ACTIVATIONS, ids=lambda f: repr(f()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinities_through_each_activation(make_act, dtype):
    """+-inf and NaN reach the activation unmixed (a per-channel BatchNorm
    stage, no matmul to smear them), and come out as eager's do."""
    bn = nn.BatchNorm1d(6, eps=0.0).eval().to(dtype)  # identity: mean 0, var 1
    mods = [bn, make_act()]
    x = torch.tensor([[float("inf"), -float("inf"), float("nan"), 0.0, 100.0, -100.0]] * 3, dtype=dtype)
    assert_matches_eager(run_fused(mods, x), mods, x)
