"""The CPU kernel of resgeom_fast::orthonormalize on BLAS-3 (csrc/ops/cpu/orthonormalize_kernel.cpp):
chunked gemm Grams, potrf, in-place trsm, the fused float64 conversion, and the skipped third pass
of float32 outputs, against dense float64 Householder QR.

Shapes are chosen around the kernel's chunking (rows per chunk m(k) = max(ceil(2^16 / k), 2 k)
rounded up to 8: 3280 at k = 20, 9368 at k = 7, 65536 at k = 1, 400 at k = 200) and its two
schedules (one block at a time with its chunks in parallel, for b = 1 or blocks over 2^20
entries; blocks in parallel otherwise).
"""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.ops import orthonormalize

F64 = torch.float64


def chunk_rows(k: int) -> int:
    m = max(-(-(1 << 16) // k), 2 * k)
    return -(-m // 8) * 8


def conditioned(b: int, n: int, k: int, cond: float, seed: int = 0) -> torch.Tensor:
    """[b, n, k] float64 with singular values logspace(0, -log10(cond)) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=F64)).Q
    W = torch.linalg.qr(torch.randn(b, k, k, generator=g, dtype=F64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=F64)
    return (U * s) @ W.transpose(1, 2)


def dense_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: float64 Householder QR with the signs fixed so that R has a positive diagonal."""
    q, r = torch.linalg.qr(x.double())
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign[:, None, :], r * sign[:, :, None]


def orth_error(q: torch.Tensor) -> float:
    """max |q^T q - I| over the batch, in float64."""
    qd = q.double()
    return (qd.transpose(1, 2) @ qd - torch.eye(q.shape[-1], dtype=F64)).abs().max().item()


def span_residual(x: torch.Tensor, q: torch.Tensor) -> float:
    """max over blocks of ||x - q q^T x||_F / ||x||_F in float64."""
    xd, qd = x.double(), q.double()
    r = (xd - qd @ (qd.transpose(1, 2) @ xd)).flatten(1).norm(dim=1) / xd.flatten(1).norm(dim=1)
    return r.max().item()


SHAPES = [
    pytest.param(1, 3 * 3280 + 17, 20, id="one-block-4-chunks"),
    pytest.param(3, 2 * 9368 + 1, 7, id="blocks-3-chunks"),
    pytest.param(4, 700, 20, id="blocks-1-chunk"),
    pytest.param(2, 70_000, 1, id="k1-2-chunks"),
    pytest.param(2, 1000, 200, id="k200-3-chunks"),
    pytest.param(3, 40, 40, id="n-equals-k"),
    pytest.param(1, 1, 1, id="1x1"),
]


@pytest.mark.parametrize("b,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_q_and_r_match_dense_qr(b, n, k, dtype):
    """Q equals dense QR's Q (positive diagonal of R), R = Q^T x equals its R and is upper
    triangular, Q^T Q = I, in x's dtype."""
    assert chunk_rows(20) == 3280 and chunk_rows(7) == 9368 and chunk_rows(200) == 400
    x = conditioned(b, n, k, 1e3, seed=n + k).to(dtype)
    q = orthonormalize(x)
    assert q.shape == x.shape and q.dtype == dtype and q.is_contiguous()
    Q, R = dense_qr(x)
    r = q.double().transpose(1, 2) @ x.double()
    if dtype == F64:
        torch.testing.assert_close(q, Q, rtol=0, atol=1e-11)
        torch.testing.assert_close(r.triu(), R, rtol=0, atol=1e-12 * R.abs().max().item())
        assert r.tril(-1).abs().max().item() <= 1e-13 * R.abs().max().item()
        assert orth_error(q) < 1e-13
    else:
        # x is exactly representable in float32: the truth is the float64 QR of that block.
        torch.testing.assert_close(q.double(), Q, rtol=0, atol=2e-6)
        torch.testing.assert_close(r.triu(), R, rtol=0, atol=1e-5 * R.abs().max().item())
        assert orth_error(q) < 1e-5


@pytest.mark.parametrize("cond", [1e6, 1e10])
@pytest.mark.parametrize("b,n,k", [(1, 2 * 3280 + 5, 20), (4, 1500, 20), (2, 1000, 200)])
def test_ill_conditioned_float64(b, n, k, cond):
    """At condition 1e6 and 1e10 (the three passes in float64): orthonormal to 1e-13, x inside
    span(q) to 1e-13, q^T x upper triangular to 1e-13 ||x||; at 1e6 also Q itself against dense
    QR (the two backward-stable Q differ by ~cond * 1e-16 in the weakest directions)."""
    x = conditioned(b, n, k, cond, seed=k)
    q = orthonormalize(x)
    assert orth_error(q) < 1e-13
    assert span_residual(x, q) < 1e-13
    r = q.transpose(1, 2) @ x
    assert r.tril(-1).abs().max().item() < 1e-13 * x.abs().max().item() * n ** 0.5
    if cond <= 1e6:
        torch.testing.assert_close(q, dense_qr(x)[0], rtol=0, atol=1e-9)


def near_dependent_float32(b: int, n: int, k: int) -> torch.Tensor:
    """[b, n, k] float32 of condition ~1e15 exactly representable in float32: column 3 is column
    2 except one entry, 2^-20 in one and 2^-20 + 2^-43 (one float32 ulp) in the other. After two
    passes its float64 X is orthonormal only to ~3e-5 (Gram deviation), so the third pass runs."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, n, k, generator=g)
    x[:, :, 3] = x[:, :, 2]
    x[:, 7, 2] = 2.0 ** -20
    x[:, 7, 3] = 2.0 ** -20 + 2.0 ** -43
    return x


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6, 1e10, "near-dependent"])
@pytest.mark.parametrize("b,n,k", [(1, 2 * 3280 + 5, 20), (4, 1500, 20), (2, 2 * 9368 + 3, 7)])
def test_float32_output_equals_float64_path_rounded(b, n, k, cond):
    """A float32 output (the third pass skipped when the Gram matrix after two passes is I to
    2^-40 in Frobenius norm) equals the float64 output of the same block (always three passes)
    rounded to float32, up to a last-bit rounding difference (2^-23 of the entry scale), and is
    orthonormal to float32 resolution at every condition; the near-dependent block (condition
    ~1e15, exact in float32) is one where skipping the third pass would leave q^T q - I ~3e-5."""
    if cond == "near-dependent":
        x = near_dependent_float32(b, n, k)
    else:
        x = conditioned(b, n, k, cond, seed=3).float()
    q = orthonormalize(x)
    q64 = orthonormalize(x.double())
    scale = q64.abs().amax().item()
    torch.testing.assert_close(q.double(), q64.float().double(), rtol=0, atol=2.0 ** -23 * scale)
    assert orth_error(q) < 1e-6
    assert orth_error(q64) < 1e-13
    assert span_residual(x, q) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("b,n,k", [(1, 3 * 3280 + 1, 20), (5, 600, 12)])
def test_zero_columns_and_rank_deficiency(b, n, k, dtype):
    """Exactly zero columns (one in a block, a whole zero block) and an exact linear dependence
    are completed to an orthonormal basis; the nonzero columns stay inside span(q); the leading
    independent columns keep dense QR's Q."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, n, k, generator=g, dtype=F64)
    x[:, :, 5] = 0.0
    x[:, :, 8] = x[:, :, 1] - 2.0 * x[:, :, 2]
    if b > 1:
        x[1] = 0.0
    x = x.to(dtype)
    q = orthonormalize(x)
    assert torch.isfinite(q).all()
    assert orth_error(q) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert span_residual(x[:1], q[:1]) < (1e-6 if dtype == torch.float32 else 1e-13)
    lead = dense_qr(x[:1, :, :5])[0]
    torch.testing.assert_close(q[:1, :, :5].double(), lead, rtol=0,
                               atol=2e-6 if dtype == torch.float32 else 1e-12)


def test_identical_run_to_run():
    """A fixed thread count gives bitwise the same result on every call (both schedules)."""
    g = torch.Generator().manual_seed(8)
    for shape, dtype in [((1, 20_000, 20), torch.float32), ((6, 900, 9), F64), ((2, 5000, 33), F64)]:
        x = torch.randn(*shape, generator=g, dtype=dtype)
        first = orthonormalize(x)
        for _ in range(2):
            assert torch.equal(orthonormalize(x), first), shape


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_in_a_later_chunk_of_a_later_block(dtype, value):
    x = torch.randn(3, 3 * 3280, 20, dtype=dtype)
    x[2, 2 * 3280 + 11, 19] = value
    with pytest.raises(RuntimeError, match="orthonormalize: expected x with finite entries, got NaN or infinity"):
        orthonormalize(x)


def test_extreme_float32_magnitudes_chunked():
    """Float32 columns near the overflow and underflow limits (the power-of-two column scaling in
    the fused conversion) over several chunks: q spans x and matches dense QR of the equilibrated
    block."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2 * 3280 + 9, 20, generator=g, dtype=F64)
    x[:, :, 0] *= 1e37
    x[:, :, 1] *= 1e-37
    x[:, :, 2] *= 1e-44 / x[:, :, 2].abs().max()            # subnormal float32 entries
    x = x.float()
    assert bool((x != 0).any(1).all())
    q = orthonormalize(x)
    xd = x.double()
    eq = xd / xd.abs().amax(dim=1, keepdim=True)
    assert orth_error(q) < 1e-5
    assert span_residual(eq, q) < 1e-6
    torch.testing.assert_close(q.double(), dense_qr(eq)[0], rtol=0, atol=2e-6)
