"""resgeom_fast.ops.lanczos_reorth: one batched full-reorthogonalisation step of Lanczos."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def lanczos_reorth(w: Tensor, basis: Tensor, h: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Orthogonalise ``w`` against the rows of ``basis`` to working precision.

    CPU: from j >= 3 the last two rows first (MGS; in Lanczos ``w = A v_j`` lies almost in their
    span), then one full Gram-Schmidt pass (row-by-row MGS while ``w`` in float64 and a row fit in
    cache, else classical in two sweeps over the basis), then a second full pass only if the
    first shrank ``w`` below ``1/sqrt(2)`` of its norm (the DGKS criterion, as under cancellation).
    CUDA: classical Gram-Schmidt twice (CGS2, as the reference).

    Args:
        w: [b, n] float32/float64, one vector per problem (typically ``A v_j``).
        basis: [b, j, n], same dtype and device, rows orthonormal per problem (j may be 0). A
            view with any stride on its first two dimensions is read in place.

    Returns:
        ``(w_orth [b, n] in w's dtype, coeffs [b, j] float64, norm [b] float64)`` with
        ``w_orth = w - basis^T coeffs`` orthogonal to every row and ``norm = ||w_orth||``.
        ``coeffs`` sums the coefficients of all passes; ``coeffs[:, -1]`` is the Lanczos alpha
        when ``w = A basis[:, -1]``. Scalars are accumulated in float64; ``norm`` is that of the
        float64 result before it is rounded to w's dtype.

    The sweep mode, ``h`` given ([b, j] float64, one coefficient per basis row): no projection
    is computed; one read of the basis returns ``(x [b, n] in w's dtype, dots [b, j] float64,
    norm [b] float64)`` with ``x = w - basis^T h`` (float64, then rounded), ``dots = basis w`` (of
    the input w) and ``norm = ||x||`` (of the float64 x): the two sweeps of classical Gram-Schmidt
    fused into one, possible because h is given. Lanczos's one-sweep full reorthogonalisation
    (:class:`resgeom_fast.linalg.lanczos.Lanczos`) predicts h from the recurrence and the measured
    overlaps, and gets the new vector's overlaps as ``(dots - G h) / norm`` (G the basis's Gram
    matrix, which it tracks).
    """
    return torch.ops.resgeom_fast.lanczos_reorth.default(w, basis, h)


@torch.library.register_fake("resgeom_fast::lanczos_reorth")
def _lanczos_reorth_fake(w: Tensor, basis: Tensor, h: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(w.dim() == 2, lambda: f"lanczos_reorth: expected w of shape [b, n], got {tuple(w.shape)}")
    torch._check(basis.dim() == 3, lambda: f"lanczos_reorth: expected basis of shape [b, j, n], got {tuple(basis.shape)}")
    torch._check(basis.shape[0] == w.shape[0] and basis.shape[2] == w.shape[1],
                 lambda: f"lanczos_reorth: expected basis [b, j, n] to match w {tuple(w.shape)}, got {tuple(basis.shape)}")
    torch._check(basis.dtype == w.dtype, lambda: "lanczos_reorth: expected basis of the dtype of w")
    if h is not None:
        torch._check(h.dim() == 2 and h.shape[0] == w.shape[0] and h.shape[1] == basis.shape[1],
                     lambda: f"lanczos_reorth: expected h of shape [{w.shape[0]}, {basis.shape[1]}], got {tuple(h.shape)}")
        torch._check(h.dtype == torch.float64, lambda: "lanczos_reorth: expected h of dtype float64")
    b = w.shape[0]
    return (
        w.new_empty(w.shape),
        w.new_empty((b, basis.shape[1]), dtype=torch.float64),
        w.new_empty((b,), dtype=torch.float64),
    )
