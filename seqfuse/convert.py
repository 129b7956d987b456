"""fuse(model): every Sequential inside a model runs as a FusedSequential, and
every custom forward runs its chains as fused calls (seqfuse/capture.py)."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Optional

import torch

from torch import nn

from . import engine_cache
from ._loader import _C
from .capture import CapturedForward, is_sequential_like, wants_capture
from .container import FusedSequential

__all__ = ["fuse", "fused_subclass"]

_SUBCLASSES: Dict[type, type] = {}


def _new_fused_subclass(base: type):
    """Unpickling / deepcopy of a generated subclass: an empty instance of it
    (Module.__setstate__ then fills it)."""
    return object.__new__(fused_subclass(base))


def _reduce_ex(self, protocol):
    return (_new_fused_subclass, (type(self)._seqfuse_base,), self.__getstate__())


def fused_subclass(cls: type) -> type:
    """The FusedSequential subclass of a Sequential subclass ``cls`` (one per
    class): ``isinstance(m, cls)`` and ``type(m).__name__`` are kept, the
    forward is FusedSequential's (``cls`` did not override nn.Sequential's),
    and instances pickle and deep-copy although the class is generated.

    >>> from torchvision.ops.misc import Conv2dNormActivation
    >>> sub = fused_subclass(Conv2dNormActivation)
    >>> sub.__name__, issubclass(sub, Conv2dNormActivation), issubclass(sub, FusedSequential)
    ('Conv2dNormActivation', True, True)
    """
    if cls is nn.Sequential:
        return FusedSequential
    if issubclass(cls, FusedSequential):
        return cls
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (FusedSequential, cls), {
            "__module__": cls.__module__,
            "__qualname__": f"fused_subclass({cls.__qualname__})",
            "__doc__": cls.__doc__,
            "__reduce_ex__": _reduce_ex,
            "_seqfuse_base": cls,
        })
        _SUBCLASSES[cls] = sub
    return sub


def fuse(model: nn.Module, inplace: bool = False, capture: bool = True,
         example_inputs: Optional[Any] = None) -> nn.Module:
    """Returns ``model`` running its fusible chains as fused seqfuse calls:

    * every ``nn.Sequential``, and every Sequential subclass that keeps
      ``nn.Sequential.forward`` (e.g. torchvision's ``Conv2dNormActivation``),
      becomes a :class:`FusedSequential` (a generated subclass for the latter,
      so ``isinstance`` and the class name hold);
    * with ``capture=True`` (the default), every module with a forward of its
      own (a ResNet block, the model itself) gets a captured forward: traced
      here for a call with one tensor, and on the first call with any other
      kind of arguments (without patching anything global), the chains in it (stock layers, inlined Sequentials,
      functional activations, the residual addition and activation closing a
      block) run as one fused call each, and the trace is guarded on every
      call. A forward that cannot be traced runs as it is;
      :func:`seqfuse.explain` says why;
    * an eval-mode model's chains are planned and their weights folded and
      packed here, for what a call with one tensor runs, so a first call only
      runs (a training-mode model packs when an inference call needs it).

    ``example_inputs`` (a tensor, or a tuple of a forward's arguments, or a
    list of those) are run without autograd before ``fuse()`` returns, each
    until the engines of its shape classes are chosen (a few calls: the
    choice is measured by the calls themselves): the traces, plans and engine
    choices of those cases are then ready, and a first call with the same
    shapes costs what a later one does.
    The engine choices they measured are saved for the next process
    (:mod:`seqfuse.engine_cache`).

    Classes, children, parameters and ``state_dict`` keys are unchanged. With
    ``inplace=False`` (the default) the model is deep-copied first and the
    original is left as it was.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    >>> fused = fuse(net)
    >>> type(fused).__name__, type(fused[2]).__name__, type(net).__name__
    ('FusedSequential', 'FusedSequential', 'Sequential')
    >>> list(fused.state_dict()) == list(net.state_dict())
    True
    """
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        if is_sequential_like(m) and not isinstance(m, FusedSequential):
            # FusedSequential adds no state of its own, so switching the class
            # keeps the object, its children, parameters and hooks as they are.
            m.__class__ = fused_subclass(type(m))
    if capture:
        installed = []
        for m in model.modules():
            if wants_capture(m) and not isinstance(m.__dict__.get("forward"), CapturedForward):
                # An instance attribute: the class, and everything that
                # pickles or compares by class, stays the model's own.
                m.__dict__["forward"] = installed_forward = CapturedForward(m)
                installed.append(installed_forward)
        # The one-tensor case, forward(x), is the one nearly every module is
        # called with: traced now (children first, so a parent takes in the
        # chains of its children); an eval-mode model is then planned and
        # packed for it below, and a first call only runs.
        for cf in reversed(installed):
            cf.traced(torch.empty(0))
    if not model.training and _on_real_devices(model):
        _prepare_inference(model)
    if example_inputs is not None:
        examples = example_inputs if isinstance(example_inputs, list) else [example_inputs]
        with torch.no_grad():
            # Engines are measured by the calls themselves (a few calls per
            # shape class, see csrc/runtime/engine_choice.h): repeat the
            # examples until their shape classes are decided.
            for _ in range(_MAX_EXAMPLE_ROUNDS):
                since = _C.engine_trial_clock()
                for ex in examples:
                    model(*ex) if isinstance(ex, tuple) else model(ex)
                if not _C.engine_trials_pending(since):  # every class these calls reach is decided
                    break
        engine_cache.save()  # the engine choices these calls measured, for the next process
    return model


# Calls of each example at most (an engine trial takes one call; an undecided
# class needs at most 4 timings of each of 3 engines, fewer when shared by
# several segments of a call).
_MAX_EXAMPLE_ROUNDS = 12


def _on_real_devices(model: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in itertools.chain(model.parameters(), model.buffers()))


def _prepare_inference(model: nn.Module) -> None:
    """Plans and packs what a call of ``model`` with one tensor runs: the
    chains of each captured forward's traced one-tensor case, the
    FusedSequentials called as modules, and so on down the calls. Modules a
    chain took in (inlined containers, layers whose own forward is one chain)
    are not packed again. A first call then only runs."""
    seen = set()
    todo = [model]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, FusedSequential):
            todo.extend(m._prepare_inference())
            continue
        cf = m.__dict__.get("forward")
        traced = cf.traced() if isinstance(cf, CapturedForward) else None
        if traced is None or traced.fn is None or traced.graph is None:
            todo.extend(m.children())  # its own forward runs: any child may be called
            continue
        for chain in traced.chains:
            todo.extend(chain.seq._prepare_inference())
        for node in traced.graph.nodes:
            if node.op == "call_module":
                todo.append(m.get_submodule(node.target))
