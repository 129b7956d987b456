"""The forward ``fuse()`` installs on a module: guarded traces, the safety net.

:class:`CapturedForward` keeps, per module, a small cache of traces keyed by
what each trace assumed (:class:`Case`): the training flag and the call
signature (which arguments are tensors, None, lists of what length, the values
of Python arguments). On each call it looks the case up; the trace found runs
while what it was built from is unchanged (the module's attributes, the
children it calls, the containers it inlined, the global hooks: the guard),
and a call that breaks the guard re-traces. A forward that cannot be traced
for a case runs as written for that case, and :func:`seqfuse.explain` says
why.

The safety net: when a traced forward raises where the module's own forward
does not, the call returns the module's own result, a :class:`SeqfuseWarning`
names the module, the input shapes and the cause, and that case runs the
module's own forward from then on (other cases stay fused). A call that
already changed state before it failed (a BatchNorm's running statistics, an
input modified in place) cannot be re-run: it re-raises, naming the module.
When the module's own forward fails too, the caller gets the error of the
fused path (eager's error type, naming the module and the shapes).
"""

from __future__ import annotations

import linecache
import threading
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from ..container import FusedSequential, SeqfuseWarning
from ..planner import global_hook_dicts
from . import layout
from .rewrite import Chain, HOOK_ATTRS, is_sequential_like, rewrite_chains
from .tracer import UnsupportedSignature, call_signature, trace_forward

__all__ = ["CapturedForward", "Traced", "wants_capture", "capture_module"]

_MISSING = object()
# Traces per module kept at once, and built in all before new cases run the
# module's own forward (a forward called with ever new Python values).
_CACHE_SIZE = 8
_MAX_TRACES = 32
# One trace at a time: the tracer redirects the calls of the traced module's
# descendants, and two traces of overlapping trees must not interleave. Other
# threads' calls never wait for it (nothing they can see is patched).
_TRACE_LOCK = threading.RLock()


def wants_capture(m: nn.Module) -> bool:
    """Whether ``fuse()`` gives ``m`` a captured forward: a forward of its
    own, outside torch (stock layers have kernels or run eagerly), not a
    Sequential."""
    t = type(m)
    if is_sequential_like(m) or isinstance(m, FusedSequential) or t.__module__.startswith("torch."):
        return False
    if isinstance(m.__dict__.get("forward"), CapturedForward):
        return True
    if "forward" in m.__dict__:
        return False  # the user's own instance-level forward: left as it is
    return getattr(t, "forward", None) not in (None, nn.Module.forward, getattr(nn.Module, "_forward_unimplemented", None))


class Traced:
    """One traced case: the generated function, its chains, and the guard of
    everything the graph was built from. ``fn`` is None when the case runs
    the module's own forward; ``error`` says why."""

    __slots__ = ("fn", "chains", "guard", "empty", "error", "leftovers", "fell_back", "graph")

    def __init__(self, fn, chains: List[Chain], guard: List[tuple], empty: List[dict], error: str = "",
                 leftovers: Optional[Dict[str, str]] = None, graph=None):
        self.fn = fn
        self.graph = graph  # the rewritten graph (None when not traced)
        self.chains = chains
        self.guard = guard
        self.empty = empty  # hook dicts that must stay empty (inlined containers, global hooks)
        self.error = error
        self.leftovers = leftovers or {}  # qualified name of a weighted module left out of chains -> why
        self.fell_back = False  # the safety net switched this case to the module's own forward

    def valid(self) -> bool:
        for d, k, v in self.guard:
            if d.get(k, _MISSING) is not v:
                return False
        for d in self.empty:
            if d:
                return False
        return True


def _guard_module(m: nn.Module, guard: List[tuple]) -> None:
    """Entries that change when anything the trace may have read from ``m``
    changes: its attributes, children, parameters and buffers; and the
    contents of the module lists and dicts below it (a loop over them is
    unrolled in the graph)."""
    d = m.__dict__
    guard.extend((d, k, v) for k, v in d.items() if k != "forward")
    for table in (m._modules, m._parameters, m._buffers):
        guard.extend((table, k, v) for k, v in table.items())
    for child in m._modules.values():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            _guard_container(child, guard)


def _guard_container(c: nn.Module, guard: List[tuple]) -> None:
    guard.extend((c._modules, k, v) for k, v in c._modules.items())
    guard.append((c.__dict__, "_modules", c._modules))
    # A key added later must invalidate too: guard the absence of the next index.
    guard.append((c._modules, str(len(c._modules)), _MISSING))
    for child in c._modules.values():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            _guard_container(child, guard)


def capture_module(module: nn.Module, args: tuple = (), kwargs: Optional[dict] = None) -> Traced:
    """Traces ``module``'s own forward for the call signature of
    ``args``/``kwargs`` and rewrites its chains. Never raises: an untraceable
    forward gives a Traced with ``fn=None`` and the error, and the module then
    runs its own forward for that case."""
    kwargs = kwargs or {}
    guard: List[tuple] = []
    empty: List[dict] = list(global_hook_dicts())
    _guard_module(module, guard)
    if any(empty):  # the hooks would see the trace's proxies; not cached (see _lookup)
        return Traced(None, [], [], [], error="global module hooks are registered (they must see every call)")
    before = dict(module.__dict__)
    try:
        with _TRACE_LOCK:
            graph = trace_forward(module, args, kwargs)
    except Exception as err:  # data-dependent control flow, unsupported Python, ...
        _restore(module, before)
        return Traced(None, [], guard, empty, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if any(module.__dict__.get(k, _MISSING) is not v for k, v in before.items()) or len(module.__dict__) != len(before):
        _restore(module, before)
        return Traced(None, [], guard, empty, error="its forward assigns attributes of the module (not traced)")

    try:
        chains, leftovers = rewrite_chains(module, graph, guard, empty, expand=_as_chain)
        layout.rewrite_layout_ops(graph)
        graph.lint()
        code = graph.python_code(root_module="self")
        filename = f"<seqfuse: captured {type(module).__qualname__}.forward #{id(module):x}>"
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)
    except Exception as err:  # a seqfuse bug: the module's own forward is always a safe answer
        return Traced(None, [], guard, empty, error=f"not rewritten (internal error, please report it): "
                                                    f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    return Traced(namespace["forward"], chains, guard, empty, leftovers=leftovers, graph=graph)


_PROBE = torch.empty(0)  # a one-tensor call signature


def _as_chain(m: nn.Module):
    """For a captured module whose own forward, called with one tensor, is
    one chain from its input to its output (a library's BatchNorm +
    activation layer, a conv-norm-act block): that chain's (names, modules,
    containers) for the caller's chain to take in, with the guard of that
    trace. Else None: the module is called as it is."""
    cf = m.__dict__.get("forward")
    if not isinstance(cf, CapturedForward):
        return None
    t = cf.traced(_PROBE)
    if t.fn is None or t.graph is None or len(t.chains) != 1 or t.chains[0].residual:
        return None
    nodes = list(t.graph.nodes)
    if (len(nodes) != 3 or nodes[0].op != "placeholder" or nodes[1].op != "call_function"
            or nodes[1].args != (nodes[0],) or nodes[2].args != (nodes[1],)):
        return None
    chain = t.chains[0]
    return chain.names, chain.modules, chain.containers, t.guard + [(m.__dict__, "forward", cf)], t.empty


def _restore(module: nn.Module, before: dict) -> None:
    module.__dict__.clear()
    module.__dict__.update(before)


def _version(t: torch.Tensor) -> Optional[int]:
    # Inference tensors keep no version counter (and cannot be changed in
    # place outside inference mode): taken as unchanged.
    return None if t.is_inference() else t._version


def _shapes(tensors) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors) or "no tensors"


class CapturedForward:
    """What ``fuse()`` sets as ``module.forward`` (see the module docstring).
    Under ``torch.compile``, ``torch.export``, ``torch.jit`` or ONNX export
    the module's own forward runs instead. Copies and pickles carry no traces:
    they trace on their first call."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._cases: "OrderedDict[tuple, Traced]" = OrderedDict()
        self._built = 0  # traces built so far (see _MAX_TRACES)
        self._nhwc: Optional[bool] = None  # whether inference calls run channels_last (the model convolves)

    # -- the cache of cases --------------------------------------------------------------------------------

    def traced(self, *args, **kwargs) -> Traced:
        """The trace for a call with these arguments in the module's current
        mode (tracing it now if needed). Without arguments: the most recent
        traced case of the current mode (else the most recent case), else
        the one for ``forward(x)`` with a tensor."""
        if not args and not kwargs:
            mine = [t for (training, _), t in self._cases.items() if training == self.module.training and t.valid()]
            traced = [t for t in mine if t.fn is not None]
            if traced or mine:
                return (traced or mine)[-1]
            args = (torch.empty(0),)
        try:
            key, _ = call_signature(args, kwargs)
        except UnsupportedSignature as err:
            return Traced(None, [], [], [], error=str(err))
        return self._lookup((self.module.training, key), args, kwargs)

    def _lookup(self, case: tuple, args: tuple, kwargs: dict) -> Traced:
        t = self._cases.get(case)
        if t is not None and t.valid():
            return t
        with _TRACE_LOCK:  # one thread builds a missing case; the others then find it
            t = self._cases.get(case)
            if t is not None and t.valid():
                return t
            if self._built >= _MAX_TRACES:
                t = Traced(None, [], [], [], error=f"more than {_MAX_TRACES} traces built (the forward is called "
                                                  "with ever new Python arguments, or its module keeps changing)")
            else:
                self._built += 1
                t = capture_module(self.module, args, kwargs)
                if t.fn is None and not t.guard:
                    return t  # untraceable only for now (global hooks): trace again when they are gone
            cases = OrderedDict(self._cases)  # readers of the old dict never see it change
            cases.pop(case, None)
            cases[case] = t
            while len(cases) > _CACHE_SIZE:
                cases.popitem(last=False)
            self._cases = cases
        return t

    def cases(self) -> List[Traced]:
        """The traces cached now (most recent last)."""
        return list(self._cases.values())

    # -- the call ------------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        m = self.module
        if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
            return type(m).forward(m, *args, **kwargs)
        try:
            key, tensors = call_signature(args, kwargs)
        except UnsupportedSignature:
            return self._own(args, kwargs)
        t = self._lookup((m.training, key), args, kwargs)
        if t.fn is None:
            return self._own(args, kwargs)
        if layout.in_nhwc_run():
            return self._run(t, tensors, args, kwargs)
        if m.training or torch.is_grad_enabled() or not self._runs_nhwc(tensors):
            return self._run(t, tensors, args, kwargs)
        inside = [a.contiguous(memory_format=torch.channels_last) if layout.nchw_input(a) else a for a in tensors]
        layout._run_layout.active = True
        try:
            out = self._run(t, inside, args, kwargs)
        finally:
            layout._run_layout.active = False
        return torch.utils._pytree.tree_map(layout.nchw_output, out)

    def _own(self, args, kwargs):
        """The module's own forward, with eager's layout inside a channels_last run."""
        m = self.module
        if layout.in_nhwc_run():
            args = tuple(layout.eager_layout(a) for a in args)
            kwargs = {k: layout.eager_layout(v) for k, v in kwargs.items()}
        return type(m).forward(m, *args, **kwargs)

    def _run(self, t: Traced, tensors: list, args: tuple, kwargs: dict):
        """The traced forward, under the safety net (see the module docstring)."""
        m = self.module
        versions = [_version(x) for x in tensors]
        state = [(b, _version(b)) for b in m.buffers()] if m.training else []
        try:
            return t.fn(m, *tensors)
        except Exception as err:
            changed = any(_version(x) != v for x, v in zip(tensors, versions)) or any(_version(b) != v for b, v in state)
            if changed:
                raise RuntimeError(
                    f"seqfuse: the captured forward of {type(m).__name__} failed on inputs {_shapes(tensors)} after "
                    f"it had updated state (inputs or buffers), so the module's own forward cannot run in its place: "
                    f"{type(err).__name__}: {err}") from err
            try:
                out = self._own(args, kwargs)
            except Exception as own_err:
                if type(own_err) is type(err):
                    raise err  # bad input: eager's error type, with the module and shapes named
                raise
            t.fn, t.fell_back = None, True
            t.error = f"fell back to its own forward after {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            warnings.warn(
                f"seqfuse: the captured forward of {type(m).__name__} failed on inputs {_shapes(tensors)} where its "
                f"own forward runs ({type(err).__name__}: {str(err).splitlines()[0][:300]}); this call and later calls "
                "like it run the module's own forward. Please report this with seqfuse.explain(model).",
                SeqfuseWarning, stacklevel=3)
            return out

    def _runs_nhwc(self, tensors) -> bool:
        if self._nhwc is None:
            self._nhwc = layout.has_convolution(self.module)
        return self._nhwc and any(layout.nchw_input(a) for a in tensors)

    # -- what tools read off a forward -----------------------------------------------------------------------

    def __getattr__(self, name: str):
        # What tools read off a forward (torch.export: __code__; inspect:
        # __wrapped__, the signature) is the module's own forward's.
        module = self.__dict__.get("module")
        if module is None or name in ("module", "_cases", "_built", "_nhwc"):
            raise AttributeError(name)  # not yet set (unpickling, copying)
        return getattr(type(module).forward.__get__(module), name)

    @property
    def __wrapped__(self):
        return type(self.module).forward.__get__(self.module)

    def __reduce__(self):
        return (CapturedForward, (self.module,))

    def __repr__(self) -> str:
        return f"<seqfuse captured forward of {type(self.module).__name__}>"
