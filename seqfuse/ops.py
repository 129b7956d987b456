"""Typed wrappers over the ``torch.ops.seqfuse`` operators, their fake
(shape-only) kernels for ``torch.compile`` / ``torch.export``, and the encoding
of a fused MLP run into the operators' ``spec`` / ``fparams`` arguments
(defined for C++ in ``csrc/kernels/mlp_spec.h``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ._loader import _C

__all__ = [
    "Activation",
    "StageKind",
    "MlpStage",
    "encode_mlp_spec",
    "mlp_out_features",
    "mlp_pack",
    "mlp_forward",
    "set_engine_override",
    "ENGINE_FUSED",
    "ENGINE_GEMM_EPILOGUE",
    "cpu_capability",
    "set_cpu_capability",
]

SPEC_VERSION = 1
_SPEC_HEADER = 4
_SPEC_PER_STAGE = 4

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)

HAS_BIAS = 1
HAS_BATCHNORM = 2
BATCHNORM_AFFINE = 4


class StageKind(enum.IntEnum):
    LINEAR = 0
    SCALE_SHIFT = 1
    POINTWISE = 2


class Activation(enum.IntEnum):
    NONE = 0
    RELU = 1
    LEAKY_RELU = 2
    RELU6 = 3
    SIGMOID = 4
    TANH = 5
    GELU_ERF = 6
    GELU_TANH = 7
    SILU = 8
    HARDSWISH = 9


@dataclass
class MlpStage:
    """One stage of a fused MLP run: a Linear (with bias and an eval BatchNorm
    folded into its epilogue), a standalone BatchNorm (per-channel scale and
    shift), or a lone activation; each ends in one activation."""

    kind: StageKind
    out_features: int
    activation: Activation = Activation.NONE
    alpha: float = 0.0
    flags: int = 0
    eps: float = 0.0
    # Modules whose tensors this stage packs, in mlp_pack's order.
    modules: List[torch.nn.Module] = field(default_factory=list)


def encode_mlp_spec(
    dtype: torch.dtype, in_features: int, stages: Sequence[MlpStage]
) -> Tuple[List[int], List[float]]:
    """Encodes a run for the ``spec`` and ``fparams`` arguments of the ops.

    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, Activation.RELU)])
    >>> spec
    [1, 0, 1, 4, 0, 3, 1, 0]
    """
    spec = [SPEC_VERSION, _DTYPE_CODES[dtype], len(stages), int(in_features)]
    fparams: List[float] = []
    for s in stages:
        spec += [int(s.kind), int(s.out_features), int(s.activation), int(s.flags)]
        fparams += [float(s.alpha), float(s.eps)]
    return spec, fparams


def mlp_out_features(spec: Sequence[int]) -> int:
    """Width of the last stage of an encoded run.

    >>> mlp_out_features(encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3)])[0])
    3
    """
    return int(spec[_SPEC_HEADER + _SPEC_PER_STAGE * (int(spec[2]) - 1) + 1])


def mlp_pack(tensors: List[torch.Tensor], spec: List[int], fparams: List[float]) -> torch.Tensor:
    """Folds and packs the parameters of a run into the kernels' buffer
    (``tensors`` per stage as listed in csrc/ops.cpp).

    >>> lin = torch.nn.Linear(4, 3)
    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, flags=HAS_BIAS)])
    >>> mlp_pack([lin.weight.detach(), lin.bias.detach()], spec, fparams).dtype
    torch.uint8
    """
    return torch.ops.seqfuse.mlp_pack.default(tensors, spec, fparams)


ENGINE_FUSED = 0  # the fused kernel: every stage in one pass over row tiles
ENGINE_GEMM_EPILOGUE = 1  # ATen GEMM per Linear + the fused epilogue kernel
ENGINE_NAMES = {ENGINE_FUSED: "fused kernel", ENGINE_GEMM_EPILOGUE: "ATen GEMM + fused epilogue"}


def mlp_forward(
    input: torch.Tensor,
    packed: torch.Tensor,
    weights: List[torch.Tensor],
    spec: List[int],
    fparams: List[float],
    engine: int = ENGINE_FUSED,
) -> torch.Tensor:
    """Runs a packed MLP run over the last dimension of ``input`` in one call.
    ``weights`` (the Linear weights in stage order) are read by engine 1 only.

    >>> lin = torch.nn.Linear(4, 3)
    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, Activation.RELU, flags=HAS_BIAS)])
    >>> packed = mlp_pack([lin.weight.detach(), lin.bias.detach()], spec, fparams)
    >>> x = torch.randn(2, 4)
    >>> torch.testing.assert_close(mlp_forward(x, packed, [], spec, fparams), torch.relu(lin(x)).detach())
    """
    return torch.ops.seqfuse.mlp_forward.default(input, packed, weights, spec, fparams, engine)


def set_engine_override(engine: Optional[int]) -> None:
    """Forces every fused MLP call onto one engine (``ENGINE_FUSED`` or
    ``ENGINE_GEMM_EPILOGUE``); ``None`` restores the per-shape choice by
    measurement. For tests and studies.

    >>> set_engine_override(ENGINE_GEMM_EPILOGUE); set_engine_override(None)
    """
    if engine not in (None, ENGINE_FUSED, ENGINE_GEMM_EPILOGUE):
        raise ValueError(f"unknown engine {engine!r}: expected None, ENGINE_FUSED or ENGINE_GEMM_EPILOGUE")
    _C.set_engine_override(-1 if engine is None else int(engine))


@torch.library.register_fake("seqfuse::mlp_pack")
def _mlp_pack_fake(tensors, spec, fparams):
    return tensors[0].new_empty((_C.mlp_packed_nbytes(list(spec), list(fparams)),), dtype=torch.uint8)


@torch.library.register_fake("seqfuse::mlp_forward")
def _mlp_forward_fake(input, packed, weights, spec, fparams, engine=ENGINE_FUSED):
    in_features = int(spec[3])
    torch._check(input.dim() >= 1, lambda: "seqfuse::mlp_forward: input must have at least 1 dimension")
    torch._check(
        input.shape[-1] == in_features,
        lambda: f"seqfuse::mlp_forward: input shape {tuple(input.shape)} does not end in in_features={in_features}",
    )
    return input.new_empty((*input.shape[:-1], mlp_out_features(spec)))


def cpu_capability() -> str:
    """The CPU kernel variant in use: ``'avx512'``, ``'avx2'`` or ``'baseline'``.

    >>> cpu_capability() in ("avx512", "avx2", "baseline")
    True
    """
    return _C.cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Forces a CPU kernel variant for the whole process (``''`` restores the
    detected one). Raises ValueError for a variant this CPU cannot run.

    >>> set_cpu_capability("baseline"); cpu_capability()
    'baseline'
    >>> set_cpu_capability("")
    """
    _C.set_cpu_capability(name)
