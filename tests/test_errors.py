"""Bad input gets the error eager would raise, naming the failing child and
the input shape, and the module keeps working afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqfuse import FusedSequential


def model():
    return FusedSequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()


def eager_error(mods, x):
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            nn.Sequential(*mods)(x)
    return info.value


def fused_error(m, x):
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            m(x)
    return info.value


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(3, 7),  # wrong feature size
        torch.randint(0, 5, (3, 8)),  # integer input
        torch.randn(3, 8, dtype=torch.float64),  # dtype mismatch
        torch.randn(()),  # 0-d
        "not a tensor",
    ],
    ids=["features", "integer", "float64", "scalar", "str"],
)
def test_same_error_type_with_context(x):
    m = model()
    expected = eager_error(list(m), x)
    got = fused_error(m, x)
    assert type(got) is type(expected)
    assert str(expected) in str(got)
    assert "FusedSequential child '0'" in str(got) and "Linear(in_features=8" in str(got)
    if isinstance(x, torch.Tensor):
        assert str(tuple(x.shape)) in str(got)
    # still usable
    with torch.no_grad():
        y = torch.randn(2, 8)
        torch.testing.assert_close(m(y), nn.Sequential(*m)(y))


def test_width_mismatch_inside_chain_names_the_child():
    m = FusedSequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(12, 4)).eval()
    got = fused_error(m, torch.randn(2, 8))
    assert isinstance(got, RuntimeError) and "child '2'" in str(got) and "(2, 16)" in str(got)
    assert "[0:2] fused" in str(m.explain())


def test_batchnorm_3d_input_runs_eagerly_and_1d_errors_like_eager():
    m = model()
    x = torch.randn(2, 8)
    expected = eager_error(list(m), torch.randn(8))
    got = fused_error(m, torch.randn(8))
    assert type(got) is type(expected) and str(expected) in str(got)
    with torch.no_grad():
        torch.testing.assert_close(m(x), nn.Sequential(*m)(x))


def test_wrong_device_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    m = model()
    got = fused_error(m, torch.randn(2, 8, device="cuda"))
    assert isinstance(got, RuntimeError)
