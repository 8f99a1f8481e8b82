"""resgeom_fast::density_smooth against its reference, mass conservation, errors."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import CUDA_REASON, DEVICES, DTYPES, HAS_CUDA, tol
from resgeom_fast.ops import _reference as ref
from resgeom_fast.ops import density_smooth

OP = torch.ops.resgeom_fast.density_smooth.default


def _case(b, m, g, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.randn(b, m, generator=gen, dtype=torch.float64)
    weights = torch.rand(b, m, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-300)
    grid = torch.linspace(-6, 6, g, dtype=torch.float64)
    return nodes.to(device, dtype), weights.to(device, dtype), grid.to(device, dtype)


# 1. correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,g", [(0, 4, 10), (3, 0, 10), (2, 5, 0), (4, 30, 257), (1, 200, 1000)])
def test_matches_reference(device, dtype, b, m, g):
    nodes, weights, grid = _case(b, m, g, dtype, device)
    out = density_smooth(nodes, weights, grid, 0.2)
    assert out.shape == (b, g) and out.dtype == dtype
    torch.testing.assert_close(out, ref.density_smooth(nodes, weights, grid, 0.2), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_integrates_to_total_weight(device):
    nodes, weights, grid = _case(3, 20, 4001, torch.float64, device)
    out = density_smooth(nodes, weights, grid, 0.15)
    mass = torch.trapezoid(out, grid, dim=1)
    torch.testing.assert_close(mass, weights.sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    nodes, weights, grid = _case(5, 8, 50, torch.float64, device)
    nt = nodes.t().contiguous().t()
    out = density_smooth(nt, weights, grid.flip(0).flip(0), 0.3)
    torch.testing.assert_close(out, ref.density_smooth(nodes, weights, grid, 0.3))


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    torch.library.opcheck(OP, (*_case(2, 6, 17, dtype, device), 0.5))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    nodes, weights, grid = _case(16, 100, 500, dtype, "cpu")
    got = density_smooth(nodes.cuda(), weights.cuda(), grid.cuda(), 0.1)
    torch.testing.assert_close(got.cpu(), density_smooth(nodes, weights, grid, 0.1), **tol(dtype))


# 5. one raises per check
def test_errors():
    nodes, weights, grid = _case(2, 6, 17, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="expected nodes of shape \\[b, m\\]"):
        density_smooth(nodes[0], weights, grid, 0.1)
    with pytest.raises(RuntimeError, match="expected weights of shape"):
        density_smooth(nodes, weights[:, :3], grid, 0.1)
    with pytest.raises(RuntimeError, match="expected grid of shape \\[g\\]"):
        density_smooth(nodes, weights, grid[None], 0.1)
    with pytest.raises(RuntimeError, match="expected nodes of dtype float32 or float64"):
        density_smooth(nodes.int(), weights.int(), grid.int(), 0.1)
    with pytest.raises(RuntimeError, match="expected weights and grid of the dtype of nodes"):
        density_smooth(nodes, weights.float(), grid, 0.1)
    with pytest.raises(RuntimeError, match="expected sigma a positive finite number"):
        density_smooth(nodes, weights, grid, 0.0)


# 6. torch.compile smoke test
def test_compile():
    nodes, weights, grid = _case(2, 6, 17, torch.float64, "cpu")
    fn = torch.compile(lambda a, b, c: density_smooth(a, b * 2, c, 0.3), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(nodes, weights, grid), ref.density_smooth(nodes, 2 * weights, grid, 0.3))
