"""The CUDA benchmark table: seqfuse against nn.Sequential (eager) on the
cases the CUDA targets name, with CUDA graphs of eager and, with --compile,
torch.compile(mode="max-autotune") as further peers.

Timing: CUDA events around a batch of calls (synchronized before and after),
the callables interleaved in rotated order, the median of --repeats rounds.
Ratios are against eager in the same run. Run by `make gpu-check`
(tools/gpu_check.sh); on a machine without a GPU it says so and exits 0.

    python benchmarks/gpu_table.py --out gpu_table.md [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import seqfuse


def _sync():
    torch.cuda.synchronize()


def _calls_per_batch(fn: Callable, x, target_s: float) -> int:
    _sync()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < target_s / 4 or n < 2:
        fn(x)
        n += 1
        _sync()
    per = (time.perf_counter() - t0) / n
    return max(1, min(10_000, int(target_s / max(per, 1e-7))))


def measure(fns: Dict[str, Callable], x, repeats: int, target_s: float) -> Dict[str, float]:
    """Median seconds per call of each callable, interleaved."""
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: packing, graph capture, compilation
            for _ in range(3):
                fn(x)
        _sync()
        inner = {k: _calls_per_batch(f, x, target_s) for k, f in fns.items()}
        names = list(fns)
        samples: Dict[str, List[float]] = {k: [] for k in names}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for r in range(repeats):
            for k in names[r % len(names):] + names[: r % len(names)]:
                _sync()
                start.record()
                for _ in range(inner[k]):
                    fns[k](x)
                end.record()
                end.synchronize()
                samples[k].append(start.elapsed_time(end) / 1e3 / inner[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def cuda_graph_of(model: nn.Module, x: torch.Tensor) -> Callable:
    """Eager replayed as a CUDA graph (static input and output buffers)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_y = model(static_x)

    def run(inp):
        static_x.copy_(inp)
        graph.replay()
        return static_y

    return run


def mlp(widths: List[int], act=nn.ReLU) -> List[nn.Module]:
    mods: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(nn.Linear(a, b))
        if i + 2 < len(widths):
            mods.append(act())
    return mods


def row(case: str, times: Dict[str, float], extra: str = "") -> str:
    eager = times["eager"]
    cells = [f"{times[k] * 1e3:.3f} ms ({eager / times[k]:.2f}x)" for k in times]
    return f"| {case} | " + " | ".join(cells) + (f" | {extra}" if extra else "") + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_table.md")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    p.add_argument("--compile", action="store_true", help="add torch.compile(mode='max-autotune') (minutes)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_table: no CUDA device; nothing measured")
        return 0
    if "cuda" not in seqfuse.planner.FUSED_DEVICES:
        print("gpu_table: this build of seqfuse has no CUDA kernels")
        return 1
    dev = torch.device("cuda")
    target = 0.01 if args.quick else 0.03
    repeats = 3 if args.quick else args.repeats
    lines = [f"# seqfuse on {torch.cuda.get_device_name()} (torch {torch.__version__}, seqfuse {seqfuse.__version__})",
             "", "Median per call; (ratio) = eager's time / this one's.", ""]

    def peers(model: nn.Module, x: torch.Tensor, graph: bool = True, compiled: bool = False) -> Dict[str, Callable]:
        fused = seqfuse.fuse(model)
        fns = {"eager": model, "fused": fused}
        if graph:
            fns["eager CUDA graph"] = cuda_graph_of(model, x)
        if compiled:
            fns["compile max-autotune"] = torch.compile(model, mode="max-autotune")
        return fns

    def table(title: str, header: List[str]):
        lines.extend(["", f"## {title}", "", "| case | " + " | ".join(header) + " |",
                      "|---" * (len(header) + 1) + "|"])

    # Narrow MLP 64 -> 64 (x4) -> 16, ReLU: the fully fused kernel's case.
    batches = [1 << 16, 1 << 20] if args.quick else [1 << 16, 1 << 18, 1 << 20]
    header = ["eager", "fused", "eager CUDA graph"] + (["compile max-autotune"] if args.compile else [])
    table("Narrow MLP 64-64x4-16, ReLU", header)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b in batches:
            torch.manual_seed(0)
            model = nn.Sequential(*mlp([64, 64, 64, 64, 64, 16])).to(dev, dtype).eval()
            x = torch.randn(b, 64, device=dev, dtype=dtype)
            t = measure(peers(model, x, compiled=args.compile and b == batches[-1]), x, repeats, target)
            lines.append(row(f"{str(dtype)[6:]} batch {b}", t))
            print(lines[-1], flush=True)

    # Deep narrow MLP at small batch: launch bound.
    table("Deep narrow MLP 64x12, Tanh, float32 (launch bound)", ["eager", "fused", "eager CUDA graph"])
    for b in ([1, 64] if args.quick else [1, 8, 64]):
        torch.manual_seed(0)
        model = nn.Sequential(*mlp([64] * 13, nn.Tanh)).to(dev).eval()
        x = torch.randn(b, 64, device=dev)
        lines.append(row(f"batch {b}", measure(peers(model, x), x, repeats, target)))
        print(lines[-1], flush=True)

    # Wide MLP 4096 x 3 in bfloat16 against a plain bf16 matmul's rate.
    table("Wide MLP 4096x3, GELU, bfloat16, batch 8192", ["eager", "fused", "share of a plain matmul's rate"])
    torch.manual_seed(0)
    model = nn.Sequential(*mlp([4096] * 4, nn.GELU)).to(dev, torch.bfloat16).eval()
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    t = measure(peers(model, x, graph=False), x, repeats, target)
    mm = measure({"eager": lambda a: a @ w}, x, repeats, target)["eager"]
    lines.append(row("batch 8192", t, f"{3 * mm / t['fused'] * 100:.0f}%"))
    print(lines[-1], flush=True)

    # torchvision models through fuse(), float16 channels_last.
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None:
        table("torchvision models via fuse(), float16 channels_last, batch 32", ["eager", "fused"])
        for name in ("resnet50", "mobilenet_v2"):
            model = getattr(torchvision.models, name)().to(dev, torch.float16).eval()
            model = model.to(memory_format=torch.channels_last)
            x = torch.randn(32, 3, 224, 224, device=dev, dtype=torch.float16).contiguous(
                memory_format=torch.channels_last)
            lines.append(row(name, measure(peers(model, x, graph=False), x, repeats, target)))
            print(lines[-1], flush=True)

    # A training step of the narrow MLP.
    table("Training step, narrow MLP 64-64x4-16, batch 65536 (forward, backward, SGD)", ["eager", "fused"])
    for dtype in (torch.float32,):  # fused training runs float32 and float64 (bfloat16 trains eagerly)
        torch.manual_seed(0)
        eager = nn.Sequential(*mlp([64, 64, 64, 64, 64, 16])).to(dev, dtype).train()
        fused = seqfuse.fuse(eager)
        x = torch.randn(1 << 16, 64, device=dev, dtype=dtype)

        def step(model, opt):
            def run(inp):
                opt.zero_grad(set_to_none=True)
                model(inp).square().mean().backward()
                opt.step()
            return run

        fns = {"eager": step(eager, torch.optim.SGD(eager.parameters(), lr=1e-3)),
               "fused": step(fused, torch.optim.SGD(fused.parameters(), lr=1e-3))}
        with torch.enable_grad():
            t = {}
            for k, f in fns.items():  # inference_mode would forbid backward: time outside it
                for _ in range(3):
                    f(x)
                _sync()
                t0 = time.perf_counter()
                for _ in range(20):
                    f(x)
                _sync()
                t[k] = (time.perf_counter() - t0) / 20
        lines.append(row(str(dtype)[6:], t))
        print(lines[-1], flush=True)

    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"gpu_table: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
