"""From a container's children to a plan: maximal runs of modules the kernels
support become fused segments, everything else runs eagerly with the reason
recorded. The planner only looks at modules; it holds no tensors, so the same
code serves the cached eager path and ``torch.compile`` tracing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod

from torch.nn.modules.utils import _pair

from .spec import (
    BATCH_STATS,
    BATCHNORM_AFFINE,
    CEIL_MODE,
    COUNT_INCLUDE_PAD,
    DEVICE_ONLY_DTYPES,
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
)

@dataclass(frozen=True)
class ActivationForm:
    """One row of the activations' Python table: how PyTorch writes one
    activation of the kernels (``seqfuse.spec.Activation``, whose codes and
    names come from ``csrc/kernels/activation_table.h``). The planner reads
    the module classes, the capture the functional forms.

    * ``module``: the stock module class; ``options``: the values of its
      attributes the kernels compute (``nn.GELU``'s ``approximate``), so one
      class may serve several rows; ``alpha``: the attribute a stage carries
      as its activation parameter (``nn.LeakyReLU``'s ``negative_slope``).
    * ``functions``: the callables computing it, whose arguments after the
      input are the module's constructor arguments (``F.leaky_relu(x, 0.2,
      True)`` is ``nn.LeakyReLU(0.2, True)``), or ``(callable, builder)``
      pairs whose builder takes those arguments and returns the module or
      None; ``methods``: the Tensor method names; ``in_place``: the in-place
      callables and method names (the module with ``inplace=True`` where it
      has that argument).
    """

    activation: Activation
    module: type
    options: Tuple[Tuple[str, object], ...] = ()
    alpha: Optional[str] = None
    functions: Tuple = ()
    methods: Tuple[str, ...] = ()
    in_place: Tuple = ()


def _relu6_from_hardtanh(min_val=-1.0, max_val=1.0, inplace=False):
    return nn.ReLU6(inplace=inplace) if (min_val, max_val) == (0.0, 6.0) else None


ACTIVATION_FORMS: Tuple[ActivationForm, ...] = (
    ActivationForm(Activation.RELU, nn.ReLU, functions=(F.relu, torch.relu), methods=("relu",),
                   in_place=(torch.relu_, F.relu_, "relu_")),
    ActivationForm(Activation.LEAKY_RELU, nn.LeakyReLU, alpha="negative_slope", functions=(F.leaky_relu,)),
    ActivationForm(Activation.RELU6, nn.ReLU6, options=(("min_val", 0.0), ("max_val", 6.0)),
                   functions=(F.relu6, (F.hardtanh, _relu6_from_hardtanh))),
    ActivationForm(Activation.SIGMOID, nn.Sigmoid, functions=(torch.sigmoid, F.sigmoid),
                   methods=("sigmoid", "sigmoid_")),
    ActivationForm(Activation.TANH, nn.Tanh, functions=(torch.tanh, F.tanh), methods=("tanh",)),
    ActivationForm(Activation.GELU_ERF, nn.GELU, options=(("approximate", "none"),), functions=(F.gelu,)),
    ActivationForm(Activation.GELU_TANH, nn.GELU, options=(("approximate", "tanh"),), functions=(F.gelu,)),
    ActivationForm(Activation.SILU, nn.SiLU, functions=(F.silu,)),
    ActivationForm(Activation.HARDSWISH, nn.Hardswish, functions=(F.hardswish,)),
    ActivationForm(Activation.HARDSIGMOID, nn.Hardsigmoid, functions=(F.hardsigmoid,)),
    ActivationForm(Activation.MISH, nn.Mish, functions=(F.mish,)),
)
assert {f.activation for f in ACTIVATION_FORMS} == set(Activation) - {Activation.NONE}, "a row per activation"

# Module class -> its rows.
_ACTIVATION_MODULES = {}
for _form in ACTIVATION_FORMS:
    _ACTIVATION_MODULES.setdefault(_form.module, []).append(_form)


def _classify_activation(m: nn.Module) -> "Classified":
    forms = _ACTIVATION_MODULES[type(m)]
    for form in forms:
        if all(getattr(m, k) == v for k, v in form.options):
            alpha = float(getattr(m, form.alpha)) if form.alpha else 0.0
            return Classified(ACTIVATION, activation=form.activation, alpha=alpha)
    keys = dict.fromkeys(k for form in forms for k, _ in form.options)
    has = ", ".join(f"{k}={getattr(m, k)!r}" for k in keys)
    fused = " or ".join(", ".join(f"{k}={v!r}" for k, v in form.options) for form in forms)
    return Classified(None, f"{type(m).__name__}({has}) is not supported (fused: {fused})")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)

# Roles a module can play inside a fused run.
LINEAR, BATCHNORM, ACTIVATION, NOOP, FLATTEN = "linear", "batchnorm", "activation", "noop", "flatten"
CONV, BATCHNORM2D, POOL = "conv", "batchnorm2d", "pool"
_SPATIAL = (CONV, BATCHNORM2D, POOL)  # roles that need (N, C, H, W) input: a conv run


def global_hook_dicts() -> list:
    """The module-global hook registries; any entry disables fusion everywhere."""
    return [getattr(_module_mod, name) for name in _GLOBAL_HOOK_DICTS]


def _registered_devices() -> Tuple[str, ...]:
    devices = ["cpu"]
    if torch._C._dispatch_has_kernel_for_dispatch_key("seqfuse::mlp_forward", "CUDA"):
        devices.append("cuda")
    return tuple(devices)


# Device types with a registered seqfuse kernel (fixed once the library is
# loaded; a constant so that torch.compile traces the planner without breaks).
FUSED_DEVICES = _registered_devices()


@dataclass
class Classified:
    role: Optional[str]  # None: runs eagerly
    reason: str = ""
    activation: Activation = Activation.NONE
    alpha: float = 0.0  # the activation's parameter (LeakyReLU's negative_slope)
    width: Optional[int] = None  # the input width the module requires, if any
    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None


def _tensor_home(m: nn.Module, names: Sequence[str]):
    tensors = [getattr(m, n) for n in names if getattr(m, n, None) is not None]
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        return None, None, "its tensors do not share one dtype and device"
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in SUPPORTED_DTYPES:
        return None, None, f"no fused kernel for {dtype} (supported: float32, float64, bfloat16, float16 on CUDA)"
    if device.type not in FUSED_DEVICES:
        return None, None, f"no fused kernel for device '{device.type}' in this build"
    if device.type not in DEVICE_ONLY_DTYPES.get(dtype, (device.type,)):
        return None, None, f"no fused {device.type} kernel for {dtype} (it runs fused on CUDA)"
    return dtype, device, ""


def _classify_batchnorm(m, role: str) -> Classified:
    name = type(m).__name__
    if (m.running_mean is None) != (m.running_var is None):
        return Classified(None, f"{name} with only one of running_mean and running_var (not fused)")
    if m.training and m.track_running_stats and m.running_mean is not None and (
        m.num_batches_tracked is None or m.num_batches_tracked.dtype != torch.long
        or m.num_batches_tracked.dim() != 0 or (m.momentum is not None and not isinstance(m.momentum, (int, float)))
    ):
        return Classified(None, f"{name} with a missing or unusual num_batches_tracked or momentum (not fused)")
    dtype, device, why = _tensor_home(m, ("weight", "bias", "running_mean", "running_var"))
    if why:
        return Classified(None, why)
    if _batchnorm_flags(m) & BATCH_STATS and dtype in (torch.bfloat16, torch.float16):
        return Classified(None, f"{name} with batch statistics in {str(dtype).replace('torch.', '')} "
                                "(fused training runs float32 and float64)")
    n = m.num_features
    if (m.weight is None) != (m.bias is None) or (m.weight is None) == m.affine:
        return Classified(None, f"{name} with only one of weight and bias (not fused)")
    shapes = ([m.running_mean, m.running_var] if m.running_mean is not None else []) + (
        [m.weight, m.bias] if m.affine else [])
    if n < 1 or any(tuple(t.shape) != (n,) for t in shapes):
        return Classified(None, f"{name} tensors do not all have shape (num_features,)")
    return Classified(role, width=n, dtype=dtype, device=device)


def _batchnorm_flags(m) -> int:
    """The spec flags of a BatchNorm in its current mode, as eager's forward
    decides: batch statistics in training or without running statistics;
    running statistics updated in training when tracked."""
    flags = HAS_BATCHNORM | (BATCHNORM_AFFINE if m.affine else 0)
    has_running = m.running_mean is not None
    if m.training or not has_running:
        flags |= BATCH_STATS
    if has_running and (not m.training or m.track_running_stats):
        flags |= RUNNING_STATS
    return flags


def _batchnorm_role(flags: int) -> str:
    return "batch statistics" if flags & BATCH_STATS else "eval"


def _classify_conv(m: nn.Conv2d) -> Classified:
    if m.padding_mode != "zeros":
        return Classified(None, f"Conv2d with padding_mode={m.padding_mode!r} (only 'zeros' is fused)")
    dtype, device, why = _tensor_home(m, ("weight", "bias"))
    if why:
        return Classified(None, why)
    expected = (m.out_channels, m.in_channels // max(m.groups, 1), *m.kernel_size)
    if (
        m.in_channels < 1
        or m.out_channels < 1
        or m.groups < 1
        or m.in_channels % m.groups
        or m.out_channels % m.groups
        or tuple(m.weight.shape) != expected
        or (m.bias is not None and tuple(m.bias.shape) != (m.out_channels,))
        or len(m._reversed_padding_repeated_twice) != 4
    ):
        return Classified(None, "zero-size, or weight/bias shapes differ from the Conv2d's configuration")
    return Classified(CONV, width=m.in_channels, dtype=dtype, device=device)


def _classify_pool(m) -> Classified:
    name = type(m).__name__
    if type(m) is nn.AdaptiveAvgPool2d:
        if _pair(m.output_size) != (1, 1):
            return Classified(None, f"{name}(output_size={m.output_size}) (only output size 1 is fused)")
        return Classified(POOL)
    if getattr(m, "return_indices", False):
        return Classified(None, f"{name} with return_indices=True returns a tuple")
    k, p = _pair(m.kernel_size), _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    if any(pi > ki // 2 for pi, ki in zip(p, k)) or min(k) < 1 or min(_pair(m.stride)) < 1 or min(d) < 1:
        return Classified(None, f"{name} with padding over half the kernel or a zero window (eager rejects it)")
    if getattr(m, "divisor_override", None) == 0:
        return Classified(None, f"{name} with divisor_override=0 (eager rejects it)")
    return Classified(POOL)


def classify(m: Optional[nn.Module]) -> Classified:
    """What role ``m`` can play in a fused run, or why it must run eagerly."""
    if m is None:
        return Classified(None, "None child (fails when called, as in nn.Sequential)")
    t = type(m)
    for name in _HOOK_DICTS:
        if getattr(m, name, None):
            return Classified(None, "has hooks (hooks must see the module run)")
    if "forward" in m.__dict__:
        return Classified(None, "has an instance-level forward override")
    if t is nn.Linear:
        dtype, device, why = _tensor_home(m, ("weight", "bias"))
        if why:
            return Classified(None, why)
        n_out, n_in = m.out_features, m.in_features
        if n_in < 1 or n_out < 1 or tuple(m.weight.shape) != (n_out, n_in) or (
            m.bias is not None and tuple(m.bias.shape) != (n_out,)
        ):
            return Classified(None, "zero-size, or weight/bias shapes differ from in_features/out_features")
        return Classified(LINEAR, width=n_in, dtype=dtype, device=device)
    if t is nn.BatchNorm1d or t is nn.BatchNorm2d:
        return _classify_batchnorm(m, BATCHNORM if t is nn.BatchNorm1d else BATCHNORM2D)
    if t is nn.Conv2d:
        return _classify_conv(m)
    if t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return _classify_pool(m)
    if t in _ACTIVATION_MODULES:
        return _classify_activation(m)
    if t is nn.Identity:
        return Classified(NOOP)
    if t is nn.Dropout or t is nn.Dropout2d:
        if m.training:
            return Classified(None, "Dropout in training mode is random (runs eagerly)")
        return Classified(NOOP)
    if t is nn.Flatten:
        return Classified(FLATTEN)
    if t.__name__ == "StochasticDepth" and t.__module__.startswith("torchvision."):
        # torchvision.ops.StochasticDepth: the identity unless training with p > 0.
        if m.training and m.p > 0:
            return Classified(None, "StochasticDepth in training mode is random (runs eagerly)")
        return Classified(NOOP)
    if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Conv2d)) or t.__name__.startswith("Parametrized"):
        return Classified(None, f"{t.__name__} is a subclass or parametrization of a stock module (only exact types fuse)")
    return Classified(None, f"{t.__name__} has no fused kernel")


@dataclass
class Segment:
    """A slice [start, stop) of the container's children and how it runs."""

    start: int
    stop: int
    keys: List[str]
    modules: List[Optional[nn.Module]]
    fused: bool
    # eager segments: one reason per module
    reasons: List[str] = field(default_factory=list)
    # fused segments
    stages: List[MlpStage] = field(default_factory=list)
    roles: List[str] = field(default_factory=list)
    in_features: int = 0
    dtype: Optional[torch.dtype] = None
    flatten: Optional[Tuple[int, int]] = None  # (start_dim, end_dim) applied to the input first
    needs_2d: bool = False  # BatchNorm1d normalizes dim 1: fused only for (N, C) input
    op: str = "mlp"  # "mlp": seqfuse::mlp_forward over rows; "conv": seqfuse::conv_forward over (N, C, H, W)
    spec: List[int] = field(default_factory=list)
    fparams: List[float] = field(default_factory=list)

    def has_product(self) -> bool:
        """Whether the run multiplies (a Conv2d or Linear): under CPU autocast
        its output is then bfloat16 whatever ran before (see
        container._FusedRun.run_autocast); a run of only BatchNorms, pools and
        activations keeps its input's dtype there."""
        return len(self.engine_weights()) > 0

    def engine_weights(self) -> List[torch.Tensor]:
        """What engine 1 multiplies with: the Linear weights of an MLP run, the
        Conv2d and then the Linear (head) weights of a conv run, in stage order."""
        if self.op == "conv":
            kinds = (ConvStageKind.CONV, ConvStageKind.LINEAR)
            return [st.modules[0].weight for st in self.stages if st.kind in kinds]
        return [st.modules[0].weight for st in self.stages if st.kind == StageKind.LINEAR]

    def watched_tensors(self) -> List[torch.Tensor]:
        """Every parameter and buffer of the fused modules: what the plan
        guard watches (num_batches_tracked included: a training-mode forward
        elsewhere updates running stats without bumping their version, but it
        does bump this counter's)."""
        seen, out = set(), []
        for m in self.modules:
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    @property
    def batch_stats(self) -> bool:
        """A BatchNorm here normalizes with batch statistics: only the
        training op runs this segment (the inference op folds running ones)."""
        return any(st.flags & BATCH_STATS for st in self.stages)

    def train_params(self) -> List[torch.Tensor]:
        """The parameters the training op takes, per stage: Linear/Conv2d
        weight, [bias], [BatchNorm weight, bias]."""
        out: List[torch.Tensor] = []
        for stage in self.stages:
            for m in stage.modules:
                if type(m) in (nn.Linear, nn.Conv2d):
                    out += [m.weight] + ([m.bias] if m.bias is not None else [])
                elif m.affine:
                    out += [m.weight, m.bias]
        return out

    def train_running(self) -> List[torch.Tensor]:
        """Per BatchNorm normalizing with running statistics (eval mode):
        running_mean, running_var, as the training op reads them."""
        out: List[torch.Tensor] = []
        for stage in self.stages:
            if stage.flags & HAS_BATCHNORM and not stage.flags & BATCH_STATS:
                bn = stage.modules[-1]
                out += [bn.running_mean, bn.running_var]
        return out

    def update_stages(self) -> List[int]:
        """The stages whose BatchNorm updates its running statistics."""
        both = BATCH_STATS | RUNNING_STATS
        return [i for i, st in enumerate(self.stages) if st.flags & both == both]

    def update_buffers(self) -> List[torch.Tensor]:
        """Per updating BatchNorm: running_mean, running_var, num_batches_tracked."""
        out: List[torch.Tensor] = []
        for i in self.update_stages():
            bn = self.stages[i].modules[-1]
            out += [bn.running_mean, bn.running_var, bn.num_batches_tracked]
        return out

    def momentum(self) -> List[float]:
        """Per updating BatchNorm, its momentum (-1 for None: the cumulative average)."""
        out = []
        for i in self.update_stages():
            bn = self.stages[i].modules[-1]
            out.append(-1.0 if bn.momentum is None else float(bn.momentum))
        return out

    def train_unsupported(self) -> str:
        """Why the training op cannot run this segment ('' when it can)."""
        if self.dtype not in (torch.float32, torch.float64):
            return f"fused training runs float32 and float64, not {str(self.dtype).replace('torch.', '')}"
        if any(type(t) not in (torch.Tensor, nn.Parameter) for t in self.train_params() + self.update_buffers()):
            return "a parameter or buffer is a tensor subclass"
        return ""

    def pack_tensors(self) -> List[torch.Tensor]:
        """The tensors mlp_pack / conv_pack take, read from the modules now."""
        out: List[torch.Tensor] = []
        for stage in self.stages:
            for m in stage.modules:
                if type(m) in (nn.Linear, nn.Conv2d):
                    out.append(m.weight)
                    if m.bias is not None:
                        out.append(m.bias)
                else:
                    if m.affine:
                        out += [m.weight, m.bias]
                    out += [m.running_mean, m.running_var]
        return out


def _fold_batchnorm(last, weighted_kinds, bn, flags: int) -> bool:
    """Puts a BatchNorm into the epilogue of the stage before it when that
    stage is a Linear/Conv2d with nothing after its product yet (folded into
    scale/shift for the inference ops; normalized after the product by the
    training ops); False otherwise."""
    if (
        last is None
        or last.kind not in weighted_kinds
        or last.flags & HAS_BATCHNORM
        or last.activation != Activation.NONE
    ):
        return False
    last.flags |= flags
    last.eps = bn.eps
    last.modules.append(bn)
    return True


def _build_stages(entries) -> Tuple[List[MlpStage], List[str]]:
    stages: List[MlpStage] = []
    roles: List[str] = []
    for m, c in entries:
        last = stages[-1] if stages else None
        if c.role == LINEAR:
            flags = HAS_BIAS if m.bias is not None else 0
            stages.append(MlpStage(StageKind.LINEAR, m.out_features, flags=flags, modules=[m]))
            roles.append(f"stage {len(stages) - 1}: matmul")
        elif c.role == BATCHNORM:
            flags = _batchnorm_flags(m)
            if _fold_batchnorm(last, (StageKind.LINEAR,), m, flags):
                roles.append(f"stage {len(stages) - 1}: folded into the epilogue ({_batchnorm_role(flags)})")
            else:
                stages.append(MlpStage(StageKind.SCALE_SHIFT, m.num_features, flags=flags, eps=m.eps, modules=[m]))
                roles.append(f"stage {len(stages) - 1}: per-channel scale/shift ({_batchnorm_role(flags)})")
        elif c.role == ACTIVATION:
            alpha = c.alpha
            if last is None or last.activation != Activation.NONE:
                width = last.out_features if last is not None else None
                stages.append(MlpStage(StageKind.POINTWISE, width or 0, c.activation, alpha))
            else:
                last.activation, last.alpha = c.activation, alpha
            roles.append(f"stage {len(stages) - 1}: activation in the epilogue")
        elif c.role == FLATTEN:
            roles.append("flatten of the run's input (a view)")
        else:
            roles.append("no-op at inference")
    return stages, roles


def _window(m) -> tuple:
    """(kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, pad_bottom,
    pad_right, dilation_h, dilation_w) of a Conv2d or pooling module."""
    if type(m) is nn.Conv2d:
        left, right, top, bottom = m._reversed_padding_repeated_twice  # resolves 'same' / 'valid'
        return (*m.kernel_size, *m.stride, top, left, bottom, right, *m.dilation)
    ph, pw = _pair(m.padding)
    return (*_pair(m.kernel_size), *_pair(m.stride), ph, pw, ph, pw, *_pair(getattr(m, "dilation", 1)))


def _build_conv_stages(entries, in_channels: int) -> Tuple[List[ConvStage], List[str]]:
    stages: List[ConvStage] = []
    roles: List[str] = []
    channels = in_channels

    def add(stage: ConvStage, role: str):
        stages.append(stage)
        roles.append(f"stage {len(stages) - 1}: {role}")

    for m, c in entries:
        last = stages[-1] if stages else None
        t = type(m)
        if c.role == CONV:
            flags = HAS_BIAS if m.bias is not None else 0
            channels = m.out_channels
            kind = "depthwise convolution" if m.groups == m.in_channels == m.out_channels else "convolution"
            add(ConvStage(ConvStageKind.CONV, channels, flags=flags, window=_window(m), param=m.groups, modules=[m]),
                f"{kind} (implicit GEMM)" if kind == "convolution" else kind)
        elif c.role == LINEAR:
            flags = HAS_BIAS if m.bias is not None else 0
            channels = m.out_features
            add(ConvStage(ConvStageKind.LINEAR, channels, flags=flags, param=m.in_features, modules=[m]), "matmul")
        elif c.role in (BATCHNORM, BATCHNORM2D):
            flags = _batchnorm_flags(m)
            if _fold_batchnorm(last, (ConvStageKind.CONV, ConvStageKind.LINEAR), m, flags):
                roles.append(f"stage {len(stages) - 1}: folded into the epilogue ({_batchnorm_role(flags)})")
            else:
                channels = m.num_features  # after the Flatten, the first width the run states
                add(ConvStage(ConvStageKind.SCALE_SHIFT, channels, flags=flags, eps=m.eps, modules=[m]),
                    f"per-channel scale/shift ({_batchnorm_role(flags)})")
        elif c.role == POOL:
            if t is nn.AdaptiveAvgPool2d:
                add(ConvStage(ConvStageKind.GLOBAL_AVG_POOL, channels), "global average pool")
            elif t is nn.MaxPool2d:
                add(ConvStage(ConvStageKind.MAX_POOL, channels, window=_window(m),
                              options=CEIL_MODE if m.ceil_mode else 0), "max pool")
            else:
                options = (CEIL_MODE if m.ceil_mode else 0) | (COUNT_INCLUDE_PAD if m.count_include_pad else 0)
                add(ConvStage(ConvStageKind.AVG_POOL, channels, window=_window(m), param=m.divisor_override or 0,
                              options=options), "average pool")
        elif c.role == FLATTEN:
            add(ConvStage(ConvStageKind.FLATTEN, channels), "flatten (NCHW order)")
        elif c.role == ACTIVATION:
            alpha = c.alpha
            target = last
            if last is not None and last.kind == ConvStageKind.FLATTEN:
                # Elementwise commutes with the flatten: apply it to the stage before.
                target = stages[-2] if len(stages) > 1 else None
                if target is None or target.activation != Activation.NONE:
                    stages.insert(len(stages) - 1, ConvStage(ConvStageKind.POINTWISE, channels, c.activation, alpha))
                    roles.append(f"stage {len(stages) - 2}: activation (moved before the flatten)")
                    continue
            if target is None or target.activation != Activation.NONE:
                add(ConvStage(ConvStageKind.POINTWISE, channels, c.activation, alpha), "activation")
            else:
                target.activation, target.alpha = c.activation, alpha
                roles.append(f"stage {stages.index(target)}: activation in the epilogue")
        else:
            roles.append("no-op at inference")
    return stages, roles


def _close_run(segments, run, keys, modules, mode=None):
    """Turns the pending run (list of (index, classified)) into a segment."""
    if not run:
        return
    idx = [i for i, _ in run]
    start, stop = idx[0], idx[-1] + 1
    widths = [c.width for _, c in run if c.width is not None]
    if not widths:
        reason = "nothing to fuse: no Linear, Conv2d or BatchNorm in this run"
        segments.append(Segment(start, stop, keys[start:stop], modules[start:stop], False, [reason] * len(run)))
        return
    entries = [(modules[i], c) for i, c in run]
    first_width = next(c for _, c in run if c.width is not None)
    global_pool = any(type(modules[i]) is nn.AdaptiveAvgPool2d for i, _ in run)
    if mode in ("conv", "tail") and first_width.role not in (CONV, BATCHNORM2D) and not global_pool:
        # Pools and activations, a Flatten, then a Linear: the Linear's
        # in_features are the input channels only after a global pool.
        reason = "no Conv2d, BatchNorm2d or global pool before the Flatten to fix the input channels (not fused)"
        segments.append(Segment(start, stop, keys[start:stop], modules[start:stop], False, [reason] * len(run)))
        return
    if mode in ("conv", "tail"):
        in_channels = widths[0]
        stages, roles = _build_conv_stages(entries, in_channels)
        seg = Segment(start, stop, keys[start:stop], modules[start:stop], True, stages=stages, roles=roles,
                      in_features=in_channels, dtype=next(c.dtype for _, c in run if c.dtype is not None), op="conv")
        seg.spec, seg.fparams = encode_conv_spec(seg.dtype, in_channels, stages)
        segments.append(seg)
        return
    stages, roles = _build_stages(entries)
    in_features = widths[0]
    for s in stages:  # a leading activation takes the run's input width
        if s.kind == StageKind.POINTWISE and s.out_features == 0:
            s.out_features = in_features
    dtype = next(c.dtype for _, c in run if c.dtype is not None)
    first = modules[start]
    seg = Segment(
        start,
        stop,
        keys[start:stop],
        modules[start:stop],
        True,
        stages=stages,
        roles=roles,
        in_features=in_features,
        dtype=dtype,
        flatten=(first.start_dim, first.end_dim) if type(first) is nn.Flatten else None,
        needs_2d=any(c.role == BATCHNORM for _, c in run),
    )
    seg.spec, seg.fparams = encode_mlp_spec(dtype, in_features, stages)
    segments.append(seg)


def plan_segments(keys: Sequence[str], modules: Sequence[Optional[nn.Module]]) -> List[Segment]:
    """Splits the children into fused and eager segments.

    >>> segs = plan_segments(["0", "1", "2", "3"], [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Softsign(), nn.Linear(4, 8)])
    >>> [(s.start, s.stop, s.fused, s.op) for s in segs]
    [(0, 2, True, 'conv'), (2, 3, False, 'mlp'), (3, 4, True, 'mlp')]
    """
    keys, modules = list(keys), list(modules)
    segments: List[Segment] = []
    if any(global_hook_dicts()):
        reason = "global module hooks are registered (they must see every module run)"
        if modules:
            segments.append(Segment(0, len(modules), keys, modules, False, [reason] * len(modules)))
        return segments

    run: List[Tuple[int, Classified]] = []
    width: Optional[int] = None  # features / channels flowing out of the run so far
    home: Optional[Tuple[torch.dtype, torch.device]] = None
    # None: nothing decided yet; "mlp": rows of features (seqfuse::mlp_forward);
    # "conv": (N, C, H, W) activations; "tail": a conv run after its Flatten.
    mode: Optional[str] = None

    def flush():
        nonlocal run, width, home, mode
        _close_run(segments, run, keys, modules, mode)
        run, width, home, mode = [], None, None, None

    for i, m in enumerate(modules):
        c = classify(m)
        if c.role is None:
            flush()
            segments.append(Segment(i, i + 1, keys[i : i + 1], modules[i : i + 1], False, [c.reason]))
            continue
        if c.role == FLATTEN:
            if mode == "conv" and (m.start_dim, m.end_dim) in ((1, -1), (1, 3)):
                run.append((i, c))
                mode, width = "tail", None  # the flattened width depends on the input's spatial size
                continue
            if run:
                flush()  # otherwise a flatten starts a run (as a view of its input), never sits inside one
            mode = "mlp"
        elif c.role in _SPATIAL:
            if mode in ("mlp", "tail"):
                flush()  # a Conv2d, BatchNorm2d or pool needs the (N, C, H, W) input
            mode = "conv"
        elif c.role in (LINEAR, BATCHNORM):
            # Linear / BatchNorm1d on 4-D activations: eager's semantics, in a new run.
            if mode == "conv":
                flush()
            mode = mode or "mlp"
        # An in-place activation whose input is the run's input (nothing but
        # no-ops and a Flatten view before it) must modify the caller's tensor.
        at_run_input = all(rc.role in (NOOP, FLATTEN) for _, rc in run)
        if c.role == ACTIVATION and at_run_input and getattr(m, "inplace", False):
            flush()
            segments.append(
                Segment(i, i + 1, keys[i : i + 1], modules[i : i + 1], False,
                        ["in-place activation on the run's input (must modify the caller's tensor)"])
            )
            continue
        if c.width is not None:
            if (width is not None and c.width != width) or (home is not None and (c.dtype, c.device) != home):
                # eager reports a shape mismatch when this run gets its input
                flush()
                mode = "conv" if c.role in _SPATIAL else "mlp"
            home = (c.dtype, c.device)
            width = m.out_features if c.role == LINEAR else m.out_channels if c.role == CONV else c.width
        run.append((i, c))
    flush()
    return _merge_adjacent_eager(segments)


def _merge_adjacent_eager(segments: List[Segment]) -> List[Segment]:
    merged: List[Segment] = []
    for s in segments:
        if merged and not s.fused and not merged[-1].fused:
            p = merged[-1]
            merged[-1] = Segment(p.start, s.stop, p.keys + s.keys, p.modules + s.modules, False, p.reasons + s.reasons)
        else:
            merged.append(s)
    return merged
