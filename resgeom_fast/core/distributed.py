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
- :func:`gather_shares` -- every rank's share (rows along one dimension) of tensors, concatenated
  in rank order on every rank in ONE all_reduce that also carries a failure flag per rank.
- :func:`fingerprint` / :func:`check_same_parameters` -- a cheap fingerprint of tensors (up to
  :data:`FINGERPRINT_ENTRIES` evenly spaced entries each) and the collective check that every
  rank holds rank 0's parameters (:class:`DivergentRanksError` on every rank otherwise).
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

__all__ = ["FINGERPRINT_ENTRIES", "REPORT_GRACE_S", "DivergentRanksError", "RankFailureError", "all_gather_object",
           "all_reduce_sum", "broadcast_object", "comm_device", "check_same_parameters", "fingerprint", "fixed_probe", "gather_shares",
           "is_initialized", "portable", "raise_first", "raise_together", "rank", "shard", "shard_sizes",
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


def comm_device(device: torch.device) -> torch.device:
    """The device a collective of the initialised group runs a buffer of ``device`` on: the
    current CUDA device for a CPU buffer under a pure NCCL group (it reduces CUDA tensors only),
    else ``device`` itself (gloo; "cpu:gloo,cuda:nccl" routes each device to its backend)."""
    if torch.device(device).type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def all_reduce_sum(tensors: Sequence[Tensor], dtype: Optional[torch.dtype] = torch.float64, *,
                   fn: str = "all_reduce_sum") -> list[Tensor]:
    """The sum over ranks of every tensor of ``tensors``, in ONE all_reduce.

    The tensors (any shapes, one device) are flattened into one buffer of ``dtype`` (None: the
    dtype of the first tensor), summed by ``torch.distributed.all_reduce`` and cut back into
    tensors of the original shapes, dtypes and device. Without an initialised process group the
    sum over the one process is returned (copies of the inputs in ``dtype`` precision). Every
    rank must pass tensors of the same shapes in the same order. Under a pure NCCL group
    (``init_process_group("nccl")``) a CPU buffer goes through the current CUDA device and back
    (:func:`comm_device`). ``fn``: the caller, named by a :class:`RankFailureError`.

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
        home = buf.device
        buf = buf.to(comm_device(home))
        with _collective(fn):
            dist.all_reduce(buf)
        buf = buf.to(home)
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


def gather_shares(fn: str, shares: Sequence[Tensor], sizes: Sequence[int], dim: int = 0,
                  exc: Optional[BaseException] = None) -> list[Tensor]:
    """Collective: the concatenation along ``dim`` of every rank's share of each tensor, on every
    rank, in ONE all_reduce (float64 buffer, zeros outside a rank's rows: every entry is one
    rank's value plus zeros, so the gather is exact for float32 / float64 / integer / bool values
    that float64 holds exactly).

    Args:
        fn: the caller, named by the errors.
        shares: this rank's tensors; ``shares[i].shape[dim] == sizes[rank]`` and the other
            dimensions, the dtypes and the devices the same on every rank. A rank whose local step
            failed passes zeros of its share's shapes and the exception as ``exc``.
        sizes: the rows of every rank along ``dim`` (the same list on every rank; 0 for a rank
            without a share).
        dim: the dimension the shares are cut along (negative counts from the end).
        exc: the exception of this rank's local step, or None. The buffer carries one failure
            flag per rank; when any rank failed, the lowest failing rank's exception is raised on
            every rank (:func:`raise_together`, one more collective on the failure path only).

    Returns:
        the full tensors (``shape[dim] == sum(sizes)``) in the shares' dtypes and device. Without
        a process group: ``shares`` themselves (``exc`` raised if given).
    """
    shares = list(shares)
    if not is_initialized():
        if exc is not None:
            raise exc
        return shares
    r, w = rank(), world_size()
    if len(sizes) != w:
        raise ArgumentValueError(f"{fn}: expected sizes of the {w} ranks, got {len(sizes)} sizes")
    offset, total = sum(sizes[:r]), sum(sizes)
    full: list[Tensor] = []
    for i, t in enumerate(shares):
        d = dim % t.dim()
        if exc is None and t.shape[d] != sizes[r]:
            raise ArgumentValueError(f"{fn}: expected shares[{i}] with {sizes[r]} rows along dim {dim} (this rank's "
                                     f"size), got shape {tuple(t.shape)}")
        shape = list(t.shape)
        shape[d] = total
        buf = t.new_zeros(shape)
        if exc is None and sizes[r]:
            buf.narrow(d, offset, sizes[r]).copy_(t)
        full.append(buf)
    device = shares[0].device if shares else torch.device("cpu")
    flags = torch.zeros(w, dtype=torch.float64, device=device)
    flags[r] = 1.0 if exc is not None else 0.0
    *out, flags = all_reduce_sum([*full, flags], fn=fn)
    if bool((flags != 0).any()):
        raise_together(fn, exc)
        raise RuntimeError(f"{fn}: a rank reported a failure but raised no exception")
    return out


#: entries per tensor that enter :func:`fingerprint` (evenly spaced)
FINGERPRINT_ENTRIES = 1024
_FP_PROBES: dict[tuple[int, str, int], Tensor] = {}


def fixed_probe(d: int, device: torch.device, salt: int) -> Tensor:
    """A fixed pseudo-random float64 vector of length d (the same in every process)."""
    key = (d, str(device), salt)
    if key not in _FP_PROBES:
        g = torch.Generator().manual_seed(0x5EED + salt)
        _FP_PROBES[key] = torch.randn(d, generator=g, dtype=torch.float64).to(device)
    return _FP_PROBES[key]


def fingerprint(mats: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per row of the ``[k, n_j]`` matrices ``mats``: ``sum_j <row, probe_j>`` over at most
    :data:`FINGERPRINT_ENTRIES` evenly spaced entries of each (probe_j a fixed float64 Gaussian
    vector, the same in every process), and the scale ``sum_j |row| |probe_j|`` of its round-off:
    float64 [k] each, on ``device``; no host sync. Equal inputs give equal fingerprints on every
    rank. (Also the operators' own parameter and vector checks, ``operators/curvature.py``.)"""
    k = mats[0].shape[0]
    fp = torch.zeros(k, dtype=torch.float64, device=device)
    scale = torch.zeros(k, dtype=torch.float64, device=device)
    for j, flat in enumerate(mats):
        flat = flat[:, ::max(1, -(-flat.shape[1] // FINGERPRINT_ENTRIES))]
        probe = fixed_probe(flat.shape[1], device, 7 + j)
        fp += (flat @ probe.to(flat.dtype)).double()
        scale += torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64) * probe.norm()
    return fp, scale


def check_same_parameters(fn: str, tensors: Iterable[Tensor]) -> None:
    """Collective: raise :class:`DivergentRanksError` on EVERY rank when some rank's ``tensors``
    (a model's parameters, in the same order on every rank) differ from rank 0's.

    Compares a :func:`fingerprint` of every tensor (up to :data:`FINGERPRINT_ENTRIES` evenly
    spaced entries each: a check against a rank that loaded another checkpoint or seed, not a
    proof of equality), plus the number of tensors and entries, in ONE all_reduce; ranks whose
    fingerprint is off rank 0's by more than 1000 ulps of the fingerprint's scale are named.
    Without a process group (or a world of 1): nothing to compare.
    """
    tensors = [t.detach() for t in tensors]
    if not is_initialized() or world_size() == 1:
        return
    w, r = world_size(), rank()
    device = tensors[0].device if tensors else torch.device("cpu")
    row = torch.zeros(4, w, dtype=torch.float64, device=device)
    if tensors:
        fp, scale = fingerprint([t.reshape(1, -1) for t in tensors if t.numel()] or [tensors[0].new_zeros(1, 1)], device)
        row[0, r] = fp[0]
        eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in tensors)
        row[3, r] = 1000 * eps * scale[0]
    row[1, r] = len(tensors)
    row[2, r] = sum(t.numel() for t in tensors)
    (row,) = all_reduce_sum([row], fn=fn)
    vals = row.tolist()
    tol = max(vals[3][0], torch.finfo(torch.float64).tiny)     # rank 0's: the same decision on every rank
    bad = [q for q in range(w) if abs(vals[0][q] - vals[0][0]) > tol or vals[1][q] != vals[1][0]
           or vals[2][q] != vals[2][0]]
    if bad:
        raise DivergentRanksError(
            f"{fn}: expected the same model parameters on every rank (the ranks' results are combined), got "
            f"other parameters on rank(s) {bad} than on rank 0; load the same checkpoint or seed on every rank")
