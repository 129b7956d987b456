"""Chains in a traced forward: the runs of fusible calls, rewritten into one
:class:`Chain` call each.

A fusible call is a stock layer the planner fuses (``self.conv1(x)``), a
Sequential whose forward is ``nn.Sequential``'s (inlined: its children join the
run), or the functional form of an activation, flatten, global average pool or
eval dropout (``F.relu(x)``, ``x.relu_()``, ``torch.flatten(x, 1)``). Links of
a run pass one tensor from one call to the next and nowhere else. A run closes
with the residual addition and activation that follow it (``relu(run(x) +
identity)``), as the blocks of residual networks write them.
"""

from __future__ import annotations

import inspect
import operator
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._loader import _C
from ..container import FusedSequential
from ..planner import ACTIVATION_FORMS, CONV, LINEAR, BATCHNORM, BATCHNORM2D, classify

__all__ = ["Chain", "rewrite_chains", "drop_shape_asserts", "is_sequential_like", "has_hooks"]

HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_WEIGHTED = (CONV, LINEAR, BATCHNORM, BATCHNORM2D)


def is_sequential_like(m: nn.Module) -> bool:
    """A Sequential (or subclass) whose forward is ``nn.Sequential``'s, possibly
    converted to a FusedSequential: its children run in order, one tensor
    flowing through."""
    if not isinstance(m, nn.Sequential) or "forward" in m.__dict__:
        return False
    fwd = type(m).forward
    return fwd is nn.Sequential.forward or fwd is FusedSequential.forward


def has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in HOOK_ATTRS)


# ---- the functional forms a chain accepts -------------------------------------------------------------------------

def _scalar_arg(node: fx.Node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _functional_activations() -> Dict[tuple, tuple]:
    """(node op, target) -> (module builder, in place) for every functional
    form of the planner's activation table (ACTIVATION_FORMS)."""
    forms = {}
    for form in ACTIVATION_FORMS:
        for f in form.functions + form.in_place + form.methods:
            target, build = f if isinstance(f, tuple) else (f, form.module)
            op = "call_method" if isinstance(target, str) else "call_function"
            forms[(op, target)] = (build, f in form.in_place or target in form.in_place)
    return forms


_FUNCTIONAL_ACTIVATIONS = _functional_activations()


def _activation_module(node: fx.Node, build, in_place: bool) -> Optional[nn.Module]:
    """The module a functional activation call computes: its arguments after
    the input are the module's constructor arguments (Python values only)."""
    args, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
        return None
    if in_place and isinstance(build, type) and "inplace" in inspect.signature(build.__init__).parameters:
        kwargs["inplace"] = True
    try:
        m = build(*args, **kwargs)
        return m if m is not None and classify(m).role is not None else None
    except (TypeError, ValueError):  # arguments the module rejects, or an alpha that is no number
        return None


def _functional_module(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """The stock module computing what a call_function/call_method node
    computes, or None: a stateless one for the activations and shape ops, a
    view of ``root``'s own tensors for ``F.batch_norm``/``F.conv2d``/
    ``F.linear`` on them (see _weighted_view)."""
    t = node.target
    method = node.op == "call_method"
    activation = _FUNCTIONAL_ACTIVATIONS.get((node.op, t))
    if activation is not None:
        return _activation_module(node, *activation)
    if t is torch.flatten or (method and t == "flatten"):
        start, end = _scalar_arg(node, 1, "start_dim", 0), _scalar_arg(node, 2, "end_dim", -1)
        return nn.Flatten(start, end) if isinstance(start, int) and isinstance(end, int) else None
    if t is F.adaptive_avg_pool2d:
        size = _scalar_arg(node, 1, "output_size", None)
        return nn.AdaptiveAvgPool2d(1) if size in (1, (1, 1), [1, 1]) else None
    if t is F.dropout:
        training = _scalar_arg(node, 2, "training", True)
        return nn.Identity() if training is False else None
    if t in _WEIGHTED_FUNCTIONS and node.op == "call_function":
        return _weighted_view(node, root)
    return None


def _attr(root: nn.Module, arg) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads off ``root`` (None for a None
    argument); raises LookupError for anything else."""
    if arg is None:
        return None
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        raise LookupError(arg)
    obj = root
    for part in arg.target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise LookupError(arg)
    return obj


def _weighted_view(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """A stock BatchNorm (eval), Conv2d or Linear module over the very
    tensors that ``F.batch_norm``/``F.conv2d``/``F.linear`` reads off the
    traced module (``root``): a library layer whose forward calls these on its
    own parameters (timm's BatchNormAct2d, a conv or linear subclass) joins a
    chain as the stock layer it computes. The view shares the parameter and
    buffer objects (so the plan sees edits and re-packs), registers nowhere,
    and names its owner for explain(). None where the call is not one of
    these (training-mode batch norm, a weight computed in the forward, ...)."""
    t = node.target
    try:
        if t is F.batch_norm:
            mean, var = _attr(root, _scalar_arg(node, 1, "running_mean", None)), _attr(root, _scalar_arg(node, 2, "running_var", None))
            weight, bias = _attr(root, _scalar_arg(node, 3, "weight", None)), _attr(root, _scalar_arg(node, 4, "bias", None))
            training, momentum = _scalar_arg(node, 5, "training", False), _scalar_arg(node, 6, "momentum", 0.1)
            eps = _scalar_arg(node, 7, "eps", 1e-5)
            if training is not False or mean is None or var is None or not isinstance(eps, float):
                return None
            if (weight is None) != (bias is None) or not isinstance(momentum, (float, type(None))):
                return None
            cls = nn.BatchNorm1d if isinstance(root, nn.BatchNorm1d) else nn.BatchNorm2d
            view = cls(mean.numel(), eps=eps, momentum=momentum, affine=weight is not None, device="meta")
            view._parameters.update(weight=weight, bias=bias)
            view._buffers.update(running_mean=mean, running_var=var,
                                 num_batches_tracked=getattr(root, "num_batches_tracked", None))
            view.eval()
        elif t is F.conv2d:
            weight, bias = _attr(root, _scalar_arg(node, 1, "weight", None)), _attr(root, _scalar_arg(node, 2, "bias", None))
            stride, padding = _scalar_arg(node, 3, "stride", 1), _scalar_arg(node, 4, "padding", 0)
            dilation, groups = _scalar_arg(node, 5, "dilation", 1), _scalar_arg(node, 6, "groups", 1)
            if weight is None or weight.dim() != 4 or not isinstance(groups, int):
                return None
            for v in (stride, padding, dilation):
                if not (isinstance(v, (int, str)) or (isinstance(v, (tuple, list)) and all(isinstance(e, int) for e in v))):
                    return None
            out_c, in_per_group, kh, kw = weight.shape
            view = nn.Conv2d(in_per_group * groups, out_c, (kh, kw), stride, padding, dilation, groups,
                             bias=bias is not None, device="meta")
            view._parameters.update(weight=weight, bias=bias)
        else:
            weight, bias = _attr(root, _scalar_arg(node, 1, "weight", None)), _attr(root, _scalar_arg(node, 2, "bias", None))
            if weight is None or weight.dim() != 2:
                return None
            view = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            view._parameters.update(weight=weight, bias=bias)
    except (LookupError, AttributeError, TypeError, ValueError):
        return None
    view.train(False) if t is F.batch_norm else view.train(root.training)
    view.__dict__["_seqfuse_owner"] = root
    return view


_PURE_CHECKS = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                operator.and_, operator.or_, operator.not_, operator.getitem, len}


def drop_shape_asserts(graph: fx.Graph) -> None:
    """Removes ``torch._assert`` checks on shapes (``_assert(x.ndim == 4,
    ...)``, as library layers write them) and the nodes left computing
    nothing but shape facts nobody reads (``x.ndim`` in an assert's message):
    they would keep the tensor from being a link of a chain. An input they
    would have rejected is still rejected, by the fused layer or, through the
    safety net, by the module's own forward."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert:
            graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            pure = (node.op == "call_function" and node.target in _PURE_CHECKS) or (
                node.op == "call_method" and node.target in ("dim", "size"))
            if pure and not node.users:
                graph.erase_node(node)
                changed = True


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs


_WEIGHTED_FUNCTIONS = (F.batch_norm, F.conv2d, F.linear)


def _one_tensor_input(node: fx.Node) -> Optional[fx.Node]:
    """The node's only Node argument when it is the first positional one
    (for ``F.batch_norm``/``F.conv2d``/``F.linear``: the only one that is not
    a module's tensor, which _weighted_view takes in)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    found: List[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    if found and node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS:
        found = [n for n in found if n.op != "get_attr"]
    return None if found else node.args[0]


# ---- chains ------------------------------------------------------------------------------------------------------

class Chain:
    """One fused run found in a traced forward: ``post(seq(x) + residual)``.

    ``seq`` is a FusedSequential over the run's module objects (registered in
    no module of the model); ``residual`` (optional) is the tensor added to its
    output, ``post`` an activation applied after that addition. Where
    autograd records nothing, the addition (and a ReLU) happen in place on
    ``seq``'s freshly produced output (plain tensors of one shape and dtype).
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
        self.modules = list(modules)
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
        relu = self._relu_post and not has_hooks(self.post)
        # In place (and the ReLU too) on a fresh output where that is what
        # eager computes, decided and done in one native call (see
        # csrc/runtime/residual.h); out of place in every other case.
        y_in_place = _C.add_residual_(y, residual, x, relu)
        if y_in_place is not None:
            y = y_in_place
        else:
            y = y + residual
            if relu:
                y = torch.relu(y)
        return y if self.post is None or relu else self.post(y)

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
    seqfuse_chain.__module__ = __name__
    seqfuse_chain.chain = chain
    return seqfuse_chain


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
        if child is not None and is_sequential_like(child) and not has_hooks(child):
            _inline(child, name, names, modules, containers)
        else:
            names.append(name)
            modules.append(child)


def _units(module: nn.Module, graph: fx.Graph, guard: List[tuple], empty: List[dict], expand):
    """Per node that may be a link of a chain: (names, modules, inlined
    containers); and for call_module nodes of weighted modules left out, why.
    ``expand(m)`` gives, for a module of another class whose own forward is
    one chain from its input to its output, that chain's (names, modules,
    containers, guard, empty), else None."""
    units: Dict[fx.Node, Tuple[List[str], List[nn.Module], List[nn.Module]]] = {}
    why: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = _path_guard(module, node.target, guard)
            if _one_tensor_input(node) is None:
                why[node.target] = "called with several tensors or keyword arguments"
                continue
            if is_sequential_like(m) and not has_hooks(m):
                names, mods, containers = [], [], []
                _inline(m, node.target, names, mods, containers)
                if mods:
                    units[node] = (names, mods, containers)
                continue
            c = classify(m)
            if c.role is not None:
                units[node] = ([node.target], [m], [])
                continue
            inner = expand(m) if not has_hooks(m) else None
            if inner is not None:
                names, mods, containers, inner_guard, inner_empty = inner
                units[node] = ([f"{node.target}.{n}" for n in names], mods, containers)
                guard.extend(inner_guard)
                empty.extend(inner_empty)
            else:
                why[node.target] = c.reason
        elif node.op in ("call_function", "call_method"):
            if _one_tensor_input(node) is None:
                continue
            m = _functional_module(node, module)
            if m is not None:
                units[node] = ([f"{node.name}()"], [m], [])
    return units, why


def rewrite_chains(module: nn.Module, graph: fx.Graph, guard: List[tuple], empty: List[dict], expand=lambda m: None):
    """Replaces every run of fusible calls in ``graph`` (traced from
    ``module``'s forward) by one Chain call. Returns the chains and, for the
    weighted modules left out, why; extends ``guard``/``empty`` with what the
    rewrite read (the paths of called submodules, the inlined containers)."""
    drop_shape_asserts(graph)
    units, why = _units(module, graph, guard, empty, expand)
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
            empty.extend(getattr(c, name) for name in HOOK_ATTRS)
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
