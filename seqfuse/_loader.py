"""Loads the native extension, turning an ABI mismatch into a readable error."""

import torch

try:
    from ._build_info import BUILD_INFO
except ImportError:  # a source tree that was never built
    BUILD_INFO = {}


def import_error_message(err: Exception, built_for, torch_version: str) -> str:
    """What to tell a user whose seqfuse._C failed to load.

    >>> import_error_message(ImportError("undefined symbol: _ZN3c10..."), "2.13.0+cpu", "2.14.1+cpu")[:64]
    "seqfuse's native extension was built for torch 2.13.0+cpu, you h"
    """
    if built_for and built_for != torch_version:
        return (
            f"seqfuse's native extension was built for torch {built_for}, you have torch "
            f"{torch_version}. Rebuild it against this torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps seqfuse` "
            "(or `make build` in a checkout)."
        )
    return (
        f"seqfuse's native extension could not be loaded ({err}). Build it with "
        "`pip install --no-build-isolation .` against the installed torch."
    )


def _load():
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(import_error_message(err, BUILD_INFO.get("torch_version"), torch.__version__)) from err
    return _C


_C = _load()


def _match_eager_gelu_at_inf() -> None:
    """Eager's float32 GELU(+inf) depends on the CPU kernel ATen runs (NaN
    with its AVX-512 erf, +inf with AVX2's); the fused kernels follow it."""
    with torch.inference_mode():
        v = torch.nn.functional.gelu(torch.full((64,), float("inf")))[0].item()
    _C.set_gelu_erf_at_pos_inf(v)


_match_eager_gelu_at_inf()

try:  # an invalid SEQFUSE_CPU_CAPABILITY fails here, once, not on every call
    _C.cpu_capability()
except ValueError as err:
    raise ImportError(f"{err} (from the environment variable SEQFUSE_CPU_CAPABILITY)") from None
