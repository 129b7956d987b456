"""Benchmark cases: a registry of named module chains (or whole models) with an input shape.

A case only describes *what* to run. :mod:`seqfuse.bench.peers` turns its
modules into the models being compared and :mod:`seqfuse.bench.harness` times
them. To add a case, register one::

    register(Case("tiny_b8", lambda: mlp([8, 16, 4]), (8, 8), "Linear 8->16->4, ReLU"))

``build_modules`` is called with the global RNG already seeded by the harness,
so every peer of a case sees the same weights and the numbers are repeatable.

A case can also time a whole model (any ``nn.Module`` with Sequentials inside):
give ``build_model`` instead of ``build_modules``, or use :meth:`Case.from_model`.
Its fused peer is ``seqfuse.fuse(model)``; the example zoo
(:mod:`seqfuse.bench.zoo`) is registered this way as ``zoo_<name>`` cases, and
:func:`model_case` turns ``--model`` specs into cases (zoo names,
``torchvision:NAME`` and ``path.to.module:factory``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["Case", "CASES", "register", "get_case", "select_cases", "mlp", "randomize_batchnorm", "layer_flops",
           "model_case", "parse_shape", "torchvision_case", "TORCHVISION_PREFIX", "TORCHVISION_INPUT"]


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name: registry key, also the row label of the table.
        build_modules: returns a fresh list of modules (float32, any mode; the
            harness calls ``.eval()`` and converts the dtype). ``None`` for a
            model case.
        input_shape: input shape; dimension 0 is the batch.
        description: one line for ``--list`` and the JSON output.
        build_model: for a whole-model case instead of ``build_modules``:
            returns a fresh ``nn.Module``; eager runs it as is, the fused peer
            is ``seqfuse.fuse(model)``.
        train: time a training step (training mode, ``zero_grad`` + forward +
            ``sum().backward()``) instead of an inference forward.

    >>> c = Case("x", lambda: mlp([4, 2]), (3, 4), "Linear 4->2")
    >>> c.with_batch(7).input_shape
    (7, 4)
    >>> Case.from_model("m", lambda: nn.Linear(4, 2), (3, 4)).is_model
    True
    """

    name: str
    build_modules: Optional[Callable[[], List[nn.Module]]]
    input_shape: Tuple[int, ...]
    description: str = ""
    build_model: Optional[Callable[[], nn.Module]] = None
    train: bool = False

    def __post_init__(self):
        if (self.build_modules is None) == (self.build_model is None):
            raise ValueError(f"case {self.name!r}: give exactly one of build_modules and build_model")

    @classmethod
    def from_model(cls, name: str, build_model: Callable[[], nn.Module], input_shape: Sequence[int],
                   description: str = "") -> "Case":
        """A whole-model case: ``build_model()`` returns a fresh ``nn.Module``."""
        return cls(name, None, tuple(int(d) for d in input_shape), description, build_model=build_model)

    @property
    def is_model(self) -> bool:
        """True for a whole-model case (``build_model``), False for a module list."""
        return self.build_model is not None

    def build(self) -> Union[List[nn.Module], nn.Module]:
        """A fresh list of modules, or for a model case a fresh model."""
        if self.build_model is not None:
            model = self.build_model()
            if not isinstance(model, nn.Module):
                raise TypeError(f"case {self.name!r}: build_model returned {type(model).__name__}, not an nn.Module")
            return model
        return list(self.build_modules())

    def with_batch(self, batch: Optional[int]) -> "Case":
        """The same case with the batch dimension (dim 0) replaced."""
        if batch is None or batch == self.input_shape[0]:
            return self
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return dataclasses.replace(self, input_shape=(int(batch),) + tuple(self.input_shape[1:]))


CASES: Dict[str, Case] = {}


def register(case: Case) -> Case:
    """Adds ``case`` to :data:`CASES` (replacing one of the same name) and returns it.

    >>> from torch import nn
    >>> c = register(Case("tiny_example", lambda: [nn.Linear(4, 4), nn.ReLU()], (2, 4), "a doc example"))
    >>> get_case("tiny_example") is c
    True
    >>> del CASES["tiny_example"]
    """
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
    so that folding it into the preceding Linear or Conv is actually exercised."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(0.2 * torch.randn(n))
        bn.running_var.copy_(0.5 + torch.rand(n))
        if bn.affine:
            bn.weight.copy_(1.0 + 0.2 * torch.randn(n))
            bn.bias.copy_(0.1 * torch.randn(n))
    return bn


def layer_flops(modules: Sequence[nn.Module], input_shape: Sequence[int]) -> int:
    """Floating-point operations of one forward: two per multiply-add of every
    Linear (``2 * in * out`` per row; rows = product of all but the last
    dimension of its input) and every Conv1d/2d/3d (``2 * N * OH * OW * Cout *
    Cin/groups * KH * KW`` for a Conv2d); elementwise work (bias, BatchNorm,
    activations) and pooling are not counted. The shape each layer produces is
    taken from one forward of a copy of the chain on zeros, so convolutions,
    pooling and Flatten in between are followed. (Not on the meta device: its
    first use imports torch._dynamo, over a second.)

    >>> layer_flops(mlp([64, 256, 10]), (2, 64))
    75776
    >>> layer_flops([nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10)],
    ...             (1, 3, 4, 4))
    7552
    """
    chain = nn.Sequential(*copy.deepcopy(list(modules)))  # hooks and BatchNorm statistics stay off the originals
    flops = 0

    def count(layer: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal flops
        if isinstance(layer, nn.Linear):
            flops += 2 * out.numel() * layer.in_features
        else:  # out.numel() = N * Cout * OH * OW
            flops += 2 * out.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)

    for layer in chain.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            layer.register_forward_hook(count)
    dtype = next((p.dtype for p in chain.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad():
        chain(torch.zeros(tuple(input_shape), dtype=dtype))
    return flops



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


# --- convolution chains --------------------------------------------------------


def _conv_block(cin: int, cout: int, kernel_size: int = 3, activation: Optional[Type[nn.Module]] = nn.ReLU,
                groups: int = 1, bias: bool = True) -> List[nn.Module]:
    """Conv2d (stride 1, "same" padding), BatchNorm2d (random stats) and ``activation`` (none if ``None``)."""
    block = [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias),
             randomize_batchnorm(nn.BatchNorm2d(cout))]
    return block + ([activation()] if activation is not None else [])


def _conv_stack(cfg: Sequence[Union[int, str]], in_channels: int = 3) -> List[nn.Module]:
    """VGG-style features: a 3x3 :func:`_conv_block` to ``v`` channels per int
    ``v`` in ``cfg``, a MaxPool2d(2) per ``"M"``."""
    modules: List[nn.Module] = []
    for v in cfg:
        if v == "M":
            modules.append(nn.MaxPool2d(2))
        else:
            modules += _conv_block(in_channels, int(v))
            in_channels = int(v)
    return modules


def _inverted_residual_body(channels: int = 32, expand: int = 6) -> List[nn.Module]:
    """MobileNet-v2 inverted residual without the skip: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""
    hidden = channels * expand
    return (_conv_block(channels, hidden, 1, nn.ReLU6, bias=False)
            + _conv_block(hidden, hidden, 3, nn.ReLU6, groups=hidden, bias=False)
            + _conv_block(hidden, channels, 1, None, bias=False))


_CNN = [32, 64, 64]
_CNN_TEXT = "(Conv2d 3x3, BatchNorm2d (random stats), ReLU) x3, channels 3->32->64->64"
_VGG = [16, "M", 32, "M", 64, 64, "M"]

register(Case("cnn_b1_32", lambda: _conv_stack(_CNN), (1, 3, 32, 32), _CNN_TEXT + "; one 32x32 image"))
register(Case("cnn_b16_64", lambda: _conv_stack(_CNN), (16, 3, 64, 64), _CNN_TEXT + "; 16 64x64 images"))

# Training steps (zero_grad + forward + sum().backward(), training mode).
register(Case("train_mlp_small_b32", lambda: mlp([64, 128, 128, 10]), (32, 64),
              "training step: Linear 64->128->128->10, ReLU; 32 rows", train=True))
register(Case("train_mlp_bn_b64",
              lambda: [nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.BatchNorm1d(256),
                       nn.ReLU(), nn.Linear(256, 10)], (64, 256),
              "training step: (Linear 256->256, BatchNorm1d, ReLU) x2, Linear 256->10; 64 rows", train=True))
register(Case("train_mlp_wide_b512", lambda: mlp([1024, 1024, 1024]), (512, 1024),
              "training step: Linear 1024->1024->1024, ReLU; 512 rows", train=True))
register(Case("train_cnn_b8_32",
              lambda: [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                       nn.BatchNorm2d(32), nn.ReLU()], (8, 3, 32, 32),
              "training step: (Conv 3x3 3->16->32, BatchNorm2d, ReLU); 8 32x32 images", train=True))
register(
    Case(
        "vgg_b8",
        lambda: _conv_stack(_VGG) + [nn.Flatten(), nn.Linear(64 * 4 * 4, 10)],
        (8, 3, 32, 32),
        "VGG-style: Conv3x3/BN2d/ReLU 3->16, MaxPool, ->32, MaxPool, ->64, ->64, MaxPool, Linear 1024->10",
    )
)
register(
    Case(
        "depthwise",
        _inverted_residual_body,
        (8, 32, 56, 56),
        "MobileNet-v2 inverted residual body: Conv1x1 32->192, depthwise Conv3x3, Conv1x1 ->32; BN2d, ReLU6",
    )
)


# --- whole models: the example zoo and --model specs ---------------------------

from . import zoo as _zoo  # noqa: E402  (zoo imports only torch)


def _zoo_case(entry: "_zoo.ZooEntry") -> Case:
    return Case.from_model(f"zoo_{entry.name}", lambda: entry.factory()[0], entry.input_shape(),
                           entry.description)


for _entry in _zoo.ZOO.values():
    register(_zoo_case(_entry))


def parse_shape(text: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``, or a sequence) -> ``(1, 3, 224, 224)``.

    >>> parse_shape("2,63"), parse_shape("1x3x32x32")
    ((2, 63), (1, 3, 32, 32))
    """
    if isinstance(text, str):
        body = text.strip().strip("()[]")
        parts = [p.strip() for p in body.split("," if "," in body else "x")]
        parts = parts[:-1] if "," in body and len(parts) > 1 and parts[-1] == "" else parts  # "2," (a 1-tuple)
    else:
        parts = list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"bad input shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad input shape {text!r}: expected comma-separated positive integers, e.g. 1,3,224,224")
    return shape


def _unpack_factory_result(result, spec: str) -> Tuple[nn.Module, Optional[Tuple[int, ...]]]:
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], parse_shape(result[1])
    raise ValueError(f"{spec}: the factory must return an nn.Module or (nn.Module, input_shape), "
                     f"got {type(result).__name__}")


def _load_factory(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"bad model spec {spec!r}: expected path.to.module:factory, torchvision:NAME "
                         f"or a zoo name ({', '.join(_zoo.ZOO)})")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec}: cannot import {module_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{spec}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec}: {attr!r} is not callable")
    return obj


#: The ``--model torchvision:NAME`` spec prefix, and the input shape such a
#: case gets without ``--input``: one ImageNet-sized image, what the
#: classification models are designed for.
TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_INPUT = (1, 3, 224, 224)


def _torchvision_models():
    """``torchvision.models``, or a ValueError that says how to install it
    (torchvision is optional: only ``torchvision:`` specs need it)."""
    try:
        import torchvision.models
    except ImportError as e:
        raise ValueError(f"torchvision models need torchvision, which cannot be imported ({e}): "
                         "pip install torchvision (the version matching your torch)") from None
    return torchvision.models


def torchvision_case(name: str, input_shape: Union[str, Sequence[int], None] = None) -> Case:
    """A whole-model case of ``torchvision.models.get_model(name, weights=None)``:
    a classification model (``torchvision.models.list_models(module=torchvision.models)``)
    with random weights (drawn from the harness's seeded RNG; nothing is
    downloaded, and the timings do not depend on the weights' values), input
    ``input_shape`` (default :data:`TORCHVISION_INPUT`). The model is built
    only when the case runs; the name is checked now, so a typo fails before
    any timing.

    >>> c = torchvision_case("resnet18", "2,3,64,64")
    >>> c.name, c.input_shape, c.is_model
    ('torchvision:resnet18', (2, 3, 64, 64), True)
    >>> torchvision_case("resnet")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown torchvision classification model 'resnet'; ...: alexnet, convnext_base, ...
    """
    models = _torchvision_models()
    import torchvision

    known = models.list_models(module=models)  # classification models only (no detection, video, ...)
    if name not in known:
        other = " (a torchvision model, but not an image classifier)" if name in models.list_models() else ""
        raise ValueError(f"unknown torchvision classification model {name!r}{other}; "
                         f"torchvision {torchvision.__version__} has: {', '.join(known)}")
    shape = parse_shape(input_shape) if input_shape is not None else TORCHVISION_INPUT
    return Case.from_model(TORCHVISION_PREFIX + name, lambda: models.get_model(name, weights=None), shape,
                           f"torchvision.models.{name} (random weights)")


def model_case(spec: str, input_shape: Union[str, Sequence[int], None] = None, seed: int = 0) -> Case:
    """The case for a ``--model`` spec: a zoo name (``nerf_mlp`` or
    ``zoo_nerf_mlp``), ``torchvision:NAME`` (see :func:`torchvision_case`;
    input 1,3,224,224 unless given) or ``path.to.module:factory``, where
    ``factory()`` returns an ``nn.Module`` or ``(nn.Module, input_shape)``.
    ``input_shape`` (``--input``) overrides the shape; it is required when the
    factory returns a bare module. To learn the shape the factory is called
    once, under a forked RNG seeded with ``seed``.

    >>> model_case("zoo_rl_policy").name, model_case("rl_policy", "1,24").input_shape
    ('zoo_rl_policy', (1, 24))
    >>> c = model_case("seqfuse.bench.zoo:nerf_mlp")
    >>> c.name, c.input_shape, c.is_model
    ('seqfuse.bench.zoo:nerf_mlp', (2, 63), True)
    >>> model_case("torchvision:mobilenet_v2").input_shape
    (1, 3, 224, 224)
    """
    shape = parse_shape(input_shape) if input_shape is not None else None
    if spec.startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):].strip()
        if not name:
            raise ValueError(f"bad model spec {spec!r}: expected torchvision:NAME, e.g. torchvision:resnet18")
        return torchvision_case(name, shape)
    if ":" not in spec:
        name = spec[len("zoo_"):] if spec.startswith("zoo_") else spec
        if name not in _zoo.ZOO:
            raise ValueError(f"unknown model {spec!r}: give a zoo name ({', '.join(_zoo.ZOO)}), "
                             "torchvision:NAME or path.to.module:factory")
        case = get_case(f"zoo_{name}")
        return dataclasses.replace(case, input_shape=shape) if shape else case

    factory = _load_factory(spec)
    if shape is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, shape = _unpack_factory_result(factory(), spec)
        if shape is None:
            raise ValueError(f"{spec}: the factory returned a bare nn.Module; give its input shape with "
                             "--input, e.g. --input 1,3,224,224")
    return Case.from_model(spec, lambda: _unpack_factory_result(factory(), spec)[0], shape,
                           f"--model {spec}")
