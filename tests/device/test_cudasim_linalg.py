"""The linalg layer "on CUDA" on the simulated device of ../shared/tools/cudasim.py (issue 17).

cudasim makes CPU tensors look like cuda:0 tensors, applies CUDA's device-mixing rules (strict:
a mismatch raises) and counts every device-to-host sync by the resgeom_fast line that caused it.
These tests run eigsh, slq_density, trace and randomized_svd on a "CUDA" operator and check:
no device mismatch, no CPU tensor created in resgeom_fast, the results against dense float64
ground truth, reproducibility given a seed, and a bound on the host syncs per Lanczos step.

One patch beyond cudasim (tests/device/_cudasim_util.py, shared with the operators' test): a real ``torch.Generator(device="cuda")`` needs a CUDA driver, so
while a test runs, ``torch.Generator`` makes, for device "cuda", a CPU generator that reports
cuda:0 (draws with it then pass cudasim's "generator on the device" check and run on the CPU).

Sync counts (eigsh on a 300 x 300 matrix, k = 4, which="both", check_every = 10; slq_density
with 4 probes): before issue 17, 2.0 syncs per Lanczos step (a finite check and a breakdown
check each step) plus a device eigh and a sync per convergence check; after, 0.2 per step for
eigsh (one window flag read + one T transfer per 10 steps) and 0.1 for slq_density.
"""
from __future__ import annotations

import math

import pytest
import torch

import resgeom_fast as rg
from tests.device._cudasim_util import SKIP_REASON, cudasim, host, sim, syncs

pytestmark = pytest.mark.skipif(cudasim is None, reason=SKIP_REASON)


def _sym(n: int, evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    A = (Q * evals) @ Q.T
    return (A + A.T) / 2


def _spectrum(n: int) -> torch.Tensor:
    # well separated extremes (fast Lanczos convergence), a dense indefinite bulk
    bulk = torch.linspace(-1.0, 1.0, n - 4, dtype=torch.float64)
    return torch.cat([torch.tensor([-6.0, -4.0], dtype=torch.float64), bulk,
                      torch.tensor([5.0, 8.0], dtype=torch.float64)])


def _eigsh_syncs(A: torch.Tensor, steps: int) -> tuple[int, int]:
    with sim():
        res = rg.linalg.eigsh(A.cuda(), k=4, which="both", max_steps=steps, tol=1e-300)
    assert res.eigenvalues.device.type == "cuda" and res.eigenvectors.device.type == "cuda"
    return syncs(), res.steps


def test_eigsh_on_cuda_syncs_per_lanczos_step():
    A = _sym(300, torch.linspace(-1.0, 1.0, 300, dtype=torch.float64))   # slow convergence
    s30, n30 = _eigsh_syncs(A, 30)
    s60, n60 = _eigsh_syncs(A, 60)
    assert (n30, n60) == (30, 60)                    # tol=1e-300: never converged, all steps run
    per_step = (s60 - s30) / (n60 - n30)
    # one read of the window's flags and one transfer of T per check_every = 10 steps (was 2.0)
    assert per_step <= 0.2, cudasim.report(f"eigsh: {per_step} syncs per Lanczos step")
    assert s60 <= 4 + 2 * 6, cudasim.report("eigsh, 60 steps")


def test_eigsh_on_cuda_matches_dense_and_is_reproducible():
    ev = _spectrum(200)
    A = _sym(200, ev, seed=1)
    with sim():
        r1 = rg.linalg.eigsh(A.cuda(), k=4, which="both", seed=7)
        r2 = rg.linalg.eigsh(A.cuda(), k=4, which="both", seed=7)
    assert bool(r1.converged.all())
    truth = torch.tensor([-6.0, -4.0, 5.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(host(r1.eigenvalues), truth, rtol=0, atol=1e-9)
    assert float(r1.residuals.max()) < 1e-8
    assert torch.equal(host(r1.eigenvalues), host(r2.eigenvalues)) and r1.steps == r2.steps


def test_eigsh_on_cuda_breakdown_restarts_on_the_device():
    """Rank 6: the Krylov space is exhausted after 6 steps; the rolled-back window restarts the
    problem from a vector drawn on the device, and the zero eigenvalue is found."""
    ev = torch.cat([torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], dtype=torch.float64), torch.zeros(94, dtype=torch.float64)])
    A = _sym(100, ev, seed=2)
    with sim():
        res = rg.linalg.eigsh(A.cuda(), k=3, which="LA", seed=3)
    torch.testing.assert_close(host(res.eigenvalues), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-9)
    assert float(res.residuals.max()) < 1e-8


@pytest.mark.parametrize("reorth", ["full", "local"])
def test_slq_on_cuda_syncs_and_ground_truth(reorth):
    ev = _spectrum(300)
    A = _sym(300, ev, seed=4)
    counts = {}
    for steps in (30, 60):
        with sim():
            res = rg.linalg.slq_density(A.cuda(), probes=4, steps=steps, seed=5, reorth=reorth)
        counts[steps] = syncs()
        assert res.density.device.type == "cuda" and res.nodes.device.type == "cuda"
    per_step = (counts[60] - counts[30]) / 30
    assert per_step <= 0.1, cudasim.report(f"slq_density: {per_step} syncs per Lanczos step")
    # ground truth: the extreme nodes are the extreme eigenvalues; the mean of the 0th and
    # weights are a probability per probe; tr(A) = n E[v^T A v] (Rademacher: exact per probe
    # would need diag(A) = const; check against tr(A) within 5 standard errors)
    torch.testing.assert_close(host(res.lambda_max), ev.max(), rtol=0, atol=1e-8)
    torch.testing.assert_close(host(res.lambda_min), ev.min(), rtol=0, atol=1e-8)
    torch.testing.assert_close(host(res.weights.sum(-1)), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    m1, se1 = float(res.moments[1]), float(res.moments_std[1])
    assert abs(m1 - float(ev.sum())) <= 5 * se1 + 1e-9
    with sim():
        again = rg.linalg.slq_density(A.cuda(), probes=4, steps=60, seed=5, reorth=reorth)
    assert torch.equal(host(again.nodes), host(res.nodes))


def test_trace_on_cuda_is_exact_on_a_low_rank_matrix_and_draws_on_the_device():
    """Hutch++ with a sketch of 10 columns on a rank-5 PSD matrix: the range is captured, the
    deflated remainder is zero, so the estimate is tr(A) up to rounding."""
    ev = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0], dtype=torch.float64), torch.zeros(195, dtype=torch.float64)])
    A = _sym(200, ev, seed=6)
    with sim():
        res = rg.linalg.trace(A.cuda(), probes=30, seed=1)
        again = rg.linalg.trace(A.cuda(), probes=30, seed=1)
    assert res.method == "hutch++" and res.estimate.device.type == "cuda"
    assert abs(float(res.estimate) - 25.0) < 1e-9
    assert torch.equal(host(res.estimate), host(again.estimate))
    with sim():
        res = rg.linalg.trace(A.cuda(), probes=20, method="hutchinson", seed=2)
    assert abs(float(res.estimate) - 25.0) <= 5 * float(res.stderr)


def test_randomized_svd_on_cuda_matches_dense():
    g = torch.Generator().manual_seed(8)
    U = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64)).Q
    s = 2.0 ** -torch.arange(120, dtype=torch.float64)
    A = (U[:, :120] * s) @ V.T
    with sim():
        res = rg.linalg.randomized_svd(A.cuda(), k=5, seed=3)
        again = rg.linalg.randomized_svd(A.cuda(), k=5, seed=3)
    torch.testing.assert_close(host(res.S), s[:5], rtol=1e-10, atol=0)
    assert bool(res.converged.all())
    assert torch.equal(host(res.S), host(again.S))


def test_non_finite_product_is_still_named_at_its_step_on_cuda():
    """The windowed Lanczos reads its flags once per 10 steps; a NaN at step 3 is still reported
    at step 3, with the count and index, as a step-by-step run reports it."""
    A = _sym(20, torch.linspace(-1, 1, 20, dtype=torch.float64), seed=9)
    calls = []

    def nan_after_three(X):
        calls.append(1)
        Y = A.to(X.device) @ X
        if len(calls) > 3:
            Y = Y.clone()
            Y[5] = math.nan
        return Y

    with sim():
        op = rg.linalg.aslinearoperator(nan_after_three, shape=(20, 20), dtype=torch.float64,
                                        device="cuda", symmetric=True)
        with pytest.raises(rg.linalg.NonFiniteError,
                           match=r"eigsh: .* at Lanczos step 3: 1 NaN and 0 inf values \(of 20\)"):
            rg.linalg.eigsh(op, k=2)


def test_randomized_svd_reads_its_diagnostics_back_in_one_transfer():
    """The residuals, error bounds, convergence flags and rounding of every problem come to the host
    together: svd.py's finish() costs one sync (five .cpu() calls before, one per tensor)."""
    g = torch.Generator().manual_seed(8)
    A = torch.randn(4, 60, 40, generator=g, dtype=torch.float64)
    with sim():
        res = rg.linalg.randomized_svd(A.cuda(), k=3, power_iters="auto", seed=3)  # iterates to tol
        finish_syncs = sum(n for (_, site), n in cudasim.SYNCS.items() if "svd.py" in site and "finish" in site)
    assert finish_syncs <= 1, cudasim.report("randomized_svd")
    ref = torch.linalg.svdvals(A)[..., :3]
    assert res.residuals.device.type == "cpu" and res.converged.dtype == torch.bool and bool(res.converged.all())
    # the error bounds that came back cover the true error of every singular value
    assert bool(((host(res.S) - ref).abs() <= res.error_bound.to(ref.dtype) + 1e-12).all())
