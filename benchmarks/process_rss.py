"""Whole-process peak RSS of a short inference run, eager vs fused: one fresh
process per (case, peer), so the figures include the torch runtime, the model
and everything the calls allocate (packed weights included).

    python benchmarks/process_rss.py [--case wide_b256,nerf_b4096,...] [--calls 20]
"""

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, torch, seqfuse
from seqfuse.bench.cases import get_case
case, peer, calls = get_case(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
mods = case.build_modules()
model = (torch.nn.Sequential if peer == "eager" else seqfuse.FusedSequential)(*mods).eval()
x = torch.randn(*case.input_shape)
with torch.inference_mode():
    for _ in range(calls):
        model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mib(case: str, peer: str, calls: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, case, peer, str(calls)], capture_output=True, text=True,
                         check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="wide_b256,nerf_b4096,bn_b128,small_b256")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    print(f"{'case':12s} {'eager MiB':>10s} {'fused MiB':>10s} {'fused/eager':>12s}")
    for case in args.case.split(","):
        e, f = peak_mib(case, "eager", args.calls), peak_mib(case, "fused", args.calls)
        print(f"{case:12s} {e:10.1f} {f:10.1f} {f / e:11.2f}x")


if __name__ == "__main__":
    main()
