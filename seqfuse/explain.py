"""seqfuse.explain(model): how a fused model runs, for the whole model.

Every fused chain (in a FusedSequential or in a captured forward), every
Conv2d / Linear / BatchNorm module left eager and why, and the share of those
modules (and, given an example input, of their FLOPs) that run in fused calls.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .capture import CapturedForward
from .container import FusedSequential, _describe
from .profiling import ModelProfile, profile

__all__ = ["explain", "ModelExplanation"]

_WEIGHTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class ModelExplanation:
    """What :func:`explain` returns; ``str()`` is the readable report.

    ``fused`` maps the qualified name of every Conv2d/Linear/BatchNorm module
    that runs inside a fused call to where (the chain); ``eager`` maps the
    others to why they run eagerly. ``flops`` (with an example input) maps
    every Conv2d/Linear to its multiply-adds for that input.
    """

    model_name: str
    fused: Dict[str, str] = field(default_factory=dict)
    eager: Dict[str, str] = field(default_factory=dict)
    chains: List[Tuple[str, str]] = field(default_factory=list)  # (owner, description)
    untraced: Dict[str, str] = field(default_factory=dict)  # module -> why its forward runs as written
    flops: Optional[Dict[str, int]] = None
    input_shape: Optional[Tuple[int, ...]] = None
    profile: Optional["ModelProfile"] = None  # with timing=True: seqfuse.profile's report

    @property
    def module_share(self) -> float:
        """Share of the Conv2d/Linear/BatchNorm modules that run in fused calls."""
        total = len(self.fused) + len(self.eager)
        return len(self.fused) / total if total else 1.0

    @property
    def flops_share(self) -> Optional[float]:
        """Share of the Conv2d/Linear multiply-adds in fused calls (None without an example input)."""
        if self.flops is None:
            return None
        total = sum(self.flops.values())
        return sum(v for k, v in self.flops.items() if k in self.fused) / total if total else 1.0

    def __str__(self) -> str:
        n_f, n = len(self.fused), len(self.fused) + len(self.eager)
        head = (f"seqfuse.explain({self.model_name}): {n_f} of {n} Conv2d/Linear/BatchNorm modules run in fused "
                f"calls ({100 * self.module_share:.1f}%)")
        if self.flops is not None:
            shape = "x".join(map(str, self.input_shape or ()))
            head += f"; {100 * self.flops_share:.1f}% of their multiply-adds for input {shape}"
        lines = [head, f"  {len(self.chains)} fused chains:"]
        for owner, text in self.chains:
            lines.append(f"    {owner}: {text}")
        if self.untraced:
            lines.append("  forwards that run as written (not traced):")
            for name, why in self.untraced.items():
                lines.append(f"    {name}: {why}")
        if self.eager:
            lines.append("  Conv2d/Linear/BatchNorm modules left eager:")
            for name, why in self.eager.items():
                lines.append(f"    {name}: {why}")
        if self.profile is not None:
            lines.append(str(self.profile))
        return "\n".join(lines)

    __repr__ = __str__


def _segments_of(container: FusedSequential):
    """(segment, module names) of a container's current plan."""
    return container.explain().segments


def explain(model: nn.Module, example_input: Optional[torch.Tensor] = None, timing: bool = False) -> ModelExplanation:
    """Describes how ``model`` (as returned by :func:`seqfuse.fuse`, or a
    FusedSequential) runs now: its fused chains, the Conv2d/Linear/BatchNorm
    modules left eager and why, and the share of those modules in fused calls.
    With ``example_input`` also the share of their multiply-adds (measured by
    one eager forward of a copy of the model with shape hooks). With
    ``timing=True`` too, where the forward's time goes:
    :func:`seqfuse.profile` of ``model`` on ``example_input``, in ``.profile``
    and at the end of the report.

    >>> import torch, seqfuse
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.bn, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 2)
    ...     def forward(self, x):
    ...         y = torch.relu(self.bn(self.conv(x)) + x)
    ...         return self.head(y.mean((2, 3)))
    >>> e = seqfuse.explain(seqfuse.fuse(Block().eval()))
    >>> sorted(e.fused), e.eager
    (['bn', 'conv', 'head'], {})
    >>> print(e)  # doctest: +ELLIPSIS
    seqfuse.explain(Block): 3 of 3 Conv2d/Linear/BatchNorm modules run in fused calls (100.0%)
      2 fused chains:
        (model) Block.forward: conv -> bn -> + residual -> relu() [1 fused call]
        (model) Block.forward: head [1 fused call]
    """
    ex = ModelExplanation(type(model).__name__)
    fused: Dict[int, str] = {}
    reasons: Dict[int, str] = {}
    inlined = set()

    def note_plan(segments, owner: str):
        count, eager_names = 0, []
        for seg in segments:
            for k, m in enumerate(seg.modules):
                if m is None:
                    continue
                m = m.__dict__.get("_seqfuse_owner", m)  # a view of a library layer's own tensors
                if seg.fused:
                    fused.setdefault(id(m), owner)
                else:
                    reasons.setdefault(id(m), seg.reasons[k])
            if seg.fused:
                count += 1
            else:
                eager_names += [type(m).__name__ for m in seg.modules]
        return count, eager_names

    for name, m in model.named_modules():
        cf = m.__dict__.get("forward")
        if not isinstance(cf, CapturedForward):
            continue
        owner = f"{name or '(model)'} {type(m).__name__}.forward"
        traced = cf.traced()
        if traced.fn is None:
            ex.untraced[name or "(model)"] = traced.error
            continue
        for chain in traced.chains:
            inlined.update(id(c) for c in chain.containers)
            count, eager_names = note_plan(_segments_of(chain.seq), owner)
            text = f"{chain.describe()} [{count} fused call{'s' * (count != 1)}"
            text += f"; eager: {', '.join(dict.fromkeys(eager_names))}]" if eager_names else "]"
            ex.chains.append((owner, text))
        for target, why in traced.leftovers.items():
            try:
                reasons.setdefault(id(m.get_submodule(target)), f"in {type(m).__name__}.forward: {why}")
            except AttributeError:
                pass

    for name, m in model.named_modules():
        if isinstance(m, FusedSequential) and id(m) not in inlined:
            segments = _segments_of(m)
            owner = f"{name or '(model)'} {type(m).__name__}"
            for seg in segments:
                if seg.fused:
                    ex.chains.append((owner, " -> ".join(seg.keys) + " [1 fused call]"))
            note_plan(segments, owner)

    for name, m in model.named_modules():
        if not isinstance(m, _WEIGHTED):
            continue
        qual = name or "(model)"
        if id(m) in fused:
            ex.fused[qual] = fused[id(m)]
        else:
            parent = qual.rsplit(".", 1)[0] if "." in qual else "(model)"
            why = reasons.get(id(m))
            if why is None and parent in ex.untraced:
                why = f"the forward of {parent} is not traced ({ex.untraced[parent]})"
            if why is None:
                why = f"{_describe(m)} is called where no chain reaches it"
            ex.eager[qual] = why

    if timing and example_input is None:
        raise ValueError("seqfuse.explain(timing=True) times a forward: give an example_input")
    if example_input is not None:
        ex.flops = _macs(model, example_input)
        ex.input_shape = tuple(example_input.shape)
    if timing:
        ex.profile = profile(model, example_input)
    return ex


def _macs(model: nn.Module, example_input: torch.Tensor) -> Dict[str, int]:
    """Multiply-adds of every Conv2d/Linear for ``example_input``, by
    qualified name (one forward of a copy with shape hooks)."""
    probe = copy.deepcopy(model)
    macs: Dict[str, int] = {}

    def hook(name):
        def record(m, args, out):
            if isinstance(m, nn.Conv2d):
                per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                per_out = m.in_features
            macs[name] = macs.get(name, 0) + out.numel() * per_out
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            probe(example_input)
    finally:
        for h in handles:
            h.remove()
    return macs
