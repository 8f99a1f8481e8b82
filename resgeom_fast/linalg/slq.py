"""Spectral density by stochastic Lanczos quadrature (SLQ)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.linalg._util import check_choice, check_int, generator, rademacher
from resgeom_fast.linalg.lanczos import REORTH, Lanczos
from resgeom_fast.linalg.operator import aslinearoperator


@dataclass
class SLQResult:
    """SLQ spectral density of each problem of a (batched) symmetric operator.

    Attributes:
        nodes: [*batch, probes, m] Ritz values (Gauss nodes) per probe, float64.
        weights: [*batch, probes, m] Gauss weights per probe (each probe's sum to 1).
        grid: [g] points where the density is evaluated (shared by all problems).
        density: [*batch, g] mean over probes of the smoothed densities (integrates to ~1).
        density_std: [*batch, g] standard deviation over probes (the per-probe spread).
        moments: [*batch, K + 1] estimates of tr(A^k) = n * E[sum_i tau_i theta_i^k], k = 0..K.
        moments_std: [*batch, K + 1] standard error of the moment estimates over probes.
        sigma: Gaussian width used; dim: n; steps: m.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    density_std: Tensor
    moments: Tensor
    moments_std: Tensor
    sigma: float
    dim: int
    steps: int

    @property
    def lambda_min(self) -> Tensor:
        return self.nodes.amin((-2, -1))

    @property
    def lambda_max(self) -> Tensor:
        return self.nodes.amax((-2, -1))

    def to_dict(self) -> dict:
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "density_std": self.density_std.tolist(),
            "moments": self.moments.tolist(),
            "moments_std": self.moments_std.tolist(),
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "sigma": self.sigma,
            "dim": self.dim,
            "steps": self.steps,
        }


def slq_density(
    op,
    probes: int = 10,
    steps: int = 100,
    grid: Optional[Tensor] = None,
    grid_size: int = 1000,
    sigma: Optional[float] = None,
    sigma0: float = 0.01,
    num_moments: int = 4,
    seed: Optional[int] = 0,
    reorth: str = "full",
) -> SLQResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``probes`` Rademacher vectors normalised to unit length advance together as one batch
    through ``steps`` Lanczos steps with full reorthogonalisation (one batched matmat a step);
    each tridiagonal T gives nodes theta_i (eigenvalues) and weights tau_i (squared first
    eigenvector components) via :func:`resgeom_fast.ops.tridiag_eigh`. The density
    ``(1/probes) sum_probes sum_i tau_i g(t - theta_i)`` uses a Gaussian g of width
    ``sigma = sigma0 * (lambda_max - lambda_min)`` (SCIENCE.md section 2) unless ``sigma`` is
    given; lambda_min/max are the extreme nodes over all probes (and problems). The default grid
    spans [lambda_min - 5 sigma, lambda_max + 5 sigma] with ``grid_size`` points.

    ``reorth="full"`` (default, SCIENCE.md) stores the whole basis ([b * probes, steps, n]) and
    reorthogonalises every step against it; ``reorth="local"`` keeps two vectors per probe and
    runs the plain three-term recurrence (see :class:`~resgeom_fast.linalg.lanczos.Lanczos`):
    O(n) memory per probe and no basis traffic, at the price of spurious copies of converged
    nodes (their weights split, the quadrature stays consistent). Use it when the basis does not
    fit in memory or its traffic dominates (cheap operators, huge n).
    """
    where = "slq_density"
    op = aslinearoperator(op)
    if op.shape[0] != op.shape[1] or not op.symmetric:
        raise ValueError(f"{where}: expected a symmetric square operator, got {op!r}")
    n = op.shape[0]
    check_int(where, "probes", probes, 1)
    check_int(where, "steps", steps, 1)
    check_int(where, "grid_size", grid_size, 2)
    check_int(where, "num_moments", num_moments, 0)
    if n == 0:
        raise ValueError(f"{where}: expected a non-empty operator, got shape {op.shape}")
    gen = generator(seed)
    b = op.batch_size
    v0 = rademacher((b * probes, n), gen, op.dtype, op.device)
    check_choice(where, "reorth", reorth, REORTH)
    lz = Lanczos(op, v0, probes, steps, where, gen, reorth=reorth)
    m = lz.advance(steps)
    d, e = lz.tridiagonal()
    nodes, weights = ops.tridiag_eigh(d, e)  # [P, m] float64

    lo, hi = nodes.min().item(), nodes.max().item()
    width = hi - lo
    if sigma is None:
        if not sigma0 > 0:
            raise ValueError(f"{where}: expected sigma0 > 0, got {sigma0}")
        sigma = sigma0 * width if width > 0 else sigma0 * max(abs(hi), 1.0)
    elif not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"{where}: expected sigma a positive number, got {sigma!r}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64, device=op.device)
    else:
        if not isinstance(grid, Tensor) or grid.dim() != 1 or grid.numel() < 1:
            raise ValueError(f"{where}: expected grid a 1-D tensor, got {grid!r}")
        grid = grid.to(device=op.device, dtype=torch.float64)
    per_probe = ops.density_smooth(nodes, weights, grid, float(sigma))  # [P, g]
    per_probe = per_probe.reshape(*op.batch_shape, probes, -1)
    powers = torch.stack([(weights * nodes**k).sum(-1) for k in range(num_moments + 1)], -1) * n
    powers = powers.reshape(*op.batch_shape, probes, num_moments + 1)
    std = lambda x: x.std(-2, unbiased=True) if probes > 1 else torch.full_like(x[..., 0, :], float("nan"))  # noqa: E731
    return SLQResult(
        nodes=nodes.reshape(*op.batch_shape, probes, m),
        weights=weights.reshape(*op.batch_shape, probes, m),
        grid=grid,
        density=per_probe.mean(-2),
        density_std=std(per_probe),
        moments=powers.mean(-2),
        moments_std=std(powers) / probes**0.5,
        sigma=float(sigma),
        dim=n,
        steps=m,
    )
