"""The host cache of the fused CPU ops: outputs and intermediates of at
least 128 KiB are recycled blocks (pages already mapped), returned to the
cache when their tensors are freed, capped, and released on request."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

import seqfuse
from seqfuse import ops


def _model():
    torch.manual_seed(0)
    return seqfuse.FusedSequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1)).eval()


def test_large_outputs_are_recycled_and_released():
    model, x = _model(), torch.randn(2, 8, 64, 64)  # output 2x16x64x64 floats: 512 KiB
    ops.release_host_cache()
    with torch.no_grad():
        y = model(x)
        ptr, ref = y.data_ptr(), y.clone()
        assert ops.host_cache_usage()[1] >= y.numel() * 4
        del y
        assert ops.host_cache_usage()[0] >= ref.numel() * 4
        y2 = model(x)
    assert y2.data_ptr() == ptr  # the same block again, with the right values
    torch.testing.assert_close(y2, ref, rtol=0, atol=0)
    torch.testing.assert_close(y2, nn.Sequential(*model)(x))
    del y2
    assert ops.release_host_cache() > 0
    assert ops.host_cache_usage()[0] == 0


def test_cached_tensors_are_ordinary_tensors():
    model, x = _model(), torch.randn(2, 8, 64, 64)
    with torch.no_grad():
        y = model(x)
    y.resize_(4, 16, 64, 64)  # resizable storage: grows through the same allocator
    y[2:].fill_(1.0)
    assert y[2:].eq(1.0).all()
    assert y.is_contiguous() and y.device.type == "cpu"
    z = y.clone()
    del y
    torch.testing.assert_close(z[2:], torch.ones(2, 16, 64, 64))


def test_cap_zero_turns_caching_off():
    code = (
        "import torch, seqfuse\n"
        "from torch import nn\n"
        "m = seqfuse.FusedSequential(nn.Conv2d(8, 16, 1)).eval()\n"
        "with torch.no_grad():\n"
        "    y = m(torch.randn(2, 8, 64, 64))\n"
        "del y\n"
        "print(seqfuse.ops.host_cache_usage())\n"
    )
    env = dict(os.environ, SEQFUSE_HOST_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(0, 0)"
