"""Training through fused segments: the training ops' forward and fused
backward against nn.Sequential (outputs, input and parameter gradients,
running statistics, several optimizer steps), gradcheck of every fused
pattern, the ops' registrations (opcheck, torch.compile), and the routes
around them (eager fallbacks, errors, double backward)."""

from __future__ import annotations

import contextlib
import copy
import random
import warnings

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential, ops
from seqfuse.planner import plan_segments

from conftest import ACTIVATIONS, CONV_FUSIBLE_TYPES, FUSIBLE_TYPES, forbid_eager, random_chain, random_conv_chain

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_variant(bn, rng: random.Random):
    """A copy of ``bn`` with random momentum (including None), affine and
    track_running_stats (random statistics when tracked)."""
    track = rng.random() < 0.75
    new = type(bn)(bn.num_features, eps=bn.eps, momentum=rng.choice([0.1, 0.5, None]), affine=bn.affine,
                   track_running_stats=track)
    new.load_state_dict(bn.state_dict(), strict=False) if track else None
    if new.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    return new


def _training_chain(mods, rng: random.Random, freeze: bool = True):
    """Varies every BatchNorm's options, freezes some parameters, and puts
    everything in training mode (Dropout with p=0)."""
    out = [_bn_variant(m, rng) if type(m) in BN_TYPES else m for m in mods]
    for m in out:
        m.train()
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0  # runs eagerly in training mode (a mixed chain) without random masks to compare
        for p in m.parameters(recurse=False):
            if freeze and rng.random() < 0.15:
                p.requires_grad_(False)
    return out


def _assert_matches(fused, eager, ref64, what: str, magnitude: float = 1.0):
    """assert_close (fp32 defaults; tight for float64). Where a float32
    reduction of thousands of terms rounds differently from eager's, the
    fused value must be no further from the float64 twin's than a few times
    eager's own distance (plus a little): the same float rounding in another
    order, amplified alike by an ill-conditioned chain (a BatchNorm over two
    values) and by the optimizer steps before."""
    if fused is None or eager is None:
        assert fused is None and eager is None, what
        return
    if eager.dtype == torch.float64:
        torch.testing.assert_close(fused, eager, equal_nan=True, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")
        return
    try:
        torch.testing.assert_close(fused, eager, equal_nan=True)
        return
    except AssertionError:
        if ref64 is None:
            raise
    assert fused.shape == eager.shape, what
    assert torch.equal(fused.isnan(), eager.isnan()), what
    finite = ref64.isfinite() & eager.isfinite()
    if not finite.any():
        return
    f_err = (fused.double() - ref64)[finite].abs().max()
    e_err = (eager.double() - ref64)[finite].abs().max()
    if ref64[finite].abs().max() < 1e-9:
        # A gradient that is exactly zero (a bias before a training-mode
        # BatchNorm): both sides hold rounding noise of the terms summed,
        # which scales with the gradients flowing (`magnitude`).
        bound = max(10 * e_err, 1e-5 * max(1.0, magnitude))
        assert f_err <= bound, f"{what}: fused noise {f_err:.3g}, eager noise {e_err:.3g}"
        return
    scale = ref64[finite].abs().max().clamp_min(1.0)
    assert f_err <= 4 * e_err + 1e-5 * scale, f"{what}: fused error {f_err:.3g}, eager error {e_err:.3g}"


def _run_steps(mods, make_input, steps: int = 3, lr: float = 0.05, dtype=torch.float32, input_grad: bool = True,
               forbid=(), seed: int = 0):
    """Trains nn.Sequential and FusedSequential copies side by side with SGD
    (momentum), comparing outputs, input and parameter gradients, parameters
    and buffers after every step (float32 runs also train a float64 twin of
    nn.Sequential, the reference for rounding). The fused model's forward and
    backward run under forbid_eager(*forbid) when given. Returns it."""
    torch.manual_seed(seed)  # inputs and output gradients: reproducible
    ref = nn.Sequential(*mods).to(dtype)
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    twin = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    models = [m for m in (ref, fused, twin) if m is not None]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=0.9)
            if any(p.requires_grad for p in m.parameters()) else None for m in models]
    names = [n for n, _ in ref.named_parameters()]
    buffer_names = [n for n, _ in ref.named_buffers()]

    def pick(values):
        return values[2] if twin is not None else None

    for step in range(steps):
        x = make_input().to(dtype)
        xs = [(x.double() if m is twin else x.clone()).requires_grad_(input_grad) for m in models]
        g = None
        ys = []
        for m, xi in zip(models, xs):
            with forbid_eager(*forbid) if (m is fused and forbid) else contextlib.nullcontext():
                y = m(xi)
                if g is None:
                    g = torch.randn_like(y)
                if y.requires_grad:
                    (y * g.to(y.dtype)).sum().backward()
            ys.append(y.detach())
        at = f"step {step}"
        _assert_matches(ys[1], ys[0], pick(ys), f"{at} output")
        if input_grad:
            _assert_matches(xs[1].grad, xs[0].grad, pick([x_.grad for x_ in xs]), f"{at} input grad")
        magnitude = max([float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None and p.grad.numel()]
                        + [float(xs[0].grad.abs().max()) if input_grad and xs[0].grad.numel() else 0.0])
        for k, grads in enumerate(zip(*[[p.grad for p in m.parameters()] for m in models])):
            _assert_matches(grads[1], grads[0], pick(grads), f"{at} grad of {names[k]}", magnitude)
        for opt in opts:
            if opt is not None:
                opt.step()
                opt.zero_grad()
        for k, ps in enumerate(zip(*[list(m.parameters()) for m in models])):
            _assert_matches(ps[1].detach(), ps[0].detach(), pick([p.detach() for p in ps]), f"{at} {names[k]}")
        for k, bs in enumerate(zip(*[list(m.buffers()) for m in models])):
            if not bs[0].is_floating_point():
                assert torch.equal(bs[1], bs[0]), f"{at} {buffer_names[k]}"
            else:
                _assert_matches(bs[1], bs[0], pick(bs), f"{at} {buffer_names[k]}")
    return fused


def _fused_types(mods):
    """The module types that must not run eagerly in this chain (Dropout in
    training mode runs eagerly by design)."""
    return tuple(t for t in CONV_FUSIBLE_TYPES if t not in (nn.Dropout, nn.Dropout2d))


# ---- the target models, and fixed patterns ------------------------------------------------


def _mlp_small():
    return [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)]


def _mlp_bn():
    return [nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 10)]


def _cnn():
    return [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU()]


@pytest.mark.parametrize(
    "mods, shape",
    [
        (_mlp_small, (32, 64)),
        (_mlp_bn, (64, 256)),
        (_cnn, (8, 3, 32, 32)),
        (lambda: [nn.Linear(16, 32), nn.BatchNorm1d(32, momentum=None), nn.GELU(), nn.Linear(32, 8),
                  nn.BatchNorm1d(8, affine=False), nn.SiLU()], (20, 16)),
        (lambda: [nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh()], (5, 16)),
        (lambda: [nn.BatchNorm1d(12), nn.LeakyReLU(0.2), nn.Linear(12, 4)], (7, 12)),
        (lambda: [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding="same", groups=8),
                  nn.BatchNorm2d(8, affine=False), nn.Hardswish(), nn.AvgPool2d(2), nn.Flatten(),
                  nn.Linear(8 * 3 * 3, 10), nn.Sigmoid()], (4, 3, 16, 16)),
        (lambda: [nn.Conv2d(3, 8, 4, padding="same"), nn.BatchNorm2d(8, track_running_stats=False),
                  nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
                  nn.ReLU6()], (4, 3, 9, 9)),
        (lambda: [nn.BatchNorm2d(3, momentum=None), nn.GELU(approximate="tanh"), nn.Conv2d(3, 6, (1, 3), stride=2),
                  nn.MaxPool2d(3, 2, 1, ceil_mode=True)], (3, 3, 11, 10)),
    ],
    ids=["mlp_small", "mlp_bn", "cnn", "bn_momentum_none", "bn_untracked", "bn_first", "conv_pools_head",
         "same_pad_gap_head", "bn2d_first"],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_steps_match_sequential(mods, shape, mode):
    # Seeded weights: a few of these chains grow their gradients by orders of
    # magnitude over the steps, where an unlucky draw flips a ReLU mask between
    # two roundings; the comparison must not depend on the tests run before.
    torch.manual_seed(0)
    chain = mods()
    for m in chain:
        m.train(mode == "train")
    fused = _run_steps(chain, lambda: torch.randn(shape), steps=3, forbid=_fused_types(chain))
    assert fused.explain().fused_segments and not fused.explain().eager_segments


@pytest.mark.parametrize("make_act", ACTIVATIONS, ids=lambda f: repr(f()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_each_activation_trains_like_sequential(make_act, dtype):
    """Each activation's fused forward and backward (the derivative from the
    output or the pre-activation) in an MLP and a conv run, over inputs that
    reach its saturating ranges."""
    torch.manual_seed(0)
    mlp = [nn.Linear(9, 24), nn.BatchNorm1d(24), make_act(), nn.Linear(24, 7), make_act()]
    _run_steps(mlp, lambda: torch.randn(13, 9) * 4, steps=2, dtype=dtype, forbid=FUSIBLE_TYPES)
    conv = [nn.Conv2d(3, 8, 3, padding=1), make_act(), nn.BatchNorm2d(8), make_act(), nn.Conv2d(8, 5, 1), make_act()]
    _run_steps(conv, lambda: torch.randn(3, 3, 7, 6) * 4, steps=2, dtype=dtype, forbid=_fused_types(conv))


def test_training_channels_last_and_strided_inputs():
    mods = _cnn()
    ref_steps = [torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last),
                 torch.randn(4, 3, 12, 24)[..., ::2], torch.randn(3, 12, 4, 12).permute(2, 0, 1, 3)]
    it = iter(ref_steps * 2)
    _run_steps(mods, lambda: next(it), steps=3, forbid=_fused_types(mods))
    rows = iter([torch.randn(64, 10).t(), torch.randn(10, 128)[:, ::2], torch.randn(2, 5, 64)])
    _run_steps(_mlp_small(), lambda: next(rows), steps=3, forbid=FUSIBLE_TYPES)


def test_float64_training_matches_tightly():
    _run_steps(_cnn(), lambda: torch.randn(2, 3, 9, 9), dtype=torch.float64, steps=2, forbid=_fused_types(_cnn()))
    _run_steps(_mlp_bn(), lambda: torch.randn(9, 256), dtype=torch.float64, steps=2, forbid=FUSIBLE_TYPES)


def test_random_mlp_chains_train_like_sequential(rng):
    for _ in range(40):
        mods, width = random_chain(rng, max_depth=6, max_width=48)
        mods = _training_chain(mods, rng)
        rows = rng.choice([3, 17, 64])  # BatchNorm over 2 values: exactly zero gradients, all rounding noise
        _run_steps(mods, lambda: torch.randn(rows, width), steps=2, input_grad=rng.random() < 0.7,
                   seed=rng.randrange(1 << 30))


def _pool_window_in_padding(mods, shape) -> bool:
    """A MaxPool2d with a window entirely in its padding (dilation makes it
    possible): eager's max_pool2d returns an out-of-range argmax there and its
    backward writes through it, so eager cannot be the reference."""
    x = torch.zeros(shape)
    with torch.no_grad():
        for m in mods:
            if type(m) is nn.MaxPool2d:
                _, idx = nn.functional.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                                  return_indices=True)
                if idx.numel() and (idx.max() >= x.shape[2] * x.shape[3] or idx.min() < 0):
                    return True
            x = m.eval()(x)
    return False


def test_random_conv_chains_train_like_sequential(rng):
    for _ in range(40):
        mods, (c, h, w) = random_conv_chain(rng, max_depth=5, max_channels=12, max_size=12)
        if _pool_window_in_padding(mods, (1, c, h, w)):
            continue
        mods = _training_chain(mods, rng)
        n = rng.choice([3, 5])
        layout = rng.choice(["nchw", "channels_last"])

        def make():
            x = torch.randn(n, c, h, w)
            return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

        try:
            _run_steps(mods, make, steps=2, input_grad=rng.random() < 0.7, seed=rng.randrange(1 << 30))
        except ValueError as err:  # a BatchNorm seeing one value per channel: eager's error, both sides
            assert "Expected more than 1 value per channel" in str(err)


# ---- gradcheck of the ops ------------------------------------------------------------------


def _segment(mods):
    segs = plan_segments([str(i) for i in range(len(mods))], mods)
    assert len(segs) == 1 and segs[0].fused, [s.reasons for s in segs]
    return segs[0]


def _gradcheck_segment(mods, x):
    seg = _segment(mods)
    params = seg.train_params()
    op = ops.conv_train_forward if seg.op == "conv" else ops.mlp_train_forward
    running = seg.train_running()

    def f(inp, *ps):
        return op(inp, list(ps), running, seg.spec, seg.fparams)[0]

    inputs = (x.requires_grad_(),) + tuple(p for p in params if p.requires_grad)
    if len(inputs) != 1 + len(params):  # frozen parameters stay constants
        frozen = {id(p) for p in params if not p.requires_grad}

        def f(inp, *ps, _f=f):
            it = iter(ps)
            return _f(inp, *[p if id(p) in frozen else next(it) for p in params])

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


GRADCHECK_PATTERNS = {
    "linear": lambda act: ([nn.Linear(5, 4)] + act, (6, 5)),
    "linear_nobias_bn": lambda act: ([nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4)] + act, (6, 5)),
    "linear_bn_affine_off": lambda act: ([nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False)] + act, (6, 5)),
    "bn_alone": lambda act: ([nn.BatchNorm1d(5)] + act + [nn.Linear(5, 3)], (6, 5)),
    "conv_bn": lambda act: ([nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)] + act, (2, 2, 5, 4)),
    "conv_depthwise_same": lambda act: ([nn.Conv2d(3, 6, 2, padding="same", groups=3)] + act, (2, 3, 5, 5)),
    "conv_pools_head": lambda act: ([nn.Conv2d(2, 3, 3, stride=2, dilation=1), *act, nn.MaxPool2d(2, 1, 1),
                                     nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), nn.Flatten(),
                                     nn.Linear(12, 3)], (2, 2, 7, 7)),
    "bn2d_gap": lambda act: ([nn.BatchNorm2d(2), *act, nn.Conv2d(2, 3, 1, bias=False), nn.AdaptiveAvgPool2d(1)],
                             (3, 2, 3, 3)),
}


@pytest.mark.parametrize("pattern", sorted(GRADCHECK_PATTERNS))
@pytest.mark.parametrize("act", range(len(ACTIVATIONS) + 1), ids=lambda i: "none" if i == 0 else
                         type(ACTIVATIONS[i - 1]()).__name__ + ("_tanh" if i == 7 else ""))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_every_pattern(pattern, act, mode):
    torch.manual_seed(act)
    acts = [] if act == 0 else [ACTIVATIONS[act - 1]()]
    mods, shape = GRADCHECK_PATTERNS[pattern](acts)
    mods = [m.double().train(mode == "train") for m in mods]
    x = torch.randn(shape, dtype=torch.float64)
    if any(type(m) is nn.MaxPool2d for m in mods):  # distinct values: max is differentiable everywhere
        x = torch.randperm(x.numel(), dtype=torch.float64).reshape(shape) / x.numel()
    for m in mods:
        if type(m) in BN_TYPES:
            with torch.no_grad():
                m.running_var.uniform_(0.5, 2)
                m.running_mean.normal_()
    _gradcheck_segment(mods, x)


def test_gradcheck_with_frozen_parameters():
    torch.manual_seed(0)
    mods = [nn.Linear(4, 5).double(), nn.BatchNorm1d(5).double(), nn.GELU(), nn.Linear(5, 3).double()]
    mods[0].weight.requires_grad_(False)
    mods[1].bias.requires_grad_(False)
    _gradcheck_segment(mods, torch.randn(6, 4, dtype=torch.float64))


# ---- what the backward computes and skips ------------------------------------------------------


def test_max_pool_window_in_padding_trains_safely():
    """A MaxPool2d window entirely in the padding: ATen's max_pool2d returns
    an out-of-range argmax (and an undefined value) there, and eager's backward
    writes through that index. The fused backward gives such windows no
    gradient: many steps run without touching memory outside the gradient."""
    fused = FusedSequential(nn.MaxPool2d(2, 2, (1, 1), (2, 1)), nn.Conv2d(2, 3, 3, 1, 2))
    seg = _segment(list(fused))
    x = torch.randn(5, 2, 1, 2)
    with torch.no_grad():
        y, saved = ops.conv_train_forward(x, [p.detach() for p in seg.train_params()], [], seg.spec, seg.fparams)
    indices = saved[2]
    assert indices.max() >= 2  # the out-of-range argmax this guards against
    for _ in range(50):
        xr = x.clone().requires_grad_()
        fused(xr).sum().backward()
        assert xr.grad.shape == x.shape


@pytest.mark.parametrize("last", ["linear", "gelu", "relu"])
def test_output_modified_in_place_like_eager(last):
    """A residual `out += x` after a fused segment: allowed unless the last
    stage's backward reads the output (ReLU, as in eager), then the same error."""
    def mods():
        tail = {"linear": [], "gelu": [nn.GELU()], "relu": [nn.ReLU()]}[last]
        return [nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6)] + tail

    torch.manual_seed(0)
    ref = nn.Sequential(*mods())
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    x = torch.randn(5, 6)
    results = []
    for model in (ref, fused):
        y = model(x)
        y += x  # in place
        try:
            y.sum().backward()
            results.append([p.grad.clone() for p in model.parameters()])
        except RuntimeError as err:
            assert "modified by an inplace operation" in str(err)
            results.append("error")
    if last == "relu":
        assert results == ["error", "error"]
    else:
        assert "error" not in results
        torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("chain", ["relu", "gelu_bn", "conv_relu"])
def test_nan_and_inf_propagate_through_the_backward_like_eager(chain):
    torch.manual_seed(0)
    if chain == "conv_relu":
        mods = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)]
        x = torch.randn(2, 2, 5, 5)
        x[0, 0, 1, 1], x[1, 1, 2, 3] = float("nan"), float("inf")
    else:
        mods = ([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)] if chain == "relu"
                else [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)])
        x = torch.randn(6, 4)
        x[1, 2], x[3, 0] = float("nan"), float("inf")
    ref = nn.Sequential(*mods)
    fused = FusedSequential(*copy.deepcopy(mods))
    grads = []
    for model in (ref, fused):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.sum().backward()
        grads.append([y.detach(), xi.grad] + [p.grad for p in model.parameters()])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, equal_nan=True)


def test_inference_mode_training_call_bumps_buffer_versions():
    ref = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    bn = fused[1]
    before = (bn.running_mean._version, bn.num_batches_tracked._version)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        ref(x)
        with forbid_eager():
            fused(x)
    assert bn.running_mean._version > before[0] and bn.num_batches_tracked._version > before[1]
    torch.testing.assert_close(dict(fused.named_buffers()), dict(ref.named_buffers()))


def test_backward_op_checks_its_arguments():
    seg = _segment([nn.Linear(4, 3), nn.ReLU()])
    x = torch.randn(5, 4)
    params = [p.detach() for p in seg.train_params()]
    y, saved = ops.mlp_train_forward(x, params, [], seg.spec, seg.fparams)
    backward = torch.ops.seqfuse.mlp_backward.default
    with pytest.raises(ValueError, match="grad_output"):
        backward(torch.ones(4, 3), x, y, saved, params, seg.spec, seg.fparams, [True, True, True])
    with pytest.raises(ValueError, match="needs its output"):
        backward(torch.ones(5, 3), x, torch.empty(0), saved, params, seg.spec, seg.fparams, [True, True, True])
    from seqfuse.ops import Activation, MlpStage, StageKind, encode_mlp_spec
    spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.POINTWISE, 4)])
    with pytest.raises(ValueError, match="computes nothing"):
        ops.mlp_train_forward(x, [], [], spec, fparams)


def test_only_needed_gradients_are_computed():
    """Frozen parameters get no gradient; with a frozen prefix and an input
    without grad the backward stops at the last stage that needs one."""
    mods = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)]
    for p in list(mods[0].parameters()) + [mods[2].bias]:
        p.requires_grad_(False)
    fused = FusedSequential(*mods)
    seg = _segment(list(fused))
    x = torch.randn(4, 8)
    y, saved = ops.mlp_train_forward(x, seg.train_params(), [], seg.spec, seg.fparams)
    mask = [False, False, False, True, False, True, True]
    params = [p.detach() for p in seg.train_params()]
    gi, grads = torch.ops.seqfuse.mlp_backward(torch.ones_like(y), x, y.detach(), saved, params, seg.spec,
                                               seg.fparams, mask)
    assert gi.numel() == 0 and [g.numel() > 0 for g in grads] == mask[1:]
    fused(x).sum().backward()
    assert mods[0].weight.grad is None and mods[2].bias.grad is None and mods[2].weight.grad is not None


def test_no_grad_training_mode_updates_running_stats_like_eager():
    ref = nn.Sequential(*_cnn())
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8)
        with torch.no_grad():
            y_ref = ref(x)
            with forbid_eager(*_fused_types(ref)):
                y = fused(x)
        torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dict(fused.named_buffers()), dict(ref.named_buffers()))


def test_update_running_stats_op():
    bn = nn.BatchNorm1d(3, momentum=None)
    buffers = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    stats = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ops.update_running_stats(buffers, [stats], [-1.0])
    torch.testing.assert_close(buffers[0], stats[2])  # the first update of a cumulative average takes the batch's
    assert int(buffers[2]) == 1
    with pytest.raises(ValueError, match="do not fit"):
        ops.update_running_stats(buffers, [stats[:, :2]], [0.1])
    torch.library.opcheck(torch.ops.seqfuse.update_running_stats.default, (buffers, [stats], [0.1]))


def test_train_eval_train_switches_routes():
    ref = nn.Sequential(*_mlp_bn())
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    x = torch.randn(16, 256)
    for mode in ["train", "eval", "train"]:
        ref.train(mode == "train")
        fused.train(mode == "train")
        torch.testing.assert_close(fused(x), ref(x))
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x))
    torch.testing.assert_close(dict(fused.named_buffers()), dict(ref.named_buffers()))


def test_mixed_eager_and_fused_segments_train():
    def mods():
        return [nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 16), nn.Softsign(),
                nn.Linear(16, 4), nn.Tanh()]

    fused = _run_steps(mods(), lambda: torch.randn(12, 10), steps=3)
    e = fused.explain()
    assert len(e.fused_segments) == 3 and len(e.eager_segments) == 2


def test_double_backward_raises_clearly():
    fused = FusedSequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(fused(x).sum(), x, create_graph=False)
    assert g.shape == x.shape
    (g,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)  # a graph of the backward: fine
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()  # differentiating it again: the clear error


def test_batch_of_one_raises_eagers_error_and_leaves_buffers():
    ref = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    for m in (ref, fused):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(torch.randn(1, 4))
    torch.testing.assert_close(dict(fused.named_buffers()), dict(ref.named_buffers()))
    conv = FusedSequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        conv(torch.randn(1, 2, 3, 3))
    after = conv.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(("running_mean", "running_var")))


def test_bad_input_in_training_names_the_child():
    fused = FusedSequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(RuntimeError, match=r"child '0'.*shape \(2, 5\)"):
        fused(torch.randn(2, 5, requires_grad=True))


def test_empty_batch_and_bfloat16_train_eagerly():
    fused = FusedSequential(nn.Linear(4, 3), nn.ReLU())
    y = fused(torch.randn(0, 4, requires_grad=True))
    y.sum().backward()
    bf = FusedSequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    assert "bfloat16" in str(bf.explain())


def test_explain_describes_training():
    fused = FusedSequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    text = str(fused.explain())
    assert "batch statistics" in text and "fused backward" in text
    fused.eval()
    assert "folded into the epilogue (eval)" in str(fused.explain())


def test_parameter_updates_do_not_replan_in_training():
    fused = FusedSequential(*_mlp_small())
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(torch.randn(4, 64)).sum().backward()
    plan = fused.__dict__["_seqfuse_plan"]
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        fused(torch.randn(4, 64)).sum().backward()
    assert fused.__dict__["_seqfuse_plan"] is plan
    with torch.no_grad():  # the inference ops re-pack the updated weights
        ref = nn.Sequential(*fused)
        x = torch.randn(4, 64)
        torch.testing.assert_close(fused(x), ref(x))


# ---- registrations ---------------------------------------------------------------------------


def _op_args(mods, x):
    seg = _segment(mods)
    return seg, (x, seg.train_params(), seg.train_running(), seg.spec, seg.fparams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_opcheck_training_ops(which, dtype):
    if which == "mlp":
        mods = [nn.Linear(6, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, 3), nn.ReLU()]
        x = torch.randn(7, 6, dtype=dtype)
    else:
        mods = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(16, 3)]
        x = torch.randn(2, 3, 4, 4, dtype=dtype)
    mods = [m.to(dtype) for m in mods]
    seg, args = _op_args(mods, x)
    forward = getattr(torch.ops.seqfuse, f"{which}_train_forward").default
    backward = getattr(torch.ops.seqfuse, f"{which}_backward").default
    x.requires_grad_()
    torch.library.opcheck(forward, args)
    params = [p.detach() for p in args[1]]
    with torch.no_grad():
        y, saved = forward(x.detach(), params, *args[2:])
    mask = [True] * (1 + len(params))
    torch.library.opcheck(backward, (torch.randn_like(y), x.detach(), y, saved, params, seg.spec, seg.fparams, mask))
    mask = [False] + [i % 2 == 0 for i in range(len(params))]
    torch.library.opcheck(backward, (torch.randn_like(y), x.detach(), y, saved, params, seg.spec, seg.fparams, mask))


@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_compile_fullgraph_training_step(which):
    torch._dynamo.reset()
    mods = _mlp_bn() if which == "mlp" else _cnn()
    shape = (16, 256) if which == "mlp" else (4, 3, 16, 16)
    ref = nn.Sequential(*mods)
    fused = FusedSequential(*copy.deepcopy(list(ref)))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)

    def loss(model, x):
        y = model(x)
        return y.square().mean(), y.detach()

    compiled = torch.compile(loss, fullgraph=True)  # forward + loss in one graph; AOTAutograd makes the backward's
    for _ in range(2):
        x = torch.randn(shape)
        l_ref, y_ref = loss(ref, x)
        l_fused, y_fused = compiled(fused, x)
        l_ref.backward()
        l_fused.backward()
        torch.testing.assert_close(y_fused, y_ref)
        for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
            torch.testing.assert_close(p_fused.grad, p_ref.grad)
        opt_ref.step()
        opt_fused.step()
        opt_ref.zero_grad()
        opt_fused.zero_grad()
    torch.testing.assert_close(dict(fused.named_buffers()), dict(ref.named_buffers()))


def test_compiled_graph_calls_the_training_ops():
    torch._dynamo.reset()
    fused = FusedSequential(*_mlp_bn())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    torch.compile(fused, backend="aot_eager", fullgraph=True)(torch.randn(8, 256)).sum().backward()
    from torch._dynamo.testing import EagerAndRecordGraphs  # noqa: F401  (importable: the testing API exists)

    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def compiler(g, _):
            seen.append(str(g.graph))
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)

    torch.compile(fused, backend=record, fullgraph=True)(torch.randn(8, 256)).sum().backward()
    assert any("seqfuse.mlp_train_forward" in g for g in seen), seen
    assert any("seqfuse.mlp_backward" in g for g in seen), seen


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_compiled_training_with_dynamic_shapes_matches_eager(kind):
    """The training forward's Meta kernel walks symbolic sizes (the walk of
    csrc/train/train_run.h, run on meta tensors): a training step compiled with
    dynamic shapes matches eager at two input sizes, gradients included."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    if kind == "conv":
        mods = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3),
                nn.SiLU()]
        shapes = [(4, 3, 16, 16), (3, 3, 20, 18)]
    else:
        mods = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)]
        shapes = [(5, 6), (9, 6)]
    ref = nn.Sequential(*mods).train()
    fused = FusedSequential(*copy.deepcopy(mods)).train()
    compiled = torch.compile(fused, dynamic=True, backend="aot_eager", fullgraph=True)
    for shape in shapes:
        x = torch.randn(*shape)
        y, r = compiled(x), ref(x)
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-5)
        y.square().sum().backward()
        r.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
