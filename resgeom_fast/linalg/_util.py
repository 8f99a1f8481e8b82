"""Shared helpers of the linalg algorithms: validation, random probes, flat batched application."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from resgeom_fast.core import checks, distributed
from resgeom_fast.linalg.operator import LinearOperator, NonFiniteError, describe_non_finite


def check_int(where: str, name: str, value, lo: int, hi: Optional[int] = None, hint: str = "") -> int:
    """Validate an integer argument through :func:`resgeom_fast.core.checks.check_int`; the error
    names the argument and the allowed range (``"<where>: expected <name> >= lo<hint>, got v"``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise checks.type_error(where, name, "an int", value)
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    return checks.check_int(where, name, value, minimum=lo, maximum=hi, expected=rng + hint)


def check_choice(where: str, name: str, value, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed`` (:func:`resgeom_fast.core.checks.check_choice`)."""
    return checks.check_choice(where, name, value, allowed)


def generator(seed: Optional[int], op: Optional[LinearOperator] = None) -> torch.Generator:
    """The CPU generator of one call (seeded, or from OS entropy for ``seed=None``).

    Data-parallel operators (``op.distributed`` set: the curvature operators built with
    ``distributed=``) run every algorithm replicated on every rank, which must draw the same
    numbers: for ``seed=None`` the seed is then drawn from OS entropy on rank 0 and broadcast
    (a collective: every rank calls the algorithm, as it must anyway). A given seed is used as
    it is on every rank.

    Every random draw of the call starts from it: on the CPU the probes are drawn from it
    directly; on another device (CUDA) each draw takes one 63-bit seed from it (a host draw, no
    device sync) for a generator on that device, and the probes are drawn there (see
    :func:`device_generator`). A seed therefore reproduces a run on a given device; the CPU and
    CUDA streams differ (as they would for any on-device draw).
    """
    g = torch.Generator()
    if seed is None and getattr(op, "distributed", None) and distributed.is_initialized():
        seed = distributed.broadcast_object(int(torch.Generator().seed()))   # rank 0's entropy
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def device_generator(gen: torch.Generator, device) -> torch.Generator:
    """A generator on ``device`` for one draw: ``gen`` itself if it lives on that device type,
    else a new one seeded by a 63-bit integer drawn from ``gen`` on the host (no device sync).

    Drawing probes on the operator's device avoids drawing n x p values on the CPU and copying
    them (seconds for resnet-sized probes); the CPU stream is unchanged (CPU operators draw from
    ``gen`` exactly as before).
    """
    device = torch.device(device)
    if gen.device.type == device.type:
        return gen
    seed = int(torch.randint(0, 2**63 - 1, (), generator=gen, device=gen.device))
    return torch.Generator(device=device).manual_seed(seed)


def rademacher(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """Random signs, [*shape] in ``dtype`` on ``device`` (drawn there; :func:`device_generator`)."""
    g = device_generator(gen, device)
    r = torch.randint(0, 2, tuple(shape), generator=g, dtype=torch.int8, device=g.device)
    return (r.to(dtype) * 2 - 1).to(device)


def gaussian(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """Standard normal values drawn in float64 and rounded to ``dtype`` (so float32 and float64
    runs share their probes), [*shape] on ``device`` (drawn there; :func:`device_generator`)."""
    g = device_generator(gen, device)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64, device=g.device)
    return x.to(device=device, dtype=dtype)


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


def apply_flat(op: LinearOperator, V: Tensor, p: int, where: str, what: str = "",
               check: bool = True, bufs: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Apply ``op`` to ``p`` vectors per problem stored flat as ``V [b * p, n]``.

    Row ``i * p + j`` of V is vector j of problem i (problems in ``op.batch_shape`` order).
    Returns ``[b * p, m]`` in the same layout, after checking the output is finite (one host
    sync; ``check=False`` leaves the check to the caller, e.g. on device flags read in batches).
    ``bufs``: ``(X [*batch, n, p], Y [b * p, m])`` contiguous buffers the caller owns, used for
    the two layout copies when they are needed (p > 1) instead of fresh allocations; the result
    is then ``bufs[1]``, overwritten by the next call.
    """
    n, m = op.shape[1], op.shape[0]
    X = V.reshape(*op.batch_shape, p, n).transpose(-1, -2)
    if not X.is_contiguous():
        X = X.contiguous() if bufs is None else bufs[0].copy_(X)
    Y = op.matmat(X)
    if check:
        check_finite(Y, where, what)
    Yt = Y.transpose(-1, -2)
    if bufs is not None and not Yt.is_contiguous():
        bufs[1].view(*op.batch_shape, p, m).copy_(Yt)
        return bufs[1]
    return Yt.reshape(V.shape[0], m)


def apply_block(op: LinearOperator, X: Tensor, where: str, what: str = "", transpose: bool = False) -> Tensor:
    """``op.matmat(X)`` (or ``op.rmatmat``) with the finite-output check."""
    Y = op.rmatmat(X) if transpose else op.matmat(X)
    return check_finite(Y, where, what)
