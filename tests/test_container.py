"""FusedSequential keeps nn.Sequential's container contract (see the
contract checklist): construction, indexing, mutation, arithmetic, state,
copies and serialization, with no state of its own."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from seqfuse import FusedSequential


def lins(n=4):
    return [nn.Linear(3, 3) for _ in range(n)]


def keys(s):
    return list(s._modules.keys())


def both(*mods):
    """The same modules in an nn.Sequential and a FusedSequential."""
    return nn.Sequential(*mods), FusedSequential(*mods)


def test_is_a_sequential_subclass():
    s = FusedSequential()
    assert isinstance(s, nn.Sequential) and len(s) == 0 and not s
    assert repr(s) == "FusedSequential()"


def test_constructor_forms():
    l1, l2 = lins(2)
    assert keys(FusedSequential(l1, l2)) == ["0", "1"]
    named = FusedSequential(OrderedDict([("a", l1), ("b", l2)]))
    assert keys(named) == ["a", "b"] and named.a is l1
    with pytest.raises(TypeError, match="dict is not a Module subclass"):
        FusedSequential({"a": l1})
    with pytest.raises(TypeError, match="list is not a Module subclass"):
        FusedSequential([l1])
    with pytest.raises(TypeError):
        FusedSequential(a=l1)
    assert list(FusedSequential(None, l1)) == [None, l1]


def test_getitem_int_negative_tensor_and_errors():
    l1, l2, l3, l4 = mods = lins()
    s = FusedSequential(*mods)
    assert s[0] is l1 and s[-1] is l4 and s[-4] is l1 and s[True] is l2 and s[torch.tensor(2)] is l3
    with pytest.raises(IndexError, match="index 4 is out of range"):
        s[4]
    with pytest.raises(IndexError, match="index -5 is out of range"):
        s[-5]
    with pytest.raises(TypeError):
        s[1.0]
    with pytest.raises(TypeError):
        s["0"]


def test_slice_keeps_type_and_original_keys():
    l1, l2, l3, l4 = mods = lins()
    s = FusedSequential(*mods).eval()
    t = s[1:]
    assert type(t) is FusedSequential and keys(t) == ["1", "2", "3"] and t[0] is l2
    assert keys(s[::-1]) == ["3", "2", "1", "0"] and keys(s[1::2]) == ["1", "3"]
    assert t.training is True  # a new module, as with nn.Sequential
    assert list(s[2:].state_dict()) == ["2.weight", "2.bias", "3.weight", "3.bias"]
    assert len(s[10:]) == 0 and s[:] is not s


def test_setitem_delitem_renumbering():
    l1, l2, l3, l4 = lins()
    s = FusedSequential(OrderedDict(a=l1, b=l2, c=l3))
    s[0] = l4
    assert s.a is l4 and keys(s) == ["a", "b", "c"]
    with pytest.raises(IndexError, match="index 3 is out of range"):
        s[3] = l1
    with pytest.raises(TypeError, match="cannot assign 'int' as child module"):
        s[0] = 5
    del s[0]
    assert keys(s) == ["0", "1"] and list(s) == [l2, l3]
    t = FusedSequential(*lins())
    del t[1::2]
    assert keys(t) == ["0", "1"]
    del t[:]
    assert len(t) == 0


def test_len_iter_contains_dir():
    l1, l2 = lins(2)
    s = FusedSequential(OrderedDict(a=l1, b=l2))
    assert len(s) == 2 and list(s) == [l1, l2] and l2 in s and list(reversed(s)) == [l2, l1]
    assert "a" in dir(s) and "0" not in dir(FusedSequential(l1))


def test_add_and_mul_return_plain_sequential():
    l1, l2, l3 = lins(3)
    a, b = FusedSequential(l1), FusedSequential(l2, l3)
    c = a + b
    assert type(c) is nn.Sequential and list(c) == [l1, l2, l3] and keys(c) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="add operator supports only objects of Sequential class"):
        a + [l2]
    m = b * 2
    assert type(m) is nn.Sequential and list(m) == [l2, l3, l2, l3]
    assert type(2 * b) is nn.Sequential
    with pytest.raises(ValueError, match="Non-positive multiplication factor"):
        b * 0
    with pytest.raises(TypeError):
        b * 2.0


def test_iadd_imul_in_place_keep_class():
    l1, l2 = lins(2)
    a = FusedSequential(l1)
    ret = a.__iadd__(FusedSequential(l2))
    assert ret is a and type(a) is FusedSequential and list(a) == [l1, l2]
    a *= 2
    assert type(a) is FusedSequential and list(a) == [l1, l2, l1, l2]


def test_append_insert_extend_pop():
    l1, l2, l3, l4 = lins()
    s = FusedSequential(l1)
    assert s.append(l2) is s and keys(s) == ["0", "1"]
    assert s.insert(1, l3) is s and list(s) == [l1, l3, l2]
    with pytest.raises(IndexError, match="Index out of range: -5"):
        s.insert(-5, l4)
    with pytest.raises(AssertionError):
        s.insert(0, None)
    assert s.extend([l4]) is s and len(s) == 4
    assert s.pop(1) is l3 and keys(s) == ["0", "1", "2"]
    with pytest.raises(IndexError):
        s.pop(7)
    with pytest.raises(TypeError):
        s.pop()


def test_repr_matches_sequential_with_class_name():
    seq, fused = both(nn.Linear(2, 3), nn.ReLU())
    assert repr(fused) == repr(seq).replace("Sequential", "FusedSequential", 1)


def test_no_parameters_buffers_or_children_of_its_own():
    mods = [nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()]
    seq, fused = both(*mods)
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(2, 4))  # a plan now exists
    assert list(fused.state_dict()) == list(seq.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in seq.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in seq.named_buffers()]
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in seq.named_modules()]
    assert fused.state_dict()._metadata[""] == {"version": 1}
    for p_f, p_s in zip(fused.parameters(), seq.parameters()):
        assert p_f is p_s


def test_state_dict_round_trip_with_plain_sequential():
    seq = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    fused = FusedSequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    assert str(fused.load_state_dict(seq.state_dict())) == "<All keys matched successfully>"
    back = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    back.load_state_dict(fused.state_dict())
    x = torch.randn(3, 4)
    seq.eval(), fused.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x))
        torch.testing.assert_close(back(x), seq(x))


def _roundtrip_checks(orig, copy_):
    assert type(copy_) is FusedSequential and keys(copy_) == keys(orig)
    assert "_seqfuse_plan" not in copy_.__dict__ or copy_.__dict__["_seqfuse_plan"] is not orig.__dict__.get("_seqfuse_plan")
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), orig(x))


def fused_model():
    shared = nn.Linear(6, 6)
    m = FusedSequential(shared, nn.ReLU(), shared, nn.Tanh()).eval()
    with torch.no_grad():
        m(torch.randn(2, 6))  # build a plan before copying
    return m


def test_deepcopy_keeps_sharing_and_drops_plan():
    m = fused_model()
    c = copy.deepcopy(m)
    assert c[0] is c[2] and c[0] is not m[0]
    _roundtrip_checks(m, c)


def test_pickle_and_torch_save():
    m = fused_model()
    assert "_seqfuse_plan" not in m.__getstate__()
    _roundtrip_checks(m, pickle.loads(pickle.dumps(m)))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    _roundtrip_checks(m, torch.load(buf, weights_only=False))


def test_forward_semantics():
    x = torch.randn(2, 3)
    assert FusedSequential()(x) is x
    assert FusedSequential(nn.Identity())(x) is x
    s = FusedSequential(nn.Linear(3, 3))
    torch.testing.assert_close(s(input=x), s(x))
    with pytest.raises(TypeError):
        s(x, x)
    with pytest.raises(TypeError):
        FusedSequential(None)(x)


def test_inplace_activation_on_input_still_aliases():
    x = torch.randn(4, 3)
    with torch.no_grad():
        out = FusedSequential(nn.ReLU(inplace=True), nn.Linear(3, 3)).eval()
        out(x)
    assert (x >= 0).all()  # eager semantics: the caller's tensor was modified


def test_hooks_still_fire_and_disable_fusion():
    calls = []
    lin = nn.Linear(3, 3)
    s = FusedSequential(lin, nn.ReLU()).eval()
    with torch.no_grad():
        s(torch.randn(2, 3))
    h = lin.register_forward_hook(lambda m, i, o: calls.append("lin") or o * 0)
    with torch.no_grad():
        out = s(torch.randn(2, 3))
    assert calls == ["lin"] and torch.count_nonzero(out) == 0
    h.remove()
    with torch.no_grad():
        out = s(torch.ones(2, 3))
    assert calls == ["lin"]
    seq_hook = s.register_forward_hook(lambda m, i, o: calls.append(("seq", len(i))))
    with torch.no_grad():
        s(torch.ones(2, 3))
    assert calls[-1] == ("seq", 1)
    seq_hook.remove()


def test_global_hooks_fire():
    seen = []
    s = FusedSequential(nn.Linear(3, 3), nn.ReLU()).eval()
    with torch.no_grad():
        s(torch.randn(2, 3))
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            s(torch.randn(2, 3))
    finally:
        h.remove()
    assert seen == ["Linear", "ReLU", "FusedSequential"]


def test_modes_and_conversions_return_self():
    s = FusedSequential(nn.Linear(2, 2))
    assert s.train() is s and s.eval() is s and s.double() is s and s.float() is s
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        s.train("x")


def test_meta_device():
    with torch.device("meta"):
        s = FusedSequential(nn.Linear(4, 5), nn.ReLU())
        y = s(torch.randn(2, 4))
    assert y.device.type == "meta" and y.shape == (2, 5)


def test_inplace_activation_after_flatten_view_still_aliases():
    x = torch.randn(4, 3, 2)
    expected = x.clone().relu_()
    with torch.no_grad():
        FusedSequential(nn.Flatten(), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()(x)
    assert torch.equal(x, expected)  # modified through the flatten view, as eager does
