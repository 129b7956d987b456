"""fuse(model): swap every nn.Sequential inside a model for a FusedSequential."""

from __future__ import annotations

import copy

from torch import nn

from .container import FusedSequential

__all__ = ["fuse"]


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every ``nn.Sequential`` (at any depth, and the
    model itself if it is one) replaced by a :class:`FusedSequential` holding
    the same child modules. ``state_dict`` keys are unchanged. With
    ``inplace=False`` (the default) the model is deep-copied first and the
    original is left as it was; with ``inplace=True`` the Sequentials
    themselves become FusedSequentials (same objects).

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
    for m in model.modules():
        if type(m) is nn.Sequential:
            # FusedSequential adds no state of its own, so switching the class
            # keeps the object, its children, parameters and hooks as they are.
            m.__class__ = FusedSequential
    return model
