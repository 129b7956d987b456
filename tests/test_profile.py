"""seqfuse.profile and explain(timing=True): every stage of every fused
call timed, with its work and its share of the machine's limits, and the
time outside the fused calls. Timings are not asserted (only that they
exist and add up); the work counts are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import ops
from seqfuse._loader import _C


class Net(nn.Module):
    """A conv run, an eager op between fused calls, a Linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 5, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x):
        y = self.body(x)
        return self.head(torch.flip(y, (2,)).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return seqfuse.fuse(Net().eval())


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("engine", [None, ops.ENGINE_FUSED, ops.ENGINE_GEMM_EPILOGUE, ops.ENGINE_ATEN_LAYOUT,
                                    ops.ENGINE_WINOGRAD])
def test_every_conv_stage_is_timed_with_its_work(batch, engine):
    model = _model()
    x = torch.randn(batch, 3, 11, 9)
    ops.set_engine_override(engine)
    try:
        p = seqfuse.profile(model, x, repeats=3)
    finally:
        ops.set_engine_override(None)
    conv, mlp = p.chains
    assert conv.op == "conv" and mlp.op == "mlp" and conv.calls == mlp.calls == 1
    assert "body" in conv.where and "head" in mlp.where
    assert [s.label for s in conv.stages] == ["conv 3x3 3->8 11x9 +ReLU", "conv 3x3/2 8->5 5x4 +ReLU"]
    # Multiply-adds as eager counts them; bytes: float32 activations in and out, and the weights.
    assert [s.macs for s in conv.stages] == [batch * 8 * 11 * 9 * 27, batch * 5 * 5 * 4 * 72]
    assert conv.stages[0].bytes == 4 * (batch * (3 + 8) * 11 * 9 + 8 * 27)
    for s in conv.stages:
        assert s.ms is not None and s.ms > 0 and s.share > 0 and s.bound in ("FMA", "memory")
    # Inside each call the stages fit in the call's time; the medians of the parts need not add up exactly.
    assert sum(s.ms for s in conv.stages) + conv.layout_ms <= conv.ms * 1.25 + 0.01
    # The MLP kernel runs its stages together: the chain is timed, its stages are not.
    assert mlp.ms > 0 and all(s.ms is None for s in mlp.stages)
    assert [s.macs for s in mlp.stages if s.label.startswith("linear")] == [batch * 35, batch * 21]
    assert p.forward_ms > 0 and p.outside_ms == pytest.approx(max(p.forward_ms - p.fused_ms, 0.0))
    # Where the outside time sits: before each chain and after the last one (the flip and mean between them).
    for gap in (conv.before_ms, mlp.before_ms, p.tail_ms):
        assert 0 <= gap <= p.forward_ms
    assert p.peak_gflops > 0 and p.bandwidth_gbs > 0
    text = str(p)
    assert "outside them" in text and "conv 3x3/2 8->5" in text and "% of" in text and "by kind, ms:" in text
    kinds = p.by_kind()
    assert kinds["conv 3x3"] == pytest.approx(sum(s.ms for s in conv.stages))
    assert kinds["MLP runs"] == pytest.approx(mlp.ms) and kinds["outside fused calls"] == pytest.approx(p.outside_ms)
    # Every chain's time is in some kind (its stages' medians may exceed the call's median by noise).
    assert sum(kinds.values()) >= p.fused_ms + p.outside_ms - 1e-9


def test_profiling_stops_after_the_profile():
    model = _model()
    x = torch.randn(2, 3, 11, 9)
    seqfuse.profile(model, x, repeats=1)
    with torch.no_grad():
        model(x)
    assert _C.take_call_timings() == []


def test_other_threads_calls_stay_out_of_the_profile():
    import threading

    torch.manual_seed(0)
    other = seqfuse.FusedSequential(nn.Conv2d(4, 6, 3), nn.ReLU()).eval()
    other_x = torch.randn(1, 4, 9, 9)
    stop = threading.Event()
    calls = []

    def serve():
        with torch.no_grad():
            while not stop.is_set():
                other(other_x)
                calls.append(1)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        while not calls:
            pass
        p = seqfuse.profile(_model(), torch.randn(1, 3, 11, 9), repeats=5)
    finally:
        stop.set()
        worker.join()
    assert [c.op for c in p.chains] == ["conv", "mlp"]
    assert not any("4->6" in s.label for c in p.chains for s in c.stages)


def test_chain_called_twice_per_forward_sums_both_calls():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq(self.seq(x))

    # Without capture the forward runs as written: the FusedSequential is called twice.
    p = seqfuse.profile(seqfuse.fuse(Twice().eval(), capture=False), torch.randn(1, 4, 6, 6), repeats=2)
    (chain,) = p.chains
    assert chain.calls == 2 and chain.stages[0].macs == 2 * 4 * 36 * 36


def test_explain_with_timing_appends_the_profile():
    model = _model()
    x = torch.randn(1, 3, 11, 9)
    e = seqfuse.explain(model, x, timing=True)
    assert e.profile is not None and len(e.profile.chains) == 2
    assert "seqfuse.profile(Net)" in str(e)
    with pytest.raises(ValueError, match="example_input"):
        seqfuse.explain(model, timing=True)


def test_profile_is_cpu_only():
    with pytest.raises(ValueError, match="CPU"):
        seqfuse.profile(_model(), torch.empty(1, 3, 11, 9, device="meta"))


def test_bench_prints_the_profile(capsys):
    from seqfuse.bench.cli import main

    assert main(["--model", "zoo_tutorial_conv_net", "--quick", "--repeats", "2", "--target-ms", "0.3",
                 "--no-progress", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "seqfuse.profile(" in out and "GFLOP/s" in out


def test_a_bfloat16_input_is_measured_against_the_bfloat16_product_peak():
    model = seqfuse.fuse(Net().eval().bfloat16())
    p = seqfuse.profile(model, torch.randn(2, 3, 11, 9).bfloat16(), repeats=1)
    assert p.peak_name == "bf16 product peak" and "bf16 product peak" in str(p)
    f32 = seqfuse.profile(_model(), torch.randn(2, 3, 11, 9), repeats=1)
    assert f32.peak_name == "FMA peak" and p.peak_gflops > 0
