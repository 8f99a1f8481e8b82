"""resgeom_fast::orthonormalize against Householder QR, ill-conditioned and deficient blocks."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import CUDA_REASON, DEVICES, DTYPES, HAS_CUDA, tol
from resgeom_fast.ops import _reference as ref
from resgeom_fast.ops import orthonormalize

OP = torch.ops.resgeom_fast.orthonormalize.default


def _orth_error(q: torch.Tensor) -> float:
    k = q.shape[-1]
    qd = q.double()
    eye = torch.eye(k, dtype=torch.float64, device=q.device)
    return (qd.transpose(1, 2) @ qd - eye).abs().max().item()


def _conditioned(b, n, k, cond, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64)).Q
    W = torch.linalg.qr(torch.randn(b, k, k, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((U * s) @ W.transpose(1, 2)).to(device)


# 1. correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,k", [(0, 5, 2), (2, 5, 0), (1, 1, 1), (3, 50, 7), (2, 5000, 25), (8, 300, 12)])
def test_matches_reference(device, dtype, b, n, k):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, k, generator=g, dtype=torch.float64).to(device, dtype)
    q = orthonormalize(x)
    assert q.shape == x.shape and q.dtype == dtype
    torch.testing.assert_close(q, ref.orthonormalize(x), **tol(dtype))
    if b and k:
        assert _orth_error(q) < (1e-5 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cond", [1e4, 1e8, 1e12])
def test_ill_conditioned(device, cond):
    x = _conditioned(2, 2000, 20, cond, device)
    q = orthonormalize(x)
    assert _orth_error(q) < 1e-13
    resid = (x - q @ (q.transpose(1, 2) @ x)).norm() / x.norm()
    assert resid.item() < 1e-13


@pytest.mark.parametrize("device", DEVICES)
def test_rank_deficient_and_zero_columns(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 400, 10, generator=g, dtype=torch.float64)
    x[:, :, 3] = x[:, :, 1] - 2 * x[:, :, 2]   # exact linear dependence
    x[:, :, 5] = 0.0                           # a zero column
    x[1] = 0.0                                 # a zero block
    x = x.to(device)
    q = orthonormalize(x)
    assert _orth_error(q) < 1e-12
    resid = (x[0] - q[0] @ (q[0].T @ x[0])).norm() / x[0].norm()
    assert resid.item() < 1e-13


def _scaled_residuals(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per column ||x_c - q q^T x_c|| / ||x_c|| in float64, each column divided by its max-abs
    first (the residual is scale invariant; unscaled, 1e200^2 would overflow the check itself)."""
    xd = x.double()
    xd = xd / xd.abs().amax(dim=1, keepdim=True)
    qd = q.double()
    return (xd - qd @ (qd.transpose(1, 2) @ xd)).norm(dim=1) / xd.norm(dim=1)


def _dense_qr_of_equilibrated(x: torch.Tensor) -> torch.Tensor:
    """Ground truth: Householder QR (positive diagonal of R) of x with each column divided by its
    max-abs in float64 -- a positive column scaling leaves this Q unchanged, and the divided
    block has entries of order 1 (no reference scaling logic involved)."""
    xd = x.double()
    q, r = torch.linalg.qr(xd / xd.abs().amax(dim=1, keepdim=True))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


# Issue 17: float64 entries above ~1e154 overflowed the Gram matrix (below ~1e-154 it underflowed)
# and every column was silently refilled: at 1e200 the residual ||x - q q^T x|| / ||x|| was 0.977.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e200), (torch.float64, 1e-200),
                                         (torch.float64, 1e300), (torch.float64, 1e-300),
                                         (torch.float64, 1e-310),           # subnormal entries
                                         (torch.float32, 1e30), (torch.float32, 1e-30),
                                         (torch.float32, 1e37), (torch.float32, 1e-37)])
def test_extreme_magnitudes_span_x(device, dtype, scale):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 300, 12, generator=g, dtype=torch.float64)
    x = (base * scale).to(device, dtype)
    assert bool(torch.isfinite(x).all()) and bool((x != 0).any(1).all())
    q = orthonormalize(x)
    assert torch.isfinite(q).all()
    assert _orth_error(q) < (1e-5 if dtype == torch.float32 else 1e-13)
    resid = _scaled_residuals(x, q).max().item()
    assert resid < (1e-5 if dtype == torch.float32 else 1e-10), resid
    truth = _dense_qr_of_equilibrated(x)
    torch.testing.assert_close(q.double(), truth, **(tol(dtype) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)))
    torch.testing.assert_close(ref.orthonormalize(x).double(), truth, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_columns_of_wildly_different_magnitudes(device):
    """One block mixing columns at 1e200, 1, 1e-200 (and a zero column): every nonzero column of
    x lies in span(q) to 1e-10 relative to its own norm; only the zero column is refilled."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 200, 8, generator=g, dtype=torch.float64)
    x[:, :, 0] *= 1e200
    x[:, :, 2] *= 1e-200
    x[:, :, 3] *= 1e150
    x[:, :, 5] *= 1e-250
    x[:, :, 6] = 0.0
    x = x.to(device)
    q = orthonormalize(x)
    assert _orth_error(q) < 1e-13
    nonzero = [c for c in range(8) if c != 6]
    resid = _scaled_residuals(x[:, :, nonzero], q)
    assert resid.max().item() < 1e-10, resid
    truth = _dense_qr_of_equilibrated(x[:, :, :6])          # the leading columns, before the zero one
    torch.testing.assert_close(q[:, :, :6], truth, rtol=1e-9, atol=1e-11)


def test_scaling_keeps_tiny_relative_columns():
    """Columns 1e-20 times the largest are part of the column space, not zero: they are kept (the
    zero-column rule sees the power-of-two scaled norms), and x stays inside span(q)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 100, 4, generator=g, dtype=torch.float64)
    x[:, :, 1] *= 1e-20
    q = orthonormalize(x)
    assert _scaled_residuals(x, q).max().item() < 1e-12
    torch.testing.assert_close(q, _dense_qr_of_equilibrated(x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    x = torch.randn(3, 8, 60, dtype=torch.float64, device=device).transpose(1, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(orthonormalize(x), ref.orthonormalize(x.contiguous()))


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    torch.library.opcheck(OP, (torch.randn(2, 20, 4, dtype=dtype, device=device),))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    x = torch.randn(6, 3000, 16, dtype=dtype)
    torch.testing.assert_close(orthonormalize(x.cuda()).cpu(), orthonormalize(x), **tol(dtype))
    x[:, :, 4] = 0
    torch.testing.assert_close(orthonormalize(x.cuda()).cpu(), orthonormalize(x), **tol(dtype))
    big = 1e300 if dtype == torch.float64 else 1e37                  # the power-of-two column scaling
    x[:, :, 1] *= big                                                # is the same on both devices
    x[:, :, 2] /= big
    torch.testing.assert_close(orthonormalize(x.cuda()).cpu(), orthonormalize(x), **tol(dtype))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("b,n,k", [(2, 1000, 33),    # 160-row tiles, a partial last tile
                                   (3, 257, 1),      # k = 1: 256-row tiles
                                   (1, 700, 64),     # even k: row stride 65 in shared memory
                                   (2, 400, 191),    # the largest k with 32-row tiles
                                   (1, 300, 200)])   # k > 191: the row-per-thread kernel
def test_cuda_solve_tiles(b, n, k):
    """The tiled triangular solve (rows staged in shared memory) on every tile shape against the
    CPU kernel and dense QR (at condition 1e6 these differ by ~5e-11 on the CPU, rounding
    amplified by the conditioning); ill-conditioned columns make the shifted passes matter."""
    x = _conditioned(b, n, k, 1e6, "cpu", seed=2)
    q = orthonormalize(x.cuda())
    torch.testing.assert_close(q.cpu(), orthonormalize(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(q.cpu(), ref.orthonormalize(x), rtol=0, atol=1e-9)
    assert _orth_error(q) < 1e-13


# 5. one raises per check
def test_errors():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected x of shape \\[b, n, k\\]"):
        orthonormalize(x[0])
    with pytest.raises(RuntimeError, match="at most as many columns as rows"):
        orthonormalize(x.transpose(1, 2))
    with pytest.raises(RuntimeError, match="expected x of dtype float32 or float64"):
        orthonormalize(x.int())
    x[1, 2, 0] = float("inf")
    with pytest.raises(RuntimeError, match="expected x with finite entries"):
        orthonormalize(x)


# 6. torch.compile smoke test
def test_compile():
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    fn = torch.compile(lambda a: orthonormalize(a * 3), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), ref.orthonormalize(3 * x))
