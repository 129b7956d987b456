"""fuse(model): swap every nn.Sequential inside a model for a FusedSequential."""

from __future__ import annotations

import copy

from torch import nn

from .container import FusedSequential

__all__ = ["fuse"]


def _as_fused(seq: nn.Sequential) -> FusedSequential:
    """A FusedSequential that shares seq's state (children, parameters, hooks,
    training flag); seq itself is left untouched when it is a copy."""
    fused = FusedSequential.__new__(FusedSequential)
    fused.__dict__.update(seq.__dict__)
    return fused


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every ``nn.Sequential`` (at any depth, and the
    model itself if it is one) replaced by a :class:`FusedSequential` holding
    the same child modules. ``state_dict`` keys are unchanged. With
    ``inplace=False`` (the default) the model is deep-copied first and the
    original is left as it was.

    Only exact ``nn.Sequential`` instances are converted: subclasses may
    override ``forward`` and are left alone (their Sequential children are
    still converted).

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
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Sequential:
                parent._modules[name] = _as_fused(child)
    if type(model) is nn.Sequential:
        model = _as_fused(model)
    return model
