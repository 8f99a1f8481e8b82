"""Stochastic trace estimation: Hutchinson and Hutch++."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.core.distributed import gather_shares, raise_together
from resgeom_fast.linalg._memory import MemoryPlan, check_memory_limit, plan_trace
from resgeom_fast.linalg._probes import (
    agreed_seed,
    check_probe_mode,
    check_same_operator,
    draw_signs,
    probe_share,
    to_signs,
)
from resgeom_fast.linalg._util import apply_block, check_choice, check_int, generator
from resgeom_fast.linalg.operator import aslinearoperator

METHODS = ("hutchinson", "hutch++")
ROUNDING_FACTOR = 4.0
"""The constant of :attr:`TraceResult.rounding` (a few ulps per inner product and product)."""


@dataclass
class TraceResult:
    """Trace estimate per problem.

    Attributes:
        estimate: [*batch] float64.
        stderr: [*batch] float64 standard error of the stochastic part (NaN with one probe).
        rounding: [*batch] float64 a floor for the floating-point error of the estimate,
            ``ROUNDING_FACTOR * eps(dtype) * (sum_i ||A q_i|| + mean_j ||z_j|| ||A z_j||)`` over
            the Hutch++ basis vectors q_i and the Hutchinson probes z_j (eps of the operator's
            dtype): the error of a computed ``v^T A v`` is about eps ||v|| ||A v|| when A v is
            accurate to about eps relative; for a symmetric operator with >= 2 Hutch++ basis
            vectors, at least ``||M - M^T||_F sqrt(s / 2)`` with ``M = Q^T (A Q)`` (the measured
            error of the products themselves: M is symmetric for exact products). It matters when the sketch captures (almost) all of
            A: the stochastic part is then ~0 while the rounding is not (measured on resnet18
            parameter subsets: 5e-8 relative in float32, 1e-16 in float64). ``total_error``
            combines both.
        matvecs: operator applications per problem (the probe budget).
        method: "hutchinson" or "hutch++" (Hutch++ with fewer than 3 probes is Hutchinson).
        memory: the memory plan checked before any probe was drawn (the chunk width of the
            products, bytes needed and available; this rank's in a probe-parallel run).
    """

    estimate: Tensor
    stderr: Tensor
    matvecs: int
    method: str
    rounding: Optional[Tensor] = None
    memory: Optional[MemoryPlan] = None

    @property
    def total_error(self) -> Tensor:
        """``sqrt(stderr^2 + rounding^2)`` [*batch] (NaN where stderr is NaN: one probe)."""
        if self.rounding is None:
            return self.stderr
        return torch.sqrt(self.stderr ** 2 + self.rounding ** 2)

    def to_dict(self) -> dict:
        return {
            "estimate": self.estimate.tolist(),
            "stderr": self.stderr.tolist(),
            "matvecs": self.matvecs,
            "method": self.method,
            "rounding": None if self.rounding is None else self.rounding.tolist(),
            "memory": None if self.memory is None else self.memory.to_dict(),
        }


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """samples [*batch, p] -> mean, std / sqrt(p) (NaN for p = 1)."""
    p = samples.shape[-1]
    mean = samples.mean(-1)
    if p < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, samples.std(-1, unbiased=True) / math.sqrt(p)


class _Share:
    """This rank's columns ``[start, start + count)`` of a stage with ``sizes`` columns per rank."""

    def __init__(self, total: int, parallel: bool) -> None:
        if parallel:
            self.start, self.count, self.sizes = probe_share(total)
        else:
            self.start, self.count, self.sizes = 0, total, [total]


def _chunks(share: _Share, width: int) -> list[tuple[int, int]]:
    """``(start, count)`` of the column chunks (at most ``width`` each) of this rank's share."""
    return [(a, min(width, share.start + share.count - a)) for a in range(share.start, share.start + share.count,
                                                                       max(width, 1))]


def _gathered(where: str, parallel: bool, share: _Share, parts: list[Tensor], exc: Optional[BaseException]
              ) -> list[Tensor]:
    """The stage's per-column results of every rank (probe-parallel: ONE all_reduce that also
    carries the ranks' failures) or this process's own (``exc`` raised)."""
    if parallel:
        return gather_shares(where, parts, share.sizes, dim=-1, exc=exc)
    if exc is not None:
        raise exc
    return parts


def trace(op, probes: int = 100, method: str = "hutch++", seed: Optional[int] = 0, *,
          memory_limit: Optional[int] = None, distributed: Optional[str] = None) -> TraceResult:
    """Estimate ``tr(A)`` of a square operator with ``probes`` matmat columns per problem.

    Hutchinson: mean of ``z^T A z`` over Rademacher z. Hutch++ (Meyer et al. 2021) with budget
    p: ``s = p // 3`` sketch columns give ``Q = orth(A S)``; ``tr(Q^T A Q)`` is exact on that
    subspace (s columns) and Hutchinson with the remaining ``p - 2 s`` probes estimates the
    trace of the deflated ``(I - QQ^T) A (I - QQ^T)``; valid for any square A. Any budget is
    accepted: with p < 3, Hutch++ reduces to Hutchinson. The standard error covers the
    stochastic part; ``rounding`` is a floor for the floating-point error (``total_error``
    combines both).

    Memory (``memory_limit``: bytes the run may use; default the free memory of the operator's
    device): planned before any probe is drawn (:func:`~resgeom_fast.linalg._memory.plan_trace`):
    the Hutch++ sketch basis Q [*batch, n, s] is held whole; the products run in column chunks,
    all at once when they fit, else in the widest chunks that fit (the same estimate: the
    columns are independent; only the rounding of the batched products differs); when even the
    sketch or one column does not fit,
    :class:`~resgeom_fast.linalg._memory.InsufficientMemoryError` names the bytes and the
    options. ``memory`` records the plan.

    Distributed (docs/distributed.md): with a data-parallel operator (``op.distributed``) every
    rank runs every column (replicated). ``distributed="probes"`` (an initialised process group,
    the same single-process operator on the full data on every rank): every rank draws all probes
    from ``seed`` as one process does (``seed=None``: rank 0's, broadcast) and applies the
    operator to its contiguous share of each stage's columns (the sketch S, the range Q, the
    Hutchinson probes; the first ``columns % world`` ranks one more, a rank may have none); ONE
    all_reduce per stage gathers the sketch products A S (every rank then orthonormalises the
    same [*batch, n, s] block: the sketch is replicated), then the per-column sums of the range
    and then the Hutchinson samples. Every rank returns the single-process estimate (up to the
    rounding of the batched products). Before the probes, one product of a fixed vector is
    compared across ranks (:class:`~resgeom_fast.core.distributed.DivergentRanksError` on every
    rank when an operator differs); a failure on one rank is raised on every rank.
    """
    where = "trace"
    op = aslinearoperator(op, where=where)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{where}: expected a square operator, got shape {op.shape}")
    n = op.shape[0]
    check_int(where, "probes", probes, 1)
    check_choice(where, "method", method, METHODS)
    memory_limit = check_memory_limit(where, memory_limit)
    parallel = check_probe_mode(where, distributed, op)
    gen = generator(agreed_seed(where, seed) if parallel else seed, op)
    s = probes // 3 if method == "hutch++" else 0
    s = min(s, n)
    g = probes - 2 * s
    batch = op.batch_shape
    sk, hz = _Share(s, parallel), _Share(g, parallel)
    if parallel:
        check_same_operator(where, op)
    f64 = dict(dtype=torch.float64, device=op.device)
    exc: Optional[BaseException] = None
    plan: Optional[MemoryPlan] = None
    try:
        plan = plan_trace(n, op.batch_size, s, sk.count, hz.count, op.dtype, op.device, memory_limit, where,
                          hutchinson=g, share=(sk.count + sk.count + hz.count, probes) if parallel else None)
    except Exception as err:  # raised on every rank before any product
        exc = err
    if parallel:
        raise_together(where, exc)
    elif exc is not None:
        raise exc
    width = plan.group if plan is not None else 1
    exact = torch.zeros(batch, **f64)
    scale = torch.zeros(batch, **f64)   # sum ||v|| ||A v|| terms
    measured = torch.zeros(batch, **f64)
    Q: Optional[Tensor] = None
    if s > 0:
        # the sketch: Y = A S, this rank's columns; gathered, orthonormalised on every rank
        Y = torch.zeros(*batch, n, sk.count, dtype=op.dtype, device=op.device)
        if exc is None:
            try:
                S8 = draw_signs((*batch, n, s), gen, op.device)
                for a, c in _chunks(sk, width):
                    Y[..., a - sk.start:a - sk.start + c] = apply_block(
                        op, to_signs(S8[..., a:a + c], op.dtype, op.device), where, "on the Hutch++ sketch")
                del S8
            except Exception as err:
                exc = err
        (Y,) = _gathered(where, parallel, sk, [Y], exc)
        Q = ops.orthonormalize(Y.reshape(-1, n, s)).reshape(*batch, n, s)
        del Y
        # the range: per column q_j: q_j . A q_j, ||A q_j|| and Q^T A q_j
        qaq = torch.zeros(*batch, sk.count, **f64)
        norms = torch.zeros(*batch, sk.count, **f64)
        M = torch.zeros(*batch, s, sk.count, dtype=op.dtype, device=op.device)
        try:
            for a, c in _chunks(sk, width):
                Qc = Q[..., a:a + c]
                AQc = apply_block(op, Qc.contiguous(), where, "on the Hutch++ range")
                j = slice(a - sk.start, a - sk.start + c)
                qaq[..., j] = (Qc * AQc).sum(-2, dtype=torch.float64)   # accumulated in float64, no copies
                norms[..., j] = AQc.norm(dim=-2, dtype=torch.float64)
                M[..., j] = Q.transpose(-1, -2) @ AQc
                del AQc
        except Exception as err:
            exc = err
        qaq, norms, M = _gathered(where, parallel, sk, [qaq, norms, M], exc)
        exact = qaq.sum(-1)
        scale = scale + norms.sum(-1)
        if s >= 2 and op.symmetric:
            # the products' own error, measured: Q^T A Q is symmetric for an exact symmetric A,
            # so its asymmetry estimates the error of each q_j^T (A q_i) (double backward through
            # a deep net is accurate to ~10-100 eps, not eps); summed over the s diagonal terms
            M = M.double()
            asym = (M - M.transpose(-1, -2)).norm(dim=(-2, -1))
            measured = asym * math.sqrt(s / 2.0)
        del M
    # the Hutchinson probes (deflated by Q), this rank's columns
    samples = torch.zeros(*batch, hz.count, **f64)
    zaz = torch.zeros(*batch, hz.count, **f64)
    if exc is None:
        try:
            Z8 = draw_signs((*batch, n, g), gen, op.device)
            for a, c in _chunks(hz, width):
                Z = to_signs(Z8[..., a:a + c], op.dtype, op.device)
                if Q is not None:
                    Z = Z - Q @ (Q.transpose(-1, -2) @ Z)
                AZ = apply_block(op, Z, where, "on the Hutchinson probes")
                j = slice(a - hz.start, a - hz.start + c)
                samples[..., j] = (Z * AZ).sum(-2, dtype=torch.float64)
                zaz[..., j] = Z.norm(dim=-2, dtype=torch.float64) * AZ.norm(dim=-2, dtype=torch.float64)
                del Z, AZ
            del Z8
        except Exception as err:
            exc = err
    samples, zaz = _gathered(where, parallel, hz, [samples, zaz], exc)
    mean, stderr = _mean_stderr(samples)
    if g > 0:
        scale = scale + zaz.mean(-1)
    return TraceResult(
        estimate=exact + mean,
        stderr=stderr,
        matvecs=probes,
        method="hutch++" if s > 0 else "hutchinson",
        rounding=torch.maximum(ROUNDING_FACTOR * torch.finfo(op.dtype).eps * scale, measured),
        memory=plan,
    )
