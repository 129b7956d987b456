"""The CUDA training backend on a machine without a GPU: a child process
builds tests/cpp/train_simt_backend.cpp (the device walk of
csrc/adapters/cuda/train_backend.h with the kernels of
csrc/kernels/cuda/train_epilogue.cuh, run by the SIMT emulation of
csrc/kernels/cuda/simt), which re-registers the training ops' CPU kernels, and runs
training tests of tests/test_training.py through it: the CUDA epilogue path
against eager, not the CPU cores.

A few tests by default (the emulation runs every block thread as an OS
thread); SEQFUSE_SIMT_TRAIN=all runs the whole file (minutes), and
SEQFUSE_SIMT_THREADS=256 emulates the GPU's 256-thread blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    import seqfuse  # the real CPU kernels first: the emulated ones override them
    from torch.utils import cpp_extension
    root, threads = sys.argv[1], sys.argv[2]
    cpp_extension.load(
        name=f"seqfuse_train_simt_{threads}",
        sources=[os.path.join(root, "tests", "cpp", "train_simt_backend.cpp")],
        extra_include_paths=[os.path.join(root, "csrc")],
        extra_cflags=["-std=c++20", "-O2", f"-DSEQFUSE_SIMT_THREADS={threads}"],
        is_python_module=False,
        verbose=False,
    )
    dump = torch._C._dispatch_dump("seqfuse::mlp_train_forward")
    assert "train_simt_backend.cpp" in dump.split("\\nCPU:")[1].splitlines()[0], dump
    import pytest
    sys.exit(pytest.main(sys.argv[3:]))
    """
)

_QUICK = ("test_training_steps_match_sequential or test_float64_training_matches_tightly or "
          "test_training_channels_last_and_strided_inputs or test_each_activation_trains_like_sequential")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the SIMT emulation is built with g++ on Linux")
def test_cuda_training_backend_under_simt_emulation():
    threads = os.environ.get("SEQFUSE_SIMT_THREADS", "32")
    selection = [] if os.environ.get("SEQFUSE_SIMT_TRAIN") == "all" else ["-k", _QUICK]
    cmd = [sys.executable, "-c", _CHILD, ROOT, threads, "-q", "-p", "no:cacheprovider",
           os.path.join(ROOT, "tests", "test_training.py"), *selection]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    assert " passed" in done.stdout, done.stdout[-2000:]
