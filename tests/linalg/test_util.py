"""linalg._util.check_finite: the cheap sum check never hides a NaN / inf, never cries wolf."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.linalg._util import NonFiniteError, check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_caught(bad):
    Y = torch.randn(1000, 3)
    Y[123, 1] = bad
    with pytest.raises(NonFiniteError, match="non-finite values .* at step 7"):
        check_finite(Y, "where", "at step 7")
    Y = torch.full((4, 4), float("inf"))
    Y[0, 0] = -float("inf")                     # inf - inf: the sum is NaN
    with pytest.raises(NonFiniteError):
        check_finite(Y, "where", "")


def test_finite_values_pass_even_when_their_sum_overflows():
    Y = torch.full((10, 10), 3e38)              # float32: the sum overflows to inf, every value is finite
    assert not torch.isfinite(Y.sum())
    assert check_finite(Y, "where", "") is Y
    assert check_finite(torch.empty(0, 3), "where", "").shape == (0, 3)
