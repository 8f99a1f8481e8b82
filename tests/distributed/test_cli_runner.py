"""Issue 16: the Runner under torch.distributed (what ``resgeom`` does under torchrun), on 2 gloo
processes spawned by this file (``python -m tests.distributed.test_cli_runner RANK WORLD STORE
DIR``): rank 0 alone writes the folder; a computed step runs on every rank and every rank
returns rank 0's result; a loaded step is loaded on every rank (rank 0 decides); ``on_rank0``
runs on rank 0 alone and its steps are rank 0's own; a failure on one rank is raised on every
rank; ranks with different configurations refuse to start; ``distributed=False`` opts out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.runner import Runner
from resgeom_fast.experiments.studies._shared import share_weights

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT_S = 60


def _worker(rank: int, world: int, store: str, workdir: str) -> None:
    """One rank: the cases below, their observations saved to ``workdir/rank<rank>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    folder = os.path.join(workdir, "OUT")
    seen: dict[str, Any] = {}
    calls: list[str] = []

    def compute(name: str, value: Any):
        def fn():
            calls.append(name)
            return value
        return fn

    try:
        with Runner(folder, {"a": 1}, study="t", log=None) as run:
            seen["out_is_folder"] = run.out == os.path.abspath(folder)
            seen["scratch_exists"] = os.path.isdir(run.out)
            scratch = run.out
            seen["first"] = run.step("first", compute("first", {"rank": rank, "x": [0.1 * (rank + 1)]}))

            def rank0_work():
                calls.append("rank0_work")
                return run.step("inner", compute("inner", {"from": rank}))

            seen["on_rank0"] = run.on_rank0("rank0 work", rank0_work)
            seen["after"] = run.step("after", compute("after", rank))
            try:
                run.step("fails", compute("fails", None) if rank == 0 else _raise(ValueError, "bad batch on rank 1"))
            except ValueError as err:
                seen["fails"] = [str(err), list(getattr(err, "__notes__", []))]
            try:
                run.on_rank0("failing work", lambda: _raise(KeyError, "rank 0 broke")())
            except KeyError as err:
                seen["rank0_fails"] = [str(err), list(getattr(err, "__notes__", []))]
            seen["computed"], seen["loaded"] = list(run.computed), list(run.loaded)
        seen["scratch_removed"] = not os.path.exists(scratch)
        with Runner(folder, {"a": 1}, study="t", log=None) as run:
            seen["again"] = [run.step("first", compute("first-again", 0)), run.step("after", compute("after-2", 0))]
            seen["inner_stored"] = run.stored("inner")
            seen["loaded2"] = list(run.loaded)
        try:
            Runner(folder, {"a": 1 + rank}, study="t", log=None)
        except UsageError as err:
            seen["differ"] = str(err)
        with Runner(os.path.join(workdir, f"own{rank}"), {"a": rank}, study="t", log=None,
                    distributed=False) as run:
            seen["own"] = [run.distributed, run.step("s", compute("own", rank))]
            seen["share_alone"] = share_weights(run, torch.nn.Linear(2, 2), "alone", {"r": rank})
        with Runner(folder, {"a": 1}, study="t", log=None) as run:
            torch.manual_seed(rank)      # every rank its own weights and buffers
            net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            net[1].running_mean.normal_()
            extra = share_weights(run, net, "share", {"from": rank})
            seen["shared"] = [extra, [v.double().sum().item() for v in net.state_dict().values()]]
        seen["calls"] = calls
        with open(os.path.join(workdir, f"rank{rank}.json"), "w") as fh:
            json.dump(seen, fh)
    finally:
        dist.destroy_process_group()


def _raise(kind: type, message: str):
    def fn():
        raise kind(message)
    return fn


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("runner")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.test_cli_runner", str(r), str(WORLD),
                               str(workdir / "store"), str(workdir)], cwd=REPO, env=env, stderr=subprocess.PIPE,
                              text=True) for r in range(WORLD)]
    errs = [p.communicate(timeout=4 * TIMEOUT_S)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORLD, errs
    return workdir, [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_rank0_alone_writes(ranks):
    workdir, seen = ranks
    assert seen[0]["out_is_folder"] and not seen[1]["out_is_folder"]
    assert seen[1]["scratch_exists"] and seen[1]["scratch_removed"]
    files = sorted(str(p.relative_to(workdir / "OUT")) for p in (workdir / "OUT").rglob("*") if p.is_file())
    assert files == ["manifest.json", "steps/after.json", "steps/first.json", "steps/inner.json"]
    stored = json.loads((workdir / "OUT" / "steps" / "first.json").read_text())
    assert stored["result"] == {"rank": 0, "x": [0.1]}


def test_every_rank_returns_rank0s_result(ranks):
    _, seen = ranks
    for s in seen:
        assert s["first"] == {"rank": 0, "x": [0.1]}
        assert s["after"] == 0
    # the step function ran on every rank; on_rank0 work and its steps on rank 0 alone
    assert seen[0]["calls"][:4] == ["first", "rank0_work", "inner", "after"]
    assert seen[1]["calls"][:2] == ["first", "after"]
    assert seen[0]["on_rank0"] == {"from": 0} and seen[1]["on_rank0"] is None
    assert seen[0]["computed"] == ["first", "inner", "after"] and seen[1]["computed"] == ["first", "after"]


def test_loaded_on_every_rank(ranks):
    _, seen = ranks
    for s in seen:
        assert s["again"] == [{"rank": 0, "x": [0.1]}, 0]
        assert s["loaded2"] == ["first", "after"]
        assert "first-again" not in s["calls"] and "after-2" not in s["calls"]
    assert seen[0]["inner_stored"] == {"from": 0} and seen[1]["inner_stored"] is None  # only rank 0 reads


def test_failure_on_one_rank_raised_on_every_rank(ranks):
    _, seen = ranks
    assert seen[1]["fails"] == ["bad batch on rank 1", []]                      # its own
    assert seen[0]["fails"][0] == "bad batch on rank 1"                         # a copy, noted
    assert seen[0]["fails"][1] == ["step fails: raised on rank 1 of 2"]
    assert seen[0]["rank0_fails"] == ["'rank 0 broke'", []]
    assert seen[1]["rank0_fails"][0] == "'rank 0 broke'"
    assert seen[1]["rank0_fails"][1] == ["failing work: raised on rank 0 of 2"]
    for s in seen:
        assert "fails" not in s["computed"]


def test_different_configurations_refused_on_every_rank(ranks):
    _, seen = ranks
    for s in seen:
        assert "the ranks of this run differ from rank 0" in s["differ"] and "rank 1: configuration hash" in s["differ"]


def test_distributed_false_works_alone(ranks):
    workdir, seen = ranks
    for r, s in enumerate(seen):
        assert s["own"] == [False, r]
        assert (workdir / f"own{r}" / "steps" / "s.json").is_file()
        assert s["share_alone"] == {"r": r}


def test_share_weights_gives_every_rank_rank0s(ranks):
    _, seen = ranks
    assert seen[0]["shared"] == seen[1]["shared"]          # bitwise the same parameters and buffers
    assert seen[1]["shared"][0] == {"from": 0}
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net[1].running_mean.normal_()
    assert seen[0]["shared"][1] == [v.double().sum().item() for v in net.state_dict().values()]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
