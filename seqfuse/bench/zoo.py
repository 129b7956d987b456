"""An example zoo: realistic architectures written the usual way, with plain
``nn.Sequential`` blocks inside custom ``nn.Module`` classes (no seqfuse in
sight), to show and benchmark what :func:`seqfuse.fuse` does to existing code.

Each factory takes ``batch`` (default 2) and returns ``(model, example_input_shape)``;
the models are float32, in training mode, as constructed. They are scaled
down (CIFAR-sized 3x32x32 images, narrow convolutions) so that a forward at
batch 2 takes milliseconds on a laptop CPU.

>>> model, shape = nerf_mlp()
>>> shape
(2, 63)
>>> sorted(ZOO) == sorted(["vgg_small", "resnet18_style", "mobilenet_style", "tutorial_conv_net",
...                        "alexnet_variant", "nerf_mlp", "rl_policy"])
True

:data:`ZOO` maps each name to a :class:`ZooEntry` (factory, per-sample input
shape, description); :mod:`seqfuse.bench.cases` registers one benchmark case
``zoo_<name>`` per entry, so ``python -m seqfuse.bench --case zoo_nerf_mlp``
(or ``--model nerf_mlp``) times the eager model against ``seqfuse.fuse(model)``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "ZOO",
    "ZooEntry",
    "vgg_small",
    "resnet18_style",
    "mobilenet_style",
    "tutorial_conv_net",
    "alexnet_variant",
    "nerf_mlp",
    "rl_policy",
    "VGGSmall",
    "BasicBlock",
    "ResNet18Style",
    "MobileNetStyle",
    "TutorialConvNet",
    "AlexNetVariant",
    "NeRFMLP",
    "ActorCritic",
]

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: ``factory(batch=2) -> (model, (batch,) + sample_shape)``."""

    name: str
    factory: Callable[..., Tuple[nn.Module, Shape]]
    sample_shape: Shape
    description: str

    def input_shape(self, batch: int = 2) -> Shape:
        return (int(batch),) + tuple(self.sample_shape)


ZOO: Dict[str, ZooEntry] = {}


def _zoo(sample_shape: Sequence[int], description: str):
    def register(fn):
        ZOO[fn.__name__] = ZooEntry(fn.__name__, fn, tuple(sample_shape), description)
        return fn

    return register


# --- VGG --------------------------------------------------------------------


def _vgg_features(cfg: Sequence[Union[int, str]], in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``make_layers(cfg, batch_norm=True)``."""
    layers: List[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGGSmall(nn.Module):
    """VGG with batch norm for 32x32 inputs: four conv stages, then a
    Linear/ReLU/Dropout/Linear classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _vgg_features([16, "M", 32, "M", 64, 64, "M", 128, 128, "M"])
        self.classifier = nn.Sequential(
            nn.Linear(128 * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@_zoo((3, 32, 32), "VGG-style: Conv/BN2d/ReLU/MaxPool features, Linear/ReLU/Dropout/Linear classifier")
def vgg_small(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return VGGSmall(), ZOO["vgg_small"].input_shape(batch)


# --- ResNet -----------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's basic block; the residual branch is an ``nn.Sequential``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            _conv3x3(cout, cout),
            nn.BatchNorm2d(cout),
        )
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet18Style(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks) for 32x32 inputs at a quarter
    of the width (16-32-64-128 channels), CIFAR stem (3x3 conv, no max-pool)."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


@_zoo((3, 32, 32), "ResNet-18 layout (BasicBlocks with Sequential bodies), 1/4 width, avgpool + fc head")
def resnet18_style(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return ResNet18Style(), ZOO["resnet18_style"].input_shape(batch)


# --- MobileNet --------------------------------------------------------------


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, kernel_size=3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(inplace=True),
        nn.Conv2d(cin, cout, kernel_size=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class MobileNetStyle(nn.Module):
    """MobileNet-v1 layout: a stem conv, depthwise-separable blocks (each an
    ``nn.Sequential``) with ReLU6, global average pool and a Linear classifier."""

    _BLOCKS = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2))

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)
        )
        self.blocks = nn.Sequential(*[_depthwise_separable(a, b, s) for a, b, s in self._BLOCKS])
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(self._BLOCKS[-1][1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x)))


@_zoo((3, 32, 32), "MobileNet-v1 layout: depthwise-separable Sequential blocks, ReLU6, pool + Linear")
def mobilenet_style(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return MobileNetStyle(), ZOO["mobilenet_style"].input_shape(batch)


# --- the nn.Sequential docs' OrderedDict style --------------------------------


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(cin, cout, kernel_size=3, padding=1)),
                ("bn", nn.BatchNorm2d(cout)),
                ("relu", nn.ReLU()),
            ]
        )
    )


class TutorialConvNet(nn.Module):
    """A tutorial-style encoder/decoder classifier whose Sequentials are built
    from ``OrderedDict``s (named children, as in the ``nn.Sequential`` docs)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.encoder = nn.Sequential(
            OrderedDict(
                [
                    ("block1", _conv_block(3, 16)),
                    ("pool1", nn.MaxPool2d(2)),
                    ("block2", _conv_block(16, 32)),
                    ("pool2", nn.MaxPool2d(2)),
                ]
            )
        )
        self.decoder = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(32 * 8 * 8, 128)),
                    ("sigmoid", nn.Sigmoid()),
                    ("fc2", nn.Linear(128, num_classes)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.flatten(self.encoder(x), 1))


@_zoo((3, 32, 32), "Tutorial CNN from OrderedDicts: Conv/BN2d/ReLU blocks, Linear/Sigmoid/Linear decoder")
def tutorial_conv_net(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return TutorialConvNet(), ZOO["tutorial_conv_net"].input_shape(batch)


# --- AlexNet ----------------------------------------------------------------


class AlexNetVariant(nn.Module):
    """torchvision's AlexNet layout (five convolutions, three max-pools,
    adaptive avgpool, Dropout/Linear/ReLU classifier) sized for 32x32."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 96, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(96, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(64 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@_zoo((3, 32, 32), "AlexNet layout: 5 convs + 3 max-pools, avgpool, Dropout/Linear/ReLU classifier")
def alexnet_variant(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return AlexNetVariant(), ZOO["alexnet_variant"].input_shape(batch)


# --- NeRF -------------------------------------------------------------------


class NeRFMLP(nn.Module):
    """NeRF's coordinate MLP: 8 ReLU layers of width 256 on a 63-wide
    positional encoding, the input concatenated again after the fifth layer
    (``skips=[4]``), then a linear output of (density, rgb). The two halves
    around the skip are ``nn.Sequential``s."""

    def __init__(self, in_features: int = 63, width: int = 256, depth: int = 8, skip: int = 4, out_features: int = 4):
        super().__init__()
        early: List[nn.Module] = []
        for i in range(skip + 1):
            early += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        late: List[nn.Module] = []
        for i in range(skip + 1, depth):
            late += [nn.Linear(width + in_features if i == skip + 1 else width, width), nn.ReLU()]
        late.append(nn.Linear(width, out_features))
        self.early = nn.Sequential(*early)
        self.late = nn.Sequential(*late)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.early(x)
        return self.late(torch.cat([x, h], dim=-1))


@_zoo((63,), "NeRF MLP: 63->256 x8 ReLU, input re-concatenated after layer 4 (two Sequentials), ->4")
def nerf_mlp(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return NeRFMLP(), ZOO["nerf_mlp"].input_shape(batch)


# --- reinforcement learning -------------------------------------------------


class ActorCritic(nn.Module):
    """An on-policy actor-critic (stable-baselines3's default MlpPolicy
    shape): separate 64-64 Tanh MLPs for the action mean and the value.
    ``forward`` returns ``(action_mean, value)``."""

    def __init__(self, obs_dim: int = 24, act_dim: int = 6, hidden: int = 64):
        super().__init__()
        self.policy = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, act_dim)
        )
        self.value = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )

    def forward(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.policy(obs), self.value(obs)


@_zoo((24,), "RL actor-critic: policy 24->64->64->6 and value 24->64->64->1, Tanh; returns a tuple")
def rl_policy(batch: int = 2) -> Tuple[nn.Module, Shape]:
    return ActorCritic(), ZOO["rl_policy"].input_shape(batch)
