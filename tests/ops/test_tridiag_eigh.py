"""resgeom_fast::tridiag_eigh against its reference, known spectra, opcheck, errors."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import DEVICES, DTYPES, HAS_CUDA, CUDA_REASON, tol
from resgeom_fast.ops import _reference as ref
from resgeom_fast.ops import tridiag_eigh

OP = torch.ops.resgeom_fast.tridiag_eigh.default


def _random(b: int, m: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(b, m, generator=g, dtype=torch.float64)
    e = torch.rand(b, max(m - 1, 0), generator=g, dtype=torch.float64) + 0.1
    return d.to(device, dtype), e.to(device, dtype)


# 1. correctness against the reference and against known answers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m", [(0, 5), (3, 0), (4, 1), (5, 2), (7, 40), (2, 300)])
def test_matches_reference(device, dtype, b, m):
    d, e = _random(b, m, dtype, device)
    nodes, weights = tridiag_eigh(d, e)
    rn, rw = ref.tridiag_eigh(d, e)
    assert nodes.dtype == dtype and nodes.shape == (b, m) and weights.shape == (b, m)
    torch.testing.assert_close(nodes, rn, **tol(dtype))
    torch.testing.assert_close(weights, rw, **tol(dtype))
    if b and m:
        torch.testing.assert_close(weights.double().sum(1), torch.ones(b, dtype=torch.float64, device=device), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    d, e = _random(6, 30, torch.float64, device)
    dt = d.t().contiguous().t()  # same values, column-major strides
    et = e.t().contiguous().t()
    assert not dt.is_contiguous()
    n1, w1 = tridiag_eigh(dt, et)
    n2, w2 = tridiag_eigh(d, e)
    torch.testing.assert_close(n1, n2, rtol=0, atol=0)
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 2, 10, 100])
def test_second_difference_matrix(device, m):
    """T = tridiag(-1, 2, -1): eigenvalues 2 - 2 cos(k pi / (m+1)), weights 2/(m+1) sin^2(k pi/(m+1))."""
    d = torch.full((1, m), 2.0, dtype=torch.float64, device=device)
    e = torch.full((1, m - 1), -1.0, dtype=torch.float64, device=device)
    nodes, weights = tridiag_eigh(d, e)
    k = torch.arange(1, m + 1, dtype=torch.float64, device=device)
    theta = k * math.pi / (m + 1)
    torch.testing.assert_close(nodes[0], 2 - 2 * torch.cos(theta), rtol=0, atol=1e-13)
    torch.testing.assert_close(weights[0], 2 / (m + 1) * torch.sin(theta) ** 2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_decoupled_blocks_give_zero_weight(device):
    """A zero off-diagonal splits T: nodes of the block not holding e_1 get weight 0."""
    d = torch.tensor([[1.0, 3.0, -2.0, 5.0]], dtype=torch.float64, device=device)
    e = torch.tensor([[0.5, 0.0, 0.7]], dtype=torch.float64, device=device)
    nodes, weights = tridiag_eigh(d, e)
    rn, rw = ref.tridiag_eigh(d, e)
    torch.testing.assert_close(nodes, rn, rtol=0, atol=1e-14)
    torch.testing.assert_close(weights, rw, rtol=0, atol=1e-14)
    top = torch.linalg.eigvalsh(torch.tensor([[1.0, 0.5], [0.5, 3.0]], dtype=torch.float64))
    for lam in top:  # the two eigenvalues of the leading block carry all the weight
        idx = torch.argmin((nodes[0] - lam).abs())
        assert weights[0, idx] > 0.01
    assert weights[0].sum().item() == pytest.approx(1.0, abs=1e-14)


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    d, e = _random(3, 12, dtype, device)
    torch.library.opcheck(OP, (d, e))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    d, e = _random(64, 80, dtype, "cpu")
    nc, wc = tridiag_eigh(d, e)
    ng, wg = tridiag_eigh(d.cuda(), e.cuda())
    torch.testing.assert_close(ng.cpu(), nc, **tol(dtype))
    torch.testing.assert_close(wg.cpu(), wc, **tol(dtype))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("b,m", [(32, 100),     # the host path (b <= 32): the CPU kernel's bits
                                 (33, 100),     # one warp per problem, shared-memory scratch
                                 (1000, 37),    # many blocks, m not a multiple of 32
                                 (40, 1),       # a single element (no sweep)
                                 (33, 2049)])   # 3 m doubles > 48 KB: global scratch
def test_cuda_paths(b, m):
    """Both CUDA paths (host for small batches, warp per problem otherwise) against the CPU
    kernel and the float64 reference; split problems (offdiag exactly 0: five 1 x 1 blocks, two
    halves) exercise the deflation scan."""
    d, e = _random(b, m, torch.float64, "cpu", seed=4)
    if m > 8:
        e[0, :5] = 0.0                  # five decoupled 1 x 1 blocks, then the rest
        e[1, m // 2] = 0.0              # two decoupled halves
    ng, wg = tridiag_eigh(d.cuda(), e.cuda())
    nc, wc = tridiag_eigh(d, e)
    if b <= 32:
        assert torch.equal(ng.cpu(), nc) and torch.equal(wg.cpu(), wc)
    torch.testing.assert_close(ng.cpu(), nc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wg.cpu(), wc, rtol=1e-10, atol=1e-12)
    if m <= 100:  # dense eigh of 33 matrices of 2049^2 would take a minute on the host
        rn, rw = ref.tridiag_eigh(d, e)
        torch.testing.assert_close(ng.cpu(), rn, **tol(torch.float64))
        torch.testing.assert_close(wg.cpu(), rw, **tol(torch.float64))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("b", [5, 40])
def test_cuda_non_finite_names_the_problem(b):
    """Both CUDA paths raise the CPU kernel's error, naming the first bad problem."""
    d, e = _random(b, 12, torch.float64, "cpu")
    e[b - 2, 3] = float("inf")
    with pytest.raises(RuntimeError, match=f"expected finite diag and offdiag.*problem {b - 2}"):
        tridiag_eigh(d.cuda(), e.cuda())


# 5. one raises per check
def test_errors():
    d, e = _random(2, 5, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="expected diag of shape \\[b, m\\]"):
        tridiag_eigh(d[0], e)
    with pytest.raises(RuntimeError, match="expected offdiag of shape \\[b, m - 1\\]"):
        tridiag_eigh(d, e[0])
    with pytest.raises(RuntimeError, match="expected offdiag of shape \\[2, 4\\]"):
        tridiag_eigh(d, e[:, :3])
    with pytest.raises(RuntimeError, match="expected diag of dtype float32 or float64"):
        tridiag_eigh(d.int(), e.int())
    with pytest.raises(RuntimeError, match="expected offdiag of the same dtype as diag"):
        tridiag_eigh(d, e.float())
    bad = d.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="expected finite diag and offdiag.*problem 1"):
        tridiag_eigh(bad, e)


# 6. torch.compile smoke test
def test_compile():
    d, e = _random(3, 10, torch.float64, "cpu")
    fn = torch.compile(lambda a, b: tridiag_eigh(a * 2, b * 2), backend="aot_eager", fullgraph=True)
    nodes, weights = fn(d, e)
    rn, rw = ref.tridiag_eigh(2 * d, 2 * e)
    torch.testing.assert_close(nodes, rn)
    torch.testing.assert_close(weights, rw)
