"""Spectral density by stochastic Lanczos quadrature (SLQ), and rigorous brackets of the mass
that the probes' spectral measures put on an interval (:func:`interval_mass`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.core.distributed import gather_shares, raise_together
from resgeom_fast.core.heap import release
from resgeom_fast.linalg._memory import MemoryPlan, basis_slots, check_memory_limit, plan_slq
from resgeom_fast.linalg._probes import agreed_seed, check_probe_mode, check_same_operator, probe_share, rademacher_share
from resgeom_fast.linalg._util import check_choice, check_int, generator, rademacher
from resgeom_fast.linalg.lanczos import REORTH, Lanczos
from resgeom_fast.linalg.operator import NonFiniteError, aslinearoperator


@dataclass
class SLQResult:
    """SLQ spectral density of each problem of a (batched) symmetric operator.

    Attributes:
        nodes: [*batch, probes, m] Ritz values (Gauss nodes) per probe, float64.
        weights: [*batch, probes, m] Gauss weights per probe (each probe's sum to 1).
        grid: [g] points where the density is evaluated (shared by all problems).
        density: [*batch, g] mean over probes of the smoothed densities (integrates to ~1).
        density_std: [*batch, g] standard deviation over probes (the per-probe spread).
        moments: [*batch, K + 1] estimates of tr(A^k) = n * E[sum_i tau_i theta_i^k], k = 0..K.
        moments_std: [*batch, K + 1] standard error of the moment estimates over probes.
        sigma: Gaussian width used; dim: n; steps: m.
        alpha: [*batch, probes, m] float64, the diagonal of each probe's Lanczos tridiagonal T.
        beta: [*batch, probes, m - 1] float64, its off-diagonal (exactly 0 where Lanczos broke
            down and restarted: T splits into blocks and the first block's quadrature is exact).
        exhausted: [*batch, probes] bool, the probe's Krylov space was exhausted (a breakdown,
            or m = n): its quadrature *is* its spectral measure (up to rounding), not only a
            Gauss rule of it (what :func:`interval_mass` uses to close its brackets).
        memory: the memory plan checked before any basis was allocated: the probes' grouping,
            the reorthogonalisation run and, where it changes the accuracy, why
            (:class:`~resgeom_fast.linalg._memory.MemoryPlan`).
        orthogonality: [*batch, probes] float64, the largest overlap |v_i . v_j| (i != j)
            measured between the probe's Lanczos vectors (the CPU's one-sweep full
            reorthogonalisation measures it every step, :class:`~resgeom_fast.linalg.lanczos.Lanczos`;
            working precision is ~1e-7 in float32, ~1e-14 in float64); None where it was not
            measured (CUDA, ``reorth="local"``).
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    density_std: Tensor
    moments: Tensor
    moments_std: Tensor
    sigma: float
    dim: int
    steps: int
    alpha: Optional[Tensor] = None
    beta: Optional[Tensor] = None
    exhausted: Optional[Tensor] = None
    memory: Optional[MemoryPlan] = None
    orthogonality: Optional[Tensor] = None

    def quadrature(self, steps: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The Gauss rule of the first ``steps`` Lanczos steps of every probe (what a run with
        ``steps`` steps and the same probes would have returned): ``(nodes, weights, exhausted)``,
        shapes [*batch, probes, steps] x 2 and [*batch, probes]. Free: T's leading block.

        Args:
            steps: 1 <= steps <= self.steps (default: all of them).
        """
        if self.alpha is None or self.beta is None:
            raise ValueError("quadrature: this SLQResult carries no tridiagonals (alpha/beta)")
        s = self.steps if steps is None else check_int("quadrature", "steps", steps, 1, self.steps)
        if s == self.steps:
            return self.nodes, self.weights, self.exhausted
        *lead, p, _ = self.alpha.shape
        d = self.alpha[..., :s].reshape(-1, s)
        e = self.beta[..., : s - 1].reshape(d.shape[0], s - 1)
        nodes, weights = ops.tridiag_eigh(d, e)
        exhausted = (e == 0).any(-1) if s > 1 else torch.zeros(d.shape[0], dtype=torch.bool, device=d.device)
        exhausted = exhausted | (s >= self.dim)
        return nodes.reshape(*lead, p, s), weights.reshape(*lead, p, s), exhausted.reshape(*lead, p)

    @property
    def lambda_min(self) -> Tensor:
        return self.nodes.amin((-2, -1))

    @property
    def lambda_max(self) -> Tensor:
        return self.nodes.amax((-2, -1))

    def to_dict(self) -> dict:
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "density_std": self.density_std.tolist(),
            "moments": self.moments.tolist(),
            "moments_std": self.moments_std.tolist(),
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "sigma": self.sigma,
            "dim": self.dim,
            "steps": self.steps,
            "exhausted": None if self.exhausted is None else self.exhausted.tolist(),
            "memory": None if self.memory is None else self.memory.to_dict(),
            "orthogonality": None if self.orthogonality is None else self.orthogonality.tolist(),
        }


def _run_probes(op, v0: Tensor, steps: int, gen: torch.Generator, plan: MemoryPlan,
                where: str) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos on the start vectors ``v0`` [b, p, n] (p >= 1) under ``plan`` (all at once, or in
    its sequential groups, whose bases share one allocation): the tridiagonals ``(alpha [b, p, m],
    beta [b, p, m - 1])`` float64 and the measured orthogonality [b, p] (NaN: not measured)."""
    b, p, n = v0.shape
    ds, es, os_ = [], [], []
    # sequential groups share one basis allocation: a fresh one per group is mapped and faulted in
    # again page by page (torchvision resnet18, 10 probes x 100 steps in 4 groups on 24 GB: 13M
    # page faults, 121 s of system time in an 805 s run); a single group allocates its own
    storage = None
    if plan.group < p:
        release()
        storage = torch.empty(b * plan.group * basis_slots(steps, n, plan.reorth) * n, dtype=op.dtype,
                              device=op.device)
    for g0 in range(0, p, plan.group):
        g = min(plan.group, p - g0)
        lz = Lanczos(op, v0[:, g0 : g0 + g].reshape(b * g, n), g, steps, where, gen, reorth=plan.reorth,
                     basis=storage)
        m = lz.advance(steps)
        dg, eg = lz.tridiagonal()
        ds.append(dg.reshape(b, g, m))
        es.append(eg.reshape(b, g, max(m - 1, 0)))
        orth = (lz.orthogonality.to(dg.device) if lz.orthogonality is not None
                else torch.full((b * g,), float("nan"), dtype=torch.float64, device=dg.device))
        os_.append(orth.reshape(b, g))
        del lz
    if len(ds) == 1:
        return ds[0], es[0], os_[0]
    return torch.cat(ds, 1), torch.cat(es, 1), torch.cat(os_, 1)


def slq_density(
    op,
    probes: int = 10,
    steps: int = 100,
    grid: Optional[Tensor] = None,
    grid_size: int = 1000,
    sigma: Optional[float] = None,
    sigma0: float = 0.01,
    num_moments: int = 4,
    seed: Optional[int] = 0,
    reorth: str = "full",
    memory_limit: Optional[int] = None,
    distributed: Optional[str] = None,
) -> SLQResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``probes`` Rademacher vectors normalised to unit length advance together as one batch
    through ``steps`` Lanczos steps with full reorthogonalisation (one batched matmat a step);
    each tridiagonal T gives nodes theta_i (eigenvalues) and weights tau_i (squared first
    eigenvector components) via :func:`resgeom_fast.ops.tridiag_eigh`. The density
    ``(1/probes) sum_probes sum_i tau_i g(t - theta_i)`` uses a Gaussian g of width
    ``sigma = sigma0 * (lambda_max - lambda_min)`` (docs/science.md section 2) unless ``sigma`` is
    given; lambda_min/max are the extreme nodes over all probes (and problems). The default grid
    spans [lambda_min - 5 sigma, lambda_max + 5 sigma] with ``grid_size`` points.

    ``reorth="full"`` (default, docs/science.md section 2) stores the whole basis ([b * probes, steps, n]) and
    reorthogonalises every step against it; ``reorth="local"`` keeps two vectors per probe and
    runs the plain three-term recurrence (see :class:`~resgeom_fast.linalg.lanczos.Lanczos`):
    O(n) memory per probe and no basis traffic, at the price of spurious copies of converged
    nodes (their weights split, the quadrature stays consistent). Use it when the basis does not
    fit in memory or its traffic dominates (cheap operators, huge n). ``reorth="auto"``: "full"
    when one probe's basis fits in memory, else "local" (stated in ``memory.accuracy_note``).

    Memory (``memory_limit``: bytes the run may use; default the free memory of the operator's
    device, :mod:`resgeom_fast.linalg._memory`): planned before any basis is allocated. When the
    basis of all probes does not fit, the probes run in sequential groups, each with its own basis
    (the same quadrature: the probes are independent; only the rounding of the batched products
    differs); when nothing fits, :class:`~resgeom_fast.linalg._memory.InsufficientMemoryError`
    names the bytes needed and available and the settings that would fit. ``memory`` records
    the plan.

    The Rademacher probes are drawn on the operator's device (on CUDA from a device generator
    seeded from ``seed``: reproducible per device). Host syncs: one per 10 Lanczos steps (see
    :class:`~resgeom_fast.linalg.lanczos.Lanczos`) and one for the node range.

    Distributed (docs/distributed.md): ``distributed=None`` (default) runs on this process; with a
    data-parallel operator (``op.distributed`` set) every rank runs the same probes (replicated)
    and stores the basis of all of them. ``distributed="probes"`` (an initialised process group,
    a single-process operator on the full data on every rank): every rank draws all probes from
    ``seed`` as one process does (``seed=None``: rank 0's, broadcast), keeps its contiguous share
    (the first ``probes % world`` ranks one more; a rank may have none), runs Lanczos on it and
    ONE all_reduce gathers the tridiagonals (exactly: zeros outside a rank's rows), so every rank
    returns the single-process result (nodes and weights equal up to the rounding of the batched
    products). Per rank it stores only its share's basis, ``[b * share, steps, n]`` ("full"), and
    the memory plan (``memory``, this rank's) is made for that share. Before the probes, one
    product of a fixed vector is compared across ranks (a rank with another operator raises
    :class:`~resgeom_fast.core.distributed.DivergentRanksError` everywhere), and a failure on one
    rank (:class:`~resgeom_fast.linalg._memory.InsufficientMemoryError`, a non-finite product) is
    raised on every rank. Limit: a probe whose Krylov space is exhausted restarts from a random
    vector drawn from its rank's generator, so the nodes after such a breakdown (weight 0; only
    with steps near n or exact invariant subspaces) differ from one process's.
    """
    where = "slq_density"
    op = aslinearoperator(op, where=where)
    if op.shape[0] != op.shape[1] or not op.symmetric:
        raise ValueError(f"{where}: expected a symmetric square operator, got {op!r}")
    n = op.shape[0]
    check_int(where, "probes", probes, 1)
    check_int(where, "steps", steps, 1)
    check_int(where, "grid_size", grid_size, 2)
    check_int(where, "num_moments", num_moments, 0)
    if n == 0:
        raise ValueError(f"{where}: expected a non-empty operator, got shape {op.shape}")
    check_choice(where, "reorth", reorth, REORTH + ("auto",))
    memory_limit = check_memory_limit(where, memory_limit)
    b = op.batch_size
    m = min(steps, n)
    if not check_probe_mode(where, distributed, op):
        gen = generator(seed, op)
        v0 = rademacher((b * probes, n), gen, op.dtype, op.device)
        plan = plan_slq(n, b, probes, steps, op.dtype, op.device, reorth, memory_limit, where)
        d, e, orth = _run_probes(op, v0.reshape(b, probes, n), steps, gen, plan, where)
    else:
        gen = generator(agreed_seed(where, seed))
        offset, mine, sizes = probe_share(probes)
        check_same_operator(where, op)
        exc: Optional[BaseException] = None
        d = torch.zeros(b, mine, m, dtype=torch.float64, device=op.device)
        e = torch.zeros(b, mine, max(m - 1, 0), dtype=torch.float64, device=op.device)
        orth = torch.zeros(b, mine, dtype=torch.float64, device=op.device)
        plan = None
        try:
            plan = plan_slq(n, b, mine, steps, op.dtype, op.device, reorth, memory_limit, where,
                            drawn=b * probes * n, share=(mine, probes))
        except Exception as err:
            exc = err
        raise_together(where, exc)       # a rank whose plan fails stops every rank before any product
        try:
            v0 = rademacher_share((b, probes, n), 1, offset, mine, gen, op.dtype, op.device)
            if mine:
                d, e, orth = _run_probes(op, v0, steps, gen, plan, where)
            del v0
        except Exception as err:  # raised on every rank by the gather
            exc = err
        d, e, orth = gather_shares(where, [d.reshape(b, mine, m), e.reshape(b, mine, max(m - 1, 0)),
                                           orth.reshape(b, mine)], sizes, dim=1, exc=exc)
    d = d.reshape(b * probes, m)
    e = e.reshape(b * probes, max(m - 1, 0))
    nodes, weights = ops.tridiag_eigh(d, e)  # [P, m] float64
    # exhausted Krylov space: a breakdown (Lanczos sets the coupling to exactly 0) or m = n
    exhausted = (e == 0).any(-1) if m > 1 else torch.zeros(d.shape[0], dtype=torch.bool, device=d.device)
    exhausted = exhausted | (m >= n)

    lo, hi = torch.stack([nodes.min(), nodes.max()]).tolist()     # one host sync for both
    width = hi - lo
    if sigma is None:
        if not sigma0 > 0:
            raise ValueError(f"{where}: expected sigma0 > 0, got {sigma0}")
        sigma = sigma0 * width if width > 0 else sigma0 * max(abs(hi), 1.0)
    elif not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"{where}: expected sigma a positive number, got {sigma!r}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64, device=op.device)
    else:
        if not isinstance(grid, Tensor) or grid.dim() != 1 or grid.numel() < 1:
            raise ValueError(f"{where}: expected grid a 1-D tensor, got {grid!r}")
        grid = grid.to(device=op.device, dtype=torch.float64)
    per_probe = ops.density_smooth(nodes, weights, grid, float(sigma))  # [P, g]
    per_probe = per_probe.reshape(*op.batch_shape, probes, -1)
    powers = torch.stack([(weights * nodes**k).sum(-1) for k in range(num_moments + 1)], -1) * n
    powers = powers.reshape(*op.batch_shape, probes, num_moments + 1)
    std = lambda x: x.std(-2, unbiased=True) if probes > 1 else torch.full_like(x[..., 0, :], float("nan"))  # noqa: E731
    return SLQResult(
        nodes=nodes.reshape(*op.batch_shape, probes, m),
        weights=weights.reshape(*op.batch_shape, probes, m),
        grid=grid,
        density=per_probe.mean(-2),
        density_std=std(per_probe),
        moments=powers.mean(-2),
        moments_std=std(powers) / probes**0.5,
        sigma=float(sigma),
        dim=n,
        steps=m,
        alpha=d.reshape(*op.batch_shape, probes, m),
        beta=e.reshape(*op.batch_shape, probes, max(m - 1, 0)),
        exhausted=exhausted.reshape(*op.batch_shape, probes),
        memory=plan,
        orthogonality=None if bool(orth.isnan().all()) else orth.reshape(*op.batch_shape, probes),
    )


@dataclass
class IntervalMass:
    """The mass each probe's spectral measure puts on an open interval (a, b), with brackets.

    For a unit probe v and the symmetric A = sum_j lambda_j u_j u_j^T, the spectral measure is
    ``mu_v = sum_j (v . u_j)^2 delta(lambda_j)``; ``n * E[mu_v(I)]`` over Rademacher probes is the
    number of eigenvalues in I, so ``mean_probes mu_v(I)`` estimates the fraction of the spectrum
    in I. All tensors are [*batch, probes] float64.

    Attributes:
        gauss: the Gauss rule's mass ``sum_{theta_i in I} tau_i`` (the usual SLQ estimate).
        lower, upper: rigorous bounds of ``mu_v(I)`` from the Chebyshev-Markov-Stieltjes
            inequalities (exact arithmetic); equal to ``gauss`` for an exhausted Krylov space.
    """

    gauss: Tensor
    lower: Tensor
    upper: Tensor


def interval_mass(nodes: Tensor, weights: Tensor, a: float, b: float,
                  exhausted: Optional[Tensor] = None) -> IntervalMass:
    """Mass of the open interval ``(a, b)`` under each probe's spectral measure, bracketed.

    Chebyshev-Markov-Stieltjes (Szego, Orthogonal Polynomials, Thm 3.41.1; Akhiezer): if
    ``theta_1 < ... < theta_m`` and ``tau_i`` are the nodes and weights of the m-point Gauss rule of
    a measure mu with distribution function F(t) = mu((-inf, t]), then
    ``sum_{i<k} tau_i <= F(theta_k - 0)`` and ``F(theta_k) <= sum_{i<=k} tau_i``. Hence, for t in
    [theta_k, theta_{k+1}), both F(t) and F(t - 0) lie in ``[C_{k-1}, C_{k+1}]`` (C_j the sum of the
    first j weights; C_0 = 0, C_{m+1} = 1), and ``mu((a, b)) = F(b - 0) - F(a)`` lies in
    ``[L(b - 0) - U(a), U(b - 0) - L(a)]``, clipped to [0, 1]. The bracket's width is the weight of
    the (at most four) nodes next to the two ends: it closes as Lanczos places more nodes, with
    small weights, around a and b -- it does *not* close when a heavy node (a cluster) sits alone
    between them, because the rule cannot tell a spike from mass spread between its neighbours.
    Where ``exhausted`` (the Krylov space was exhausted: breakdown or m = n), the quadrature *is*
    the measure and the bracket is the Gauss value itself. With rounding (Lanczos in floating
    point, ``reorth="local"`` ghosts) the bounds hold to the accuracy of the computed rule.

    Args:
        nodes: [*batch, m] Gauss nodes (any order); weights: [*batch, m], non-negative.
        a, b: the open interval's ends, a < b; ``a = -inf`` / ``b = inf`` allowed.
        exhausted: optional [*batch] bool (:attr:`SLQResult.exhausted`).

    Returns:
        an :class:`IntervalMass` of [*batch] float64 tensors.
    """
    where = "interval_mass"
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or math.isnan(a) or math.isnan(b) or not a < b:
        raise ValueError(f"{where}: expected ends a < b (not NaN), got a={a!r}, b={b!r}")
    if not isinstance(nodes, Tensor) or not isinstance(weights, Tensor) or nodes.shape != weights.shape or nodes.dim() < 1:
        raise ValueError(f"{where}: expected nodes and weights tensors of one shape [*batch, m], got "
                         f"{getattr(nodes, 'shape', type(nodes).__name__)} and {getattr(weights, 'shape', type(weights).__name__)}")
    if not (bool(torch.isfinite(nodes).all()) and bool(torch.isfinite(weights).all())):
        raise NonFiniteError(f"{where}: expected finite nodes and weights, got NaN or inf")
    x, order = torch.sort(nodes.double(), dim=-1)
    w = torch.gather(weights.double(), -1, order)
    m = x.shape[-1]
    C = torch.cat([torch.zeros_like(w[..., :1]), torch.cumsum(w, -1)], -1)   # [*batch, m + 1], C[j]
    C = torch.cat([C, C[..., -1:]], -1)                                       # C_{m+1} := C_m (= 1)

    def take(k: Tensor) -> Tensor:
        return torch.gather(C, -1, k.clamp(0, m + 1).unsqueeze(-1)).squeeze(-1)

    def f_bounds(count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # count = number of nodes at or left of the point: F there lies in [C_{k-1}, C_{k+1}]
        return take(count), take(count - 1), take(count + 1)

    if math.isinf(b) and b > 0:
        kb = torch.full(x.shape[:-1], m, dtype=torch.long, device=x.device)
    else:
        kb = (x < b).sum(-1)                       # F(b - 0): nodes strictly left of b
    gb, lb, ub = f_bounds(kb)
    if math.isinf(a) and a < 0:                    # F(-inf) = 0 exactly
        ga = la = ua = torch.zeros_like(gb)
    else:
        ga, la, ua = f_bounds((x <= a).sum(-1))    # F(a): nodes at or left of a
    if math.isinf(b) and b > 0:                    # F(inf - 0) = total mass exactly
        lb = ub = gb
    gauss = (gb - ga).clamp(0.0, 1.0)
    lower = (lb - ua).clamp(0.0, 1.0)
    upper = (ub - la).clamp(0.0, 1.0)
    if exhausted is not None:
        ex = exhausted.to(device=gauss.device, dtype=torch.bool).expand_as(gauss)
        lower = torch.where(ex, gauss, lower)
        upper = torch.where(ex, gauss, upper)
    return IntervalMass(gauss=gauss, lower=torch.minimum(lower, gauss), upper=torch.maximum(upper, gauss))
