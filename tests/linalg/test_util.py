"""linalg._util.check_finite: the cheap sum check never hides a NaN / inf, never cries wolf."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast import linalg
from resgeom_fast.linalg._util import NonFiniteError, apply_flat, check_finite


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


def test_apply_flat_layout_copies_into_the_caller_s_buffers():
    """With ``bufs`` the two layout copies (p > 1) go into the caller's buffers and the result is
    ``bufs[1]``, equal to the freshly allocated one; p = 1 needs no copy and ignores them."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 7, generator=g, dtype=torch.float64)
    op = linalg.CallableOperator(lambda X: A @ X, (7, 7), dtype=torch.float64)
    V = torch.randn(3, 7, generator=g, dtype=torch.float64)
    bufs = (torch.full((7, 3), float("nan"), dtype=torch.float64), torch.empty(3, 7, dtype=torch.float64))
    ref = apply_flat(op, V, 3, "t")
    out = apply_flat(op, V, 3, "t", bufs=bufs)
    assert out.data_ptr() == bufs[1].data_ptr()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ref, (A @ V.T).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(bufs[0], V.T, rtol=0, atol=0)
    one = apply_flat(op, V[:1], 1, "t", bufs=bufs)
    assert one.data_ptr() != bufs[1].data_ptr()
    torch.testing.assert_close(one, ref[:1], rtol=0, atol=1e-12)
