"""The fused convolution path: runs of Conv2d, BatchNorm2d, activations,
pooling and no-ops (then optionally Flatten and an MLP tail) run as one
seqfuse::conv_forward segment and match nn.Sequential in values, shape, dtype
and memory format. Random chains, targeted geometries, input layouts, special
values, both engines and every kernel variant, errors, explain() and state."""

from __future__ import annotations

import contextlib
import copy
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential

from conftest import (
    ACTIVATIONS,
    CONV_FUSIBLE_TYPES,
    assert_matches_eager,
    forbid_eager,
    random_conv_chain,
    randomize_batchnorm,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "channels_last_sliced", "expanded", "offset"]
NAN, INF = float("nan"), float("inf")


def stable_rng(*key):
    """A random.Random seeded from ``key`` alone: the same chains on every run
    (conftest's ``rng`` fixture seeds from ``hash()`` of a string, which
    Python salts per process)."""
    return random.Random("-".join(map(str, key)))


def make_input(shape, dtype=torch.float32, layout="contiguous", gen=None, scale=1.0):
    """A random (N, C, H, W) input in ``layout``: NCHW-contiguous,
    channels_last, a channel window and every other column of a wider tensor
    ("sliced"), a view whose memory order is C, N, W, H ("permuted"), every
    other row of a channels_last tensor, a batch expanded from one sample
    (stride 0), or a contiguous tensor at a storage offset. The dtype is set
    before taking the view, so the strides are the layout's."""
    n, c, h, w = shape

    def randn(*size):
        return (torch.randn(size, generator=gen) * scale).to(dtype)

    if layout == "contiguous":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return randn(n, c + 2, h, 2 * w)[:, 1 : c + 1, :, ::2]
    if layout == "permuted":
        return randn(c, n, w, h).permute(1, 0, 3, 2)
    if layout == "channels_last_sliced":
        return randn(n, c, 2 * h, w).contiguous(memory_format=torch.channels_last)[:, :, ::2]
    if layout == "expanded":
        return randn(1, c, h, w).expand(n, c, h, w)
    if layout == "offset":
        return randn(n + 1, c, h, w)[1:]
    raise ValueError(f"unknown layout {layout!r}")


def prepared(mods, seed=0):
    """``mods`` in eval mode, with seeded random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in mods:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            randomize_batchnorm(m, gen)
        m.eval()
    return mods


def eager(mods, x):
    """nn.Sequential's output for the same modules."""
    with torch.no_grad():
        return nn.Sequential(*mods)(x)


def assert_same_layout(out, expected):
    """``out`` has ``expected``'s memory format (NCHW-contiguous, channels_last,
    both for degenerate shapes, or neither)."""
    got = (out.is_contiguous(), out.is_contiguous(memory_format=torch.channels_last))
    want = (expected.is_contiguous(), expected.is_contiguous(memory_format=torch.channels_last))
    assert got == want, f"(contiguous, channels_last) {got} != eager's {want}; strides {out.stride()}"


def segment_header(explanation, segment):
    """The line of ``str(explanation)`` that introduces ``segment``."""
    prefix = f"  [{segment.start}:{segment.stop}]"
    (line,) = [line for line in str(explanation).splitlines() if line.startswith(prefix)]
    return line


def assert_one_conv_segment(model):
    """All of ``model``'s children form one fused seqfuse::conv_forward segment."""
    explanation = model.explain()
    segments = explanation.segments
    assert len(segments) == 1 and segments[0].fused, str(explanation)
    assert "seqfuse::conv_forward" in segment_header(explanation, segments[0]), str(explanation)


def check_fused(mods, x):
    """Runs ``mods`` in a FusedSequential on ``x`` while every conv-fusible
    module's eager forward raises, and checks the output against nn.Sequential
    (values, shape, dtype, memory format), that the input is unchanged and
    that the children form one seqfuse::conv_forward segment. A failure
    names the chain and the input. Empty batches are compared but not
    required to run fused."""
    model = FusedSequential(*mods)
    before = x.clone()
    # An empty batch runs eagerly by design (nothing to compute; eager's
    # output strides for it are each op's own choice).
    guard = forbid_eager(*CONV_FUSIBLE_TYPES) if x.shape[0] else contextlib.nullcontext()
    try:
        with torch.no_grad(), guard:
            out = model(x)
        torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)
        expected = eager(mods, x)
        if expected.numel() and not expected.isfinite().any():
            # e.g. a dilated max pool whose windows all lie in the padding (-inf); the
            # tolerance rule of assert_matches_eager needs a finite element to compare
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        else:
            assert_matches_eager(out, mods, x)
        assert_same_layout(out, expected)
        assert_one_conv_segment(model)
    except Exception as err:
        where = f"chain: {mods}\n  input: {x.dtype} {tuple(x.shape)} strides {x.stride()}"
        raise AssertionError(f"{type(err).__name__}: {err}\n  {where}") from err
    return out


def conv_with_weights(weight, bias=None, **kwargs):
    """A Conv2d holding the given weight (and bias, else none)."""
    out_c, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * kwargs.get("groups", 1), out_c, (kh, kw), bias=bias is not None, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


# ---------------------------------------------------------------- random chains


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(80))
def test_random_conv_chains(seed, dtype):
    rng = stable_rng("random_conv_chains", seed, dtype)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(4):
        mods, (c, h, w) = random_conv_chain(rng)
        mods = [m.to(dtype) for m in mods]
        batch = rng.choice([0, 1, 1, 2, 3, 5, 7])
        x = make_input((batch, c, h, w), dtype, rng.choice(LAYOUTS), gen, scale=rng.choice([0.5, 1.0, 3.0]))
        check_fused(mods, x)


# ---------------------------------------------------------- targeted geometries

# name -> (modules factory, input shapes); weights from torch.manual_seed(0),
# BatchNorm statistics from prepared().
TARGETED = {
    "same_even_kernel": (lambda: [nn.Conv2d(3, 5, 4, padding="same")], [(2, 3, 9, 8), (1, 3, 1, 2)]),
    "same_even_kernel_dilated": (
        lambda: [nn.Conv2d(3, 5, (2, 4), padding="same", dilation=(3, 1)), nn.ReLU()],
        [(1, 3, 7, 10)],
    ),
    "same_odd_kernel_even_dilation": (
        lambda: [nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False)],
        [(3, 4, 5, 6)],
    ),
    "same_kernel_wider_than_input": (lambda: [nn.Conv2d(2, 3, 6, padding="same")], [(1, 2, 3, 2)]),
    "valid": (lambda: [nn.Conv2d(3, 4, 3, padding="valid"), nn.Tanh()], [(2, 3, 3, 3), (2, 3, 10, 7)]),
    "stride_2_padding_1": (
        lambda: [nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()],
        [(3, 4, 9, 9), (1, 4, 8, 8)],
    ),
    "stride_padding_dilation_rectangular": (
        lambda: [nn.Conv2d(3, 6, (5, 3), stride=(3, 2), padding=(2, 1), dilation=(1, 2))],
        [(2, 3, 11, 13)],
    ),
    "padding_larger_than_kernel": (lambda: [nn.Conv2d(2, 3, 3, padding=4), nn.SiLU()], [(1, 2, 2, 5)]),
    "depthwise_3x3": (
        lambda: [nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()],
        [(2, 8, 7, 7), (1, 8, 1, 1)],
    ),
    "depthwise_multiplier_2": (lambda: [nn.Conv2d(6, 12, 3, padding=1, groups=6), nn.Hardswish()], [(3, 6, 10, 9)]),
    "depthwise_multiplier_3_stride_2": (
        lambda: [nn.Conv2d(4, 12, 3, stride=2, padding=1, groups=4), nn.GELU()],
        [(2, 4, 9, 8)],
    ),
    "pointwise": (
        lambda: [nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 1, bias=False)],
        [(2, 16, 5, 7)],
    ),
    "pointwise_stride_2": (lambda: [nn.Conv2d(5, 7, 1, stride=2)], [(3, 5, 9, 6)]),
    "groups_2": (lambda: [nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.LeakyReLU(0.1)], [(2, 8, 6, 6)]),
    "groups_4": (
        lambda: [nn.Conv2d(8, 16, 3, groups=4), nn.BatchNorm2d(16, affine=False), nn.Sigmoid()],
        [(3, 8, 7, 5)],
    ),
    "in_and_out_channels_1": (
        lambda: [nn.Conv2d(1, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Conv2d(1, 4, 2), nn.Conv2d(4, 1, 3, padding=1)],
        [(2, 1, 6, 6), (1, 1, 4, 5)],
    ),
    "spatial_1x1": (
        lambda: [
            nn.Conv2d(4, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.MaxPool2d(2, padding=1),
            nn.AvgPool2d(1),
            nn.AdaptiveAvgPool2d(1),
        ],
        [(3, 4, 1, 1)],
    ),
    # pools after a conv or a BatchNorm2d (runs of pools alone: test_pooling_only_runs_fuse)
    "maxpool_ceil_mode": (
        lambda: [nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True)],
        [(2, 3, 7, 5), (1, 3, 1, 1)],
    ),
    "maxpool_ceil_mode_last_window_dropped": (
        # H=5: ceil gives 4 windows, the last would start in the padding and is dropped
        lambda: [nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True)],
        [(2, 3, 5, 5), (1, 3, 2, 3)],
    ),
    "maxpool_ceil_mode_padded": (
        lambda: [nn.Conv2d(3, 3, 1), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)],
        [(2, 3, 6, 5), (1, 3, 2, 2)],
    ),
    "maxpool_dilation": (
        lambda: [
            nn.BatchNorm2d(3),
            nn.MaxPool2d(3, stride=1, padding=1, dilation=2),
            nn.MaxPool2d((2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True),
        ],
        [(2, 3, 9, 8)],
    ),
    "avgpool_ceil_mode_count_include_pad": (
        lambda: [nn.BatchNorm2d(3), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)],
        [(2, 3, 6, 5), (1, 3, 2, 2)],
    ),
    "avgpool_ceil_mode_exclude_pad": (
        lambda: [nn.Conv2d(3, 3, 3, padding=1), nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)],
        [(2, 3, 6, 5), (1, 3, 2, 2)],
    ),
    "avgpool_ceil_mode_last_window_dropped": (
        lambda: [
            nn.BatchNorm2d(3),
            nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True),
            nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        ],
        [(2, 3, 5, 5), (1, 3, 9, 3)],
    ),
    "avgpool_divisor_override": (
        lambda: [
            nn.Conv2d(3, 3, 1),
            nn.AvgPool2d(2, divisor_override=3),
            nn.AvgPool2d(3, 2, 1, ceil_mode=True, divisor_override=5),
        ],
        [(2, 3, 8, 9)],
    ),
    "adaptive_pool_linear_head": (
        lambda: [
            nn.Conv2d(3, 16, 3),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        ],
        [(2, 3, 9, 9), (1, 3, 3, 3)],
    ),
    "adaptive_pool_mlp_head": (
        lambda: [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.GELU(approximate="tanh"),
            nn.Dropout(0.2),
            nn.Linear(16, 3),
        ],
        [(3, 3, 5, 4)],
    ),
    "flatten_spatial_map": (
        lambda: [nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)],
        [(3, 2, 8, 8), (1, 2, 9, 9)],
    ),
    "vgg_like": (
        lambda: [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(32, 10),
        ],
        [(2, 3, 16, 16), (1, 3, 17, 19)],
    ),
    "mobilenet_like": (
        lambda: [
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 16, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(32),
            nn.SiLU(),
            nn.Conv2d(32, 24, 1, bias=False),
            nn.BatchNorm2d(24),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(24, 10),
        ],
        [(2, 3, 32, 32), (1, 3, 15, 17)],
    ),
    "resnet_stem_larger": (
        lambda: [
            nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        ],
        [(4, 3, 57, 57), (2, 3, 64, 48)],
    ),
    "batchnorm2d_only": (lambda: [nn.BatchNorm2d(5), nn.ReLU()], [(2, 5, 4, 3)]),
    "leading_activation_and_noops": (
        lambda: [nn.Identity(), nn.Tanh(), nn.Dropout2d(0.5), nn.Conv2d(3, 4, 3), nn.Dropout(0.1), nn.Identity()],
        [(2, 3, 5, 5)],
    ),
}

# (dtype, layout) pairs each targeted case runs with
TARGETED_VARIANTS = [
    (torch.float32, "contiguous"),
    (torch.float32, "channels_last"),
    (torch.float64, "sliced"),
    (torch.bfloat16, "permuted"),
]


def targeted(case):
    """The modules (eval, float32, seeded) and input shapes of a TARGETED case."""
    make, shapes = TARGETED[case]
    torch.manual_seed(0)
    return prepared(make()), shapes


@pytest.mark.parametrize("case", TARGETED)
def test_targeted(case):
    mods, shapes = targeted(case)
    gen = torch.Generator().manual_seed(1)
    for dtype, layout in TARGETED_VARIANTS:
        typed = [copy.deepcopy(m).to(dtype) for m in mods]
        for shape in shapes:
            check_fused(typed, make_input(shape, dtype, layout, gen))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "case",
    ["adaptive_pool_mlp_head", "vgg_like", "depthwise_3x3", "depthwise_multiplier_2", "avgpool_ceil_mode_exclude_pad"],
)
def test_empty_batch(case, layout):
    mods, shapes = targeted(case)
    for dtype in DTYPES:
        typed = [copy.deepcopy(m).to(dtype) for m in mods]
        check_fused(typed, make_input((0,) + shapes[0][1:], dtype, layout))


def test_spatial_sizes_1_to_57():
    torch.manual_seed(0)
    mods = prepared(
        [
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(4, 4, 2, stride=2, padding=1),
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        ]
    )
    gen = torch.Generator().manual_seed(1)
    for size in range(1, 58):
        layout = "channels_last" if size % 2 else "contiguous"
        check_fused(mods, make_input((1 + size % 3, 3, size, 58 - size), layout=layout, gen=gen))


@pytest.mark.parametrize(
    "make",
    [
        lambda: [nn.MaxPool2d(2)],
        lambda: [nn.AvgPool2d(3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)],
    ],
    ids=["max_pool", "avg_pool_relu_max_pool"],
)
def test_pooling_only_runs_stay_eager(make):
    """Pools and activations alone have no parameters to fix the run's dtype:
    they run eagerly, and explain() says why."""
    torch.manual_seed(0)
    mods = prepared(make())
    model = FusedSequential(*mods)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(mods, x))
    explanation = model.explain()
    assert not explanation.fused_segments
    assert all("nothing to fuse" in r for r in explanation.eager_segments[0].reasons)


def test_pooling_with_a_linear_head_fuses():
    torch.manual_seed(0)
    check_fused(prepared([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)]), torch.randn(2, 3, 7, 6))


@pytest.mark.parametrize(
    "make",
    [
        lambda: [nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)],
        lambda: [nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.GELU(), nn.BatchNorm1d(36)],
    ],
    ids=["batchnorm1d_first", "activation_then_batchnorm1d"],
)
def test_batchnorm1d_right_after_flatten_stays_in_the_conv_segment(make):
    """The tail after Flatten may start with BatchNorm1d or an activation, not only a Linear."""
    torch.manual_seed(0)
    check_fused(prepared(make()), torch.randn(3, 3, 7, 7))


# ---------------------------------------------------------------- input layouts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "case",
    ["mobilenet_like", "flatten_spatial_map", "stride_padding_dilation_rectangular", "maxpool_dilation", "groups_4"],
)
def test_input_layouts(case, layout):
    mods, shapes = targeted(case)
    gen = torch.Generator().manual_seed(2)
    for shape in shapes:
        check_fused(mods, make_input(shape, torch.float32, layout, gen))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: [nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()], (2, 8, 7, 7)),
        (lambda: [nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 5, 2, padding=1)], (2, 8, 6, 6)),
        (lambda: [nn.AdaptiveAvgPool2d(1), nn.Sigmoid(), nn.Conv2d(8, 5, 2, padding=1)], (2, 8, 6, 6)),
        (lambda: [nn.BatchNorm2d(8)], (0, 8, 7, 7)),
    ],
    ids=["depthwise", "conv_pool_to_1x1_conv", "pool_to_1x1_conv", "batchnorm2d_empty_batch"],
)
def test_output_memory_format_follows_eager(make, shape, layout):
    """Eager picks each op's output format from its input's strides, so an
    empty batch or a 1x1 map (contiguous in both formats at once) in the
    middle of a channels_last chain changes what comes out; fused must agree."""
    torch.manual_seed(0)
    check_fused(prepared(make()), make_input(shape, layout=layout))


def test_unbatched_3d_input_runs_eagerly_and_matches():
    torch.manual_seed(0)
    mods = prepared([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)])
    model = FusedSequential(*mods)
    x = torch.randn(3, 8, 8)
    with torch.no_grad():
        out = model(x)
    assert_matches_eager(out, mods, x)
    assert_same_layout(out, eager(mods, x))
    batched = torch.randn(2, 3, 8, 8)  # the same model still runs fused on 4-D input
    with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
        out = model(batched)
    assert_matches_eager(out, mods, batched)


# ------------------------------------------------------------- special values


def special_values(shape, seed=0):
    """A seeded random input of ``shape``: one element in four is NaN, inf or
    -inf, the others finite and large enough to saturate the activations
    (so an output, even of a pool, still has finite elements to compare)."""
    gen = torch.Generator().manual_seed(seed)
    finite = torch.randn(shape, generator=gen) * 30
    pick = torch.randint(0, 12, shape, generator=gen)
    return torch.where(pick < 3, torch.tensor([NAN, INF, -INF])[pick.clamp(max=2)], finite)


@pytest.mark.parametrize("make_act", ACTIVATIONS, ids=lambda f: repr(f()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_through_each_activation_and_pool(make_act, dtype):
    """NaN and +-inf reach the activation unmixed (an identity BatchNorm2d),
    then a max pool (which propagates NaN) and an average pool."""
    x = special_values((2, 3, 6, 5)).to(dtype)
    for pool in (nn.Identity(), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True)):
        bn = nn.BatchNorm2d(3, eps=0.0).eval().to(dtype)  # identity: mean 0, var 1
        check_fused([bn, make_act(), pool], x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_through_convs(dtype):
    """Identity 1x1 convs pass NaN and +-inf to the pools unmixed; 3x3 convs
    (dense and depthwise) with non-negative weights see NaN and +inf only, so
    every window sums to a finite value, +inf or NaN without inf - inf."""
    gen = torch.Generator().manual_seed(0)
    identity = conv_with_weights(torch.eye(3).view(3, 3, 1, 1), torch.zeros(3))
    x = special_values((2, 3, 7, 6)).to(dtype)
    for pool in (nn.MaxPool2d(3, stride=1, padding=1), nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)):
        check_fused([identity.to(dtype), pool], x)
    x = torch.randn(2, 3, 7, 6, generator=gen)
    x[0, 0, 3, 3], x[0, 1, 0, 5], x[1, 2, 6, 0], x[1, 0, 2, 2] = INF, NAN, INF, NAN
    x = x.to(dtype)
    dense = conv_with_weights(torch.rand(4, 3, 3, 3, generator=gen), torch.rand(4, generator=gen), padding=1)
    depthwise = conv_with_weights(torch.rand(6, 1, 3, 3, generator=gen), padding=1, groups=3)
    for conv in (dense, depthwise):
        check_fused([conv.to(dtype), nn.ReLU(), nn.MaxPool2d(2)], x)


# ------------------------------------------------------ engines and CPU variants


@pytest.mark.parametrize("seed", range(3))
def test_random_chains_every_engine_and_kernel_variant(seed, cpu_capability, engine):
    rng = stable_rng("every_engine_and_kernel_variant", seed, cpu_capability, engine)
    gen = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        mods, (c, h, w) = random_conv_chain(rng, max_size=20)
        mods = [m.to(dtype) for m in mods]
        x = make_input((rng.choice([1, 2, 5]), c, h, w), dtype, rng.choice(["contiguous", "channels_last"]), gen)
        check_fused(mods, x)


@pytest.mark.parametrize("grouping", ["depthwise", "grouped"])
@pytest.mark.parametrize("kernel", [3, 5, (3, 5), 2])
def test_direct_grouped_geometries_in_the_fused_kernel(kernel, grouping, cpu_capability):
    """The direct depthwise and grouped kernels (groups of at most 16 output
    channels): row segments, border columns and rows, partial channel vectors,
    pixel blocks, unrolled 3x3 / 5x5 taps, on every kernel variant, with the
    pixel range split mid-row across threads."""
    from seqfuse import ops

    rng = stable_rng("depthwise", kernel, cpu_capability)
    gen = torch.Generator().manual_seed(7)
    ops.set_engine_override(ops.ENGINE_FUSED)
    threads = torch.get_num_threads()
    try:
        for i in range(10):
            c = rng.choice([3, 8, 13, 24, 40])
            groups, c_out = c, c
            if grouping == "grouped":
                groups = rng.choice([2, 3, 5])
                c, c_out = groups * rng.choice([1, 2, 8]), groups * rng.choice([1, 3, 8, 9, 16])
            stride, dilation = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
            padding = "same" if stride == 1 and rng.random() < 0.3 else rng.choice([0, 1, 2])
            h, w = rng.randint(1, 12), rng.randint(1, 14)
            kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
            if (h + 2 * (padding if isinstance(padding, int) else kh) - dilation * (kh - 1) - 1 < 0
                    or w + 2 * (padding if isinstance(padding, int) else kw) - dilation * (kw - 1) - 1 < 0):
                continue
            conv = nn.Conv2d(c, c_out, kernel, stride, padding, dilation, groups=groups, bias=rng.random() < 0.5)
            act = rng.choice([nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.SiLU()])
            mods = prepared([conv, nn.BatchNorm2d(c_out), act], seed=i)
            torch.set_num_threads(rng.choice([1, 2, 3]))
            layout = rng.choice(["contiguous", "channels_last"])
            dtype = rng.choice([torch.float32, torch.float32, torch.float64])
            mods = [m.to(dtype) for m in mods]
            check_fused(mods, make_input((rng.choice([1, 2]), c, h, w), dtype, layout, gen))
    finally:
        torch.set_num_threads(threads)
        ops.set_engine_override(None)


def test_winograd_engine_matches_eager(cpu_capability):
    """Engine 3 (3x3 stride-1 convolutions as Winograd F(2x2, 3x3) tiles):
    chains of such convolutions between others, map sizes odd and even down
    to 1x1, every padding, channel counts off the vector width, batches of
    1-5 (per-image and stage-by-stage runs), 1-3 threads (tile-row and
    channel splits), float32 and float64, on every kernel variant; and the
    engine really ran (its stages are the ones profiled)."""
    from seqfuse import ops

    rng = stable_rng("winograd", cpu_capability)
    gen = torch.Generator().manual_seed(11)
    ops.set_engine_override(ops.ENGINE_WINOGRAD)
    threads = torch.get_num_threads()
    try:
        for i in range(8):
            c, c2 = rng.choice([16, 19, 32, 48]), rng.choice([16, 24, 33, 64])
            padding = rng.choice([0, 1, 2, "same"])
            h, w = rng.randint(3, 30), rng.randint(3, 30)
            act = rng.choice([nn.ReLU(), nn.SiLU(), nn.GELU(), nn.Identity()])
            mods = [nn.Conv2d(c, c2, 3, padding=padding, bias=rng.random() < 0.5), nn.BatchNorm2d(c2), act,
                    nn.Conv2d(c2, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU()]
            if rng.random() < 0.5:
                mods = [nn.Conv2d(c, c, 1), nn.ReLU()] + mods + [nn.MaxPool2d(2, ceil_mode=True)]
            mods = [m for m in prepared(mods, seed=i) if not isinstance(m, nn.Identity)]
            torch.set_num_threads(rng.choice([1, 2, 3]))
            dtype = rng.choice([torch.float32, torch.float32, torch.float64])
            mods = [m.to(dtype) for m in mods]
            x = make_input((rng.choice([1, 2, 5]), c, h, w), dtype, rng.choice(["contiguous", "channels_last"]), gen)
            check_fused(mods, x)
        torch.set_num_threads(threads)
        p = seqfuse.profile(FusedSequential(*mods), x, repeats=1)
        assert p.chains[0].engine == ops.CONV_ENGINE_NAMES[ops.ENGINE_WINOGRAD], str(p)
    finally:
        torch.set_num_threads(threads)
        ops.set_engine_override(None)


@pytest.mark.parametrize(
    "case",
    [
        "same_even_kernel_dilated",
        "depthwise_multiplier_3_stride_2",
        "groups_4",
        "avgpool_divisor_override",
        "vgg_like",
        "mobilenet_like",
    ],
)
def test_targeted_every_engine_and_kernel_variant(case, cpu_capability, engine):
    mods, shapes = targeted(case)
    for dtype, layout in TARGETED_VARIANTS[:2] + [(torch.bfloat16, "channels_last")]:
        typed = [copy.deepcopy(m).to(dtype) for m in mods]
        check_fused(typed, make_input(shapes[0], dtype, layout))


# ------------------------------------------------------------------------ errors


def named(mods):
    """A FusedSequential keyed by names, not indices (conv2d0, batchnorm2d1, ...)."""
    return FusedSequential(OrderedDict((f"{type(m).__name__.lower()}{i}", m) for i, m in enumerate(mods)))


def raised(module, x):
    """The exception ``module(x)`` raises under no_grad."""
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            module(x)
    return info.value


# name -> (modules factory, bad input shape, index of the failing child, good input shape)
ERROR_CASES = {
    "wrong_channel_count": (
        lambda: [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()],
        (2, 4, 10, 10),
        0,
        (2, 3, 10, 10),
    ),
    "3d_input_into_batchnorm2d": (
        lambda: [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()],
        (3, 10, 10),
        1,
        (2, 3, 10, 10),
    ),
    "smaller_than_kernel": (lambda: [nn.Conv2d(3, 8, 5), nn.ReLU()], (2, 3, 3, 3), 0, (2, 3, 5, 5)),
    "smaller_than_later_kernel": (
        lambda: [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)],
        (2, 3, 6, 6),
        3,
        (2, 3, 8, 8),
    ),
    "smaller_than_pool": (lambda: [nn.Conv2d(3, 4, 1), nn.MaxPool2d(3)], (1, 3, 2, 2), 1, (1, 3, 3, 3)),
    "batchnorm2d_wrong_channels": (lambda: [nn.Conv2d(3, 8, 1), nn.BatchNorm2d(6)], (2, 3, 4, 4), 1, None),
    "flatten_linear_wrong_in_features": (
        lambda: [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 10)],
        (2, 3, 8, 8),
        3,
        (2, 3, 7, 7),
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_names_child_and_shape_and_module_recovers(case):
    make, bad_shape, index, good_shape = ERROR_CASES[case]
    torch.manual_seed(0)
    mods = prepared(make())
    model = named(mods)
    x = torch.randn(bad_shape)
    expected = raised(nn.Sequential(*mods), x)
    got = raised(model, x)
    key, child = list(model._modules.items())[index]
    with torch.no_grad():
        child_input = nn.Sequential(*mods[:index])(x)
    prefix = f"FusedSequential child '{key}' ({child!r}) failed on input of shape {tuple(child_input.shape)}"
    assert type(got) is type(expected)
    assert str(got).startswith(prefix), str(got)
    assert str(expected) in str(got)
    if good_shape is not None:  # still usable, and still fused
        good = torch.randn(good_shape)
        with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
            out = model(good)
        assert_matches_eager(out, mods, good)


# ---------------------------------------------------------- modes, plan, state


def test_training_mode_runs_eagerly_and_matches():
    torch.manual_seed(0)
    mods = prepared(TARGETED["mobilenet_like"][0]()[:-2])  # no Dropout: train mode would draw masks
    model, reference = FusedSequential(*mods).train(), nn.Sequential(*copy.deepcopy(mods)).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics updated alike
    model.eval()
    with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
        out = model(x)
    assert_matches_eager(out, list(reference.eval()), x)


def test_parameter_and_statistics_edits_are_seen():
    mods, shapes = targeted("mobilenet_like")
    model = FusedSequential(*mods)
    x = torch.randn(shapes[0])
    with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
        model(x)
        mods[3].weight.mul_(-2.0)  # depthwise conv weight, in place
        mods[7].running_var.add_(0.5)  # BatchNorm2d statistics, in place
        out = model(x)
    assert_matches_eager(out, mods, x)


def test_explain_names_conv_forward_and_every_child():
    mods, _ = targeted("vgg_like")
    text = str(FusedSequential(*mods).explain())
    assert "seqfuse::conv_forward" in text and "seqfuse::mlp_forward" not in text
    for i in range(len(mods)):
        assert any(line.startswith(f"    ({i}) ") for line in text.splitlines()), text


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_mode_runs_eagerly_with_a_reason(padding_mode):
    torch.manual_seed(0)
    mods = prepared(
        [nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)]
    )
    model = FusedSequential(*mods)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), forbid_eager(nn.ReLU, nn.BatchNorm2d):
        out = model(x)
    assert_matches_eager(out, mods, x)
    explanation = model.explain()
    first = explanation.segments[0]
    assert not first.fused and first.start == 0 and first.reasons[0].strip()
    (line,) = [line for line in str(explanation).splitlines() if line.startswith("    (0) ")]
    assert line.split(repr(mods[0]), 1)[1].strip(), line
    fused = explanation.fused_segments
    assert [(s.start, s.stop) for s in fused] == [(1, 4)], str(explanation)
    assert "seqfuse::conv_forward" in segment_header(explanation, fused[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_segment_eager_module_then_mlp_segment(layout):
    torch.manual_seed(0)
    mods = prepared(
        [
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Softsign(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 20),
            nn.ReLU(),
            nn.Linear(20, 5),
        ]
    )
    model = FusedSequential(*mods)
    x = make_input((3, 3, 8, 8), layout=layout)
    with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
        out = model(x)
    assert_matches_eager(out, mods, x)
    explanation = model.explain()
    segments = [(s.start, s.stop, s.fused) for s in explanation.segments]
    assert segments == [(0, 4, True), (4, 5, False), (5, 9, True)], str(explanation)
    conv, _, mlp = explanation.segments
    assert "seqfuse::conv_forward" in segment_header(explanation, conv)
    assert "seqfuse::mlp_forward" in segment_header(explanation, mlp)


def test_state_dict_equals_sequential():
    mods, shapes = targeted("mobilenet_like")
    model, plain = FusedSequential(*mods), nn.Sequential(*mods)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(shapes[0])
    with torch.no_grad():
        model(x)  # a plan with folded and packed weights exists now
    state = model.state_dict()
    assert list(state) == list(before)
    for k, v in state.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    fresh = FusedSequential(*TARGETED["mobilenet_like"][0]()).eval()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad(), forbid_eager(*CONV_FUSIBLE_TYPES):
        out = fresh(x)
    assert_matches_eager(out, mods, x)
