"""Probe-parallel runs of the stochastic algorithms (``distributed="probes"`` of
:func:`~resgeom_fast.linalg.slq_density` and :func:`~resgeom_fast.linalg.trace`; docs/distributed.md).

Every rank of an initialised torch.distributed group holds the *whole* operator (its own
single-process operator on the full data: the data fit on each rank) and runs a contiguous share
of the probes (:func:`resgeom_fast.core.distributed.shard_sizes`: the first ``probes % world``
ranks take one more; ranks beyond the probe count take none). The probes are drawn exactly as one
process draws them (all of them, from the same seed, on every rank; each rank keeps its share),
so after the one gather at the end every rank holds the single-process result, up to the
rounding of the batched products.

- :func:`check_probe_mode` -- validates ``distributed`` (None or "probes") against the operator.
- :func:`agreed_seed` -- ``seed=None`` drawn on rank 0 and broadcast (every rank draws the same probes).
- :func:`probe_share` -- this rank's ``(offset, count)`` of the probes and every rank's count.
- :func:`check_same_operator` -- one product of a fixed vector on every rank, fingerprints compared:
  a rank whose operator differs (other parameters, other data) raises
  :class:`~resgeom_fast.core.distributed.DivergentRanksError` on every rank.
- :func:`draw_signs`, :func:`to_signs`, :func:`rademacher_share` -- the single-process Rademacher
  draw as int8 (1 byte per entry), and the +-1 values of this rank's share of it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from resgeom_fast.core import distributed as rdist
from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.linalg._util import check_choice, device_generator
from resgeom_fast.linalg.operator import LinearOperator

PROBE_MODES = ("probes",)
"""``distributed=`` of the probe-parallel algorithms (None: replicated / one process)."""

#: tolerance of :func:`check_same_operator`, in ulps of the fingerprint's scale (the ranks' product
#: methods may differ: an auto-tuned operator times its methods on each rank)
_SAME_OPERATOR_ULPS = 1000


def check_probe_mode(where: str, distributed: Optional[str], op: LinearOperator) -> bool:
    """Whether ``distributed`` asks for a probe-parallel run; errors name ``where``.

    ``"probes"`` needs an initialised process group and a single-process operator on every rank
    (``op.distributed`` unset): the products of a data-parallel operator are collectives, which
    ranks applying *different* probes cannot share (use ``distributed=None`` with it: the
    algorithm then runs replicated)."""
    if distributed is None:
        return False
    check_choice(where, "distributed", distributed, PROBE_MODES)
    if not rdist.is_initialized():
        raise ArgumentValueError(
            f"{where}: expected an initialised torch.distributed process group for distributed='probes' "
            f"(torch.distributed.init_process_group, e.g. under torchrun), got none; pass distributed=None")
    mode = getattr(op, "distributed", None)
    if mode:
        raise ArgumentValueError(
            f"{where}: expected a single-process operator (built with distributed=None, the full data on every "
            f"rank) for distributed='probes', got a data-parallel operator (distributed={mode!r}) whose products "
            f"are collectives; pass distributed=None to run the algorithm replicated on it")
    return True


def agreed_seed(where: str, seed: Optional[int]) -> Optional[int]:
    """``seed``, or for None one drawn from OS entropy on rank 0 and broadcast (a collective)."""
    if seed is not None:
        return seed
    return int(rdist.broadcast_object(int(torch.Generator().seed()), fn=where))


def probe_share(probes: int) -> tuple[int, int, list[int]]:
    """``(offset, count, sizes)``: this rank's contiguous share of ``probes`` probes and every
    rank's count (:func:`resgeom_fast.core.distributed.shard_sizes`)."""
    sizes = rdist.shard_sizes(probes, rdist.world_size())
    r = rdist.rank()
    return sum(sizes[:r]), sizes[r], sizes


def check_same_operator(where: str, op: LinearOperator) -> None:
    """Collective: apply ``op`` to one fixed Rademacher vector per problem on every rank and compare
    a fingerprint of the products (:func:`resgeom_fast.core.distributed.fingerprint`) with rank
    0's; ranks off by more than :data:`_SAME_OPERATOR_ULPS` ulps of its scale raise
    :class:`~resgeom_fast.core.distributed.DivergentRanksError` on EVERY rank (a rank that built
    its operator from other parameters or data would otherwise add its own spectrum's probes
    silently). A failure of the product on one rank is raised on every rank. Costs one product
    per rank."""
    w, r = rdist.world_size(), rdist.rank()
    g = torch.Generator().manual_seed(0x9A0BE)
    x = torch.randint(0, 2, (*op.batch_shape, op.shape[1], 1), generator=g, dtype=torch.int8)
    x = (x.to(op.dtype) * 2 - 1).to(op.device)
    row = torch.zeros(3, w, dtype=torch.float64, device=op.device)
    exc: Optional[BaseException] = None
    try:
        y = op.matmat(x)
        fp, scale = rdist.fingerprint([y.reshape(1, -1)], op.device)
        row[0, r], row[1, r] = fp[0], _SAME_OPERATOR_ULPS * torch.finfo(op.dtype).eps * scale[0]
    except Exception as e:  # raised on every rank below
        exc = e
        row[2, r] = 1.0
    (row,) = rdist.all_reduce_sum([row], fn=where)
    vals = row.tolist()
    if any(vals[2]):
        rdist.raise_together(where, exc)
    tol = max(vals[1][0], torch.finfo(torch.float64).tiny)
    bad = [q for q in range(w) if not abs(vals[0][q] - vals[0][0]) <= tol]
    if bad:
        raise rdist.DivergentRanksError(
            f"{where}: expected the same operator on every rank for distributed='probes' (each rank applies its "
            f"share of the probes to its own copy), got other products on rank(s) {bad} than on rank 0; build it "
            f"from the same model parameters and the same full data on every rank")


def draw_signs(shape: Sequence[int], gen: torch.Generator, device) -> Tensor:
    """The int8 draw of :func:`~resgeom_fast.linalg._util.rademacher` (values 0 / 1, 1 byte
    each; the same generator stream): :func:`to_signs` of any part of it gives the part of the
    Rademacher probes one process draws."""
    g = device_generator(gen, device)
    return torch.randint(0, 2, tuple(shape), generator=g, dtype=torch.int8, device=g.device)


def to_signs(r: Tensor, dtype: torch.dtype, device) -> Tensor:
    """The +-1 values of (a part of) a :func:`draw_signs` draw, in ``dtype`` on ``device``."""
    return (r.to(dtype) * 2 - 1).to(device)


def rademacher_share(shape: Sequence[int], dim: int, start: int, count: int, gen: torch.Generator,
                     dtype: torch.dtype, device) -> Tensor:
    """``rademacher(shape, gen, dtype, device).narrow(dim, start, count)`` without converting the
    whole draw: the signs of all ``shape`` are drawn as int8 (:func:`draw_signs`), so every rank
    draws the single-process probes, and only this rank's share becomes ``dtype`` values."""
    return to_signs(draw_signs(shape, gen, device).narrow(dim, start, count), dtype, device)
