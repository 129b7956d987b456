"""Build of the seqfuse native extension with torch.utils.cpp_extension.

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when the
installed torch has CUDA and nvcc is found; SEQFUSE_USE_CUDA=0/1 overrides.
Install with `pip install --no-build-isolation .` so the extension is compiled
against the torch already installed (build isolation would fetch another one).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "seqfuse: torch is not installed in this environment. Install it first "
        "(for example `pip install torch==2.14.1`), then build seqfuse with "
        "`pip install --no-build-isolation .`."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__.split("+")[0]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _use_cuda():
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    override = os.environ.get("SEQFUSE_USE_CUDA")
    if override is not None:
        return override == "1", f"SEQFUSE_USE_CUDA={override}"
    if not cuda_sources:
        return False, "no CUDA sources in this version"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False, "nvcc not found"
    return True, f"torch has CUDA {torch.version.cuda} and nvcc is present"


USE_CUDA, WHY = _use_cuda()
print(f"seqfuse: building {'CPU + CUDA' if USE_CUDA else 'CPU-only'} extension ({WHY})")

sources = _rel(
    [os.path.join(ROOT, "csrc", f) for f in ("ops.cpp", "autograd.cpp", "python_bindings.cpp")]
    + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cpp"))
)
# -fopenmp: at::parallel_for is inlined OpenMP in torch's CPU builds. Only the
# compile gets it; the GOMP symbols resolve to the OpenMP runtime torch itself
# loads (linking another runtime would give the process two thread pools).
cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-psabi", "-fvisibility=hidden"]
# torch's headers are not warning-clean under -Wextra: treat them as system headers.
from torch.utils.cpp_extension import include_paths  # noqa: E402

system_includes = [f"-isystem{p}" for p in include_paths()]
if os.environ.get("SEQFUSE_WERROR") == "1":
    cxx_flags.append("-Werror")
extra_compile_args = {"cxx": cxx_flags + system_includes}
Extension = CppExtension
if USE_CUDA:
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    Extension = CUDAExtension


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
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={TORCH_VERSION}"],
)
