"""The conv operators: opcheck on seqfuse::conv_pack / conv_forward (every
stage kind, dtype and engine), fake-kernel shapes and memory formats against
the real kernel, torch.compile / export of a conv FusedSequential, and a
profiler trace proving a conv run is one op with no eager conv, batch_norm,
relu or pooling ops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seqfuse import FusedSequential, ops
from seqfuse.planner import plan_segments

from conftest import calls_until_decided, randomize_batchnorm


def _bn2d(c, affine=True, seed=0):
    bn = nn.BatchNorm2d(c, affine=affine).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(seed))
    return bn


def _bn1d(c, seed=0):
    bn = nn.BatchNorm1d(c).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(seed))
    return bn


CHAINS = [
    # conv + folded BN + ReLU, strided grouped conv, standalone BN, pools
    ([nn.Conv2d(3, 8, 3, padding=1), _bn2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, groups=2, bias=False),
      _bn2d(6, affine=False), nn.GELU(), nn.MaxPool2d(2, ceil_mode=True), nn.Tanh()], (2, 3, 11, 9)),
    # depthwise with asymmetric 'same' padding, avg pool options, global pool, flatten head
    ([nn.Conv2d(4, 4, 4, padding="same", groups=4), nn.SiLU(), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
      _bn2d(4, seed=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), _bn1d(5), nn.LeakyReLU(0.1),
      nn.Linear(5, 2)], (3, 4, 7, 8)),
    # empty batch, channels_last input, flatten of a spatial map
    ([nn.Conv2d(2, 3, 1), nn.Hardswish(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)], (0, 2, 5, 5)),
]


def sample_segments():
    """(segment, input) pairs for every chain in float32, float64 and bfloat16."""
    for mods, shape in CHAINS:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            ms = [copy.deepcopy(m).to(dtype) for m in mods]
            (seg,) = plan_segments([str(i) for i in range(len(ms))], ms)
            assert seg.fused and seg.op == "conv"
            x = torch.randn(*shape, dtype=dtype)
            if shape[0] == 0:
                x = x.contiguous(memory_format=torch.channels_last)
            yield seg, x


def _packed(seg):
    tensors = [t.detach() for t in seg.pack_tensors()]
    return tensors, ops.conv_pack(tensors, seg.spec, seg.fparams), [w.detach() for w in seg.engine_weights()]


@pytest.mark.parametrize("case", list(range(3 * len(CHAINS))))
def test_conv_opcheck(case):
    seg, x = list(sample_segments())[case]
    tensors, packed, weights = _packed(seg)
    torch.library.opcheck(torch.ops.seqfuse.conv_pack.default, (tensors, seg.spec, seg.fparams))
    for engine in (ops.ENGINE_FUSED, ops.ENGINE_GEMM_EPILOGUE):
        torch.library.opcheck(
            torch.ops.seqfuse.conv_forward.default, (x, packed, weights, seg.spec, seg.fparams, engine)
        )


def test_conv_fake_kernel_matches_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for seg, x in sample_segments():
        tensors, packed, weights = _packed(seg)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            real = ops.conv_forward(inp, packed, weights, seg.spec, seg.fparams)
            with FakeTensorMode() as mode:
                fake = ops.conv_forward(
                    mode.from_tensor(inp), mode.from_tensor(packed), [mode.from_tensor(w) for w in weights],
                    seg.spec, seg.fparams,
                )
                fake_packed = ops.conv_pack([mode.from_tensor(t) for t in tensors], seg.spec, seg.fparams)
            assert fake.shape == real.shape and fake.dtype == real.dtype
            assert fake.stride() == real.stride() or real.numel() == 0
            assert fake_packed.shape == packed.shape


def test_malformed_conv_spec_rejected():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="malformed conv spec"):
        torch.ops.seqfuse.conv_forward.default(x, torch.empty(0, dtype=torch.uint8), [], [1, 0, 1, 3], [])


def build_model():
    torch.manual_seed(0)
    m = FusedSequential(
        nn.Conv2d(3, 8, 3, padding=1), _bn2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=8),
        nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 2 * 2, 6), nn.Softsign(),
    )
    return m.eval()


def test_conv_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = build_model()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = nn.Sequential(*m)(x)
        torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="eager")(x), ref)
        explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("seqfuse.conv_forward" in t for t in targets), targets


def test_conv_torch_compile_inductor_channels_last():
    torch._dynamo.reset()
    m = build_model()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), nn.Sequential(*m)(x))


def test_conv_torch_export():
    m = build_model()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(m, (x,))
    assert any("conv_forward" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), nn.Sequential(*m)(x))


def test_conv_torch_export_with_dynamic_batch_and_spatial_size():
    """The Meta kernel computes the output size and memory format on symbolic
    sizes (the C++ shape rules, templated on the size type)."""
    torch.manual_seed(3)
    m = FusedSequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), _bn2d(8), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.Conv2d(8, 4, 1)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    b, h, w = torch.export.Dim("b", min=1), torch.export.Dim("h", min=16, max=200), torch.export.Dim("w", min=16, max=200)
    ep = torch.export.export(m, (torch.randn(2, 3, 33, 31),), dynamic_shapes=({0: b, 2: h, 3: w},))
    assert any("conv_forward" in str(n.target) for n in ep.graph.nodes)
    for shape in [(1, 3, 40, 19), (3, 3, 33, 31), (2, 3, 64, 64)]:
        x = torch.randn(*shape)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = x.contiguous(memory_format=fmt)
            with torch.no_grad():
                y, ref = ep.module()(x), nn.Sequential(*m)(x)
            torch.testing.assert_close(y, ref)


def test_profiler_shows_one_conv_op_and_no_eager_ops():
    m = FusedSequential(
        nn.Conv2d(3, 16, 3, padding=1), _bn2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, groups=16),
        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        m(x)  # plan built outside the trace
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m(x)
    names = [e.name for e in prof.events()]
    assert names.count("seqfuse::conv_forward") == 1, names
    eager = {"aten::conv2d", "aten::convolution", "aten::batch_norm", "aten::relu", "aten::max_pool2d",
             "aten::adaptive_avg_pool2d", "aten::linear", "aten::hardtanh", "aten::flatten"}
    assert not eager.intersection(names), names


def test_conv_engine_choice_is_measured_per_spatial_size():
    torch.manual_seed(1)
    m = FusedSequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    with torch.no_grad():
        for hw in (24, 40):
            x = torch.randn(2, 16, hw, hw)
            torch.testing.assert_close(m(x), nn.Sequential(*m)(x))
            calls_until_decided(m, x)
    explanation = m.explain()
    measured = explanation.engines(explanation.fused_segments[0])
    assert {extra for *_, extra in measured} == {(24, 24, 0), (40, 40, 0)}, measured  # (H, W, channels_last)
    assert "images of 24x24" in str(explanation)
