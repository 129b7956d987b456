"""The CUDA build, checked on any machine: when seqfuse was built with CUDA
(setup.py does so when torch has CUDA and a toolkit is found; CI requires it
where nvcc is installed), every operator has a CUDA kernel registered, and
the extension imports without a GPU."""

import os
import re
import shutil

import pytest
import torch

import seqfuse
from seqfuse import planner

OPS_SOURCE = os.path.join(os.path.dirname(__file__), "..", "csrc", "ops", "schema.cpp")


def _schema_names():
    with open(OPS_SOURCE) as f:
        return sorted(set(re.findall(r'm\.def\(\s*"(\w+)\(', f.read())))


def test_every_op_is_in_the_schema_file_and_registered_for_cpu_and_meta():
    names = _schema_names()
    assert len(names) >= 9
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{name}", "Meta"), name


@pytest.mark.skipif(not seqfuse.BUILD_INFO.get("cuda"), reason="a CPU-only build")
def test_every_op_has_a_cuda_kernel():
    missing = [n for n in _schema_names()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{n}", "CUDA")]
    assert not missing, f"no CUDA kernel for {missing}"
    assert "cuda" in planner.FUSED_DEVICES
    assert seqfuse.BUILD_INFO["cuda_arch_list"]


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI's requirement")
def test_ci_builds_cuda_where_a_toolkit_is_installed():
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA torch or no nvcc here")
    assert seqfuse.BUILD_INFO.get("cuda"), "nvcc and a CUDA torch are here, but seqfuse was built CPU-only"
