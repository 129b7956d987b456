"""Sound capture: a captured forward runs only where its trace's assumptions
hold (optional arguments, lists, keyword arguments, Python values, module
lists, the training flag), tracing patches nothing another thread can see,
and the safety net returns the module's own result where a fused path fails."""

from __future__ import annotations

import math
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqfuse
from seqfuse import SeqfuseWarning
from seqfuse.bench.sweep import randomize_batchnorm
from seqfuse.capture import forward as capture_forward
from seqfuse.capture import tracer as capture_tracer


def _randomize_bn(model, seed=1):
    randomize_batchnorm(model, seed)
    return model


def _cbr(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class OptionalShortcut(nn.Module):
    """dla34's block: ``forward(x, shortcut=None)``; the proxy of a traced
    optional argument would answer ``is None`` with False."""

    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + shortcut)


class Decoder(nn.Module):
    """``forward(x, skip=None)`` with a keyword-only scale and a concatenation."""

    def __init__(self, c=6, c_skip=4):
        super().__init__()
        self.with_skip = _cbr(c + c_skip, c)
        self.without = _cbr(c, c)

    def forward(self, x, skip=None, *, upsample: bool = True):
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            return self.with_skip(torch.cat([x, skip], 1))
        return self.without(x)


class ListInput(nn.Module):
    """A neck taking a list of feature maps and returning a dict and a tuple."""

    def __init__(self, c=(4, 6, 8)):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(ci, 5, 1), nn.BatchNorm2d(5), nn.ReLU()) for ci in c)

    def forward(self, feats):
        outs = [lat(f) for lat, f in zip(self.lateral, feats)]
        return {"sum": sum(o.mean((2, 3)) for o in outs)}, tuple(outs)


class ShapeBranch(nn.Module):
    """Control flow on shapes (fx cannot trace it: the module's own forward
    runs, its children stay fused)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(4, 4), _cbr(4, 4)

    def forward(self, x):
        if x.shape[-1] > 6:
            return self.a(x)
        return self.b(x)


class TwiceAndInPlace(nn.Module):
    """A child called twice, an in-place update of an intermediate, a Python
    loop over a ModuleList."""

    def __init__(self):
        super().__init__()
        self.body = _cbr(4, 4)
        self.blocks = nn.ModuleList([_cbr(4, 4), _cbr(4, 4)])

    def forward(self, x):
        y = self.body(x)
        y = self.body(y)
        y.mul_(0.5)
        for b in self.blocks:
            y = b(y) + y
        return y


def _pair(cls, *args):
    torch.manual_seed(0)
    model = _randomize_bn(cls(*args)).eval()
    return model, seqfuse.fuse(model)


def _same(a, b):
    torch.testing.assert_close(a, b)


def test_optional_argument_both_ways_alternating():
    model, fused = _pair(OptionalShortcut)
    x, s = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        for _ in range(3):
            _same(fused(x), model(x))
            _same(fused(x, s), model(x, s))
            _same(fused(x, shortcut=s), model(x, shortcut=s))
            _same(fused(x, None), model(x, None))
    cases = fused.forward.cases()
    assert len(cases) == 4 and all(c.fn is not None for c in cases)
    assert all(len(c.chains) == 1 and c.chains[0].residual for c in cases)  # conv-bn-relu-conv-bn + shortcut, relu


def test_optional_argument_in_training_matches_gradients_and_buffers():
    model, fused = _pair(OptionalShortcut)
    model.double().train(), fused.double().train()  # float64: gradients summed in another order agree to 1e-7
    x, s = torch.randn(3, 6, 5, 5, dtype=torch.float64), torch.randn(3, 6, 5, 5, dtype=torch.float64)
    for args in ((x,), (x, s), (x,)):
        a = [t.clone().requires_grad_() for t in args]
        b = [t.clone().requires_grad_() for t in args]
        model(*a).square().sum().backward()
        fused(*b).square().sum().backward()
        for ta, tb in zip(a, b):
            _same(tb.grad, ta.grad)
    for (n, p), q in zip(model.named_parameters(), fused.parameters()):
        _same(q.grad, p.grad)
    for (n, b), c in zip(model.named_buffers(), fused.buffers()):
        _same(c, b)


def test_keyword_only_and_optional_skip_with_concatenation():
    model, fused = _pair(Decoder)
    x, skip = torch.randn(1, 6, 4, 4), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for _ in range(2):
            _same(fused(x, skip), model(x, skip))
            _same(fused(x), model(x))
            _same(fused(x, upsample=False), model(x, upsample=False))
            _same(fused(x, skip=skip, upsample=True), model(x, skip=skip, upsample=True))


def test_list_argument_and_structured_outputs():
    model, fused = _pair(ListInput)
    feats = [torch.randn(2, c, 6 - i, 6 - i) for i, c in enumerate((4, 6, 8))]
    with torch.no_grad():
        (d, t), (d0, t0) = fused(feats), model(feats)
        _same(d["sum"], d0["sum"])
        for a, b in zip(t, t0):
            _same(a, b)
        # a shorter list is another case (the trace unrolled the zip over three)
        (d, t), (d0, t0) = fused(feats[:2]), model(feats[:2])
        _same(d["sum"], d0["sum"])
        assert len(t) == 2
    # the two list cases are traced (fuse() also tried forward(tensor), which this forward cannot take)
    assert sum(c.fn is not None for c in fused.forward.cases()) == 2


def test_shape_dependent_branch_runs_its_own_forward():
    model, fused = _pair(ShapeBranch)
    with torch.no_grad():
        for size in (8, 5, 8):
            x = torch.randn(1, 4, size, size)
            _same(fused(x), model(x))
    e = seqfuse.explain(fused)
    assert "(model)" in e.untraced
    assert set(e.fused) == {"a.0", "a.1", "b.0", "b.1"}  # the Sequentials stay fused


def test_child_twice_inplace_and_module_list_growth():
    model, fused = _pair(TwiceAndInPlace)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        _same(fused(x), model(x))
        torch.manual_seed(5)
        extra = _randomize_bn(_cbr(4, 4), seed=7).eval()
        model.blocks.append(extra)
        fused.blocks.append(_randomize_bn(_cbr(4, 4), seed=7).eval())
        fused.blocks[2].load_state_dict(extra.state_dict())
        _same(fused(x), model(x))  # the appended block runs: the guard saw the list grow


def test_training_flag_is_a_case():
    model, fused = _pair(OptionalShortcut)
    x = torch.randn(2, 6, 5, 5)
    for mode in (True, False, True):
        model.train(mode), fused.train(mode)
        with torch.no_grad():
            _same(fused(x), model(x))
    assert {c for c, _ in fused.forward._cases} == {True, False}


def test_tracing_patches_nothing_global():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            seen.append((nn.Module.__call__, nn.Module.__getattr__, math.sqrt, nn.Conv2d.__call__))
            return torch.relu(self.conv(x))

    before = (nn.Module.__call__, nn.Module.__getattr__, math.sqrt, nn.Conv2d.__call__)
    fused = seqfuse.fuse(Probe().eval())
    with torch.no_grad():
        fused(torch.randn(1, 3, 4, 4))
    assert seen and all(s == before for s in seen)  # inside the trace too
    assert "forward" not in fused.conv.__dict__ and type(fused.conv) is nn.Conv2d


def test_hooked_child_is_recorded_without_running_its_hook_on_proxies():
    calls = []
    model, fused = _pair(OptionalShortcut)
    fused.conv1.register_forward_hook(lambda m, i, o: calls.append(type(o)))
    x = torch.randn(1, 6, 4, 4)
    with torch.no_grad():
        _same(fused(x), model(x))
    assert calls == [torch.Tensor] and type(fused.conv1) is nn.Conv2d


def test_eager_model_in_another_thread_is_undisturbed_while_models_are_traced():
    import torchvision

    torch.manual_seed(0)
    server = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = server(x)
    stop = threading.Event()
    results = {"ok": 0, "bad": [], "during_traces": 0}
    tracing = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    y = server(x)
                if torch.equal(y, ref):
                    results["ok"] += 1
                    if tracing.is_set():
                        results["during_traces"] += 1
                else:
                    results["bad"].append("differs")
            except Exception as err:  # what a global patch makes other threads raise
                results["bad"].append(f"{type(err).__name__}: {err}")

    original = capture_forward.trace_forward

    def traced_slowly(*args, **kwargs):
        tracing.set()
        try:
            time.sleep(0.002)  # widen the window in which the other thread must keep working
            return original(*args, **kwargs)
        finally:
            tracing.clear()

    capture_forward.trace_forward = traced_slowly
    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0",
                     "efficientnet_b0", "regnet_y_400mf", "densenet121", "googlenet", "mnasnet0_5"):
            kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
            model = getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()
            fused = seqfuse.fuse(model)
            with torch.no_grad():
                fused(torch.randn(1, 3, 64, 64))
    finally:
        capture_forward.trace_forward = original
        stop.set()
        worker.join()
    assert results["bad"] == []
    assert results["during_traces"] > 0, "the eager thread never ran while a trace was open"


# ---- the safety net ---------------------------------------------------------------------------------------------------

class _Planted(Exception):
    pass


def _plant_failure(fused, when, *args):
    """Makes the first chain of the model's trace for ``args`` raise when ``when(x)``."""
    chain = fused.forward.traced(*args).chains[0]
    real = chain.seq.forward

    def failing(x):
        if when(x):
            raise RuntimeError("planted kernel failure")
        return real(x)

    chain.seq.__dict__["forward"] = failing
    return chain


def test_safety_net_returns_own_result_warns_once_and_keeps_other_cases_fused():
    model, fused = _pair(OptionalShortcut)
    x, s = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        fused(x)  # the case (one tensor) is traced
        fused(x, s)
        _plant_failure(fused, lambda t: True, x)
        with pytest.warns(SeqfuseWarning, match=r"OptionalShortcut.*\(2, 6, 5, 5\).*planted kernel failure"):
            out = fused(x)
        _same(out, model(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _same(fused(x), model(x))  # no second warning: the case runs the module's own forward
            _same(fused(x, s), model(x, s))  # the other case is still fused
    fell = [c for c in fused.forward.cases() if c.fell_back]
    assert len(fell) == 1 and "planted kernel failure" in fell[0].error
    assert "fell back" in seqfuse.explain(fused).untraced.get("(model)", "") or any(
        c.fn is not None for c in fused.forward.cases())


def test_safety_net_keeps_eagers_error_for_bad_input():
    model, fused = _pair(OptionalShortcut)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"\(1, 5, 4, 4\)"):
        fused(torch.randn(1, 5, 4, 4))
    with torch.no_grad():
        x = torch.randn(1, 6, 4, 4)
        _same(fused(x), model(x))
    assert all(not c.fell_back for c in fused.forward.cases())


def test_training_failure_after_state_changed_reraises_naming_the_module():
    class TwoChains(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(4, 4), _cbr(4, 4)

        def forward(self, x):
            y = self.a(x)
            return self.b(y.flip(1))

    torch.manual_seed(0)
    fused = seqfuse.fuse(TwoChains().train())
    x = torch.randn(2, 4, 5, 5)
    fused(x)
    t = fused.forward.traced(x)
    second = t.chains[1].seq
    second.__dict__["forward"] = lambda y: (_ for _ in ()).throw(RuntimeError("planted kernel failure"))
    with pytest.raises(RuntimeError, match=r"TwoChains.*updated state"):
        fused(x)


def test_training_failure_before_any_state_change_falls_back():
    model, fused = _pair(OptionalShortcut)
    model.train(), fused.train()
    x = torch.randn(2, 6, 5, 5)
    fused(x)
    _plant_failure(fused, lambda t: True, x)
    with pytest.warns(SeqfuseWarning, match="planted"):
        out = fused(x)
    ref = model(x)
    model(x)
    _same(out, ref)
    for b, c in zip(model.buffers(), fused.buffers()):
        _same(c, b)  # one statistics update per call, as eager


def test_unsupported_argument_type_runs_own_forward():
    class TakesObject(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _cbr(3, 3)

        def forward(self, x, cfg):
            return self.body(x) * cfg.scale

    class Cfg:
        scale = 2.0

    torch.manual_seed(0)
    model = TakesObject().eval()
    fused = seqfuse.fuse(model)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        _same(fused(x, Cfg()), model(x, Cfg()))


def test_call_signature_keys():
    t = torch.zeros(1)
    key = capture_tracer.call_signature
    assert key((t,), {})[0] == key((torch.ones(2, 2),), {})[0]
    assert key((t, None), {})[0] != key((t, t), {})[0]
    assert key((t, [t, t]), {})[0] != key((t, [t]), {})[0]
    assert key((t, 1), {})[0] != key((t, True), {})[0]
    assert key((t,), {"skip": None})[0] != key((t,), {"skip": t})[0]
    assert len(key((t, {"a": [t, t]}), {})[1]) == 3
    with pytest.raises(capture_tracer.UnsupportedSignature):
        key((t, object()), {})
