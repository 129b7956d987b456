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
