"""resgeom_fast.ops.density_smooth: Gaussian smoothing of quadrature rules into densities."""
from __future__ import annotations

import torch
from torch import Tensor


def density_smooth(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Smooth b weighted node sets into densities on a grid.

    ``density[p, t] = sum_i weights[p, i] * N(grid[t]; nodes[p, i], sigma^2)`` with N the normal
    density, accumulated in float64.

    Args:
        nodes: [b, m] float32/float64. weights: [b, m], same dtype/device. grid: [g].
        sigma: the Gaussian width, > 0.

    Returns:
        [b, g] in the input dtype.
    """
    return torch.ops.resgeom_fast.density_smooth.default(nodes, weights, grid, float(sigma))


@torch.library.register_fake("resgeom_fast::density_smooth")
def _density_smooth_fake(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    torch._check(nodes.dim() == 2, lambda: f"density_smooth: expected nodes of shape [b, m], got {tuple(nodes.shape)}")
    torch._check(grid.dim() == 1, lambda: f"density_smooth: expected grid of shape [g], got {tuple(grid.shape)}")
    return nodes.new_empty((nodes.shape[0], grid.shape[0]))
