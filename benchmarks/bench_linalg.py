"""eigsh, trace, slq_density and randomized_svd against peers and plain-PyTorch code.

Peers: torch.lobpcg and scipy.sparse.linalg.eigsh (extreme eigenvalues), torch.svd_lowrank
(randomized SVD), and the plain-PyTorch loops a researcher writes in a notebook (one probe at a
time, torch.linalg.eigh on each tridiagonal) for trace and SLQ. Operators are dense symmetric
matrices applied as matmats, so every implementation pays the same for a product.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from benchmarks.helpers import DEVICES, run
import resgeom_fast as rg


def _sym(n: int, device: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    ev = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 15.0], dtype=torch.float64),
                    torch.randn(n - 5, generator=g, dtype=torch.float64)])
    A = (Q * ev) @ Q.T
    return ((A + A.T) / 2).to(device, dtype)


def _plain_lanczos(A: torch.Tensor, v: torch.Tensor, m: int):
    """Textbook Lanczos with full reorthogonalisation in plain PyTorch (one probe)."""
    n = v.numel()
    V = torch.zeros(m, n, dtype=A.dtype, device=A.device)
    alpha = torch.zeros(m, dtype=A.dtype, device=A.device)
    beta = torch.zeros(m, dtype=A.dtype, device=A.device)
    V[0] = v / v.norm()
    for j in range(m):
        w = A @ V[j]
        alpha[j] = w @ V[j]
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        beta[j] = w.norm()
        if j + 1 < m:
            V[j + 1] = w / beta[j]
    return alpha, beta[:-1]


def _plain_slq(A: torch.Tensor, probes: int, m: int, grid: torch.Tensor, sigma: float):
    n = A.shape[0]
    g = torch.Generator().manual_seed(0)
    dens = torch.zeros_like(grid)
    for _ in range(probes):
        v = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(A)
        a, b = _plain_lanczos(A, v, m)
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, S = torch.linalg.eigh(T)
        tau = S[0] ** 2
        dens += (tau[None] * torch.exp(-((grid[:, None] - theta[None]) ** 2) / (2 * sigma**2))).sum(1)
    return dens / (probes * sigma * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "torch.lobpcg", "scipy.eigsh"])
@pytest.mark.parametrize("n", [1000, 4000])
def test_eigsh_top5(benchmark, device, impl, n):
    benchmark.group = f"eigsh top-5 n={n} {device}"
    A = _sym(n, device)
    if impl == "ours":
        fn = lambda: rg.linalg.eigsh(A, k=5, which="LA", tol=1e-8).eigenvalues  # noqa: E731
    elif impl == "torch.lobpcg":
        X0 = torch.randn(n, 5, dtype=A.dtype, generator=torch.Generator().manual_seed(0)).to(device)
        fn = lambda: torch.lobpcg(A, k=5, X=X0.clone(), largest=True, tol=1e-8)[0]  # noqa: E731
    else:
        if device != "cpu":
            pytest.skip("scipy runs on the CPU only")
        An = A.numpy()
        fn = lambda: sla.eigsh(An, k=5, which="LA", tol=1e-8)[0]  # noqa: E731
    out = run(benchmark, fn, device, rounds=3)
    want = torch.linalg.eigvalsh(A.cpu()).flip(0)[:5]
    got = torch.as_tensor(np.sort(np.asarray(out.cpu() if hasattr(out, "cpu") else out))[::-1].copy())
    benchmark.extra_info["max_rel_error"] = ((got - want).abs() / want.abs()).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "plain-pytorch"])
@pytest.mark.parametrize("n,batch", [(2000, 1), (500, 16)])
def test_slq_10x100(benchmark, device, impl, n, batch):
    benchmark.group = f"slq 10 probes x 100 steps n={n} batch={batch} {device}"
    mats = torch.stack([_sym(n, device, seed=i) for i in range(batch)])
    grid = torch.linspace(-10, 55, 1000, dtype=torch.float64, device=device)
    if impl == "ours":
        fn = lambda: rg.linalg.slq_density(mats, probes=10, steps=100, grid=grid, sigma=0.5).density  # noqa: E731
    else:
        fn = lambda: torch.stack([_plain_slq(mats[i], 10, 100, grid, 0.5) for i in range(batch)])  # noqa: E731
    run(benchmark, fn, device, rounds=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours-hutch++", "plain-hutchinson"])
@pytest.mark.parametrize("n", [2000])
def test_trace_100(benchmark, device, impl, n):
    benchmark.group = f"trace 100 matvecs n={n} {device}"
    A = _sym(n, device)
    if impl == "ours-hutch++":
        fn = lambda: rg.linalg.trace(A, probes=100, method="hutch++").estimate  # noqa: E731
    else:
        def fn():
            g = torch.Generator().manual_seed(0)
            est = 0.0
            for _ in range(100):  # one probe at a time, as notebook code does
                z = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(A)
                est += (z @ (A @ z)).item()
            return est / 100
    out = run(benchmark, fn, device)
    benchmark.extra_info["abs_error"] = abs(float(out) - torch.trace(A).item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours-subspace", "ours-block_krylov", "torch.svd_lowrank"])
@pytest.mark.parametrize("n,batch", [(2000, 1), (512, 32)])
def test_randomized_svd_top10(benchmark, device, impl, n, batch):
    benchmark.group = f"randomized_svd top-10 n={n} batch={batch} {device}"
    g = torch.Generator().manual_seed(0)
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    U = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64)).Q
    A = ((U * s) @ U.transpose(1, 2).flip(1)).float().to(device)
    if impl == "ours-subspace":       # l(2q+2) = 20 * 6 = 120 matvecs
        fn = lambda: rg.linalg.randomized_svd(A, k=10, oversample=10, power_iters=2).S  # noqa: E731
    elif impl == "ours-block_krylov":  # l(3q+2) = 12 * 10 ~ 120 matvecs
        fn = lambda: rg.linalg.randomized_svd(A, k=10, oversample=2, power_iters=3, method="block_krylov").S  # noqa: E731
    else:                              # q(2 niter + 2) = 20 * 6 = 120 matvecs
        fn = lambda: torch.svd_lowrank(A, q=20, niter=2)[1][..., :10]  # noqa: E731
    out = run(benchmark, fn, device, rounds=3)
    benchmark.extra_info["max_rel_error"] = ((out.double().cpu() - s[:10]).abs() / s[:10]).max().item()
