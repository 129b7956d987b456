"""The implementations a case is timed with ("peers"), built from one list of modules.

* ``eager``   -- ``nn.Sequential(*modules)``, the baseline every ratio is relative to.
* ``fused``   -- ``seqfuse.FusedSequential(*modules)``.
* ``jit``     -- ``torch.jit.freeze(torch.jit.script(nn.Sequential(*modules).eval()))``.
* ``compile`` -- ``torch.compile(nn.Sequential(*modules))`` with inductor freezing on.
  Compilation happens on the first call (seconds), which the harness makes
  during warm-up, inside :func:`peer_context`.

All peers share the same module objects (and so the same weights); that is
safe because everything runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

import seqfuse

__all__ = ["PEERS", "DEFAULT_PEERS", "parse_peers", "build_peer", "peer_context"]

DEFAULT_PEERS = ("eager", "fused")


def _eager(modules: List[nn.Module]) -> nn.Module:
    return nn.Sequential(*modules).eval()


def _fused(modules: List[nn.Module]) -> nn.Module:
    return seqfuse.FusedSequential(*modules).eval()


def _jit(modules: List[nn.Module]) -> nn.Module:
    # freeze() inlines the parameters as constants; script a copy so the
    # shared modules are left untouched.
    scripted = torch.jit.script(nn.Sequential(*copy.deepcopy(modules)).eval())
    return torch.jit.freeze(scripted)


def _compile(modules: List[nn.Module]) -> Callable:
    import torch._dynamo

    # A fresh dynamo cache per case: every case recompiles nn.Sequential.forward,
    # and too many recompiles of one code object would fall back to eager.
    torch._dynamo.reset()
    return torch.compile(nn.Sequential(*modules).eval())


PEERS: Dict[str, Callable[[List[nn.Module]], Callable]] = {
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


def build_peer(name: str, modules: List[nn.Module]) -> Callable:
    """The callable for peer ``name`` over ``modules`` (already in eval mode and the wanted dtype)."""
    return PEERS[name](modules)


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
