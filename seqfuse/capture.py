"""Chains inside custom forwards.

``fuse()`` gives every module whose ``forward`` is its own (a ResNet block, a
squeeze-and-excitation layer, the model itself) a :class:`CapturedForward`:
torch.fx traces the module's forward one level deep (every submodule is a leaf
called as it is), finds the runs of fusible calls in the graph and replaces
each run by one :class:`Chain` call: a :class:`FusedSequential` over the same
module objects, plus the residual addition and activation that close the run.

A fusible call is a stock layer the planner fuses (``self.conv1(x)``), a
Sequential whose forward is ``nn.Sequential``'s (inlined: its children join the
run), or the functional form of an activation, flatten, global average pool or
eval dropout (``F.relu(x)``, ``x.relu_()``, ``torch.flatten(x, 1)``). Links of
a run pass one tensor from one call to the next and nowhere else.

The module keeps its class, children, parameters and ``state_dict``: the
rewritten forward is an instance attribute (``module.forward``), and the
chains hold the module objects without registering them anywhere. What the
graph was built from (the module's attributes, its children, the containers
it inlined, the training flag, the global hooks) is checked on every call;
any change re-traces. Under ``torch.compile``, ``torch.export``,
``torch.jit`` or ONNX tracing the module's own forward runs instead.

Layout: an inference call (no autograd, eval mode) of a captured model that
has convolutions, given a contiguous (NCHW) 4-D input, runs channels_last
inside: the input is converted once, every chain and eager op between chains
then works on NHWC activations (a fused chain keeps its input's layout, as
eager's convolution does), and 4-D outputs are returned contiguous, eager's
layout for that input. Code that is not seqfuse's or a stock layer (a forward
that could not be traced, ``x.view(...)`` in a traced one) gets its tensors
contiguous, so it sees what it would see in eager.
"""

from __future__ import annotations

import linecache
import operator
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .container import FusedSequential
from .planner import CONV, LINEAR, BATCHNORM, BATCHNORM2D, classify, global_hook_dicts

__all__ = ["CapturedForward", "Chain", "capture_module", "wants_capture", "is_sequential_like"]

_MISSING = object()

# torch.fx patches nn.Module.__call__ and __getattr__ globally while it
# traces: one trace at a time, and captured calls of other threads wait for it
# (they would otherwise be recorded into it).
_TRACE_LOCK = threading.RLock()
_tracing_thread: Optional[int] = None
# Set while this thread runs a captured model channels_last (see the module docstring).
_run_layout = threading.local()
_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_WEIGHTED = (CONV, LINEAR, BATCHNORM, BATCHNORM2D)


def is_sequential_like(m: nn.Module) -> bool:
    """A Sequential (or subclass) whose forward is ``nn.Sequential``'s, possibly
    converted to a FusedSequential: its children run in order, one tensor
    flowing through."""
    if not isinstance(m, nn.Sequential) or "forward" in m.__dict__:
        return False
    fwd = type(m).forward
    return fwd is nn.Sequential.forward or fwd is FusedSequential.forward


def wants_capture(m: nn.Module) -> bool:
    """Whether ``fuse()`` traces ``m``'s forward: a forward of its own, outside
    torch (stock layers have kernels or run eagerly), not a Sequential."""
    t = type(m)
    if is_sequential_like(m) or isinstance(m, FusedSequential) or t.__module__.startswith("torch."):
        return False
    if isinstance(m.__dict__.get("forward"), CapturedForward):
        return True
    if "forward" in m.__dict__:
        return False  # the user's own instance-level forward: left as it is
    return getattr(t, "forward", None) not in (None, nn.Module.forward, getattr(nn.Module, "_forward_unimplemented", None))


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in _HOOK_ATTRS)


# ---- the functional forms a chain accepts -------------------------------------------------------------------------

def _inplace(node: fx.Node, index: int) -> bool:
    v = node.kwargs.get("inplace", node.args[index] if len(node.args) > index else False)
    return bool(v) if isinstance(v, bool) else False


def _scalar_arg(node: fx.Node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _functional_module(node: fx.Node) -> Optional[nn.Module]:
    """The stateless stock module computing what a call_function/call_method
    node computes, or None."""
    t = node.target
    method = node.op == "call_method"
    if (method and t in ("relu", "relu_")) or t in (F.relu, torch.relu, torch.relu_, F.relu_):
        return nn.ReLU(inplace=t in ("relu_", torch.relu_, F.relu_) or (t is F.relu and _inplace(node, 1)))
    if t is F.relu6:
        return nn.ReLU6(inplace=_inplace(node, 1))
    if t is F.hardtanh and (_scalar_arg(node, 1, "min_val", -1.0), _scalar_arg(node, 2, "max_val", 1.0)) == (0.0, 6.0):
        return nn.ReLU6(inplace=_inplace(node, 3))
    if (method and t in ("sigmoid", "sigmoid_")) or t in (torch.sigmoid, F.sigmoid):
        return nn.Sigmoid()
    if (method and t in ("tanh",)) or t in (torch.tanh, F.tanh):
        return nn.Tanh()
    if t is F.silu:
        return nn.SiLU(inplace=_inplace(node, 1))
    if t is F.hardswish:
        return nn.Hardswish(inplace=_inplace(node, 1))
    if t is F.hardsigmoid:
        return nn.Hardsigmoid(inplace=_inplace(node, 1))
    if t is F.gelu:
        approximate = node.kwargs.get("approximate", "none")
        return nn.GELU(approximate=approximate) if isinstance(approximate, str) else None
    if t is F.leaky_relu:
        slope = _scalar_arg(node, 1, "negative_slope", 0.01)
        return nn.LeakyReLU(slope, inplace=_inplace(node, 2)) if isinstance(slope, (int, float)) else None
    if t is torch.flatten or (method and t == "flatten"):
        start, end = _scalar_arg(node, 1, "start_dim", 0), _scalar_arg(node, 2, "end_dim", -1)
        return nn.Flatten(start, end) if isinstance(start, int) and isinstance(end, int) else None
    if t is F.adaptive_avg_pool2d:
        size = _scalar_arg(node, 1, "output_size", None)
        return nn.AdaptiveAvgPool2d(1) if size in (1, (1, 1), [1, 1]) else None
    if t is F.dropout:
        training = _scalar_arg(node, 2, "training", True)
        return nn.Identity() if training is False else None
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs


def _one_tensor_input(node: fx.Node) -> Optional[fx.Node]:
    """The node's only Node argument when it is the first positional one."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    found: List[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    return None if found else node.args[0]


# ---- chains ------------------------------------------------------------------------------------------------------

class Chain:
    """One fused run found in a traced forward: ``post(seq(x) + residual)``.

    ``seq`` is a FusedSequential over the run's module objects (registered in
    no module of the model); ``residual`` (optional) is the tensor added to its
    output, ``post`` an activation applied after that addition. Without
    autograd the addition and activation happen in place on ``seq``'s freshly
    produced output.
    """

    def __init__(self, names: List[str], modules: List[nn.Module], residual: bool, post: Optional[nn.Module],
                 post_name: str = "", containers: Sequence[nn.Module] = ()):
        keys, seen = [], set()
        for n in names:
            key = n.replace(".", "/") or "(self)"
            while key in seen:
                key += "'"
            seen.add(key)
            keys.append(key)
        self.names = names
        self.seq = FusedSequential(OrderedDict(zip(keys, modules)))
        self.residual = residual
        self.post = post
        self.post_name = post_name
        self.containers = list(containers)  # the Sequentials inlined into the run (their own forward is bypassed)
        self._relu_post = post is not None and type(post) is nn.ReLU

    def __call__(self, x, residual=None):
        y = self.seq(x)
        if not self.residual:
            return y
        # In place only on a fresh output of the same shape and dtype, and
        # only where autograd records nothing.
        in_place = (
            isinstance(residual, torch.Tensor) and isinstance(y, torch.Tensor)
            and (not torch.is_grad_enabled() or not (y.requires_grad or residual.requires_grad))
            and y.shape == residual.shape and y.dtype == residual.dtype and y is not x and y._base is None
        )
        y = y.add_(residual) if in_place else y + residual
        if self.post is None:
            return y
        if self._relu_post and not _has_hooks(self.post):
            return y.relu_() if in_place else torch.relu(y)
        return self.post(y)

    def describe(self) -> str:
        text = " -> ".join(self.names)
        if self.residual:
            text += " -> + residual"
            if self.post is not None:
                text += f" -> {self.post_name or type(self.post).__name__}"
        return text


def _make_call(chain: Chain, index: int):
    """A plain function for the graph to call (fx names call targets by
    ``__name__``; the generated code finds it in its globals)."""

    def seqfuse_chain(*args):
        return chain(*args)

    seqfuse_chain.__name__ = seqfuse_chain.__qualname__ = f"seqfuse_chain_{index}"
    seqfuse_chain.__module__ = "seqfuse.capture"
    seqfuse_chain.chain = chain
    return seqfuse_chain


def _in_nhwc_run() -> bool:
    return getattr(_run_layout, "active", False)


def _eager_layout(x):
    """``x`` as eager would hold it in a channels_last run: a 4-D tensor made
    contiguous (the run's input was)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous()
    return x


def _nchw_output(x):
    """A channels_last activation leaving a channels_last run, in the layout
    eager gives for the run's NCHW input; any other output as it is."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return x.contiguous()
    return x


def seqfuse_view(x, *shape):
    """``x.view(*shape)`` in a captured forward: in a channels_last run, a view
    the NHWC strides cannot express is taken of eager's (contiguous) layout."""
    if _in_nhwc_run() and isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        try:
            return x.view(*shape)
        except RuntimeError:
            x = x.contiguous()
    return x.view(*shape)


def seqfuse_contiguous(x):
    """``x.contiguous()`` in a captured forward: in a channels_last run a 4-D
    activation stays (or becomes) compact channels_last, so the chains after
    it keep NHWC; ``seqfuse_view`` gives code that needs NCHW strides them."""
    if _in_nhwc_run() and isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def seqfuse_channel_shuffle(x, split_shape, out_shape):
    """ShuffleNet's channel shuffle, ``x.view(b, g, c // g, h, w).transpose(1,
    2).contiguous().view(b, c, h, w)``, in one copy that keeps a channels_last
    input channels_last (the shuffle permutes each pixel's channels). Any other
    shapes run the ops as written."""
    if (_in_nhwc_run() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()):
        b, c, h, w = x.shape
        g = split_shape[1]
        if (tuple(split_shape) == (b, g, c // g, h, w) and g * (c // g) == c
                and tuple(out_shape) in ((b, c, h, w), (b, -1, h, w))):
            pixels = x.permute(0, 2, 3, 1).reshape(b, h, w, g, c // g)
            return pixels.transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.view(*split_shape).transpose(1, 2).contiguous().view(*out_shape)


for _f in (seqfuse_view, seqfuse_contiguous, seqfuse_channel_shuffle):
    _f.__module__ = "seqfuse.capture"


def _is_method(node, name: str, nargs: int) -> bool:
    return node.op == "call_method" and node.target == name and len(node.args) == nargs and not node.kwargs


def _rewrite_layout_ops(graph: fx.Graph) -> None:
    """Channel shuffles become one call; views and contiguous() calls learn
    the channels_last run (see seqfuse_view, seqfuse_contiguous)."""
    for node in list(graph.nodes):
        # view(b, g, c/g, h, w) -> transpose(1, 2) -> contiguous() -> view(b, c, h, w)
        if not (_is_method(node, "contiguous", 1) and len(node.users) == 1):
            continue
        tr, out = node.args[0], next(iter(node.users))
        transpose = isinstance(tr, fx.Node) and (
            _is_method(tr, "transpose", 3) or (tr.op == "call_function" and tr.target is torch.transpose
                                               and len(tr.args) == 3 and not tr.kwargs))
        if not (transpose and tuple(tr.args[1:]) == (1, 2) and len(tr.users) == 1 and _is_method(out, "view", 5)):
            continue
        split = tr.args[0]
        if not (isinstance(split, fx.Node) and _is_method(split, "view", 6) and len(split.users) == 1):
            continue
        with graph.inserting_before(out):
            call = graph.call_function(seqfuse_channel_shuffle, (split.args[0], split.args[1:], out.args[1:]))
        out.replace_all_uses_with(call)
        for n in (out, node, tr, split):
            graph.erase_node(n)
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target in ("view", "contiguous") and (
                node.target == "view" or (len(node.args) == 1 and not node.kwargs)):
            fn = seqfuse_view if node.target == "view" else seqfuse_contiguous
            with graph.inserting_before(node):
                call = graph.call_function(fn, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            graph.erase_node(node)


def _has_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


class Traced:
    """One traced forward: the generated function, its chains, and the guard
    of everything the graph was built from."""

    def __init__(self, fn, chains: List[Chain], guard: List[tuple], empty: List[dict], error: str = "",
                 leftovers: Optional[Dict[str, str]] = None):
        self.fn = fn
        self.chains = chains
        self.guard = guard
        self.empty = empty  # hook dicts that must stay empty (inlined containers, global hooks)
        self.error = error
        self.leftovers = leftovers or {}  # qualified name of a weighted module left out of chains -> why

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
    changes: its attributes, children, parameters and buffers."""
    d = m.__dict__
    guard.extend((d, k, v) for k, v in d.items() if k != "forward")
    for table in (m._modules, m._parameters, m._buffers):
        guard.extend((table, k, v) for k, v in table.items())


def _path_guard(root: nn.Module, target: str, guard: List[tuple]) -> nn.Module:
    m = root
    for part in target.split("."):
        child = m._modules.get(part)
        if child is None:
            raise AttributeError(f"{target} is not a submodule path")
        guard.append((m._modules, part, child))
        m = child
    return m


def _inline(container: nn.Module, prefix: str, names: List[str], modules: List[nn.Module],
            containers: List[nn.Module]) -> None:
    """A Sequential-like container's leaves in call order (nested ones inlined)."""
    containers.append(container)
    for key, child in container._modules.items():
        name = f"{prefix}.{key}" if prefix else key
        if child is not None and is_sequential_like(child) and not _has_hooks(child):
            _inline(child, name, names, modules, containers)
        else:
            names.append(name)
            modules.append(child)


def capture_module(module: nn.Module) -> Traced:
    """Traces ``module``'s own forward and rewrites its chains (see the module
    docstring). Never raises: an untraceable forward gives a Traced with
    ``fn=None`` and the error, and the module then runs its own forward."""
    guard: List[tuple] = []
    empty: List[dict] = [d for d in global_hook_dicts()]
    _guard_module(module, guard)
    before = dict(module.__dict__)
    try:
        graph = _LeafTracer(module).trace(module)
    except Exception as err:  # data-dependent control flow, unsupported Python, ...
        _restore(module, before)
        return Traced(None, [], guard, empty, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if any(module.__dict__.get(k, _MISSING) is not v for k, v in before.items()) or len(module.__dict__) != len(before):
        _restore(module, before)
        return Traced(None, [], guard, empty, error="its forward assigns attributes of the module (not traced)")

    chains, leftovers = _rewrite(module, graph, guard, empty)
    _rewrite_layout_ops(graph)
    graph.lint()
    code = graph.python_code(root_module="self")
    filename = f"<seqfuse: captured {type(module).__qualname__}.forward #{id(module):x}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return Traced(namespace["forward"], chains, guard, empty, leftovers=leftovers)


def _restore(module: nn.Module, before: dict) -> None:
    module.__dict__.clear()
    module.__dict__.update(before)


def _units(module: nn.Module, graph: fx.Graph, guard: List[tuple]):
    """Per node that may be a link of a chain: (names, modules, inlined
    containers); and for call_module nodes of weighted modules left out, why."""
    units: Dict[fx.Node, Tuple[List[str], List[nn.Module], List[nn.Module]]] = {}
    why: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = _path_guard(module, node.target, guard)
            if _one_tensor_input(node) is None:
                why[node.target] = "called with several tensors or keyword arguments"
                continue
            if is_sequential_like(m) and not _has_hooks(m):
                names, mods, containers = [], [], []
                _inline(m, node.target, names, mods, containers)
                if mods:
                    units[node] = (names, mods, containers)
                continue
            c = classify(m)
            if c.role is not None:
                units[node] = ([node.target], [m], [])
            else:
                why[node.target] = c.reason
        elif node.op in ("call_function", "call_method"):
            if _one_tensor_input(node) is None:
                continue
            m = _functional_module(node)
            if m is not None:
                units[node] = ([f"{node.name}()"], [m], [])
    return units, why


def _rewrite(module: nn.Module, graph: fx.Graph, guard: List[tuple], empty: List[dict]):
    units, why = _units(module, graph, guard)
    chains: List[Chain] = []
    taken = set()
    for node in list(graph.nodes):
        if node in taken or node not in units:
            continue
        run = [node]
        while len(run[-1].users) == 1:
            nxt = next(iter(run[-1].users))
            if nxt not in units or nxt in taken or _one_tensor_input(nxt) is not run[-1]:
                break
            run.append(nxt)
        names, mods, containers = [], [], []
        for n in run:
            ns, ms, cs = units[n]
            names += ns
            mods += ms
            containers += cs
        if not any(m is not None and classify(m).role in _WEIGHTED for m in mods):
            continue  # nothing with weights: the kernels would save nothing
        # The residual epilogue: relu(chain(x) + other), as the blocks write it.
        end, residual, post, post_name = run[-1], None, None, ""
        absorbed = list(run)
        if len(end.users) == 1:
            add = next(iter(end.users))
            if _is_add(add) and all(isinstance(a, fx.Node) for a in add.args) and add.args[0] is not add.args[1]:
                residual = add.args[1] if add.args[0] is end else add.args[0]
                absorbed.append(add)
                if len(add.users) == 1:
                    act = next(iter(add.users))
                    if act in units and _one_tensor_input(act) is add and len(units[act][1]) == 1:
                        m = units[act][1][0]
                        if classify(m).role == "activation":
                            post, post_name = m, units[act][0][0]
                            absorbed.append(act)
        for c in containers:
            empty.extend(getattr(c, name) for name in _HOOK_ATTRS)
            guard.extend((c._modules, k, v) for k, v in c._modules.items())
        chain = Chain(names, mods, residual is not None, post, post_name, containers)
        args = (run[0].args[0],) + ((residual,) if residual is not None else ())
        last = absorbed[-1]
        with graph.inserting_before(last):
            call = graph.call_function(_make_call(chain, len(chains)), args)
        last.replace_all_uses_with(call)
        for n in reversed(absorbed):
            graph.erase_node(n)
        taken.update(absorbed)
        chains.append(chain)
    leftovers = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in why:
            continue
        if node.op == "call_module":
            m = module.get_submodule(node.target)
            if classify(m).role in _WEIGHTED:
                leftovers[node.target] = "called alone with its input or output shared (no chain around it)"
    for target, reason in why.items():
        try:
            m = module.get_submodule(target)
        except AttributeError:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            leftovers[target] = reason
    return chains, leftovers


# ---- the installed forward -----------------------------------------------------------------------------------------

class CapturedForward:
    """What ``fuse()`` sets as ``module.forward``: runs the traced, rewritten
    forward while what it was built from is unchanged, re-traces otherwise,
    and runs the module's own forward under compilers and tracers.

    Copies and pickles carry no graph: they re-trace on their first call.
    """

    def __init__(self, module: nn.Module, trace_now: bool = True):
        self.module = module
        self._traced: Dict[bool, Traced] = {}
        self._nhwc: Optional[bool] = None  # whether inference calls run channels_last (the model convolves)
        if trace_now:
            self.traced()

    def traced(self) -> Traced:
        m = self.module
        t = self._traced.get(m.training)
        if t is not None and t.valid():
            return t
        global _tracing_thread
        with _TRACE_LOCK:
            t = self._traced.get(m.training)
            if t is None or not t.valid():
                outer, _tracing_thread = _tracing_thread, threading.get_ident()
                try:
                    t = capture_module(m)
                finally:
                    _tracing_thread = outer
                self._traced[m.training] = t
        return t

    def __call__(self, *args, **kwargs):
        m = self.module
        if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
            return type(m).forward(m, *args, **kwargs)
        if _tracing_thread is not None and _tracing_thread != threading.get_ident():
            with _TRACE_LOCK:  # another thread is tracing: wait until nn.Module is restored
                pass
        t = self.traced()
        if _in_nhwc_run():
            if t.fn is None:  # the module's own code: eager's layout
                args = tuple(_eager_layout(a) for a in args)
                kwargs = {k: _eager_layout(v) for k, v in kwargs.items()}
                return type(m).forward(m, *args, **kwargs)
            return t.fn(m, *args, **kwargs)
        if t.fn is None:
            return type(m).forward(m, *args, **kwargs)
        if m.training or torch.is_grad_enabled() or not self._runs_nhwc(args):
            return t.fn(m, *args, **kwargs)
        args = tuple(a.contiguous(memory_format=torch.channels_last) if _nchw_input(a) else a for a in args)
        _run_layout.active = True
        try:
            out = t.fn(m, *args, **kwargs)
        finally:
            _run_layout.active = False
        return torch.utils._pytree.tree_map(_nchw_output, out)

    def _runs_nhwc(self, args) -> bool:
        if self._nhwc is None:
            self._nhwc = _has_convolution(self.module)
        return self._nhwc and any(_nchw_input(a) for a in args)

    def __getattr__(self, name: str):
        # What tools read off a forward (torch.export: __code__; inspect:
        # __wrapped__, the signature) is the module's own forward's.
        module = self.__dict__.get("module")
        if module is None or name == "_traced":
            raise AttributeError(name)
        return getattr(type(module).forward.__get__(module), name)

    @property
    def __wrapped__(self):
        return type(self.module).forward.__get__(self.module)

    def __reduce__(self):
        return (_restore_captured, (self.module,))

    def __repr__(self) -> str:
        return f"<seqfuse captured forward of {type(self.module).__name__}>"


def _nchw_input(a) -> bool:
    return (isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point() and a.device.type == "cpu"
            and a.is_contiguous() and not a.is_contiguous(memory_format=torch.channels_last))


def _restore_captured(module: nn.Module) -> CapturedForward:
    # The module may still be under construction (pickle, deepcopy): trace on first call.
    return CapturedForward(module, trace_now=False)
