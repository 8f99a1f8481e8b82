"""Shared helpers of the linalg algorithms: validation, random probes, flat batched application."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from resgeom_fast.linalg.operator import LinearOperator, NonFiniteError, describe_non_finite


def check_int(where: str, name: str, value, lo: int, hi: Optional[int] = None, hint: str = "") -> int:
    """Validate an integer argument; the error names the argument and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected {name} an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{where}: expected {name} {rng}{hint}, got {value}")
    return value


def check_choice(where: str, name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{where}: expected {name} one of {list(allowed)}, got {value!r}")
    return value


def generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator (probes are drawn on the CPU, so results do not depend on the device)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def rademacher(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    r = torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8)
    return (r.to(dtype) * 2 - 1).to(device)


def gaussian(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def check_finite(Y: Tensor, where: str, what: str) -> Tensor:
    # a NaN or inf anywhere makes the sum non-finite, so the elementwise check (a full pass with a
    # bool temporary) runs only when the cheap sum says something may be wrong (or overflowed)
    if Y.numel() and bool(torch.isfinite(Y.sum())):
        return Y
    if not bool(torch.isfinite(Y).all()):
        raise NonFiniteError(
            f"{where}: the operator returned non-finite values (NaN or inf) {what}: "
            f"{describe_non_finite(Y)} of its output; "
            "no result was produced (check the model, the loss and the data)"
        )
    return Y


def apply_flat(op: LinearOperator, V: Tensor, p: int, where: str, what: str = "") -> Tensor:
    """Apply ``op`` to ``p`` vectors per problem stored flat as ``V [b * p, n]``.

    Row ``i * p + j`` of V is vector j of problem i (problems in ``op.batch_shape`` order).
    Returns ``[b * p, m]`` in the same layout, after checking the output is finite.
    """
    n = op.shape[1]
    X = V.reshape(*op.batch_shape, p, n).transpose(-1, -2)
    Y = op.matmat(X.contiguous())
    check_finite(Y, where, what)
    return Y.transpose(-1, -2).reshape(V.shape[0], op.shape[0])


def apply_block(op: LinearOperator, X: Tensor, where: str, what: str = "", transpose: bool = False) -> Tensor:
    """``op.matmat(X)`` (or ``op.rmatmat``) with the finite-output check."""
    Y = op.rmatmat(X) if transpose else op.matmat(X)
    return check_finite(Y, where, what)
