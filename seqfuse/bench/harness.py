"""Runs cases: builds the peers, checks their numerics against eager, times
them interleaved (see :mod:`seqfuse.bench.timing`) and returns one result dict
per case. :func:`run` is the entry point of both the CLI and the tests.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

import seqfuse

from . import memory, timing
from .cases import Case, layer_flops, select_cases
from .peers import TRAINING_PEERS, BuildContext, build_peer, build_training_step, parse_peers, peer_context

__all__ = ["run", "run_case", "time_alone", "materialize", "parse_dtype", "environment", "fma_peak", "model_flops", "Progress", "TOLERANCES"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

#: (rtol, atol) per dtype for the check against eager; atol is scaled by the
#: largest magnitude of eager's output (when that exceeds 1).
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
    torch.bfloat16: (5e-2, 5e-2),  # loose: bf16 rounding differs with accumulation order
}


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``'float32'``, ``'bfloat16'``, ``'float64'`` (or the torch dtype itself) -> torch dtype.

    >>> parse_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in TOLERANCES:
            raise ValueError(f"unsupported dtype {dtype}; choose from {', '.join(_DTYPES)}")
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {', '.join(_DTYPES)}") from None


def environment(dtype: torch.dtype, threads: Optional[int] = None,
                fma_peak_gflops: Optional[float] = None) -> Dict[str, object]:
    """What the numbers depend on: versions, kernel ISA, threads, dtype, and
    the FMA peak measured in the run (``fma_peak_gflops``, see :func:`fma_peak`;
    ``None`` when not measured).

    >>> sorted(environment(torch.float32))[:4]
    ['cpu_capability', 'dtype', 'fma_peak_gflops', 'hostname']
    """
    import platform

    return {
        "torch": torch.__version__,
        "seqfuse": seqfuse.__version__,
        "cpu_capability": seqfuse.ops.cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "machine": platform.machine(),
        "fma_peak_gflops": fma_peak_gflops,
    }


def fma_peak(threads: Optional[int] = None, seconds: float = 0.2, dtype: torch.dtype = torch.float32) -> Optional[float]:
    """This machine's float32 multiply-add peak in GFLOP/s with ``threads``
    threads busy (default ``torch.get_num_threads()``), measured now by a
    short C++ loop (``seqfuse._C.fma_peak_gflops``: independent FMA chains on
    the widest vectors the CPU has, one loop per thread, ~``seconds``). It is
    the ceiling of every peer's GFLOP/s; measuring it in the same run as the
    peers, rather than quoting a datasheet, makes the share of it mean the
    same on a throttled or shared machine. ``None`` when the extension was
    built without it. For ``torch.bfloat16`` the peak of the bfloat16
    products (``vdpbf16ps``, twice the float32 FMA's rate, on CPUs with
    AVX512-BF16; else the float32 FMA peak the widened products run at).

    >>> fma_peak(1, seconds=0.01) > 0
    True
    """
    measure = getattr(seqfuse._C, "fma_peak_gflops", None)
    if measure is None:
        return None
    return float(measure(int(threads or torch.get_num_threads()), float(seconds), dtype == torch.bfloat16))


class Progress:
    """A one-line status on stderr: overwritten with ``\\r`` on a terminal; on
    anything else only ``major`` updates are printed, one per line."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def update(self, text: str, major: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self.stream.flush()
        elif major:
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _flat_output(out) -> torch.Tensor:
    """A model's output as one flat tensor (tuples, lists, dicts of tensors concatenated)."""
    if isinstance(out, torch.Tensor):
        return out
    from torch.utils._pytree import tree_leaves

    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().reshape(-1) for t in leaves]) if leaves else torch.empty(0)


def _check(out, ref, dtype: torch.dtype) -> Dict[str, object]:
    rtol, atol = TOLERANCES[dtype]
    ref64, out64 = _flat_output(ref).detach().double(), _flat_output(out).detach().double()
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    err = float((out64 - ref64).abs().max()) if ref64.numel() and out64.shape == ref64.shape else float("inf")
    try:
        torch.testing.assert_close(out64, ref64, rtol=rtol, atol=atol * scale)
    except AssertionError as e:
        return {"ok": False, "max_abs_err": err, "message": str(e).strip().splitlines()[0]}
    return {"ok": True, "max_abs_err": err, "message": ""}


def _fused_plan(model: nn.Module) -> str:
    """``"F fused / E eager segments"``, summed over every FusedSequential in
    ``model`` (for a module-list case: the one FusedSequential)."""
    if isinstance(model, seqfuse.FusedSequential):
        containers = [model]
    else:
        containers = [m for m in model.modules() if isinstance(m, seqfuse.FusedSequential)]
    if not containers:
        return "no FusedSequential in the model"
    expls = [m.explain() for m in containers]
    n_f = sum(len(e.fused_segments) for e in expls)
    n_e = sum(len(e.eager_segments) for e in expls)
    return f"{n_f} fused / {n_e} eager segments"


def model_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward of ``model`` on ``x``, as
    ``torch.utils.flop_counter`` counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


def materialize(case: Case, dtype: torch.dtype, seed: int = 0):
    """(modules or model, input) of a case as every peer gets them: weights
    drawn from ``seed`` (the caller's RNG state kept), the input from
    ``seed + 1``, both in ``dtype``, the modules in the case's mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = case.build()
        if isinstance(built, nn.Module):  # a whole-model case
            modules = built.train(case.train).to(dtype)
        else:
            modules = [m.train(case.train).to(dtype) for m in built]
        x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return modules, x


def run_case(case: Case, peers: Sequence[str] = ("eager", "fused"), dtype: torch.dtype = torch.float32,
             settings: timing.Settings = timing.FULL, memory_probe: bool = False, seed: int = 0,
             check: bool = True, progress: Optional[Progress] = None, label: str = "",
             peak_gflops: Optional[float] = None) -> Dict[str, object]:
    """Measures one case (already resolved: batch applied) and returns its
    result dict; see :func:`run` for the keys. Call it under the thread
    setting you want; it enters ``torch.inference_mode()`` itself.
    ``peak_gflops`` (:func:`fma_peak`), when given, is recorded and each
    peer's GFLOP/s is expressed as a share of it (``peak_share``).

    >>> from seqfuse.bench import get_case, timing
    >>> r = run_case(get_case("policy_b1"), settings=timing.Settings(target_s=0.0005, rounds=2, warmup_s=0.0))
    >>> sorted(r["time_us"]), r["numerics_ok"]
    (['eager', 'fused'], True)
    """
    peers = parse_peers(peers)
    dtype = parse_dtype(dtype)
    progress = progress or Progress(False)
    say = lambda what, major=False: progress.update(f"{label}{case.name} {what} ...", major)  # noqa: E731

    modules, x = materialize(case, dtype, seed)

    if isinstance(modules, nn.Module):
        flops, flops_counted = model_flops(modules, x), "flop_counter"
    else:
        flops, flops_counted = layer_flops(modules, case.input_shape), "layers"
    if case.train:  # forward + the backward's two products per layer
        flops, flops_counted = 3 * flops, flops_counted + " x3 (training step)"
        dropped = [p for p in parse_peers(peers) if p not in TRAINING_PEERS]
        peers = [p for p in parse_peers(peers) if p in TRAINING_PEERS]
    result: Dict[str, object] = {
        "case": case.name,
        "description": case.description,
        "train": case.train,
        "input_shape": list(case.input_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "peers": list(peers),
        "flops": flops,
        "flops_counted": flops_counted,
        "time_us": {},
        "min_us": {},
        "spread": {},
        "ratio": {},
        "ratio_paired": {},
        "gflops": {},
        "fma_peak_gflops": peak_gflops,
        "peak_share": {},
        "inner": {},
        "rounds": 0,
        "numerics": {},
        "numerics_ok": True,
        "errors": {},
    }

    fns: Dict[str, Callable] = {}
    with peer_context(peers):
        say("(" + ",".join(peers) + ")", major=True)
        with BuildContext(x) as build:  # the ONNX peers share one export of the eager model
            for p in peers:
                say(f"{p} build")
                try:
                    fns[p] = build_training_step(p, modules) if case.train else build_peer(p, modules, build)
                except Exception as e:  # a peer that cannot be built is reported, not fatal
                    if p == "eager":
                        raise
                    result["errors"][p] = f"build failed: {type(e).__name__}: {e}"
        if case.train:
            for p in dropped:
                result["errors"][p] = "not timed: training cases time eager and fused only"
        if "fused" in fns:
            result["fused_plan"] = _fused_plan(fns["fused"].model if case.train else fns["fused"])
        # The inference precision a runtime chose (OpenVINO's default, in bfloat16 cases).
        result["precision"] = {p: fn.precision for p, fn in fns.items() if getattr(fn, "precision", None)}

        with contextlib.nullcontext() if case.train else torch.inference_mode():
            # Warm-up first (compilation, weight packing), then the numerics check.
            for p in list(fns):
                say(f"{p} warm-up")
                try:
                    timing.warm_up(fns[p], x, settings.warmup_calls, settings.warmup_s)
                except Exception as e:
                    if p == "eager":
                        raise
                    result["errors"][p] = f"call failed: {type(e).__name__}: {e}"
                    del fns[p]
            if check:
                say("numerics")
                ref = fns["eager"](x)
                for p in fns:
                    if p != "eager":
                        result["numerics"][p] = _check(fns[p](x), ref, dtype)
                result["numerics_ok"] = all(v["ok"] for v in result["numerics"].values())

            inner = {}
            for p in fns:
                say(f"{p} calibrate")
                inner[p] = timing.calibrate(fns[p], x, settings.target_s)
            say("timing " + ",".join(fns))
            samples = timing.interleaved(fns, x, inner, settings)

    result["inner"] = inner
    result["rounds"] = len(samples["eager"])
    stats = {p: timing.summarize(s) for p, s in samples.items()}
    eager_t = stats["eager"]["median"]
    for p, st in stats.items():
        result["time_us"][p] = st["median"] * 1e6
        result["min_us"][p] = st["min"] * 1e6
        result["spread"][p] = st["spread"]
        result["gflops"][p] = flops / st["median"] / 1e9 if st["median"] > 0 else float("nan")
        if peak_gflops:
            result["peak_share"][p] = result["gflops"][p] / peak_gflops
        if p != "eager":
            result["ratio"][p] = eager_t / st["median"]
            paired = sorted(e / t for e, t in zip(samples["eager"], samples[p]))
            result["ratio_paired"][p] = paired[len(paired) // 2] if len(paired) % 2 else (
                (paired[len(paired) // 2 - 1] + paired[len(paired) // 2]) / 2)
    result["samples_us"] = {p: [t * 1e6 for t in s] for p, s in samples.items()}

    if memory_probe:
        result["peak_rss_mib"] = {}
        result["steady_rss_mib"] = {}
        for p in fns:
            say(f"{p} memory (subprocess)")
            m = memory.peak_rss(modules, case.input_shape, dtype, p, threads=torch.get_num_threads(),
                                train=case.train)
            if "error" in m:
                result["errors"][f"{p}_memory"] = m["error"]
                result["peak_rss_mib"][p] = None
                result["steady_rss_mib"][p] = None
            else:
                result["peak_rss_mib"][p] = m["peak_rss_mib"]
                result["steady_rss_mib"][p] = m["steady_rss_mib"]
                result["memory_method"] = m["method"]
    return result


def time_alone(case: Case, peer: str, dtype: torch.dtype = torch.float32,
               settings: timing.Settings = timing.FULL, seed: int = 0) -> float:
    """Median per-call time (µs) of one peer of ``case``, built and timed
    with nothing else running: the same weights, input, warm-up, calibration
    and rounds as :func:`run_case`, without the other peers between its
    batches. ``benchmarks/peers_alone.py`` runs it in a fresh process per
    peer to check the interleaved ratios against.

    >>> from seqfuse.bench import get_case
    >>> time_alone(get_case("policy_b1"), "fused", settings=timing.Settings(target_s=0.0005, rounds=2, warmup_s=0.0)) > 0
    True
    """
    modules, x = materialize(case, parse_dtype(dtype), seed)
    with peer_context([peer]), BuildContext(x) as build:
        fn = build_peer(peer, modules, build)
        with torch.inference_mode():
            timing.warm_up(fn, x, settings.warmup_calls, settings.warmup_s)
            inner = timing.calibrate(fn, x, settings.target_s)
            samples = timing.interleaved({peer: fn}, x, {peer: inner}, settings)[peer]
    return timing.summarize(samples)["median"] * 1e6


def run(cases: Optional[Iterable[Union[str, Case]]] = None, peers: Union[str, Sequence[str]] = ("eager", "fused"),
        dtype: Union[str, torch.dtype] = torch.float32, threads: Optional[int] = None, quick: bool = False,
        repeats: Optional[int] = None, batch: Optional[int] = None, memory: bool = False,
        target_ms: Optional[float] = None, budget_s: Optional[float] = None, seed: int = 0,
        check: bool = True, progress: bool = False, peak: bool = True) -> List[Dict[str, object]]:
    """Benchmarks ``cases`` (names, comma lists or :class:`Case` objects;
    ``None``: all registered cases) and returns one dict per case.

    Args:
        peers: which implementations to time; ``eager`` is always included.
            ``fused``, ``jit`` and ``compile`` (slow to build) are the others.
        dtype: ``float32``, ``bfloat16`` or ``float64``; model and input are converted.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
        quick: short batches and few rounds (see :data:`timing.QUICK`).
        repeats: number of interleaved rounds (overrides the quick/full default).
        batch: replaces dimension 0 of every case's input shape.
        memory: also measure peak RSS per peer, in a fresh subprocess each.
        target_ms, budget_s: override the timed-batch duration and the per-case
            soft time limit of the rounds.
        seed: weights and input are drawn from this seed (the caller's RNG state is kept).
        check: compare every peer's output with eager's before timing.
        progress: print a progress line to stderr.
        peak: measure the machine's FMA peak (:func:`fma_peak`, ~0.2 s) once,
            with the run's threads, before the cases.

    Each dict has ``case``, ``description``, ``input_shape``, ``dtype``,
    ``threads``, ``peers``, ``flops`` (per call: 2*in*out per Linear per row
    and 2*N*OH*OW*Cout*Cin/groups*KH*KW per convolution for a module list; for a model case what ``torch.utils.flop_counter``
    counts, see ``flops_counted``), and per peer (dicts keyed by
    peer name): ``time_us`` (median per-call time), ``min_us``, ``spread``
    (interquartile range / median), ``gflops``, ``inner`` (calls per timed
    batch); for non-eager peers ``ratio`` (eager median / peer median),
    ``ratio_paired`` (median of per-round ratios) and ``numerics`` (``ok``,
    ``max_abs_err``, ``message``); ``fma_peak_gflops`` (the peak measured
    for the run, or ``None``) and ``peak_share`` (per peer: GFLOP/s / peak);
    ``numerics_ok`` (all peers), ``rounds``,
    ``samples_us``, ``errors`` (peers that failed to build or run),
    ``fused_plan``, and with ``memory`` ``peak_rss_mib`` / ``steady_rss_mib``.

    >>> [r] = run(["policy_b1"], quick=True, repeats=2, target_ms=0.5)
    >>> r["case"], sorted(r["time_us"]), r["numerics_ok"], r["ratio"]["fused"] > 0
    ('policy_b1', ['eager', 'fused'], True, True)
    """
    peer_names = parse_peers(peers)
    dt = parse_dtype(dtype)
    if isinstance(cases, (str, Case)):
        cases = [cases]
    cases = list(cases or [])
    case_list = [c for item in cases for c in ([item] if isinstance(item, Case) else select_cases([item]))]
    case_list = [c.with_batch(batch) for c in (case_list or select_cases())]
    settings = (timing.QUICK if quick else timing.FULL).with_overrides(repeats, target_ms, budget_s)
    bar = Progress(progress)

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    results = []
    try:
        peak_gflops = None
        if peak:
            bar.update("measuring the FMA peak ...", major=True)
            peak_gflops = fma_peak(torch.get_num_threads(), dtype=dt)  # bfloat16: the bfloat16 products' peak
        for i, case in enumerate(case_list, 1):
            t0 = time.perf_counter()
            res = run_case(case, peer_names, dt, settings, memory_probe=memory, seed=seed, check=check,
                           progress=bar, label=f"[{i}/{len(case_list)}] ", peak_gflops=peak_gflops)
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
    finally:
        bar.clear()
        if threads:
            torch.set_num_threads(old_threads)
    return results
