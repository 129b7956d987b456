"""seqfuse.fuse on the example zoo (seqfuse/bench/zoo.py): realistic models
written with plain nn.Sequential blocks, and the bench's whole-model cases,
--model, --input and --plot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential
from seqfuse.bench import cli, run
from seqfuse.bench.cases import CASES, model_case, randomize_batchnorm
from seqfuse.bench.zoo import ZOO

from conftest import forbid_eager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(ZOO)
# Tiny timing settings for the harness: the point is that it runs, not the numbers.
FAST = ["--quick", "--no-progress", "--repeats", "2", "--target-ms", "0.3", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy shared machine, torch's parallel regions
    stall waiting for a descheduled worker and conv nets get 10x slower. The
    numerics do not depend on it (test_numerics covers threading)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def leaves(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def build(name: str, mode: str):
    torch.manual_seed(0)
    model, shape = ZOO[name].factory()
    for m in model.modules():  # non-trivial running statistics, so eval BatchNorm differs from train
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_batchnorm(m)
    model.train(mode == "train")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return model, x


def linear_containers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FusedSequential) and any(type(c) is nn.Linear for c in m.children())]


def test_every_zoo_model_has_a_case_and_the_documented_shape():
    for name, entry in ZOO.items():
        case = CASES[f"zoo_{name}"]
        assert case.is_model and case.input_shape == entry.input_shape() and case.input_shape[0] == 2
        _, shape = entry.factory(batch=3)
        assert shape == (3,) + entry.sample_shape


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_zoo_model_matches_original(name, mode):
    model, x = build(name, mode)
    fused = seqfuse.fuse(model)

    # fuse() deep-copied and converted every nn.Sequential; the original is untouched
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Sequential)]
    assert kinds and all(k is nn.Sequential for k in kinds)
    fused_kinds = [type(m) for m in fused.modules() if isinstance(m, nn.Sequential)]
    assert len(fused_kinds) == len(kinds) and all(k is FusedSequential for k in fused_kinds)
    assert fused.training == model.training
    assert list(fused.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k

    # Every Sequential holding Linear layers fuses them when autograd is off
    # (Dropout/BatchNorm in training mode only split the runs).
    containers = linear_containers(fused)
    assert containers, "every zoo model has a Sequential with Linear layers"
    for cname, m in containers:
        expl = m.explain()
        assert expl.fused_segments, f"{name}.{cname}:\n{expl}"
        in_fused = {id(mod) for s in expl.fused_segments for mod in s.modules}
        assert all(id(c) in in_fused for c in m.children() if type(c) is nn.Linear), f"{name}.{cname}:\n{expl}"

    # no_grad: the fused path runs (an eager nn.Linear.forward would raise) and matches
    with torch.no_grad():
        torch.manual_seed(2)
        ref = leaves(model(x))
        torch.manual_seed(2)
        with forbid_eager(nn.Linear):
            out = leaves(fused(x))
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)

    # grad mode: fused segments run eagerly, so outputs and every gradient match
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    grads = []
    for net, xi in ((model, xs[0]), (fused, xs[1])):
        torch.manual_seed(3)  # same Dropout masks
        outs = leaves(net(xi))
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in outs)
        loss.backward()
        grads.append((outs, {n: p.grad for n, p in net.named_parameters()}))
    (ref, ref_g), (out, out_g) = grads
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    assert list(out_g) == list(ref_g)
    for n, g in ref_g.items():
        assert g is not None and out_g[n] is not None, n
        torch.testing.assert_close(out_g[n], g, msg=n)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    # training-mode BatchNorm updated the same running statistics in both
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, msg=k)


def test_bench_run_model_case():
    [r] = run(["zoo_nerf_mlp"], quick=True, repeats=2, target_ms=0.3, threads=1)
    assert r["numerics_ok"] and r["errors"] == {}
    assert r["fused_plan"] == "2 fused / 0 eager segments"
    assert r["flops_counted"] == "flop_counter" and r["flops"] > 0
    assert r["ratio"]["fused"] > 0


def test_cli_model_prints_plans_and_table(capsys):
    assert cli.main(["--model", "zoo_rl_policy", *FAST]) == 0
    out = capsys.readouterr().out
    assert "zoo_rl_policy: ActorCritic, input 2x24; seqfuse.fuse converts 2 nn.Sequential (2 with fused segments)" in out
    assert "policy: FusedSequential plan: 1 fused segment, 0 eager segments" in out
    assert "value: FusedSequential plan: 1 fused segment, 0 eager segments" in out
    rows = [line for line in out.splitlines() if line.startswith("zoo_rl_policy ")]
    assert len(rows) == 1 and "!" not in rows[0]
    assert out.index("FusedSequential plan") < out.index("eager µs")  # plans before the table


def test_cli_model_spec_with_input_and_cases(capsys):
    argv = ["--model", "seqfuse.bench.zoo:tutorial_conv_net", "--input", "1,3,32,32", "--case", "policy_b1", *FAST]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "input 1x3x32x32" in out
    assert "encoder: eager only, 4 children (FusedSequential, MaxPool2d): nothing fusible" in out
    assert "encoder.block1: FusedSequential plan: 1 fused segment" in out and "seqfuse::conv_forward" in out
    assert "decoder: FusedSequential plan: 1 fused segment" in out
    table = out[out.index("eager µs"):]
    assert "policy_b1 " in table and "seqfuse.bench.zoo:tutorial_conv_net " in table


def test_cli_bare_module_factory(capsys):
    assert cli.main(["--model", "torch.nn:Identity", *FAST]) == 2
    assert "--input" in capsys.readouterr().err
    assert cli.main(["--model", "torch.nn:Identity", "--input", "3,5", *FAST]) == 0
    out = capsys.readouterr().out
    assert "no nn.Sequential in the model" in out and "torch.nn:Identity " in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "no_such_pkg_xyz.mod:make"], "cannot import"),
    (["--model", "seqfuse.bench.zoo:no_such_factory"], "no attribute"),
    (["--model", "rl_policy", "--input", "2,x"], "bad input shape"),
    (["--input", "1,24"], "give --model too"),
])
def test_cli_model_errors(capsys, argv, message):
    assert cli.main(argv + FAST) == 2
    assert message in capsys.readouterr().err


def test_model_case_shapes():
    assert model_case("nerf_mlp").input_shape == (2, 63)
    assert model_case("zoo_nerf_mlp", "5x63").input_shape == (5, 63)
    assert model_case("seqfuse.bench.zoo:rl_policy").input_shape == (2, 24)


def test_cli_plot(tmp_path, capsys):
    path = tmp_path / "ratios.png"
    argv = ["--model", "rl_policy", "--plot", str(path), *FAST]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(argv) == 2
        assert "pip install matplotlib" in capsys.readouterr().err
        assert not path.exists()
    else:
        assert cli.main(argv) == 0
        assert path.stat().st_size > 0


def test_python_m_seqfuse_bench_model():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "seqfuse.bench", "--model", "zoo_rl_policy", *FAST],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "policy: FusedSequential plan" in proc.stdout and "zoo_rl_policy " in proc.stdout
