"""Build of the seqfuse native extension with torch.utils.cpp_extension.

CPU kernels are always built. CUDA kernels (csrc/adapters/cuda/*.cu) are built when the
installed torch has CUDA and a CUDA toolkit (nvcc) is found; SEQFUSE_USE_CUDA=0/1
overrides. Install with `pip install --no-build-isolation .` so the extension is
compiled against the torch already installed (build isolation would fetch
another one).

CUDA build settings:
  CUDA_HOME / CUDA_PATH   the toolkit root; otherwise asked of the nvcc on PATH
                          (which may be a wrapper outside the toolkit)
  TORCH_CUDA_ARCH_LIST    the GPU architectures; default DEFAULT_CUDA_ARCHS
                          (sm_80 A100, sm_90 H100/H200, PTX for newer GPUs)
  SEQFUSE_WERROR=1        warnings in seqfuse's own sources are errors (CI)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def _cuda_toolkit_root():
    """(root, how it was found) of the CUDA toolkit, or (None, why not).

    torch guesses the root as the parent of the directory holding the nvcc on
    PATH, which is wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc
    exec-ing /usr/local/cuda-13.0/bin/nvcc). nvcc itself knows its root: its
    dry run prints it as TOP.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return os.path.realpath(root), f"${var}"
            return None, f"${var}={root} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found on PATH (set CUDA_HOME to the toolkit)"
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "-c", "seqfuse_probe.cu"], capture_output=True, text=True,
                             timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.M)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{nvcc} did not run: {e}"
    if match and _is_toolkit(os.path.normpath(match.group(1).strip())):
        return os.path.realpath(os.path.normpath(match.group(1).strip())), f"asked {nvcc}"
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(guess):
        return guess, f"parent of {os.path.realpath(nvcc)}"
    return None, f"could not find the toolkit root of {nvcc} (set CUDA_HOME)"


try:
    import torch
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "seqfuse: torch is not installed in this environment. Install it first "
        "(for example `pip install torch==2.14.1`), then build seqfuse with "
        "`pip install --no-build-isolation .`."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__.split("+")[0]
CUDA_ROOT, CUDA_ROOT_WHY = (None, "the installed torch has no CUDA")
if torch.version.cuda is not None and os.environ.get("SEQFUSE_USE_CUDA") != "0":
    CUDA_ROOT, CUDA_ROOT_WHY = _cuda_toolkit_root()
    if CUDA_ROOT:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = CUDA_ROOT

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _use_cuda():
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "adapters", "cuda", "*.cu"))
    override = os.environ.get("SEQFUSE_USE_CUDA")
    if override == "0":
        return False, "SEQFUSE_USE_CUDA=0"
    if override == "1":
        if CUDA_ROOT is None:
            sys.exit(f"seqfuse: SEQFUSE_USE_CUDA=1 but the CUDA build is impossible: {CUDA_ROOT_WHY}")
        return True, f"SEQFUSE_USE_CUDA=1; toolkit {CUDA_ROOT} ({CUDA_ROOT_WHY})"
    if not cuda_sources:
        return False, "no CUDA sources in this version"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    if CUDA_ROOT is None:
        return False, f"torch has CUDA {torch.version.cuda} but no toolkit: {CUDA_ROOT_WHY}"
    return True, f"torch has CUDA {torch.version.cuda}; toolkit {CUDA_ROOT} ({CUDA_ROOT_WHY})"


USE_CUDA, WHY = _use_cuda()
print(f"seqfuse: building {'CPU + CUDA' if USE_CUDA else 'CPU-only'} extension ({WHY})")

sources = _rel(
    glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "adapters", "cpu", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "runtime", "*.cpp"))
)
# -fopenmp: at::parallel_for is inlined OpenMP in torch's CPU builds. Only the
# compile gets it; the GOMP symbols resolve to the OpenMP runtime torch itself
# loads (linking another runtime would give the process two thread pools).
# C++20 named explicitly: cpp_extension then adds no -std of its own (torch
# releases before 2.13 would default to C++17, which the kernels do not build with).
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wextra", "-Wno-psabi", "-fvisibility=hidden"]
# torch's headers are not warning-clean under -Wextra: treat them as system headers.
from torch.utils.cpp_extension import include_paths  # noqa: E402

system_includes = [f"-isystem{p}" for p in include_paths()]
if os.environ.get("SEQFUSE_WERROR") == "1":
    cxx_flags.append("-Werror")
extra_compile_args = {"cxx": cxx_flags + system_includes}
Extension = CppExtension
include_dirs = [os.path.join(ROOT, "csrc")]


def _nvidia_include_dirs():
    """Headers of the CUDA libraries torch's wheel brings (cuBLAS, cuSPARSE,
    cuDNN...): ATen's CUDA headers include them and the toolkit may lack them."""
    found = []
    for site in sys.path:
        nvidia = os.path.join(site, "nvidia")
        if os.path.isdir(nvidia):
            found += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


if USE_CUDA:
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "adapters", "cuda", "*.cu")))
    arch_source = "TORCH_CUDA_ARCH_LIST" if os.environ.get("TORCH_CUDA_ARCH_LIST") else "the default"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvidia_includes = _nvidia_include_dirs()
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-DSEQFUSE_WITH_CUDA=1"]
    # Our sources warning-clean; torch's and the toolkit's headers are system headers.
    nvcc_flags += [f"-isystem={p}" for p in include_paths(device_type="cuda") + nvidia_includes]
    # ptxas's resource report is a build check: a register spill or any local
    # memory (a run-time-indexed array, a stack frame) in a kernel is a warning,
    # an error under SEQFUSE_WERROR; shared memory past a block's static limit
    # is always one. SEQFUSE_PTXAS_VERBOSE=1 prints every kernel's registers,
    # shared memory and stack.
    nvcc_flags += ["-Xptxas=--warn-on-spills,--warn-on-local-memory-usage"]
    if os.environ.get("SEQFUSE_PTXAS_VERBOSE") == "1":
        nvcc_flags += ["-Xptxas=-v"]
    if os.environ.get("SEQFUSE_WERROR") == "1":
        nvcc_flags += ["-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Wno-psabi,-Werror",
                       "-Xptxas=--warning-as-error"]
    extra_compile_args["nvcc"] = nvcc_flags
    extra_compile_args["cxx"] += ["-DSEQFUSE_WITH_CUDA=1"] + [f"-isystem{p}" for p in nvidia_includes]
    Extension = CUDAExtension
    print(f"seqfuse: CUDA architectures {os.environ['TORCH_CUDA_ARCH_LIST']} ({arch_source})")


def _write_build_info():
    """Records what the extension was built against, read by seqfuse/_loader.py."""
    info = {
        "torch_version": torch.__version__,
        "cuda": torch.version.cuda if USE_CUDA else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if USE_CUDA else None,
        "cxx_flags": cxx_flags,
    }
    path = os.path.join(ROOT, "seqfuse", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time: what seqfuse._C was compiled against."""\n\n')
        f.write(f"BUILD_INFO = {info!r}\n")


_write_build_info()

setup(
    packages=find_packages(include=["seqfuse", "seqfuse.*"]),
    ext_modules=[
        Extension(
            name="seqfuse._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={TORCH_VERSION}"],
)
