"""Issue 16: the streaming analyses (collapse, singularities) data-parallel and the residual
alignment sample-parallel under torch.distributed (gloo, 2 and 3 processes).

One spawn per world size (module fixture): every rank computes every case of
:mod:`tests.distributed._analysis_cases` (a Dataset split evenly, one batch split unevenly, a
DataLoader leaving the last rank empty, the caller's own shares with an empty last rank; the
alignment's x split evenly, unevenly, with an empty rank, and per-rank x with an empty one); the
test process computes the same analyses single-process on the full data (float64) as the ground
truth. Every number of every result must agree to 1e-10 (relative, floor 1), everything else
(layer names, counts, notes, None-with-reason) exactly, and every rank must hold the same result.
"""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.analysis.alignment import residual_alignment
from resgeom_fast.analysis.collapse import collapse
from resgeom_fast.analysis.singularities import singularities
from resgeom_fast.core.checks import ArgumentValueError
from tests.distributed._analysis_cases import CASES, compute_analyses, differences
from tests.distributed._cases import fc_model, spawn

WORLDS = (2, 3)
TOL = 1e-10
KEYS = [f"{net}/{a}" for net in ("fc", "conv") for a in ("collapse", "singularities", "alignment")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for world in WORLDS:
        workdir = tmp_path_factory.mktemp(f"analyses{world}")
        ranks = spawn(world, workdir, task="analyses")
        refs = {case: compute_analyses(case, world, 0, distributed=False) for case in CASES}
        out[world] = (ranks, refs)
    return out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_equals_single_process(runs, world, case):
    ranks, refs = runs[world]
    ref = refs[case]
    for r in range(world):
        got = ranks[r][case]
        for key in KEYS + ["fc/alignment/accuracy", "conv/alignment/accuracy"]:
            diff = differences(got[key], ref[key], TOL, key)
            assert not diff, f"{case}, world {world}, rank {r}: " + "; ".join(diff[:5])
    # the ground truth is non-trivial: every sample counted, metrics defined, SVDs converged
    n = ref["fc/collapse"]["num_samples"]
    assert n == sum(ref["fc/collapse"]["class_counts"]) >= 3
    assert ref["fc/singularities"]["num_samples"] == n
    assert all(v is not None for v in ref["fc/collapse"]["ncc_mismatch"])
    assert ref["fc/alignment/accuracy"]["all_converged"]
    flat = str(ref["fc/alignment"])
    assert "singular_values_mean" in flat or "sigma1" in flat


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_holds_the_same_result(runs, world):
    """Bitwise: the all-reduced statistics and gathered products are the same on every rank."""
    ranks, _ = runs[world]
    for case in CASES:
        for key in KEYS:
            for r in range(1, world):
                assert differences(ranks[r][case][key], ranks[0][case][key], 0.0, key) == [], \
                    f"{case}: {key} differs between rank 0 and rank {r}"
        assert [ranks[r][case]["collectives_done_on"] for r in range(world)] == list(range(world))


@pytest.mark.parametrize("world", WORLDS)
def test_a_failure_on_one_rank_raises_on_every_rank(runs, world):
    """A NaN in one rank's samples: every rank raises (the failing rank its own error, the others
    a copy), none is left waiting in a collective, and the group works afterwards."""
    ranks, refs = runs[world]
    for r in range(world):
        f = ranks[r]["failures"]
        assert f["collapse"].startswith("NonFiniteError: collapse: expected finite the input x of batch 0"), f
        assert f["singularities"].startswith("NonFiniteError: singularities: expected finite the inputs x"), f
        assert f["alignment"].startswith("ValueError: residual_alignment: the input of block"), f
        assert "non-finite" in f["alignment"]
        assert f["shuffled"].startswith("ArgumentValueError: collapse: expected data that every rank reads in the "
                                        "same order for distributed='split', got a shuffling DataLoader"), f
        assert f["after"] == refs["sharded"]["fc/collapse"]["num_samples"]


def test_distributed_needs_a_process_group():
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.arange(4) % 3
    model = fc_model()
    for call in (lambda: collapse(model, (x, y), distributed="split"),
                 lambda: singularities(model, (x, y), distributed="sharded"),
                 lambda: residual_alignment(model, x, k=2, distributed="split")):
        with pytest.raises(ArgumentValueError, match="expected an initialised torch.distributed process group"):
            call()
    with pytest.raises(ValueError, match="distributed"):
        collapse(model, (x, y), distributed="auto")
