"""From a container's children to a plan: maximal runs of modules the kernels
support become fused segments, everything else runs eagerly with the reason
recorded. The planner only looks at modules; it holds no tensors, so the same
code serves the cached eager path and ``torch.compile`` tracing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

from .ops import (
    BATCHNORM_AFFINE,
    HAS_BATCHNORM,
    HAS_BIAS,
    SUPPORTED_DTYPES,
    Activation,
    MlpStage,
    StageKind,
    encode_mlp_spec,
)

_ACTIVATIONS = {
    nn.ReLU: Activation.RELU,
    nn.LeakyReLU: Activation.LEAKY_RELU,
    nn.ReLU6: Activation.RELU6,
    nn.Sigmoid: Activation.SIGMOID,
    nn.Tanh: Activation.TANH,
    nn.GELU: None,  # depends on `approximate`
    nn.SiLU: Activation.SILU,
    nn.Hardswish: Activation.HARDSWISH,
}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)

# Roles a module can play inside a fused run.
LINEAR, BATCHNORM, ACTIVATION, NOOP, FLATTEN = "linear", "batchnorm", "activation", "noop", "flatten"


def global_hook_dicts() -> list:
    """The module-global hook registries; any entry disables fusion everywhere."""
    return [getattr(_module_mod, name) for name in _GLOBAL_HOOK_DICTS]


def _registered_devices() -> Tuple[str, ...]:
    devices = ["cpu"]
    if torch._C._dispatch_has_kernel_for_dispatch_key("seqfuse::mlp_forward", "CUDA"):
        devices.append("cuda")
    return tuple(devices)


# Device types with a registered seqfuse kernel (fixed once the library is
# loaded; a constant so that torch.compile traces the planner without breaks).
FUSED_DEVICES = _registered_devices()


@dataclass
class Classified:
    role: Optional[str]  # None: runs eagerly
    reason: str = ""
    activation: Activation = Activation.NONE
    width: Optional[int] = None  # the input width the module requires, if any
    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None


def _tensor_home(m: nn.Module, names: Sequence[str]):
    tensors = [getattr(m, n) for n in names if getattr(m, n, None) is not None]
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        return None, None, "its tensors do not share one dtype and device"
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in SUPPORTED_DTYPES:
        return None, None, f"no fused kernel for {dtype} (supported: float32, float64, bfloat16)"
    if device.type not in FUSED_DEVICES:
        return None, None, f"no fused kernel for device '{device.type}' in this build"
    return dtype, device, ""


def classify(m: Optional[nn.Module]) -> Classified:
    """What role ``m`` can play in a fused run, or why it must run eagerly."""
    if m is None:
        return Classified(None, "None child (fails when called, as in nn.Sequential)")
    t = type(m)
    for name in _HOOK_DICTS:
        if getattr(m, name, None):
            return Classified(None, "has hooks (hooks must see the module run)")
    if "forward" in m.__dict__:
        return Classified(None, "has an instance-level forward override")
    if t is nn.Linear:
        dtype, device, why = _tensor_home(m, ("weight", "bias"))
        if why:
            return Classified(None, why)
        n_out, n_in = m.out_features, m.in_features
        if n_in < 1 or n_out < 1 or tuple(m.weight.shape) != (n_out, n_in) or (
            m.bias is not None and tuple(m.bias.shape) != (n_out,)
        ):
            return Classified(None, "zero-size, or weight/bias shapes differ from in_features/out_features")
        return Classified(LINEAR, width=n_in, dtype=dtype, device=device)
    if t is nn.BatchNorm1d:
        if m.training:
            return Classified(None, "BatchNorm1d in training mode uses batch statistics (not fused yet)")
        if m.running_mean is None or m.running_var is None:
            return Classified(None, "BatchNorm1d without running statistics uses batch statistics (not fused)")
        dtype, device, why = _tensor_home(m, ("weight", "bias", "running_mean", "running_var"))
        if why:
            return Classified(None, why)
        n = m.num_features
        if (m.weight is None) != (m.bias is None) or (m.weight is None) == m.affine:
            return Classified(None, "BatchNorm1d with only one of weight and bias (not fused)")
        shapes = [m.running_mean, m.running_var] + ([m.weight, m.bias] if m.affine else [])
        if n < 1 or any(tuple(t.shape) != (n,) for t in shapes):
            return Classified(None, "BatchNorm1d tensors do not all have shape (num_features,)")
        return Classified(BATCHNORM, width=n, dtype=dtype, device=device)
    if t is nn.ReLU6 and (m.min_val, m.max_val) != (0.0, 6.0):
        return Classified(None, f"ReLU6 with min_val={m.min_val}, max_val={m.max_val} (only 0..6 is fused)")
    if t in _ACTIVATIONS:
        act = _ACTIVATIONS[t]
        if t is nn.GELU:
            act = {"none": Activation.GELU_ERF, "tanh": Activation.GELU_TANH}.get(m.approximate)
            if act is None:
                return Classified(None, f"GELU(approximate={m.approximate!r}) is not supported")
        return Classified(ACTIVATION, activation=act)
    if t is nn.Identity:
        return Classified(NOOP)
    if t is nn.Dropout:
        if m.training:
            return Classified(None, "Dropout in training mode is random (runs eagerly)")
        return Classified(NOOP)
    if t is nn.Flatten:
        return Classified(FLATTEN)
    if isinstance(m, (nn.Linear, nn.BatchNorm1d)) or t.__name__.startswith("Parametrized"):
        return Classified(None, f"{t.__name__} is a subclass or parametrization of a stock module (only exact types fuse)")
    return Classified(None, f"{t.__name__} has no fused kernel")


@dataclass
class Segment:
    """A slice [start, stop) of the container's children and how it runs."""

    start: int
    stop: int
    keys: List[str]
    modules: List[Optional[nn.Module]]
    fused: bool
    # eager segments: one reason per module
    reasons: List[str] = field(default_factory=list)
    # fused segments
    stages: List[MlpStage] = field(default_factory=list)
    roles: List[str] = field(default_factory=list)
    in_features: int = 0
    dtype: Optional[torch.dtype] = None
    flatten: Optional[Tuple[int, int]] = None  # (start_dim, end_dim) applied to the input first
    needs_2d: bool = False  # BatchNorm1d normalizes dim 1: fused only for (N, C) input
    spec: List[int] = field(default_factory=list)
    fparams: List[float] = field(default_factory=list)

    def linear_weights(self) -> List[torch.Tensor]:
        """The Linear weights in stage order (what the GEMM engine reads)."""
        return [st.modules[0].weight for st in self.stages if st.kind == StageKind.LINEAR]

    def watched_tensors(self) -> List[torch.Tensor]:
        """Every parameter and buffer of the fused modules: what the plan
        guard watches (num_batches_tracked included: a training-mode forward
        elsewhere updates running stats without bumping their version, but it
        does bump this counter's)."""
        seen, out = set(), []
        for m in self.modules:
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def pack_tensors(self) -> List[torch.Tensor]:
        """The tensors mlp_pack takes, read from the modules now."""
        out: List[torch.Tensor] = []
        for stage in self.stages:
            for m in stage.modules:
                if type(m) is nn.Linear:
                    out.append(m.weight)
                    if m.bias is not None:
                        out.append(m.bias)
                else:
                    if m.affine:
                        out += [m.weight, m.bias]
                    out += [m.running_mean, m.running_var]
        return out


def _build_stages(entries) -> Tuple[List[MlpStage], List[str]]:
    stages: List[MlpStage] = []
    roles: List[str] = []
    for m, c in entries:
        last = stages[-1] if stages else None
        if c.role == LINEAR:
            flags = HAS_BIAS if m.bias is not None else 0
            stages.append(MlpStage(StageKind.LINEAR, m.out_features, flags=flags, modules=[m]))
            roles.append(f"stage {len(stages) - 1}: matmul")
        elif c.role == BATCHNORM:
            flags = HAS_BATCHNORM | (BATCHNORM_AFFINE if m.affine else 0)
            if (
                last is not None
                and last.kind == StageKind.LINEAR
                and not last.flags & HAS_BATCHNORM
                and last.activation == Activation.NONE
            ):
                last.flags |= flags
                last.eps = m.eps
                last.modules.append(m)
                roles.append(f"stage {len(stages) - 1}: folded into the epilogue (eval)")
            else:
                stages.append(MlpStage(StageKind.SCALE_SHIFT, m.num_features, flags=flags, eps=m.eps, modules=[m]))
                roles.append(f"stage {len(stages) - 1}: per-channel scale/shift (eval)")
        elif c.role == ACTIVATION:
            alpha = float(m.negative_slope) if c.activation == Activation.LEAKY_RELU else 0.0
            if last is None or last.activation != Activation.NONE:
                width = last.out_features if last is not None else None
                stages.append(MlpStage(StageKind.POINTWISE, width or 0, c.activation, alpha))
            else:
                last.activation, last.alpha = c.activation, alpha
            roles.append(f"stage {len(stages) - 1}: activation in the epilogue")
        elif c.role == FLATTEN:
            roles.append("flatten of the run's input (a view)")
        else:
            roles.append("no-op at inference")
    return stages, roles


def _close_run(segments, run, keys, modules):
    """Turns the pending run (list of (index, classified)) into a segment."""
    if not run:
        return
    idx = [i for i, _ in run]
    start, stop = idx[0], idx[-1] + 1
    widths = [c.width for _, c in run if c.width is not None]
    if not widths:
        reason = "nothing to fuse: no Linear or BatchNorm1d in this run"
        segments.append(Segment(start, stop, keys[start:stop], modules[start:stop], False, [reason] * len(run)))
        return
    entries = [(modules[i], c) for i, c in run]
    stages, roles = _build_stages(entries)
    in_features = widths[0]
    for s in stages:  # a leading activation takes the run's input width
        if s.kind == StageKind.POINTWISE and s.out_features == 0:
            s.out_features = in_features
    dtype = next(c.dtype for _, c in run if c.dtype is not None)
    first = modules[start]
    seg = Segment(
        start,
        stop,
        keys[start:stop],
        modules[start:stop],
        True,
        stages=stages,
        roles=roles,
        in_features=in_features,
        dtype=dtype,
        flatten=(first.start_dim, first.end_dim) if type(first) is nn.Flatten else None,
        needs_2d=any(c.role == BATCHNORM for _, c in run),
    )
    seg.spec, seg.fparams = encode_mlp_spec(dtype, in_features, stages)
    segments.append(seg)


def plan_segments(keys: Sequence[str], modules: Sequence[Optional[nn.Module]]) -> List[Segment]:
    """Splits the children into fused and eager segments.

    >>> segs = plan_segments(["0", "1", "2"], [nn.Linear(4, 8), nn.ReLU(), nn.Conv2d(1, 1, 1)])
    >>> [(s.start, s.stop, s.fused) for s in segs]
    [(0, 2, True), (2, 3, False)]
    """
    keys, modules = list(keys), list(modules)
    segments: List[Segment] = []
    if any(global_hook_dicts()):
        reason = "global module hooks are registered (they must see every module run)"
        if modules:
            segments.append(Segment(0, len(modules), keys, modules, False, [reason] * len(modules)))
        return segments

    run: List[Tuple[int, Classified]] = []
    width: Optional[int] = None  # width flowing out of the run so far
    home: Optional[Tuple[torch.dtype, torch.device]] = None

    def flush():
        nonlocal run, width, home
        _close_run(segments, run, keys, modules)
        run, width, home = [], None, None

    for i, m in enumerate(modules):
        c = classify(m)
        if c.role is None:
            flush()
            segments.append(Segment(i, i + 1, keys[i : i + 1], modules[i : i + 1], False, [c.reason]))
            continue
        if c.role == FLATTEN and run:
            flush()  # a flatten starts a run (as a view of its input), never sits inside one
        # An in-place activation whose input is the run's input (nothing but
        # no-ops and a Flatten view before it) must modify the caller's tensor.
        at_run_input = all(rc.role in (NOOP, FLATTEN) for _, rc in run)
        if c.role == ACTIVATION and at_run_input and getattr(m, "inplace", False):
            flush()
            segments.append(
                Segment(i, i + 1, keys[i : i + 1], modules[i : i + 1], False,
                        ["in-place activation on the run's input (must modify the caller's tensor)"])
            )
            continue
        if c.width is not None:
            if width is not None and c.width != width:
                flush()  # eager reports the shape mismatch when this run gets its input
            if home is not None and (c.dtype, c.device) != home:
                flush()
            home = (c.dtype, c.device)
            width = m.out_features if c.role == LINEAR else c.width
        run.append((i, c))
    flush()
    return _merge_adjacent_eager(segments)


def _merge_adjacent_eager(segments: List[Segment]) -> List[Segment]:
    merged: List[Segment] = []
    for s in segments:
        if merged and not s.fused and not merged[-1].fused:
            p = merged[-1]
            merged[-1] = Segment(p.start, s.stop, p.keys + s.keys, p.modules + s.modules, False, p.reasons + s.reasons)
        else:
            merged.append(s)
    return merged
