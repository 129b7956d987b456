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

__version__ = "0.1.0"  # before the submodules: engine_cache keys its file on it

from . import engine_cache, ops, verify  # noqa: E402
from ._loader import BUILD_INFO  # noqa: E402
from .container import Explanation, FusedSequential, SeqfuseWarning  # noqa: E402
from .convert import fuse  # noqa: E402
from .explain import ModelExplanation, explain  # noqa: E402
from .profiling import ModelProfile, profile  # noqa: E402


__all__ = [
    "FusedSequential",
    "fuse",
    "explain",
    "ModelExplanation",
    "profile",
    "ModelProfile",
    "Explanation",
    "SeqfuseWarning",
    "ops",
    "verify",
    "engine_cache",
    "BUILD_INFO",
    "__version__",
]
