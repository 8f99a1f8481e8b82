"""Randomized SVD (range finder with power iterations, or block Krylov) of batched operators."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.linalg._util import apply_block, check_choice, check_int, gaussian, generator
from resgeom_fast.linalg.operator import aslinearoperator

METHODS = ("subspace", "block_krylov")
SKETCHES = ("shared", "independent")


@dataclass
class SVDResult:
    """Top-k singular triplets per problem: ``A ~ U diag(S) V^T``.

    Attributes:
        U: [*batch, m, k]; S: [*batch, k] descending; V: [*batch, n, k]; matvecs: operator
        applications (columns, A and A^T together) per problem.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    matvecs: int

    def to_dict(self) -> dict:
        return {"S": self.S.tolist(), "matvecs": self.matvecs}


def _orth(Y: Tensor) -> Tensor:
    """Orthonormalise [*batch, r, c] blocks with the compiled CholeskyQR3 op."""
    r, c = Y.shape[-2:]
    return ops.orthonormalize(Y.reshape(-1, r, c)).reshape(Y.shape)


def randomized_svd(
    op,
    k: int,
    oversample: int = 10,
    power_iters: int = 2,
    seed: Optional[int] = 0,
    method: str = "subspace",
    sketch: str = "shared",
) -> SVDResult:
    """Top-k singular triplets of each problem of a (batched) operator.

    "subspace" (Halko, Martinsson, Tropp 2011): Gaussian Omega [n, l] with l = k + oversample,
    Q = orth(A Omega), then ``power_iters`` rounds Q = orth(A orth(A^T Q)); B^T = A^T Q and the
    thin SVD of B^T gives the triplets. Matvecs: l (2 q + 2).
    "block_krylov" (Musco & Musco 2015): Q = orth([A Omega, (A A^T) A Omega, ...,
    (A A^T)^q A Omega]) with each block orthonormalised as it is formed, then the same
    Rayleigh-Ritz step; better for slowly decaying spectra. Matvecs: l (3 q + 2).
    Orthonormalisation uses :func:`resgeom_fast.ops.orthonormalize` (CholeskyQR3 in float64).

    Args:
        op: LinearOperator [*batch](m, n) with a transpose (``op.T``), or a dense tensor.
        k: 1 <= k <= min(m, n).
        oversample: extra sketch columns p >= 0 (l = min(k + p, min(m, n))).
        power_iters: q >= 0.
        seed: seed of the Gaussian sketch (drawn on the CPU).
        method: "subspace" or "block_krylov".
        sketch: "shared" (default): one Gaussian Omega [n, l] for every problem of a batched
            operator, passed as a stride-0 expanded view [*batch, n, l] -- each problem still
            sees a Gaussian sketch, and operators that can exploit it do (the fast path of
            :func:`resgeom_fast.operators.residual_jacobians` computes W_1 Omega once for all
            samples); "independent": one Omega per problem.
    """
    where = "randomized_svd"
    op = aslinearoperator(op)
    m, n = op.shape
    r = min(m, n)
    check_int(where, "k", k, 1, r, hint=f" (min(m, n) of the operator shape {op.shape})")
    check_int(where, "oversample", oversample, 0)
    check_int(where, "power_iters", power_iters, 0)
    check_choice(where, "method", method, METHODS)
    check_choice(where, "sketch", sketch, SKETCHES)
    if not op.has_transpose:
        raise ValueError(f"{where}: expected an operator with a transpose (rmatmat), got {op!r}")
    gen = generator(seed)
    batch = op.batch_shape
    l = min(k + oversample, r)
    if sketch == "shared" and len(batch) > 0:
        omega = gaussian((n, l), gen, op.dtype, op.device).expand(*batch, n, l)
    else:
        omega = gaussian((*batch, n, l), gen, op.dtype, op.device)
    Q = _orth(apply_block(op, omega, where, "on the sketch"))
    matvecs = l
    if method == "subspace":
        for _ in range(power_iters):
            Z = _orth(apply_block(op, Q, where, "in a power iteration", transpose=True))
            Q = _orth(apply_block(op, Z, where, "in a power iteration"))
            matvecs += 2 * l
    else:
        blocks = [Q]
        cols = l
        for _ in range(power_iters):
            if cols >= r:
                break
            Z = apply_block(op, blocks[-1], where, "in a Krylov step", transpose=True)
            Y = _orth(apply_block(op, Z, where, "in a Krylov step"))
            blocks.append(Y)
            cols += l
            matvecs += 2 * l
        K = torch.cat(blocks, dim=-1)[..., :r]
        Q = _orth(K)
    Bt = apply_block(op, Q, where, "in the Rayleigh-Ritz step", transpose=True)  # [*, n, c]
    matvecs += Q.shape[-1]
    P, S, Wh = torch.linalg.svd(Bt.double(), full_matrices=False)  # Bt = P S Wh
    U = Q.double() @ Wh.transpose(-1, -2)
    return SVDResult(
        U=U[..., :k].to(op.dtype),
        S=S[..., :k].to(op.dtype),
        V=P[..., :k].to(op.dtype),
        matvecs=matvecs,
    )
