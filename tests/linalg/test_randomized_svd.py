"""randomized_svd against dense SVD; block Krylov vs torch.svd_lowrank at equal matvecs; errors."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.linalg import CallableOperator, randomized_svd


def _matrix(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T


def test_block_krylov_beats_svd_lowrank_at_equal_matvecs():
    n, k = 1500, 10
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5   # slowly decaying
    A = _matrix(n, n, s)
    ours = randomized_svd(A, k=k, oversample=2, power_iters=6, method="block_krylov")
    assert ours.matvecs == 240 + k   # 240 for the algorithm + k for the residual check (A V_k)
    rel = ((ours.S - s[:k]).abs() / s[:k]).max().item()
    assert rel < 0.01
    for q, niter in [(20, 5), (12, 9), (30, 3), (60, 1), (40, 2)]:  # every split of 240 matvecs
        assert q * (2 * niter + 2) == 240
        torch.manual_seed(0)
        _, S, _ = torch.svd_lowrank(A, q=q, niter=niter)
        theirs = ((S[:k] - s[:k]).abs() / s[:k]).max().item()
        assert theirs > 10 * rel


@pytest.mark.parametrize("method", ["subspace", "block_krylov"])
def test_triplets_match_dense_svd_batched(method):
    s = torch.tensor([10.0, 7.0, 5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    A = torch.stack([_matrix(60, 40, s, seed=i) for i in range(3)])
    res = randomized_svd(A, k=4, oversample=5, power_iters=2, method=method)
    assert res.U.shape == (3, 60, 4) and res.S.shape == (3, 4) and res.V.shape == (3, 40, 4)
    torch.testing.assert_close(res.S, s[:4].expand(3, 4), rtol=1e-10, atol=1e-10)
    for i in range(3):
        U, S, Vh = torch.linalg.svd(A[i])
        # singular vectors agree up to sign
        torch.testing.assert_close((res.U[i].T @ U[:, :4]).abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)
        torch.testing.assert_close((res.V[i].T @ Vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("sketch", ["shared", "independent"])
def test_shared_sketch_is_one_stride0_block_and_as_accurate(sketch):
    s = torch.tensor([10.0, 7.0, 5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    A = torch.stack([_matrix(60, 40, s, seed=i) for i in range(3)])
    seen = []

    def mm(X):
        seen.append(X.stride(0))
        return A @ X

    op = CallableOperator(mm, shape=(60, 40), dtype=torch.float64, batch_shape=(3,),
                          rmatmat=lambda U: A.transpose(1, 2) @ U)
    res = randomized_svd(op, k=4, oversample=5, power_iters=2, sketch=sketch)
    assert (seen[0] == 0) == (sketch == "shared")   # the sketch reaches the operator as one block
    torch.testing.assert_close(res.S, s[:4].expand(3, 4), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="randomized_svd: expected sketch one of"):
        randomized_svd(op, k=2, sketch="per-sample")


def test_rank_deficient_operator_through_callables():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    A = _matrix(50, 30, s)
    op = CallableOperator(lambda X: A @ X, shape=(50, 30), dtype=torch.float64, rmatmat=lambda U: A.T @ U)
    res = randomized_svd(op, k=6)   # k above the rank: surplus singular values are ~0
    torch.testing.assert_close(res.S[:3], s, rtol=1e-10, atol=1e-10)
    assert res.S[3:].abs().max().item() < 1e-10
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-8)


def test_errors():
    A = torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="randomized_svd: expected k in \\[1, 5\\] \\(min\\(m, n\\) of the operator shape \\(8, 5\\)\\), got 6"):
        randomized_svd(A, k=6)
    with pytest.raises(ValueError, match="randomized_svd: expected method one of"):
        randomized_svd(A, k=2, method="lanczos")
    with pytest.raises(ValueError, match="randomized_svd: expected oversample >= 0"):
        randomized_svd(A, k=2, oversample=-1)
    op = CallableOperator(lambda X: A @ X, shape=(8, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match="randomized_svd: expected an operator with a transpose"):
        randomized_svd(op, k=2)
