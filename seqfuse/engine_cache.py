"""Engine choices persisted per machine, so a first call does not measure.

For calls big enough that it matters, the first calls of each shape class
time the engines a fused call can run on (the fused kernels, ATen's GEMM or
convolution + the fused epilogue, ...), one engine per call, and keep the
fastest (csrc/runtime/engine_choice.h). Those choices depend on the machine, not on
the model: they are saved to a file and read back by the next process, whose
first calls then cost what later ones do (plus tracing and weight packing).

* Where: ``$SEQFUSE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/seqfuse`` or
  ``~/.cache/seqfuse``. ``SEQFUSE_CACHE_DIR=""`` (or ``off``) disables it.
* One file per machine fingerprint: CPU model, the kernels' ISA, the number of
  CPUs, seqfuse's and torch's versions, the engines the build has. A change of any of them reads another
  file (and so measures again); the thread count is part of each choice.
* When: read once at import; written at interpreter exit, after
  ``fuse(..., example_inputs=...)``, and by :func:`save`, only when new choices
  were made. A write merges with the file under an exclusive lock and replaces
  it atomically, so concurrent processes never leave a torn file; a file that
  cannot be read (corrupt, another format) is ignored and rewritten.
* :func:`clear` forgets the choices in this process and deletes the file.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import List, Optional

import torch

from ._loader import _C

__all__ = ["cache_dir", "cache_file", "load", "save", "clear"]

_FORMAT = 1
_saved_generation: Optional[int] = None  # the choices' generation when last read or written


def cache_dir() -> Optional[Path]:
    """The folder of the cache, or None when it is disabled."""
    env = os.environ.get("SEQFUSE_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqfuse"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> str:
    """What the choices depend on besides the shapes and the thread count."""
    from . import __version__

    # The engines this build has: a choice made among fewer is no choice once one is added.
    engines = sorted(dict(_C.vocabulary()["engines"]).items())
    facts = [_cpu_model(), _C.detected_cpu_capability(), str(os.cpu_count()), __version__, torch.__version__,
             repr(engines)]
    return hashlib.sha1("|".join(facts).encode()).hexdigest()[:16]


def cache_file() -> Optional[Path]:
    """This machine's file in the cache, or None when the cache is disabled."""
    d = cache_dir()
    return None if d is None else d / f"engines-{fingerprint()}.json"


def _read(path: Path) -> List[list]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT or data.get("fingerprint") != fingerprint():
            return []
        return [e for e in data["choices"] if _valid(e)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # missing, torn or foreign: as if empty


def _valid(e) -> bool:
    return (isinstance(e, list) and len(e) == 6 and isinstance(e[0], int) and isinstance(e[1], str)
            and isinstance(e[2], list) and all(isinstance(v, int) for v in e[2])
            and all(isinstance(v, int) for v in e[3:]))


def load() -> int:
    """Reads this machine's choices into the process (keeping any it made
    itself). Returns how many were read."""
    global _saved_generation
    path = cache_file()
    if path is None:
        return 0
    known = {(op, dev, tuple(shape), b, t) for op, dev, shape, b, t, _ in _C.engine_choices()}
    n = 0
    for op, dev, shape, bucket, threads, engine in _read(path):
        if (op, dev, tuple(shape), bucket, threads) not in known:
            try:
                _C.set_engine_choice(op, dev, shape, bucket, threads, engine)
                n += 1
            except (ValueError, RuntimeError):
                pass  # an engine or device this build does not have
    _saved_generation = _C.engine_choices_generation()
    return n


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on the cache folder (where the platform has flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save(force: bool = False) -> Optional[Path]:
    """Merges this process's choices into the file (if it made new ones, or
    with ``force``). Never raises: a cache that cannot be written only costs
    measurements. Returns the file written, or None."""
    global _saved_generation
    path = cache_file()
    generation = _C.engine_choices_generation()
    if path is None or (not force and generation == _saved_generation):
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            merged = {(op, dev, tuple(shape), b, t): e for op, dev, shape, b, t, e in _read(path)}
            for op, dev, shape, b, t, e in _C.engine_choices():
                merged[(op, dev, tuple(shape), b, t)] = e
            data = {"format": _FORMAT, "fingerprint": fingerprint(),
                    "choices": [[op, dev, list(shape), b, t, e] for (op, dev, shape, b, t), e in sorted(merged.items())]}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".engines-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError:
        return None
    _saved_generation = generation
    return path


def clear() -> None:
    """Forgets every engine choice in this process and deletes this machine's file."""
    global _saved_generation
    _C.clear_engine_choices()
    _saved_generation = _C.engine_choices_generation()
    path = cache_file()
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _load_at_import() -> None:
    try:
        load()
    except Exception:  # a cache is an optimization: never a reason for import to fail
        pass


_load_at_import()
atexit.register(save)
