"""Smoke test of an installed seqfuse (run from outside the source tree by
`make wheel-check`): it imports, records its build, and runs fused."""

import torch
from torch import nn

import seqfuse

assert "site-packages" in seqfuse.__file__, seqfuse.__file__
assert seqfuse.BUILD_INFO["torch_version"] == torch.__version__, seqfuse.BUILD_INFO
# the wheel pins the torch it was built against
from importlib.metadata import requires  # noqa: E402

pinned = f"torch=={torch.__version__.split('+')[0]}"
assert pinned in (requires("seqfuse") or []), requires("seqfuse")
m = seqfuse.FusedSequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()
x = torch.randn(8, 16)
with torch.inference_mode():
    torch.testing.assert_close(m(x), nn.Sequential(*m)(x))
assert m.explain().fused_segments, str(m.explain())
cnn = seqfuse.FusedSequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)
).eval()
img = torch.randn(2, 3, 8, 8)
with torch.inference_mode():
    torch.testing.assert_close(cnn(img), nn.Sequential(*cnn)(img))
assert [s.op for s in cnn.explain().fused_segments] == ["conv"], str(cnn.explain())
print(f"seqfuse {seqfuse.__version__} wheel OK (torch {torch.__version__}, {seqfuse.ops.cpu_capability()})")
