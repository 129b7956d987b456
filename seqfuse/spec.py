"""The vocabulary the planner and the kernels share: how a fused MLP or conv
run is described to the ``seqfuse::`` ops (the integer ``spec`` and float
``fparams`` lists), the stage records the planner builds, and the engines and
routes a call can take.

Every number here is read from the C++ definitions (``seqfuse._C.vocabulary()``:
``csrc/kernels/mlp_spec.h``, ``csrc/kernels/conv_spec.h``,
``csrc/kernels/activation_table.h``, ``csrc/runtime/plan_guard.h``), never
retyped: an activation or flag added there appears here.

>>> Activation.RELU.value == dict(_VOCAB["activations"])["RELU"]
True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from ._loader import _C

__all__ = [
    "Activation", "StageKind", "ConvStageKind", "MlpStage", "ConvStage", "encode_mlp_spec", "encode_conv_spec",
    "mlp_out_features", "SUPPORTED_DTYPES", "DEVICE_ONLY_DTYPES",
    "HAS_BIAS", "HAS_BATCHNORM", "BATCHNORM_AFFINE", "BATCH_STATS", "RUNNING_STATS", "CEIL_MODE",
    "COUNT_INCLUDE_PAD", "ENGINE_FUSED", "ENGINE_GEMM_EPILOGUE", "ENGINE_ATEN_LAYOUT", "ENGINE_WINOGRAD",
    "ENGINE_NAMES",
    "CONV_ENGINE_NAMES", "ROUTE_STALE", "ROUTE_INFERENCE", "ROUTE_EAGER", "ROUTE_TRAIN", "with_dtype",
]

_VOCAB = _C.vocabulary()

_MLP_SPEC = _VOCAB["mlp_spec"]
_CONV_SPEC = _VOCAB["conv_spec"]
SPEC_VERSION = _MLP_SPEC["version"]
CONV_SPEC_VERSION = _CONV_SPEC["version"]

_DTYPE_CODES: Dict[torch.dtype, int] = {getattr(torch, name): code for name, code in _VOCAB["dtypes"].items()}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)
# Dtypes only some devices' kernels serve.
DEVICE_ONLY_DTYPES = {torch.float16: ("cuda",)}

_FLAGS = _VOCAB["flags"]
HAS_BIAS = _FLAGS["HAS_BIAS"]  # a Linear / Conv2d bias
HAS_BATCHNORM = _FLAGS["HAS_BATCHNORM"]  # a BatchNorm after the product (folded for inference)
BATCHNORM_AFFINE = _FLAGS["BATCHNORM_AFFINE"]
BATCH_STATS = _FLAGS["BATCH_STATS"]  # training ops: normalize with the batch's statistics
RUNNING_STATS = _FLAGS["RUNNING_STATS"]  # running statistics given: used without BATCH_STATS, updated with it
CEIL_MODE = _FLAGS["CEIL_MODE"]  # conv stage options of a pool
COUNT_INCLUDE_PAD = _FLAGS["COUNT_INCLUDE_PAD"]

StageKind = enum.IntEnum("StageKind", _VOCAB["stage_kinds"], module=__name__)
StageKind.__doc__ = "The kind of an MLP stage (csrc/kernels/mlp_spec.h)."
ConvStageKind = enum.IntEnum("ConvStageKind", _VOCAB["conv_stage_kinds"], module=__name__)
ConvStageKind.__doc__ = "The kind of a conv-run stage (csrc/kernels/conv_spec.h)."
Activation = enum.IntEnum("Activation", _VOCAB["activations"], module=__name__)
Activation.__doc__ = "The activation a stage ends in (csrc/kernels/activation_table.h)."

_ENGINES = dict(_VOCAB["engines"])
ENGINE_FUSED = _ENGINES["ENGINE_FUSED"]  # the fused kernels: every stage in one pass
ENGINE_GEMM_EPILOGUE = _ENGINES["ENGINE_GEMM_EPILOGUE"]  # ATen's GEMM / convolution + the fused epilogue
# Conv runs only (float32, float64): ATen per stage in the input's own layout
# (NCHW stays NCHW) + the fused epilogue in place; MLP runs treat it as engine 1.
ENGINE_ATEN_LAYOUT = _ENGINES["ENGINE_ATEN_LAYOUT"]
# Conv runs only (float32, float64): engine 0 with each 3x3 stride-1 stage that
# packs a Winograd weight run as Winograd F(2x2, 3x3) tiles (docs/kernels.md).
ENGINE_WINOGRAD = _ENGINES["ENGINE_WINOGRAD"]
ENGINE_NAMES = {ENGINE_FUSED: "fused kernel", ENGINE_GEMM_EPILOGUE: "ATen GEMM + fused epilogue"}
CONV_ENGINE_NAMES = {
    ENGINE_FUSED: "fused kernels",
    ENGINE_GEMM_EPILOGUE: "ATen convolution (NHWC) + fused epilogue",
    ENGINE_ATEN_LAYOUT: "ATen convolution in the input's layout + fused epilogue",
    ENGINE_WINOGRAD: "fused kernels, 3x3 convolutions as Winograd F(2x2,3x3)",
}

# The route a FusedSequential call takes (PlanGuard.check).
_ROUTES = _VOCAB["routes"]
ROUTE_STALE, ROUTE_INFERENCE, ROUTE_EAGER, ROUTE_TRAIN = (
    _ROUTES["STALE"], _ROUTES["INFERENCE"], _ROUTES["EAGER"], _ROUTES["TRAIN"])


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
    return int(spec[_MLP_SPEC["header"] + _MLP_SPEC["per_stage"] * (int(spec[2]) - 1) + 1])


@dataclass
class ConvStage:
    """One stage of a fused conv run (see csrc/kernels/conv_spec.h): a Conv2d
    (bias and an eval BatchNorm2d folded into its epilogue), a standalone
    BatchNorm, an activation, a pooling window, the Flatten, or a Linear after
    it; each ends in one activation. ``window`` is (kernel_h, kernel_w,
    stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dilation_h,
    dilation_w); ``param`` the Conv's groups, the AvgPool's divisor_override
    (0: none) or the Linear's in_features."""

    kind: ConvStageKind
    out_channels: int
    activation: Activation = Activation.NONE
    alpha: float = 0.0
    flags: int = 0
    eps: float = 0.0
    window: Tuple[int, ...] = (1, 1, 1, 1, 0, 0, 0, 0, 1, 1)
    param: int = 1
    options: int = 0
    # Modules whose tensors this stage packs, in conv_pack's order.
    modules: List[torch.nn.Module] = field(default_factory=list)


def encode_conv_spec(
    dtype: torch.dtype, in_channels: int, stages: Sequence[ConvStage]
) -> Tuple[List[int], List[float]]:
    """Encodes a conv run for the ``spec`` and ``fparams`` arguments of the ops.

    >>> spec, _ = encode_conv_spec(torch.float32, 3, [ConvStage(ConvStageKind.CONV, 8, Activation.RELU)])
    >>> spec[:8]
    [1, 0, 1, 3, 0, 8, 1, 0]
    """
    spec = [CONV_SPEC_VERSION, _DTYPE_CODES[dtype], len(stages), int(in_channels)]
    fparams: List[float] = []
    for s in stages:
        assert len(s.window) == 10
        spec += [int(s.kind), int(s.out_channels), int(s.activation), int(s.flags)]
        spec += [int(v) for v in s.window] + [int(s.param), int(s.options)]
        fparams += [float(s.alpha), float(s.eps)]
    return spec, fparams


def with_dtype(spec: List[int], dtype: torch.dtype) -> List[int]:
    """The same run's spec (MLP or conv) for another dtype: the dtype code is
    the spec's second value (csrc/kernels/mlp_spec.h, conv_spec.h).

    >>> with_dtype([1, 0, 1, 4, 0, 8, 0, 0], torch.bfloat16)[1] == _DTYPE_CODES[torch.bfloat16]
    True
    """
    out = list(spec)
    out[1] = _DTYPE_CODES[dtype]
    return out
