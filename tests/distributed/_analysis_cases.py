"""The data-parallel analyses' cases (issue 16): collapse, singularities and residual alignment
on small float64 models, with the data of :func:`tests.distributed._cases.case_data` (a Dataset
split evenly, one batch split unevenly, a DataLoader leaving the last rank empty, the caller's own
shares with an empty last rank).

The same :func:`compute_analyses` runs in every worker (``distributed=True``) and in the test
process (the single-process ground truth on the full data), so both compute the same quantities.
Results are the analyses' ``to_dict()`` (plain JSON-friendly Python).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from resgeom_fast.analysis.alignment import residual_alignment
from resgeom_fast.analysis.collapse import collapse
from resgeom_fast.analysis.singularities import singularities
from resgeom_fast.core import distributed as rdist
from torch.utils.data import DataLoader, TensorDataset

from resgeom_fast.models import FCResNet
from tests.distributed._cases import CASES, case_data, conv_model, fc_model
from tests.operators._operator_nets import randomise_bn

__all__ = ["CASES", "compute_analyses", "differences"]


def align_model() -> torch.nn.Module:
    """A float64 FCResNet(4, 8, 2, 3) whose residual Jacobians at every case's samples have
    s_3 / s_1 >= 0.02 (checked when written): the top-2 singular triplets are resolved, so no
    sign of a rounding-level singular value enters the metrics (a width-5 net has rank-1 and
    rank-0 Jacobians, whose diag_positive is the sign of round-off)."""
    m = FCResNet(4, 8, 2, 3, seed=0, norm="batch").double()
    randomise_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def _relabel(y: Tensor) -> Tensor:
    return torch.arange(y.shape[0]) % 3


def analysis_data(case: str, world: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """:func:`tests.distributed._cases.case_data` with labels ``arange(n) % 3`` in every batch /
    Dataset (collapse needs every class in the union of the shares; a rank may still miss some)."""
    full, (mode, given) = case_data(case, world, shape)
    if case == "even":
        full = TensorDataset(full.tensors[0], _relabel(full.tensors[1]))
        return full, ("split", full)
    if case == "uneven":
        full = (full[0], _relabel(full[1]))
        return full, ("split", full)
    if case == "empty":
        x, y = full.dataset.tensors
        full = DataLoader(TensorDataset(x, _relabel(y)), batch_size=full.batch_size, shuffle=False)
        return full, ("split", full)
    full = [(x, _relabel(y)) for x, y in full]
    return full, ("sharded", [[b] for b in full] + [[]])


def _alignment_x(case: str, world: int, rank: int, shape: tuple[int, ...], distributed: bool
                 ) -> tuple[Tensor, Tensor, Optional[str]]:
    """(x, y, mode) of the alignment: even 2 * world samples split; uneven 2 * world + 1 split;
    empty world - 1 samples split (contiguous blocks: the last rank gets none); sharded: rank r
    passes 1 + r samples, the last rank none (the ground truth: their concatenation)."""
    g = torch.Generator().manual_seed(20 + len(case))
    if case == "sharded":
        parts = [(torch.randn(1 + r, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (1 + r,),
                                                                                             generator=g))
                 for r in range(world - 1)]
        parts.append((torch.zeros(0, *shape, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)))
        if distributed:
            return parts[rank][0], parts[rank][1], "sharded"
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None
    n = {"even": 2 * world, "uneven": 2 * world + 1, "empty": world - 1}[case]
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, ("split" if distributed else None)


def compute_analyses(case: str, world: int, rank: int, distributed: bool) -> dict[str, Any]:
    """collapse (a model with hidden states and a hooked conv net), singularities (both nets) and
    residual alignment (the FC net; the conv net per stage) of ``case`` as ``to_dict()``s."""
    out: dict[str, Any] = {}
    for net, model, shape in (("fc", fc_model(), (4,)), ("conv", conv_model(), (1, 6, 6))):
        full, (mode, given) = analysis_data(case, world, shape)
        if distributed:
            data = given[rank] if mode == "sharded" else given
            dmode: Optional[str] = mode
        else:
            data, dmode = full, None
        out[f"{net}/collapse"] = collapse(model, data, distributed=dmode).to_dict()
        out[f"{net}/singularities"] = singularities(model, data, distributed=dmode).to_dict()
        x, y, amode = _alignment_x(case, world, rank, shape, distributed)
        res = residual_alignment(align_model() if net == "fc" else model, x, k=2, y=y, per_stage=(net == "conv"), seed=3, distributed=amode)
        out[f"{net}/alignment"] = res.to_dict()
        out[f"{net}/alignment/accuracy"] = res.accuracy()
    if distributed:
        out["collectives_done_on"] = rdist.rank()
    return out


def differences(got: Any, ref: Any, tol: float, path: str = "") -> list[str]:
    """Where ``got`` and ``ref`` (nested dicts / lists of numbers, strings, None) differ: numbers
    by more than ``tol * max(1, |ref|)`` (NaN equals NaN), anything else by value."""
    if isinstance(ref, dict):
        if not isinstance(got, dict) or set(got) != set(ref):
            return [f"{path}: keys {sorted(got) if isinstance(got, dict) else type(got).__name__} != {sorted(ref)}"]
        return [d for k in ref for d in differences(got[k], ref[k], tol, f"{path}/{k}")]
    if isinstance(ref, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(ref):
            return [f"{path}: {got!r:.200} != {ref!r:.200}"]
        return [d for i, (a, b) in enumerate(zip(got, ref)) for d in differences(a, b, tol, f"{path}[{i}]")]
    if isinstance(ref, Tensor):
        return differences(got.tolist() if isinstance(got, Tensor) else got, ref.tolist(), tol, path)
    if isinstance(ref, float) and not isinstance(ref, bool):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return [f"{path}: {got!r} != {ref!r}"]
        if ref != ref:
            return [] if got != got else [f"{path}: {got!r} != NaN"]
        if abs(got - ref) > tol * max(1.0, abs(ref)):
            return [f"{path}: {got!r} != {ref!r} (differs by {abs(got - ref):.2e})"]
        return []
    return [] if got == ref else [f"{path}: {got!r:.300} != {ref!r:.300}"]


def analysis_failures(world: int, rank: int) -> dict[str, Any]:
    """What only the workers check: a NaN in one rank's share makes EVERY rank raise (no rank
    left waiting in a collective), and the group still works afterwards. The last rank with data
    (collapse, singularities) or rank 0 (alignment) holds the NaN."""
    out: dict[str, Any] = {}
    model = fc_model()
    _, (_, given) = analysis_data("sharded", world, (4,))
    data = given[rank]
    bad = data
    if rank == world - 2:
        x, y = data[0]
        x = x.clone()
        x[0, 0] = float("nan")
        bad = [(x, y)]
    for name, fn in (("collapse", collapse), ("singularities", singularities)):
        try:
            fn(model, bad, distributed="sharded")
            out[name] = "no error"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    x, _, _ = _alignment_x("sharded", world, rank, (4,), True)
    if rank == 0:
        x = x.clone()
        x[0, 0] = float("nan")
    try:
        residual_alignment(align_model(), x, k=2, distributed="sharded")
        out["alignment"] = "no error"
    except Exception as exc:
        out["alignment"] = f"{type(exc).__name__}: {exc}"
    x, y = analysis_data("uneven", world, (4,))[0]
    try:
        collapse(model, DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), distributed="split")
        out["shuffled"] = "no error"
    except Exception as exc:
        out["shuffled"] = f"{type(exc).__name__}: {exc}"
    out["after"] = collapse(model, data, distributed="sharded").num_samples
    return out
