"""The compiled ops against their plain-PyTorch references (resgeom_fast/ops/_reference.py)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.helpers import DEVICES, run
from resgeom_fast import ops
from resgeom_fast.ops import _reference as ref
from tests.ops.test_orthonormalize_blas import conditioned

IMPLS = {"ours": ops, "reference": ref}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("b,j,n", [(1, 100, 100_000), (10, 100, 20_000), (64, 50, 5_000)])
def test_lanczos_reorth(benchmark, device, impl, b, j, n):
    benchmark.group = f"lanczos_reorth b={b} j={j} n={n} {device}"
    V = torch.linalg.qr(torch.randn(b, n, j)).Q.transpose(1, 2).contiguous().to(device)
    w = torch.randn(b, n, device=device)
    run(benchmark, lambda: IMPLS[impl].lanczos_reorth(w, V), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours_sweep", "ours_cgs", "reference_sweep"])
@pytest.mark.parametrize("b,j,n", [(1, 50, 2_000_000), (10, 50, 264_000)])
def test_lanczos_reorth_sweep(benchmark, device, impl, b, j, n):
    """The sweep mode (h given: one read of the basis, what Lanczos's one-sweep full
    reorthogonalisation runs on the CPU) against the op's own Gram-Schmidt mode (two reads) on
    the same float32 basis, and the plain-PyTorch sweep."""
    benchmark.group = f"lanczos_reorth sweep b={b} j={j} n={n} {device}"
    V = torch.randn(b, j, n, device=device)
    V /= torch.linalg.vector_norm(V, dim=2, keepdim=True)
    w = torch.randn(b, n, device=device)
    h = 1e-3 * torch.randn(b, j, dtype=torch.float64, device=device)
    if impl == "ours_cgs":
        run(benchmark, lambda: IMPLS["ours"].lanczos_reorth(w, V), device)
    else:
        run(benchmark, lambda: IMPLS[impl.split("_")[0]].lanczos_reorth(w, V, h), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("b,m", [(10, 100), (100, 100), (1000, 50)])
def test_tridiag_eigh(benchmark, device, impl, b, m):
    benchmark.group = f"tridiag_eigh b={b} m={m} {device}"
    d = torch.randn(b, m, dtype=torch.float64, device=device)
    e = torch.rand(b, m - 1, dtype=torch.float64, device=device)
    run(benchmark, lambda: IMPLS[impl].tridiag_eigh(d, e), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("b,m,g", [(10, 100, 1000), (100, 100, 1000)])
def test_density_smooth(benchmark, device, impl, b, m, g):
    benchmark.group = f"density_smooth b={b} m={m} g={g} {device}"
    nodes = torch.randn(b, m, dtype=torch.float64, device=device)
    weights = torch.rand(b, m, dtype=torch.float64, device=device)
    grid = torch.linspace(-4, 4, g, dtype=torch.float64, device=device)
    run(benchmark, lambda: IMPLS[impl].density_smooth(nodes, weights, grid, 0.05), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("b,n,k", [(1, 100_000, 25), (128, 4096, 25), (16, 65_536, 25)])
def test_orthonormalize(benchmark, device, impl, b, n, k):
    benchmark.group = f"orthonormalize b={b} n={n} k={k} {device}"
    x = torch.randn(b, n, k, device=device)
    run(benchmark, lambda: IMPLS[impl].orthonormalize(x), device, rounds=3)


# orthonormalize on the CPU against torch.linalg.qr (LAPACK Householder QR in x's dtype, the
# textbook randomized SVD's choice) at the shapes of issue 15: the residual-Jacobian sketch of
# resnet50's first Bottleneck at 224x224 ([4, 802816, 20]), a one-block sketch of ~resnet18's
# parameter count ([1, 11.7M, 10]) and a batch of small blocks. Each row records beside its time
# the orthogonality error ||Q^T Q - I||_F (largest over the batch) and the residual
# ||Q R - X||_F / ||X||_F (R = Q^T X for ours) in float64; cond = the condition number of the
# float64 block before its rounding to float32 (1 = a Gaussian block). Measured 2026-12-02 on
# the 2-core CPU machine, one thread, old / new / qr interleaved over 3 rounds (min of 3 calls;
# old = the scalar kernel of commit b288697): benchmarks/results/bench_ops_orthonormalize_cpu_20261202.md.
ORTH_SHAPES = [(4, 802_816, 20), (1, 11_700_000, 10), (16, 16_384, 20)]


@pytest.mark.parametrize("impl", ["ours", "torch.linalg.qr"])
@pytest.mark.parametrize("cond", [1.0, 1e6, 1e10])
@pytest.mark.parametrize("b,n,k", ORTH_SHAPES)
def test_orthonormalize_cpu_vs_qr(benchmark, impl, cond, b, n, k):
    benchmark.group = f"orthonormalize vs qr b={b} n={n} k={k} cond={cond:g} cpu float32"
    if cond == 1.0:
        x = torch.randn(b, n, k, generator=torch.Generator().manual_seed(0))
    else:
        x = conditioned(b, n, k, cond, seed=0).float()
    fn = (lambda: ops.orthonormalize(x)) if impl == "ours" else (lambda: torch.linalg.qr(x).Q)
    q = run(benchmark, fn, "cpu", rounds=3)
    qd, xd = q.double(), x.double()
    r = torch.linalg.qr(x).R.double() if impl != "ours" else qd.transpose(1, 2) @ xd
    eye = torch.eye(k, dtype=torch.float64)
    benchmark.extra_info.update(
        orth_error=max((qd[i].T @ qd[i] - eye).norm().item() for i in range(b)),
        residual=max(((qd[i] @ r[i] - xd[i]).norm() / xd[i].norm()).item() for i in range(b)),
        threads=torch.get_num_threads(), torch=torch.__version__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("n,k,c,s", [(64, 10, 256, 1), (32, 10, 64, 256), (8, 20, 64, 1024)])
def test_masked_scale(benchmark, device, impl, n, k, c, s):
    benchmark.group = f"masked_scale n={n} k={k} c={c} s={s} {device}"
    v = torch.randn(n, k, c, s, device=device)
    mask = torch.rand(n, c, s, device=device) > 0.5
    scale = torch.rand(c, device=device) + 0.5
    run(benchmark, lambda: IMPLS[impl].masked_scale(v, mask, scale), device)
