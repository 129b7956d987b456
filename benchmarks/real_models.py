#!/usr/bin/env python
"""Real torchvision classifiers, whole: seqfuse.fuse(model) against eager
torch, ONNX Runtime and OpenVINO on CPU, at batch 1 and 8 (3x224x224 float32,
2 threads).

Every cell is a ``torchvision:NAME`` model case (random weights: nothing is
downloaded, and the time of a dense network does not depend on its weights)
run by the same harness as ``python -m seqfuse.bench``: interleaved rounds of
every peer, the median per-call time, outputs checked against eager first.
ONNX Runtime and OpenVINO run an ONNX export of the eager model at the cell's
input shape, with the same thread count as torch.

    python benchmarks/real_models.py                    # the ten models, batch 1 and 8 (many minutes)
    python benchmarks/real_models.py --quick --models resnet18,mobilenet_v2 --batches 1
    python benchmarks/real_models.py --compile --json real.json

Prints one markdown table: per batch, ms per call of each peer, fused's speed
against the faster of ONNX Runtime and OpenVINO (best-peer ms / fused ms: > 1
means seqfuse is faster) and against eager (eager ms / fused ms); then the
geometric means of both ratios, the model where fused does worst against the
best peer, and the float32 FMA peak measured in the run. ``!`` marks a cell
where a peer's output differs from eager's beyond the harness tolerance.
Needs ``pip install onnxruntime openvino`` (or ``pip install 'seqfuse[bench]'``);
without them those columns show ``-`` and the errors are listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from seqfuse.bench import Case, environment, report, run
from seqfuse.bench.cases import torchvision_case

#: The models of the study: residual, depthwise/inverted-residual,
#: squeeze-excitation, dense, channel-shuffle, ConvNeXt and plain VGG designs.
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "convnext_tiny", "densenet121", "shufflenet_v2_x1_0", "vgg11_bn")
BATCHES = (1, 8)
#: The runtimes fused is measured against; "best peer" is the faster of them per cell.
RUNTIMES = ("ort", "openvino")
_LABEL = {"eager": "eager", "fused": "fused", "ort": "ORT", "openvino": "OpenVINO", "compile": "compile"}


def _list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cell_name(model: str, batch: int) -> str:
    """The case name of one cell (unique per model and batch, so the JSON
    has one result per cell)."""
    return f"{model}_b{batch}"


def real_model_cases(models: Sequence[str], batches: Sequence[int], image_size: int = 224) -> List[Case]:
    """One case per (model, batch): ``torchvision:<model>`` with input
    ``(batch, 3, image_size, image_size)``; unknown names fail here, before
    anything is timed."""
    cases = []
    for m in models:
        for b in batches:
            case = torchvision_case(m, (b, 3, image_size, image_size))
            cases.append(dataclasses.replace(case, name=cell_name(m, b)))
    return cases


def _ms(r: Optional[dict], peer: str) -> Optional[float]:
    t = None if r is None else r["time_us"].get(peer)
    return None if t is None else t / 1e3


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None or not math.isfinite(ms):
        return "-"
    return f"{ms:.2f}" if ms < 10 else (f"{ms:.1f}" if ms < 100 else f"{ms:.0f}")


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def best_runtime(r: dict) -> Optional[str]:
    """The faster of the runtimes (ORT, OpenVINO) that ran in this cell."""
    timed = [p for p in RUNTIMES if p in r["time_us"]]
    return min(timed, key=lambda p: r["time_us"][p]) if timed else None


def vs_best(r: dict) -> Optional[float]:
    """Fused's speed against the best runtime: best-runtime time / fused time (> 1: fused is faster)."""
    best = best_runtime(r)
    if best is None or "fused" not in r["time_us"]:
        return None
    return r["time_us"][best] / r["time_us"]["fused"]


def vs_eager(r: dict) -> Optional[float]:
    """Fused's speed against eager: the harness's fused ratio."""
    return r["ratio"].get("fused")


def geomean(xs: Sequence[float]) -> Optional[float]:
    """Geometric mean of positive ratios (the mean that treats 2x faster and 2x slower symmetrically).

    >>> geomean([2.0, 0.5]), geomean([])
    (1.0, None)
    """
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def markdown_table(results: Sequence[dict], models: Sequence[str], batches: Sequence[int],
                   peers: Sequence[str]) -> str:
    """The table: a row per model; per batch, ms per call of every peer,
    fused vs the best runtime and fused vs eager. ``!`` after a cell's
    ratios marks a numerics mismatch of some peer in it."""
    by_name: Dict[str, dict] = {r["case"]: r for r in results}
    timed = [p for p in ("eager", "fused", "ort", "openvino", "compile") if p in peers]
    head = ["model"]
    for b in batches:
        head += [f"b{b} {_LABEL[p]} ms" for p in timed] + [f"b{b} fused vs best", f"b{b} fused vs eager"]
    rows = []
    for m in models:
        row = [m]
        for b in batches:
            r = by_name.get(cell_name(m, b))
            row += [_fmt_ms(_ms(r, p)) for p in timed]
            if r is None:
                row += ["-", "-"]
                continue
            mark = "" if r.get("numerics_ok", True) else " !"
            ratio = vs_best(r)
            row.append(_fmt_ratio(ratio) + (f" ({_LABEL[best_runtime(r)]})" if ratio is not None else "") + mark)
            row.append(_fmt_ratio(vs_eager(r)) + mark)
        rows.append(row)
    right = [i > 0 for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if rt else "---" for rt in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary(results: Sequence[dict], batches: Sequence[int]) -> Dict[str, object]:
    """Geometric means of fused vs best runtime and fused vs eager (over all
    cells and per batch), the worst cell against the best runtime, and the
    FMA peak of the run."""
    out: Dict[str, object] = {
        "geomean_vs_best": geomean([vs_best(r) for r in results]),
        "geomean_vs_eager": geomean([vs_eager(r) for r in results]),
        "per_batch": {},
    }
    for b in batches:
        cells = [r for r in results if r["input_shape"][0] == b]
        out["per_batch"][b] = {"geomean_vs_best": geomean([vs_best(r) for r in cells]),
                               "geomean_vs_eager": geomean([vs_eager(r) for r in cells])}
    scored = [(vs_best(r), r) for r in results if vs_best(r) is not None]
    if scored:
        worst, r = min(scored, key=lambda t: t[0])
        out["slowest"] = {"case": r["case"], "vs_best": worst, "best": best_runtime(r)}
    out["fma_peak_gflops"] = next((r.get("fma_peak_gflops") for r in results if r.get("fma_peak_gflops")), None)
    return out


def summary_lines(s: Dict[str, object], batches: Sequence[int], threads: int, dtype: str = "float32") -> List[str]:
    """The summary as markdown bullet lines."""
    per = s["per_batch"]
    by_batch = lambda key: ", ".join(f"b{b} {_fmt_ratio(per[b][key])}" for b in batches)  # noqa: E731
    lines = [
        f"- geometric mean, fused vs best of ORT/OpenVINO: {_fmt_ratio(s['geomean_vs_best'])} "
        f"({by_batch('geomean_vs_best')}); > 1 means seqfuse is faster",
        f"- geometric mean, fused vs eager: {_fmt_ratio(s['geomean_vs_eager'])} ({by_batch('geomean_vs_eager')})",
    ]
    if "slowest" in s:
        w = s["slowest"]
        lines.append(f"- slowest against the best peer: {w['case']}, {_fmt_ratio(w['vs_best'])} "
                     f"(vs {_LABEL[w['best']]})")
    peak = s.get("fma_peak_gflops")
    what = "bfloat16 product peak" if dtype == "bfloat16" else "float32 FMA peak"
    lines.append(f"- {what} measured in this run: {'-' if not peak else f'{peak:.0f}'} GFLOP/s with {threads} threads")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of torchvision classifiers "
                    "(default: the ten of the study)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and the runtimes (default 2)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (tens of seconds per cell)")
    ap.add_argument("--quick", action="store_true", help="short batches, few rounds (a smoke run)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds per cell")
    ap.add_argument("--target-ms", type=float, help="duration of one timed batch")
    ap.add_argument("--json", metavar="PATH", help="write all results, with the summary in meta")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: model.bfloat16() for eager and fused, OpenVINO at its default precision "
                         "(bf16 where the CPU has bfloat16 products), no ONNX Runtime (default %(default)s)")
    # For the tests: smaller images than 224x224 keep an end-to-end run to seconds.
    ap.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    models = _list(args.models)
    try:
        batches = [int(b) for b in _list(args.batches)]
    except ValueError:
        ap.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not models or not batches or min(batches) < 1 or args.threads < 1:
        ap.error("need at least one model, batches >= 1 and --threads >= 1")
    try:
        cases = real_model_cases(models, batches, args.image_size)
    except ValueError as e:
        ap.error(str(e))
    runtimes = RUNTIMES if args.dtype == "float32" else ("openvino",)
    peers = ["eager", "fused", *runtimes] + (["compile"] if args.compile else [])

    results = run(cases, peers=peers, dtype=args.dtype, threads=args.threads, quick=args.quick,
                  repeats=args.repeats, target_ms=args.target_ms, progress=True)

    s = summary(results, batches)
    env = environment(getattr(torch, args.dtype), args.threads, s["fma_peak_gflops"])
    size = f"3x{args.image_size}x{args.image_size}"
    print(report.header(env, f"{size} | {'quick' if args.quick else 'full'}"))
    print()
    print(markdown_table(results, models, batches, peers))
    print()
    print("\n".join(summary_lines(s, batches, args.threads, args.dtype)))
    notes = [f"{r['case']}: {p}: {v['message']}" for r in results for p, v in r.get("numerics", {}).items()
             if not v["ok"]]
    notes += [f"{r['case']}: {k}: {v}" for r in results for k, v in r.get("errors", {}).items()]
    if notes:
        print("\nnotes:\n" + "\n".join(f"- {n}" for n in notes))

    if args.json:
        settings = {"mode": "real_models", "quick": args.quick, "peers": peers, "models": models,
                    "batches": batches, "image_size": args.image_size, "summary": s}
        with open(args.json, "w") as f:
            f.write(report.to_json(results, env, settings))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
