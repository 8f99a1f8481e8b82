"""The compiled ops against their plain-PyTorch references (resgeom_fast/ops/_reference.py)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.helpers import DEVICES, run
from resgeom_fast import ops
from resgeom_fast.ops import _reference as ref

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("n,k,c,s", [(64, 10, 256, 1), (32, 10, 64, 256), (8, 20, 64, 1024)])
def test_masked_scale(benchmark, device, impl, n, k, c, s):
    benchmark.group = f"masked_scale n={n} k={k} c={c} s={s} {device}"
    v = torch.randn(n, k, c, s, device=device)
    mask = torch.rand(n, c, s, device=device) > 0.5
    scale = torch.rand(c, device=device) + 0.5
    run(benchmark, lambda: IMPLS[impl].masked_scale(v, mask, scale), device)
