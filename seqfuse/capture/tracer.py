"""Tracing one module's forward for one call signature, with no global patches.

``torch.fx.Tracer.trace`` patches ``nn.Module.__call__`` and ``__getattr__``
(and the ``math`` module's functions) for the whole process while it traces:
every other thread's modules then run through the tracer, and fail or record
into the wrong graph. This tracer reuses fx's graph building (``Proxy``,
``create_proxy``, ``create_arg``) but records submodule calls by redirecting
the traced module's own descendants only:

* a descendant without hooks gets an instance-level ``forward`` for the
  duration (``nn.Module.__call__`` looks ``forward`` up on the instance);
* a descendant with hooks gets its class swapped for a generated subclass
  whose ``__call__`` records (so its hooks do not run on proxies);
* the traced module's class is swapped for a generated subclass whose
  parameters and buffers read as proxies (what fx's ``__getattr__`` patch
  does for every module), so computations on them are recorded.

Both redirect only calls made by the tracing thread with proxies among the
arguments; any other call (another thread serving the same model, a call on
real tensors) runs exactly as before. Everything is restored when the trace
ends, however it ends. Nothing outside the traced module's own tree is
touched.

Why not TorchDynamo: it is sound by construction, but its caches are
process-wide, and each new input shape recompiles unless shapes are marked
dynamic. The seqfuse kernels already handle any shape, so a shape-agnostic fx
graph guarded on the call's *structure* (which arguments are tensors, None,
lists, Python values) is what a first call should pay for: tracing a ResNet
block here takes about a millisecond, a guard check a few microseconds.

A trace is specialized to one call signature (:func:`call_signature`): the
arguments' nesting, which leaves are tensors, and the value of every other
leaf (None, bools, numbers, strings). The generated graph takes the tensor
leaves as positional inputs, so ``if skip is None`` and ``for t in inputs``
are evaluated for real while tracing and the caller re-traces when the
signature changes. Control flow on tensor values or shapes cannot be traced
(fx raises) and the module then runs its own forward.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .rewrite import HOOK_ATTRS

__all__ = ["call_signature", "trace_forward", "UnsupportedSignature"]

_TENSOR = "T"  # a tensor leaf in a signature key
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


class UnsupportedSignature(Exception):
    """A call whose arguments cannot be guarded (an object of another type)."""


def _leaf_key(v, tensors: List[torch.Tensor]):
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return _TENSOR
    t = type(v)
    if t in (tuple, list):
        return (t, tuple(_leaf_key(e, tensors) for e in v))
    if t is dict:
        return (dict, tuple((k, _leaf_key(e, tensors)) for k, e in v.items()))
    if t in _SCALARS:
        return (t, v)  # specialized on the value: (bool, True) != (int, 1)
    raise UnsupportedSignature(f"an argument of type {t.__name__}")


def call_signature(args: tuple, kwargs: dict) -> Tuple[Any, List[torch.Tensor]]:
    """(key, tensor leaves) of a call: the key is hashable and equal for two
    calls exactly when a trace of one is valid for the other. Raises
    UnsupportedSignature for arguments it cannot compare."""
    tensors: List[torch.Tensor] = []
    if not kwargs:
        # The common case, kept cheap: forward(x) or forward(x, y).
        for a in args:
            if not isinstance(a, torch.Tensor):
                break
        else:
            return len(args), list(args)
        return (tuple(_leaf_key(a, tensors) for a in args), ()), tensors
    return (tuple(_leaf_key(a, tensors) for a in args),
            tuple((k, _leaf_key(v, tensors)) for k, v in kwargs.items())), tensors


# ---- recording submodule calls ------------------------------------------------------------------------------------

_active = threading.local()  # .tracer: the tracer of this thread's trace, if any


def _has_proxy(obj) -> bool:
    if isinstance(obj, fx.Proxy):
        return True
    if type(obj) in (tuple, list):
        return any(_has_proxy(o) for o in obj)
    if type(obj) is dict:
        return any(_has_proxy(o) for o in obj.values())
    return False


def _recording(module: nn.Module, args, kwargs) -> Optional["_LocalTracer"]:
    tracer = getattr(_active, "tracer", None)
    if tracer is not None and module in tracer.submodule_paths and (_has_proxy(args) or _has_proxy(kwargs)):
        return tracer
    return None


def _recording_forward(module: nn.Module, original):
    def forward(*args, **kwargs):
        tracer = _recording(module, args, kwargs)
        if tracer is not None:
            return tracer.record_call(module, args, kwargs)
        return original(*args, **kwargs)
    forward.__seqfuse_recorder__ = True
    return forward


_RECORDING_CLASSES: Dict[type, type] = {}


def _recording_call(self, *args, **kwargs):
    tracer = _recording(self, args, kwargs)
    if tracer is not None:
        return tracer.record_call(self, args, kwargs)
    return type(self)._seqfuse_base.__call__(self, *args, **kwargs)


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` whose calls record into this thread's trace
    (for descendants with hooks: the hooks must not see proxies)."""
    sub = _RECORDING_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__call__": _recording_call, "_seqfuse_base": cls,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _RECORDING_CLASSES[cls] = sub
    return sub


_READING_CLASSES: Dict[type, type] = {}


def _reading_class(cls: type) -> type:
    """A subclass of ``cls`` whose parameters and buffers read as proxies
    (``get_attr`` nodes) in this thread's trace of the instance, so that
    ``self.gamma.reshape(...)`` is recorded, not computed once into a
    constant that later edits of ``gamma`` would not reach."""
    sub = _READING_CLASSES.get(cls)
    if sub is None:
        def __getattr__(self, name):
            value = super(sub, self).__getattr__(name)
            tracer = getattr(_active, "tracer", None)
            if tracer is not None and tracer.root is self and isinstance(value, torch.Tensor):
                return tracer.attr_proxy(name, value)
            return value

        sub = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _READING_CLASSES[cls] = sub
    return sub


@contextmanager
def _reading_root(root: nn.Module):
    """The root's class swapped for its _reading_class while it is traced
    (the instance only; another thread calling it meanwhile runs the same
    code: the subclass defers to the class outside this thread's trace)."""
    cls = type(root)
    root.__class__ = _reading_class(cls)
    try:
        yield
    finally:
        root.__class__ = cls


@contextmanager
def _recording_descendants(root: nn.Module):
    """Redirects the calls of ``root``'s descendants (see the module docstring)."""
    swapped: List[Tuple[nn.Module, type]] = []
    forwards: List[Tuple[nn.Module, Any]] = []
    try:
        for m in root.modules():
            if m is root:
                continue
            if any(getattr(m, name, None) for name in HOOK_ATTRS):
                swapped.append((m, type(m)))
                m.__class__ = _recording_class(type(m))
            else:
                previous = m.__dict__.get("forward", _MISSING)
                original = previous if previous is not _MISSING else type(m).forward.__get__(m)
                forwards.append((m, previous))
                m.__dict__["forward"] = _recording_forward(m, original)
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        for m, previous in forwards:
            if previous is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = previous


_MISSING = object()


def _fx_tracing_flag():
    """fx's own "a symbolic trace is running" flag (thread-local), which some
    library code reads to skip checks that cannot run on proxies."""
    ctx = getattr(getattr(fx, "_symbolic_trace", None), "_is_fx_tracing_context", None)
    return ctx(True) if ctx is not None else _null_context()


@contextmanager
def _null_context():
    yield


# ---- the tracer ----------------------------------------------------------------------------------------------------

class _Proxy(fx.Proxy):
    """fx's Proxy, telling a Tensor method from a function by the method's
    name on ``torch.Tensor``. fx asks ``torch.overrides`` instead, whose table
    of every overridable function costs about 0.25 s to build, once per
    process: most of a first ``fuse()``. Anything this cannot decide cheaply
    (property getters, script methods, operators) goes to fx's own way."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        name = getattr(orig_method, "__name__", None)
        if name is None or name == "__get__" or not callable(orig_method) or isinstance(
                orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator)):
            return super().__torch_function__(orig_method, types, args, kwargs)
        args, kwargs = args or (), kwargs or {}
        proxies = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
        tracers = {p.tracer for p in proxies}
        if len(tracers) != 1:
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = tracers.pop()
        if getattr(torch.Tensor, name, None) is orig_method:
            return tracer.create_proxy("call_method", name, args, kwargs)
        return tracer.create_proxy("call_function", orig_method, args, kwargs,
                                   name=tracer.graph._target_to_str(name))


class _LocalTracer(fx.Tracer):
    """fx graph building for one module's forward, every descendant a leaf."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def __init__(self, root: nn.Module):
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.root = root
        self.graph = fx.Graph(tracer_cls=type(self))
        self.submodule_paths = {m: name for name, m in root.named_modules()}
        self._attr_proxies: Dict[str, fx.Proxy] = {}
        # Tensors the forward may read off the module tree (parameters are
        # found by create_arg itself): get_attr nodes instead of constants.
        self.tensor_attrs = {}
        for name, m in root.named_modules():
            for k, v in m.__dict__.items():
                if isinstance(v, torch.Tensor):
                    self.tensor_attrs[v] = f"{name}.{k}" if name else k
            for k, v in m._buffers.items():
                if v is not None:
                    self.tensor_attrs[v] = f"{name}.{k}" if name else k

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root

    def record_call(self, module: nn.Module, args, kwargs):
        return self.create_proxy("call_module", self.submodule_paths[module], args, kwargs)

    def attr_proxy(self, name: str, value: torch.Tensor):
        proxy = self._attr_proxies.get(name)
        if proxy is None:
            proxy = self._attr_proxies[name] = self.proxy(self.create_arg(value))
        return proxy


def _placeholders(tracer: _LocalTracer, fn, args: tuple, kwargs: dict):
    """``args``/``kwargs`` with every tensor leaf replaced by a placeholder
    proxy, named after the forward's parameter where it has one."""
    try:
        params = list(inspect.signature(fn).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    used: Dict[str, int] = {}

    def name_for(base: str) -> str:
        n = used.get(base, 0)
        used[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def swap(v, base):
        if isinstance(v, torch.Tensor):
            return tracer.create_proxy("placeholder", name_for(base), (), {})
        if type(v) in (tuple, list):
            return type(v)(swap(e, f"{base}_{i}") for i, e in enumerate(v))
        if type(v) is dict:
            return {k: swap(e, f"{base}_{k}" if str(k).isidentifier() else base) for k, e in v.items()}
        return v

    p_args = tuple(swap(a, params[i] if i < len(params) and params[i].isidentifier() else f"arg{i}")
                   for i, a in enumerate(args))
    p_kwargs = {k: swap(v, k) for k, v in kwargs.items()}
    return p_args, p_kwargs


def trace_forward(module: nn.Module, args: tuple, kwargs: dict) -> fx.Graph:
    """The graph of ``type(module).forward`` called with ``args``/``kwargs``:
    tensor leaves become the graph's inputs in :func:`call_signature`'s order,
    every other value is taken as it is, every descendant is a ``call_module``
    leaf. Raises what tracing raised (untraceable control flow, ...), or
    RuntimeError when the forward changed the module's own tensors while
    tracing (then restored)."""
    tracer = _LocalTracer(module)
    fn = type(module).forward
    # A forward that updates the module's own buffers while it runs (a
    # BatchNorm-like counter in training) would do so for real here: check,
    # and put them back.
    own = [(t, t._version) for t in list(module._buffers.values()) + list(module._parameters.values())
           if t is not None]
    saved = [t.detach().clone() for t, _ in own if not isinstance(t, nn.Parameter)]
    outer = getattr(_active, "tracer", None)
    _active.tracer = tracer
    try:
        with _recording_descendants(module), _reading_root(module), _fx_tracing_flag():
            p_args, p_kwargs = _placeholders(tracer, fn, args, kwargs)
            out = fn(module, *p_args, **p_kwargs)
            tracer.create_node("output", "output", (tracer.create_arg(out),), {})
    finally:
        _active.tracer = outer
        if any(t._version != v for t, v in own):
            with torch.no_grad():
                for (t, _), copy in zip([o for o in own if not isinstance(o[0], nn.Parameter)], saved):
                    t.copy_(copy)
            raise RuntimeError("its forward modifies the module's own tensors while it runs (not traced)")
    return tracer.graph
