"""slq_density: Gauss quadrature exactness, moments and density against the exact spectrum."""
from __future__ import annotations

import math

import pytest
import torch

from tests.linalg._spectra import spectrum, symmetric
from resgeom_fast.linalg import NonFiniteError, aslinearoperator, interval_mass, slq_density
from resgeom_fast.linalg._util import generator, rademacher


def test_moments_are_exact_quadratic_forms_of_the_probes():
    """m Lanczos steps integrate v^T A^k v exactly for k <= 2m - 1 (Gauss quadrature)."""
    n, probes, m = 150, 4, 6
    A = symmetric(spectrum("indefinite", n))
    res = slq_density(A, probes=probes, steps=m, num_moments=2 * m - 1, seed=5)
    V = rademacher((probes, n), generator(5), torch.float64, "cpu") / math.sqrt(n)
    Ak = torch.eye(n, dtype=torch.float64)
    for k in range(2 * m):
        forms = n * torch.einsum("pn,nm,pm->p", V, Ak, V)
        torch.testing.assert_close(res.moments[k], forms.mean(), rtol=1e-9, atol=1e-9)
        Ak = Ak @ A
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(probes, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["indefinite", "rank_deficient", "clustered"])
def test_moments_match_traces_within_their_error(kind):
    n = 200
    ev = spectrum(kind, n)
    A = symmetric(ev)
    res = slq_density(A, probes=40, steps=40, num_moments=3)
    for k in range(4):
        exact = (ev**k).sum().item()
        assert abs(res.moments[k].item() - exact) <= 4 * res.moments_std[k].item() + 1e-8 * max(1, abs(exact))


def test_density_matches_the_smoothed_exact_spectrum():
    n = 200
    ev = spectrum("indefinite", n)
    A = symmetric(ev)
    res = slq_density(A, probes=60, steps=80, sigma0=0.02, grid_size=800)
    g, s = res.grid, res.sigma
    exact = torch.exp(-((g[:, None] - ev[None]) ** 2) / (2 * s * s)).sum(1) / (n * s * math.sqrt(2 * math.pi))
    l1 = torch.trapezoid((res.density - exact).abs(), g).item()
    assert l1 < 0.1
    assert torch.trapezoid(res.density, g).item() == pytest.approx(1.0, abs=1e-3)
    assert res.density_std.shape == res.density.shape and (res.density_std >= 0).all()
    # extreme nodes converge to the extreme eigenvalues
    assert res.lambda_max.item() == pytest.approx(7.0, abs=1e-6)
    assert res.lambda_min.item() == pytest.approx(-8.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_local_reorth_keeps_the_quadrature(dtype):
    """Three-term recurrence only (two stored vectors): far past the loss of orthogonality
    (120 steps on 300 well-separated eigenvalues), the density and the low moments still match
    full reorthogonalisation and the probes' exact quadratic forms; ghosts split their weight."""
    n, probes, m = 300, 6, 120
    ev = spectrum("indefinite", n)
    A = symmetric(ev).to(dtype)
    full = slq_density(A, probes=probes, steps=m, sigma0=0.02, seed=3)
    local = slq_density(A, probes=probes, steps=m, sigma0=0.02, seed=3, reorth="local", grid=full.grid)
    V = rademacher((probes, n), generator(3), torch.float64, "cpu") / math.sqrt(n)
    Ak = torch.eye(n, dtype=torch.float64)
    tol = 1e-8 if dtype == torch.float64 else 2e-4
    A64 = A.double()
    for k in range(5):
        forms = n * torch.einsum("pn,nm,pm->p", V, Ak, V)
        assert abs(local.moments[k].item() - forms.mean().item()) <= tol * max(1.0, abs(forms.mean().item()))
        Ak = Ak @ A64
    l1 = torch.trapezoid((local.density - full.density).abs(), full.grid).item()
    assert l1 < (1e-6 if dtype == torch.float64 else 1e-3)
    torch.testing.assert_close(local.weights.sum(-1), torch.ones(probes, dtype=torch.float64))
    assert local.lambda_max.item() == pytest.approx(7.0, abs=1e-4)


def test_local_reorth_breakdown_restarts():
    ev = torch.zeros(60, dtype=torch.float64)
    ev[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    res = slq_density(symmetric(ev, seed=0), probes=3, steps=20, num_moments=2, reorth="local")
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(3, dtype=torch.float64))
    w, x = res.weights.flatten(), res.nodes.flatten()
    on = w > 1e-8
    d = ((x[on, None] - torch.arange(6, dtype=torch.float64)[None]).abs()).min(1).values
    assert d.max().item() < 1e-6


def test_breakdown_on_low_rank_and_batched():
    """Rank-5 operator: the Krylov space breaks down after <= 6 steps; restarts keep weights valid."""
    ev = torch.zeros(60, dtype=torch.float64)
    ev[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    mats = torch.stack([symmetric(ev, seed=0), symmetric(2 * ev, seed=1)])
    res = slq_density(mats, probes=3, steps=20, num_moments=2)
    assert res.nodes.shape == (2, 3, 20)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    # nodes carrying weight sit on the spectrum {0, 1, ..., 5} (times 2 for the second matrix)
    for i, scale in enumerate((1.0, 2.0)):
        w, x = res.weights[i].flatten(), res.nodes[i].flatten()
        on = (w > 1e-10)
        d = ((x[on, None] - scale * torch.arange(6, dtype=torch.float64)[None]).abs()).min(1).values
        assert d.max().item() < 1e-8


def test_errors():
    with pytest.raises(ValueError, match="slq_density: expected reorth one of"):
        slq_density(torch.eye(3, dtype=torch.float64), reorth="selective")
    A = symmetric(spectrum("decaying", 10))
    with pytest.raises(ValueError, match="slq_density: expected a symmetric square operator"):
        slq_density(torch.randn(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="slq_density: expected probes >= 1"):
        slq_density(A, probes=0)
    with pytest.raises(ValueError, match="slq_density: expected sigma a positive number"):
        slq_density(A, sigma=-1.0)
    op = aslinearoperator(lambda X: X * float("nan"), shape=(10, 10), dtype=torch.float64, symmetric=True)
    with pytest.raises(NonFiniteError, match="slq_density: the operator returned non-finite values"):
        slq_density(op)


# ------------------------------------------------- interval masses: rigorous brackets (issue 12)
def _probe_masses(A, ev, U, probes, seed, a, b):
    """Exact mu_v((a, b)) = sum over eigenvectors in (a, b) of (v . u_j)^2 for slq_density's probes."""
    n = ev.numel()
    V = rademacher((probes, n), generator(seed), torch.float64, "cpu") / math.sqrt(n)
    inside = (ev > a) & (ev < b)
    return ((V @ U) ** 2)[:, inside].sum(1)


@pytest.mark.parametrize("kind", ["indefinite", "decaying", "rank_deficient", "clustered"])
def test_interval_mass_brackets_each_probes_exact_mass(kind):
    """The Chebyshev-Markov-Stieltjes bracket holds the probe's exact mass at every step count,
    closes as steps grow, and is exact (zero width, the Gauss value) once the Krylov space is
    exhausted; the Gauss value always lies inside it."""
    n, probes, seed = 120, 5, 2
    ev = spectrum(kind, n)
    A = symmetric(ev)
    evd, U = torch.linalg.eigh(A)
    top = float(evd.abs().max())
    # ends away from every eigenvalue (an eigenvalue at an end is split by rounding)
    cuts = [(-0.05 * top, 0.05 * top), (-math.inf, 0.013 * top), (-math.inf, -0.1 * top), (0.3 * top, math.inf)]
    widths = {c: [] for c in cuts}
    for m in (1, 3, 10, 30, 60, n):
        res = slq_density(A, probes=probes, steps=m, seed=seed)
        for a, b in cuts:
            exact = _probe_masses(A, evd, U, probes, seed, a, b)
            im = interval_mass(res.nodes, res.weights, a, b, res.exhausted)
            assert bool((im.lower <= exact + 1e-9).all()) and bool((exact <= im.upper + 1e-9).all()), (m, a, b)
            assert bool((im.lower <= im.gauss).all()) and bool((im.gauss <= im.upper).all())
            widths[(a, b)].append(float((im.upper - im.lower).mean()))
            if bool(res.exhausted.all()):
                torch.testing.assert_close(im.gauss, exact, atol=1e-8, rtol=0)
                assert float((im.upper - im.lower).max()) == 0.0
    assert bool(res.exhausted.all())  # m = n
    for c, w in widths.items():
        assert w[0] > 0.5 or kind == "rank_deficient" and w[0] >= 0   # one node: hardly any information
        assert w[-1] == 0.0                                             # exhausted: exact


def test_one_step_brackets_everything():
    """One step: a single node of weight 1; the bracket of any interval not containing every
    eigenvalue is [0, 1] (the rule says nothing about where the mass is)."""
    A = symmetric(spectrum("indefinite", 50))
    res = slq_density(A, probes=3, steps=1)
    im = interval_mass(res.nodes, res.weights, -1.0, 1.0, res.exhausted)
    assert torch.equal(im.lower, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(im.upper, torch.ones(3, dtype=torch.float64))


def test_breakdown_marks_the_quadrature_exact():
    """A rank-5 operator breaks down after <= 6 steps: the probe's measure is then its quadrature."""
    ev = torch.zeros(60, dtype=torch.float64)
    ev[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    A = symmetric(ev, seed=0)
    res = slq_density(A, probes=3, steps=20)
    assert bool(res.exhausted.all())
    evd, U = torch.linalg.eigh(A)
    im = interval_mass(res.nodes, res.weights, -0.5, 0.5, res.exhausted)   # the null space
    torch.testing.assert_close(im.lower, _probe_masses(A, evd, U, 3, 0, -0.5, 0.5), atol=1e-8, rtol=0)
    torch.testing.assert_close(im.upper, im.lower)
    short = slq_density(symmetric(spectrum("indefinite", 60)), probes=3, steps=5)
    assert not bool(short.exhausted.any())


def test_quadrature_prefix_equals_a_shorter_run():
    """SLQResult.quadrature(s): the Gauss rule a run with s steps (same probes) returns."""
    A = symmetric(spectrum("indefinite", 100))
    long = slq_density(A, probes=4, steps=40, seed=3)
    for s in (1, 7, 20, 40):
        short = slq_density(A, probes=4, steps=s, seed=3)
        nodes, weights, exhausted = long.quadrature(s)
        torch.testing.assert_close(nodes, short.nodes, atol=1e-10, rtol=0)
        torch.testing.assert_close(weights, short.weights, atol=1e-10, rtol=0)
        assert torch.equal(exhausted, short.exhausted)
    with pytest.raises(ValueError, match="quadrature: expected steps in \\[1, 40\\], got 41"):
        long.quadrature(41)


def test_interval_mass_errors():
    res = slq_density(symmetric(spectrum("indefinite", 20)), probes=2, steps=4)
    with pytest.raises(ValueError, match="interval_mass: expected ends a < b"):
        interval_mass(res.nodes, res.weights, 1.0, -1.0)
    with pytest.raises(ValueError, match="interval_mass: expected ends a < b"):
        interval_mass(res.nodes, res.weights, float("nan"), 1.0)
    with pytest.raises(ValueError, match="interval_mass: expected nodes and weights tensors of one shape"):
        interval_mass(res.nodes, res.weights[:, :2], -1.0, 1.0)
    bad = res.nodes.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="interval_mass: expected finite nodes and weights"):
        interval_mass(bad, res.weights, -1.0, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_dense_matrix_is_named_not_called_asymmetric(bad):
    """Issue 12: a NaN in a matrix made slq_density say "expected a symmetric operator"."""
    A = symmetric(spectrum("indefinite", 20))
    A[3, 4] = bad
    with pytest.raises(NonFiniteError, match=r"slq_density: the operator produced non-finite values before the "
                                             r"first step: the matrix A has .* the first at index \(3, 4\)"):
        slq_density(A, steps=5)
