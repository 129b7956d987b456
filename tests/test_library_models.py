"""Models of the libraries people use, through fuse() as a new user runs them
(timm's own model code, torchvision's segmentation and detection models;
ultralytics' YOLO where it is installed): each runs, matches eager under the
numerics rule, has at least 98% of its Conv/Linear/BatchNorm calls in fused
calls (counted at torch.nn.functional, independently of explain()), and never
needs the safety net (a SeqfuseWarning fails the test). The checks are those
of benchmarks/model_sweep.py (seqfuse/bench/sweep.py), at small inputs."""

from __future__ import annotations

import pytest

from seqfuse.bench.sweep import LIBRARIES, TORCHVISION_CLASSIFIERS, sweep_model

# Small inputs the architectures accept (levit_128s: its attention biases fix 224).
SIZE = {"inception_v3": 96, "xception41": 96, "hrnet_w18_small": 64, "fcn_resnet50": 64}

CASES = [("timm", n) for n in LIBRARIES["timm"]] + [
    ("torchvision", n) for n in LIBRARIES["torchvision"] if n not in TORCHVISION_CLASSIFIERS] + [
    ("ultralytics", "yolov8n")]


@pytest.mark.parametrize("library,name", CASES, ids=[f"{lib}:{n}" for lib, n in CASES])
def test_library_model_runs_fused_and_matches_eager(library, name):
    pytest.importorskip(library)
    r = sweep_model(library, name, size=SIZE.get(name, 64), timing=False)
    assert r.status == "ok", f"{library}:{name}: {r.status}: {r.detail}"
    assert r.call_share >= 0.98, f"{library}:{name}: {100 * r.call_share:.1f}% of the calls fused"
