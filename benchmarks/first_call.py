"""What a first call costs: fuse() itself, the first call after it and the
first call at each new input size, against the median of 5 steady calls at
that shape, with and without engine choices saved by an earlier process, and
eager's own first calls for comparison (a fresh process's first call is slow
for any model: thread pool start, cold caches and allocator).

    python benchmarks/first_call.py                       # resnet50, mobilenet_v2
    python benchmarks/first_call.py --models resnet18 --sizes 224,192

Each (model, cache state) runs in a fresh process, so nothing a previous
measurement planned, packed or chose is in memory. "no saved choices" starts
from an empty cache folder; "saved choices" from the folder the uncached run
of the same model left behind (written at that process's exit). Engine
choices are measured by the calls themselves: the calls that did so are
counted apart ("trials") with their extra time in units of a steady call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _child(model_name: str, shapes: list, threads: int, eager: bool) -> dict:
    import torch
    import torchvision

    import seqfuse
    from seqfuse._loader import _C

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    t0 = time.perf_counter()
    fused = model if eager else seqfuse.fuse(model)
    fuse_s = time.perf_counter() - t0

    def timed(x):
        t0 = time.perf_counter()
        fused(x)
        return time.perf_counter() - t0

    rows = []
    with torch.inference_mode():
        for b, s in shapes:
            x = torch.randn(b, 3, s, s)
            first = timed(x)
            # While a shape class is undecided its calls time the engines in
            # turn (csrc/runtime/engine_choice.h): count those calls apart.
            trials = []
            while not eager and _C.engine_trials_pending() and len(trials) < 50:
                trials.append(timed(x))
            later = statistics.median(timed(x) for _ in range(5))
            rows.append({"first": first / later, "later_ms": later * 1e3, "trial_calls": len(trials),
                         "trial_extra": sum(t - later for t in trials) / later})
    return {"fuse_s": fuse_s, "rows": rows}


def _run(model_name: str, shapes: list, threads: int, cache_dir: str, eager: bool) -> dict:
    env = dict(os.environ, SEQFUSE_CACHE_DIR=cache_dir)
    cmd = [sys.executable, __file__, "--child", model_name, "--threads", str(threads), "--shapes", json.dumps(shapes)]
    out = subprocess.run(cmd + (["--eager"] if eager else []), env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(row: dict) -> str:
    text = f"{row['first']:.1f}×"
    if row["trial_calls"]:
        text += f", {row['trial_calls']} trials +{row['trial_extra']:.1f}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2", help="torchvision classifiers, comma list")
    ap.add_argument("--sizes", default="224,192,256,320", help="square sizes at batch 1, the first is the first call")
    ap.add_argument("--batches", default="2,4", help="then these batch sizes at the first size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, json.loads(args.shapes), args.threads, args.eager)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    shapes = [[1, s] for s in sizes] + [[int(b), sizes[0]] for b in args.batches.split(",") if b]
    print(f"first call / median of 5 steady calls at that shape ({args.threads} threads, float32); for an "
          "undecided shape class, the calls that timed the engines after the first one, and their extra time "
          "in steady calls")
    print("| model | run | fuse() | " + " | ".join(f"{b}×{s}²" for b, s in shapes) + " |")
    print("|---|---|---|" + "---|" * len(shapes))
    for name in [m for m in args.models.split(",") if m]:
        with tempfile.TemporaryDirectory() as cache:
            for label, eager in (("eager", True), ("fused, no saved choices", False), ("fused, saved choices", False)):
                print(f"  {name}, {label} ...", file=sys.stderr, flush=True)
                r = _run(name, shapes, args.threads, cache, eager)
                cells = [_cell(row) for row in r["rows"]]
                fuse_s = "" if eager else f"{r['fuse_s']:.2f} s"
                print(f"| {name} | {label} | {fuse_s} | " + " | ".join(cells) + " |", flush=True)
        steady = ", ".join(f"{row['later_ms']:.1f}" for row in r["rows"])
        print(f"  ({name}, fused, steady calls: {steady} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
