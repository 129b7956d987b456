"""seqfuse.fuse on models written the usual ways."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential


class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, w))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(fc=nn.Linear(10, 32), act=nn.GELU()))
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.head = nn.Sequential(nn.Sequential(nn.Linear(32, 16), nn.Tanh()), nn.Linear(16, 3))
        self.hooked = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
        self.hooked[0].register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        return self.hooked(self.head(self.blocks(self.stem(x))))


def sequentials(model):
    return [(n, type(m)) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]


def test_fuse_converts_every_sequential_and_keeps_state():
    torch.manual_seed(0)
    net = Net().eval()
    before = copy.deepcopy(net)
    fused = seqfuse.fuse(net)
    assert all(t is FusedSequential for _, t in sequentials(fused))
    assert all(t is nn.Sequential for _, t in sequentials(net))  # original untouched
    assert list(fused.state_dict()) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before.state_dict()[k])
    x = torch.randn(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x))
    # the hooked Linear stays eager, its neighbours still fuse where they can
    assert "has hooks" in str(fused.hooked.explain())


def test_fuse_inplace_and_top_level_sequential():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    out = seqfuse.fuse(seq, inplace=True)
    assert out is seq and type(seq) is FusedSequential
    model = Net()
    assert seqfuse.fuse(model, inplace=True) is model
    assert type(model.stem) is FusedSequential


def test_fuse_train_mode_model_trains_like_original():
    torch.manual_seed(0)
    net = Net().train()
    fused = seqfuse.fuse(net)
    x = torch.randn(8, 10)
    for model in (net, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for (k, a), b in zip(net.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_subclass_of_sequential_is_left_alone():
    class MySeq(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Module()
    m.a = MySeq(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    fused = seqfuse.fuse(m)
    assert type(fused.a) is MySeq and type(fused.a[1]) is FusedSequential


def test_parametrized_and_weight_normed_layers_stay_eager():
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(0, 1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).eval()
    parametrize.register_parametrization(net[2], "weight", Symmetric())
    net[4] = nn.utils.weight_norm(net[4])  # a forward pre-hook on a stock nn.Linear
    x = torch.randn(5, 6)
    keys = list(net.state_dict())
    with torch.no_grad():
        expected = net(x)
    fused = seqfuse.fuse(net, inplace=True)  # weight_norm modules cannot be deep-copied (a torch limitation)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected)
    text = str(fused.explain())
    assert "subclass or parametrization" in text and "has hooks" in text
    assert fused.explain().fused_segments[0].stop == 2  # Linear + ReLU before them still fuse
    assert list(fused.state_dict()) == keys


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))) + x)


def _count_packs(monkeypatch):
    from seqfuse import ops

    packs = []
    for name in ("conv_pack", "mlp_pack"):
        orig = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _orig=orig, **k: packs.append(1) or _orig(*a, **k))
    return packs


def test_fuse_packs_an_eval_model_so_the_first_call_only_runs(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    packs = _count_packs(monkeypatch)
    fused = seqfuse.fuse(model)
    packed_by_fuse = len(packs)
    assert packed_by_fuse >= 2
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
    assert len(packs) == packed_by_fuse, "the first call packed again"


def test_fuse_of_a_training_model_packs_nothing(monkeypatch):
    model = nn.Sequential(_Block(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 2)).train()
    packs = _count_packs(monkeypatch)
    seqfuse.fuse(model)
    assert packs == []
