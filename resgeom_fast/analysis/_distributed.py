"""Data-parallel plumbing of the streaming analyses (collapse, singularities) and of the
sample-parallel residual alignment (docs/distributed.md, issue 16).

- :func:`check_mode` -- ``distributed=`` of an analysis: None, ``"split"`` (every rank passes the
  full data; the rank's share is taken with :func:`resgeom_fast.core.distributed.shard`) or
  ``"sharded"`` (every rank passes its own share, possibly empty).
- :func:`local_batches` -- this rank's validated ``(x, y)`` batches (possibly none).
- :func:`gather_objects` -- one small picklable value per rank, on every rank (one collective).
- :func:`check_model` -- the model's parameters and floating buffers equal to rank 0's on every
  rank (:class:`~resgeom_fast.core.distributed.DivergentRanksError` on every rank otherwise).
- :func:`sync_failure` -- after a local step whose failure flag travelled in an all_reduce, raise
  the failing rank's exception on every rank.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from resgeom_fast.core import distributed as rdist
from resgeom_fast.core.distributed import raise_first
from resgeom_fast.core.checks import ArgumentValueError
# the module's collective guard (failures become RankFailureError naming the silent ranks); no
# public all_gather_object exists in core.distributed yet
from resgeom_fast.core.modules import data_source, is_batch, is_map_dataset
from resgeom_fast.operators.curvature import check_distributed

from ._common import batches

__all__ = ["check_mode", "check_model", "gather_objects", "local_batches", "portable", "raise_first", "sync_failure"]


def check_mode(where: str, distributed: Optional[str]) -> Optional[str]:
    """``distributed`` if None, or ``"split"`` / ``"sharded"`` with an initialised process group."""
    return check_distributed(where, distributed)


def check_model(where: str, model: nn.Module) -> None:
    """Collective: raise :class:`~resgeom_fast.core.distributed.DivergentRanksError` on every rank
    when the model's parameters or floating-point buffers (BatchNorm statistics) on some rank
    differ from rank 0's (:func:`resgeom_fast.core.distributed.check_same_parameters`: a
    fingerprint of up to 1024 evenly spaced entries per tensor, the check the curvature operators
    make at construction). The ranks' statistics are combined: a rank with another model would
    change the result silently."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    rdist.check_same_parameters(where, tensors)


def local_share(where: str, data: Any, distributed: str, split: str = "train") -> Any:
    """This rank's share of ``data``: ``data`` itself (``"sharded"``) or its shard (``"split"``: a
    torch map-style Dataset by index ``rank::world``, anything else read by
    :func:`~resgeom_fast.core.modules.data_source` -- one ``(x, y)`` batch or a resgeom_fast
    Dataset's split in contiguous blocks, a list of batches / DataLoader by batch ``rank::world``)."""
    if distributed != "split":
        return data
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        # each rank would take batches rank::world of its own permutation: samples counted twice
        # or never whenever the ranks' random states differ
        raise ArgumentValueError(f"{where}: expected data that every rank reads in the same order for "
                                 f"distributed='split', got a shuffling DataLoader; pass its Dataset, a loader "
                                 f"with shuffle=False, or each rank's own share with distributed='sharded'")
    return rdist.shard(data if is_map_dataset(data) else data_source(where, data, split=split))


def local_batches(where: str, data: Any, distributed: str, device: Optional[torch.device] = None,
                  dtype: Optional[torch.dtype] = None, split: str = "train") -> Iterator[tuple[Tensor, Any]]:
    """The validated ``(x, y)`` batches of this rank's share (none for an empty share; batches
    with no rows are skipped). Each batch is checked as :func:`~resgeom_fast.analysis._common.batches`
    checks it (device, dtype, rows of y)."""
    share = local_share(where, data, distributed, split)
    src = data_source(where, share, split=split)
    for raw in ([src] if is_batch(src) else src):
        if is_batch(raw) and raw[0].dim() >= 1 and raw[0].shape[0] == 0:
            continue
        yield from batches(where, raw, device, dtype)


def gather_objects(where: str, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``all_gather_object``, one collective);
    ``[obj]`` without a process group. ``where`` names the caller in a RankFailureError."""
    return rdist.all_gather_object(obj, fn=where)


def portable(exc: Optional[BaseException]) -> Optional[BaseException]:
    """``exc`` if it pickles (to travel in :func:`gather_objects`), else a RuntimeError with its text."""
    return None if exc is None else rdist.portable(exc)


def sync_failure(where: str, failed_anywhere: bool, exc: Optional[BaseException]) -> None:
    """After an all_reduce that carried every rank's failure flag: when some rank failed, share the
    exceptions (one more collective, on the failure path only) and raise on every rank."""
    if failed_anywhere:
        rdist.raise_together(where, exc)
        # a flag without an exception cannot happen; be loud rather than continue on partial sums
        raise RuntimeError(f"{where}: a rank reported a failure but raised no exception")
