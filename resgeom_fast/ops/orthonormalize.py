"""resgeom_fast.ops.orthonormalize: batched orthonormalisation for randomized range finders."""
from __future__ import annotations

import torch
from torch import Tensor


def orthonormalize(x: Tensor) -> Tensor:
    """Orthonormal bases of the column spaces of b blocks.

    Each column is first scaled by a power of two to a largest absolute entry in [0.5, 1)
    (exact; the column space and the Q below are unchanged), so any finite magnitude works, from
    subnormal entries to ~1e308, and the condition number that matters is that of the
    column-equilibrated block. Then shifted Cholesky QR three times in float64 (stable up to
    condition numbers ~1e15); columns that are exactly zero are replaced by fixed pseudo-random
    directions, and columns that become numerically zero in a later pass (linear dependence)
    too. For a float32 output the CPU kernel skips the third pass when the Gram matrix after two
    passes is I to 2^-40 (Frobenius): that pass would move q by at most 2^-41 relative, far below
    float32 rounding. The CPU kernel runs its Grams and solves on BLAS-3 in row chunks; results
    are identical run to run at a fixed thread count, and across thread counts can differ at
    float64 rounding. For a full-rank block the result equals the Q of a QR factorisation whose R has a positive
    diagonal; for a rank-deficient block the surplus columns are orthonormal directions that
    complete the basis.

    Args:
        x: [b, n, k] float32/float64 with k <= n and finite entries.

    Returns:
        q: [b, n, k] in x's dtype with ``q^T q = I`` per block.
    """
    return torch.ops.resgeom_fast.orthonormalize.default(x)


@torch.library.register_fake("resgeom_fast::orthonormalize")
def _orthonormalize_fake(x: Tensor) -> Tensor:
    torch._check(x.dim() == 3, lambda: f"orthonormalize: expected x of shape [b, n, k], got {tuple(x.shape)}")
    torch._check(x.shape[2] <= x.shape[1], lambda: "orthonormalize: expected k <= n")
    return x.new_empty(x.shape)
