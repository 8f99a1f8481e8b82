"""torch.distributed plumbing shared by the data-parallel operators (the bottom floor: torch and
the standard library only).

- :func:`is_initialized`, :func:`rank`, :func:`world_size` -- the default process group (rank 0
  of a world of 1 when none is initialised).
- :func:`shard` -- this rank's share of the data: a deterministic, DistributedSampler-style split
  that allows uneven shares and empty ranks and never pads or repeats a sample, so that a mean
  over the shards weighted by the *global* sample count equals the single-process mean.
- :func:`all_reduce_sum` -- the sum over ranks of a list of tensors in ONE collective (flattened
  into one buffer, float64 by default, unflattened).
- :func:`broadcast_object` -- a small picklable value decided on one rank (rank 0), for all.
- :func:`raise_together` -- turns an exception raised on some ranks into the same exception on
  every rank (one small collective), so a local failure never leaves the other ranks waiting.
- :class:`RankFailureError` -- what these collectives raise when the collective itself fails (a
  rank died: its connections closed; a rank hangs: the group's timeout expired), naming the
  ranks that did not report the failure through the group's store within
  :data:`REPORT_GRACE_S` seconds.

Every function here is a *collective* when a process group is initialised: every rank of the
group must call it, in the same order. They use the default group and its timeout (the
``timeout=`` given to ``torch.distributed.init_process_group``): a rank that never arrives makes
the others raise when that timeout expires, a rank that dies makes them raise at once (gloo,
NCCL with async error handling), both as :class:`RankFailureError`. Transport is torch.distributed's (gloo on CPUs, NCCL
on GPUs); nothing here opens sockets or files of its own.
"""
from __future__ import annotations

import contextlib
import itertools
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_int

__all__ = ["REPORT_GRACE_S", "DivergentRanksError", "RankFailureError", "all_gather_object", "all_reduce_sum",
           "broadcast_object", "is_initialized", "portable", "raise_first", "raise_together", "rank", "shard", "shard_sizes",
           "world_size"]


class DivergentRanksError(RuntimeError):
    """The ranks of a data-parallel operator were asked for products of different vectors (a
    replicated algorithm drew other random numbers on some rank, or the caller passed
    rank-dependent vectors): the summed products would mean nothing, so every rank raises."""


class RankFailureError(RuntimeError):
    """A collective of a data-parallel computation failed: another rank died (its connections
    closed), hangs or is too slow (the process group's timeout expired), or the backend failed.
    The message names this rank, the ranks that did not report the failure within
    :data:`REPORT_GRACE_S` seconds, and torch.distributed's own error (also the ``__cause__``)."""


REPORT_GRACE_S = 10.0
"""Seconds a rank whose collective failed waits for the other ranks to report the same failure
through the process group's store; those that do not are named in :class:`RankFailureError`."""

# The number of collectives this process has entered through this module: every rank enters the
# same collectives in the same order, so the count names one collective on every rank (the key
# under which the ranks report a failure of it). Process-wide, like torch.distributed's default
# group itself.
_SEQUENCE = itertools.count()


def _failure(fn: str, seq: int, exc: BaseException) -> RankFailureError:
    """Report the failure of collective ``seq`` in the group's store, wait up to
    :data:`REPORT_GRACE_S` for the other ranks' reports, and name those that did not report."""
    r, w = rank(), world_size()
    head = f"{fn}: a collective failed on rank {r} of {w}"
    try:
        store = dist.distributed_c10d._get_default_store()    # the store of init_process_group (c10d)
        keys = [f"resgeom_fast/failed/{seq}/{q}" for q in range(w)]
        store.set(keys[r], "1")
        deadline = time.monotonic() + REPORT_GRACE_S
        while True:
            missing = [q for q in range(w) if not store.check([keys[q]])]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except Exception as store_exc:   # the store itself is gone (e.g. it lived on the dead rank)
        return RankFailureError(f"{head}; the ranks that failed could not be identified (the group's store: "
                                f"{type(store_exc).__name__}: {store_exc}); torch.distributed: {exc}")
    if missing:
        who = (f"rank(s) {missing} did not report it within {REPORT_GRACE_S:g} s (died, hang, or are still "
               f"waiting in an earlier step)")
    else:
        who = "every rank reported it (a backend or network failure)"
    return RankFailureError(f"{head}: {who}; torch.distributed: {exc}")


@contextlib.contextmanager
def _collective(fn: str) -> Iterator[None]:
    """Run one collective; its failure (a RuntimeError of torch.distributed) becomes a
    :class:`RankFailureError` naming the ranks that did not report it."""
    seq = next(_SEQUENCE)
    try:
        yield
    except RuntimeError as exc:
        raise _failure(fn, seq, exc) from exc


def is_initialized() -> bool:
    """Whether torch.distributed is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 when none is initialised)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes of the default group (1 when none is initialised)."""
    return dist.get_world_size() if is_initialized() else 1


def _rank_world(fn: str, rank_: Optional[int], world: Optional[int]) -> tuple[int, int]:
    world = world_size() if world is None else check_int(fn, "world", world, minimum=1)
    rank_ = rank() if rank_ is None else check_int(fn, "rank", rank_, minimum=0)
    if rank_ >= world:
        raise ArgumentValueError(f"{fn}: expected rank in [0, {world - 1}] (world {world}), got {rank_}")
    return rank_, world


def shard_sizes(n: int, world: int) -> list[int]:
    """Samples per rank of a contiguous split of ``n`` samples over ``world`` ranks: the first
    ``n % world`` ranks take one more (sizes differ by at most 1; ranks >= n get 0)."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


class _EveryNth:
    """Re-iterable view of an iterable of batches: batches ``rank, rank + world, ...`` of every pass."""

    def __init__(self, data: Iterable[Any], rank_: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank_, world

    def __iter__(self) -> Iterator[Any]:
        for i, b in enumerate(self.data):
            if i % self.world == self.rank:
                yield b


def shard(data: Any, rank: Optional[int] = None, world: Optional[int] = None) -> Any:
    """This rank's share of ``data``; every sample lands on exactly one rank (no padding, no
    duplicates), so the shares of all ranks together are ``data``.

    Args:
        data: one of
            - an ``(x, y)`` batch (x a tensor [n, ...], y a tensor [n, ...] or anything else,
              kept as is): a contiguous block of samples, views of x and y (:func:`shard_sizes`:
              the first ``n % world`` ranks take one more sample);
            - a map-style ``torch.utils.data.Dataset``: a ``Subset`` of indices
              ``rank, rank + world, ...`` (DistributedSampler's order with ``shuffle=False``,
              without its padding);
            - a list / tuple of batches: batches ``rank, rank + world, ...`` (a list; whole batches,
              so batch statistics of BatchNorm are those of the single-process batches);
            - any other iterable of batches (a DataLoader): a re-iterable view yielding batches
              ``rank, rank + world, ...`` of every pass (every rank still *reads* every batch:
              pass a Dataset, or each rank's own loader, when loading costs).
        rank, world: default: those of the initialised process group (0 and 1 without one).

    Returns:
        the share, of the same kind as ``data``; possibly empty (an ``(x, y)`` batch with 0 rows,
        an empty Subset or list) when there are fewer samples or batches than ranks.

    Raises:
        ArgumentTypeError: ``data`` is none of these; ArgumentValueError: a bad rank / world.
    """
    fn = "shard"
    r, w = _rank_world(fn, rank, world)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if x.dim() == 0:
            raise ArgumentValueError(f"{fn}: expected x with a batch dimension, got a 0-d tensor")
        sizes = shard_sizes(int(x.shape[0]), w)
        a = sum(sizes[:r])
        b = a + sizes[r]
        return x[a:b], (y[a:b] if isinstance(y, Tensor) else y)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return Subset(data, list(range(r, len(data), w)))
    if isinstance(data, (tuple, list)):
        return list(data[r::w])
    if isinstance(data, Iterator):
        raise ArgumentTypeError(f"{fn}: expected data that can be read again (a Dataset, a DataLoader, a list of "
                                f"batches or one (x, y) batch), got a one-shot iterator {type(data).__name__}")
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        return _EveryNth(data, r, w)
    raise ArgumentTypeError(f"{fn}: expected data an (x, y) batch, a map-style Dataset or an iterable of (x, y) "
                            f"batches, got {type(data).__name__}")


def all_reduce_sum(tensors: Sequence[Tensor], dtype: Optional[torch.dtype] = torch.float64, *,
                   fn: str = "all_reduce_sum") -> list[Tensor]:
    """The sum over ranks of every tensor of ``tensors``, in ONE all_reduce.

    The tensors (any shapes, one device) are flattened into one buffer of ``dtype`` (None: the
    dtype of the first tensor), summed by ``torch.distributed.all_reduce`` and cut back into
    tensors of the original shapes, dtypes and device. Without an initialised process group the
    sum over the one process is returned (copies of the inputs in ``dtype`` precision). Every
    rank must pass tensors of the same shapes in the same order. ``fn``: the caller, named by a
    :class:`RankFailureError`.

    Returns:
        new tensors (the inputs are not modified); ``[]`` for an empty list (no collective).
    """
    tensors = list(tensors)
    if not tensors:
        return []
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"all_reduce_sum: expected tensors[{i}] a torch.Tensor, got {type(t).__name__}")
    buf_dtype = tensors[0].dtype if dtype is None else dtype
    buf = torch.cat([t.detach().reshape(-1).to(buf_dtype) for t in tensors])
    if is_initialized():
        with _collective(fn):
            dist.all_reduce(buf)
    out, o = [], 0
    for t in tensors:
        n = t.numel()
        out.append(buf[o:o + n].reshape(t.shape).to(t.dtype))
        o += n
    return out


def broadcast_object(obj: Any, src: int = 0, *, fn: str = "broadcast_object") -> Any:
    """``obj`` as given on rank ``src`` (default 0), on every rank: a small picklable decision
    (``torch.distributed.broadcast_object_list``). Without a process group: ``obj``. ``fn``: the
    caller, named by a :class:`RankFailureError`."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    with _collective(fn):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, *, fn: str = "all_gather_object") -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (one ``all_gather_object``);
    ``[obj]`` without a process group. ``fn``: the caller, named by a :class:`RankFailureError`."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective(fn):
        dist.all_gather_object(out, obj)
    return out


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def raise_together(fn: str, exc: Optional[BaseException]) -> None:
    """Collective: raise on every rank if ``exc`` is not None on any rank.

    Each rank passes the exception it caught in a local step (None: the step succeeded); one
    ``all_gather_object`` shares them. When any rank failed, the lowest failing rank's exception
    is raised everywhere: that rank re-raises its own (with its traceback), the others raise a
    copy of it (same type and message, when it pickles; else a RuntimeError) with a note
    ``"<fn>: raised on rank r of world"``, chained from nothing. Without a process group:
    raises ``exc`` if given.
    """
    if not is_initialized():
        if exc is not None:
            raise exc
        return
    raise_first(fn, all_gather_object(None if exc is None else portable(exc), fn=fn), exc)


def raise_first(fn: str, errors: Sequence[Optional[BaseException]], mine: Optional[BaseException]) -> None:
    """Given every rank's exception (or None), in rank order, as gathered by
    :func:`all_gather_object`: raise the lowest failing rank's on this rank -- that rank re-raises
    its own ``mine``, the others the gathered copy noted ``"<fn>: raised on rank r of world"``;
    return when no rank failed."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    r, e = failed[0]
    if r == rank() and mine is not None:
        raise mine
    e.add_note(f"{fn}: raised on rank {r} of {world_size()}")
    raise e
