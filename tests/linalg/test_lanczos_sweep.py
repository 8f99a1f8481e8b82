"""The CPU's one-sweep full reorthogonalisation (resgeom_fast.linalg.lanczos.Lanczos): the
components of A v_j along the old basis vectors are predicted from the recurrence and the tracked
overlaps (A symmetric), subtracted in one read of the basis, and the new vector's overlaps are
measured every step. Ground truth: the two-sweep Gram-Schmidt run (the previous algorithm, still
the CUDA one), the dense V V^T of the basis, and float64 eigenvalues."""
from __future__ import annotations

import pytest
import torch

from tests.linalg._spectra import spectrum, symmetric
from resgeom_fast import linalg
from resgeom_fast.linalg._util import generator, rademacher
from resgeom_fast.linalg.lanczos import Lanczos, sweep_tolerance
from resgeom_fast.linalg.operator import aslinearoperator


@pytest.fixture(autouse=True)
def _sweep_at_every_size(monkeypatch):
    """The sweep runs from SWEEP_MIN_N (16384) on; these small constructed cases force it."""
    monkeypatch.setattr("resgeom_fast.linalg.lanczos.SWEEP_MIN_N", 0)


def _lanczos(A, steps, sweep=True, p=3, seed=11):
    op = aslinearoperator(lambda X: A @ X, shape=A.shape, dtype=A.dtype, symmetric=True)
    gen = generator(seed)
    v0 = rademacher((p, A.shape[-1]), gen, A.dtype, A.device)
    lz = Lanczos(op, v0, p, steps, "test", gen)
    if not sweep:                 # the two-sweep Gram-Schmidt of every step (the CUDA algorithm)
        lz._sweep, lz._H, lz._G, lz.orthogonality = False, None, None, None
    lz.advance(steps)
    return lz


def _true_orthogonality(lz) -> torch.Tensor:
    V = lz.V[:, : lz.steps].double()
    G = V @ V.transpose(1, 2)
    off = G - torch.diag_embed(torch.diagonal(G, dim1=1, dim2=2))
    return off.abs().amax((1, 2))


def _ritz(lz):
    d, e = lz.tridiagonal()
    T = torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)
    return torch.linalg.eigvalsh(T)


@pytest.mark.parametrize("kind", ["clustered", "indefinite", "decaying"])
def test_float64_equals_the_two_sweep_run(kind):
    A = symmetric(spectrum(kind, 300))
    one, two = _lanczos(A, 120), _lanczos(A, 120, sweep=False)
    assert one._sweep and one.fallbacks == 0
    # T to rounding: every Ritz value, converged or not (120 of 300 steps: many are not)
    scale = float(A.abs().max())
    assert float((_ritz(one) - _ritz(two)).abs().max()) < 1e-11 * scale
    torch.testing.assert_close(one.alpha, two.alpha, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(one.beta, two.beta, rtol=0, atol=1e-11 * scale)
    # the measured orthogonality is the true one (overlaps of the stored basis)
    true = _true_orthogonality(one)
    assert bool((true < 1e-13).all())
    torch.testing.assert_close(one.orthogonality, true, rtol=0.05, atol=1e-16)


def test_float32_is_as_accurate_as_the_two_sweep_run():
    ev = spectrum("indefinite", 400)
    A64 = symmetric(ev)
    A = A64.float()
    one, two = _lanczos(A, 150), _lanczos(A, 150, sweep=False)
    exact = torch.linalg.eigvalsh(A64)
    # the extreme Ritz values against float64 eigh, both to float32 level, and to each other
    for lz in (one, two):
        r = _ritz(lz)
        assert float((r[:, -1] - exact[-1]).abs().max()) < 1e-5 * float(exact.abs().max())
        assert float((r[:, 0] - exact[0]).abs().max()) < 1e-5 * float(exact.abs().max())
    true = _true_orthogonality(one)
    assert bool((true <= sweep_tolerance(torch.float32)).all())
    torch.testing.assert_close(one.orthogonality, true, rtol=0.1, atol=1e-9)


def test_a_slightly_unsymmetric_operator_gets_gram_schmidt_passes():
    # products that are not symmetric at 1e-5 (as rounding in a deep float32 net could make
    # them): the predicted components miss by that much, the measured overlaps exceed the
    # tolerance and the new vectors get a Gram-Schmidt pass -- the basis stays orthogonal
    n = 200
    A = symmetric(spectrum("indefinite", n))
    E = torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B = A + 1e-5 * (E - E.T)
    lz = _lanczos(B, 80)
    assert lz.fallbacks > 0
    assert float(lz.orthogonality.max()) > sweep_tolerance(torch.float64)      # what was measured
    assert bool((_true_orthogonality(lz) < 1e-12).all())                        # after the passes
    two = _lanczos(B, 80, sweep=False)
    assert float((_ritz(lz)[:, -1] - _ritz(two)[:, -1]).abs().max()) < 1e-9


def test_breakdown_restarts_keep_the_basis_orthogonal():
    ev = torch.zeros(60, dtype=torch.float64)
    ev[:5] = torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0], dtype=torch.float64)
    A = symmetric(ev)
    lz = _lanczos(A, 30)
    assert bool((lz.beta[:, :29] == 0).any())          # the Krylov space is exhausted: restarts
    assert bool((_true_orthogonality(lz) < 1e-12).all())
    assert float(lz.orthogonality.max()) < 1e-12      # the broken-down steps are not counted
    two = _lanczos(A, 30, sweep=False)
    torch.testing.assert_close(_ritz(lz), _ritz(two), rtol=0, atol=1e-10)


def test_slq_density_matches_the_two_sweep_run():
    A = symmetric(spectrum("clustered", 250))
    got = linalg.slq_density(A, probes=4, steps=60, seed=3)
    orig = Lanczos.__init__

    def two_sweep(self, *a, **k):
        orig(self, *a, **k)
        self._sweep, self._H, self._G, self.orthogonality = False, None, None, None

    Lanczos.__init__ = two_sweep
    try:
        want = linalg.slq_density(A, probes=4, steps=60, seed=3)
    finally:
        Lanczos.__init__ = orig
    torch.testing.assert_close(got.nodes, want.nodes, rtol=0, atol=1e-11)
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=1e-11)
    torch.testing.assert_close(got.density, want.density, rtol=1e-9, atol=1e-12)


def test_small_operators_use_the_two_sweep_gram_schmidt(monkeypatch):
    monkeypatch.setattr("resgeom_fast.linalg.lanczos.SWEEP_MIN_N", 301)
    A = symmetric(spectrum("indefinite", 300))
    lz = _lanczos(A, 20)
    assert not lz._sweep and lz.orthogonality is None
    assert linalg.slq_density(A, probes=2, steps=20, seed=1).orthogonality is None


def test_slq_reports_the_measured_orthogonality():
    A = symmetric(spectrum("indefinite", 200))
    r = linalg.slq_density(A, probes=3, steps=50, seed=1)
    assert r.orthogonality is not None and r.orthogonality.shape == (3,)
    assert bool((r.orthogonality > 0).all()) and bool((r.orthogonality < 1e-13).all())
    assert r.to_dict()["orthogonality"] == r.orthogonality.tolist()
    batched = linalg.slq_density(torch.stack([A, 2 * A]), probes=2, steps=20, seed=1)
    assert batched.orthogonality.shape == (2, 2)
    # probes in sequential groups (a memory limit that holds one probe's basis): every group's
    limit = linalg.slq_density(A, probes=3, steps=50, seed=1).memory.bytes_needed // 2
    grouped = linalg.slq_density(A, probes=3, steps=50, seed=1, memory_limit=limit)
    assert grouped.memory.groups > 1 and grouped.orthogonality.shape == (3,)
    assert linalg.slq_density(A, probes=3, steps=50, seed=1, reorth="local").orthogonality is None
