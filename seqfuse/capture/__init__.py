"""Chains inside custom forwards.

``fuse()`` gives every module whose ``forward`` is its own (a ResNet block, a
squeeze-and-excitation layer, the model itself) a :class:`CapturedForward`.
On a call it traces the module's forward one level deep for that call's
signature (every submodule is a leaf called as it is; seqfuse/capture/tracer.py,
which patches nothing global), finds the runs of fusible calls in the graph and
replaces each run by one :class:`Chain` call: a FusedSequential over the same
module objects, plus the residual addition and activation that close the run
(rewrite.py). The traces are cached per case and guarded on every call
(forward.py), and inference calls of a convolutional model run channels_last
inside (layout.py).

The module keeps its class, children, parameters and ``state_dict``: the
captured forward is an instance attribute (``module.forward``), and the chains
hold the module objects without registering them anywhere.
"""

from .forward import CapturedForward, Traced, capture_module, wants_capture
from .layout import _run_layout
from .rewrite import Chain, is_sequential_like

__all__ = ["CapturedForward", "Chain", "Traced", "capture_module", "wants_capture", "is_sequential_like"]
