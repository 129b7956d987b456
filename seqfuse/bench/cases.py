"""Benchmark cases: a registry of named module chains with an input shape.

A case only describes *what* to run. :mod:`seqfuse.bench.peers` turns its
modules into the models being compared and :mod:`seqfuse.bench.harness` times
them. To add a case, register one::

    register(Case("tiny_b8", lambda: mlp([8, 16, 4]), (8, 8), "Linear 8->16->4, ReLU"))

``build_modules`` is called with the global RNG already seeded by the harness,
so every peer of a case sees the same weights and the numbers are repeatable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

__all__ = ["Case", "CASES", "register", "get_case", "select_cases", "mlp", "randomize_batchnorm", "linear_flops"]


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name: registry key, also the row label of the table.
        build_modules: returns a fresh list of modules (float32, any mode; the
            harness calls ``.eval()`` and converts the dtype).
        input_shape: input shape; dimension 0 is the batch.
        description: one line for ``--list`` and the JSON output.

    >>> c = Case("x", lambda: mlp([4, 2]), (3, 4), "Linear 4->2")
    >>> c.with_batch(7).input_shape
    (7, 4)
    """

    name: str
    build_modules: Callable[[], List[nn.Module]]
    input_shape: Tuple[int, ...]
    description: str = ""

    def with_batch(self, batch: Optional[int]) -> "Case":
        """The same case with the batch dimension (dim 0) replaced."""
        if batch is None or batch == self.input_shape[0]:
            return self
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return dataclasses.replace(self, input_shape=(int(batch),) + tuple(self.input_shape[1:]))


CASES: Dict[str, Case] = {}


def register(case: Case) -> Case:
    """Adds ``case`` to :data:`CASES` (replacing one of the same name) and returns it."""
    CASES[case.name] = case
    return case


def get_case(name: str) -> Case:
    """The registered case called ``name``; KeyError lists the known names.

    >>> get_case("small_b1").input_shape
    (1, 64)
    """
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known cases: {', '.join(CASES)}") from None


def select_cases(names: Optional[Sequence[str]] = None) -> List[Case]:
    """Cases by name, in the order given; ``None`` or empty means all, in
    registry order. Names may also be comma-separated lists.

    >>> [c.name for c in select_cases(["small_b1,policy_b1"])]
    ['small_b1', 'policy_b1']
    """
    if not names:
        return list(CASES.values())
    flat = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    seen: Dict[str, Case] = {}
    for n in flat:
        seen.setdefault(n, get_case(n))
    return list(seen.values())


def mlp(widths: Sequence[int], activation: Type[nn.Module] = nn.ReLU) -> List[nn.Module]:
    """Linear layers through ``widths`` with ``activation`` between them (not after the last).

    >>> mlp([4, 8, 2], nn.Tanh)
    [Linear(in_features=4, out_features=8, bias=True), Tanh(), Linear(in_features=8, out_features=2, bias=True)]
    """
    modules: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            modules.append(activation())
        modules.append(nn.Linear(a, b))
    return modules


def randomize_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Gives a BatchNorm non-trivial running statistics and affine parameters,
    so that folding it into the preceding Linear is actually exercised."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(0.2 * torch.randn(n))
        bn.running_var.copy_(0.5 + torch.rand(n))
        if bn.affine:
            bn.weight.copy_(1.0 + 0.2 * torch.randn(n))
            bn.bias.copy_(0.1 * torch.randn(n))
    return bn


def linear_flops(modules: Sequence[nn.Module], input_shape: Sequence[int]) -> int:
    """Floating-point operations of one forward: ``2 * in * out`` per Linear
    per row (rows = product of all but the last input dimension); elementwise
    work (bias, BatchNorm, activations) is not counted.

    >>> linear_flops(mlp([64, 256, 10]), (2, 64))
    75776
    """
    rows = 1
    for d in input_shape[:-1]:
        rows *= int(d)
    per_row = sum(2 * m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear))
    return rows * per_row


def _bn_block(width: int) -> List[nn.Module]:
    return [nn.Linear(width, width), randomize_batchnorm(nn.BatchNorm1d(width)), nn.ReLU()]


_SMALL = [64, 256, 256, 256, 10]
_NERF = [63] + [256] * 8 + [4]

register(Case("policy_b1", lambda: mlp([24, 64, 64, 6], nn.Tanh), (1, 24), "RL policy: Linear 24->64->64->6, Tanh"))
register(Case("small_b1", lambda: mlp(_SMALL), (1, 64), "Linear 64->256->256->256->10, ReLU; one row"))
register(Case("small_b256", lambda: mlp(_SMALL), (256, 64), "Linear 64->256->256->256->10, ReLU; 256 rows"))
register(
    Case("nerf_b4096", lambda: mlp(_NERF), (4096, 63), "NeRF-style: Linear 63->256, 7x 256->256, ->4, ReLU; 4096 rows")
)
register(Case("wide_b256", lambda: mlp([1024] * 4), (256, 1024), "Linear 1024->1024->1024->1024, ReLU; 256 rows"))
register(
    Case(
        "bn_b128",
        lambda: _bn_block(512) + _bn_block(512),
        (128, 512),
        "(Linear 512->512, BatchNorm1d (random stats), ReLU) x2; 128 rows",
    )
)
