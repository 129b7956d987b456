"""Loads the native extension, turning an ABI mismatch into a readable error."""

import torch

try:
    from ._build_info import BUILD_INFO
except ImportError:  # a source tree that was never built
    BUILD_INFO = {}


def _load():
    try:
        from . import _C
    except ImportError as err:
        built = BUILD_INFO.get("torch_version")
        if built and built != torch.__version__:
            raise ImportError(
                f"seqfuse's native extension was built for torch {built}, you have torch "
                f"{torch.__version__}. Rebuild it against this torch: "
                "`pip install --no-build-isolation --force-reinstall --no-deps seqfuse` "
                "(or `make build` in a checkout)."
            ) from err
        raise ImportError(
            f"seqfuse's native extension could not be loaded ({err}). Build it with "
            "`pip install --no-build-isolation .` against the installed torch."
        ) from err
    return _C


_C = _load()
