"""Issue 16: probe-parallel SLQ and trace (``distributed="probes"``: each rank runs its share of
the single-process probes on its own full operator, one gather per stage) and the analyses'
parameter check across ranks, under gloo with 2 and 3 processes.

One spawn per world size (module fixture; about 70 s on 2 shared cores: the tests are marked slow). Every rank computes
:func:`tests.distributed._probe_cases.compute_probes` with the probes split; the test process
computes the same single-process (the ground truth, same seeds). SLQ nodes, weights, density and
moments and the trace estimates must agree to 1e-10 (float64) for even and uneven splits and
for ranks without any probe (3 ranks and 2 probes, a Hutch++ sketch of 2 columns), and every rank
must hold bitwise the same result.
"""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.linalg import slq_density, trace
from tests.distributed._analysis_cases import differences
from tests.distributed._cases import spawn
from tests.distributed._probe_cases import compute_alignment_local, compute_probes

WORLDS = (2, 3)
TOL = 1e-10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for world in WORLDS:
        out[world] = spawn(world, tmp_path_factory.mktemp(f"probes{world}"), task="probes")
    return out, compute_probes(parallel=False)


@pytest.fixture(scope="module")
def local_refs(runs):
    """The single-process alignment (fixed power iterations) on each world's data, and the SVD
    batches it ran on (all samples at once)."""
    return {world: compute_alignment_local(world, 0, parallel=False) for world in WORLDS}


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_equals_single_process(runs, world):
    ranks, ref = runs
    got = ranks[world]
    assert set(got[0]["probes"]) == set(ref)
    for r in range(world):
        for key, value in ref.items():
            if key == "spectrum/products":
                continue
            diff = differences(got[r]["probes"][key], value, TOL, key)
            assert not diff, f"world {world}, rank {r}: " + "; ".join(diff[:5])
    # the ground truth is non-trivial: 4 probes of 12 nodes, weights summing to 1, a finite trace
    assert ref["dense/slq4/nodes"].shape == (4, 12)
    assert torch.allclose(ref["dense/slq4/weights"].sum(-1), torch.ones(4, dtype=torch.float64))
    assert ref["batched/slq4/nodes"].shape == (2, 4, 12)
    assert not bool(ref["dense/slq4/exhausted"].any())
    assert ref["hessian/hutch++9/method"] == "hutch++"
    assert ref["hessian/hutchinson2/method"] == "hutchinson"


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_holds_the_same_result(runs, world):
    ranks, _ = runs
    got = ranks[world]
    for r in range(1, world):
        for key, value in got[0]["probes"].items():
            assert differences(got[r]["probes"][key], value, 0.0, key) == [], f"{key}: rank {r} differs from rank 0"
        assert torch.equal(got[r]["failures"]["seed_none/slq"], got[0]["failures"]["seed_none/slq"])
        assert torch.equal(got[r]["failures"]["seed_none/trace"], got[0]["failures"]["seed_none/trace"])


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_products_count_every_rank(runs, world):
    """hessian_spectrum's products with the probes split: all ranks' products (eigsh on every
    rank, one fingerprint product per rank and algorithm, the probes once)."""
    ranks, ref = runs
    got = ranks[world][0]["probes"]["spectrum/products"]
    assert got > ref["spectrum/products"]
    assert all(ranks[world][r]["probes"]["spectrum/products"] == got for r in range(world))


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_failures_raise_on_every_rank(runs, world):
    ranks, ref = runs
    last = world - 1
    for r in range(world):
        f = ranks[world][r]["failures"]
        slq_share = [[2, 2], [2, 1, 1]][world - 2][r]
        assert f["share/slq"] == f"full reorthogonalisation, all probes together (this rank's {slq_share} of 4 " \
                                 "probes, distributed='probes')", f["share/slq"]
        cols = [[2 + 2 + 2, 1 + 1 + 1], [1 + 1 + 1] * 3][world - 2][r]      # sketch, range, Hutchinson
        assert f"(this rank's {cols} of 9 probes, distributed='probes')" in f["share/trace"], f["share/trace"]
        for key in ("divergent/slq", "divergent/trace"):
            assert f[key].startswith("DivergentRanksError: "), (key, f[key])
            assert f"other products on rank(s) [{last}] than on rank 0" in f[key]
        for key, fn in (("memory/slq", "slq_density"), ("memory/trace", "trace")):
            assert f[key].startswith(f"InsufficientMemoryError: {fn}: "), (key, f[key])
            assert "but 1000 bytes" in f[key] and "options that would fit" in f[key]
        assert f["data_parallel"].startswith("ArgumentValueError: slq_density: expected a single-process operator"), \
            f["data_parallel"]
        assert torch.allclose(f["after"], ref["dense/hutch++9/estimate"], rtol=TOL, atol=0)
        for key, fn in (("params/collapse", "collapse"), ("params/singularities", "singularities"),
                        ("params/alignment", "residual_alignment"), ("params/spectrum", "hessian_spectrum")):
            assert f[key].startswith(f"DivergentRanksError: {fn}: expected the same model parameters on every rank"), \
                (key, f[key])
            assert f"rank(s) [{last}]" in f[key]


def test_probes_needs_a_process_group_and_a_known_mode():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ArgumentValueError, match="expected an initialised torch.distributed process group"):
        slq_density(A, probes=2, steps=3, distributed="probes")
    with pytest.raises(ArgumentValueError, match="expected an initialised torch.distributed process group"):
        trace(A, probes=3, distributed="probes")
    with pytest.raises(ValueError, match="distributed"):
        trace(A, probes=3, distributed="split")


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_alignment_sample_local_equals_single_process(runs, local_refs, world):
    """Fixed power iterations: each rank runs the randomized SVDs of its own samples only (the SVD
    batches are its share: contiguous blocks of x, 1 + r samples when sharded, none on an empty
    rank) and the per-sample results are gathered for the metrics: every number equals one
    process's to 1e-10, bitwise the same on every rank."""
    ranks, _ = runs
    ref, ref_batches = local_refs[world]
    got = ranks[world]
    for r in range(world):
        for key, value in ref.items():
            diff = differences(got[r]["alignment_local"][key], value, TOL, key)
            assert not diff, f"world {world}, rank {r}: " + "; ".join(diff[:5])
            assert differences(got[r]["alignment_local"][key], got[0]["alignment_local"][key], 0.0, key) == []
    for key, sizes in ref_batches.items():
        case, net = key.split("/")
        n_all = sizes[0]
        assert n_all >= world - 1 and len(set(sizes)) == 1
        if case == "sharded":
            share = [1 + q for q in range(world - 1)] + [0]
        else:
            share = [n_all // world + (1 if q < n_all % world else 0) for q in range(world)]
        for r in range(world):
            mine = got[r]["svd_batches"][key]
            assert mine == ([share[r]] * len(sizes) if share[r] else []), (key, r, mine, share)
    # the ground truth is non-trivial: every sample analysed, fixed iterations, positive sigma_1
    for case in ("even", "sharded"):
        d = ref[f"{case}/fc/alignment_local"]
        assert d["settings"]["power_iters"] == 8 and d["settings"]["n_samples"] >= world - 1
        assert ref[f"{case}/fc/alignment_local/accuracy"]["all_converged"]
        assert d["summary"]["depth_product"] > 0 and d["summary"]["linearity"] > 0
