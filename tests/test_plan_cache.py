"""The cached plan can never be stale: every change a forward depends on is
seen on the next call, and the output keeps matching nn.Sequential's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqfuse import FusedSequential

from conftest import forbid_eager, randomize_batchnorm


def make():
    torch.manual_seed(0)
    m = FusedSequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    randomize_batchnorm(m[1], torch.Generator().manual_seed(1))
    return m


def check(m, x=None):
    x = torch.randn(5, 8) if x is None else x
    with torch.no_grad():
        ref = nn.Sequential(*m)(x)
        out = m(x)
    torch.testing.assert_close(out, ref)
    return out


def plan_of(m):
    return m.__dict__.get("_seqfuse_plan")


def test_plan_is_reused_when_nothing_changes():
    m = make()
    check(m)
    p = plan_of(m)
    check(m)
    assert plan_of(m) is p


def test_after_optimizer_step():
    m = make()
    x = torch.randn(5, 8)
    check(m, x)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).sum().backward()  # grad mode: runs eagerly
    opt.step()
    check(m, x)


def test_after_in_place_buffer_edit():
    m = make()
    before = check(m)
    m[1].running_var.fill_(4)
    after = check(m)
    assert not torch.equal(before, after)


def test_after_in_place_weight_edit_and_replacement():
    m = make()
    check(m)
    with torch.no_grad():
        m[0].weight.mul_(2)
    check(m)
    m[3].weight = nn.Parameter(torch.zeros(4, 16))
    out = check(m)
    assert torch.equal(out, m[3].bias.detach().expand_as(out))


def test_after_structural_edits():
    m = make()
    check(m)
    m.append(nn.Tanh())
    check(m)
    m[2] = nn.GELU()
    check(m)
    del m[-1]
    check(m)
    m.insert(0, nn.Identity())
    check(m)
    m.extend([nn.Sigmoid()])
    check(m)
    m.pop(0)
    check(m)
    m._modules["3"] = nn.Linear(16, 4)  # direct writes, as torch.ao fuse_modules does
    check(m)


def test_after_mode_switches():
    m = make()
    check(m)
    m.train()
    x = torch.randn(6, 8)
    with torch.no_grad():
        out = m(x)  # BatchNorm in training: batch statistics, running stats updated (eager)
    m.eval()
    check(m)
    m[1].eval(), m[0].train()
    check(m)
    assert out.shape == (6, 4)


def test_after_child_attribute_change():
    m = FusedSequential(nn.Linear(4, 4), nn.LeakyReLU(0.1))
    x = torch.randn(7, 4)
    check(m, x)
    m[1].negative_slope = 0.5
    check(m, x)
    g = FusedSequential(nn.Linear(4, 4), nn.GELU())
    check(g, x)
    g[1].approximate = "tanh"
    check(g, x)


def test_after_dtype_conversion():
    m = make()
    check(m)
    m.double()
    check(m, torch.randn(5, 8, dtype=torch.float64))
    m.float()
    check(m)


def test_after_hook_appears_and_goes():
    m = make()
    check(m)
    seen = []
    h = m[2].register_forward_pre_hook(lambda mod, inp: seen.append(1))
    check(m)
    assert seen == [1, 1]  # the reference nn.Sequential and the FusedSequential
    h.remove()
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = nn.Sequential(*m)(x)
        with forbid_eager(nn.ReLU):  # fused again once the hook is gone
            torch.testing.assert_close(m(x), ref)


def test_after_instance_forward_override():
    m = make()
    check(m)
    m[2].forward = lambda x: x * 0 + 1
    out = check(m)
    del m[2].forward
    check(m)
    assert out is not None


def test_after_requires_grad_change_and_functional_call():
    m = make()
    x = torch.randn(5, 8)
    check(m, x)
    for p in m.parameters():
        p.requires_grad_(False)
    with forbid_eager(nn.Linear, nn.ReLU, nn.BatchNorm1d):
        out = m(x)  # grad mode on, nothing requires grad: fused
    params = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    with torch.no_grad():
        zero = torch.func.functional_call(m, params, (x,))
    assert torch.count_nonzero(zero) == 0
    with torch.no_grad():
        torch.testing.assert_close(m(x), out)


def test_autograd_needed_runs_eagerly_with_grad_fn():
    m = make()
    x = torch.randn(5, 8, requires_grad=True)
    y = m(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and m[0].weight.grad is not None


def test_invalidate_plan_after_data_edit():
    m = make()
    check(m)
    m[0].weight.data.mul_(3)  # .data bypasses the version counter
    m.invalidate_plan()
    check(m)


@pytest.mark.parametrize("threads", [4])
def test_concurrent_calls_from_threads(threads):
    import threading

    m = make()
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = nn.Sequential(*m)(x)
    errors = []

    def worker():
        try:
            with torch.no_grad():
                for _ in range(200):
                    torch.testing.assert_close(m(x), ref)
                    if torch.rand(()) < 0.05:
                        m.invalidate_plan()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_autocast_inference_keeps_eager_dtypes():
    """Inference under CPU bfloat16 autocast runs the bfloat16 run of the
    plan (tests/test_autocast.py): eager's output dtype, its values within
    bfloat16 rounding."""
    m = make()
    x = torch.randn(5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = nn.Sequential(*m)(x)
        out = m(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_inference_mode_and_no_grad_outputs():
    m = make()
    x = torch.randn(5, 8)
    with torch.inference_mode():
        y = m(x)
    assert y.is_inference()
    with torch.no_grad():
        z = m(x)
    assert not z.requires_grad and z.grad_fn is None
    torch.testing.assert_close(y, z)


def test_weights_are_packed_once_per_plan(monkeypatch):
    from seqfuse import ops

    calls = []
    real = ops.mlp_pack
    monkeypatch.setattr(ops, "mlp_pack", lambda *a: calls.append(1) or real(*a))
    m = make()
    x = torch.randn(5, 8)
    with torch.no_grad():
        for _ in range(10):
            m(x)
        assert len(calls) == 1  # packed when the plan was built, never per call
        m[0].weight.add_(1)
        m(x)
    assert len(calls) == 2  # and again once the weights changed
