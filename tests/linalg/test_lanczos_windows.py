"""Lanczos runs its steps in windows without host syncs and rolls a window back to its first
flagged step (breakdown or non-finite product): the results must be exactly those of the
step-by-step run (every step checked), for full and local reorthogonalisation (issue 17)."""
from __future__ import annotations

import pytest
import torch

from tests.linalg._spectra import symmetric
from resgeom_fast.linalg._util import generator, rademacher
from resgeom_fast.linalg.lanczos import Lanczos
from resgeom_fast.linalg.operator import aslinearoperator


def _run(A, reorth, sync_every, steps, stepwise=False, calls=None):
    calls = [] if calls is None else calls

    def matmat(X):
        calls.append(X.shape[-1])
        return A @ X

    op = aslinearoperator(matmat, shape=A.shape, dtype=A.dtype, symmetric=True)
    gen = generator(11)
    v0 = rademacher((3, A.shape[-1]), gen, A.dtype, A.device)
    lz = Lanczos(op, v0, 3, steps, "test", gen, reorth=reorth, sync_every=sync_every)
    if stepwise:                                  # the reference: every step checked at once
        while lz.steps < lz.max_steps:
            lz._step(checked=True)
    else:
        lz.advance(steps // 2)
        lz.advance(steps)
    return lz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reorth", ["full", "full_one_sweep", "local"])
@pytest.mark.parametrize("kind", ["generic", "rank_deficient"])
def test_windows_reproduce_the_step_by_step_run(dtype, reorth, kind, monkeypatch):
    # "full_one_sweep": the CPU's one-sweep form, forced at this small n (SWEEP_MIN_N)
    sweep = reorth == "full_one_sweep"
    monkeypatch.setattr("resgeom_fast.linalg.lanczos.SWEEP_MIN_N", 0 if sweep else 1 << 62)
    reorth = "full" if sweep else reorth
    n = 60
    ev = torch.linspace(-2.0, 3.0, n, dtype=torch.float64)
    if kind == "rank_deficient":                  # Krylov space exhausted after 5 steps: restarts
        ev = torch.zeros(n, dtype=torch.float64)
        ev[:5] = torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0], dtype=torch.float64)
    A = symmetric(ev).to(dtype)
    ref = _run(A, reorth, 1, 40, stepwise=True)
    assert ref._sweep == sweep
    if kind == "rank_deficient" and dtype == torch.float64:
        assert bool((ref.beta[:, :39] == 0).any())   # the case does break down
    for every in (1, 7, 10, 64):
        calls = []
        lz = _run(A, reorth, every, 40, calls=calls)
        assert lz.steps == ref.steps == 40
        assert set(calls) == {3}
        if kind == "generic":               # no flag: one product per step
            assert len(calls) == 40
        else:                               # the products after a flagged step are redone; the
            assert 40 <= len(calls) <= 80   # window shrinks to 1 after a flag, so few are
        assert torch.equal(lz.alpha, ref.alpha) and torch.equal(lz.beta, ref.beta), every
        assert torch.equal(lz.V, ref.V) and torch.equal(lz.scale, ref.scale), every


def test_sync_every_is_validated():
    A = symmetric(torch.linspace(0.0, 1.0, 10, dtype=torch.float64))
    op = aslinearoperator(A)
    with pytest.raises(ValueError, match="test: expected sync_every an int >= 1, got 0"):
        Lanczos(op, torch.ones(1, 10, dtype=torch.float64), 1, 5, "test", generator(0), sync_every=0)


def test_an_operator_rejecting_nan_input_still_reports_the_first_bad_step():
    """Inside a window, a NaN product at step 2 makes the next vector NaN; an operator that
    raises on a NaN input at step 3 must not hide the NaN output of step 2."""
    from resgeom_fast.linalg import NonFiniteError, eigsh

    A = symmetric(torch.linspace(-1.0, 2.0, 30, dtype=torch.float64))
    calls = []

    def picky(X):
        if not bool(torch.isfinite(X).all()):
            raise RuntimeError("picky: expected a finite input")
        calls.append(1)
        Y = A @ X
        return Y * float("nan") if len(calls) >= 3 else Y

    op = aslinearoperator(picky, shape=(30, 30), dtype=torch.float64, symmetric=True)
    with pytest.raises(NonFiniteError, match=r"eigsh: the operator returned non-finite values .* at Lanczos step 2: 30 NaN"):
        eigsh(op, k=2)
