"""The benchmark harness as a product: the CLI's JSON/CSV output and
--compare, on tiny settings (timings are not asserted, only behaviour)."""

from __future__ import annotations

import json

from seqfuse.bench.cli import main

TINY = ["--quick", "--repeats", "2", "--target-ms", "0.3", "--no-progress"]


def test_json_csv_and_compare(tmp_path, capsys):
    out_json, out_csv = tmp_path / "run.json", tmp_path / "run.csv"
    assert main(["--case", "policy_b1,bn_b128", *TINY, "--json", str(out_json), "--csv", str(out_csv)]) == 0
    table = capsys.readouterr().out
    assert "policy_b1" in table and "bn_b128" in table and "ratio" in table
    data = json.loads(out_json.read_text())
    results = data["results"]
    assert [r["case"] for r in results] == ["policy_b1", "bn_b128"]
    assert all(r["numerics_ok"] and r["ratio"]["fused"] > 0 for r in results)
    assert out_csv.read_text().splitlines()[0].startswith("case")

    # a generous tolerance: re-running the same cases is not a regression
    assert main(["--compare", str(out_json), *TINY, "--tolerance", "0.9"]) == 0
    # an impossible baseline is
    for r in results:
        r["ratio"]["fused"] *= 1000
        r["ratio_paired"] = {k: v * 1000 for k, v in (r.get("ratio_paired") or {}).items()}
    out_json.write_text(json.dumps(data))
    assert main(["--compare", str(out_json), *TINY]) == 1


def test_bfloat16_and_batch_override(capsys):
    assert main(["--case", "small_b1", "--dtype", "bfloat16", "--batch", "3", *TINY]) == 0
    assert "bfloat16" in capsys.readouterr().out


def test_conv_case_flops_match_torch_flop_counter():
    """layer_flops (what the harness counts for a module-list case) follows the
    shapes through convolutions, pooling and Flatten: it agrees with
    torch.utils.flop_counter on every conv case, and on the MLP ones."""
    import torch
    from torch import nn

    from seqfuse.bench.cases import CASES, layer_flops
    from seqfuse.bench.harness import model_flops

    names = ["cnn_b1_32", "cnn_b16_64", "vgg_b8", "depthwise", "small_b256", "bn_b128"]
    for name in names:
        case = CASES[name].with_batch(2)  # the count is linear in the batch; keep the forwards cheap
        modules = [m.eval() for m in case.build()]
        expected = model_flops(nn.Sequential(*modules), torch.zeros(case.input_shape))
        assert layer_flops(modules, case.input_shape) == expected > 0, name


def test_conv_case_reports_gflops():
    from seqfuse.bench import run

    [r] = run(["cnn_b1_32"], quick=True, repeats=2, target_ms=0.3)
    assert r["numerics_ok"] and r["flops"] == 2 * 32 * 32 * 9 * (3 * 32 + 32 * 64 + 64 * 64)
    assert all(g > 0 for g in r["gflops"].values())


def test_training_cases_time_training_steps(tmp_path, capsys):
    """A train_* case times eager and fused training steps (other peers are
    reported as not timed), checks their outputs and counts 3x the forward's
    FLOPs."""
    from seqfuse.bench import get_case
    from seqfuse.bench.cases import layer_flops

    out_json = tmp_path / "train.json"
    assert main(["--case", "train_mlp_small_b32", "--peers", "eager,fused,jit", *TINY, "--json", str(out_json)]) == 0
    (r,) = json.loads(out_json.read_text())["results"]
    assert r["train"] and r["numerics_ok"] and r["ratio"]["fused"] > 0
    assert "jit" not in r["time_us"] and "not timed" in r["errors"]["jit"]
    case = get_case("train_mlp_small_b32")
    assert r["flops"] == 3 * layer_flops(case.build(), case.input_shape)
    assert "fused_plan" in r and r["fused_plan"].startswith("1 fused")


# --- torchvision models, the ONNX Runtime / OpenVINO peers, the FMA peak ------


def test_torchvision_model_specs(capsys):
    """torchvision:NAME names a classifier (random weights, 1x3x224x224 unless
    --input says otherwise); a wrong name is an error that lists the valid
    ones, before anything runs."""
    import pytest

    pytest.importorskip("torchvision")
    from seqfuse.bench.cases import model_case

    c = model_case("torchvision:resnet18")
    assert (c.name, c.input_shape, c.is_model) == ("torchvision:resnet18", (1, 3, 224, 224), True)
    assert model_case("torchvision:mobilenet_v2", "2,3,32,32").with_batch(4).input_shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet'.*resnet18"):
        model_case("torchvision:resnet")
    with pytest.raises(ValueError, match="not an image classifier"):
        model_case("torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="expected torchvision:NAME"):
        model_case("torchvision:")
    assert main(["--model", "torchvision:not_a_model", *TINY]) == 2
    assert "unknown torchvision classification model 'not_a_model'" in capsys.readouterr().err


def _tiny_resnet():
    import torch

    from seqfuse.bench.cases import torchvision_case

    torch.manual_seed(0)
    return torchvision_case("resnet18", (1, 3, 32, 32)).build().eval(), torch.randn(1, 3, 32, 32)


def test_onnx_peers_match_eager():
    """ort and openvino run one shared ONNX export of the eager model with
    torch's thread count and return what eager returns (a torch tensor)."""
    import pytest
    import torch

    pytest.importorskip("torchvision")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    from seqfuse.bench.peers import BuildContext, build_peer

    available = []
    for peer, package in (("ort", "onnxruntime"), ("openvino", "openvino")):
        try:
            __import__(package)
            available.append(peer)
        except ImportError:
            pass
    if not available:
        pytest.skip("neither onnxruntime nor openvino is installed")
    model, x = _tiny_resnet()
    with BuildContext(x) as ctx:
        fns = {p: build_peer(p, model, ctx) for p in available}
        assert ctx.onnx_path(model, "again") == ctx.onnx_path(model, "again")  # exported once per case
    with torch.inference_mode():
        ref = model(x)
        for p, fn in fns.items():
            assert fn.threads == torch.get_num_threads()
            y = fn(x)
            assert isinstance(y, torch.Tensor) and y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3, msg=lambda m, p=p: f"{p}: {m}")


def test_onnx_peer_errors(monkeypatch):
    """A missing runtime fails the peer (reported, not fatal) with the pip
    package named; ONNX Runtime takes float32 only, OpenVINO also bfloat16
    cases (at its default precision); a training case skips them."""
    import sys

    import pytest
    import torch

    from seqfuse.bench import run
    from seqfuse.bench.peers import BuildContext, build_peer
    from seqfuse.bench.report import table

    with pytest.raises(ValueError, match="float32 only"):  # ONNX Runtime has no bfloat16 peer
        BuildContext(torch.zeros(1, 2, dtype=torch.bfloat16)).onnx_path(torch.nn.Linear(2, 2), "ort")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        build_peer("ort", torch.nn.Linear(2, 2), BuildContext(torch.zeros(1, 2)))
    [r] = run(["policy_b1"], peers="eager,fused,ort", quick=True, repeats=2, target_ms=0.3, peak=False)
    assert "ort" not in r["time_us"] and "pip install onnxruntime" in r["errors"]["ort"]
    assert r["ratio"]["fused"] > 0 and r["fma_peak_gflops"] is None

    pytest.importorskip("openvino")
    # bfloat16: OpenVINO at its default precision on the float32 export, the precision it chose named.
    [r] = run(["policy_b1"], peers="eager,openvino", dtype="bfloat16", quick=True, repeats=2, target_ms=0.3,
              peak=False)
    assert "openvino" in r["time_us"] and r["numerics"]["openvino"]["ok"], r
    assert r["precision"]["openvino"] in ("bf16", "f32") and "openvino computed in" in table([r])
    [r] = run(["train_mlp_small_b32"], peers="eager,fused,openvino", quick=True, repeats=2, target_ms=0.3,
              peak=False)
    assert "openvino" not in r["time_us"] and "not timed" in r["errors"]["openvino"]


def test_fma_peak_and_share_of_it(capsys):
    """The FMA peak is measured in the run (positive, finite), printed in the
    header, and every peer's GFLOP/s is given as a share of it."""
    import math

    import seqfuse
    from seqfuse.bench.harness import fma_peak

    for threads in (1, 2):
        g = seqfuse._C.fma_peak_gflops(threads, 0.02)
        assert math.isfinite(g) and g > 0
    assert fma_peak(seconds=0.02) > 0
    assert main(["--case", "cnn_b1_32", *TINY]) == 0
    out = capsys.readouterr().out
    assert "FMA peak" in out.splitlines()[0] and "% peak (e/f)" in out


def test_real_models_script_end_to_end(tmp_path, capsys):
    """benchmarks/real_models.py on one tiny model: the markdown table, the
    summary lines, the JSON with the summary."""
    import importlib.util
    import os

    import pytest

    pytest.importorskip("torchvision")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "real_models.py")
    spec = importlib.util.spec_from_file_location("real_models", path)
    real_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_models)

    out_json = tmp_path / "real.json"
    assert real_models.main(["--models", "resnet18", "--batches", "1", "--quick", "--image-size", "32",
                             "--repeats", "2", "--target-ms", "0.3", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| model | b1 eager ms | b1 fused ms | b1 ORT ms | b1 OpenVINO ms | b1 fused vs best |" in out
    assert "| resnet18 |" in out and "geometric mean, fused vs eager" in out and "FMA peak" in out
    data = json.loads(out_json.read_text())
    [r] = data["results"]
    assert r["case"] == "resnet18_b1" and r["input_shape"] == [1, 3, 32, 32] and r["ratio"]["fused"] > 0
    assert data["meta"]["summary"]["geomean_vs_eager"] > 0
    with pytest.raises(SystemExit):
        real_models.main(["--models", "no_such_net"])
