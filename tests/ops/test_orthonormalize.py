"""resgeom_fast::orthonormalize against Householder QR, ill-conditioned and deficient blocks."""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA_REASON, DEVICES, DTYPES, HAS_CUDA, tol
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


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    x = torch.randn(3, 8, 60, dtype=torch.float64, device=device).transpose(1, 2)
    assert not x.is_contiguous()
    torch.testing.assert_close(orthonormalize(x), ref.orthonormalize(x.contiguous()))


# 2. opcheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    torch.library.opcheck(OP, (torch.randn(2, 20, 4, dtype=dtype),))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    x = torch.randn(6, 3000, 16, dtype=dtype)
    torch.testing.assert_close(orthonormalize(x.cuda()).cpu(), orthonormalize(x), **tol(dtype))
    x[:, :, 4] = 0
    torch.testing.assert_close(orthonormalize(x.cuda()).cpu(), orthonormalize(x), **tol(dtype))


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
