"""Library models through seqfuse.fuse() as a new user runs them: ok / differs /
crashed / fell back, the share of Conv/Linear/BatchNorm calls and multiply-adds
in fused calls (counted independently of seqfuse.explain), speed against eager.

    python benchmarks/model_sweep.py --library timm
    python benchmarks/model_sweep.py --library torchvision --models resnet18,fcn_resnet50 --size 160
    python benchmarks/model_sweep.py --library ultralytics          # needs: pip install ultralytics

What each column means: seqfuse/bench/sweep.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from seqfuse.bench.sweep import LIBRARIES, format_table, sweep_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", choices=sorted(LIBRARIES), required=True)
    ap.add_argument("--models", default="", help="comma list (default: the library's list in seqfuse/bench/sweep.py)")
    ap.add_argument("--size", type=int, default=160, help="input height and width (default 160)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--no-timing", action="store_true", help="check and count only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m] or LIBRARIES[args.library]
    results = []
    for i, name in enumerate(models, 1):
        print(f"[{i}/{len(models)}] {args.library}:{name} ...", file=sys.stderr, flush=True)
        r = sweep_model(args.library, name, args.size, repeats=args.repeats, timing=not args.no_timing)
        print(f"    {r.status}; calls fused {r.call_share}; vs eager {r.speedup} {r.detail}", file=sys.stderr, flush=True)
        results.append(r)
    print(f"{args.library}, {args.size}x{args.size}, batch 1, float32, {args.threads} threads, torch {torch.__version__}")
    print(format_table(results))
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
