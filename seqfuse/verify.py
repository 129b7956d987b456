"""Checks of the fused kernels against eager, for devices whose kernels no
recorded run of the test suite has confirmed.

The CUDA kernels are built and tested on CPUs (an emulation of the GPU's
threads runs their device code in the C++ tests), but a GPU run is what
confirms them. Until the README records one, each fused segment's first call
on a CUDA tensor, for each shape class (the batch size bucketed by powers of
two, the other dimensions exactly), also runs the segment's modules eagerly
and compares the two outputs with the test suite's numerics rule
(:func:`mismatch`). On a mismatch, a :class:`~seqfuse.SeqfuseWarning` names the
segment, the input and the error, the call returns eager's result, and that
segment runs eagerly from then on (a rebuilt plan remembers it). In training,
the fused forward is checked the same way, the eager run on copies of the
modules (so BatchNorm running statistics are updated once, by the fused call;
after a mismatch they are restored and eager's call updates them). While a CUDA graph
is being captured nothing is compared (a comparison synchronizes): a segment
that failed a check still runs eagerly, an unchecked one runs fused.

:func:`set_kernel_check` (or the ``SEQFUSE_KERNEL_CHECK`` environment
variable, read at import) chooses per device type: ``"first"`` (the default on
CUDA), ``"always"`` (every call: slow, for debugging) or ``"off"`` (the default
on the CPU, whose kernels the test suite confirms on every run).

>>> import seqfuse
>>> seqfuse.verify.kernel_check("cuda"), seqfuse.verify.kernel_check("cpu")
('first', 'off')
"""

import copy
import os
import threading
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

MODES = ("off", "first", "always")

_DEFAULTS = {"cuda": "first"}


def _initial_modes() -> Dict[str, str]:
    modes = dict(_DEFAULTS)
    env = os.environ.get("SEQFUSE_KERNEL_CHECK")
    if env:
        if env not in MODES:
            raise ValueError(f"SEQFUSE_KERNEL_CHECK={env!r}: expected one of {', '.join(MODES)}")
        modes["cuda"] = env
    return modes


_modes: Dict[str, str] = _initial_modes()


def set_kernel_check(mode: str, device_type: str = "cuda") -> None:
    """Sets how fused calls on ``device_type`` tensors are checked against
    eager: ``"off"``, ``"first"`` (each segment's first call per shape class)
    or ``"always"``. Takes effect for plans built afterwards
    (``FusedSequential.invalidate_plan()`` rebuilds an existing one)."""
    if mode not in MODES:
        raise ValueError(f"unknown kernel check mode {mode!r}: expected one of {', '.join(MODES)}")
    _modes[str(device_type)] = mode


def kernel_check(device_type: str) -> str:
    """The check mode of fused calls on ``device_type`` tensors."""
    return _modes.get(device_type, "off")


def shape_class(x: torch.Tensor) -> Tuple:
    """The shape class a check covers: the leading (batch) size bucketed by
    powers of two, the other sizes exactly, and the dtype."""
    lead = x.shape[0] if x.dim() else 1
    return (int(lead).bit_length(), tuple(x.shape[1:]), x.dtype)


def _reference(modules: Sequence[nn.Module], x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The segment evaluated in a wider dtype (on copies of its modules)."""
    mods = [copy.deepcopy(m).to(dtype) for m in modules]
    with torch.no_grad():
        y = x.to(dtype)
        for m in mods:
            y = m(y)
        return y


def mismatch(fused: torch.Tensor, eager: torch.Tensor, modules: Sequence[nn.Module], x: torch.Tensor) -> Optional[str]:
    """None when ``fused`` matches ``eager`` (the segment ``modules`` applied to
    ``x``) by the test suite's numerics rule, else what differs:

    - float64: ``assert_close`` with rtol = atol = 1e-7;
    - float32: ``assert_close`` defaults, or, where summation order and
      BatchNorm folding round differently in a deep chain, no further from a
      float64 reference than twice eager's own error (+1e-6 of the output's scale);
    - bfloat16 / float16: no further from a float32 reference than twice
      eager's own error in that dtype, with 1e-2 of the output's scale for the
      output rounding;
    - NaN in exactly the same places, the same shape and dtype.
    """
    if fused.shape != eager.shape or fused.dtype != eager.dtype:
        return f"shape/dtype {tuple(fused.shape)} {fused.dtype}, eager {tuple(eager.shape)} {eager.dtype}"
    if fused.numel() == 0:
        return None
    if not torch.equal(fused.isnan(), eager.isnan()):
        return "NaN in other places than eager's"
    if x.dtype == torch.float64:
        return _close(fused, eager, rtol=1e-7, atol=1e-7)
    if x.dtype == torch.float32:
        if _close(fused, eager) is None:
            return None
        ref, slack = _reference(modules, x, torch.float64), 1e-6
    else:
        ref, slack = _reference(modules, x, torch.float32), 1e-2
    finite = ref.isfinite() & eager.isfinite()
    if not finite.any():
        return None if torch.equal(fused, eager) or _close(fused, eager) is None else "non-finite outputs differ"
    fused_err = (fused.to(ref.dtype) - ref).abs()[finite].max()
    eager_err = (eager.to(ref.dtype) - ref).abs()[finite].max()
    scale = ref.abs()[finite].max().clamp_min(1.0)
    if fused_err <= 2 * eager_err + slack * scale:
        return None
    return (f"max error {float(fused_err):.3g} against a {ref.dtype} reference, eager's {float(eager_err):.3g} "
            f"(allowed {float(2 * eager_err + slack * scale):.3g})")


def _close(a: torch.Tensor, b: torch.Tensor, **tol) -> Optional[str]:
    try:
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    except AssertionError as err:
        return str(err).strip().replace("\n", " ")
    return None


def batchnorm_state(modules: Sequence[nn.Module]) -> Callable[[], None]:
    """Snapshots the running statistics of the BatchNorms among ``modules``;
    calling the result puts them back (through ``.data``: the buffers' version
    counters, which the plan guard watches, do not move)."""
    saved = []
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(m, name, None)
                if t is not None:
                    saved.append((t, t.detach().clone()))

    def restore() -> None:
        with torch.no_grad():
            for t, value in saved:
                t.data.copy_(value)

    return restore


# What the checks found, per segment (keyed by its first module, so that a
# plan rebuilt after an optimizer step or an edit keeps what its predecessor
# learnt): {(module ids, spec, route, shape class): passed}.
_results: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple, bool]]" = weakref.WeakKeyDictionary()
_results_lock = threading.Lock()


def _key(modules: Sequence[nn.Module], spec: Sequence[int], route: str, x: torch.Tensor) -> Tuple:
    return (tuple(id(m) for m in modules), tuple(spec), route, shape_class(x))


def failed(modules: Sequence[nn.Module], spec: Sequence[int]) -> bool:
    """Whether a check of this segment has failed (it then runs eagerly)."""
    with _results_lock:
        results = _results.get(modules[0], {})
        ids = tuple(id(m) for m in modules)
        return any(not ok for (m, s, _, _), ok in results.items() if m == ids and s == tuple(spec))


def needs_check(mode: str, modules: Sequence[nn.Module], spec: Sequence[int], route: str, x: torch.Tensor) -> bool:
    if mode in ("off", "capturing"):  # capturing: a CUDA graph is being recorded (no synchronizing)
        return False
    if mode == "always":
        return True
    with _results_lock:
        return _key(modules, spec, route, x) not in _results.get(modules[0], {})


def record(modules: Sequence[nn.Module], spec: Sequence[int], route: str, x: torch.Tensor, passed: bool) -> None:
    with _results_lock:
        _results.setdefault(modules[0], {})[_key(modules, spec, route, x)] = passed


def eager_copy_output(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The segment's output from copies of its modules, without autograd: for
    checking a training call without updating the BatchNorms twice."""
    mods = [copy.deepcopy(m) for m in modules]
    with torch.no_grad():
        y = x.detach()
        for m in mods:
            y = m(y)
        return y
