#!/usr/bin/env python
"""Checks the harness's interleaved ratios against each peer timed alone.

The harness times every peer in interleaved rounds in one process (see
seqfuse/bench/timing.py), sleeping briefly before each batch so a runtime
whose worker threads spin after a call (ONNX Runtime's pool) does not take
the next peer's cores. This script checks that the ratios it reports are
the ones each peer gets on its own: per model it runs the interleaved
harness once (eager, fused, ONNX Runtime, OpenVINO), then times each peer
alone in a fresh process of its own (``seqfuse.bench.harness.time_alone``,
same weights, input, warm-up and rounds), and prints fused's ratio against
each peer both ways and how far apart they are.

    python benchmarks/peers_alone.py                              # resnet18, mobilenet_v2, batch 1
    python benchmarks/peers_alone.py --models resnet50 --batch 8 --repeats 5

Needs onnxruntime and openvino for those peers (a missing one is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

try:
    import seqfuse  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from seqfuse.bench import run, timing
from seqfuse.bench.cases import torchvision_case
from seqfuse.bench.harness import time_alone

PEERS = ("eager", "fused", "ort", "openvino")


def _child(model: str, batch: int, peer: str, threads: int, repeats: int, target_ms: float) -> None:
    torch.set_num_threads(threads)
    case = torchvision_case(model, (batch, 3, 224, 224))
    settings = timing.FULL.with_overrides(repeats, target_ms)
    print(json.dumps({"us": time_alone(case, peer, settings=settings)}))


def alone(model: str, batch: int, peer: str, threads: int, repeats: int, target_ms: float) -> float:
    """Median µs of ``peer`` timed in a fresh process of its own (nan when it cannot run)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, str(batch), peer, str(threads), str(repeats),
           str(target_ms)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {peer} alone failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
              file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["us"]


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="comma list of torchvision models")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="rounds per measurement (default 9)")
    ap.add_argument("--target-ms", type=float, default=60.0, help="duration of one timed batch (default 60)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        m, b, p, t, r, ms = a.child
        _child(m, int(b), p, int(t), int(r), float(ms))
        return 0

    rows = []
    for model in [s.strip() for s in a.models.split(",") if s.strip()]:
        case = torchvision_case(model, (a.batch, 3, 224, 224))
        [r] = run([case], peers=PEERS, threads=a.threads, repeats=a.repeats, target_ms=a.target_ms, progress=True)
        together: Dict[str, float] = dict(r["time_us"])
        solo = {p: alone(model, a.batch, p, a.threads, a.repeats, a.target_ms) for p in PEERS}
        for p in PEERS:
            if p == "fused" or p not in together:
                continue
            ratio_h = together[p] / together["fused"]
            ratio_a = solo[p] / solo["fused"]
            rows.append((model, p, together["fused"], together[p], solo["fused"], solo[p], ratio_h, ratio_a))

    print(f"\ntorch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.repeats} rounds of ~{a.target_ms:g} ms")
    print("| model | peer | interleaved: fused ms | peer ms | alone: fused ms | peer ms | "
          "peer/fused interleaved | alone | difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for model, p, fh, ph, fa, pa, rh, ra in rows:
        diff = rh / ra - 1
        worst = max(worst, abs(diff)) if diff == diff else worst
        print(f"| {model} | {p} | {fh / 1e3:.2f} | {ph / 1e3:.2f} | {fa / 1e3:.2f} | {pa / 1e3:.2f} | "
              f"{rh:.2f}x | {ra:.2f}x | {100 * diff:+.0f}% |")
    print(f"\nlargest difference between the interleaved and the alone ratios: {100 * worst:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
