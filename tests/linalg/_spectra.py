"""Symmetric test matrices with constructed spectra (float64, known eigenvalues)."""
from __future__ import annotations

import torch


def spectrum(kind: str, n: int) -> torch.Tensor:
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if kind == "clustered":      # a tight cluster at the top, well separated from the bulk
        return torch.cat([10 - 1e-3 * torch.arange(6, dtype=torch.float64), torch.linspace(0, 5, n - 6, dtype=torch.float64)])
    if kind == "decaying":       # slowly decaying, positive
        return i ** -0.5
    if kind == "indefinite":     # both signs, outliers at both ends
        return torch.cat([torch.tensor([7.0, 6.5, -8.0, -7.2], dtype=torch.float64), torch.linspace(-2, 3, n - 4, dtype=torch.float64)])
    if kind == "rank_deficient":  # rank n/4, the rest exactly zero
        r = n // 4
        return torch.cat([torch.linspace(1, 4, r, dtype=torch.float64), torch.zeros(n - r, dtype=torch.float64)])
    raise ValueError(kind)


def symmetric(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = evals.numel()
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    A = (Q * evals) @ Q.T
    return (A + A.T) / 2
