"""The implementations a case is timed with ("peers"), built from one list of
modules, or from one whole model for a model case (:meth:`Case.from_model`).

* ``eager``   -- ``nn.Sequential(*modules)``, the baseline every ratio is relative
  to; a model is run as it is.
* ``fused``   -- ``seqfuse.FusedSequential(*modules)``; for a model
  ``seqfuse.fuse(model)`` (a deep copy with every ``nn.Sequential`` swapped).
* ``jit``     -- ``torch.jit.freeze(torch.jit.script(nn.Sequential(*modules).eval()))``
  (a copy of the model for a model case).
* ``compile`` -- ``torch.compile(nn.Sequential(*modules))`` (or of the model)
  with inductor freezing on. Compilation happens on the first call (seconds),
  which the harness makes during warm-up, inside :func:`peer_context`.
* ``ort``     -- ONNX Runtime (CPU execution provider) on an ONNX export of
  the eager model at the case's input shape.
* ``openvino`` -- OpenVINO, compiled for ``CPU``, on the same ONNX export.

All peers share the same module objects (and so the same weights; ``fused``
and ``jit`` of a model hold copies of them); that is safe because everything
runs under ``torch.inference_mode()``.

``ort`` and ``openvino`` are the inference runtimes a user would deploy the
model with instead of torch, so they are timed as such a user pays for them:
the call takes the torch input tensor and returns torch tensors, and the
numpy conversion on the way in and out is part of its time. Both run with
torch's thread count (``torch.get_num_threads()`` when the peer is built), so
every peer of a case uses the same cores. Their packages are optional
(``pip install 'seqfuse[bench]'``); without one the peer fails to build with
a message naming the pip package, which the harness reports in the notes.
They take float32 (a bfloat16 case: ``openvino`` only, at OpenVINO's default
precision on the float32 export, see :class:`OpenVinoPeer`), and time
inference only (a training case skips them, like ``jit`` and ``compile``). The export is made once per case, by the
:class:`BuildContext` the harness passes to every peer it builds.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import seqfuse

__all__ = ["PEERS", "DEFAULT_PEERS", "TRAINING_PEERS", "ONNX_PEERS", "parse_peers", "build_peer", "build_training_step",
           "peer_context", "BuildContext", "export_onnx"]

DEFAULT_PEERS = ("eager", "fused")

#: What peers are built from: a list of modules, or one whole model.
Modules = Union[List[nn.Module], nn.Module]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Writes the ONNX export of ``model`` traced on ``example`` (fixed
    shapes: the runtimes then plan for exactly the shape that is timed) to
    ``path``.

    The TorchScript-based exporter (``dynamo=False``) comes first: with torch
    2.14 it needs only the ``onnx`` package and exports the ten classifiers
    of benchmarks/real_models.py at 224x224. torch deprecates it in favour of
    the ``torch.export``-based one, which is tried when it fails (or is gone)
    and needs ``onnxscript`` too.
    Their deprecation and tracer warnings are silenced: they concern the
    export, not the benchmark.
    """
    def export(dynamo: bool) -> None:
        with warnings.catch_warnings(), _onnx_log_to_stderr():
            warnings.simplefilter("ignore")
            # verbose=False: the dynamo exporter otherwise prints its progress to stdout, into the table.
            torch.onnx.export(model, (example,), path, dynamo=dynamo, input_names=["input"], verbose=False)

    try:
        export(dynamo=False)
        return
    except Exception as e:  # whatever the reason, the other exporter may succeed
        legacy_error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"  # its first line
    try:
        importlib.import_module("onnxscript")
    except ImportError:
        raise RuntimeError(f"ONNX export failed ({legacy_error}); the dynamo-based exporter, the alternative, "
                           "needs onnxscript: pip install onnxscript") from None
    export(dynamo=True)


@contextlib.contextmanager
def _onnx_log_to_stderr():
    """Sends torch's ONNX exporter log to stderr for the duration.

    torch 2.14's TorchScript exporter enables its log whatever ``verbose``
    says, and when an export fails it dumps the whole TorchScript graph to
    the log stream, stdout by default: into the benchmark's table. stderr is
    where the harness's progress goes. torch has no getter for the stream;
    it is set back to its default, stdout."""
    set_stream = getattr(torch._C, "_jit_set_onnx_log_output_stream", None)
    if set_stream is None:
        yield
        return
    set_stream("stderr")
    try:
        yield
    finally:
        set_stream("stdout")


class BuildContext:
    """What the peers of one case share while they are built: the example
    input (its shape is the one the ONNX peers export for) and, made on the
    first request and reused by the next, the ONNX export of the eager model
    in a temporary directory. A context manager: on exit the export is
    deleted (ONNX Runtime and OpenVINO have read it by then).

    >>> with BuildContext(torch.zeros(1, 4)) as ctx:
    ...     tuple(ctx.example.shape)
    (1, 4)
    """

    def __init__(self, example: Optional[torch.Tensor] = None):
        self.example = example
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._onnx_path: Optional[str] = None
        self._onnx_error: Optional[Exception] = None

    def onnx_path(self, modules: "Modules", peer: str, bfloat16_ok: bool = False) -> str:
        """The ONNX file of the eager model over ``modules`` at the example's
        shape, exported on the first call; ``peer`` names the asking peer in
        the errors. A failed export is not retried for the next peer. A
        bfloat16 case is exported in float32 (its weights widened) for a
        peer that picks its own precision (``bfloat16_ok``)."""
        if self._onnx_path is not None:
            return self._onnx_path
        if self._onnx_error is not None:
            raise self._onnx_error
        if self.example is None:
            raise ValueError(f"the {peer} peer needs the case's example input to export the model to ONNX")
        dtype = self.example.dtype
        if dtype != torch.float32 and not (dtype == torch.bfloat16 and bfloat16_ok):
            raise ValueError(f"the {peer} peer runs float32 only, not {str(dtype).replace('torch.', '')}")
        self._tmp = tempfile.TemporaryDirectory(prefix="seqfuse-bench-onnx-")
        path = os.path.join(self._tmp.name, "model.onnx")
        try:
            if dtype == torch.float32:
                export_onnx(_eager(modules), self.example, path)
            else:
                widened = copy.deepcopy(modules)
                widened = widened.float() if isinstance(widened, nn.Module) else [m.float() for m in widened]
                export_onnx(_eager(widened), self.example.float(), path)
        except Exception as e:
            self._onnx_error = e
            raise
        self._onnx_path = path
        return path

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp = self._onnx_path = None

    def __enter__(self) -> "BuildContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _eager(modules: Modules, ctx: Optional[BuildContext] = None) -> nn.Module:
    if isinstance(modules, nn.Module):
        return modules.eval()
    return nn.Sequential(*modules).eval()


def _fused(modules: Modules, ctx: Optional[BuildContext] = None) -> nn.Module:
    if isinstance(modules, nn.Module):
        return seqfuse.fuse(modules).eval()
    return seqfuse.FusedSequential(*modules).eval()


def _jit(modules: Modules, ctx: Optional[BuildContext] = None) -> nn.Module:
    # freeze() inlines the parameters as constants; script a copy so the
    # shared modules are left untouched.
    model = copy.deepcopy(modules) if isinstance(modules, nn.Module) else nn.Sequential(*copy.deepcopy(modules))
    scripted = torch.jit.script(model.eval())
    return torch.jit.freeze(scripted)


def _compile(modules: Modules, ctx: Optional[BuildContext] = None) -> Callable:
    import torch._dynamo

    # A fresh dynamo cache per case: every case recompiles nn.Sequential.forward,
    # and too many recompiles of one code object would fall back to eager.
    torch._dynamo.reset()
    return torch.compile(_eager(modules))


def _require(module: str, peer: str):
    """Imports an optional runtime, or raises ImportError naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed (pip install {module}; the {peer} peer needs it): {e}") from None


def _to_numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _to_torch(arrays: Sequence) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The runtime's outputs as torch tensors (sharing the arrays' memory): one
    tensor for a single-output model, as eager returns it, else a tuple."""
    tensors = tuple(torch.from_numpy(a) for a in arrays)
    return tensors[0] if len(tensors) == 1 else tensors


class OnnxRuntimePeer:
    """ONNX Runtime on the case's ONNX export, configured as a latency-minded
    user would: ``threads`` intra-op threads, one inter-op thread (sequential
    execution: the graph runs node after node, each node parallel), all graph
    optimizations (constant folding, Conv+BatchNorm+activation fusion, layout
    transforms), the CPU execution provider."""

    def __init__(self, path: str, threads: int):
        ort = _require("onnxruntime", "ort")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no per-session warnings on stderr
        self.threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        return _to_torch(self.session.run(None, {self.input_name: _to_numpy(x)}))


class OpenVinoPeer:
    """OpenVINO on the case's ONNX export, compiled for ``CPU`` with
    ``INFERENCE_NUM_THREADS=threads`` and ``PERFORMANCE_HINT=LATENCY`` (one
    stream: each call uses all threads, as torch does). float32 cases pin
    the inference precision to f32: on CPUs with bfloat16 support OpenVINO
    otherwise computes in bfloat16, a different benchmark. bfloat16 cases
    leave it at OpenVINO's default (``precision=None``: bf16 where the CPU
    has bfloat16 products, as a user who installs OpenVINO gets it) on the
    float32 export, fed the bfloat16 input widened, its output rounded back;
    ``precision`` says what OpenVINO chose. One infer request is reused;
    the input is shared with it (read during the call only), the outputs
    are copied out (``share_outputs=False``) so they outlive the next call."""

    def __init__(self, path: str, threads: int, precision: Optional[str] = "f32"):
        ov = _require("openvino", "openvino")
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.threads = threads
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = chosen.get_type_name() if hasattr(chosen, "get_type_name") else str(chosen)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor):
        result = self.request.infer({0: _to_numpy(x.float())}, share_inputs=True, share_outputs=False)
        out = _to_torch(result.to_tuple())
        if x.dtype == torch.float32:
            return out
        return out.to(x.dtype) if isinstance(out, torch.Tensor) else tuple(t.to(x.dtype) for t in out)


def _ort(modules: Modules, ctx: Optional[BuildContext] = None) -> Callable:
    # Packages first (torch.onnx.export needs onnx): a missing one fails before a long export.
    _require("onnxruntime", "ort")
    _require("onnx", "ort")
    return OnnxRuntimePeer((ctx or BuildContext()).onnx_path(modules, "ort"), torch.get_num_threads())


def _openvino(modules: Modules, ctx: Optional[BuildContext] = None) -> Callable:
    _require("openvino", "openvino")
    _require("onnx", "openvino")
    ctx = ctx or BuildContext()
    path = ctx.onnx_path(modules, "openvino", bfloat16_ok=True)
    default = ctx.example is not None and ctx.example.dtype == torch.bfloat16
    return OpenVinoPeer(path, torch.get_num_threads(), precision=None if default else "f32")


#: Peer name -> builder ``(modules, BuildContext or None) -> callable``.
PEERS: Dict[str, Callable[[Modules, Optional[BuildContext]], Callable]] = {
    "eager": _eager,
    "fused": _fused,
    "jit": _jit,
    "compile": _compile,
    "ort": _ort,
    "openvino": _openvino,
}

#: Peers that run an ONNX export of the eager model (inference only; float32,
#: and OpenVINO at its default precision for bfloat16 cases).
ONNX_PEERS = ("ort", "openvino")


def parse_peers(peers: Sequence[str] | str | None) -> List[str]:
    """Validated peer names, ``eager`` always first (it is the baseline),
    duplicates dropped; accepts a comma-separated string or a sequence.

    >>> parse_peers("fused,jit")
    ['eager', 'fused', 'jit']
    >>> parse_peers(["eager", "fused"])
    ['eager', 'fused']
    """
    if peers is None:
        peers = DEFAULT_PEERS
    if isinstance(peers, str):
        peers = [peers]
    names = [p.strip() for item in peers for p in str(item).split(",") if p.strip()]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    out = ["eager"]
    for p in names:
        if p not in out:
            out.append(p)
    return out


def build_peer(name: str, modules: Modules, ctx: Optional[BuildContext] = None) -> Callable:
    """The callable for peer ``name`` over ``modules`` (a list, or one model;
    already in eval mode and the wanted dtype). ``ctx`` carries the case's
    example input, which the ONNX peers (``ort``, ``openvino``) need; pass
    the same context to every peer of a case so they share one export."""
    return PEERS[name](modules, ctx)


#: Peers a training case times (a training step through TorchScript or
#: torch.compile would measure a different program: their own autograd; ONNX
#: Runtime and OpenVINO run inference only).
TRAINING_PEERS = ("eager", "fused")


class TrainingStep:
    """One training step of a peer, as the training cases time it:
    ``zero_grad`` (set to None) + forward + ``sum().backward()``. Returns the
    detached output. ``model`` is the module it trains (training mode)."""

    def __init__(self, model: nn.Module):
        self.model = model.train()
        self.params = list(model.parameters())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        y = self.model(x)
        y.sum().backward()
        return y.detach()


def build_training_step(name: str, modules: Modules) -> TrainingStep:
    """A :class:`TrainingStep` of peer ``name`` (``eager`` or ``fused``) over
    a copy of ``modules``."""
    if name not in TRAINING_PEERS:
        raise ValueError(f"training cases time {' and '.join(TRAINING_PEERS)} only, not {name!r}")
    copied = copy.deepcopy(modules)
    if isinstance(copied, nn.Module):
        model = copied if name == "eager" else seqfuse.fuse(copied)
    else:
        model = nn.Sequential(*copied) if name == "eager" else seqfuse.FusedSequential(*copied)
    return TrainingStep(model)


def peer_context(peers: Sequence[str]):
    """Context to build, warm up and time ``peers`` in: sets
    ``torch._inductor.config.freezing = True`` when ``compile`` is among them
    (patched, not set globally, so the caller's inductor config is restored);
    a no-op otherwise. Calls still need ``torch.inference_mode()``.

    >>> with peer_context(["eager", "fused"]):
    ...     pass
    """
    if "compile" not in peers:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)
