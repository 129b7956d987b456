"""The implementations a case is timed with ("peers"), built from one list of
modules, or from one whole model for a model case (:meth:`Case.from_model`).

* ``eager``   -- ``nn.Sequential(*modules)``, the baseline every ratio is relative
  to; a model is run as it is.
* ``fused``   -- ``seqfuse.FusedSequential(*modules)``; for a model
  ``seqfuse.fuse(model)`` (a deep copy with every ``nn.Sequential`` swapped).
* ``jit``     -- ``torch.jit.freeze(torch.jit.script(nn.Sequential(*modules).eval()))``
  (a copy of the model for a model case).
* ``compile`` -- ``torch.compile(nn.Sequential(*modules))`` (or of the model)
  with inductor freezing on. Compilation happens on the first call (seconds),
  which the harness makes during warm-up, inside :func:`peer_context`.

All peers share the same module objects (and so the same weights; ``fused``
and ``jit`` of a model hold copies of them); that is safe because everything
runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Sequence, Union

import torch
from torch import nn

import seqfuse

__all__ = ["PEERS", "DEFAULT_PEERS", "TRAINING_PEERS", "parse_peers", "build_peer", "build_training_step", "peer_context"]

DEFAULT_PEERS = ("eager", "fused")

#: What peers are built from: a list of modules, or one whole model.
Modules = Union[List[nn.Module], nn.Module]


def _eager(modules: Modules) -> nn.Module:
    if isinstance(modules, nn.Module):
        return modules.eval()
    return nn.Sequential(*modules).eval()


def _fused(modules: Modules) -> nn.Module:
    if isinstance(modules, nn.Module):
        return seqfuse.fuse(modules).eval()
    return seqfuse.FusedSequential(*modules).eval()


def _jit(modules: Modules) -> nn.Module:
    # freeze() inlines the parameters as constants; script a copy so the
    # shared modules are left untouched.
    model = copy.deepcopy(modules) if isinstance(modules, nn.Module) else nn.Sequential(*copy.deepcopy(modules))
    scripted = torch.jit.script(model.eval())
    return torch.jit.freeze(scripted)


def _compile(modules: Modules) -> Callable:
    import torch._dynamo

    # A fresh dynamo cache per case: every case recompiles nn.Sequential.forward,
    # and too many recompiles of one code object would fall back to eager.
    torch._dynamo.reset()
    return torch.compile(_eager(modules))


PEERS: Dict[str, Callable[[Modules], Callable]] = {
    "eager": _eager,
    "fused": _fused,
    "jit": _jit,
    "compile": _compile,
}


def parse_peers(peers: Sequence[str] | str | None) -> List[str]:
    """Validated peer names, ``eager`` always first (it is the baseline),
    duplicates dropped; accepts a comma-separated string or a sequence.

    >>> parse_peers("fused,jit")
    ['eager', 'fused', 'jit']
    >>> parse_peers(["eager", "fused"])
    ['eager', 'fused']
    """
    if peers is None:
        peers = DEFAULT_PEERS
    if isinstance(peers, str):
        peers = [peers]
    names = [p.strip() for item in peers for p in str(item).split(",") if p.strip()]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    out = ["eager"]
    for p in names:
        if p not in out:
            out.append(p)
    return out


def build_peer(name: str, modules: Modules) -> Callable:
    """The callable for peer ``name`` over ``modules`` (a list, or one model;
    already in eval mode and the wanted dtype)."""
    return PEERS[name](modules)


#: Peers a training case times (a training step through TorchScript or
#: torch.compile would measure a different program: their own autograd).
TRAINING_PEERS = ("eager", "fused")


class TrainingStep:
    """One training step of a peer, as the training cases time it:
    ``zero_grad`` (set to None) + forward + ``sum().backward()``. Returns the
    detached output. ``model`` is the module it trains (training mode)."""

    def __init__(self, model: nn.Module):
        self.model = model.train()
        self.params = list(model.parameters())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        y = self.model(x)
        y.sum().backward()
        return y.detach()


def build_training_step(name: str, modules: Modules) -> TrainingStep:
    """A :class:`TrainingStep` of peer ``name`` (``eager`` or ``fused``) over
    a copy of ``modules``."""
    if name not in TRAINING_PEERS:
        raise ValueError(f"training cases time {' and '.join(TRAINING_PEERS)} only, not {name!r}")
    copied = copy.deepcopy(modules)
    if isinstance(copied, nn.Module):
        model = copied if name == "eager" else seqfuse.fuse(copied)
    else:
        model = nn.Sequential(*copied) if name == "eager" else seqfuse.FusedSequential(*copied)
    return TrainingStep(model)


def peer_context(peers: Sequence[str]):
    """Context to build, warm up and time ``peers`` in: sets
    ``torch._inductor.config.freezing = True`` when ``compile`` is among them
    (patched, not set globally, so the caller's inductor config is restored);
    a no-op otherwise. Calls still need ``torch.inference_mode()``.

    >>> with peer_context(["eager", "fused"]):
    ...     pass
    """
    if "compile" not in peers:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)
