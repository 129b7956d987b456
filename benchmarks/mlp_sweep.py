#!/usr/bin/env python
"""Sweep of square MLPs over batch sizes and widths: where does the fused
kernel win over eager, and by how much?

Every cell is one benchmark case run by the same harness as
``python -m seqfuse.bench`` (interleaved A/B rounds, median per-call time,
numerics checked against eager first), so the numbers mean the same thing.
The model of a cell is ``depth`` Linear layers width -> width with the
activation between them; the input is (batch, width).

    python benchmarks/mlp_sweep.py --quick
    python benchmarks/mlp_sweep.py --widths 128,512 --batches 1,64,1024 --depth 6 --peers eager,fused,jit
    python benchmarks/mlp_sweep.py --dtype bfloat16 --json sweep.json --csv sweep.csv

Prints, per non-eager peer, a table of ratios (eager µs / peer µs; > 1 is
faster than eager) with widths as rows and batch sizes as columns, then the
fused peer's GFLOP/s and eager's per-call µs. A ``!`` after a cell marks a
numerics mismatch with eager.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from seqfuse.bench import Case, environment, mlp, parse_dtype, parse_peers, run
from seqfuse.bench import report

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


def _ints(text: str) -> List[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def sweep_cases(widths: Sequence[int], batches: Sequence[int], depth: int, activation: str) -> List[Case]:
    """One Case per (width, batch): ``depth`` Linear width->width layers."""
    act = ACTIVATIONS[activation]
    cases = []
    for w in widths:
        for b in batches:
            cases.append(Case(
                name=f"w{w}_b{b}",
                build_modules=lambda w=w: mlp([w] * (depth + 1), act),
                input_shape=(b, w),
                description=f"{depth} x Linear {w}->{w}, {activation}; {b} rows",
            ))
    return cases


def grid(results: Sequence[dict], widths: Sequence[int], batches: Sequence[int], title: str, cell) -> str:
    by_name: Dict[str, dict] = {r["case"]: r for r in results}
    head = ["width \\ batch"] + [str(b) for b in batches]
    rows = []
    for w in widths:
        row = [str(w)]
        for b in batches:
            r = by_name.get(f"w{w}_b{b}")
            row.append("-" if r is None else cell(r))
        rows.append(row)
    widths_ = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)  # noqa: E731
                                  for i, (c, wd) in enumerate(zip(cells, widths_)))
    return "\n".join([title, fmt(head), fmt(["-" * wd for wd in widths_])] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="64,128,256,512,1024", help="comma list (default %(default)s)")
    ap.add_argument("--batches", default="1,8,64,256,1024,4096", help="comma list (default %(default)s)")
    ap.add_argument("--depth", type=int, default=4, help="number of Linear layers (default %(default)s)")
    ap.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--peers", default="eager,fused", help="as for seqfuse.bench (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="short batches, few rounds")
    ap.add_argument("--repeats", type=int, help="interleaved rounds per cell")
    ap.add_argument("--target-ms", type=float, help="duration of one timed batch")
    ap.add_argument("--json", metavar="PATH", help="write all results (readable by seqfuse.bench --compare)")
    ap.add_argument("--csv", metavar="PATH", help="write one row per cell")
    args = ap.parse_args(argv)

    widths, batches = _ints(args.widths), _ints(args.batches)
    if args.depth < 1 or not widths or not batches:
        ap.error("need --depth >= 1 and at least one width and one batch")
    peers = parse_peers(args.peers)
    dtype = parse_dtype(args.dtype)
    cases = sweep_cases(widths, batches, args.depth, args.activation)
    results = run(cases, peers=peers, dtype=dtype, threads=args.threads, quick=args.quick,
                  repeats=args.repeats, target_ms=args.target_ms, progress=True)

    env = environment(dtype, args.threads)
    print(report.header(env, f"depth {args.depth} | {args.activation} | {'quick' if args.quick else 'full'}"))
    mark = lambda r, p: "!" if not r.get("numerics", {}).get(p, {"ok": True})["ok"] else ""  # noqa: E731
    for p in peers[1:]:
        print()
        print(grid(results, widths, batches, f"{p} ratio (eager µs / {p} µs)",
                   lambda r, p=p: (f"{r['ratio'][p]:.2f}x" if p in r["ratio"] else "err") + mark(r, p)))
    gpeer = "fused" if "fused" in peers else "eager"
    print()
    print(grid(results, widths, batches, f"{gpeer} GFLOP/s",
               lambda r: f"{r['gflops'][gpeer]:.1f}" if gpeer in r["gflops"] else "err"))
    print()
    print(grid(results, widths, batches, "eager µs per call", lambda r: report._us(r["time_us"]["eager"])))
    errors = [f"{r['case']}: {k}: {v}" for r in results for k, v in r.get("errors", {}).items()]
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors))

    settings = {"mode": "sweep", "depth": args.depth, "activation": args.activation, "peers": peers}
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(results, env, settings))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(report.to_csv(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
