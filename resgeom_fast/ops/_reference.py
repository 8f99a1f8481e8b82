"""Plain-PyTorch references of the compiled ops, for tests and benchmarks (never a fallback)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def lanczos_reorth(w: Tensor, basis: Tensor, h: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """CGS2 in float64 with batched matrix products: four reads of the basis (the CUDA kernel's
    algorithm; the CPU kernel's local-first + one pass (+ a second if needed) agrees to rounding).
    With ``h``: the sweep mode, ``x = w - V^T h``, ``(x rounded, V w, ||x||)`` in float64."""
    wd, V = w.double(), basis.double()
    if h is not None:
        x = wd - torch.einsum("bjn,bj->bn", V, h.double())
        return x.to(w.dtype), torch.einsum("bjn,bn->bj", V, wd), torch.linalg.vector_norm(x, dim=1)
    h1 = torch.einsum("bjn,bn->bj", V, wd)
    w1 = wd - torch.einsum("bjn,bj->bn", V, h1)
    h2 = torch.einsum("bjn,bn->bj", V, w1)
    w2 = w1 - torch.einsum("bjn,bj->bn", V, h2)
    return w2.to(w.dtype), h1 + h2, torch.linalg.vector_norm(w2, dim=1)


def tridiag_eigh(diag: Tensor, offdiag: Tensor) -> tuple[Tensor, Tensor]:
    """Dense float64 eigh of each tridiagonal; weights are squared first eigenvector entries."""
    d, e = diag.double(), offdiag.double()
    T = torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)
    evals, evecs = torch.linalg.eigh(T)
    weights = evecs[:, 0, :] ** 2 if d.shape[1] else evals.clone()
    return evals.to(diag.dtype), weights.to(diag.dtype)


def density_smooth(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Broadcast sum of weighted Gaussians, [b, m, g] intermediate."""
    diff = grid.double()[None, None, :] - nodes.double()[:, :, None]
    g = torch.exp(-(diff**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    return (weights.double()[:, :, None] * g).sum(1).to(nodes.dtype)


def orthonormalize(x: Tensor) -> Tensor:
    """Householder QR (torch.linalg.qr) with the signs fixed so that R has a positive diagonal.

    The columns are first scaled by powers of two to a largest absolute entry in [0.5, 1), as
    the kernels do (exact; the Q of a QR with a positive diagonal is unchanged by a positive
    column scaling), so the reference covers the same range of magnitudes (1e-300 .. 1e300).
    """
    xd = x.double()
    colmax = xd.abs().amax(dim=-2, keepdim=True)
    _, e = torch.frexp(colmax)
    e = torch.where(colmax > 0, e, torch.zeros_like(e))
    h = torch.div(-e, 2, rounding_mode="trunc")
    one = torch.ones_like(colmax)
    xd = xd * torch.ldexp(one, h) * torch.ldexp(one, -e - h)
    q, r = torch.linalg.qr(xd)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign[:, None, :]).to(x.dtype)


def masked_scale(v: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """Broadcast product ``v * scale[c] * mask[n, c, s]`` over the probe dimension K."""
    return v * scale[None, None, :, None] * mask[:, None].to(v.dtype)
