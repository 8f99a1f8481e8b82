"""trace (Hutchinson, Hutch++) against the exact trace; error vs budget; errors."""
from __future__ import annotations

import math

import pytest
import torch

from tests.linalg._spectra import spectrum, symmetric
from resgeom_fast.linalg import NonFiniteError, aslinearoperator, trace


def _mean_abs_error(A, probes, method, seeds=range(20)):
    exact = torch.trace(A).item()
    return sum(abs(trace(A, probes=probes, method=method, seed=s).estimate.item() - exact)
               for s in seeds) / len(seeds)


def test_error_shrinks_with_probes_and_hutchpp_beats_hutchinson():
    A = symmetric(spectrum("decaying", 300) ** 4 * 10)  # eigenvalues 10 / i^2: Hutch++ territory
    e_small = _mean_abs_error(A, 12, "hutchinson")
    e_large = _mean_abs_error(A, 120, "hutchinson")
    assert e_large < 0.6 * e_small           # ~ 1/sqrt(10) in expectation
    for budget in (12, 30, 61):               # any budget, no divisibility rules
        assert _mean_abs_error(A, budget, "hutch++") < 0.5 * _mean_abs_error(A, budget, "hutchinson")


def test_stderr_is_honest():
    A = symmetric(spectrum("indefinite", 200))
    exact = torch.trace(A).item()
    z = [(trace(A, probes=50, method="hutchinson", seed=s)) for s in range(30)]
    inside = sum(abs(r.estimate.item() - exact) <= 3 * r.stderr.item() for r in z)
    assert inside >= 27  # ~99.7% nominal coverage of a 3-sigma interval


def test_exact_when_sketch_covers_range():
    """Rank-r A with Hutch++ sketch >= r: the deflated remainder is zero, the estimate exact."""
    ev = torch.zeros(100, dtype=torch.float64)
    ev[:5] = torch.tensor([5.0, 4.0, 3.0, -2.0, 1.0], dtype=torch.float64)
    A = symmetric(ev)
    r = trace(A, probes=20, method="hutch++")
    assert r.estimate.item() == pytest.approx(11.0, abs=1e-9)
    assert r.method == "hutch++" and r.matvecs == 20


def test_batched_and_small_budgets():
    mats = torch.stack([symmetric(spectrum("decaying", 80), seed=i) for i in range(3)])
    r = trace(mats, probes=2, method="hutch++")   # < 3 probes: plain Hutchinson
    assert r.method == "hutchinson" and r.estimate.shape == (3,)
    r1 = trace(mats, probes=1, method="hutchinson")
    assert math.isnan(r1.stderr[0].item())


def test_errors():
    A = symmetric(spectrum("decaying", 10))
    with pytest.raises(ValueError, match="trace: expected a square operator"):
        trace(torch.randn(4, 3, dtype=torch.float64), probes=5)
    with pytest.raises(ValueError, match="trace: expected probes >= 1, got 0"):
        trace(A, probes=0)
    with pytest.raises(ValueError, match="trace: expected method one of \\['hutchinson', 'hutch\\+\\+'\\]"):
        trace(A, probes=4, method="xtrace")
    op = aslinearoperator(lambda X: X * float("inf"), shape=(10, 10), dtype=torch.float64, symmetric=True)
    with pytest.raises(NonFiniteError, match="trace: the operator returned non-finite values"):
        trace(op, probes=6)


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_non_finite_dense_matrix_is_named(bad):
    """Issue 12: name the NaN / inf of a dense matrix (and where it is) before any product."""
    A = symmetric(spectrum("indefinite", 30))
    A[7, 2] = bad
    with pytest.raises(NonFiniteError, match=r"trace: the operator produced non-finite values before the first step: "
                                             r"the matrix A has .* the first at index \(7, 2\)"):
        trace(A, probes=6)
    for method in ("hutchinson", "hutch++"):     # an operator that fails on its probes says on which
        op = aslinearoperator(lambda X: X * float("nan"), shape=(10, 10), dtype=torch.float64, symmetric=True)
        where = "on the Hutch\\+\\+ sketch" if method == "hutch++" else "on the Hutchinson probes"
        with pytest.raises(NonFiniteError, match=f"trace: the operator returned non-finite values \\(NaN or inf\\) {where}"):
            trace(op, probes=6, method=method)


def test_rounding_floor_covers_the_error_when_the_sketch_captures_everything():
    # rank 4 < the 10 sketch columns: the Hutchinson part is ~0, so stderr alone (~1e-8 of the
    # float32 error seen before the floor existed) would claim far more accuracy than float32 has
    g = torch.Generator().manual_seed(3)
    B = torch.randn(40, 4, dtype=torch.float64, generator=g)
    A64 = B @ B.T + 1e-3 * torch.eye(40, dtype=torch.float64)[:, :1] @ torch.eye(40, dtype=torch.float64)[:1]
    true = float(torch.trace(A64))
    for dt in (torch.float32, torch.float64):
        r = trace(A64.to(dt), probes=30, seed=0)
        err = abs(float(r.estimate) - true)
        eps = torch.finfo(dt).eps
        assert r.rounding is not None and float(r.rounding) > 0
        assert err <= float(r.total_error), (dt, err, float(r.stderr), float(r.rounding))
        assert float(r.total_error) <= 1e3 * eps * abs(true)        # a floor, not a blanket
        assert r.to_dict()["rounding"] == float(r.rounding)
