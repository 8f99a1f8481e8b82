"""randomized_svd's cheap CPU steps: the one-pass Cholesky normalisation of the power iterations'
intermediate blocks (_normalise), the Gram-matrix thin SVD of float32 Rayleigh-Ritz blocks
(_thin_svd) and the Rayleigh-Ritz step on the last block without orthonormalising it
(_rayleigh_ritz_implicit), against exact float64 references, with their fall-backs to the
compiled op and LAPACK; and the whole randomized_svd against the dense SVD on each path."""
from __future__ import annotations

import warnings

import pytest
import torch

from resgeom_fast.linalg import randomized_svd
from resgeom_fast.linalg import svd as svd_mod


def _block(b, r, c, cond, dtype, seed=0):
    """[b, r, c] blocks with singular values log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, r, c, generator=g, dtype=torch.float64)).Q
    W = torch.linalg.qr(torch.randn(b, c, c, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), c, dtype=torch.float64)
    return ((U * s) @ W).to(dtype)


def _proj(Q):
    """Orthogonal projector onto span(Q) [b, r, r] (float64, via an exact QR of Q)."""
    Qo = torch.linalg.qr(Q.double()).Q
    return Qo @ Qo.transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalise_keeps_the_span_and_conditions_the_basis(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(svd_mod, "_orth", lambda Y: calls.append(1) or svd_mod.ops.orthonormalize(Y))
    Y = _block(3, 2000, 12, 20.0, dtype)
    Q = svd_mod._normalise(Y)
    assert calls == []                                   # the cheap path ran (cond 20 < limit)
    assert Q.dtype == dtype and Q.shape == Y.shape
    G = Q.double().transpose(-1, -2) @ Q.double()
    cond = torch.linalg.cond(G).sqrt()
    assert float(cond.max()) < 3 ** 0.5                  # the promise of the docstring
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((_proj(Q) - _proj(Y)).abs().max()) < tol   # the same subspace


def test_normalise_falls_back_to_the_compiled_op(monkeypatch):
    calls = []
    real = svd_mod._orth
    monkeypatch.setattr(svd_mod, "_orth", lambda Y: calls.append(1) or real(Y))
    ill = _block(2, 5000, 8, 1e5, torch.float32)          # cond 1e5 > the float32 limit (~94)
    assert svd_mod._cheap_cond_limit(5000, torch.float32) < 1e5
    Q = svd_mod._normalise(ill)
    assert calls == [1]
    eye = torch.eye(8, dtype=torch.float64)
    assert float((Q.double().transpose(-1, -2) @ Q.double() - eye).abs().max()) < 1e-5
    zero = _block(2, 300, 5, 10.0, torch.float32)
    zero[1, :, 2] = 0                                     # rank deficient: Cholesky fails
    Q = svd_mod._normalise(zero)
    assert calls == [1, 1]
    assert float((Q.double().transpose(-1, -2) @ Q.double() - torch.eye(5, dtype=torch.float64)).abs().max()) < 1e-5


@pytest.mark.parametrize("cond", [10.0, 1e3, 9e3])
def test_thin_svd_of_float32_data_matches_lapack(cond, monkeypatch):
    """Float32 sources take the Gram-matrix path (no LAPACK SVD of the tall block); its float64
    errors ~eps64 cond^2 stay below float32 rounding."""
    B = _block(3, 4000, 15, cond, torch.float32, seed=1).double()
    real = torch.linalg.svd
    P0, S0, Zh0 = real(B, full_matrices=False)
    calls = []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    P, S, Zh = svd_mod._thin_svd(B, torch.float32)
    assert calls == []
    eps32 = float(torch.finfo(torch.float32).eps)
    assert float(((S - S0).abs() / S0[..., :1]).max()) < eps32
    eye = torch.eye(15, dtype=torch.float64)
    assert float((P.transpose(-1, -2) @ P - eye).abs().max()) < eps32
    assert float((Zh @ Zh.transpose(-1, -2) - eye).abs().max()) < 1e-13
    assert float(((P * S.unsqueeze(-2)) @ Zh - B).abs().max()) < eps32 * float(S0.max())
    signs = torch.sign((P * P0).sum(-2))                  # distinct singular values: vectors up to sign
    torch.testing.assert_close(P * signs.unsqueeze(-2), P0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["float64 source", "cond 1e5", "rank deficient"])
def test_thin_svd_falls_back_to_lapack(case, monkeypatch):
    B = _block(2, 500, 6, 1e5 if case == "cond 1e5" else 10.0, torch.float64)
    if case == "rank deficient":
        B[0, :, 4] = B[0, :, 1]                            # rank 5 of 6
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    P, S, Zh = svd_mod._thin_svd(B, torch.float64 if case == "float64 source" else torch.float32)
    assert calls and calls[0] == B.shape                  # LAPACK on the whole tall block
    torch.testing.assert_close(S, real(B, full_matrices=False).S, rtol=1e-12, atol=1e-14)


def test_gram64_is_the_float64_gram_matrix_of_float32_entries():
    Y = torch.randn(3, 70001, 7, generator=torch.Generator().manual_seed(2))
    G = svd_mod._gram64(Y)
    Yd = Y.double()
    torch.testing.assert_close(G, Yd.transpose(-1, -2) @ Yd, rtol=1e-13, atol=1e-9)


def _op_matrix(m, n, s, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).to(dtype), U, V


@pytest.mark.parametrize("spread", [3.0, 1e3])
def test_implicit_rayleigh_ritz_equals_the_orthonormalised_one(spread, monkeypatch):
    """float32, q = 2: the last block goes to Rayleigh-Ritz without the compiled orthonormalisation
    when cond(Y) <= IMPLICIT_COND (spread 3), and through it otherwise (spread 1e3 makes the last
    block's condition ~1e3); both give the dense triplets, and the same ones as forcing the
    orthonormalised step."""
    s = torch.cat([torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), 10, dtype=torch.float64) * 50,
                   torch.full((60,), 1e-3, dtype=torch.float64)])
    A, U0, V0 = _op_matrix(800, 600, s, 5, torch.float32)
    orth_calls = []
    real = svd_mod._orth
    monkeypatch.setattr(svd_mod, "_orth", lambda Y: orth_calls.append(Y.shape) or real(Y))
    res = randomized_svd(A, k=5, oversample=5, power_iters=2, seed=1)
    implicit = spread == 3.0
    assert (len(orth_calls) == 0) == implicit, orth_calls
    monkeypatch.setattr(svd_mod, "_rayleigh_ritz_implicit", lambda *a, **k: None)
    forced = randomized_svd(A, k=5, oversample=5, power_iters=2, seed=1)
    torch.testing.assert_close(res.S, forced.S, rtol=2e-6, atol=0)
    torch.testing.assert_close(res.S.double(), s[:5], rtol=1e-5, atol=0)
    assert bool(res.converged.all()) and float(res.max_rel_error_bound) < 1e-3
    eye = torch.eye(5, dtype=torch.float64)
    assert float((res.U.double().T @ res.U.double() - eye).abs().max()) < 1e-5
    assert float((1 - (res.U.double().T @ U0[:, :5]).abs().diagonal()).max()) < 1e-5
    assert float((1 - (res.V.double().T @ V0[:, :5]).abs().diagonal()).max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [3.0, 1e4])
def test_randomized_svd_with_cheap_or_compiled_intermediates_matches_dense(dtype, spread, monkeypatch):
    """spread 3: the intermediate blocks take the one-pass normalisation; 1e4 (float32): some take
    the compiled op. Either way the triplets equal the dense SVD's (a gap after k: q = 2 suffices)."""
    g = torch.Generator().manual_seed(4)
    m, n, k = 900, 700, 6
    s = torch.cat([torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), 12, dtype=torch.float64) * 100,
                   torch.full((88,), 1e-3, dtype=torch.float64)])
    U = torch.linalg.qr(torch.randn(m, 100, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 100, generator=g, dtype=torch.float64)).Q
    A = ((U * s) @ V.T).to(dtype)
    cheap = []
    real = svd_mod._normalise
    monkeypatch.setattr(svd_mod, "_normalise", lambda Y: cheap.append(1) or real(Y))
    res = randomized_svd(A, k=k, oversample=6, power_iters=2, seed=0)
    assert len(cheap) == 4                                 # sketch, A^T Q, A Z, A^T Q; not the last A Z
    rtol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(res.S.double(), s[:k], rtol=rtol, atol=0)
    assert bool(res.converged.all())
    assert float(res.max_rel_error_bound) < (1e-3 if dtype == torch.float32 else 1e-8)
    dense_v = V[:, :k]
    overlap = (res.V.double().T @ dense_v).abs().diagonal()
    assert float((1 - overlap).max()) < (1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
@pytest.mark.parametrize("mode", ["q0", "q2", "auto", "block_krylov"])
def test_float32_operators_at_extreme_scales_keep_honest_bounds(scale, mode):
    """s_1 ~ 1e-30 .. 1e30 in float32: the residual norms must not underflow to 0 (a false
    converged=True) or overflow, and A^T Y / A A^T Q of size s_1^2 must not leave float32's range
    (a NonFiniteError blamed on the operator). Every reported bound must contain the true error."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 600, 400, 10
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    sv = 0.8 ** torch.arange(n, dtype=torch.float64)
    A = ((U * sv) @ V.T * scale).float()
    true = torch.linalg.svdvals(A.double())[:k]
    kw = {"q0": dict(power_iters=0), "q2": dict(power_iters=2), "auto": dict(power_iters="auto"),
          "block_krylov": dict(power_iters=2, method="block_krylov")}[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # "auto" may stop above tol: flagged
        res = randomized_svd(A, k=k, oversample=5, seed=0, **kw)
    err = (res.S.double() - true).abs()
    assert bool((err <= res.error_bound).all()), (err / res.error_bound).max()
    if bool(res.converged.all()):
        assert float((err / true).max()) <= res.tol + 1e-6
    if mode in ("q2", "auto"):                                 # these reach ~5e-7 at every scale
        assert bool(res.converged.all()) and float((err / true).max()) < 1e-5
