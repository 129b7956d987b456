"""Typed wrappers over the ``torch.ops.seqfuse`` operators (inference and
training) and the process-wide switches (engine override, CPU kernel
variant). The ops' shapes under ``torch.compile`` / ``torch.export`` come
from their Meta kernels in C++ (``csrc/ops/meta.cpp``), which reuse the
kernels' own shape and layout rules. The vocabulary the ops' ``spec`` / ``fparams`` arguments are
written in lives in :mod:`seqfuse.spec` (its names are re-exported here). The
training ops' autograd formula is registered in C++ (``csrc/ops/autograd.cpp``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ._loader import _C
from .spec import (  # noqa: F401  (the vocabulary, re-exported: seqfuse.ops.ENGINE_FUSED etc. keep working)
    BATCH_STATS,
    BATCHNORM_AFFINE,
    CEIL_MODE,
    CONV_ENGINE_NAMES,
    COUNT_INCLUDE_PAD,
    DEVICE_ONLY_DTYPES,
    ENGINE_ATEN_LAYOUT,
    ENGINE_FUSED,
    ENGINE_WINOGRAD,
    ENGINE_GEMM_EPILOGUE,
    ENGINE_NAMES,
    HAS_BATCHNORM,
    HAS_BIAS,
    RUNNING_STATS,
    SUPPORTED_DTYPES,
    Activation,
    ConvStage,
    ConvStageKind,
    MlpStage,
    StageKind,
    encode_conv_spec,
    encode_mlp_spec,
    mlp_out_features,
)

__all__ = [
    "Activation",
    "StageKind",
    "MlpStage",
    "encode_mlp_spec",
    "mlp_out_features",
    "mlp_pack",
    "mlp_forward",
    "ConvStageKind",
    "ConvStage",
    "encode_conv_spec",
    "conv_pack",
    "conv_forward",
    "mlp_train_forward",
    "conv_train_forward",
    "update_running_stats",
    "set_engine_override",
    "ENGINE_FUSED",
    "ENGINE_GEMM_EPILOGUE",
    "ENGINE_ATEN_LAYOUT",
    "ENGINE_WINOGRAD",
    "cpu_capability",
    "set_cpu_capability",
    "release_host_cache",
    "host_cache_usage",
]

def mlp_pack(tensors: List[torch.Tensor], spec: List[int], fparams: List[float]) -> torch.Tensor:
    """Folds and packs the parameters of a run into the kernels' buffer
    (``tensors`` per stage as listed in csrc/ops/schema.cpp).

    >>> lin = torch.nn.Linear(4, 3)
    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, flags=HAS_BIAS)])
    >>> mlp_pack([lin.weight.detach(), lin.bias.detach()], spec, fparams).dtype
    torch.uint8
    """
    return torch.ops.seqfuse.mlp_pack.default(tensors, spec, fparams)


def conv_pack(tensors: List[torch.Tensor], spec: List[int], fparams: List[float]) -> torch.Tensor:
    """Folds and packs the parameters of a conv run into the kernels' buffer
    (``tensors`` per stage as listed in csrc/ops/schema.cpp)."""
    return torch.ops.seqfuse.conv_pack.default(tensors, spec, fparams)


def conv_forward(
    input: torch.Tensor,
    packed: torch.Tensor,
    weights: List[torch.Tensor],
    spec: List[int],
    fparams: List[float],
    engine: int = 0,
) -> torch.Tensor:
    """Runs a packed conv run over a 4-D ``input`` in one call. ``weights``
    (the Conv2d weights in stage order) decide the output memory format with
    the input, and are what engine 1 convolves with.

    >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    >>> stage = ConvStage(ConvStageKind.CONV, 4, Activation.RELU, flags=HAS_BIAS, window=(3, 3, 1, 1, 1, 1, 1, 1, 1, 1))
    >>> spec, fparams = encode_conv_spec(torch.float32, 3, [stage])
    >>> packed = conv_pack([conv.weight.detach(), conv.bias.detach()], spec, fparams)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.testing.assert_close(conv_forward(x, packed, [conv.weight.detach()], spec, fparams), torch.relu(conv(x)).detach())
    """
    return torch.ops.seqfuse.conv_forward.default(input, packed, weights, spec, fparams, engine)


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
    """Forces every fused call onto one engine (``ENGINE_FUSED``: the fused
    kernels; ``ENGINE_GEMM_EPILOGUE``: ATen's GEMM or convolution for each
    Linear or Conv2d + the fused epilogue; ``ENGINE_ATEN_LAYOUT``: for conv
    runs ATen in the input's layout + the epilogue, for MLP runs engine 1;
    ``ENGINE_WINOGRAD``: for conv runs the fused kernels with their 3x3
    stride-1 convolutions as Winograd tiles, for a run without one its last
    engine, for MLP runs engine 1); ``None`` restores the per-shape choice
    by measurement. For tests and studies.

    >>> set_engine_override(ENGINE_GEMM_EPILOGUE); set_engine_override(None)
    """
    if engine not in (None, ENGINE_FUSED, ENGINE_GEMM_EPILOGUE, ENGINE_ATEN_LAYOUT, ENGINE_WINOGRAD):
        raise ValueError(f"unknown engine {engine!r}: expected None, ENGINE_FUSED, ENGINE_GEMM_EPILOGUE, "
                         "ENGINE_ATEN_LAYOUT or ENGINE_WINOGRAD")
    _C.set_engine_override(-1 if engine is None else int(engine))


def cpu_capability() -> str:
    """The CPU kernel variant in use: ``'avx512_bf16'`` (AVX-512 with the
    bfloat16 dot product), ``'avx512'``, ``'avx2'`` or ``'baseline'``.

    >>> cpu_capability() in ("avx512_bf16", "avx512", "avx2", "baseline")
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


# ---- training ------------------------------------------------------------------


def release_host_cache() -> int:
    """Frees the blocks the fused CPU ops keep for reuse and returns how many
    bytes that was. Outputs and intermediates of at least 128 KiB come from
    a cache of recycled blocks whose pages are already mapped (a fresh
    multi-megabyte block faults on every page at its first write); a block
    goes back to the cache when its tensor is freed, up to 256 MiB of cached
    blocks (``SEQFUSE_HOST_CACHE_MB`` sets the cap, 0 turns caching off).

    >>> release_host_cache() >= 0
    True
    """
    return _C.release_host_cache()


def host_cache_usage() -> Tuple[int, int]:
    """(bytes in cached free blocks, bytes in blocks held by live tensors) of
    the host cache (see :func:`release_host_cache`)."""
    return tuple(_C.host_cache_usage())


def mlp_train_forward(
    input: torch.Tensor,
    params: List[torch.Tensor],
    running: List[torch.Tensor],
    spec: List[int],
    fparams: List[float],
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Runs an MLP run with its parameters as they are (``params`` per stage:
    Linear weight, [bias], [BatchNorm weight, bias]), differentiable through
    ``seqfuse::mlp_backward``. BatchNorm stages flagged ``BATCH_STATS`` use the
    batch's statistics, the others ``running`` (per such BatchNorm:
    running_mean, running_var). Returns the output and the tensors the
    backward reads; :func:`update_running_stats` applies a training-mode
    BatchNorm's update from them.

    >>> lin = torch.nn.Linear(4, 3)
    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, Activation.RELU, flags=HAS_BIAS)])
    >>> x = torch.randn(2, 4)
    >>> y, _ = mlp_train_forward(x, [lin.weight, lin.bias], [], spec, fparams)
    >>> y.sum().backward()
    >>> torch.testing.assert_close(y, torch.relu(lin(x)))
    """
    return torch.ops.seqfuse.mlp_train_forward.default(input, params, running, spec, fparams)


def conv_train_forward(
    input: torch.Tensor,
    params: List[torch.Tensor],
    running: List[torch.Tensor],
    spec: List[int],
    fparams: List[float],
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The conv-run counterpart of :func:`mlp_train_forward` (``params`` per
    stage: Conv2d / Linear weight, [bias], [BatchNorm weight, bias])."""
    return torch.ops.seqfuse.conv_train_forward.default(input, params, running, spec, fparams)


def saved_batch_stats(saved: Sequence[torch.Tensor], stages: Sequence[int]) -> List[torch.Tensor]:
    """The statistics a training forward saved for the given stages' BatchNorms."""
    return [saved[3 * i + 2] for i in stages]


def update_running_stats(buffers: List[torch.Tensor], stats: List[torch.Tensor], momentum: List[float]) -> None:
    """Eager BatchNorm's running-statistics update, per BatchNorm: ``buffers``
    running_mean, running_var, num_batches_tracked (updated in place),
    ``stats`` the statistics its training forward saved, ``momentum``
    (negative: momentum=None, the cumulative average)."""
    torch.ops.seqfuse.update_running_stats.default(buffers, stats, momentum)
