"""eigsh against dense float64 eigh on constructed spectra; batching; errors."""
from __future__ import annotations

import pytest
import torch

from tests.linalg._spectra import spectrum, symmetric
from resgeom_fast.linalg import NonFiniteError, aslinearoperator, eigsh


@pytest.mark.parametrize("kind", ["clustered", "decaying", "indefinite", "rank_deficient"])
@pytest.mark.parametrize("which", ["LA", "SA", "both"])
def test_extreme_eigenvalues_match_dense(kind, which):
    n, k = 300, 5
    ev = spectrum(kind, n)
    A = symmetric(ev)
    res = eigsh(A, k=k, which=which, max_steps=n)
    exact = torch.linalg.eigvalsh(A)
    if which == "LA":
        want = exact.flip(0)[:k]
    elif which == "SA":
        want = exact[:k]
    else:
        want = torch.cat([exact[: k // 2], exact[n - (k - k // 2):]])
    assert bool(res.converged)
    scale = exact.abs().max()
    torch.testing.assert_close(res.eigenvalues, want, rtol=0, atol=1e-8 * scale.item())
    # Ritz vectors are unit eigenvectors with small true residuals
    X = res.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8)
    assert res.residuals.max().item() < 1e-6 * scale.item()


def test_top_eigenvalues_relative_1e8():
    ev = spectrum("decaying", 400) * 1e3
    res = eigsh(symmetric(ev, seed=3), k=5, which="LA")
    rel = (res.eigenvalues - ev[:5]).abs() / ev[:5]
    assert rel.max().item() < 1e-8


def test_batched_problems_converge_independently():
    mats = torch.stack([symmetric(spectrum(kind, 120), seed=i) for i, kind in
                        enumerate(["clustered", "indefinite", "decaying"])])
    res = eigsh(mats, k=3, which="LA", max_steps=120)
    assert res.eigenvalues.shape == (3, 3) and res.eigenvectors.shape == (3, 120, 3)
    for i in range(3):
        want = torch.linalg.eigvalsh(mats[i]).flip(0)[:3]
        torch.testing.assert_close(res.eigenvalues[i], want, rtol=1e-9, atol=1e-9)
    assert res.converged.all()


def test_float32_operator():
    A = symmetric(spectrum("indefinite", 200)).float()
    res = eigsh(A, k=2, which="both")
    exact = torch.linalg.eigvalsh(A.double())
    torch.testing.assert_close(res.eigenvalues.double(), torch.stack([exact[0], exact[-1]]), rtol=1e-5, atol=1e-4)
    assert res.eigenvalues.dtype == torch.float32


def test_seed_is_reproducible():
    A = symmetric(spectrum("decaying", 150))
    a = eigsh(A, k=3, seed=7, max_steps=20, tol=1e-30)
    b = eigsh(A, k=3, seed=7, max_steps=20, tol=1e-30)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.steps == 20 and not bool(a.converged)


def test_errors():
    A = symmetric(spectrum("decaying", 20))
    with pytest.raises(ValueError, match="eigsh: expected a square operator"):
        eigsh(torch.randn(5, 4, dtype=torch.float64), k=1)
    with pytest.raises(ValueError, match="eigsh: expected a symmetric operator"):
        eigsh(torch.randn(5, 5, dtype=torch.float64), k=1)
    with pytest.raises(ValueError, match="eigsh: expected k in \\[1, 20\\] \\(the operator dimension n = 20\\), got 21"):
        eigsh(A, k=21)
    with pytest.raises(ValueError, match="eigsh: expected which one of \\['LA', 'SA', 'both'\\]"):
        eigsh(A, k=2, which="LM")
    with pytest.raises(ValueError, match="eigsh: expected tol a positive number"):
        eigsh(A, k=2, tol=-1.0)
    with pytest.raises(TypeError, match="eigsh: expected k an int"):
        eigsh(A, k=2.5)
    calls = []

    def nan_after_three(X):
        calls.append(1)
        Y = A @ X
        return Y * float("nan") if len(calls) > 3 else Y

    op = aslinearoperator(nan_after_three, shape=(20, 20), dtype=torch.float64, symmetric=True)
    with pytest.raises(NonFiniteError, match="eigsh: the operator returned non-finite values .* at Lanczos step 3"):
        eigsh(op, k=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_dense_matrix_is_named_not_called_asymmetric(bad):
    """Issue 12: a NaN in a matrix made eigsh say "expected a symmetric operator"."""
    A = symmetric(spectrum("indefinite", 20))
    A[3, 4] = bad
    kind = "1 NaN and 0 inf" if bad != bad else "0 NaN and 1 inf"
    with pytest.raises(NonFiniteError, match=rf"eigsh: the operator produced non-finite values before the first "
                                             rf"step: the matrix A has {kind} values \(of 400\), the first at index \(3, 4\)"):
        eigsh(A, k=2)
    B = torch.stack([symmetric(spectrum("decaying", 20)), A])          # batched: the index names the matrix
    with pytest.raises(NonFiniteError, match=r"the first at index \(1, 3, 4\)"):
        eigsh(B, k=2)


def test_non_finite_product_names_the_step_and_the_count():
    A = symmetric(spectrum("indefinite", 20))

    def nan_row(X):
        Y = A @ X
        Y[5] = float("nan")
        return Y

    op = aslinearoperator(nan_row, shape=(20, 20), dtype=torch.float64, symmetric=True)
    with pytest.raises(NonFiniteError, match=r"eigsh: .* at Lanczos step 0: 1 NaN and 0 inf values \(of 20\), "
                                             r"the first at index \(5, 0\) of its output"):
        eigsh(op, k=2)
