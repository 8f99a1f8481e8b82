"""Issue 16: the sample-local residual alignment in the adaptive (default) mode, under gloo with 2
and 3 processes.

With ``power_iters=None`` every rank runs the randomized SVDs of its OWN samples only, and a stop
that all_reduces the ranks' "all mine converged" / "I failed" flags at every check makes every
rank iterate as one process on all N samples does. Checked here against the single-process
ground truth (float64, same seeds, oversample 1 so that samples need 0 to 5 iterations alone):

- every number of ``to_dict()`` and ``accuracy()`` (per-block metrics, iteration counts,
  convergence flags) equals one process's to 1e-10, bitwise the same on every rank, for data
  split evenly, unevenly, a rank without samples and the caller's own shares (an empty last
  rank); the max_iters cap with an empty rank; the conv net per stage;
- each rank's SVD batches are its own share (a recording wrapper of ``randomized_svd``; none on an
  empty rank), every SVD gets the stop, and runs the global iteration count -- which differs
  from what a rank's own samples alone need in some cases (the stop does the work);
- a NaN in one rank's samples, and an SVD that raises on one rank before its first check, between
  checks or after its last check, raise the same error on every rank (no rank left waiting: no
  RankFailureError, no timeout), and the group still gives the single-process result afterwards.

One spawn per world size (module fixture; the workers are this module run as
``python -m tests.distributed.test_alignment_adaptive_local RANK WORLD STORE OUTDIR``).
"""
from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

from resgeom_fast.analysis import alignment as alignment_mod
from resgeom_fast.analysis.alignment import residual_alignment
from tests.distributed._analysis_cases import _alignment_x, align_model, differences
from tests.distributed._cases import CASES, TIMEOUT_S, conv_model, spawn

WORLDS = (2, 3)
TOL = 1e-10
#: (name, data case, net, settings): oversample 1 of D = 8 makes the adaptive iterations vary
#: between samples (0 to 5 alone at tol 1e-3); "cap" hits max_iters with an empty rank
RUNS = tuple((case, case, "fc", {}) for case in CASES) + (
    ("cap", "empty", "fc", {"tol": 1e-12, "max_iters": 2}),
    ("conv", "uneven", "conv", {}),
)
FAILURES = ("nan", "svd_first", "svd_mid", "svd_after")


class _Recorder:
    """Wraps the alignment's ``randomized_svd``: records (batch, stop given, iterations) of every
    call; ``fail`` ("first", "mid", "after") makes this rank's first SVD raise before its first
    check, at its second check (instead of taking part in it) or after its last check."""

    def __init__(self, fail: Optional[str] = None) -> None:
        self.calls: list[tuple[int, bool, int]] = []
        self.real = alignment_mod.randomized_svd
        self.fail = fail

    def __enter__(self) -> "_Recorder":
        def recording(op, *a, stop=None, **kw):
            fail, self.fail = self.fail, None
            if fail == "first":
                raise RuntimeError("injected SVD failure before the first check")
            if fail == "mid":
                inner, checks = stop, []

                def stop(conv):
                    checks.append(1)
                    if len(checks) == 2:
                        raise RuntimeError("injected SVD failure at the second check")
                    return inner(conv)
            svd = self.real(op, *a, stop=stop, **kw)
            if fail == "after":
                raise RuntimeError("injected SVD failure after the last check")
            self.calls.append((int(op.batch_shape[0]), stop is not None, int(svd.iterations)))
            return svd

        alignment_mod.randomized_svd = recording
        return self

    def __exit__(self, *exc: Any) -> None:
        alignment_mod.randomized_svd = self.real


def _run(name: str, world: int, rank: int, parallel: bool, fail: Optional[str] = None,
         x_override: Optional[torch.Tensor] = None) -> tuple[Any, list[tuple[int, bool, int]]]:
    """residual_alignment of run ``name`` (adaptive default), in the group or in one process."""
    _, case, net, settings = next(r for r in RUNS if r[0] == name)
    shape = (4,) if net == "fc" else (1, 6, 6)
    x, y, amode = _alignment_x(case, world, rank, shape, parallel)
    if x_override is not None:
        x = x_override
    model = align_model() if net == "fc" else conv_model()
    with _Recorder(fail) as rec, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="residual_alignment: the randomized SVD did not reach tol",
                                category=RuntimeWarning)
        res = residual_alignment(model, x, k=2, y=y, per_stage=(net == "conv"), seed=3, oversample=1,
                                 distributed=amode, **settings)
    return res, rec.calls


def compute(world: int, rank: int, parallel: bool) -> dict[str, Any]:
    """Every run's ``to_dict()`` / ``accuracy()`` and SVD calls, in the group or in one process."""
    out: dict[str, Any] = {}
    for name, *_ in RUNS:
        res, calls = _run(name, world, rank, parallel)
        out[f"{name}/result"] = res.to_dict()
        out[f"{name}/accuracy"] = res.accuracy()
        out[f"{name}/calls"] = calls
    return out


def _error(call: Any) -> str:
    try:
        call()
        return "no error"
    except Exception as exc:  # the test reads the type, the message and the notes ("raised on rank r")
        return f"{type(exc).__name__}: {exc} | " + "; ".join(getattr(exc, "__notes__", []))


def failures(world: int, rank: int) -> dict[str, Any]:
    """One rank fails (``world - 2``: a rank with samples in every case), every rank must raise."""
    out: dict[str, Any] = {}
    bad = world - 2
    x, _, _ = _alignment_x("uneven", world, rank, (4,), True)
    if rank == bad:
        x = x.clone()
        n = x.shape[0]
        sizes = [n // world + (1 if q < n % world else 0) for q in range(world)]
        x[sum(sizes[:rank]), 0] = float("nan")      # a sample of this rank's own share
    out["nan"] = _error(lambda: _run("uneven", world, rank, True, x_override=x))
    for kind in ("first", "mid", "after"):
        out[f"svd_{kind}"] = _error(lambda: _run("uneven", world, rank, True, fail=kind if rank == bad else None))
    res, _ = _run("uneven", world, rank, True)            # the group still works, collectives aligned
    out["after/result"] = res.to_dict()
    return out


def main(rank: int, world: int, store: str, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        torch.save({"runs": compute(world, rank, True), "failures": failures(world, rank)},
                   Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, workdir: Path) -> list[dict[str, Any]]:
    return spawn(world, workdir, task=None, module="tests.distributed.test_alignment_adaptive_local")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    got = {world: _spawn(world, tmp_path_factory.mktemp(f"adaptive{world}")) for world in WORLDS}
    return got, {world: compute(world, 0, False) for world in WORLDS}


def _shares(name: str, world: int) -> list[int]:
    """Samples per rank of run ``name`` (as _alignment_x gives them)."""
    case = next(r[1] for r in RUNS if r[0] == name)
    if case == "sharded":
        return [1 + q for q in range(world - 1)] + [0]
    n = {"even": 2 * world, "uneven": 2 * world + 1, "empty": world - 1}[case]
    return [n // world + (1 if q < n % world else 0) for q in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_equals_single_process_bitwise_on_every_rank(runs, world):
    got, refs = runs
    ref = refs[world]
    for r in range(world):
        for name, *_ in RUNS:
            for part in ("result", "accuracy"):
                key = f"{name}/{part}"
                diff = differences(got[world][r]["runs"][key], ref[key], TOL, key)
                assert not diff, f"world {world}, rank {r}: " + "; ".join(diff[:5])
                assert differences(got[world][r]["runs"][key], got[world][0]["runs"][key], 0.0, key) == []
    # the ground truth is non-trivial: adaptive, iterations vary, the cap is hit, sigma_1 > 0
    for name, *_ in RUNS:
        d = ref[f"{name}/result"]
        assert d["settings"]["power_iters"] == "auto"
        assert d["summary"]["depth_product"] > 0
    assert ref["cap/accuracy"]["all_converged"] is False
    assert all(c[2] == 2 for c in ref["cap/calls"])
    assert ref["uneven/accuracy"]["all_converged"] and ref["even/accuracy"]["all_converged"]
    assert max(c[2] for c in ref["uneven/calls"]) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_each_rank_runs_its_own_samples_for_the_global_iteration_count(runs, world):
    got, refs = runs
    ref = refs[world]
    for name, *_ in RUNS:
        ref_calls = ref[f"{name}/calls"]
        N = sum(_shares(name, world))
        assert all(c[0] == N and not c[1] for c in ref_calls)           # one process: all samples, no stop
        for r, n_r in enumerate(_shares(name, world)):
            mine = got[world][r]["runs"][f"{name}/calls"]
            if not n_r:
                assert mine == [], (name, r, mine)                       # an empty rank runs no SVD
                continue
            assert mine == [(n_r, True, c[2]) for c in ref_calls], (name, r, mine, ref_calls)


@pytest.mark.slow
def test_a_rank_alone_would_stop_earlier(runs):
    """The stop does the work: on some rank, its own samples alone need fewer iterations than all
    N samples (e.g. 2 ranks, even split: rank 1's samples alone 2 and 1, all samples 5 and 4)."""
    _, refs = runs
    earlier = []
    for world in WORLDS:
        for name in ("even", "uneven"):
            glob = [c[2] for c in refs[world][f"{name}/calls"]]
            x, y, _ = _alignment_x(name, world, 0, (4,), False)
            a = 0
            for n_r in _shares(name, world):
                with _Recorder() as rec:
                    residual_alignment(align_model(), x[a:a + n_r], k=2, seed=3, oversample=1)
                a += n_r
                alone = [c[2] for c in rec.calls]
                assert all(p <= q for p, q in zip(alone, glob)) and len(alone) == len(glob)
                earlier.append(alone != glob)
    assert any(earlier)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_a_failure_on_one_rank_raises_on_every_rank(runs, world):
    got, refs = runs
    bad = world - 2
    expected = {"nan": "ValueError: residual_alignment: the input of block",
                "svd_first": "RuntimeError: injected SVD failure before the first check",
                "svd_mid": "RuntimeError: injected SVD failure at the second check",
                "svd_after": "RuntimeError: injected SVD failure after the last check"}
    for r in range(world):
        f = got[world][r]["failures"]
        for kind in FAILURES:
            assert f[kind].startswith(expected[kind]), (world, r, kind, f[kind])
            assert "RankFailureError" not in f[kind]
            if r != bad:
                assert f"raised on rank {bad} of {world}" in f[kind], (world, r, kind, f[kind])
        assert "non-finite" in f["nan"]
        diff = differences(f["after/result"], refs[world]["uneven/result"], TOL, "after")
        assert not diff, f"world {world}, rank {r}: " + "; ".join(diff[:5])


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
