"""Regression tests: each reproduces a case where
FusedSequential once differed from nn.Sequential."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import seqfuse
from seqfuse import FusedSequential


def same_as_eager(model, x, **close):
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.Sequential(*model)(x), **close)


def test_parameters_created_under_inference_mode_are_never_stale():
    with torch.inference_mode():
        model = FusedSequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        x = torch.randn(3, 4)
        model(x)
        model[0].weight.mul_(-1)
        torch.testing.assert_close(model(x), nn.Sequential(*model)(x))
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        assert torch.count_nonzero(model(x)) == 0


def test_batchnorm_trained_elsewhere_is_seen():
    train_net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    serve = FusedSequential(*train_net).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        serve(x)
        train_net.train()
        train_net(torch.randn(64, 8) * 3 + 2)  # updates running stats in place
        train_net.eval()
    same_as_eager(serve, x)


def test_forward_mode_tangents_on_parameters():
    model = FusedSequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    tangents = {k: torch.randn_like(v) for k, v in model.named_parameters()}

    def tangent_of(m):
        with fwAD.dual_level():
            p = {k: fwAD.make_dual(v.detach(), tangents[k]) for k, v in model.named_parameters()}
            return fwAD.unpack_dual(torch.func.functional_call(m, p, (x,))).tangent

    torch.testing.assert_close(tangent_of(model), tangent_of(nn.Sequential(*model)))


def test_intermediate_requiring_grad_from_an_eager_child():
    class Scale(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, x):
            return x * self.s

    s = torch.tensor(2.0, requires_grad=True)
    lin = nn.Linear(4, 2).requires_grad_(False)
    x = torch.randn(3, 4)
    FusedSequential(Scale(s), lin, nn.Tanh())(x).sum().backward()
    fused_grad, s.grad = s.grad, None
    nn.Sequential(Scale(s), lin, nn.Tanh())(x).sum().backward()
    torch.testing.assert_close(fused_grad, s.grad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: [nn.Linear(8, 8), nn.BatchNorm1d(8, bias=False).eval(), nn.ReLU()],
        lambda: [nn.Linear(8, 0), nn.ReLU()],
        lambda: [nn.Linear(0, 4), nn.ReLU()],
    ],
    ids=["bn_bias_false", "zero_out", "zero_in"],
)
def test_unusual_but_valid_modules_run_like_eager(make):
    mods = make()
    x = torch.randn(3, mods[0].in_features)
    same_as_eager(FusedSequential(*mods).eval(), x)


def test_weight_shape_not_matching_declared_features():
    lin = nn.Linear(8, 16)
    lin.weight = nn.Parameter(torch.randn(12, 8))  # as after structured pruning
    lin.bias = nn.Parameter(torch.randn(12))
    same_as_eager(FusedSequential(lin, nn.ReLU()), torch.randn(3, 8))


def test_dispatch_mode_errors_pass_through():
    class Blocked(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            raise ValueError("blocked")

    model = FusedSequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        model(x)
        with pytest.raises(ValueError, match="blocked"), Blocked():
            model(x)
        same_as_eager(model, x)


def test_swap_on_conversion_and_load():
    model = FusedSequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        model(x)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
        same_as_eager(model, x.double())
        model.load_state_dict({k: torch.ones_like(v) for k, v in model.state_dict().items()})
        same_as_eager(model, x.double())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_huge_widths_in_a_spec_are_rejected_not_overflowed():
    spec, fparams = [1, 0, 2, 1, 0, 2**62 + 16, 0, 0, 0, 1, 0, 0], [0.0] * 4
    with pytest.raises(ValueError, match="out of range"):
        seqfuse.ops._C.mlp_packed_nbytes(spec, fparams)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.seqfuse.mlp_forward.default(torch.zeros(1, 1), torch.zeros(64, dtype=torch.uint8), [], spec, fparams)


def test_relu6_with_edited_bounds():
    act = nn.ReLU6()
    act.max_val = 1.0
    model = FusedSequential(nn.Linear(4, 4), act)
    same_as_eager(model, torch.randn(9, 4) * 5)
    assert "ReLU6(min_val=0.0, max_val=1.0) is not supported (fused: min_val=0.0, max_val=6.0)" in str(model.explain())


def test_tensor_subclass_input_and_torch_function_mode():
    class MyTensor(torch.Tensor):
        pass

    model = FusedSequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = model(x.as_subclass(MyTensor))
    assert type(y) is MyTensor

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    assert Count.calls >= 2  # linear and relu were seen


def test_compiled_flatten_then_batchnorm_on_non_2d_input_errors_like_eager():
    torch._dynamo.reset()
    model = FusedSequential(nn.Flatten(0, 1), nn.Linear(12, 5), nn.BatchNorm1d(5)).eval()
    x = torch.randn(3, 4)
    with torch.no_grad(), pytest.raises(Exception, match="expected 2D or 3D input"):
        nn.Sequential(*model)(x)
    with torch.no_grad(), pytest.raises(Exception, match="expected 2D or 3D input"):
        torch.compile(model, backend="eager", fullgraph=True)(x)


def test_mixed_precision_blocks_run_without_warnings():
    model = FusedSequential(nn.Linear(8, 8).bfloat16(), nn.BatchNorm1d(8).eval(), nn.ReLU()).eval()
    same_as_eager(model, torch.randn(3, 8, dtype=torch.bfloat16))  # SeqfuseWarning would be an error


def test_meta_input_errors_like_eager():
    model = FusedSequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(3, 8, device="meta")
    with torch.no_grad():
        with pytest.raises(RuntimeError) as eager:
            nn.Sequential(*model)(x)
        with pytest.raises(RuntimeError) as fused:
            model(x)
    assert str(eager.value) in str(fused.value)


def test_a_segment_the_packing_rejects_runs_eagerly_with_a_warning(monkeypatch):
    from seqfuse import ops

    def broken(*args):
        raise RuntimeError("simulated packing failure")

    monkeypatch.setattr(ops, "mlp_pack", broken)
    model = FusedSequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    with pytest.warns(seqfuse.SeqfuseWarning, match="simulated packing failure"):
        with torch.no_grad():
            out = model(x)
    torch.testing.assert_close(out, nn.Sequential(*model)(x).detach())
