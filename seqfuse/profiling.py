"""seqfuse.profile(model, example_input): where a fused model's forward time goes.

Times a model's forward (CPU) and, inside it, every fused call and every
stage of it, with the stage's multiply-adds and bytes, and puts each stage
against the limit that binds it on this machine: the float32 FMA peak for a
compute-bound stage, the memory bandwidth for a memory-bound one (a roofline:
whichever of ``peak`` and ``bandwidth * flops / bytes`` is lower), both
measured in the same process. What the fused calls do not cover (eager
modules, Python, glue between calls) is the forward's time outside them.

The stage times come from the kernels themselves (``csrc/runtime/stage_profile.h``):
wall time on the calling thread for runs split over the threads stage by
stage, the thread hand-off included, and the mean over the threads for runs
where each thread carries its own images through every stage. An MLP run's
stages run together over row tiles and are timed as one. Only the calling
thread's fused calls are recorded: other threads running models at the same
time stay out of the profile (though they share the cores it times).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _C
from .capture import CapturedForward
from .container import _PLAN_ATTR, FusedSequential, _FusedRun
from .spec import CONV_ENGINE_NAMES, ENGINE_NAMES

__all__ = ["profile", "ModelProfile", "ChainProfile", "StageProfile", "machine_limits"]


@dataclass
class StageProfile:
    """One stage of a fused call: median time per forward, its work, and
    the share of its roofline limit it reached."""

    label: str
    ms: Optional[float]  # None: run together with the chain's other stages (MLP runs)
    macs: int
    bytes: int
    bound: str  # "FMA" or "memory": which limit is the lower one for this stage
    share: Optional[float]  # achieved / limit (memory shares above 1 mean the data stayed in cache)

    @property
    def gflops(self) -> Optional[float]:
        return 2 * self.macs / (self.ms * 1e6) if self.ms else None


@dataclass
class ChainProfile:
    """A fused segment: where it is, the engine its calls ran, its median time per forward."""

    where: str
    op: str
    engine: str
    calls: int  # calls per forward
    ms: float
    layout_ms: float
    before_ms: float  # time outside fused calls between the previous fused call (or the forward's start) and this one
    stages: List[StageProfile] = field(default_factory=list)


@dataclass
class ModelProfile:
    """What :func:`profile` returns; ``str()`` is the readable report."""

    model_name: str
    input_shape: Tuple[int, ...]
    threads: int
    peak_gflops: float
    bandwidth_gbs: float
    forward_ms: float  # median over the timed forwards
    chains: List[ChainProfile] = field(default_factory=list)
    tail_ms: float = 0.0  # time outside fused calls after the last one
    peak_name: str = "FMA peak"  # "bf16 product peak" for a bfloat16 input (vdpbf16ps where the CPU has it)

    @property
    def fused_ms(self) -> float:
        """Time per forward inside fused calls."""
        return sum(c.ms for c in self.chains)

    @property
    def outside_ms(self) -> float:
        """Time per forward outside fused calls: eager modules, Python, glue."""
        return max(self.forward_ms - self.fused_ms, 0.0)

    @property
    def outside_share(self) -> float:
        return self.outside_ms / self.forward_ms if self.forward_ms else 0.0

    def compute_share(self, min_in_channels: int = 0) -> Optional[float]:
        """FLOP-weighted share of the FMA peak over the compute-bound conv and
        linear stages computed directly (with at least ``min_in_channels``
        input channels when given): total FLOPs / (total time * peak).
        Winograd stages are left out: they do fewer multiply-adds than the
        convolution's count (their own ``share`` is against that count, so
        it can pass 100%)."""
        flops = ns = 0.0
        for c in self.chains:
            for s in c.stages:
                if s.bound != "FMA" or s.ms is None or not s.label.startswith(("conv", "linear")):
                    continue
                if "winograd" in s.label.split():
                    continue
                if min_in_channels and _in_channels(s.label) < min_in_channels:
                    continue
                flops += 2 * s.macs
                ns += s.ms * 1e6
        return flops / ns / self.peak_gflops if ns else None

    def by_kind(self) -> Dict[str, float]:
        """Milliseconds per forward by what spent them, largest first: each
        stage kind (``conv 1x1``, ``conv 3x3 depthwise``, ``linear``,
        ``maxpool``, ...), ``layout conversions``, ``MLP runs`` (timed whole),
        ``other in fused calls`` (checks, allocation, hand-offs not in a
        stage) and ``outside fused calls``."""
        kinds: Dict[str, float] = {}

        def add(kind: str, ms: float) -> None:
            kinds[kind] = kinds.get(kind, 0.0) + ms

        for c in self.chains:
            staged = c.layout_ms
            add("layout conversions", c.layout_ms)
            for st in c.stages:
                if st.ms is None:
                    continue
                words = st.label.split()
                kind = words[0]
                if kind == "conv":
                    kind = "conv " + words[1].split("/")[0] + (" depthwise" if "depthwise" in words else
                                                               " winograd" if "winograd" in words else
                                                               " grouped" if any(w.startswith("g") and w[1:].isdigit()
                                                                                 for w in words) else "")
                elif kind == "global":
                    kind = "global avgpool"
                add(kind, st.ms)
                staged += st.ms
            if all(st.ms is None for st in c.stages):
                add("MLP runs", c.ms)
            else:
                add("other in fused calls", max(c.ms - staged, 0.0))
        add("outside fused calls", self.outside_ms)
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        lines = [
            f"seqfuse.profile({self.model_name}) input {shape}, {self.threads} threads: forward {self.forward_ms:.3f} ms, "
            f"fused calls {self.fused_ms:.3f} ms, outside them {self.outside_ms:.3f} ms ({100 * self.outside_share:.1f}%)",
            f"  limits measured now: {self.peak_name} {self.peak_gflops:.0f} GFLOP/s, memory bandwidth "
            f"{self.bandwidth_gbs:.1f} GB/s",
        ]
        share = self.compute_share()
        if share is not None:
            lines.append(f"  compute-bound conv/linear stages: {100 * share:.0f}% of the {self.peak_name} (FLOP-weighted)")
        top = [f"{k} {v:.3f}" for k, v in self.by_kind().items() if v >= 0.0005]
        lines.append("  by kind, ms: " + ", ".join(top))
        for c in self.chains:
            calls = f" x{c.calls}" if c.calls != 1 else ""
            if c.before_ms >= 0.0005:
                lines.append(f"  {c.before_ms:8.3f} ms  (outside fused calls)")
            lines.append(f"  {c.ms:8.3f} ms  {c.where}{calls} [{c.op}, {c.engine}]")
            if c.layout_ms:
                lines.append(f"    {c.layout_ms:8.3f} ms  layout conversions")
            for s in c.stages:
                if s.ms is None:
                    lines.append(f"    {'':>8}     {s.label}: {2 * s.macs / 1e6:.1f} MFLOP")
                    continue
                limit = f"{100 * s.share:.0f}% of {self.peak_name if s.bound == 'FMA' else 'bandwidth'}"
                lines.append(f"    {s.ms:8.3f} ms  {s.label}: {s.gflops:.0f} GFLOP/s, {limit}")
        if self.tail_ms >= 0.0005:
            lines.append(f"  {self.tail_ms:8.3f} ms  (outside fused calls)")
        return "\n".join(lines)

    __repr__ = __str__


def _in_channels(label: str) -> int:
    """Input channels of a 'conv KxK[/s] IN->OUT ...' or 'linear IN->OUT' label."""
    for word in label.split():
        if "->" in word:
            return int(word.split("->")[0])
    return 0


_LIMITS: Dict[Tuple[int, bool], Tuple[float, float]] = {}


def machine_limits(threads: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tuple[float, float]:
    """(FMA peak GFLOP/s, memory bandwidth GB/s) of ``threads`` threads
    (default torch's), measured once per process: the peak by the native FMA loop
    (``csrc/kernels/fma_peak.h``), the bandwidth by the best of
    a few 64 MiB tensor copies (bytes read plus bytes written). For
    ``torch.bfloat16`` the peak is the bfloat16 products' (``vdpbf16ps``,
    twice the float32 FMA's, where the CPU has AVX512-BF16), which the
    GEMMs of bfloat16 runs use."""
    threads = threads or torch.get_num_threads()
    key = (threads, dtype == torch.bfloat16)
    if key not in _LIMITS:
        peak = _C.fma_peak_gflops(threads, 0.2, dtype == torch.bfloat16)
        src = torch.ones(16 << 20)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        _LIMITS[key] = (peak, 2 * src.numel() * src.element_size() / best / 1e9)
    return _LIMITS[key]


def _segments_by_plan(model: nn.Module) -> Dict[int, Tuple[str, str]]:
    """packed buffer address -> (where the segment is, its op) for every
    packed fused segment the model holds."""
    found: Dict[int, Tuple[str, str]] = {}

    def note(seq: FusedSequential, where: str) -> None:
        plan = seq.__dict__.get(_PLAN_ATTR)
        if plan is None:
            return
        for run in plan.runs:
            if isinstance(run, _FusedRun) and run.call is not None:
                keys = " -> ".join(run.segment.keys)
                found[run.call.packed.data_ptr()] = (f"{where}: {keys}" if where else keys, run.segment.op)

    for name, m in model.named_modules():
        if isinstance(m, FusedSequential):
            note(m, name or "(model)")
        cf = m.__dict__.get("forward")
        if isinstance(cf, CapturedForward):
            traced = cf.traced()
            for chain in traced.chains if traced.fn is not None else ():
                note(chain.seq, f"{name or '(model)'} {type(m).__name__}.forward")
    return found


def _roofline(macs: int, nbytes: int, ns: float, peak: float, bandwidth: float) -> Tuple[str, float]:
    flops = 2.0 * macs
    if peak <= bandwidth * flops / max(nbytes, 1):
        return "FMA", flops / ns / peak
    return "memory", nbytes / ns / bandwidth


def profile(model: nn.Module, example_input: torch.Tensor, repeats: int = 10) -> ModelProfile:
    """Runs ``model(example_input)`` (under ``torch.no_grad``) until the
    engine trials of its shape classes are decided, then ``repeats`` timed
    forwards with every fused CPU call timed stage by stage; returns the
    medians per forward. ``model`` is a model :func:`seqfuse.fuse` returned,
    or any module holding FusedSequentials; CPU only.

    >>> import torch, seqfuse
    >>> from torch import nn
    >>> net = seqfuse.fuse(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval())
    >>> p = seqfuse.profile(net, torch.randn(2, 3, 8, 8), repeats=3)
    >>> [s.label for s in p.chains[0].stages]
    ['conv 3x3 3->8 6x6 +ReLU', 'flatten 288', 'linear 288->4']
    >>> p.forward_ms >= p.fused_ms - 1e-3 and p.outside_ms >= 0
    True
    """
    if example_input.device.type != "cpu":
        raise ValueError(f"seqfuse.profile times CPU calls; the input is on {example_input.device}")
    from .convert import _MAX_EXAMPLE_ROUNDS

    peak, bandwidth = machine_limits(dtype=example_input.dtype)
    with torch.no_grad():
        for _ in range(_MAX_EXAMPLE_ROUNDS):
            since = _C.engine_trial_clock()
            model(example_input)
            if not _C.engine_trials_pending(since):
                break
        _C.take_call_timings()
        walls: List[float] = []
        tails: List[float] = []
        per_forward: List[list] = []
        _C.set_stage_profile(True)
        try:
            for _ in range(max(repeats, 1)):
                t0 = time.monotonic_ns()  # the records' clock
                model(example_input)
                t1 = time.monotonic_ns()
                records = _C.take_call_timings()
                # The records' own making is the profile's cost, not the forward's.
                walls.append((t1 - t0 - sum(r["record_ns"] for r in records)) / 1e6)
                end = t0
                for r in records:  # the time outside fused calls before each call
                    r["before_ns"] = r["start_ns"] - end
                    end = r["start_ns"] + r["total_ns"] + r["record_ns"]
                tails.append((t1 - end) / 1e6)
                per_forward.append(records)
        finally:
            _C.set_stage_profile(False)
            _C.take_call_timings()

    where = _segments_by_plan(model)
    # Per segment (packed buffer), in first-call order: its records in each forward.
    order: List[int] = []
    by_plan: Dict[int, List[List[dict]]] = {}
    for k, records in enumerate(per_forward):
        for r in records:
            if r["plan"] not in by_plan:
                order.append(r["plan"])
                by_plan[r["plan"]] = [[] for _ in per_forward]
            by_plan[r["plan"]][k].append(r)

    result = ModelProfile(type(model).__name__, tuple(example_input.shape), torch.get_num_threads(), peak, bandwidth,
                          statistics.median(walls), tail_ms=max(statistics.median(tails), 0.0),
                          peak_name="bf16 product peak" if example_input.dtype == torch.bfloat16 else "FMA peak")
    for plan in order:
        forwards = [f for f in by_plan[plan] if f]
        first = forwards[0][0]
        names = CONV_ENGINE_NAMES if first["op"] == "conv" else ENGINE_NAMES
        label, _ = where.get(plan, (f"segment at 0x{plan:x}", first["op"]))
        chain = ChainProfile(
            where=label,
            op=first["op"],
            engine=names.get(first["engine"], str(first["engine"])),
            calls=len(forwards[0]),
            ms=statistics.median(sum(r["total_ns"] for r in f) for f in forwards) / 1e6,
            layout_ms=statistics.median(sum(r["layout_ns"] for r in f) for f in forwards) / 1e6,
            before_ms=max(statistics.median(sum(r["before_ns"] for r in f) for f in forwards) / 1e6, 0.0),
        )
        for i, text in enumerate(first["stages"]):
            macs = sum(r["macs"][i] for r in forwards[0])
            nbytes = sum(r["bytes"][i] for r in forwards[0])
            if first["ns"][i] < 0:
                chain.stages.append(StageProfile(text, None, macs, nbytes, "", None))
                continue
            ns = statistics.median(sum(r["ns"][i] for r in f) for f in forwards)
            bound, share = _roofline(macs, nbytes, max(ns, 1.0), peak, bandwidth)
            chain.stages.append(StageProfile(text, ns / 1e6, macs, nbytes, bound, share))
        result.chains.append(chain)
    return result
