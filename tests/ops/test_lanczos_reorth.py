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
# (1, 15, 1.5M): the CPU kernel's chunked CGS on every machine (past its MGS bound), its eight-row,
# four-row and single-row loops (15 = 8 + 4 + 3)
@pytest.mark.parametrize("b,j,n", [(0, 3, 10), (2, 0, 50), (1, 1, 7), (3, 5, 100), (2, 30, 20000), (9, 12, 500),
                                   (1, 15, 1_500_000)])
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


# The CPU kernel's two full-pass paths (csrc/ops/cpu/lanczos_reorth_kernel.cpp, kMgsBytes = 16 MiB on
# n * (8 + itemsize)): row-by-row MGS below, chunked two-sweep CGS above. Local-first from j = 3.
N_MGS, N_CGS = 5_000, 1_500_000


def _lanczos_inputs(n: int, m: int, dtype, device, seed: int = 0):
    """w = A v_{m-1} and the basis v_0..v_{m-1} of a float64 Lanczos run (reorthogonalised by the
    reference) on A = H diag(d) H, H = I - 2 u u^T a Householder reflection, spectrum d = [-1, 10]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.linspace(-1.0, 10.0, n, dtype=torch.float64)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    u /= u.norm()

    def A(x):
        y = d * (x - 2 * u * (u @ x))
        return y - 2 * u * (u @ y)

    V = torch.empty(m, n, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    V[0] = v / v.norm()
    for k in range(m - 1):
        r, _, beta = ref.lanczos_reorth(A(V[k])[None], V[None, : k + 1])
        V[k + 1] = r[0] / beta[0]
    basis = V.to(dtype)
    w = A(basis[-1].double()).to(dtype)  # the product of the stored (working-dtype) vector
    return w[None].to(device), basis[None].to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [N_MGS, N_CGS], ids=["mgs", "cgs"])
@pytest.mark.parametrize("m", [2, 9])
def test_lanczos_shaped_inputs(device, dtype, n, m):
    """A Lanczos step (w = A v_j, basis of a Lanczos run): orthogonal to working precision,
    w = w_orth + V^T coeffs, the reference's result, bitwise the same on a second run and on one
    thread (fixed reduction order)."""
    w, V = _lanczos_inputs(n, m, dtype, device)
    out, coeffs, norm = got = lanczos_reorth(w, V)
    want = ref.lanczos_reorth(w, V)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(dtype))
    q = out.double() / norm[:, None]
    ortho = (V.double() @ q[..., None]).abs().max().item()
    assert ortho < (1e-5 if dtype == torch.float32 else 1e-13)
    torch.testing.assert_close(
        out.double() + torch.einsum("bjn,bj->bn", V.double(), coeffs), w.double(), **tol(dtype)
    )
    assert abs(coeffs[0, -1].item() - (V[0, -1].double() @ w[0].double()).item()) < 1e-4  # alpha
    again = lanczos_reorth(w, V)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lanczos_reorth(w, V)
    finally:
        torch.set_num_threads(threads)
    for a, a2, a1 in zip(got, again, single):
        assert torch.equal(a, a2) and torch.equal(a, a1)


def _one_or_two_passes(w, V, passes: int, mgs: bool):
    """The CPU kernel's arithmetic in float64 on one problem (w [n], V [j, n]): MGS on the last two
    rows (j >= 3), then ``passes`` full passes, row-by-row MGS or one CGS step. -> (x, coeffs)."""
    x, V = w.double().clone(), V.double()
    j = V.shape[0]
    c = torch.zeros(j, dtype=torch.float64)

    def sub(i):
        a = V[i] @ x
        x.sub_(a * V[i])
        c[i] += a

    if j >= 3:
        sub(j - 1)
        sub(j - 2)
    for _ in range(passes):
        if mgs:
            for i in range(j):
                sub(i)
        else:
            h = V @ x
            x.sub_(V.T @ h)
            c.add_(h)
    return x, c


@pytest.mark.parametrize("n", [N_MGS, 1_100_000], ids=["mgs", "cgs"])
def test_second_pass_skipped_when_the_first_keeps_the_norm(n):
    """w along the last two rows plus a part nearly orthogonal to V: after the local rows one full
    pass keeps ||x||, so no second pass runs. Seen through rows of norm 1 + 1e-3 k, where a second
    pass would move the result by ~1e-3 of the first's coefficients: the output is the one-pass
    result to rounding."""
    g = torch.Generator().manual_seed(5)
    j = 6
    V = torch.linalg.qr(torch.randn(n, j, generator=g, dtype=torch.float64)).Q.T.contiguous()
    V *= 1 + 1e-3 * torch.arange(1, j + 1, dtype=torch.float64)[:, None]
    w = 20.0 * V[-1] + 7.0 * V[-2] + torch.randn(n, generator=g, dtype=torch.float64)
    out, coeffs, norm = lanczos_reorth(w[None], V[None])
    one, c1 = _one_or_two_passes(w, V, 1, mgs=n == N_MGS)
    two, c2 = _one_or_two_passes(w, V, 2, mgs=n == N_MGS)
    err1, err2 = (out[0] - one).abs().max().item(), (out[0] - two).abs().max().item()
    assert err1 < 1e-12 and err2 > 1e-8
    assert (coeffs[0] - c1).abs().max().item() < 1e-11 and (coeffs[0] - c2).abs().max().item() > 1e-6
    assert norm.item() == pytest.approx(one.norm().item(), rel=1e-13)


@pytest.mark.parametrize("n", [N_MGS, 1_100_000], ids=["mgs", "cgs"])
def test_second_pass_runs_under_cancellation(n):
    """w almost inside span V (||w|| ~ 1e6, the rest ~ 1e-6 per entry): the full pass shrinks x
    far below 1/sqrt(2), the second pass runs and the result is orthogonal at 1e-13, which one
    pass (local rows + one full pass, modelled in float64) misses by orders of magnitude."""
    g = torch.Generator().manual_seed(3)
    j = 8
    V = torch.linalg.qr(torch.randn(n, j, generator=g, dtype=torch.float64)).Q.T.contiguous()
    w = V.T @ torch.randn(j, generator=g, dtype=torch.float64) * 1e6
    w += 1e-6 * torch.randn(n, generator=g, dtype=torch.float64)
    out, _, norm = lanczos_reorth(w[None], V[None])
    assert (V @ (out[0] / norm[0])).abs().max().item() < 1e-13
    one, _ = _one_or_two_passes(w, V, 1, mgs=n == N_MGS)
    assert (V @ (one / one.norm())).abs().max().item() > 1e-11


def test_work_buffers_reused_across_sizes_and_threads():
    """The CPU kernel takes its float64 work vector from a pool (a fresh one is an mmap that
    faults in on first touch): buffers handed back by one call serve the next, of another size,
    and problems running in parallel each get their own. Every call equals the CGS2 reference and
    the same call on a fresh pool state (the first one) bit for bit."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = {}
        for n in (N_CGS, 3_000, 2 * N_CGS, 3_000, N_CGS):
            b = 2 if n > N_MGS else 5          # b >= threads: one problem per thread, in parallel
            V, w = _basis(b, 7, n, torch.float32, "cpu", seed=n % 97)
            got = lanczos_reorth(w, V)
            want = ref.lanczos_reorth(w, V)
            for a, c in zip(got, want):
                torch.testing.assert_close(a, c, **tol(torch.float32))
            if n in runs:
                assert all(torch.equal(a, c) for a, c in zip(got, runs[n]))
            runs[n] = got
    finally:
        torch.set_num_threads(threads)


# 1b. the sweep mode (h given): x = w - V^T h, V w and ||x|| in one read of the basis
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# 19 rows: the eight-row loop twice and three single rows; (1, 9, 400k): several chunks of n
@pytest.mark.parametrize("b,j,n", [(0, 3, 10), (2, 0, 50), (1, 1, 7), (3, 19, 1000), (2, 8, 5000), (1, 9, 400_000)])
def test_sweep_matches_reference(device, dtype, b, j, n):
    V, w = _basis(b, j, n, dtype, device, seed=3)
    h = torch.randn(b, j, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    x, dots, norm = lanczos_reorth(w, V, h)
    Vd, wd = V.double(), w.double()
    want_x = wd - torch.einsum("bjn,bj->bn", Vd, h)
    assert x.dtype == w.dtype and dots.dtype == norm.dtype == torch.float64
    assert x.shape == w.shape and dots.shape == (b, j) and norm.shape == (b,)
    torch.testing.assert_close(x.double(), want_x, **tol(dtype))
    torch.testing.assert_close(dots, torch.einsum("bjn,bn->bj", Vd, wd), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(want_x, dim=1), rtol=1e-12, atol=1e-12)
    r = ref.lanczos_reorth(w, V, h)
    torch.testing.assert_close(dots, r[1], rtol=1e-12, atol=1e-12)


def test_sweep_reads_a_strided_view_in_place():
    V, w = _basis(2, 12, 3000, torch.float32, "cpu", seed=5)
    big = torch.zeros(2, 20, 3000)
    big[:, :12] = V
    view = big[:, 2:9]                          # rows 2..8 of a larger buffer, strided
    h = torch.randn(2, 7, dtype=torch.float64)
    got = lanczos_reorth(w, view, h)
    want = ref.lanczos_reorth(w, view.contiguous(), h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("h,match", [
    (torch.zeros(2, 3, dtype=torch.float64), r"expected h of shape \[2, 4\]"),
    (torch.zeros(2, 4, dtype=torch.float32), "expected h of dtype float64"),
])
def test_sweep_rejects_bad_h(h, match):
    V, w = _basis(2, 4, 33, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=match):
        lanczos_reorth(w, V, h)


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    V, w = _basis(2, 4, 33, dtype, device)
    torch.library.opcheck(OP, (w, V))
    torch.library.opcheck(OP, (w, V, torch.randn(2, 4, dtype=torch.float64).to(device)))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    V, w = _basis(5, 40, 10000, dtype, "cpu")
    got = lanczos_reorth(w.cuda(), V.cuda()[:, :25])
    want = lanczos_reorth(w, V[:, :25])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))
    h = torch.randn(5, 25, dtype=torch.float64)
    got = lanczos_reorth(w.cuda(), V.cuda()[:, :25], h.cuda())
    want = lanczos_reorth(w, V[:, :25], h)
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
    matches the CGS2 reference and is bitwise the same on a second run (fixed reduction order).
    (Not the CPU kernel: these rows are orthonormal only to ~1/sqrt(n), where its single pass and
    CGS2 differ by up to ~1e-3 in w_orth and ~1e-2 in coeffs.)"""
    g = torch.Generator(device="cuda").manual_seed(0)
    V = torch.randn(b, j, n, device="cuda", dtype=dtype, generator=g) / n**0.5  # nearly orthonormal
    w = torch.randn(b, n, device="cuda", dtype=dtype, generator=g)
    got = lanczos_reorth(w, V)
    again = lanczos_reorth(w, V)
    want = [t.cpu() for t in ref.lanczos_reorth(w, V)]
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
