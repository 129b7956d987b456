"""Command line of ``python -m seqfuse.bench``; see ``--help`` and benchmarks/README.md."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import report
from .cases import CASES, Case, model_case
from .harness import environment, materialize, parse_dtype, run
from .peers import PEERS, parse_peers
from .timing import FULL, QUICK

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m seqfuse.bench",
        description="Times seqfuse.FusedSequential (and optionally TorchScript, torch.compile, ONNX Runtime, "
        "OpenVINO) against an eager nn.Sequential on CPU inference cases, interleaved A/B, and prints the ratios.",
        epilog="Example: python -m seqfuse.bench --quick --json run.json; later: "
        "python -m seqfuse.bench --quick --compare run.json. Whole models: "
        "python -m seqfuse.bench --model resnet18_style, --model torchvision:resnet18 "
        "--peers eager,fused,ort,openvino, or --model my.models:make_net --input 1,3,224,224",
    )
    ap.add_argument("--case", action="append", metavar="NAME",
                    help=f"case(s) to run, repeatable or comma-separated (default: all): {', '.join(CASES)}")
    ap.add_argument("--model", action="append", metavar="SPEC",
                    help="time a whole model against seqfuse.fuse(model) (repeatable or comma-separated): a zoo "
                    "name (e.g. resnet18_style or zoo_resnet18_style; see --list), torchvision:NAME (a "
                    "torchvision.models classifier with random weights, e.g. torchvision:resnet18) or "
                    "path.to.module:factory, where factory() returns an nn.Module or (nn.Module, input_shape). "
                    "Prints the fused plan first. Without --case, only the models run")
    ap.add_argument("--input", metavar="SHAPE",
                    help="input shape for --model, comma-separated with the batch first, e.g. 1,3,224,224 "
                    "(needed when the factory returns a bare module; overrides the factory's shape; "
                    "torchvision:NAME defaults to 1,3,224,224)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--batch", type=int, metavar="N", help="override the batch dimension of every case")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float64"],
                    help="model and input dtype (default float32, or the --compare file's)")
    ap.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    ap.add_argument("--peers", default="eager,fused", metavar="LIST",
                    help=f"comma list from {','.join(PEERS)}; eager is always measured (default eager,fused; "
                    "compile takes seconds per case; ort and openvino run an ONNX export of the eager model and "
                    "need pip install onnxruntime / openvino)")
    ap.add_argument("--repeats", type=int, metavar="R",
                    help=f"interleaved rounds per case (default {FULL.rounds}, --quick {QUICK.rounds})")
    ap.add_argument("--quick", action="store_true",
                    help=f"~{QUICK.target_s * 1e3:g} ms batches, {QUICK.rounds} rounds: a smoke run in seconds")
    ap.add_argument("--target-ms", type=float, metavar="MS",
                    help=f"duration of one timed batch (default {FULL.target_s * 1e3:g}, --quick "
                    f"{QUICK.target_s * 1e3:g})")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak RSS per (case, peer), each in a fresh subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="after the timing, print seqfuse.profile of each --model: time per fused chain and "
                         "stage, each stage's share of the FMA peak or memory bandwidth, the time outside "
                         "the fused calls (CPU)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    ap.add_argument("--json", metavar="PATH", help="write the full results (with samples) as JSON")
    ap.add_argument("--csv", metavar="PATH", help="write one row per case as CSV")
    ap.add_argument("--plot", metavar="PATH",
                    help="draw a bar chart of the ratios to PATH (.png, .svg, ...); needs matplotlib "
                    "(pip install matplotlib)")
    ap.add_argument("--compare", metavar="OLD.json",
                    help="compare ratios with an earlier --json run; exit 1 if a fused ratio regressed. "
                    "Without --case/--dtype/--batch/--threads, the old run's are used")
    ap.add_argument("--tolerance", type=float, default=0.15, metavar="FRAC",
                    help="allowed fractional drop of a fused ratio for --compare (default 0.15)")
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return ap


def _print(text: str) -> None:
    """print(), spelling µ as u where stdout cannot encode it."""
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        text = text.replace("µ", "u")
    print(text)


def _kinds(seq: torch.nn.Module) -> str:
    names: List[str] = []
    for m in seq.children():
        name = type(m).__name__
        if name not in names:
            names.append(name)
    return ", ".join(names)


def profile_model(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """``seqfuse.profile`` of ``seqfuse.fuse`` of a model case (the timed
    run's weights and input): what ``--profile`` prints."""
    import seqfuse

    model, x = materialize(case, dtype, seed)
    return f"{case.name}: {seqfuse.profile(seqfuse.fuse(model.eval()), x)}"


def describe_model(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0,
                   whole_model: Optional[bool] = None) -> str:
    """What ``seqfuse.fuse`` makes of a model case, in eval mode.

    The ``explain()`` of every FusedSequential that has a fused segment, one
    line for each that runs entirely eagerly, and with ``whole_model`` (the
    default) ``seqfuse.explain(fused_model)``: the chains found in custom
    forwards and the share of Conv2d/Linear/BatchNorm modules in fused calls.

    >>> from .cases import get_case
    >>> print(describe_model(get_case("zoo_nerf_mlp"), whole_model=False))  # doctest: +ELLIPSIS
    zoo_nerf_mlp: NeRFMLP, input 2x63; seqfuse.fuse converts 2 nn.Sequential (2 with fused segments)
    early: FusedSequential plan: 1 fused segment, 0 eager segments (CPU kernels: ...)
      [0:10] fused: seqfuse::mlp_forward, float32, 63 -> 256 -> 256 -> 256 -> 256 -> 256
    ...
    """
    import seqfuse

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = case.build().eval().to(dtype)
    fused = seqfuse.fuse(model)
    shape = "x".join(map(str, case.input_shape))
    if whole_model is None:
        whole_model = True
    containers = [(name, m) for name, m in fused.named_modules() if isinstance(m, seqfuse.FusedSequential)]
    plans = [(name or "(the model)", m, m.explain()) for name, m in containers]
    n_fused = sum(1 for _, _, e in plans if e.fused_segments)
    lines = [f"{case.name}: {type(model).__name__}, input {shape}; seqfuse.fuse converts {len(plans)} "
             f"nn.Sequential ({n_fused} with fused segments)"]
    if not plans:
        lines.append("  no nn.Sequential in the model: nothing to fuse, the fused peer runs it eagerly")
    for name, m, expl in plans:
        if expl.fused_segments:
            text = str(expl).splitlines()
            lines.append(f"{name}: {text[0]}")
            lines += text[1:]
        else:
            lines.append(f"{name}: eager only, {len(m)} children ({_kinds(m)}): nothing fusible")
    if whole_model:  # the chains of the captured forwards too, and the coverage
        lines.append(str(seqfuse.explain(fused)))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        width = max(map(len, CASES))
        for c in CASES.values():
            print(f"{c.name.ljust(width)}  {'x'.join(map(str, c.input_shape)).ljust(10)}  {c.description}")
        return 0

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"seqfuse.bench: error: {report.MATPLOTLIB_MISSING}", file=sys.stderr)
            return 2
    if args.input and not args.model:
        print("seqfuse.bench: error: --input is the input shape of --model; give --model too", file=sys.stderr)
        return 2

    old_meta, old_results = ({}, [])
    if args.compare:
        old_meta, old_results = report.load_json(args.compare)
        if not args.case and not args.model:
            args.case = [r["case"] for r in old_results if r["case"] in CASES]
            if not args.case:
                print(f"seqfuse.bench: error: none of the cases in {args.compare} is registered "
                      "(a sweep's output?); name the cases with --case", file=sys.stderr)
                return 2
        if args.dtype is None:
            args.dtype = old_meta.get("dtype")
        if args.batch is None:
            args.batch = old_meta.get("batch")
        if args.threads is None and old_meta.get("threads_requested"):
            args.threads = old_meta["threads_requested"]

    try:
        dtype = parse_dtype(args.dtype or "float32")
        peers = parse_peers(args.peers)
        specs = [s.strip() for item in args.model or [] for s in item.split(",") if s.strip()]
        models = [model_case(s, args.input, seed=args.seed).with_batch(args.batch) for s in specs]
        for c in models:
            _print(describe_model(c, dtype, args.seed))
            print()
        cases = list(args.case or []) + models
        results = run(cases=cases, peers=peers, dtype=dtype, threads=args.threads, quick=args.quick,
                      repeats=args.repeats, batch=args.batch, memory=args.memory, target_ms=args.target_ms,
                      seed=args.seed, progress=not args.no_progress)
    except (KeyError, ValueError) as e:
        print(f"seqfuse.bench: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

    env = environment(dtype, args.threads, next((r["fma_peak_gflops"] for r in results), None))
    mode = "quick" if args.quick else "full"
    _print(report.header(env, mode))
    _print(report.table(results))
    _print(report.footer(results))
    if args.profile:
        if not models:
            print("seqfuse.bench: --profile profiles --model cases; none was given", file=sys.stderr)
        old_threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)  # as the run had them
        try:
            for c in models:
                print()
                _print(profile_model(c, dtype, args.seed))
        finally:
            torch.set_num_threads(old_threads)

    settings = {"mode": mode, "batch": args.batch, "threads_requested": args.threads, "peers": peers,
                "repeats": args.repeats, "target_ms": args.target_ms, "seed": args.seed}
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(results, env, settings))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(report.to_csv(results))
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        report.plot_ratios(results, args.plot, title=report.header(env, mode))
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.compare:
        text, regressed = report.compare(old_meta, old_results, env, results, args.tolerance)
        print()
        print(f"compared with {args.compare} (tolerance {args.tolerance:g}):")
        _print(text)
        return 1 if regressed else 0
    return 0
