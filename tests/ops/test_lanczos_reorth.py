"""resgeom_fast::lanczos_reorth against its reference, orthogonality, strided bases, errors."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import CUDA_REASON, DEVICES, DTYPES, HAS_CUDA, tol
from resgeom_fast.ops import _reference as ref
from resgeom_fast.ops import lanczos_reorth

OP = torch.ops.resgeom_fast.lanczos_reorth.default


def _basis(b: int, m: int, n: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(b, n, m, generator=g, dtype=torch.float64)).Q.transpose(1, 2)
    w = torch.randn(b, n, generator=g, dtype=torch.float64)
    return V.contiguous().to(device, dtype), w.to(device, dtype)


# 1. correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,j,n", [(0, 3, 10), (2, 0, 50), (1, 1, 7), (3, 5, 100), (2, 30, 20000), (9, 12, 500)])
def test_matches_reference(device, dtype, b, j, n):
    V, w = _basis(b, j, n, dtype, device)
    out, coeffs, norm = lanczos_reorth(w, V)
    r_out, r_coeffs, r_norm = ref.lanczos_reorth(w, V)
    assert out.dtype == dtype and coeffs.dtype == torch.float64 and norm.dtype == torch.float64
    assert out.shape == (b, n) and coeffs.shape == (b, j) and norm.shape == (b,)
    torch.testing.assert_close(out, r_out, **tol(dtype))
    torch.testing.assert_close(coeffs, r_coeffs, **tol(dtype))
    torch.testing.assert_close(norm, r_norm, **tol(dtype))
    if b and j:
        ortho = torch.einsum("bjn,bn->bj", V.double(), out.double()).abs().max().item()
        assert ortho < (1e-5 if dtype == torch.float32 else 1e-13)
        torch.testing.assert_close(
            out.double() + torch.einsum("bjn,bj->bn", V.double(), coeffs), w.double(), **tol(dtype)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_strided_basis_view_and_non_contiguous_w(device):
    """A slice [:, :j] of a [b, m, n] buffer is read in place; w may be non-contiguous."""
    V, _ = _basis(4, 20, 300, torch.float64, device)
    view = V[:, :7]
    assert not view.is_contiguous()
    w = torch.randn(300, 4, dtype=torch.float64, device=device).t()
    assert not w.is_contiguous()
    got = lanczos_reorth(w, view)
    want = ref.lanczos_reorth(w.contiguous(), view.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_cgs2_restores_orthogonality_under_cancellation(device):
    """w almost inside span(V): one Gram-Schmidt pass loses orthogonality, two do not."""
    V, w = _basis(1, 10, 2000, torch.float64, device, seed=3)
    w = V.transpose(1, 2) @ torch.randn(1, 10, 1, dtype=torch.float64, device=device) * 1e6
    w = w[..., 0] + 1e-6 * torch.randn(1, 2000, dtype=torch.float64, device=device)
    out, _, norm = lanczos_reorth(w, V)
    q = out / norm[:, None]
    assert (V @ q[..., None]).abs().max().item() < 1e-12


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    V, w = _basis(2, 4, 33, dtype, device)
    torch.library.opcheck(OP, (w, V))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    V, w = _basis(5, 40, 10000, dtype, "cpu")
    got = lanczos_reorth(w.cuda(), V.cuda()[:, :25])
    want = lanczos_reorth(w, V[:, :25])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("b,j,n,dtype", [
    (3, 33, 300_000, torch.float64),     # 293 chunks: two stages for h, a partial column tile
    (1, 3, 4_300_000, torch.float64),    # 4200 chunks: two stages for h (tx = 4) and for the norm
    (1, 40, 17_000_000, torch.float32),  # 16602 chunks: three stages for h
])
def test_cuda_multistage_reductions(b, j, n, dtype):
    """The block-parallel cross-chunk reductions through several segment stages: the CUDA result
    matches the CPU kernel and is bitwise the same on a second run (fixed reduction order)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    V = torch.randn(b, j, n, device="cuda", dtype=dtype, generator=g) / n**0.5  # nearly orthonormal
    w = torch.randn(b, n, device="cuda", dtype=dtype, generator=g)
    got = lanczos_reorth(w, V)
    again = lanczos_reorth(w, V)
    want = lanczos_reorth(w.cpu(), V.cpu())
    for a, a2, c in zip(got, again, want):
        assert torch.equal(a, a2)
        torch.testing.assert_close(a.cpu(), c, **tol(dtype))
    del V, w, got, again
    torch.cuda.empty_cache()


# 5. one raises per check
def test_errors():
    V, w = _basis(2, 3, 10, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="expected w of shape \\[b, n\\]"):
        lanczos_reorth(w[0], V)
    with pytest.raises(RuntimeError, match="expected basis of shape \\[b, j, n\\]"):
        lanczos_reorth(w, V[0])
    with pytest.raises(RuntimeError, match="expected basis of shape \\[2, j, 10\\]"):
        lanczos_reorth(w, V[:, :, :5])
    with pytest.raises(RuntimeError, match="expected w of dtype float32 or float64"):
        lanczos_reorth(w.int(), V.int())
    with pytest.raises(RuntimeError, match="expected basis of the dtype of w"):
        lanczos_reorth(w, V.float())


# 6. torch.compile smoke test
def test_compile():
    V, w = _basis(2, 4, 40, torch.float64, "cpu")
    fn = torch.compile(lambda a, b: lanczos_reorth(a + 1, b), backend="aot_eager", fullgraph=True)
    got = fn(w, V)
    want = ref.lanczos_reorth(w + 1, V)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
