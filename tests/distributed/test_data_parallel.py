"""Issue 16: data-parallel curvature operators under torch.distributed (gloo, 2 and 3 processes).

One spawn per world size (module fixture): every rank computes every case of
:mod:`tests.distributed._cases` (a Dataset split evenly, one batch split unevenly, a DataLoader
leaving a rank empty, and the caller's own shares with an empty rank); the test process computes the same quantities single-process on the full
data (float64) as the ground truth. Hessian products by every method, GGN, per-block Hessians,
a conv net, eigsh at both ends, Hutch++, SLQ nodes and weights and a randomized SVD must agree
to 1e-10 (relative to the largest entry), and every rank must hold bitwise the same result.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed._cases import CASES, compute, fc_model, operator, spawn, case_data, _vectors
from tests.operators._operator_nets import assert_tuned

WORLDS = (2, 3)
TOL = 1e-10
# columns are defined up to sign: eigenvectors and singular vectors are compared after alignment
SIGNED = ("eigsh/LA/vectors", "eigsh/SA/vectors", "svd/U")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for world in WORLDS:
        workdir = tmp_path_factory.mktemp(f"world{world}")
        ranks = spawn(world, workdir)
        refs = {case: compute(case, world, 0, distributed=False) for case in CASES}
        out[world] = (ranks, refs, workdir)
    return out


def _aligned(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    signs = torch.sign((got * ref).sum(-2, keepdim=True))
    return got * signs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_equals_single_process(runs, world, case):
    ranks, refs, _ = runs[world]
    ref = refs[case]
    got = ranks[0][case]
    assert set(got) == set(ref)
    tensors = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 20                       # every quantity of the case was compared
    for key in tensors:
        g = _aligned(got[key], ref[key]) if key in SIGNED else got[key]
        assert g.shape == ref[key].shape, key
        scale = max(1.0, float(ref[key].abs().max()))
        err = float((g - ref[key]).abs().max())
        assert err <= TOL * scale, f"{case}, world {world}: {key} differs by {err:.2e} (scale {scale:.2e})"
    for net in ("fc", "conv"):
        assert got[f"{net}/num_samples"] == ref[f"{net}/num_samples"]   # the global count
    # every method, at every level, gave a non-trivial product
    assert float(ref["fc/hessian/structured"].abs().max()) > 1e-3
    assert float(ref["conv/hessian/double_backward"].abs().max()) > 1e-3


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_holds_the_same_result(runs, world):
    ranks, _, _ = runs[world]
    for case in CASES:
        for key, v in ranks[0][case].items():
            for r in range(1, world):
                w = ranks[r][case][key]
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, w), f"{case}: {key} differs between rank 0 and rank {r}"
                else:
                    assert v == w, f"{case}: {key} differs between rank 0 and rank {r}"


@pytest.mark.parametrize("world", WORLDS)
def test_auto_tuner_decides_on_rank_0_for_all(runs, world):
    """"auto" timed the structured conv path (issue 15) against the double backward (2 vectors):
    the timings are rank 0's on every rank, so every rank chose the same method."""
    ranks, _, _ = runs[world]
    for case in CASES:
        timings = ranks[0][case]["conv/auto_timings"]
        assert set(timings[2]) == {"structured", "double_backward"}
        assert_tuned(timings[2])
        assert ranks[0][case]["conv/auto_choice"] in timings[2]
        for r in range(1, world):
            assert ranks[r][case]["conv/auto_timings"] == timings
            assert ranks[r][case]["conv/auto_choice"] == ranks[0][case]["conv/auto_choice"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["uneven", "sharded"])
def test_seed_none_draws_the_same_numbers_on_every_rank(runs, world, case):
    ranks, _, _ = runs[world]
    for key in ("seed_none/values", "seed_none/trace"):
        vals = [ranks[r]["failures"][case][key] for r in range(world)]
        assert all(torch.equal(vals[0], v) for v in vals[1:]), key


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["uneven", "sharded"])
def test_rank_dependent_vectors_raise_on_every_rank(runs, world, case):
    ranks, refs, _ = runs[world]
    for r in range(world):
        msg = ranks[r]["failures"][case]["divergent"]
        assert msg.startswith("DivergentRanksError: hessian: expected every rank to apply the operator to the same "
                              "vectors"), msg
        assert f"on rank(s) {list(range(1, world))} than on rank 0" in msg
    # the group and the operator still work afterwards, and give the single-process product
    full, _ = case_data(case, world, (4,))
    H = operator("hessian", fc_model(), full, None)
    want = H.matmat(_vectors(H.shape[0], 2, 7))
    for r in range(world):
        for key in ("after_divergent", "after_failure"):
            got = ranks[r]["failures"][case][key]
            assert float((got - want).abs().max()) <= TOL * float(want.abs().max())


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["uneven", "sharded"])
def test_a_failure_on_one_rank_raises_on_every_rank(runs, world, case):
    """One rank alone passes float32 inputs: every rank raises its error (no rank waits)."""
    ranks, _, _ = runs[world]
    for r in range(world):
        msg = ranks[r]["failures"][case]["one_rank_fails"]
        assert msg == ("ArgumentValueError: hessian: expected x of dtype torch.float64 (the dtype of the model's "
                       "parameters), got torch.float32"), msg


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["uneven", "sharded"])
def test_other_parameters_on_one_rank_are_refused_on_every_rank(runs, world, case):
    ranks, _, _ = runs[world]
    for r in range(world):
        msg = ranks[r]["failures"][case]["other_params"]
        assert msg == (f"DivergentRanksError: hessian: expected the same model parameters on every rank (a "
                       f"data-parallel operator sums the ranks' products), got other parameters on rank(s) "
                       f"[{world - 1}] than on rank 0; load the same checkpoint or seed on every rank"), msg


def test_a_killed_rank_ends_every_rank_with_an_error_naming_it(runs):
    """In the group of 3, rank 2 exits without a word after building an operator; ranks 0 and 1
    raise RankFailureError naming rank 2 at their next product, and every process has exited
    (spawn's join, within its timeout)."""
    *_, workdir = runs[3]
    for r in (0, 1):
        seconds, msg = (workdir / f"killed_rank{r}.txt").read_text().split("\n", 1)
        assert msg.startswith(f"RankFailureError: hessian: a collective failed on rank {r} of 3: rank(s) [2] did "
                              f"not report it within 3 s (died, hang, or are still waiting in an earlier step); "
                              f"torch.distributed: "), msg
