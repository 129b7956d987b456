"""The model sweep: library models through ``fuse()`` as a new user runs them.

For each model (random weights, randomized BatchNorm statistics and affine
parameters, eval, float32, batch 1) it reports:

* ``status``: ``ok``; ``differs`` (outside the numerics rule below);
  ``crashed`` (the fused model raised where eager runs); ``fell back`` (the
  safety net fired: counted as a failure, not a pass);
* the share of the Conv/Linear/BatchNorm calls, and of the Conv/Linear
  multiply-adds, that ran inside fused calls. These are counted independently
  of :func:`seqfuse.explain`: the calls that reach ``F.conv2d``/``F.linear``/
  ``F.batch_norm`` in an eager forward (the total) and in a fused forward
  (those left eager);
* the speed against eager (interleaved rounds, median).

The numerics rule is the tests': ``torch.testing.assert_close`` defaults, or
every output no further from a float64 twin of the model than twice eager's
own distance from it (plus 1e-6 of its magnitude).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from . import timing

__all__ = ["LIBRARIES", "SweepResult", "build_model", "randomize_batchnorm", "count_calls", "sweep_model",
           "format_table"]

TORCHVISION_CLASSIFIERS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                           "regnet_y_400mf", "convnext_tiny", "densenet121", "shufflenet_v2_x1_0", "vgg11_bn"]
#: The models each library's sweep runs by default.
LIBRARIES: Dict[str, List[str]] = {
    "torchvision": TORCHVISION_CLASSIFIERS + ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                                              "fcn_resnet50", "fasterrcnn_mobilenet_v3_large_fpn"],
    "timm": ["resnet50d", "efficientnet_b1", "mobilenetv3_large_100", "regnety_008", "convnext_nano",
             "densenet121", "inception_v3", "hrnet_w18_small", "cspdarknet53", "ghostnet_100", "dla34",
             "levit_128s", "mixnet_s", "xception41", "rexnet_100"],
    "ultralytics": ["yolov8n"],
}
#: Models whose input size is fixed by the architecture.
FIXED_SIZE = {"levit_128s": 224}


def build_model(library: str, name: str, size: int) -> Tuple[nn.Module, torch.Tensor]:
    """(model in eval mode with random weights, a batch-1 input) built from the
    library's own code, without weights or network."""
    size = FIXED_SIZE.get(name, size)
    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        kwargs = {}
        if name.startswith(("fasterrcnn", "maskrcnn", "retinanet", "ssd", "fcos", "keypointrcnn")):
            kwargs = {"weights_backbone": None, "min_size": size, "max_size": size}
        elif name in ("googlenet", "inception_v3"):
            kwargs = {"aux_logits": False, "init_weights": False}
        elif name.startswith(("deeplabv3", "lraspp", "fcn")):
            kwargs = {"weights_backbone": None, "aux_loss": False} if not name.startswith("lraspp") else {
                "weights_backbone": None}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    elif library == "ultralytics":
        import os

        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(f"{name}.yaml", verbose=False)
    else:
        raise ValueError(f"unknown library {library!r} (one of {', '.join(LIBRARIES)})")
    randomize_batchnorm(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    return model.eval(), x


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine parameters away from their defaults: a
    dropped BatchNorm or a zeroed branch would otherwise not show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


class _CallCounter:
    """Counts the Conv/Linear/BatchNorm calls that reach ``torch.nn.functional``
    and the multiply-adds of the Conv/Linear ones, by wrapping those three
    functions for the duration (stock layers and library code look them up
    there at call time). A TorchFunctionMode cannot count here: under a mode
    seqfuse runs the stock layers eagerly, so the mode sees them, by design.
    This is a benchmark's instrument: it changes a global while it counts."""

    NAMES = ("conv2d", "linear", "batch_norm")

    def __init__(self):
        self.calls = 0
        self.macs = 0
        self._saved = {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls += 1
            if name != "batch_norm":
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                if isinstance(out, torch.Tensor) and isinstance(weight, torch.Tensor):
                    per_out = weight[0].numel() if name == "conv2d" else weight.shape[-1]
                    self.macs += out.numel() * per_out
            return out
        return counted

    def __enter__(self):
        for name in self.NAMES:
            self._saved[name] = getattr(F, name)
            setattr(F, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(F, name, fn)


def count_calls(fn: Callable, *args) -> Tuple[int, int]:
    """(Conv/Linear/BatchNorm calls, Conv/Linear multiply-adds) that ``fn(*args)``
    makes through ``torch.nn.functional`` (fused kernels make none)."""
    with torch.no_grad(), _CallCounter() as counter:
        fn(*args)
    return counter.calls, counter.macs


@dataclass
class SweepResult:
    library: str
    name: str
    status: str
    call_share: Optional[float] = None
    mac_share: Optional[float] = None
    speedup: Optional[float] = None
    detail: str = ""
    eager_ms: Optional[float] = None
    fused_ms: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)


def _float_leaves(out) -> List[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def numerics_ok(out, ref, model: nn.Module, x: torch.Tensor, forward: Optional[Callable] = None) -> Tuple[bool, str]:
    """The tests' numerics rule over every floating output (see the module docstring)."""
    outs, refs = _float_leaves(out), _float_leaves(ref)
    if len(outs) != len(refs) or any(a.shape != b.shape for a, b in zip(outs, refs)):
        return False, "the outputs' structure or shapes differ"
    try:
        for a, b in zip(outs, refs):
            torch.testing.assert_close(a, b)
        return True, ""
    except AssertionError:
        pass
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        r64 = _float_leaves((forward or (lambda m, t: m(t)))(twin, x.double()))
    worst = ""
    for a, b, c in zip(outs, refs, r64):
        f_err = (a.double() - c).abs().max().item() if a.numel() else 0.0
        e_err = (b.double() - c).abs().max().item() if b.numel() else 0.0
        scale = c.abs().max().item() if c.numel() else 0.0
        if not f_err <= 2 * e_err + 1e-6 * scale:
            worst = f"fused error {f_err:.3g} vs eager's {e_err:.3g} from float64 (magnitude {scale:.3g})"
            return False, worst
    return True, ""


def _interleaved_ms(fns: Dict[str, Callable], x, repeats: int, target_s: float) -> Dict[str, float]:
    inner = {}
    for k, fn in fns.items():
        timing.warm_up(fn, x, 1, 0.0)  # and until seqfuse's engine trials are over
        t0 = time.perf_counter()
        fn(x)
        one = max(time.perf_counter() - t0, 1e-6)
        inner[k] = max(1, min(200, int(target_s / one)))
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fns[k](x)
            samples[k].append((time.perf_counter() - t0) / inner[k] * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _compare_forward(library: str, name: str) -> Optional[Callable]:
    """What is compared against eager: a detector's boxes come from a
    non-maximum suppression that tiny differences can reorder, so its
    backbone + FPN features are compared (the detector still runs end to end)."""
    if library == "torchvision" and name.startswith(("fasterrcnn", "retinanet", "fcos", "maskrcnn", "ssd")):
        return lambda m, t: m.backbone(t)
    return None


def sweep_model(library: str, name: str, size: int = 160, repeats: int = 5, target_s: float = 0.05,
                timing: bool = True) -> SweepResult:
    """Builds, fuses, checks and times one model (see the module docstring)."""
    import seqfuse
    from seqfuse import SeqfuseWarning

    try:
        model, x = build_model(library, name, size)
    except Exception as err:
        return SweepResult(library, name, "not built", detail=f"{type(err).__name__}: {str(err)[:200]}")
    compare = _compare_forward(library, name)
    with torch.no_grad():
        ref = model(x)
        ref_cmp = compare(model, x) if compare else ref
    total_calls, total_macs = count_calls(compare or (lambda m, t: m(t)), model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SeqfuseWarning)
        try:
            fused = seqfuse.fuse(model)
            with torch.no_grad():
                out = fused(x)
                out_cmp = compare(fused, x) if compare else out
                out_cmp2 = compare(fused, x) if compare else fused(x)
            left_calls, left_macs = count_calls(compare or (lambda m, t: m(t)), fused, x)
        except Exception as err:
            return SweepResult(library, name, "crashed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    fell = [w for w in caught if issubclass(w.category, SeqfuseWarning)]
    result = SweepResult(library, name, "ok",
                         call_share=1 - left_calls / total_calls if total_calls else 1.0,
                         mac_share=1 - left_macs / total_macs if total_macs else 1.0)
    if fell:
        result.status, result.detail = "fell back", str(fell[0].message).splitlines()[0][:300]
    else:
        ok, why = numerics_ok(out_cmp, ref_cmp, model, x, compare)
        ok2, why2 = numerics_ok(out_cmp2, ref_cmp, model, x, compare)
        if not (ok and ok2):
            result.status, result.detail = "differs", why or why2
    if timing and result.status in ("ok", "differs"):
        with torch.inference_mode():
            ms = _interleaved_ms({"eager": model, "fused": fused}, x, repeats, target_s)
        result.eager_ms, result.fused_ms = ms["eager"], ms["fused"]
        result.speedup = ms["eager"] / ms["fused"]
    return result


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def geomean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def format_table(results: Sequence[SweepResult]) -> str:
    """A markdown table of the results and a summary line."""
    lines = ["| model | status | Conv/Linear/BN calls fused | MACs fused | vs eager | note |",
             "|---|---|---|---|---|---|"]
    for r in results:
        speed = "—" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(f"| {r.library}:{r.name} | {r.status} | {_pct(r.call_share)} | {_pct(r.mac_share)} | {speed} | "
                     f"{r.detail.replace('|', '/')} |")
    bad = [r for r in results if r.status != "ok"]
    g = geomean([r.speedup for r in results if r.speedup])
    shares = [r.call_share for r in results if r.call_share is not None]
    lines.append("")
    lines.append(f"{len(results) - len(bad)} of {len(results)} ok; lowest call share "
                 f"{_pct(min(shares) if shares else None)}; speed vs eager, geometric mean "
                 f"{'—' if g is None else f'{g:.2f}x'}")
    return "\n".join(lines)
