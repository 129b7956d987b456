"""The first-call check of fused kernels against eager (seqfuse.verify): on
CUDA by default; here on the CPU, with a wrong kernel stood in for a broken one."""

import copy
import warnings

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential, SeqfuseWarning, verify
from seqfuse import container as container_mod


@pytest.fixture
def checked_cpu():
    """Checks CPU calls for the test's duration."""
    before = verify.kernel_check("cpu")
    verify.set_kernel_check("first", "cpu")
    yield
    verify.set_kernel_check(before, "cpu")


@pytest.fixture
def wrong_inference_kernel(monkeypatch):
    """Every packed inference call returns its result off by one: a stand-in
    for a fused kernel that computes the wrong thing. Counts its calls."""
    calls = []
    real_pack = container_mod._FusedRun.pack

    def pack(self):
        call = real_pack(self)

        def wrong(x):
            calls.append(tuple(x.shape))
            y = call(x)
            return None if y is None else y + 1.0

        return wrong

    monkeypatch.setattr(container_mod._FusedRun, "pack", pack)
    return calls


def _mlp():
    torch.manual_seed(0)
    return FusedSequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_defaults_check_cuda_not_cpu():
    assert verify.kernel_check("cuda") in verify.MODES
    assert verify.kernel_check("cpu") == "off"
    with pytest.raises(ValueError, match="unknown kernel check mode"):
        verify.set_kernel_check("sometimes")


def test_wrong_kernel_warns_returns_eager_and_stays_eager(checked_cpu, wrong_inference_kernel):
    model = _mlp()
    eager = nn.Sequential(*model)
    x = torch.randn(5, 6)
    with torch.no_grad(), pytest.warns(SeqfuseWarning, match=r"disagrees with eager.*\(5, 6\)"):
        y = model(x)
    torch.testing.assert_close(y, eager(x))
    assert wrong_inference_kernel == [(5, 6)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = model(torch.randn(40, 6))  # another shape class: still eager, no second warning
        model.invalidate_plan()  # a rebuilt plan remembers the failure
        y3 = model(x)
    assert wrong_inference_kernel == [(5, 6)]
    assert y2.shape == (40, 3)
    torch.testing.assert_close(y3, eager(x))


def test_correct_kernel_is_checked_once_per_shape_class(checked_cpu, monkeypatch):
    checks = []
    real = verify.mismatch
    monkeypatch.setattr(verify, "mismatch", lambda *a: checks.append(tuple(a[3].shape)) or real(*a))
    model = _mlp()
    eager = nn.Sequential(*model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in (2, 3, 2, 5, 7, 1):  # buckets 2, 2, 2, 3, 3, 1
            x = torch.randn(batch, 6)
            torch.testing.assert_close(model(x), eager(x))
    assert checks == [(2, 6), (5, 6), (1, 6)]
    verify.set_kernel_check("always", "cpu")
    with torch.no_grad():
        model(torch.randn(2, 6))
        model(torch.randn(2, 6))
    assert len(checks) == 5


def test_check_off_uses_the_guards_direct_call(monkeypatch):
    """Unchecked devices keep the one-segment fast path (the guard calls the kernel itself)."""
    model = _mlp()
    with torch.no_grad():
        model(torch.randn(2, 6))
    plan = model.__dict__[container_mod._PLAN_ATTR]
    assert plan.runs[0].on_packed is not None


def test_conv_run_is_checked(checked_cpu, wrong_inference_kernel):
    torch.manual_seed(1)
    model = FusedSequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)).eval()
    eager = copy.deepcopy(nn.Sequential(*model))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad(), pytest.warns(SeqfuseWarning, match="disagrees with eager"):
        y = model(x)
    torch.testing.assert_close(y, eager(x))


def test_wrong_training_kernel_falls_back_with_one_running_stats_update(checked_cpu, monkeypatch):
    real_init = container_mod._FusedRun.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.train_call is not None:
            call = self.train_call
            self.train_call = lambda x: (lambda y: None if y is None else y * 2.0)(call(x))

    monkeypatch.setattr(container_mod._FusedRun, "__init__", init)
    torch.manual_seed(2)
    model = FusedSequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).train()
    twin = copy.deepcopy(nn.Sequential(*model))
    x = torch.randn(16, 5)
    with pytest.warns(SeqfuseWarning, match="disagrees with eager"):
        y = model(x)
    y_ref = twin(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, dict(twin.named_buffers())[name], msg=name)


def test_correct_training_kernel_updates_running_stats_once(checked_cpu):
    torch.manual_seed(3)
    model = FusedSequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU()).train()
    twin = copy.deepcopy(nn.Sequential(*model))
    x = torch.randn(12, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model(x)
    torch.testing.assert_close(y, twin(x))
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mismatch_rule(dtype):
    torch.manual_seed(4)
    mods = [nn.Linear(8, 8).to(dtype), nn.GELU()]
    x = torch.randn(4, 8, dtype=dtype)
    with torch.no_grad():
        eager = mods[1](mods[0](x))
    assert verify.mismatch(eager.clone(), eager, mods, x) is None
    assert verify.mismatch(eager + 0.5, eager, mods, x) is not None
    nan = eager.clone()
    nan[0, 0] = float("nan")
    assert "NaN" in verify.mismatch(nan, eager, mods, x)
    assert verify.mismatch(eager[:2], eager, mods, x) is not None


def test_public_api():
    assert seqfuse.verify is verify


def test_a_failed_segment_stays_eager_while_checks_are_paused(checked_cpu, wrong_inference_kernel, monkeypatch):
    """During a CUDA-graph capture checks pause ("capturing"); a segment whose
    check failed before must still run eagerly, never its fused kernel."""
    model = _mlp()
    eager = nn.Sequential(*model)
    x = torch.randn(4, 6)
    with torch.no_grad(), pytest.warns(SeqfuseWarning):
        model(x)
    monkeypatch.setattr(container_mod, "_check_mode", lambda x: "capturing")
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))
        model(torch.randn(50, 6))  # an unchecked shape class: still eager
    assert wrong_inference_kernel == [(4, 6)]
