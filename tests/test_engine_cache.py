"""The persisted engine choices (seqfuse/engine_cache.py): a new process reads
what an earlier one measured, concurrent writers leave a whole file with every
writer's choices, a corrupt or foreign file is ignored and rewritten, and the
cache can be moved, disabled and cleared. Each test works in its own folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import engine_cache
from seqfuse._loader import _C

from conftest import calls_until_decided


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder and no choices in this process; restored after."""
    before = _C.engine_choices()
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    _C.clear_engine_choices()
    yield tmp_path
    _C.clear_engine_choices()
    for op, dev, shape, b, t, e in before:
        _C.set_engine_choice(op, dev, shape, b, t, e)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()


def test_engines_are_measured_by_the_calls_themselves(cache):
    eager = _conv_model()
    model = seqfuse.fuse(eager)
    x = torch.randn(2, 16, 40, 40)
    with torch.no_grad():
        expected = eager(x)
        torch.testing.assert_close(model(x), expected)  # a trial: one engine, a correct result
    assert _C.engine_trials_pending() >= 1 and not _C.engine_choices()
    outputs = []
    with torch.no_grad():
        for _ in range(40):
            outputs.append(model(x))
            torch.testing.assert_close(outputs[-1], expected)
            if not _C.engine_trials_pending():
                break
    assert not _C.engine_trials_pending() and _C.engine_choices(), "decided within 40 calls"
    with torch.no_grad():  # decided: the same engine, the same bits
        assert torch.equal(model(x), model(x))


def test_example_inputs_leave_their_shapes_decided(cache):
    x = torch.randn(2, 16, 40, 40)
    seqfuse.fuse(_conv_model(), example_inputs=x)
    assert not _C.engine_trials_pending() and _C.engine_choices()
    assert engine_cache.cache_file().exists()


def test_choices_measured_by_a_call_are_saved_and_read_back(cache):
    model = seqfuse.fuse(_conv_model())
    calls_until_decided(model, torch.randn(2, 16, 40, 40))
    measured = _C.engine_choices()
    assert measured, "calls this size measure their engines"
    path = engine_cache.save()
    assert path is not None and path.parent == cache and path.exists()
    _C.clear_engine_choices()
    assert engine_cache.load() == len(measured)
    assert sorted(_C.engine_choices()) == sorted(measured)
    assert engine_cache.save() is None  # nothing new: no write


def test_a_new_process_starts_with_the_saved_choices(cache):
    code = ("import torch, seqfuse; from torch import nn; from seqfuse._loader import _C\n"
            "n = len(_C.engine_choices())\n"
            "m = seqfuse.fuse(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()).eval())\n"
            "x = torch.randn(2, 16, 40, 40)\n"
            "with torch.no_grad():\n"
            "    for _ in range(40):\n"
            "        m(x)\n"
            "        if not _C.engine_trials_pending(): break\n"
            "print(n, len(_C.engine_choices()))\n")
    env = dict(os.environ, SEQFUSE_CACHE_DIR=str(cache))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[0] == "0" and int(first.stdout.split()[1]) > 0
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    n_read, n_after = map(int, second.stdout.split())
    assert n_read > 0 and n_after == n_read  # read at import; the call measured nothing new


def test_concurrent_writers_leave_one_whole_file_with_every_choice(cache):
    code = ("import sys; from seqfuse._loader import _C; from seqfuse import engine_cache\n"
            "k = int(sys.argv[1])\n"
            "for i in range(50): _C.set_engine_choice(1, 'cpu', [k, i], 1, 2, (k + i) % 2)\n"
            "assert engine_cache.save() is not None\n")
    env = dict(os.environ, SEQFUSE_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], env=env, stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    data = json.loads(engine_cache.cache_file().read_text())
    keys = {tuple(e[2]) for e in data["choices"]}
    assert {(k, i) for k in range(4) for i in range(50)} <= keys
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "choices": []}),
                                     json.dumps({"format": 1, "fingerprint": "x", "choices": [[1]]}), ""])
def test_corrupt_or_foreign_file_is_ignored_and_rewritten(cache, content):
    path = engine_cache.cache_file()
    path.write_text(content)
    assert engine_cache.load() == 0
    _C.set_engine_choice(1, "cpu", [7, 7], 1, 2, 1)
    assert engine_cache.save() == path
    data = json.loads(path.read_text())
    assert data["fingerprint"] == engine_cache.fingerprint() and [1, "cpu", [7, 7], 1, 2, 1] in data["choices"]


def test_another_version_reads_another_file(cache, monkeypatch):
    _C.set_engine_choice(1, "cpu", [3], 1, 2, 1)
    path = engine_cache.save()
    monkeypatch.setattr(seqfuse, "__version__", "9.9.9")
    assert engine_cache.cache_file() != path
    _C.clear_engine_choices()
    assert engine_cache.load() == 0 and _C.engine_choices() == []


def test_a_build_with_another_engine_set_reads_another_file(cache, monkeypatch):
    """Choices made among fewer engines must not hide one a build adds."""
    path = engine_cache.cache_file()
    vocabulary = _C.vocabulary()
    more = dict(vocabulary, engines=list(vocabulary["engines"]) + [("ENGINE_NEXT", 99)])
    monkeypatch.setattr(engine_cache._C, "vocabulary", lambda: more)
    assert engine_cache.cache_file() != path


def test_disabled_and_cleared(cache, monkeypatch):
    _C.set_engine_choice(1, "cpu", [5], 1, 2, 0)
    path = engine_cache.save()
    assert path.exists()
    engine_cache.clear()
    assert not path.exists() and _C.engine_choices() == []
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", "")
    assert engine_cache.cache_file() is None and engine_cache.save(force=True) is None and engine_cache.load() == 0


def test_example_inputs_warm_the_model_and_save(cache):
    x = torch.randn(1, 16, 40, 40)
    model = seqfuse.fuse(_conv_model(), example_inputs=x)
    assert engine_cache.cache_file().exists()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _conv_model()(x))
