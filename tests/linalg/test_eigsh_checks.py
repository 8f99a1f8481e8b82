"""eigsh's convergence checks: the CPU's per-step schedule (stops at the first step that meets
tol, deterministic), Lanczos.advance(until=...), and repeated wanted eigenvalues (not certified)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.linalg._spectra import spectrum, symmetric
from resgeom_fast.linalg import CallableOperator, eigsh
from resgeom_fast.linalg._util import gaussian, generator
from resgeom_fast.linalg.eigsh import CHECK_COST, MAX_CHECK_INTERVAL, _check, check_interval
from resgeom_fast.linalg.lanczos import Lanczos


def _diagonal(ev: torch.Tensor) -> CallableOperator:
    """A symmetric operator with eigenvalues ``ev`` (a random rotation is not needed: the start
    vector is Gaussian), applied in O(n): large n without a dense matrix."""
    return CallableOperator(lambda X: ev[:, None] * X, (ev.numel(), ev.numel()), dtype=ev.dtype, symmetric=True)


def _gapped(n: int) -> torch.Tensor:
    # three outliers well above a bulk in [0, 1]: the top-3 converge in a handful of steps
    return torch.cat([torch.tensor([10.0, 8.0, 6.5], dtype=torch.float64),
                      torch.linspace(0, 1, n - 3, dtype=torch.float64)])


def _first_step_meeting_tol(op, k, which, tol, seed=0) -> int:
    """The first Lanczos step s >= k at which every wanted Ritz estimate meets tol (checked by
    hand after every step of a step-by-step run)."""
    n = op.shape[0]
    gen = generator(seed, op)
    lz = Lanczos(op, gaussian((1, n), gen, op.dtype, op.device), 1, n, "test", gen, sync_every=1)
    while True:
        lz.advance(1)
        if lz.steps >= k and bool(_check(lz, k, which, tol).conv.all()):
            return lz.steps


def test_check_interval_rule():
    n = 100_000
    assert check_interval(1, n) == 1
    # every step while CHECK_COST s^2 <= n, then the ceiling, capped
    s1 = int(math.sqrt(n / CHECK_COST))
    assert check_interval(s1, n) == 1
    assert check_interval(s1 + 1, n) == 2
    assert check_interval(10 * s1, n) == MAX_CHECK_INTERVAL
    assert check_interval(5, 300) == 2 and check_interval(300, 300) == MAX_CHECK_INTERVAL


@pytest.mark.parametrize("which", ["LA", "SA", "both"])
def test_cpu_default_stops_at_the_first_step_that_meets_tol(which):
    n, k, tol = 20_000, 3, 1e-8
    ev = _gapped(n) if which != "SA" else -_gapped(n)
    if which == "both":
        ev = torch.cat([_gapped(n // 2), -_gapped(n // 2)])
    op = _diagonal(ev)
    want = _first_step_meeting_tol(op, k, which, tol)
    assert check_interval(want, n) == 1          # the schedule checks every step up to there
    res = eigsh(op, k=k, which=which, tol=tol)
    assert res.steps == want
    assert bool(res.converged) and res.note is None
    # the same numbers as a run checking every step (one-step windows): same steps, same arithmetic
    one = eigsh(op, k=k, which=which, tol=tol, check_every=1)
    assert one.steps == res.steps
    torch.testing.assert_close(res.eigenvalues, one.eigenvalues, rtol=0, atol=0)
    # an explicit check_every keeps its fixed cadence, never stopping earlier
    ten = eigsh(op, k=k, which=which, tol=tol, check_every=10)
    assert ten.steps % 10 == 0 and ten.steps >= res.steps
    exact = ev.sort().values
    top = {"LA": exact.flip(0)[:k], "SA": exact[:k], "both": torch.cat([exact[:1], exact[-2:]])}[which]
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-10, atol=0)


def test_default_schedule_is_reproducible():
    op = _diagonal(_gapped(20_000))
    a, b = eigsh(op, k=3, tol=1e-10), eigsh(op, k=3, tol=1e-10)
    assert a.steps == b.steps
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)


def test_advance_until_stops_after_the_step_it_returns_true():
    op = _diagonal(_gapped(5000))
    gen = generator(0, op)
    v0 = gaussian((1, 5000), gen, op.dtype, op.device)
    seen = []

    def until(lz):
        seen.append(lz.steps)
        return lz.steps == 7

    lz = Lanczos(op, v0.clone(), 1, 50, "test", generator(0, op), sync_every=10)
    assert lz.advance(30, until=until) == 7
    assert seen == list(range(1, 8))
    ref = Lanczos(op, v0.clone(), 1, 50, "test", generator(0, op), sync_every=10)
    ref.advance(7)
    torch.testing.assert_close(lz.tridiagonal(), ref.tridiagonal(), rtol=0, atol=0)
    assert lz.advance(3, until=lambda lz: False) == 10


def test_advance_until_is_not_called_on_flagged_steps_and_the_redo_is_exact():
    # rank 5: the Krylov space is exhausted at step 6, a breakdown (flagged, rolled back, redone
    # with a restart) -- until never sees that step before its redo, and the run equals one without it
    ev = torch.cat([torch.arange(1.0, 6.0, dtype=torch.float64), torch.zeros(395, dtype=torch.float64)])
    A = symmetric(ev)
    op = CallableOperator(lambda X: A @ X, (400, 400), dtype=torch.float64, symmetric=True)
    calls = []
    v0 = gaussian((1, 400), generator(0, op), op.dtype, op.device)
    lz = Lanczos(op, v0.clone(), 1, 12, "test", generator(1, op), sync_every=10)
    lz.advance(12, until=lambda lz: calls.append((lz.steps, float(lz.beta[0, lz.steps - 1]))) or False)
    ref = Lanczos(op, v0.clone(), 1, 12, "test", generator(1, op), sync_every=10)
    ref.advance(12)
    torch.testing.assert_close(lz.tridiagonal(), ref.tridiagonal(), rtol=0, atol=0)
    assert float(ref.beta[0, 5]) == 0.0                  # the breakdown at step 6, restarted
    # called after every clean step of a window; never after a flagged one (a breakdown: every
    # step after the restart, whose vectors lie in the null space), which is redone on the checked path
    steps = [s for s, _ in calls]
    assert steps[:5] == [1, 2, 3, 4, 5]
    broke = {s for s in range(1, 12) if float(ref.beta[0, s - 1]) == 0.0}
    assert broke >= {6, 7, 11} and not broke & set(steps)


def test_repeated_wanted_eigenvalue_is_not_certified():
    # 5 three times at the top, then 4 and 3: single-vector Lanczos finds the copies through
    # rounding, but cannot know there is no fourth, so the 4th and 5th values are not certified
    ev = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0, 3.0], dtype=torch.float64),
                    torch.linspace(0, 2, 295, dtype=torch.float64)])
    A = symmetric(ev)
    res = eigsh(A, k=5, which="LA", max_steps=120)
    assert not bool(res.converged) and res.steps == 120
    assert "found 3 times" in res.note and "eigenvalue 5" in res.note
    assert res.to_dict()["note"] == res.note
    # asking only for the copies is certified (they are the 3 largest whatever the multiplicity)
    top3 = eigsh(A, k=3, which="LA")
    assert bool(top3.converged) and top3.note is None
    torch.testing.assert_close(top3.eigenvalues, torch.full((3,), 5.0, dtype=torch.float64), rtol=1e-10, atol=0)


def test_rank_deficient_smallest_are_all_found_before_convergence():
    # 225 zero eigenvalues: the early steps hold 3 copies of 0 and then 1.0 and 1.04 with every
    # estimate converged (step 73); eigsh goes on until the zeros fill the 5 wanted values
    ev = spectrum("rank_deficient", 300)
    res = eigsh(symmetric(ev), k=5, which="SA", max_steps=300)
    assert bool(res.converged) and res.note is None
    assert res.eigenvalues.abs().max().item() < 1e-12
    assert res.steps > 73
