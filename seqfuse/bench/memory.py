"""Peak resident memory of one peer, measured in a fresh subprocess.

The process-wide peak RSS only ever grows, so it cannot be measured for several
models in one process. Instead :func:`peak_rss` saves the modules to a
temporary file and starts ``python`` once per (case, peer). The child imports
torch and seqfuse, loads the modules, builds the peer and the input, and takes
its current RSS as the baseline; then it resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``; where that is unavailable it falls back to
``ru_maxrss``, which is then only an upper bound of the baseline), runs the
calls, and reports

* ``peak_rss_mib``: peak RSS during all calls minus the baseline. It includes
  first-call costs: seqfuse's weight packing and torch.compile's compilation.
* ``steady_rss_mib``: peak RSS during the calls after the first, minus the
  RSS right after the first call (the per-call working set), or ``None``
  where the peak counter cannot be reset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["peak_rss"]

_CHILD = "from seqfuse.bench.memory import _child_main; raise SystemExit(_child_main())"


def peak_rss(modules: List[nn.Module], input_shape: Sequence[int], dtype: torch.dtype, peer: str,
             threads: Optional[int] = None, calls: int = 5, timeout: float = 600.0,
             train: bool = False) -> Dict[str, object]:
    """Runs ``peer`` over ``modules`` in a fresh subprocess and returns
    ``{"peak_rss_mib": float, "steady_rss_mib": float | None, "method": str}``
    (or ``{"error": str}`` when the child fails)."""
    with tempfile.TemporaryDirectory(prefix="seqfuse-bench-") as tmp:
        path = os.path.join(tmp, "modules.pt")
        torch.save(modules, path)
        cmd = [sys.executable, "-c", _CHILD, "--modules", path, "--peer", peer,
               "--shape", ",".join(str(int(d)) for d in input_shape),
               "--dtype", str(dtype).replace("torch.", ""), "--calls", str(calls)]
        if threads:
            cmd += ["--threads", str(threads)]
        if train:
            cmd += ["--train"]
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the child --------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB elsewhere


def _child_main(argv: Optional[List[str]] = None) -> int:
    import gc

    from .peers import BuildContext, build_peer, build_training_step, peer_context

    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--train", action="store_true", help="time training steps (zero_grad + forward + backward)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    modules = torch.load(a.modules, weights_only=False)
    shape = [int(d) for d in a.shape.split(",")]
    with peer_context([a.peer]):
        x = torch.randn(shape).to(dtype)
        with BuildContext(x) as ctx:  # the ONNX peers export at x's shape
            model = build_training_step(a.peer, modules) if a.train else build_peer(a.peer, modules, ctx)
        gc.collect()
        resettable = _reset_peak() and _status_kib("VmRSS") is not None
        if resettable:
            base = _status_kib("VmRSS")
        else:
            base = _maxrss_kib()
        with contextlib.nullcontext() if a.train else torch.inference_mode():
            model(x)
            if resettable:
                first_peak = _status_kib("VmHWM")
                after_first = _status_kib("VmRSS")
                _reset_peak()
            for _ in range(max(0, a.calls - 1)):
                model(x)
        if resettable:
            later_peak = _status_kib("VmHWM")
            peak = max(first_peak, later_peak)
            steady = max(0, later_peak - after_first) / 1024
            method = "VmHWM after clear_refs"
        else:
            peak = _maxrss_kib()
            steady = None
            method = "ru_maxrss"
    print(json.dumps({"peak_rss_mib": max(0, peak - base) / 1024, "steady_rss_mib": steady, "method": method}))
    return 0
