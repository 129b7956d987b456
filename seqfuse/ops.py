"""Typed wrappers over the ``torch.ops.seqfuse`` operators (inference and
training), their fake (shape-only) kernels for ``torch.compile`` /
``torch.export``, and the process-wide switches (engine override, CPU kernel
variant). The vocabulary the ops' ``spec`` / ``fparams`` arguments are
written in lives in :mod:`seqfuse.spec` (its names are re-exported here). The
training ops' autograd formula is registered in C++ (``csrc/autograd.cpp``).
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
    DERIVATIVE_FROM_OUTPUT,
    DEVICE_ONLY_DTYPES,
    ENGINE_ATEN_LAYOUT,
    ENGINE_FUSED,
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
    conv_stages,
    encode_conv_spec,
    encode_mlp_spec,
    mlp_out_features,
    mlp_stages,
)
from .spec import _CONV_SPEC

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
    "cpu_capability",
    "set_cpu_capability",
]

def mlp_pack(tensors: List[torch.Tensor], spec: List[int], fparams: List[float]) -> torch.Tensor:
    """Folds and packs the parameters of a run into the kernels' buffer
    (``tensors`` per stage as listed in csrc/ops.cpp).

    >>> lin = torch.nn.Linear(4, 3)
    >>> spec, fparams = encode_mlp_spec(torch.float32, 4, [MlpStage(StageKind.LINEAR, 3, flags=HAS_BIAS)])
    >>> mlp_pack([lin.weight.detach(), lin.bias.detach()], spec, fparams).dtype
    torch.uint8
    """
    return torch.ops.seqfuse.mlp_pack.default(tensors, spec, fparams)


def _window_output_size(size, k, s, pad_before, pad_after, d, ceil_mode):
    """ATen's convolution / pooling output size along one dimension (the
    Python twin of window_output_size in conv_spec.h, for fake tensors)."""
    span = size + pad_before + pad_after - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + pad_before:
        out = out - 1
    return out


def conv_output_shape(spec: Sequence[int], input_shape: Sequence) -> Tuple:
    """The output shape of a conv run for a 4-D input shape (symbolic sizes allowed).

    >>> spec, _ = encode_conv_spec(torch.float32, 3, [ConvStage(ConvStageKind.CONV, 8, window=(3, 3, 2, 2, 1, 1, 1, 1, 1, 1))])
    >>> conv_output_shape(spec, (2, 3, 9, 9))
    (2, 8, 5, 5)
    """
    n, c, h, w = input_shape
    for st in conv_stages(spec):
        kind, out_c, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, param, options = (
            st[0], st[1], *st[4:16])
        if kind in (ConvStageKind.CONV, ConvStageKind.MAX_POOL, ConvStageKind.AVG_POOL):
            ceil_mode = bool(options & CEIL_MODE)
            h = _window_output_size(h, kh, sh, pt, pb, dh, ceil_mode)
            w = _window_output_size(w, kw, sw, pl, pr, dw, ceil_mode)
            c = out_c
        elif kind == ConvStageKind.GLOBAL_AVG_POOL:
            h = w = 1
        elif kind == ConvStageKind.FLATTEN:
            c, h, w = c * h * w, None, None
        else:
            c = out_c
    return (n, c) if h is None else (n, c, h, w)


def conv_pack(tensors: List[torch.Tensor], spec: List[int], fparams: List[float]) -> torch.Tensor:
    """Folds and packs the parameters of a conv run into the kernels' buffer
    (``tensors`` per stage as listed in csrc/ops.cpp)."""
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
    runs ATen in the input's layout + the epilogue, for MLP runs engine 1);
    ``None`` restores the per-shape
    choice by measurement. For tests and studies.

    >>> set_engine_override(ENGINE_GEMM_EPILOGUE); set_engine_override(None)
    """
    if engine not in (None, ENGINE_FUSED, ENGINE_GEMM_EPILOGUE, ENGINE_ATEN_LAYOUT):
        raise ValueError(f"unknown engine {engine!r}: expected None, ENGINE_FUSED, ENGINE_GEMM_EPILOGUE or "
                         "ENGINE_ATEN_LAYOUT")
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


@torch.library.register_fake("seqfuse::conv_pack")
def _conv_pack_fake(tensors, spec, fparams):
    return tensors[0].new_empty((_C.conv_packed_nbytes(list(spec), list(fparams)),), dtype=torch.uint8)


@torch.library.register_fake("seqfuse::conv_forward")
def _conv_forward_fake(input, packed, weights, spec, fparams, engine=ENGINE_FUSED):
    torch._check(input.dim() == 4, lambda: f"seqfuse::conv_forward: expected 4-D input, got {tuple(input.shape)}")
    torch._check(input.shape[1] == int(spec[3]), lambda: f"seqfuse::conv_forward: wrong channels {tuple(input.shape)}")
    shape = conv_output_shape(spec, input.shape)
    if len(shape) == 2:
        return input.new_empty(shape)
    fmt = torch.channels_last if _conv_output_channels_last(spec, input, weights) else torch.contiguous_format
    return input.new_empty(shape).contiguous(memory_format=fmt)


def _conv_output_channels_last(spec, input, weights) -> bool:
    """The Python twin of output_channels_last in csrc/conv_output_layout.h:
    eager's output memory format, followed stage by stage."""
    from torch._prims_common import suggest_memory_format

    cl = suggest_memory_format(input) == torch.channels_last
    shape, conv_index = tuple(input.shape), 0
    for i, st in enumerate(conv_stages(spec)):
        kind, activation, flags = st[0], st[2], st[3]
        if kind in (ConvStageKind.FLATTEN, ConvStageKind.LINEAR):
            break
        shape_in_c = shape[1]
        if kind == ConvStageKind.CONV:
            w = weights[conv_index] if conv_index < len(weights) else None
            conv_index += 1
            cl = cl or (w is not None and w.dim() == 4 and suggest_memory_format(w) == torch.channels_last)
        shape = conv_output_shape(spec[:2] + [i + 1] + list(spec[3:_CONV_SPEC['header'] + _CONV_SPEC['per_stage'] * (i + 1)]),
                                  tuple(input.shape))
        depthwise = kind == ConvStageKind.CONV and st[14] == shape_in_c == st[1]
        if depthwise and input.dtype == torch.float64 and shape[2] * shape[3] == 1:
            cl = False  # ATen's float64 depthwise kernel returns a 1x1 map contiguous
        if kind == ConvStageKind.CONV and input.dtype == torch.float64 and input.device.type == "cuda":
            cl = False  # every float64 convolution on CUDA returns NCHW (cuDNN's format rule)
        elementwise = kind in (ConvStageKind.SCALE_SHIFT, ConvStageKind.POINTWISE) or flags & HAS_BATCHNORM or activation
        if elementwise and (shape[1] == 1 or shape[2] * shape[3] == 1):
            cl = False
    return cl


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


# ---- training ------------------------------------------------------------------


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


_POOLS = (ConvStageKind.MAX_POOL, ConvStageKind.AVG_POOL, ConvStageKind.GLOBAL_AVG_POOL)
_MLP_KINDS = {StageKind.LINEAR: ConvStageKind.LINEAR, StageKind.SCALE_SHIFT: ConvStageKind.SCALE_SHIFT,
              StageKind.POINTWISE: ConvStageKind.POINTWISE}


def _train_stages(spec: Sequence[int], conv: bool):
    """(kind, out_channels, activation, flags, window, param, options) of
    each stage, MLP stages in conv-run terms (as csrc/train_run.h)."""
    if conv:
        for st in conv_stages(spec):
            yield ConvStageKind(int(st[0])), int(st[1]), int(st[2]), int(st[3]), [int(v) for v in st[4:14]], int(st[14]), int(st[15])
        return
    for kind, out, act, flags in mlp_stages(spec):
        yield _MLP_KINDS[StageKind(int(kind))], int(out), int(act), int(flags), [1, 1, 1, 1, 0, 0, 0, 0, 1, 1], 1, 0


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _train_forward_fake(conv: bool, input, params, running, spec, fparams):
    """The Python twin of train_forward_impl's walk (csrc/train_run.h):
    the same ATen ops on fake tensors give the same shapes and strides."""
    aten = torch.ops.aten
    x = input if conv else input.reshape(-1, int(spec[3]))
    stages = list(_train_stages(spec, conv))
    params = iter(params)
    saved: List[torch.Tensor] = []
    for i, (kind, out_c, act, flags, win, param, options) in enumerate(stages):
        kh, kw, sh, sw, pt, pl, pb, pr, dh, dw = win
        has_weight = kind in (ConvStageKind.CONV, ConvStageKind.LINEAR)
        weight = next(params) if has_weight else None
        has_bias = has_weight and bool(flags & HAS_BIAS)
        if has_bias:
            next(params)
        bn = bool(flags & HAS_BATCHNORM)
        if bn and flags & BATCHNORM_AFFINE:
            next(params), next(params)
        aux = None
        ceil = bool(options & CEIL_MODE)
        if kind == ConvStageKind.LINEAR:
            z = aten.mm(x, weight.t())
        elif kind == ConvStageKind.CONV:
            symmetric = pt == pb and pl == pr
            xp = x if symmetric else aten.constant_pad_nd(x, [pl, pr, pt, pb], 0)
            z = aten.convolution(xp, weight, None, [sh, sw], [pt, pl] if symmetric else [0, 0], [dh, dw], False,
                                 [0, 0], param)
        elif kind == ConvStageKind.MAX_POOL:
            z, aux = aten.max_pool2d_with_indices(x, [kh, kw], [sh, sw], [pt, pl], [dh, dw], ceil)
        elif kind == ConvStageKind.AVG_POOL:
            z = aten.avg_pool2d(x, [kh, kw], [sh, sw], [pt, pl], ceil, bool(options & COUNT_INCLUDE_PAD),
                                param or None)
        elif kind == ConvStageKind.GLOBAL_AVG_POOL:
            z = aten.adaptive_avg_pool2d(x, [1, 1])
        elif kind == ConvStageKind.FLATTEN:
            z = x.flatten(1)
        else:
            z = x
        owned = has_weight or kind in _POOLS
        epilogue = bn or has_bias or act != Activation.NONE
        a, zsave = z, None
        if epilogue:
            z = _dense(z)
            if bn:
                a = torch.empty_like(z)
                zsave = z if owned else None
                aux = input.new_empty((4 if flags & BATCH_STATS else 2, out_c))
            elif act not in DERIVATIVE_FROM_OUTPUT and owned:
                zsave, a = z, torch.empty_like(z)
            else:
                a = z if owned else torch.empty_like(z)
        last = i + 1 == len(stages)
        empty = input.new_empty((0,))
        saved += [empty if last or not (owned or epilogue) else a]
        saved += [input.new_empty((0,)) if zsave is None else zsave]
        saved += [input.new_empty((0,)) if aux is None else aux]
        x = a
    out = x if owned or epilogue else x.clone()
    if not conv:
        out = out.view(*input.shape[:-1], stages[-1][1])
    return out, saved


def _backward_fake(grad_output, input, output, saved, params, spec, fparams, grad_mask):
    grad_input = torch.empty_like(input) if grad_mask[0] else input.new_empty((0,))
    return grad_input, [torch.empty_like(p) if m else p.new_empty((0,)) for p, m in zip(params, grad_mask[1:])]


for _conv in (False, True):
    _name = "conv" if _conv else "mlp"
    torch.library.register_fake(f"seqfuse::{_name}_train_forward")(
        lambda *args, _conv=_conv: _train_forward_fake(_conv, *args))
    torch.library.register_fake(f"seqfuse::{_name}_backward")(_backward_fake)


@torch.library.register_fake("seqfuse::update_running_stats")
def _update_running_stats_fake(buffers, stats, momentum):
    return None
