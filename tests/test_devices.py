"""The same checks on every device seqfuse has kernels for: numerics against
eager (random MLP and conv chains in every dtype the device serves, odd sizes,
non-contiguous and empty inputs, NaN/inf), training (outputs, gradients,
running statistics), the drop-in contract (classes, state_dict, errors), and
the ops' fake kernels with inputs on the device.

CUDA cases skip without a GPU, except the fake-tensor shape checks, which
need none: fake CUDA tensors carry shapes and devices only. `make gpu-check`
runs this file on a GPU."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import seqfuse
from seqfuse import FusedSequential, ops, planner, verify

from conftest import assert_matches_eager, forbid_eager, random_chain, random_conv_chain

DEVICES = ["cpu", "cuda"]
CUDA_BUILT = "cuda" in planner.FUSED_DEVICES


def _dtypes(device: str):
    base = [torch.float32, torch.float64, torch.bfloat16]
    return base + [torch.float16] if device == "cuda" else base


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        if not CUDA_BUILT:
            pytest.skip("this build of seqfuse has no CUDA kernels")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        # These tests compare with eager themselves (and forbid eager module
        # calls inside fused segments): the first-call check stays out.
        before = verify.kernel_check("cuda")
        verify.set_kernel_check("off", "cuda")
        # Exact float32 on both sides: eager and the fused path may pick
        # different cuDNN algorithms (one TF32, one not) for the same conv.
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield torch.device("cuda")
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        verify.set_kernel_check(before, "cuda")
        return
    yield torch.device("cpu")


def _on(mods, device, dtype):
    return [m.to(device=device, dtype=dtype) for m in mods]


@pytest.mark.parametrize("seed", range(10))
def test_random_mlp_chains(device, seed):
    rng = random.Random(1000 + seed)
    for dtype in _dtypes(device.type):
        mods, width = random_chain(rng, max_depth=6, max_width=140)
        mods = _on(mods, device, dtype)
        batch = rng.choice([1, 2, 15, 17, 64, 130])
        x = torch.randn(batch, width, device=device, dtype=dtype)
        fused = FusedSequential(*mods).eval()
        with torch.no_grad(), forbid_eager():
            y = fused(x)
        assert_matches_eager(y, mods, x)


@pytest.mark.parametrize("seed", range(8))
def test_random_conv_chains(device, seed):
    rng = random.Random(2000 + seed)
    for dtype in _dtypes(device.type):
        mods, in_shape = random_conv_chain(rng, max_depth=5, max_channels=12, max_size=20)
        mods = _on(mods, device, dtype)
        x = torch.randn(rng.choice([1, 2, 3]), *in_shape, device=device, dtype=dtype)
        if rng.random() < 0.5:
            x = x.contiguous(memory_format=torch.channels_last)
        fused = FusedSequential(*mods).eval()
        with torch.no_grad():
            y = fused(x)
        assert_matches_eager(y, mods, x)
        with torch.no_grad():
            eager = nn.Sequential(*mods)(x)
        assert y.is_contiguous() == eager.is_contiguous()


@pytest.mark.parametrize("width", [1, 15, 16, 17, 63, 64, 65, 100, 170, 400])
def test_mlp_widths_fused_and_layer_by_layer(device, width):
    """Widths on both sides of the fully fused CUDA kernel's shared-memory limit."""
    torch.manual_seed(width)
    for dtype in _dtypes(device.type):
        mods = _on([nn.Linear(width, width), nn.GELU(), nn.Linear(width, 7), nn.Sigmoid()], device, dtype)
        x = torch.randn(37, width, device=device, dtype=dtype)
        with torch.no_grad():
            y = FusedSequential(*mods).eval()(x)
        assert_matches_eager(y, mods, x)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "empty", "3d"])
def test_odd_inputs(device, kind):
    torch.manual_seed(3)
    mods = _on([nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5)], device, torch.float32)
    for m in mods:
        m.eval()
    x = {
        "transposed": torch.randn(12, 9, device=device).t(),
        "sliced": torch.randn(9, 30, device=device)[:, 3:15],
        "empty": torch.randn(0, 12, device=device),
        "3d": torch.randn(4, 12, device=device),
    }[kind]
    with torch.no_grad():
        y = FusedSequential(*mods)(x)
    assert_matches_eager(y, mods, x)


def test_nan_and_inf_propagate(device):
    torch.manual_seed(4)
    for dtype in _dtypes(device.type):
        mods = _on([nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)], device, dtype)
        x = torch.randn(20, 8, device=device, dtype=dtype)
        x[1, 2] = float("nan")
        x[3, 0] = float("inf")
        x[5, 7] = -float("inf")
        with torch.no_grad():
            y = FusedSequential(*mods).eval()(x)
        assert_matches_eager(y, mods, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_matches_eager(device, dtype):
    torch.manual_seed(5)
    # No bias before the BatchNorm: its gradient is zero up to rounding noise,
    # which no relative tolerance compares (the training suite covers it
    # against a float64 twin).
    mods = _on([nn.Linear(6, 24, bias=False), nn.BatchNorm1d(24), nn.SiLU(), nn.Linear(24, 3)], device, dtype)
    fused = FusedSequential(*copy.deepcopy(mods)).train()
    eager = nn.Sequential(*mods).train()
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    # float32: BatchNorm's backward sums in another order than eager's (the
    # training suite bounds that against a float64 twin; here a fixed slack).
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    for step in range(3):
        x = torch.randn(32, 6, device=device, dtype=dtype, requires_grad=True)
        x_e = x.detach().clone().requires_grad_(True)
        yf, ye = fused(x), eager(x_e)
        torch.testing.assert_close(yf, ye, **tol)
        yf.square().mean().backward()
        ye.square().mean().backward()
        torch.testing.assert_close(x.grad, x_e.grad, **tol)
        for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"step {step} {name}", **tol)
        opt_f.step(), opt_e.step(), opt_f.zero_grad(), opt_e.zero_grad()
    for (name, b), c in zip(fused.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, msg=name, **tol)


def test_conv_training_matches_eager(device):
    torch.manual_seed(6)
    mods = _on([nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)], device, torch.float32)
    fused = FusedSequential(*copy.deepcopy(mods)).train()
    eager = nn.Sequential(*mods).train()
    x = torch.randn(4, 3, 10, 10, device=device)
    yf, ye = fused(x), eager(x)
    torch.testing.assert_close(yf, ye)
    yf.square().sum().backward()
    ye.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, rtol=1e-4, atol=1e-4)


def test_contract(device):
    mods = _on([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)], device, torch.float32)
    fused = FusedSequential(*mods).eval()
    eager = nn.Sequential(*mods)
    assert list(fused.state_dict()) == list(eager.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), eager.parameters()))
    with torch.no_grad():
        with pytest.raises(RuntimeError) as fused_err:
            fused(torch.randn(3, 5, device=device))
        with pytest.raises(RuntimeError) as eager_err:
            eager(torch.randn(3, 5, device=device))
    assert type(fused_err.value) is type(eager_err.value)
    assert "(3, 5)" in str(fused_err.value) or "3x5" in str(fused_err.value)
    x = torch.randn(3, 4, device=device)
    with torch.no_grad():  # usable after the error
        assert_matches_eager(fused(x), mods, x)


def test_fuse_keeps_classes_on_device(device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model = nn.Sequential(Block(), nn.Conv2d(4, 6, 1)).to(device).eval()
    fused = seqfuse.fuse(model)
    assert isinstance(fused[0], Block)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 4, 8, 8, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


def test_cuda_graph_option(device):
    """cuda_graph=True: CUDA inference calls replay a captured graph (re-captured
    after a parameter update); elsewhere the option changes nothing."""
    torch.manual_seed(7)
    mods = _on([nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 4)], device, torch.float32)
    fused = FusedSequential(*mods, cuda_graph=True).eval()
    assert fused.cuda_graph and list(fused.state_dict()) == list(nn.Sequential(*mods).state_dict())
    eager = nn.Sequential(*mods)
    with torch.no_grad():
        for batch in (3, 3, 3, 5, 3):
            x = torch.randn(batch, 10, device=device)
            y = fused(x)
            torch.testing.assert_close(y, eager(x))
            assert y.data_ptr() != fused(x).data_ptr()  # a new tensor per call
        mods[0].weight.mul_(2)  # the plan is rebuilt, and with it the graphs
        x = torch.randn(3, 10, device=device)
        torch.testing.assert_close(fused(x), eager(x))
    plan = fused.__dict__["_seqfuse_plan"]
    assert [type(g).__name__ for g in plan.graphs.values()] == (["_GraphReplay"] if device.type == "cuda" else [])
    x = torch.randn(6, 10, device=device, requires_grad=True)  # training route: no graph
    fused(x).sum().backward()
    assert x.grad is not None


# ---- fake tensors: shapes and devices of every op, CUDA inputs without a GPU ----

FAKE_DEVICES = ["cpu", "cuda"]


def _segments(mods):
    keys = [str(i) for i in range(len(mods))]
    return [s for s in planner.plan_segments(keys, mods) if s.fused]


@pytest.mark.parametrize("fake_device", FAKE_DEVICES)
def test_fake_mlp_ops_on_device(fake_device):
    if fake_device == "cuda" and not CUDA_BUILT:
        pytest.skip("this build of seqfuse has no CUDA kernels")
    mods = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)]
    for m in mods:
        m.eval()
    (seg,) = _segments(mods)
    with FakeTensorMode(allow_non_fake_inputs=True):
        tensors = [t.detach().to(fake_device) for t in seg.pack_tensors()]
        weights = [w.detach().to(fake_device) for w in seg.engine_weights()]
        packed = ops.mlp_pack(tensors, seg.spec, seg.fparams)
        x = torch.empty(5, 7, 6, device=fake_device)
        y = ops.mlp_forward(x, packed, weights, seg.spec, seg.fparams)
        assert packed.device.type == fake_device and packed.dtype == torch.uint8
        assert y.shape == (5, 7, 3) and y.device.type == fake_device
        params = [p.detach().to(fake_device) for p in seg.train_params()]
        running = [b.detach().to(fake_device) for b in seg.train_running()]
        out, saved = ops.mlp_train_forward(torch.empty(9, 6, device=fake_device), params, running, seg.spec,
                                           seg.fparams)
        assert out.shape == (9, 3) and out.device.type == fake_device
        assert all(s.device.type == fake_device for s in saved)


@pytest.mark.parametrize("fake_device", FAKE_DEVICES)
def test_fake_conv_ops_on_device(fake_device):
    if fake_device == "cuda" and not CUDA_BUILT:
        pytest.skip("this build of seqfuse has no CUDA kernels")
    mods = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, 4)]
    for m in mods:
        m.eval()
    (seg,) = _segments(mods)
    with FakeTensorMode(allow_non_fake_inputs=True):
        tensors = [t.detach().to(fake_device) for t in seg.pack_tensors()]
        weights = [w.detach().to(fake_device) for w in seg.engine_weights()]
        packed = ops.conv_pack(tensors, seg.spec, seg.fparams)
        y = ops.conv_forward(torch.empty(2, 3, 15, 15, device=fake_device), packed, weights, seg.spec, seg.fparams)
        assert y.shape == (2, 4) and y.device.type == fake_device
