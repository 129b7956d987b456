"""Benchmarks of seqfuse.FusedSequential against eager nn.Sequential (and,
optionally, TorchScript, torch.compile, ONNX Runtime and OpenVINO) on CPU
inference, and of training steps (the ``train_*`` cases).

Command line: ``python -m seqfuse.bench --quick`` (``--help`` for the flags;
benchmarks/README.md explains the method and the columns). From Python:

>>> from seqfuse import bench
>>> [r] = bench.run(["small_b1"], quick=True, repeats=2, target_ms=0.5)
>>> r["numerics_ok"], r["ratio"]["fused"] > 0
(True, True)

Modules: :mod:`.cases` (the case registry), :mod:`.peers` (what is compared),
:mod:`.timing` (interleaved measurement), :mod:`.harness` (:func:`run`),
:mod:`.memory` (peak RSS in a subprocess), :mod:`.report` (table, JSON, CSV,
comparison), :mod:`.cli`.
"""

from .cases import CASES, Case, get_case, mlp, register, select_cases
from .harness import environment, parse_dtype, run, run_case
from .peers import PEERS, parse_peers
from .report import compare, table

__all__ = [
    "run",
    "run_case",
    "Case",
    "CASES",
    "register",
    "get_case",
    "select_cases",
    "mlp",
    "PEERS",
    "parse_peers",
    "parse_dtype",
    "environment",
    "table",
    "compare",
]
