"""seqfuse: a drop-in ``nn.Sequential`` that runs chains of Linear,
BatchNorm1d and activations as single fused C++ kernel calls.

>>> import torch, seqfuse
>>> from torch import nn
>>> model = seqfuse.FusedSequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
>>> with torch.inference_mode():
...     y = model(torch.randn(8, 16))
>>> y.shape
torch.Size([8, 4])
"""

from . import ops, verify
from ._loader import BUILD_INFO
from .container import Explanation, FusedSequential, SeqfuseWarning
from .convert import fuse
from .explain import ModelExplanation, explain

__version__ = "0.1.0"

__all__ = [
    "FusedSequential",
    "fuse",
    "explain",
    "ModelExplanation",
    "Explanation",
    "SeqfuseWarning",
    "ops",
    "verify",
    "BUILD_INFO",
    "__version__",
]
