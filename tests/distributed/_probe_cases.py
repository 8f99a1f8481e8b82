"""The probe-parallel cases (``distributed="probes"`` of slq_density, trace and hessian_spectrum)
and the analyses' parameter check across ranks: what each rank computes.

:func:`compute_probes` runs in every worker (``parallel=True``: inside the gloo group, the
probes split across the ranks) and in the test process (``parallel=False``: one process, the
ground truth), on the same operators with the same seeds. :func:`probe_failures` holds what
only the workers check (seed=None, a divergent operator, a failing memory plan on one rank, a
data-parallel operator refused, a rank with other model parameters in the analyses).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from resgeom_fast.analysis import alignment as alignment_mod
from resgeom_fast.analysis.alignment import residual_alignment
from resgeom_fast.analysis.collapse import collapse
from resgeom_fast.analysis.singularities import singularities
from resgeom_fast.analysis.spectrum import hessian_spectrum
from resgeom_fast.core import distributed as rdist
from resgeom_fast.linalg._memory import lanczos_bytes
from resgeom_fast.linalg import DenseOperator, slq_density, trace
from tests.distributed._analysis_cases import _alignment_x, align_model, conv_model
from tests.distributed._cases import CASES, CE, fc_model, operator

#: (probes, steps) of the SLQ cases: 4 probes (3 ranks: 2, 1, 1), 2 probes (3 ranks: one without)
SLQ_CASES = ((4, 12), (2, 9))
#: trace budgets: Hutch++ 9 (sketch 3, 3 probes), Hutch++ 7 (sketch 2: a rank without sketch
#: column in a group of 3), Hutchinson 2 (a rank without probe in a group of 3)
TRACE_CASES = (("hutch++", 9), ("hutch++", 7), ("hutchinson", 2))
#: a memory limit under which one process runs the 30-probe trace of the n = 40 float64 matrix in
#: column chunks of 5 (tests/linalg/test_memory_plan.py checks the plan itself)
TRACE_LIMIT = 14_000


def _matrix(n: int, seed: int, batch: tuple[int, ...] = ()) -> Tensor:
    """A symmetric float64 [*batch, n, n] with a spread spectrum (no exact invariant subspace)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return (A + A.transpose(-1, -2)) / 2


def _data(n: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _slq(out: dict[str, Any], key: str, res: Any) -> None:
    for f in ("nodes", "weights", "density", "density_std", "moments", "moments_std", "grid", "exhausted"):
        out[f"{key}/{f}"] = getattr(res, f)
    out[f"{key}/sigma"] = res.sigma


def _trace(out: dict[str, Any], key: str, res: Any) -> None:
    for f in ("estimate", "stderr", "rounding"):
        out[f"{key}/{f}"] = getattr(res, f)
    out[f"{key}/method"] = res.method


class SVDBatches:
    """Records the batch of every operator the alignment's randomized SVD runs on (the samples
    a rank holds in its SVD blocks [n, D, k + p])."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.real = alignment_mod.randomized_svd

    def __enter__(self) -> "SVDBatches":
        def recording(op, *a, **kw):
            self.sizes.append(int(op.batch_shape[0]))
            return self.real(op, *a, **kw)

        alignment_mod.randomized_svd = recording
        return self

    def __exit__(self, *exc: Any) -> None:
        alignment_mod.randomized_svd = self.real


def compute_alignment_local(world: int, rank: int, parallel: bool) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """residual_alignment with fixed power iterations (the sample-local mode of a distributed run:
    each rank's SVDs on its own samples) for every case of tests.distributed._analysis_cases,
    the FC net and the conv net per stage; and the batch of every SVD (per case)."""
    out: dict[str, Any] = {}
    batches: dict[str, list[int]] = {}
    for case in CASES:
        for net, model, shape in (("fc", align_model(), (4,)), ("conv", conv_model(), (1, 6, 6))):
            x, y, amode = _alignment_x(case, world, rank, shape, parallel)
            with SVDBatches() as rec:
                res = residual_alignment(model, x, k=2, y=y, per_stage=(net == "conv"), seed=3, power_iters=8,
                                         distributed=amode)
            out[f"{case}/{net}/alignment_local"] = res.to_dict()
            out[f"{case}/{net}/alignment_local/accuracy"] = res.accuracy()
            batches[f"{case}/{net}"] = rec.sizes
    return out, batches


def compute_probes(parallel: bool) -> dict[str, Any]:
    """Every probe-parallel quantity, in a group (``parallel``) or in one process."""
    kw: dict[str, Any] = {"distributed": "probes"} if parallel else {}
    out: dict[str, Any] = {}
    ops = {"dense": DenseOperator(_matrix(40, 0)), "batched": DenseOperator(_matrix(30, 1, (2,)))}
    # a Hessian of a float64 FCResNet, single-process on the full data on every rank
    ops["hessian"] = operator("hessian", fc_model(), _data(), None, hvp="double_backward")
    for name, op in ops.items():
        for probes, steps in SLQ_CASES:
            _slq(out, f"{name}/slq{probes}", slq_density(op, probes=probes, steps=steps, seed=5, **kw))
        for method, budget in TRACE_CASES:
            _trace(out, f"{name}/{method}{budget}", trace(op, probes=budget, method=method, seed=4, **kw))
    # groups of probes (a memory limit that fits one probe's basis at a time): same quadrature
    op = ops["dense"]
    # one probe's Lanczos buffers and all start vectors (float64, and their int8 draw) fit, two probes' do not
    limit = lanczos_bytes(40, 1, 12, 8, "full")[1] + 4 * 40 * (8 + 1)
    assert limit < lanczos_bytes(40, 2, 12, 8, "full")[1]
    _slq(out, "dense/slq_grouped", slq_density(op, probes=4, steps=12, seed=5, memory_limit=limit, **kw))
    res = slq_density(op, probes=4, steps=12, seed=5, reorth="local", **kw)
    _slq(out, "dense/slq_local", res)
    # the trace's column chunks (a memory limit below all columns at once): same estimate
    _trace(out, "dense/trace_chunked", trace(op, probes=30, seed=4, memory_limit=TRACE_LIMIT, **kw))
    # hessian_spectrum with the probes split (eigsh replicated, rank 0's taken)
    spec = hessian_spectrum(fc_model(), CE, _data(), k=2, probes=3, steps=8, trace_probes=7, grid_points=20,
                            hvp="double_backward", seed=2, max_bracket=1.0, **kw)
    fields = ("eigenvalues", "residuals", "trace", "trace_stderr", "nodes", "weights", "density", "grid", "sigma",
              "degeneracy_fraction", "negative_fraction", "lanczos_steps", "converged", "notes")
    d = spec.to_dict()
    for f in fields:
        out[f"spectrum/{f}"] = d[f]
    out["spectrum/products"] = spec.products
    # the same with data-parallel operators (each rank half of the samples; everything replicated)
    split = hessian_spectrum(fc_model(), CE, _data(), k=2, probes=3, steps=8, trace_probes=7, grid_points=20,
                             hvp="double_backward", seed=2, max_bracket=1.0,
                             **({"distributed": "split"} if parallel else {}))
    d = split.to_dict()
    for f in fields + ("num_samples", "products"):
        out[f"spectrum_split/{f}"] = d[f]
    return out


def _error(call: Any) -> str:
    try:
        call()
        return "no error"
    except Exception as exc:  # the test reads the type and the message
        return f"{type(exc).__name__}: {exc}"


def probe_failures(world: int, rank: int) -> dict[str, Any]:
    """What only the workers check; every entry must be the same kind of outcome on every rank."""
    out: dict[str, Any] = {}
    op = DenseOperator(_matrix(40, 0))
    # each rank planned (and ran) its own share only
    out["share/slq"] = slq_density(op, probes=4, steps=6, distributed="probes").memory.choice
    out["share/trace"] = trace(op, probes=9, distributed="probes").memory.choice
    out["seed_none/slq"] = slq_density(op, probes=3, steps=6, seed=None, distributed="probes").nodes
    out["seed_none/trace"] = trace(op, probes=7, seed=None, distributed="probes").estimate
    # the last rank holds another matrix: every rank refuses
    other = DenseOperator(_matrix(40, 0) + (1e-6 if rank == world - 1 else 0.0))
    out["divergent/slq"] = _error(lambda: slq_density(other, probes=3, steps=6, distributed="probes"))
    out["divergent/trace"] = _error(lambda: trace(other, probes=7, distributed="probes"))
    # the memory plan of one rank (the last) refuses: every rank raises its error, none waits
    limit = 1000 if rank == world - 1 else None
    out["memory/slq"] = _error(lambda: slq_density(op, probes=3, steps=6, memory_limit=limit, distributed="probes"))
    out["memory/trace"] = _error(lambda: trace(op, probes=9, memory_limit=limit, distributed="probes"))
    # a data-parallel operator is refused (its products are collectives)
    H = operator("hessian", fc_model(), _data(), "split")
    out["data_parallel"] = _error(lambda: slq_density(H, probes=2, steps=4, distributed="probes"))
    out["after"] = trace(op, probes=9, seed=4, distributed="probes").estimate     # the group still works
    # the analyses refuse a rank whose model differs from rank 0's
    model = fc_model()
    if rank == world - 1:
        with torch.no_grad():
            model.head.weight[0, 0] += 1e-3
    x, y = _data()
    out["params/collapse"] = _error(lambda: collapse(model, (x, y), distributed="split"))
    out["params/singularities"] = _error(lambda: singularities(model, (x, y), distributed="split"))
    out["params/alignment"] = _error(lambda: residual_alignment(model, x, k=2, distributed="split"))
    out["params/spectrum"] = _error(lambda: hessian_spectrum(model, CE, (x, y), k=2, probes=2, steps=4,
                                                             trace_probes=3, distributed="probes"))
    out["rank"] = rdist.rank()
    return out
