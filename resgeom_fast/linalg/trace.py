"""Stochastic trace estimation: Hutchinson and Hutch++."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.linalg._util import apply_block, check_choice, check_int, generator, rademacher
from resgeom_fast.linalg.operator import aslinearoperator

METHODS = ("hutchinson", "hutch++")


@dataclass
class TraceResult:
    """Trace estimate per problem.

    Attributes:
        estimate: [*batch] float64.
        stderr: [*batch] float64 standard error of the stochastic part (NaN with one probe).
        matvecs: operator applications per problem (the probe budget).
        method: "hutchinson" or "hutch++" (Hutch++ with fewer than 3 probes is Hutchinson).
    """

    estimate: Tensor
    stderr: Tensor
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {
            "estimate": self.estimate.tolist(),
            "stderr": self.stderr.tolist(),
            "matvecs": self.matvecs,
            "method": self.method,
        }


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """samples [*batch, p] -> mean, std / sqrt(p) (NaN for p = 1)."""
    p = samples.shape[-1]
    mean = samples.mean(-1)
    if p < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, samples.std(-1, unbiased=True) / math.sqrt(p)


def trace(op, probes: int = 100, method: str = "hutch++", seed: Optional[int] = 0) -> TraceResult:
    """Estimate ``tr(A)`` of a square operator with ``probes`` matmat columns per problem.

    Hutchinson: mean of ``z^T A z`` over Rademacher z. Hutch++ (Meyer et al. 2021) with budget
    p: ``s = p // 3`` sketch columns give ``Q = orth(A S)``; ``tr(Q^T A Q)`` is exact on that
    subspace (s columns) and Hutchinson with the remaining ``p - 2 s`` probes estimates the
    trace of the deflated ``(I - QQ^T) A (I - QQ^T)``; valid for any square A. Any budget is
    accepted: with p < 3, Hutch++ reduces to Hutchinson. The standard error covers the
    stochastic part.
    """
    where = "trace"
    op = aslinearoperator(op, where=where)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{where}: expected a square operator, got shape {op.shape}")
    n = op.shape[0]
    check_int(where, "probes", probes, 1)
    check_choice(where, "method", method, METHODS)
    gen = generator(seed, op)
    s = probes // 3 if method == "hutch++" else 0
    s = min(s, n)
    batch = op.batch_shape
    exact = torch.zeros(batch, dtype=torch.float64, device=op.device)
    Q = None
    if s > 0:
        S = rademacher((*batch, n, s), gen, op.dtype, op.device)
        Y = apply_block(op, S, where, "on the Hutch++ sketch")
        Q = ops.orthonormalize(Y.reshape(-1, n, s)).reshape(*batch, n, s)
        AQ = apply_block(op, Q, where, "on the Hutch++ range")
        exact = (Q * AQ).sum((-2, -1), dtype=torch.float64)      # accumulated in float64, no copies
    g = probes - 2 * s
    Z = rademacher((*batch, n, g), gen, op.dtype, op.device)
    if Q is not None:
        Z = Z - Q @ (Q.transpose(-1, -2) @ Z)
    AZ = apply_block(op, Z, where, "on the Hutchinson probes")
    samples = (Z * AZ).sum(-2, dtype=torch.float64)
    mean, stderr = _mean_stderr(samples)
    return TraceResult(
        estimate=exact + mean,
        stderr=stderr,
        matvecs=probes,
        method="hutch++" if s > 0 else "hutchinson",
    )
