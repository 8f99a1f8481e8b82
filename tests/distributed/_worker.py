"""One rank of the data-parallel tests: ``python -m tests.distributed._worker RANK WORLD STORE OUTDIR [TASK]``.

TASK "operators" (default) runs the operator cases below; "analyses" computes every case of
:mod:`tests.distributed._analysis_cases` (collapse, singularities, alignment) and saves them to
``OUTDIR/rank<RANK>.pt``; "probes" the probe-parallel cases of
:mod:`tests.distributed._probe_cases` (and the analyses' parameter check).

Joins a gloo group through a FileStore (collective timeout ``_cases.TIMEOUT_S``), computes every
case of :mod:`tests.distributed._cases` and saves the results to ``OUTDIR/rank<RANK>.pt``; in a
group of 3, the last rank then exits as if killed (``_cases.killed_rank``).
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed._analysis_cases import analysis_failures, compute_analyses
from tests.distributed._probe_cases import compute_alignment_local, compute_probes, probe_failures
from tests.distributed._cases import CASES, TIMEOUT_S, checks_of_failures, compute, killed_rank


def main(rank: int, world: int, store: str, outdir: str, task: str = "operators") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    if task == "probes":
        try:
            local, svd_batches = compute_alignment_local(world, rank, parallel=True)
            results = {"probes": compute_probes(parallel=True), "failures": probe_failures(world, rank),
                       "alignment_local": local, "svd_batches": svd_batches}
            torch.save(results, Path(outdir) / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
        return
    if task == "analyses":
        try:
            results = {case: compute_analyses(case, world, rank, distributed=True) for case in CASES}
            results["failures"] = analysis_failures(world, rank)
            torch.save(results, Path(outdir) / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
        return
    try:
        results = {case: compute(case, world, rank, distributed=True) for case in CASES}
        results["failures"] = {case: checks_of_failures(case, world, rank) for case in ("uneven", "sharded")}
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        if world == 3:
            killed_rank(world, rank, Path(outdir))      # the last rank exits inside
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:6])
