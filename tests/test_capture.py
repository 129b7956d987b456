"""fuse() on custom forwards: chains found by torch.fx inside modules' own
forwards, with the residual epilogue, functional forms, Sequential
subclasses, and the drop-in contract (classes, state_dict, hooks, pickling,
copies, compile/export, threads, errors, training)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqfuse
from seqfuse import FusedSequential
from seqfuse.capture import CapturedForward

from conftest import forbid_eager

FUSED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


class Residual(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), as ResNet writes it."""

    def __init__(self, c_in=4, c=6, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c)) \
            if stride != 1 or c_in != c else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Functional(nn.Module):
    """Functional activations, pooling, flatten and dropout between stock layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.hardtanh(self.conv2(y), 0.0, 6.0)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        y = F.dropout(self.fc(y), 0.3, training=self.training)
        return self.fc2(F.silu(y).relu_())


class SE(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(pool(x)))))."""

    def __init__(self, c=8):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class SubSeq(nn.Sequential):
    """A Sequential subclass that keeps nn.Sequential.forward."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SubSeq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = Residual(4, 4)
        self.block2 = Residual(4, 8, stride=2)
        self.se = SE(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.se(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model):
    """Running statistics and affine parameters away from the identity, so a
    BatchNorm that ran wrong shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _make(cls=Net):
    torch.manual_seed(0)
    return _randomize_bn(cls()).eval()


def _check_eval(model, x, forbid=FUSED_TYPES):
    fused = seqfuse.fuse(model)
    with torch.no_grad():
        ref = model(x)
        with forbid_eager(*forbid):
            out = fused(x)
    torch.testing.assert_close(out, ref)
    return fused


def test_residual_block_is_one_fused_chain_and_keeps_the_model():
    model = _make(lambda: Residual(4, 4))
    fused = _check_eval(model, torch.randn(2, 4, 9, 7))
    assert type(fused) is Residual and type(model.forward).__name__ == "method"  # the original is untouched
    assert isinstance(fused.__dict__["forward"], CapturedForward)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]
    chains = fused.forward.traced().chains
    assert len(chains) == 1 and chains[0].residual and chains[0].post is fused.relu
    e = seqfuse.explain(fused)
    assert e.module_share == 1.0 and "+ residual -> relu" in str(e)


def test_downsample_residual_and_whole_net():
    model = _make()
    fused = _check_eval(model, torch.randn(3, 3, 12, 10))
    e = seqfuse.explain(fused, torch.randn(1, 3, 12, 10))
    assert e.module_share == 1.0 and e.flops_share == 1.0, str(e)
    assert type(fused.stem).__name__ == "SubSeq" and isinstance(fused.stem, SubSeq)
    assert isinstance(fused.stem, FusedSequential)
    # the stock layers of a Sequential subclass run inside the model's chain
    assert any("stem.0" in c.names for c in fused.forward.traced().chains)


def test_functional_forms_fuse():
    model = _make(Functional)
    fused = _check_eval(model, torch.randn(4, 3, 8, 8))
    chains = fused.forward.traced().chains
    assert len(chains) == 1, [c.describe() for c in chains]
    assert seqfuse.explain(fused).module_share == 1.0


class MishBlock(nn.Module):
    """Mish as the functional forms write it: F.mish, and in place on an intermediate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.mish(self.bn(self.conv(x)))
        y = F.mish(self.conv2(y), inplace=True)
        return F.mish(self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)))


def test_functional_mish_fuses_in_one_chain():
    model = _make(MishBlock)
    fused = _check_eval(model, torch.randn(4, 3, 8, 8) * 3)
    chains = fused.forward.traced().chains
    assert len(chains) == 1 and sum(n.startswith("mish") for n in chains[0].names) == 3, chains[0].names
    assert all(type(m) is nn.Mish for n, m in zip(chains[0].names, chains[0].modules) if n.startswith("mish"))
    e = seqfuse.explain(fused)
    assert e.module_share == 1.0 and "conv -> bn -> mish() -> conv2 -> mish_1()" in str(e), str(e)
    # training: the fused backward of Mish against eager's
    fused.train(), model.train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    fused.double(), model.double()
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    with forbid_eager(*FUSED_TYPES):
        fused(xf).square().sum().backward()
    model(xe).square().sum().backward()
    torch.testing.assert_close(xf.grad, xe.grad)
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_channels_last_and_noncontiguous_inputs():
    model = _make()
    x = torch.randn(2, 3, 11, 13)
    _check_eval(model, x.contiguous(memory_format=torch.channels_last))
    _check_eval(model, torch.randn(2, 3, 13, 22)[..., ::2])


class Seen(nn.Module):
    """Records the contiguity of what it is given; fx cannot trace it (the
    branch on a value), so it runs as written."""

    def __init__(self):
        super().__init__()
        self.contiguous = []

    def forward(self, x):
        self.contiguous.append(x.is_contiguous())
        return x * 1.0 if x.sum() != 0 else x


class ViewHead(nn.Module):
    """Old-style code: ``x.view(N, -1)`` on a 4-D map, and a 4-D map returned beside the logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Residual(4, 4)
        self.seen = Seen()
        self.fc = nn.Linear(4 * 5 * 6, 3)

    def forward(self, x):
        feat = self.seen(self.block(self.body(x)))
        return self.fc(feat.view(feat.size(0), -1)), {"features": feat}


def test_inference_runs_channels_last_inside_and_returns_eagers_layout():
    model = _make(ViewHead)
    x = torch.randn(2, 3, 5, 6)
    fused = seqfuse.fuse(model, example_inputs=x)  # traced for this call's signature
    fused.seen.contiguous.clear()  # what the warm-up and the failed trace of its forward appended
    layouts = []
    block_forward = fused.block.forward
    fused.block.forward = lambda t: layouts.append(t.is_contiguous(memory_format=torch.channels_last)) or \
        block_forward(t)
    with torch.no_grad():
        ref_logits, ref = model(x)
        with forbid_eager(*FUSED_TYPES):
            logits, out = fused(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(out["features"], ref["features"])
    assert layouts == [True]  # the activations between chains are NHWC
    assert out["features"].is_contiguous()  # eager's layout for an NCHW input
    assert fused.seen.contiguous == [True]  # code that is not seqfuse's sees eager's layout
    # with autograd, and for a channels_last input, nothing is converted
    layouts.clear()
    logits, out = fused(x)
    torch.testing.assert_close(logits, ref_logits)
    assert layouts == [False]
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = fused.block(x), model.block(x)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last) and ref.is_contiguous(memory_format=torch.channels_last)


class Shuffle(nn.Module):
    """ShuffleNet's block tail: split, one branch convolved, concatenation, channel shuffle."""

    def __init__(self, c=6):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous()
        return y.view(n, c, h, w).contiguous()


def test_channel_shuffle_keeps_channels_last_and_matches():
    model = _make(Shuffle)
    fused = _check_eval(model, torch.randn(2, 6, 5, 7))
    from seqfuse import capture
    from seqfuse.capture.layout import seqfuse_channel_shuffle
    assert any(n.target is seqfuse_channel_shuffle for n in fused.forward.traced().graph.nodes)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    capture._run_layout.active = True
    try:
        with torch.no_grad():
            out = fused(x)
    finally:
        capture._run_layout.active = False
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_empty_batch_and_special_values():
    model = _make()
    fused = seqfuse.fuse(model)
    with torch.no_grad():
        assert fused(torch.randn(0, 3, 8, 8)).shape == model(torch.randn(0, 3, 8, 8)).shape
        x = torch.randn(2, 3, 8, 8)
        x[0, 0, 1, 1] = float("nan")
        x[1, 1, 2, 2] = float("inf")
        torch.testing.assert_close(fused(x), model(x), equal_nan=True)


def test_broadcast_residual_is_not_added_in_place():
    class Bcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 1, 1), nn.BatchNorm2d(1)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)  # (N,1,H,W) + (N,3,H,W)

    _check_eval(_make(Bcast), torch.randn(2, 3, 5, 5))


def test_untraceable_forward_runs_as_written():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return -x

    model = _make(DataDependent)
    fused = seqfuse.fuse(model)
    for sign in (1, -1):
        x = sign * torch.rand(1, 3, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x))
    e = seqfuse.explain(fused)
    assert "(model)" in e.untraced and "conv" in e.eager and "not traced" in e.eager["conv"]


def test_forward_that_assigns_attributes_is_not_traced():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.calls = nn.Conv2d(3, 3, 1), 0

        def forward(self, x):
            self.calls += 1
            return torch.relu(self.conv(x))

    fused = seqfuse.fuse(Counting().eval())
    assert fused.calls == 0  # tracing changed nothing
    with torch.no_grad():
        fused(torch.randn(1, 3, 4, 4))
    assert fused.calls == 1
    assert "assigns attributes" in seqfuse.explain(fused).untraced["(model)"]


def test_hook_registered_after_fuse_sees_its_call():
    model = _make()
    fused = seqfuse.fuse(model)
    seen = []
    fused.block1.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.block1.conv2.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    assert seen == [torch.Size([2, 4, 8, 8])]


def test_hook_on_an_inlined_sequential_fires():
    model = _make()
    fused = seqfuse.fuse(model)
    seen = []
    fused.stem.register_forward_hook(lambda m, i, o: seen.append(1))
    with torch.no_grad():
        fused(torch.randn(1, 3, 8, 8))
    assert seen == [1]


def test_replaced_child_and_edited_weights_are_seen():
    model = _make()
    fused = seqfuse.fuse(model)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    new = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    fused.block1.conv1 = new
    model.block1.conv1 = copy.deepcopy(new)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
        fused.block2.conv2.weight.mul_(2)
        model.block2.conv2.weight.mul_(2)
        torch.testing.assert_close(fused(x), model(x))
        fused.block1.down = None  # an attribute the graph was built from
        model.block1.down = None
        torch.testing.assert_close(fused(x), model(x))


def test_pickle_deepcopy_and_dtype_conversion():
    model = _make()
    fused = seqfuse.fuse(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        fused(x)
        for clone in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            assert isinstance(clone.__dict__["forward"], CapturedForward) and clone.forward.module is clone
            assert type(clone.stem).__name__ == "SubSeq"
            torch.testing.assert_close(clone(x), ref)
        torch.testing.assert_close(fused.double()(x.double()), model.double()(x.double()))


def test_threads_share_one_fused_model():
    model = _make()
    fused = seqfuse.fuse(model)
    for m in fused.modules():  # forget the traces fuse() made: the threads' first calls trace, one at a time
        if isinstance(m.__dict__.get("forward"), CapturedForward):
            m.__dict__["forward"] = CapturedForward(m)
    xs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    out = [None] * 4

    def work(i):
        with torch.no_grad():
            out[i] = fused(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        for x, y in zip(xs, out):
            torch.testing.assert_close(y, model(x))


def test_bad_input_gets_eagers_error_type_naming_the_module():
    fused = seqfuse.fuse(_make())
    with pytest.raises(RuntimeError) as err, torch.no_grad():
        fused(torch.randn(1, 5, 8, 8))
    assert "(1, 5, 8, 8)" in str(err.value)
    with torch.no_grad():
        fused(torch.randn(1, 3, 8, 8))  # still usable


def test_compile_and_export_of_a_fused_model():
    model = _make()
    fused = seqfuse.fuse(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.compile(fused, backend="eager", fullgraph=True)(x), ref)
    exported = torch.export.export(fused, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), ref)


def test_training_matches_eager_with_residual_and_se():
    torch.manual_seed(0)
    model = _randomize_bn(Net()).train()
    fused = seqfuse.fuse(model)
    opt_e = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    for step in range(2):
        x = torch.randn(4, 3, 8, 8)
        xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yf = model(xe), fused(xf)
        torch.testing.assert_close(yf, ye, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(ye)
        (ye * g).sum().backward()
        (yf * g).sum().backward()
        torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-4, atol=1e-5)
        for (n, pe), pf in zip(model.named_parameters(), fused.parameters()):
            torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step} {n}: {m}")
        for (n, be), bf in zip(model.named_buffers(), fused.buffers()):
            torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {n}: {m}")
        opt_e.step(), opt_f.step(), opt_e.zero_grad(), opt_f.zero_grad()
    # train -> eval re-traces for the other mode and still matches
    model.eval(), fused.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(fused(x), model(x))


def test_gradcheck_through_a_captured_residual_chain():
    torch.manual_seed(0)
    model = _randomize_bn(Residual(3, 3)).double().eval()
    fused = seqfuse.fuse(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,))
    torch.testing.assert_close(fused(x), model(x))


def test_native_residual_add_takes_only_the_in_place_case():
    """_C.add_residual_ (Chain's residual epilogue in one call) adds in place
    only where the Python path would, and hands every other case back (None)."""
    from seqfuse._loader import _C

    x = torch.randn(2, 3, 4, 4)
    r = torch.randn(2, 3, 4, 4)
    y = torch.randn(2, 3, 4, 4)
    expect = torch.relu(y + r)
    with torch.no_grad():
        out = _C.add_residual_(y, r, x, True)
    assert out is y and torch.equal(y, expect)
    y2 = torch.randn(2, 3, 4, 4)
    expect = y2 + r
    assert _C.add_residual_(y2, r, x, False) is y2 and torch.equal(y2, expect)

    class Sub(torch.Tensor):
        pass

    fresh = lambda: torch.randn(2, 3, 4, 4)  # noqa: E731
    declined = [
        (x, r, x),                                          # the chain returned its input
        (fresh(), torch.randn(1, 3, 1, 1), x),              # broadcasting: out of place
        (fresh(), r.double(), x),                           # dtype promotion
        (fresh()[:, :2], r[:, :2], x),                      # a view
        (fresh().as_subclass(Sub), r, x),                   # a subclass sees its own add
        (fresh().requires_grad_(), r, x),                   # autograd records it
    ]
    for y_, r_, x_ in declined:
        before = y_.detach().clone()
        assert _C.add_residual_(y_, r_, x_, True) is None
        assert torch.equal(y_.detach(), before)  # untouched
