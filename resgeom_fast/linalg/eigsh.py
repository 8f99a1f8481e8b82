"""Extreme eigenpairs of symmetric operators by Lanczos with full reorthogonalisation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from resgeom_fast.core.heap import release
from resgeom_fast.linalg._memory import RITZ_CHUNK_BYTES, MemoryPlan, check_memory_limit, plan_eigsh
from resgeom_fast.linalg._util import apply_block, check_choice, check_int, gaussian, generator
from resgeom_fast.linalg.lanczos import Lanczos
from resgeom_fast.linalg.operator import aslinearoperator

WHICH = ("LA", "SA", "both")


@dataclass
class EigshResult:
    """Extreme eigenpairs of each problem of a (batched) symmetric operator.

    Attributes:
        eigenvalues: [*batch, k]; "LA": largest first, "SA": smallest first, "both": ascending
            (floor(k/2) from the bottom, ceil(k/2) from the top, as scipy's "BE").
        eigenvectors: [*batch, n, k] unit Ritz vectors, in the operator's dtype.
        residuals: [*batch, k] true residual norms ||A x - theta x|| (one extra matmat).
        converged: [*batch] bool, every wanted Ritz estimate below tol * ||A||.
        steps: Lanczos steps taken (shared by all problems).
        memory: the memory plan checked before the basis was allocated
            (:class:`~resgeom_fast.linalg._memory.MemoryPlan`).
        note: why a problem whose Ritz estimates all met ``tol`` is still not converged (a
            numerically repeated eigenvalue among the wanted ones, whose multiplicity a
            single-vector Krylov space cannot certify); None otherwise.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    steps: int
    memory: Optional[MemoryPlan] = None
    note: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
            "steps": self.steps,
            "memory": None if self.memory is None else self.memory.to_dict(),
            "note": self.note,
        }


def _wanted(s: int, k: int, which: str) -> Tensor:
    """Indices (host) of the wanted Ritz values among s ascending ones."""
    cpu = torch.device("cpu")
    if which == "LA":
        return torch.arange(s - 1, s - 1 - k, -1, device=cpu)
    if which == "SA":
        return torch.arange(0, k, device=cpu)
    lo, hi = k // 2, k - k // 2
    return torch.cat([torch.arange(0, lo, device=cpu), torch.arange(s - hi, s, device=cpu)])


#: the most steps between two convergence checks of the default schedule
MAX_CHECK_INTERVAL = 10
#: the CPU schedule checks every ``ceil(CHECK_COST * s^2 / n)`` steps (at least 1, at most
#: MAX_CHECK_INTERVAL): a check's eigh of the s x s tridiagonal (~0.2 ns s^3 per problem, one
#: thread) against a step's read of its s basis vectors (~0.45 ns s n per problem at ~9 GB/s),
#: measured 2026-12-05 on the 2-core Intel Xeon; 16 keeps the checks under ~3% of the steps
CHECK_COST = 16


def check_interval(s: int, n: int) -> int:
    """Steps from a convergence check at step ``s`` to the next on the CPU's default schedule."""
    return max(1, min(MAX_CHECK_INTERVAL, math.ceil(CHECK_COST * s * s / n)))


class _Check(NamedTuple):
    """A convergence check of the Lanczos run's current T (host, float64): its eigenpairs
    ``theta, S``, the wanted indices ``idx`` and, per problem, ``conv``: every wanted Ritz
    estimate ``|beta_s S[s, i]|`` is at most ``tol * max|theta|`` and no repeated wanted value
    leaves the ones past it uncertified (:func:`_open_cluster`); ``held``: the estimates met,
    the repeated value not."""

    theta: Tensor
    S: Tensor
    idx: Tensor
    conv: Tensor
    held: Tensor


def _check(lz: Lanczos, k: int, which: str, tol: float) -> _Check:
    """The convergence check (:class:`_Check`) of ``lz``'s current T."""
    s = lz.steps
    d, e = lz.tridiagonal()
    # one transfer: diag, off-diagonal and the residual norm beta_s (the check's one sync)
    host = torch.cat([d, e, lz.beta[:, s - 1 : s]], dim=1).cpu()
    d, e, beta_s = host[:, :s], host[:, s : 2 * s - 1], host[:, 2 * s - 1 :]
    T = torch.diag_embed(d) + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)
    theta, S = torch.linalg.eigh(T)
    idx = _wanted(s, k, which)
    est = beta_s.abs() * S[:, s - 1, :].abs()
    anorm = theta.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    met = (est[:, idx] <= tol * anorm).all(dim=1)
    open_ = _open_cluster(theta, s, k, which, tol * anorm)
    return _Check(theta, S, idx, met & ~open_, met & open_)


def _open_cluster(theta: Tensor, s: int, k: int, which: str, thr: Tensor) -> Tensor:
    """[P] bool: the wanted Ritz values hold a numerically repeated one (two within ``thr``)
    followed, further from that end of the spectrum, by wanted values outside its cluster.

    A single-vector Krylov space holds each distinct eigenvalue once in exact arithmetic; copies
    of a repeated one enter only through rounding or a breakdown's restart, one at a time, so
    when two copies are found more may be missing, and the wanted values past them may not be
    the operator's (a rank-deficient matrix's "SA" run reported 0, 0, 0, 1.0, 1.04 with every
    Ritz estimate converged, the 4th and 5th smallest eigenvalues being 0). Such a run is not
    converged until the copies fill the wanted values of that end, or the space is exhausted."""
    ends = []
    if which in ("LA", "both"):
        top = k if which == "LA" else k - k // 2
        ends.append(theta[:, s - top :].flip(1))          # from the largest inward
    if which in ("SA", "both"):
        ends.append(theta[:, : (k if which == "SA" else k // 2)])
    bad = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
    for vals in ends:
        if vals.shape[1] < 2:
            continue
        rep = (vals[:, 1:] - vals[:, :-1]).abs() <= thr
        bad |= ((rep.cumsum(1) > 0) & ~rep).any(1)
    return bad


def _cluster_note(theta: Tensor, held: Tensor, k: int, which: str, tol: float) -> str:
    """The note of a run stopped at max_steps with a repeated wanted eigenvalue (``held``)."""
    p = int(held.nonzero()[0, 0])
    s = theta.shape[1]
    vals = theta[p, _wanted(s, k, which)]
    thr = tol * float(theta[p].abs().max())
    rep = next(float(a) for i, a in enumerate(vals.tolist()) for b in vals.tolist()[i + 1:] if abs(a - b) <= thr)
    copies = int(((vals - rep).abs() <= thr).sum())
    where = f"problem {p}" + (f" (and {int(held.sum()) - 1} more)" if int(held.sum()) > 1 else "")
    return (f"{where}: the eigenvalue {rep:.6g} was found {copies} times among the wanted ones (within "
            f"tol * max|theta| = {thr:.3g}); a single-vector Krylov space cannot tell whether more copies "
            f"exist, so the wanted values past it are not certified: converged is False although every Ritz "
            f"estimate met tol. Asking for at most its copies (a smaller k) is certified; the values past a "
            f"repeated eigenvalue (a symmetry, a rank-deficient operator) need a block method or deflation")


def _ritz_vectors(V: Tensor, s: int, S: Tensor, dtype: torch.dtype) -> Tensor:
    """``X[p] = V[p, :s]^T S[p]`` ([P, n, k] in ``dtype``) for the basis ``V [P, slots, n]`` and
    ``S [P, s, k]`` float64, accumulated in float64 over chunks of columns of n, each chunk's
    float64 copy at most :data:`RITZ_CHUNK_BYTES` (a float64 copy of the whole basis would
    be twice the float32 basis: 79 GiB for resnet50)."""
    P, _, n = V.shape
    k = S.shape[-1]
    X = torch.empty(P, n, k, dtype=dtype, device=V.device)
    width = max(1, RITZ_CHUNK_BYTES // max(1, P * s * 8))
    for c in range(0, n, width):
        part = V[:, :s, c : c + width].double()
        X[:, c : c + width] = torch.einsum("psn,psk->pnk", part, S).to(dtype)
    return X


def eigsh(
    op,
    k: int = 6,
    which: str = "LA",
    tol: Optional[float] = None,
    max_steps: Optional[int] = None,
    seed: Optional[int] = 0,
    check_every: Optional[int] = None,
    memory_limit: Optional[int] = None,
) -> EigshResult:
    """k extreme eigenpairs of a symmetric operator, per problem of a batched operator.

    Lanczos with full reorthogonalisation (:func:`resgeom_fast.ops.lanczos_reorth`) from a Gaussian start vector, grown
    until the Ritz residual estimates ``|beta_s * S[s, i]|`` of the wanted pairs fall below
    ``tol * max|theta|`` for every problem, or ``max_steps`` is reached. Clustered but distinct
    eigenvalues are resolved; copies of an exactly repeated one enter the single-vector Krylov
    space only through rounding or a breakdown's restart, so a repeated wanted value followed by
    other wanted values leaves those uncertified: the run goes on and, if the copies do not fill
    the wanted values by ``max_steps``, reports ``converged=False`` with the reason in ``note``
    (docs/science.md, "Extreme eigenvalues").

    Args:
        op: symmetric LinearOperator (or dense symmetric tensor [*batch, n, n]).
        k: number of eigenpairs, 1 <= k <= n.
        which: "LA" (largest algebraic), "SA" (smallest) or "both".
        tol: relative residual tolerance; default 1e-10 (float64) or 1e-5 (float32).
        max_steps: Lanczos steps at most; default min(n, max(300, 20 k)).
        seed: seed of the start vector (on a CUDA operator drawn on the device, from a
            generator seeded from this seed: reproducible per device, see
            :func:`resgeom_fast.linalg._util.generator`).
        check_every: steps between convergence checks. Default (None): on CUDA 10 (a check
            is a host sync); on the CPU the check's cost decides (:func:`check_interval`):
            after every step while its small eigensolve (~s^3 for s steps) is cheap next to a
            step's reorthogonalisation (~s n), so the run stops at the first step that meets
            ``tol`` (the user FC ResNet's top-5 at tol 1e-4: 24 steps instead of 30), spacing
            out to every 10 steps as s^2 grows past n / 16. The steps, and so the result,
            depend only on the operator, the settings and the seed, never on timings.
        memory_limit: bytes the run may allocate (default: the free memory of the operator's
            device, see :mod:`resgeom_fast.linalg._memory`). The basis of ``max_steps`` vectors
            per problem is planned before it is allocated; when it does not fit,
            :class:`~resgeom_fast.linalg._memory.InsufficientMemoryError` names the bytes needed,
            the bytes available and the settings that would fit. The Ritz vectors are built in
            float64 chunks over n (no float64 copy of the basis).

    Host syncs: the Lanczos steps between two checks run without one (see
    :class:`~resgeom_fast.linalg.lanczos.Lanczos`); each check copies T (2 s numbers per problem)
    to the host in one transfer and solves its small dense eigenproblem there (LAPACK, float64),
    so the check costs one sync and no device eigensolver launch.
    """
    where = "eigsh"
    op = aslinearoperator(op, where=where)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"{where}: expected a square operator, got shape {op.shape}")
    if not op.symmetric:
        raise ValueError(
            f"{where}: expected a symmetric operator (symmetric=True), got a non-symmetric one; "
            "use randomized_svd for singular values"
        )
    n = op.shape[0]
    check_int(where, "k", k, 1, n, hint=f" (the operator dimension n = {n})")
    check_choice(where, "which", which, WHICH)
    if tol is None:
        tol = 1e-10 if op.dtype == torch.float64 else 1e-5
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{where}: expected tol a positive number, got {tol!r}")
    if max_steps is None:
        max_steps = min(n, max(300, 20 * k))
    check_int(where, "max_steps", max_steps, k)
    if check_every is not None:
        check_int(where, "check_every", check_every, 1)
    memory_limit = check_memory_limit(where, memory_limit)
    plan = plan_eigsh(n, op.batch_size, max_steps, k, op.dtype, op.device, memory_limit, where)

    gen = generator(seed, op)
    b = op.batch_size
    v0 = gaussian((b, n), gen, op.dtype, op.device)
    every = check_every if check_every is not None else MAX_CHECK_INTERVAL
    lz = Lanczos(op, v0, 1, max_steps, where, gen, sync_every=every)
    checks: dict = {}     # steps -> the check's result (the CPU's per-step checks, reused below)

    def check(lz: Lanczos) -> _Check:
        s = lz.steps
        if s not in checks:
            checks.clear()
            checks[s] = _check(lz, k, which, tol)
        return checks[s]

    until = None
    if check_every is None and op.device.type == "cpu":
        last = [0]

        def until(lz: Lanczos) -> bool:
            s = lz.steps
            if s < k or s - last[0] < check_interval(s, n):
                return False
            last[0] = s
            return bool(check(lz).conv.all())
    while True:
        s = lz.advance(every if lz.steps >= k else max(k, every), until=until)
        theta, S, idx, conv, held = check(lz)
        if bool(conv.all()) or s >= lz.max_steps:
            break

    evals = theta[:, idx].to(op.device)
    conv = conv.to(op.device)
    Sw = S[:, :, idx].to(op.device)
    release()   # the windows' freed heap goes back before the Ritz chunks are mapped (core/heap.py)
    X = _ritz_vectors(lz.V, s, Sw, op.dtype).reshape(*op.batch_shape, n, k)
    del lz   # the basis is no longer needed: free it before the residual products
    AX = apply_block(op, X, where, "when computing residuals")
    lam = evals.reshape(*op.batch_shape, 1, k)
    resid = torch.linalg.vector_norm((AX.double() - X.double() * lam), dim=-2)
    note = None
    if s >= n:  # the Krylov space is the whole space: T's eigenpairs are exact
        conv = torch.ones_like(conv)
    elif bool(held.any()):
        note = _cluster_note(theta, held, k, which, float(tol))
    return EigshResult(
        eigenvalues=evals.reshape(*op.batch_shape, k).to(op.dtype),
        eigenvectors=X,
        residuals=resid.to(op.dtype),
        converged=conv.reshape(op.batch_shape),
        steps=s,
        memory=plan,
        note=note,
    )
