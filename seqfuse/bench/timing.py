"""Interleaved A/B timing of several callables on one input.

The method:

1. warm-up: each callable runs a few times (this is where ``torch.compile``
   compiles and seqfuse packs its weights);
2. calibration: for each callable, the number of calls per timed batch
   (``inner``) is chosen so one batch lasts about ``target_s``;
3. rounds: in each round every callable times one batch, in an order rotated
   by one each round, so slow drifts of the machine (turbo, other processes)
   hit every callable alike; the per-call time of a batch is one sample.
   Before each batch the harness sleeps ``settle_s``: a runtime whose
   worker threads spin after a call (ONNX Runtime's thread pool does) must
   not take the next callable's cores, so each batch starts on an otherwise
   idle machine;
4. the reported time is the median sample. Each batch is bracketed by
   ``time.perf_counter()``, with the garbage collector off during the rounds.

Callers run all of this under ``torch.inference_mode()``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["Settings", "QUICK", "FULL", "warm_up", "calibrate", "interleaved", "summarize"]


@dataclass(frozen=True)
class Settings:
    """How hard to measure.

    Attributes:
        rounds: interleaved rounds (each callable gets one sample per round).
        min_rounds: rounds always run, even past ``budget_s``.
        target_s: wanted duration of one timed batch.
        warmup_calls: calls before calibration (at least).
        warmup_s: keep warming up until this much time has passed (or 1000 calls).
        budget_s: soft limit on the time spent in rounds for one case.
        settle_s: idle time before each timed batch (spinning worker threads
            of the previous batch's runtime wind down).
    """

    rounds: int = 15
    min_rounds: int = 5
    target_s: float = 0.02
    warmup_calls: int = 3
    warmup_s: float = 0.1
    budget_s: float = 20.0
    settle_s: float = 0.01

    def with_overrides(self, rounds: Optional[int] = None, target_ms: Optional[float] = None,
                       budget_s: Optional[float] = None) -> "Settings":
        """A copy with the given fields replaced (``None`` keeps a field).

        >>> FULL.with_overrides(rounds=3).rounds, FULL.with_overrides(rounds=3).min_rounds
        (3, 3)
        """
        kw = dict(self.__dict__)
        if rounds is not None:
            if rounds < 1:
                raise ValueError(f"repeats must be >= 1, got {rounds}")
            kw["rounds"] = int(rounds)
            kw["min_rounds"] = min(self.min_rounds, int(rounds))
        if target_ms is not None:
            kw["target_s"] = float(target_ms) / 1e3
        if budget_s is not None:
            kw["budget_s"] = float(budget_s)
        return Settings(**kw)


#: Default settings: batches of ~20 ms, 15 rounds.
FULL = Settings()
#: ``--quick``: batches of ~3 ms, 5 rounds, at most ~1.5 s of rounds per case.
QUICK = Settings(rounds=5, min_rounds=3, target_s=0.003, warmup_calls=2, warmup_s=0.02, budget_s=1.5, settle_s=0.005)


def _time_batch(fn: Callable, x, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    return time.perf_counter() - t0


def warm_up(fn: Callable, x, calls: int, min_s: float) -> None:
    """Calls ``fn(x)`` at least ``calls`` times, until ``min_s`` has passed
    (at most 1000 calls after the first ``calls``) and until no seqfuse
    engine choice these calls reach is still on trial (the first calls of a
    shape class time the engines, one per call: not a steady call's time)."""
    from seqfuse._loader import _C

    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    extra = 0
    while time.perf_counter() - t0 < min_s and extra < 1000:
        fn(x)
        extra += 1
    for _ in range(50):
        since = _C.engine_trial_clock()
        fn(x)
        if not _C.engine_trials_pending(since):
            break


def calibrate(fn: Callable, x, target_s: float, max_inner: int = 1_000_000) -> int:
    """Calls per timed batch so that a batch of ``fn(x)`` lasts about
    ``target_s`` (at least 1: a call longer than ``target_s`` is timed alone).

    >>> calibrate(lambda x: None, None, 1e-4) > 1
    True
    """
    n = 1
    while True:
        t = _time_batch(fn, x, n)
        if t >= target_s / 2 or n >= max_inner:
            break
        n = min(max_inner, max(2 * n, int(n * target_s / max(t, 1e-9))))
    per_call = t / n
    return max(1, min(max_inner, round(target_s / per_call) if per_call > 0 else max_inner))


def interleaved(fns: Mapping[str, Callable], x, inner: Mapping[str, int], settings: Settings) -> Dict[str, List[float]]:
    """Per-call times (seconds), one sample per round, for each callable in
    ``fns``; the order in which they run rotates by one every round.

    >>> s = interleaved({"a": abs, "b": abs}, -1, {"a": 10, "b": 10}, QUICK)
    >>> sorted(s), len(s["a"]) == len(s["b"]) >= QUICK.min_rounds
    (['a', 'b'], True)
    """
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for r in range(settings.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                n = inner[name]
                time.sleep(settings.settle_s)
                samples[name].append(_time_batch(fns[name], x, n) / n)
            if r + 1 >= settings.min_rounds and time.perf_counter() - start > settings.budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and relative spread (interquartile range / median) of samples.

    >>> summarize([1.0, 2.0, 3.0, 4.0, 100.0])["median"]
    3.0
    """
    xs = sorted(samples)
    med = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": med,
        "min": xs[0],
        "max": xs[-1],
        "spread": (q3 - q1) / med if med > 0 else math.nan,
    }
