"""resgeom_fast.ops.tridiag_eigh: batched tridiagonal eigensolver (Gauss quadrature rules)."""
from __future__ import annotations

import torch
from torch import Tensor


def tridiag_eigh(diag: Tensor, offdiag: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and squared first eigenvector components of b symmetric tridiagonals.

    Args:
        diag: [b, m] float32/float64, the diagonals (Lanczos alphas).
        offdiag: [b, m - 1], same dtype and device, the off-diagonals (Lanczos betas).

    Returns:
        ``(nodes [b, m], weights [b, m])`` in the input dtype: eigenvalues in ascending order and
        the squared first components of the unit eigenvectors (they sum to 1 per problem), i.e.
        the nodes and weights of the Gauss quadrature rule of T. Computed in float64 by implicit
        QL. On CUDA, batches of at most 32 problems are solved by the CPU kernel on host copies
        (the same numbers, bit for bit), larger ones by one warp per problem. Raises RuntimeError
        on non-finite input.
    """
    return torch.ops.resgeom_fast.tridiag_eigh.default(diag, offdiag)


@torch.library.register_fake("resgeom_fast::tridiag_eigh")
def _tridiag_eigh_fake(diag: Tensor, offdiag: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(diag.dim() == 2, lambda: f"tridiag_eigh: expected diag of shape [b, m], got {tuple(diag.shape)}")
    torch._check(offdiag.dim() == 2, lambda: f"tridiag_eigh: expected offdiag of shape [b, m - 1], got {tuple(offdiag.shape)}")
    return diag.new_empty(diag.shape), diag.new_empty(diag.shape)
