"""Turns result dicts into the text table, JSON, CSV, a bar chart of the
ratios (optional, needs matplotlib), and a comparison with an earlier JSON run."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["header", "table", "footer", "to_json", "load_json", "to_csv", "compare", "plot_ratios",
           "MATPLOTLIB_MISSING"]

_PEER_ORDER = ("eager", "fused", "jit", "compile", "ort", "openvino")
_ABBREV = {"eager": "e", "fused": "f", "jit": "j", "compile": "c", "ort": "o", "openvino": "v"}


def _us(t: Optional[float]) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    if t < 10:
        return f"{t:.2f}"
    if t < 1000:
        return f"{t:.1f}"
    return f"{t:,.0f}"


def _ratio(r: Optional[float]) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def _peers_of(results: Sequence[dict]) -> List[str]:
    seen = {p for r in results for p in r["peers"]}
    return [p for p in _PEER_ORDER if p in seen] + sorted(seen - set(_PEER_ORDER))


def _peak(g: float) -> str:
    return f"{g:.1f}" if g < 100 else f"{g:.0f}"


def header(env: Dict[str, object], extra: str = "") -> str:
    """One line naming what the numbers depend on, with the FMA peak when it
    was measured (``fma_peak_gflops``).

    >>> header({"torch": "2.13.0", "seqfuse": "0.1.0", "cpu_capability": "avx2", "threads": 2, "dtype": "float32"})
    'seqfuse.bench | torch 2.13.0 | seqfuse 0.1.0 | cpu avx2 | threads 2 | float32'
    >>> header({"torch": "2.14.1", "seqfuse": "0.1.0", "cpu_capability": "avx2", "threads": 2, "dtype": "float32",
    ...         "fma_peak_gflops": 161.23})
    'seqfuse.bench | torch 2.14.1 | seqfuse 0.1.0 | cpu avx2 | threads 2 | float32 | FMA peak 161 GFLOP/s'
    """
    parts = [
        "seqfuse.bench",
        f"torch {env['torch']}",
        f"seqfuse {env['seqfuse']}",
        f"cpu {env['cpu_capability']}",
        f"threads {env['threads']}",
        str(env["dtype"]),
    ]
    peak = env.get("fma_peak_gflops")
    if peak:
        what = "bf16 product peak" if env["dtype"] == "bfloat16" else "FMA peak"
        parts.append(f"{what} {_peak(peak)} GFLOP/s")
    if extra:
        parts.append(extra)
    return " | ".join(parts)


def _notes(r: dict) -> str:
    notes = []
    for p, v in r.get("numerics", {}).items():
        if not v["ok"]:
            notes.append(f"! {p} output differs from eager (max abs err {v['max_abs_err']:.3g})")
    for p, precision in r.get("precision", {}).items():
        if r.get("dtype") != "float32":
            notes.append(f"{p} computed in {precision}")
    plan = r.get("fused_plan", "")
    if plan and not plan.endswith("0 eager segments"):
        notes.append(f"fused plan: {plan}")
    for p, e in r.get("errors", {}).items():
        notes.append(f"{p}: {e[:100]}")
    return "; ".join(notes)


def table(results: Sequence[dict]) -> str:
    """The aligned per-case table: times (median µs per call), ratios vs
    eager, the fused peer's GFLOP/s, every peer's share of the FMA peak when
    it was measured, run-to-run spread, and peak RSS when measured. A ``!``
    after the case name marks a numerics mismatch.

    >>> from seqfuse.bench import run
    >>> results = run(["policy_b1"], quick=True, repeats=2, target_ms=0.3)
    >>> table(results).splitlines()[0].split()[:4]
    ['case', 'eager', 'µs', 'fused']
    """
    peers = _peers_of(results)
    others = [p for p in peers if p != "eager"]
    has_mem = any("peak_rss_mib" in r for r in results)
    has_peak = any(r.get("peak_share") for r in results)
    abbrev = "/".join(_ABBREV.get(p, p) for p in peers)
    cols = ["case", "eager µs"]
    for p in others:
        cols += [f"{p} µs", "ratio" if p == "fused" else f"{p} ratio"]
    gflops_peer = "fused" if "fused" in peers else "eager"
    cols += ["GFLOP/s" if gflops_peer == "fused" else "eager GFLOP/s"]
    if has_peak:
        cols.append(f"% peak ({abbrev})")
    cols.append("IQR%")
    if has_mem:
        cols.append(f"peak RSS MiB ({abbrev})")
    cols.append("notes")

    rows = []
    for r in results:
        name = r["case"] + (" !" if not r.get("numerics_ok", True) else "")
        row = [name, _us(r["time_us"].get("eager"))]
        for p in others:
            row += [_us(r["time_us"].get(p)), _ratio(r["ratio"].get(p))]
        g = r["gflops"].get(gflops_peer)
        row.append("-" if g is None or not math.isfinite(g) else (f"{g:.1f}" if g < 100 else f"{g:.0f}"))
        if has_peak:
            share = r.get("peak_share", {})
            row.append("/".join(_percent(share.get(p)) for p in peers) if share else "-")
        spreads = [s for s in r.get("spread", {}).values() if s is not None and math.isfinite(s)]
        row.append(f"{100 * max(spreads):.0f}" if spreads else "-")
        if has_mem:
            mem = r.get("peak_rss_mib", {})
            row.append("/".join("-" if mem.get(p) is None else f"{mem[p]:.1f}" for p in peers) if mem else "-")
        row.append(_notes(r))
        rows.append(row)

    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    def fmt(cells):
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            if i == 0 or i == len(cells) - 1:
                out.append(c.ljust(w))
            else:
                out.append(c.rjust(w))
        return "  ".join(out).rstrip()
    lines = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    return "\n".join(lines)


def _percent(share: Optional[float]) -> str:
    """A share of the peak in percent, with a decimal below 10%: small models
    reach a few percent, and 0.4% and 0.9% are worth telling apart."""
    if share is None or not math.isfinite(share):
        return "-"
    pct = 100 * share
    return f"{pct:.1f}" if pct < 10 else f"{pct:.0f}"


def footer(results: Sequence[dict]) -> str:
    """The legend printed under the table."""
    rounds = sorted({r["rounds"] for r in results})
    lines = [
        f"µs: median per-call time over {'/'.join(map(str, rounds))} interleaved rounds; "
        "ratio: eager µs / peer µs (> 1 means faster than eager).",
        "GFLOP/s: Linear and convolution multiply-adds x 2 / fused time; "
        "IQR%: largest interquartile range / median of the samples among the peers.",
    ]
    peaks = sorted({r["fma_peak_gflops"] for r in results if r.get("fma_peak_gflops")})
    if peaks and any(r.get("dtype") == "bfloat16" for r in results):
        lines.append(f"% peak: each peer's GFLOP/s (same FLOP count) as a share of the bfloat16 product peak "
                     f"measured in this run, {'/'.join(_peak(p) for p in peaks)} GFLOP/s with the run's threads "
                     "(independent vdpbf16ps chains where the CPU has AVX512-BF16, else float32 FMA chains).")
    elif peaks:
        lines.append(f"% peak: each peer's GFLOP/s (same FLOP count) as a share of the float32 FMA peak measured "
                     f"in this run, {'/'.join(_peak(p) for p in peaks)} GFLOP/s with the run's threads "
                     "(independent FMA chains on the widest vectors, no memory traffic).")
    if any(r.get("flops_counted") == "flop_counter" for r in results):
        lines.append("model cases (zoo_*, --model): GFLOP/s from the matmul and convolution FLOPs that "
                     "torch.utils.flop_counter counts in one eager forward.")
    if any("peak_rss_mib" in r for r in results):
        lines.append("peak RSS MiB: peak resident-memory increase over model construction, "
                     "fresh subprocess per peer; includes packing/compilation on the first call.")
    if any(not r.get("numerics_ok", True) for r in results):
        lines.append("!: a peer's output does not match eager within the dtype's tolerance (see notes).")
    return "\n".join(lines)


def to_json(results: Sequence[dict], env: Dict[str, object], settings: Optional[dict] = None) -> str:
    """The document ``--json`` writes and ``--compare`` reads."""
    return json.dumps({"meta": {**env, **(settings or {})}, "results": list(results)}, indent=1, allow_nan=True)


def load_json(path: str) -> Tuple[dict, List[dict]]:
    """(meta, results) from a file written by :func:`to_json` (a bare list of results is accepted too)."""
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, list):
        return {}, doc
    return doc.get("meta", {}), doc["results"]


def to_csv(results: Sequence[dict]) -> str:
    """One flat row per case: ``<peer>_us``, ``<peer>_ratio``, ``<peer>_gflops`` ... columns.

    >>> print(to_csv([]).strip())
    case,description,input_shape,dtype,threads,rounds,flops,fma_peak_gflops,numerics_ok,fused_plan,errors
    """
    peers = _peers_of(results)
    fields = ["case", "description", "input_shape", "dtype", "threads", "rounds", "flops", "fma_peak_gflops"]
    for p in peers:
        fields += [f"{p}_us", f"{p}_min_us", f"{p}_spread", f"{p}_gflops", f"{p}_peak_share", f"{p}_inner"]
        if p != "eager":
            fields += [f"{p}_ratio", f"{p}_ratio_paired", f"{p}_numerics_ok", f"{p}_max_abs_err"]
        if any("peak_rss_mib" in r for r in results):
            fields.append(f"{p}_peak_rss_mib")
    fields += ["numerics_ok", "fused_plan", "errors"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in results:
        row = {k: r.get(k) for k in ("case", "description", "dtype", "threads", "rounds", "flops", "fma_peak_gflops",
                                     "numerics_ok")}
        row["input_shape"] = "x".join(map(str, r["input_shape"]))
        row["fused_plan"] = r.get("fused_plan", "")
        row["errors"] = "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items())
        for p in peers:
            row[f"{p}_us"] = r["time_us"].get(p)
            row[f"{p}_min_us"] = r["min_us"].get(p)
            row[f"{p}_spread"] = r["spread"].get(p)
            row[f"{p}_gflops"] = r["gflops"].get(p)
            row[f"{p}_peak_share"] = r.get("peak_share", {}).get(p)
            row[f"{p}_inner"] = r["inner"].get(p)
            if p != "eager":
                num = r.get("numerics", {}).get(p, {})
                row[f"{p}_ratio"] = r["ratio"].get(p)
                row[f"{p}_ratio_paired"] = r.get("ratio_paired", {}).get(p)
                row[f"{p}_numerics_ok"] = num.get("ok")
                row[f"{p}_max_abs_err"] = num.get("max_abs_err")
            if f"{p}_peak_rss_mib" in fields:
                row[f"{p}_peak_rss_mib"] = r.get("peak_rss_mib", {}).get(p)
        w.writerow(row)
    return buf.getvalue()


def compare(old_meta: dict, old: Sequence[dict], new_meta: dict, new: Sequence[dict],
            tolerance: float = 0.15) -> Tuple[str, bool]:
    """Per-case ratio changes from ``old`` to ``new``. Returns the text and
    whether any **fused** ratio fell by more than ``tolerance`` (a fraction:
    0.15 flags new < 0.85 * old). Other peers' changes are shown, not judged.
    Cases are matched by name; a different dtype or input shape is reported
    as not comparable.

    >>> r = lambda x: {"case": "c", "dtype": "float32", "input_shape": [1, 4], "ratio": {"fused": x}}
    >>> text, regressed = compare({}, [r(2.0)], {}, [r(1.5)], tolerance=0.15)
    >>> regressed, "REGRESSED" in text
    (True, True)
    >>> compare({}, [r(2.0)], {}, [r(1.9)])[1]
    False
    """
    lines = []
    for key in ("torch", "seqfuse", "cpu_capability", "threads", "dtype", "hostname"):
        a, b = old_meta.get(key), new_meta.get(key)
        if a is not None and b is not None and a != b:
            lines.append(f"note: {key} differs: old {a}, new {b}")
    old_by = {r["case"]: r for r in old}
    rows = [["case", "peer", "old ratio", "new ratio", "change", "status"]]
    regressed = False
    for r in new:
        o = old_by.get(r["case"])
        if o is None:
            rows.append([r["case"], "-", "-", "-", "-", "not in old run"])
            continue
        if o.get("dtype") != r.get("dtype") or list(o.get("input_shape", [])) != list(r.get("input_shape", [])):
            rows.append([r["case"], "-", "-", "-", "-", "not comparable (dtype/shape differ)"])
            continue
        for p, new_ratio in r["ratio"].items():
            old_ratio = o.get("ratio", {}).get(p)
            if old_ratio is None:
                rows.append([r["case"], p, "-", _ratio(new_ratio), "-", "not in old run"])
                continue
            change = new_ratio / old_ratio - 1
            if p == "fused" and change < -tolerance:
                status, regressed = "REGRESSED", True
            elif p == "fused":
                status = "improved" if change > tolerance else "ok"
            else:
                status = "(not judged)"
            rows.append([r["case"], p, _ratio(old_ratio), _ratio(new_ratio), f"{100 * change:+.1f}%", status])
    for name in old_by:
        if name not in {r["case"] for r in new}:
            rows.append([name, "-", "-", "-", "-", "not run now"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    verdict = (f"REGRESSION: a fused ratio fell by more than {100 * tolerance:.0f}%" if regressed
               else f"no fused ratio fell by more than {100 * tolerance:.0f}%")
    lines.append(verdict)
    return "\n".join(lines), regressed


#: The message of the ImportError :func:`plot_ratios` raises without matplotlib.
MATPLOTLIB_MISSING = ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                      "(or pip install 'seqfuse[plot]')")


def plot_ratios(results: Sequence[dict], path: str, title: str = "") -> None:
    """Writes a bar chart of every case's ratios (eager µs / peer µs, one bar
    per non-eager peer, a line at 1.0) to ``path`` (the format follows the
    extension: .png, .svg, .pdf ...). matplotlib is an optional dependency:
    without it this raises ImportError with :data:`MATPLOTLIB_MISSING`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None

    peers = [p for p in _peers_of(results) if p != "eager"]
    names = [r["case"] + (" !" if not r.get("numerics_ok", True) else "") for r in results]
    fig = Figure(figsize=(max(6.5, 0.9 * len(results) * max(1, len(peers)) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(peers))
    for j, p in enumerate(peers):
        xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(results))]
        ys = [r["ratio"].get(p) for r in results]
        ys = [y if y is not None and math.isfinite(y) else 0.0 for y in ys]
        bars = ax.bar(xs, ys, width, label=p)
        ax.bar_label(bars, labels=[f"{y:.2f}x" if y else "-" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("eager µs / peer µs  (> 1: faster than eager)")
    title = title or "seqfuse.bench: speed-up over eager"
    if len(title) > 60 and " | " in title:  # two lines rather than a clipped one
        parts = title.split(" | ")
        half = (len(parts) + 1) // 2
        title = " | ".join(parts[:half]) + "\n" + " | ".join(parts[half:])
    ax.set_title(title, fontsize=9)
    if peers:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
