"""FusedSequential: an ``nn.Sequential`` whose forward runs fusible chains as
single seqfuse kernel calls.

The container behaviour (indexing, append, slicing, ``state_dict``, ...) is
``nn.Sequential``'s own; this class only replaces ``forward`` and keeps a plan
cache in its instance ``__dict__``, which is dropped from pickles and copies.
"""

from __future__ import annotations

import threading
import warnings
from typing import List, Optional

import torch
from torch import nn

from . import ops, spec, verify
from ._loader import _C
from .planner import Segment, global_hook_dicts, plan_segments

__all__ = ["FusedSequential", "SeqfuseWarning", "Plan"]

_PLAN_ATTR = "_seqfuse_plan"


class SeqfuseWarning(RuntimeWarning):
    """Raised as a warning when seqfuse had to recover from an internal problem
    (for example a fused kernel rejecting an input that eager accepts)."""


def _describe(m: Optional[nn.Module]) -> str:
    if m is None:
        return "None"
    text = repr(m)
    return text if "\n" not in text else f"{type(m).__name__}(...)"


def _shape_of(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


_CONTEXT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)


def _with_context(err: BaseException, key: str, m, x) -> BaseException:
    """The same exception type with the module and input shape prepended (for
    the builtin types stock modules raise; anything else passes unchanged)."""
    if type(err) not in _CONTEXT_ERRORS:
        return err
    return type(err)(f"FusedSequential child '{key}' ({_describe(m)}) failed on input of shape {_shape_of(x)}: {err}")


# Plan-guard routes (PlanGuard::check in csrc/runtime/plan_guard.cpp).
_STALE, _INFERENCE, _EAGER, _TRAIN = spec.ROUTE_STALE, spec.ROUTE_INFERENCE, spec.ROUTE_EAGER, spec.ROUTE_TRAIN


class _FusedRun:
    """A fused segment bound to its packed parameters (one inference op call
    per forward) and to its live parameters and buffers (one training op call
    per forward)."""

    __slots__ = ("segment", "call", "packable", "train_call", "train_unsupported", "on_packed", "autocast_call",
                 "autocast_ok")

    def __init__(self, segment: Segment, pack_now: bool):
        self.segment = segment
        self.call = None
        self.autocast_call = None  # the bfloat16 call of inference under CPU autocast (False: cannot be packed)
        self.on_packed = None  # set by a one-segment plan: hands a lazily packed call to its guard
        self.packable = not segment.batch_stats  # batch statistics cannot be folded: training op only
        # Whether inference under CPU bfloat16 autocast may run the segment's bfloat16 run (run_autocast).
        self.autocast_ok = self.packable and segment.dtype == torch.float32 and segment.has_product()
        if self.packable and pack_now:
            self.call = self.pack()
        self.train_unsupported = segment.train_unsupported()
        self.train_call = None
        if not self.train_unsupported:
            self.train_call = _C.FusedTrainCall(
                segment.op,
                segment.train_params(),  # the Parameters themselves: gradients reach them
                segment.train_running(),
                segment.spec,
                segment.fparams,
                segment.update_buffers(),
                segment.update_stages(),
                segment.momentum(),
                segment.flatten,
                segment.needs_2d,
            )

    def pack(self, dtype: Optional[torch.dtype] = None):
        """The inference call: folded and packed parameters (a copy of the
        weights, so a plan built in training mode packs only when an
        inference call needs it). ``dtype``: the call of the same run in
        another dtype (its parameters and engine weights converted copies)."""
        segment = self.segment
        run_spec = segment.spec if dtype is None else spec.with_dtype(segment.spec, dtype)
        convert = (lambda t: t.detach()) if dtype is None else (lambda t: t.detach().to(dtype))
        # Folded/packed weights are derived data: never autograd history, never
        # inference tensors (the plan may be reused outside inference_mode).
        with torch.inference_mode(False), torch.no_grad():
            tensors = [convert(t) for t in segment.pack_tensors()]
            pack = ops.conv_pack if segment.op == "conv" else ops.mlp_pack
            packed = pack(tensors, run_spec, segment.fparams)
            weights = [convert(w) for w in segment.engine_weights()]  # views of the parameters (dtype None)
        if segment.op == "conv":
            return _C.FusedConvCall(packed, weights, run_spec, segment.fparams)
        return _C.FusedMlpCall(packed, weights, run_spec, segment.fparams, segment.flatten, segment.needs_2d)

    def ensure_packed(self, stacklevel: int = 4) -> bool:
        """Packs the inference call if not yet done; False (with a warning,
        and eagerly from then on) when the segment cannot be packed."""
        if self.call is None and self.packable:
            try:
                self.call = self.pack()
            except Exception as err:
                self.packable = False
                _warn_packing_failed(self.segment, err, stacklevel=stacklevel)
                return False
            if self.on_packed is not None:
                self.on_packed(self.call)
        return self.call is not None

    def __call__(self, x, route: int):
        if route == _TRAIN:
            return self.run_train(x)
        if route == _EAGER and self.autocast_ok and _autocast_bfloat16(x):
            y = self.run_autocast(x)
            if y is not None:
                return y
        if route != _INFERENCE or not self.packable:
            return self.run_eager(x)
        if self.call is None:
            if isinstance(x, torch.Tensor) and x.is_cuda and _capturing(x):  # packing copies to the host: not inside a caller's capture
                return self.run_eager(x)
            if not self.ensure_packed(stacklevel=5):
                return self.run_eager(x)
        mode = _check_mode(x)
        if mode != "off":
            return self.run_checked(x, mode, "inference")
        try:
            y = self.call(x)
        except Exception as err:
            return self.recover(x, err)
        return self.run_eager(x) if y is None else y

    def run_autocast(self, x):
        """Inference of a float32 segment under ``torch.autocast("cpu",
        dtype=torch.bfloat16)``: the segment as a bfloat16 run (its
        parameters converted to bfloat16 once, on the first such call), on
        the input rounded to bfloat16, returning bfloat16 as autocast's
        Conv2d / Linear do (and the ops after them, which autocast leaves in
        their input's dtype). None when the segment cannot run so (the
        caller then runs it eagerly, under autocast)."""
        if self.autocast_call is None:
            try:
                self.autocast_call = self.pack(torch.bfloat16)
            except Exception:  # e.g. a parameter in another dtype: autocast's own rules, eagerly
                self.autocast_call = False
        if self.autocast_call is False:
            return None
        # Autocast needs no disabling around the call: the ATen ops inside it
        # (engine 1) get bfloat16 tensors, which autocast leaves as they are.
        return self.autocast_call(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16))

    def run_train(self, x):
        """One seqfuse::*_train_forward call (autograd records its fused
        backward) and the running-statistics update; inputs it does not serve
        run eagerly, as in inference."""
        if self.train_call is None:
            return self.run_eager(x)
        mode = _check_mode(x)
        if mode != "off":
            return self.run_checked(x, mode, "train")
        try:
            y = self.train_call(x)
        except Exception as err:
            return self.recover(x, err)  # the op mutates nothing: eager can repeat the call
        return self.run_eager(x) if y is None else y

    def run_checked(self, x, mode: str, route: str):
        """A call on a device whose kernels are checked against eager
        (seqfuse.verify): the fused result when it matches eager's, else
        eager's, with a warning, and eagerly from then on."""
        seg = self.segment
        if verify.failed(seg.modules, seg.spec):
            return self.run_eager(x)
        call = self.call if route == "inference" else self.train_call
        if not verify.needs_check(mode, seg.modules, seg.spec, route, x):
            try:
                y = call(x)
            except Exception as err:
                return self.recover(x, err)
            return self.run_eager(x) if y is None else y
        restore = verify.batchnorm_state(seg.modules) if route == "train" else None
        try:
            y = call(x)
        except Exception as err:
            return self.recover(x, err)
        if y is None:
            return self.run_eager(x)
        # Inference: the modules themselves (eval BatchNorm mutates nothing);
        # training: copies, so running statistics are updated once, by the fused call.
        eager = self.run_eager(x) if route == "inference" else verify.eager_copy_output(seg.modules, x)
        why = verify.mismatch(y.detach(), eager, seg.modules, x.detach())
        verify.record(seg.modules, seg.spec, route, x, why is None)
        if why is None:
            return y
        warnings.warn(
            f"seqfuse: the fused {x.device.type} kernel of children [{seg.start}:{seg.stop}] "
            f"({', '.join(type(m).__name__ for m in seg.modules)}) disagrees with eager on input of shape "
            f"{tuple(x.shape)} {x.dtype}: {why}. This segment runs eagerly from now on; please report it "
            "with FusedSequential.explain() and the GPU model.",
            SeqfuseWarning,
            stacklevel=4,
        )
        if route == "inference":
            return eager
        restore()  # the fused call's running-statistics update is undone; eager does its own
        self.train_call = None
        return self.run_eager(x)

    def run_eager(self, x):
        """The segment's modules one by one; an error names the failing child
        and its input shape."""
        for key, m in zip(self.segment.keys, self.segment.modules):
            try:
                y = m(x)
            except Exception as err:
                raise _with_context(err, key, m, x) from err
            x = y
        return x

    def recover(self, x, fused_error: Exception):
        """Re-runs the segment eagerly so a bad input gets eager's own error."""
        x = self.run_eager(x)
        warnings.warn(
            f"seqfuse: the fused kernel rejected an input that eager accepted ({fused_error}); "
            "this segment ran eagerly. Please report this with FusedSequential.explain().",
            SeqfuseWarning,
            stacklevel=3,
        )
        return x


def _autocast_bfloat16(x) -> bool:
    """Whether a call is inference under ``torch.autocast("cpu",
    dtype=torch.bfloat16)`` on a plain float32 or bfloat16 CPU tensor (a
    bfloat16 one: the output of an earlier segment or op under autocast):
    the calls a segment's bfloat16 run serves (see _FusedRun.run_autocast)."""
    return (type(x) is torch.Tensor and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.is_grad_enabled() and not _C.needs_eager_context(x))


def _has_hooks(container: nn.Module) -> bool:
    """Whether a child has hooks: a graph would run them only at its capture."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in container.modules())


def _check_mode(x) -> str:
    if not isinstance(x, torch.Tensor):
        return "off"
    mode = verify.kernel_check(x.device.type)
    if mode != "off" and x.is_cuda and _capturing(x):
        # A comparison synchronizes, which a CUDA-graph capture forbids: no
        # new check, but a segment that failed one still runs eagerly.
        return "capturing"
    return mode


def _capturing(x: torch.Tensor) -> bool:
    with torch.cuda.device(x.device):
        return torch.cuda.is_current_stream_capturing()


def _segment_checked(segment: Segment) -> bool:
    """Whether the calls of a segment's device are checked against eager."""
    devices = {t.device.type for t in segment.watched_tensors()}
    return any(verify.kernel_check(d) != "off" for d in devices)


class _EagerRun:
    __slots__ = ("segment",)

    def __init__(self, segment: Segment):
        self.segment = segment

    def __call__(self, x, route: int):
        for m in self.segment.modules:
            x = m(x)
        return x


def _warn_packing_failed(segment: Segment, err: Exception, stacklevel: int = 4) -> None:
    warnings.warn(
        f"seqfuse: packing children [{segment.start}:{segment.stop}] failed ({err}); they run eagerly. "
        "Please report this with FusedSequential.explain().",
        SeqfuseWarning,
        stacklevel=stacklevel,
    )


class Plan:
    """The cached execution plan of a FusedSequential, with its guard."""

    def __init__(self, container: nn.Sequential):
        keys = list(container._modules.keys())
        modules = list(container._modules.values())
        self.segments: List[Segment] = plan_segments(keys, modules)
        self.graphs: dict = {}  # input signature -> _GraphReplay (cuda_graph=True)
        pack_now = not container.training  # an eval-mode plan serves inference calls
        self.runs = [self._bind(s, pack_now) if s.fused else _EagerRun(s) for s in self.segments]
        self.segments = [r.segment for r in self.runs]
        fused_tensors = [t for s in self.segments if s.fused for t in s.watched_tensors()]
        if len(self.runs) == 1:
            self.run = self.runs[0]
        batch_stats = any(s.fused and s.batch_stats for s in self.segments)
        self.guard = _C.PlanGuard(
            container._modules, modules, fused_tensors, list(container.parameters()), global_hook_dicts(), batch_stats
        )
        # The guard's direct call skips the Python run: not for segments whose
        # calls are checked against eager (seqfuse.verify).
        if len(self.runs) == 1 and self.segments[0].fused and not _segment_checked(self.segments[0]):
            self.runs[0].on_packed = self.guard.set_single_fused
            if self.runs[0].call is not None:
                self.guard.set_single_fused(self.runs[0].call)
            if self.runs[0].train_call is not None:
                self.guard.set_single_train(self.runs[0].train_call)

    @staticmethod
    def _bind(segment: Segment, pack_now: bool):
        """Binds (and for an eval-mode plan packs) a fused segment; a segment
        the packing rejects (a planner gap: the planner should have kept it
        eager) runs eagerly instead."""
        try:
            return _FusedRun(segment, pack_now)
        except Exception as err:
            _warn_packing_failed(segment, err, stacklevel=5)
            reason = f"packing failed: {err}"
            return _EagerRun(
                Segment(segment.start, segment.stop, segment.keys, segment.modules, False, [reason] * len(segment.keys))
            )

    def run(self, x, route: int):
        for r in self.runs:
            x = r(x, route)
        return x


# Input signatures a plan keeps CUDA graphs for (each holds its own memory pool).
_MAX_GRAPHS_PER_PLAN = 8


class _GraphReplay:
    """The inference forward of one plan captured as a CUDA graph for one
    input signature (shape, strides, dtype, device): a static input buffer
    the caller's input is copied into, and a static output a copy of which
    each call returns. Belongs to its plan: when the guard re-plans (a
    parameter update, an edit), the graph goes with the old plan."""

    __slots__ = ("graph", "static_in", "static_out", "lock")

    def __init__(self, plan: Plan, x: torch.Tensor, route: int):
        # Outside the capture first: packing, engine measurements and the
        # first-call check against eager (which synchronizes) all happen here.
        plan.run(x, route)
        # Static buffers are ordinary tensors (not inference tensors), on the
        # input's device, captured on a stream of that device; only this
        # thread's CUDA calls are restricted while the capture runs.
        with torch.cuda.device(x.device), torch.inference_mode(False), torch.no_grad():
            self.static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                plan.run(self.static_in, route)  # a warm run's allocations, as the capture will make them
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.static_out = plan.run(self.static_in, route)
            torch.cuda.current_stream().wait_stream(side)
        if not isinstance(self.static_out, torch.Tensor):
            raise TypeError(f"the forward returns {type(self.static_out).__name__}, not a tensor")
        self.lock = threading.Lock()  # the static buffers are shared by every caller

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock, torch.cuda.device(x.device):
            self.static_in.copy_(x)
            self.graph.replay()
            return self.static_out.clone()


class FusedSequential(nn.Sequential):
    r"""A drop-in :class:`torch.nn.Sequential` that runs chains of Linear,
    BatchNorm1d and activations, and chains of Conv2d, BatchNorm2d,
    activations and pooling (with a Flatten and Linear head), as single fused
    kernel calls, in inference and in training.

    Construct it like ``nn.Sequential`` (positional modules or one
    ``OrderedDict``); every container operation, ``state_dict`` key and
    parameter is exactly ``nn.Sequential``'s. On ``forward`` the children are
    split into maximal fusible runs (see :meth:`explain`), each executed by one
    ``torch.ops.seqfuse`` call; anything else runs eagerly, unchanged.

    The plan (segments, folded and packed weights) is cached and re-derived
    whenever anything it depends on changes: children, training flags, module
    attributes, hooks, parameters or buffers (replaced, converted, or edited in
    place), ``requires_grad``. When autograd is needed (grad mode on and a
    parameter or the input requires grad), or a BatchNorm normalizes with batch
    statistics (training mode), a fused segment runs the training op instead:
    the parameters as they are, BatchNorm with batch statistics and eager's
    running-statistics update, and a fused backward registered with autograd.
    Under ``torch.autocast``, which changes eager's compute dtype, fused
    segments run eagerly.

    ``cuda_graph=True`` (or setting the ``cuda_graph`` attribute) replays
    inference calls on CUDA tensors as CUDA graphs, one per input signature
    (shape, strides, dtype, device; at most 8 per plan), captured at the
    signature's first call after one ordinary call; each call returns a new
    tensor. A re-plan (parameters updated or edited) captures anew; training
    calls, and calls while another capture is under way, run as usual.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = FusedSequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
        >>> ref = nn.Sequential(*model)
        >>> x = torch.randn(4, 8)
        >>> with torch.no_grad():
        ...     torch.testing.assert_close(model(x), ref(x))
    """

    def __init__(self, *args, cuda_graph: bool = False, **kwargs):
        super().__init__(*args, **kwargs)  # kwargs: a Sequential subclass's own (fuse() makes such classes)
        if cuda_graph:
            self.cuda_graph = True

    def forward(self, input):
        if torch.compiler.is_compiling():
            return self._forward_traceable(input)
        if self.__dict__.get("cuda_graph") and isinstance(input, torch.Tensor) and input.is_cuda:
            return self._forward_graphed(input)
        plan = self.__dict__.get(_PLAN_ATTR)
        if plan is not None:
            y = plan.guard.run(input)  # the whole forward of a one-segment plan, in C++
            if y is not None:
                return y
        route = plan.guard.check(input) if plan is not None else 0
        if not route:
            if _C.needs_eager_context(input):  # e.g. functorch-wrapped parameters: no plan can be built
                return super().forward(input)
            plan = self._replan()
            route = plan.guard.check(input)
        return plan.run(input, route)

    def _forward_graphed(self, input):
        """The forward with CUDA-graph replay of inference calls (``cuda_graph=True``)."""
        plan = self.__dict__.get(_PLAN_ATTR)
        route = plan.guard.check(input) if plan is not None else 0
        if not route:
            if _C.needs_eager_context(input):
                return super().forward(input)
            plan = self._replan()
            route = plan.guard.check(input)
        with torch.cuda.device(input.device):
            capturing = torch.cuda.is_current_stream_capturing()
        if route != _INFERENCE or capturing or verify.kernel_check(input.device.type) == "always" or _has_hooks(self):
            return plan.run(input, route)
        key = (tuple(input.shape), input.stride(), input.dtype, input.device)
        if key not in plan.graphs:
            if len(plan.graphs) >= _MAX_GRAPHS_PER_PLAN:
                return plan.run(input, route)
            try:
                plan.graphs[key] = _GraphReplay(plan, input, route)
            except Exception as err:  # e.g. an eager child that synchronizes
                plan.graphs[key] = None
                warnings.warn(f"seqfuse: this forward cannot be captured as a CUDA graph ({err}); "
                              f"input {tuple(input.shape)} runs without one", SeqfuseWarning, stacklevel=3)
        replay = plan.graphs[key]
        return plan.run(input, route) if replay is None else replay(input)

    def _replan(self) -> Plan:
        plan = Plan(self)
        self.__dict__[_PLAN_ATTR] = plan
        return plan

    def _prepare_inference(self) -> List[nn.Module]:
        """Builds the plan and packs its fused segments now (``fuse()`` does
        this for eval-mode models, so the first call does not); returns the
        children its eager segments will call."""
        plan = self.__dict__.get(_PLAN_ATTR) or self._replan()
        eager = []
        for run in plan.runs:
            if isinstance(run, _FusedRun):
                run.ensure_packed(stacklevel=6)
            else:
                eager.extend(run.segment.modules)
        return eager

    def invalidate_plan(self) -> None:
        """Drops the cached plan. Needed only after editing a parameter through
        ``.data`` (which bypasses the version counter seqfuse watches).

        >>> m = FusedSequential(nn.Linear(2, 2)); m.invalidate_plan()
        """
        self.__dict__.pop(_PLAN_ATTR, None)

    def _forward_traceable(self, input):
        """The forward as torch.compile / export trace it: plan and pack inline
        (the packing op becomes part of the graph), then one op per segment;
        the training op where the call needs autograd or batch statistics."""
        keys = list(self._modules.keys())
        modules = list(self._modules.values())
        autocast = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        needs_grad = torch.is_grad_enabled() and (
            (isinstance(input, torch.Tensor) and input.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        x = input
        for seg in plan_segments(keys, modules):
            train = needs_grad or seg.batch_stats
            if not seg.fused or autocast or (train and seg.train_unsupported()):
                for m in seg.modules:
                    x = m(x)
                continue
            if seg.op == "conv":
                if x.dim() != 4:  # unbatched input: eager
                    for m in seg.modules:
                        x = m(x)
                    continue
                if train:
                    x = _train_traceable(ops.conv_train_forward, seg, x)
                    continue
                packed = ops.conv_pack(seg.pack_tensors(), seg.spec, seg.fparams)
                x = ops.conv_forward(x, packed, seg.engine_weights(), seg.spec, seg.fparams)
                continue
            if seg.flatten is not None:
                x = x.flatten(*seg.flatten)
            if seg.needs_2d and x.dim() != 2:  # BatchNorm1d over dim 1 of 3-D input: eager
                for m in seg.modules[1 if seg.flatten is not None else 0 :]:
                    x = m(x)
                continue
            if train:
                x = _train_traceable(ops.mlp_train_forward, seg, x)
                continue
            packed = ops.mlp_pack(seg.pack_tensors(), seg.spec, seg.fparams)
            x = ops.mlp_forward(x, packed, seg.engine_weights(), seg.spec, seg.fparams)
        return x

    def explain(self) -> "Explanation":
        """Describes how the next forward runs: which children run in which
        fused kernel and which fall back to eager, and why.

        >>> print(FusedSequential(nn.Linear(4, 8), nn.ReLU(), nn.Softsign()).explain())  # doctest: +ELLIPSIS
        FusedSequential plan: 1 fused segment, 1 eager segment (CPU kernels: ...)
          [0:2] fused: seqfuse::mlp_forward, float32, 4 -> 8
            (0) Linear(in_features=4, out_features=8, bias=True)  stage 0: matmul
            (1) ReLU()  stage 0: activation in the epilogue
          [2:3] eager
            (2) Softsign()  Softsign has no fused kernel
          note: a fused segment runs the fused kernels; ...
          note: when autograd is needed ...
        """
        segments = plan_segments(list(self._modules.keys()), list(self._modules.values()))
        plan = self.__dict__.get(_PLAN_ATTR)
        measured = {}
        if plan is not None:  # engine choices measured by earlier calls, for the same segments
            for run in plan.runs:
                if isinstance(run, _FusedRun) and run.call is not None:
                    measured[(run.segment.start, run.segment.stop, tuple(run.segment.spec))] = run.call.measured_engines()
        return Explanation(segments, measured)

    def _apply(self, fn, recurse=True):
        # Conversions (.to, .double, ...) may swap parameter tensors in place
        # (torch.utils.swap_tensors), which refuses while a plan holds them.
        self.invalidate_plan()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_plan()  # as for _apply: loading may swap tensors
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop(_PLAN_ATTR, None)
        return state


def _train_traceable(op, seg: Segment, x):
    y, saved = op(x, seg.train_params(), seg.train_running(), seg.spec, seg.fparams)
    stages = seg.update_stages()
    if stages:
        ops.update_running_stats(seg.update_buffers(), ops.saved_batch_stats(saved, stages), seg.momentum())
    return y


def _widths(s: Segment) -> str:
    """The widths a fused segment maps through, e.g. '3 -> 32 -> 64 channels'."""
    if s.op == "mlp":
        widths = [s.in_features] + [st.out_features for st in s.stages if st.kind == spec.StageKind.LINEAR]
        extra = ", 2-D input only (BatchNorm1d)" if s.needs_2d else ""
        return " -> ".join(map(str, widths)) + extra
    K = spec.ConvStageKind
    channels = [s.in_features] + [st.out_channels for st in s.stages if st.kind == K.CONV]
    text = " -> ".join(map(str, channels)) + " channels, 4-D input"
    features = [st.out_channels for st in s.stages if st.kind == K.LINEAR]
    if any(st.kind == K.FLATTEN for st in s.stages):
        text += ", flatten" + "".join(f" -> {f}" for f in features)
    return text


class Explanation:
    """What :meth:`FusedSequential.explain` returns; ``str()`` is the readable plan.

    >>> e = FusedSequential(nn.Linear(4, 4), nn.ReLU(), nn.Softsign()).explain()
    >>> [(s.start, s.stop) for s in e.fused_segments], [s.reasons for s in e.eager_segments]
    ([(0, 2)], [['Softsign has no fused kernel']])
    """

    def __init__(self, segments: List[Segment], measured_engines: Optional[dict] = None):
        self.segments = segments
        self._measured = measured_engines or {}

    def engines(self, segment: Segment) -> List[tuple]:
        """(min batch, max batch, threads, engine name, (H, W) for conv runs
        or ()) chosen by measurement for a fused segment so far (empty before
        any large call)."""
        found = self._measured.get((segment.start, segment.stop, tuple(segment.spec)), [])
        names = spec.CONV_ENGINE_NAMES if segment.op == "conv" else spec.ENGINE_NAMES
        return [(lo, hi, t, names[e], tuple(extra)) for lo, hi, t, e, extra in sorted(found)]

    @property
    def fused_segments(self) -> List[Segment]:
        return [s for s in self.segments if s.fused]

    @property
    def eager_segments(self) -> List[Segment]:
        return [s for s in self.segments if not s.fused]

    def __str__(self) -> str:
        n_f, n_e = len(self.fused_segments), len(self.eager_segments)
        lines = [
            f"FusedSequential plan: {n_f} fused segment{'s' * (n_f != 1)}, {n_e} eager segment{'s' * (n_e != 1)} "
            f"(CPU kernels: {ops.cpu_capability()})"
        ]
        for s in self.segments:
            if s.fused:
                dtype = str(s.dtype).replace("torch.", "")
                op = f"{s.op}_train_forward" if s.batch_stats else f"{s.op}_forward"  # batch statistics: training op only
                lines.append(f"  [{s.start}:{s.stop}] fused: seqfuse::{op}, {dtype}, {_widths(s)}")
                notes = s.roles
                unit = "images" if s.op == "conv" else "rows"
                for lo, hi, threads, name, extra in self.engines(s):
                    at = f" of {extra[0]}x{extra[1]}" if extra else ""
                    lines.append(f"    calls of {lo}-{hi} {unit}{at}, {threads} threads: {name} (measured)")
            else:
                lines.append(f"  [{s.start}:{s.stop}] eager")
                notes = s.reasons
            for key, m, note in zip(s.keys, s.modules, notes):
                lines.append(f"    ({key}) {_describe(m)}  {note}")
        if n_f:
            lines.append(
                "  note: a fused segment runs the fused kernels; for calls over ~1M multiply-adds the first calls "
                "per batch size (and spatial size) time them against ATen's GEMM / convolution + the fused "
                "epilogue, one engine per call, and keep the fastest."
            )
            lines.append(
                "  note: when autograd is needed (grad mode on and a parameter or the input requires grad) or a "
                "BatchNorm uses batch statistics, a fused segment runs seqfuse::*_train_forward (ATen's GEMM / "
                "convolution per product, fused bias/BatchNorm/activation kernels) and its fused backward; "
                "under torch.autocast fused segments run eagerly."
            )
            for s in self.fused_segments:
                why = s.train_unsupported()
                if why:
                    lines.append(f"  note: [{s.start}:{s.stop}] trains eagerly: {why}")
        return "\n".join(lines)

    __repr__ = __str__
