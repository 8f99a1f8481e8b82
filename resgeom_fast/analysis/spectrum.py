"""Hessian spectra of a loss (docs/science.md section 2, Orhan & Pitkow 2018).

:func:`hessian_spectrum` turns the curvature operator of a model's mean loss
(:func:`resgeom_fast.operators.hessian`, or :func:`~resgeom_fast.operators.ggn`) into

- the extreme eigenvalues at both ends (Lanczos with full reorthogonalisation,
  :func:`resgeom_fast.linalg.eigsh` with ``which="both"``), with true residual norms and a
  convergence flag;
- the trace (Hutch++ or Hutchinson, :func:`resgeom_fast.linalg.trace`) and its standard error;
- the spectral density by stochastic Lanczos quadrature (:func:`resgeom_fast.linalg.slq_density`):
  Gauss nodes and weights of every probe, the smoothed density on a grid with its per-probe
  spread, and the spectral moments ``tr(H^k) ~ dim * mean_probes sum_i tau_i theta_i^k``;
- spectral mass fractions, each with an honest interval (:class:`MassFraction`):
  degenerate mass under a *relative* threshold (``|lambda| < eps * lambda_max``, the
  definition of docs/science.md section 2) and under an *absolute* one (``|lambda| < abs_eps``), negative mass
  (``lambda < 0``) and significant negative mass (``lambda < -eps * lambda_max``).

Mass fractions (our reading; the paper leaves the estimator open). The fraction of eigenvalues in
an interval I is ``E_v[mu_v(I)]``, ``mu_v`` the spectral measure of a unit Rademacher probe v
(``E[v v^T] = I / P`` exactly). Per probe, m Lanczos steps give the m-point Gauss rule of
``mu_v``; its mass in I (``sum_{theta_i in I} tau_i``, the usual SLQ estimate, ``value``) jumps
by a whole node weight whenever a node crosses an end of I, so on its own it does not converge
smoothly with m (measured on a trained net: 0.96 at 10 steps, 0.00 at 20, 0.76 at 40). The
Chebyshev-Markov-Stieltjes inequalities bracket ``mu_v(I)`` rigorously from the same rule
(:func:`resgeom_fast.linalg.interval_mass`): the bracket's width is the weight of the nodes next
to I's ends, and it closes as m grows (exactly, once the probe's Krylov space is exhausted).
Each fraction reports the Gauss ``value`` with its probe standard error, the quadrature bracket
(mean over probes of the per-probe brackets) and ``lower`` / ``upper``: the bracket widened by
``3`` probe standard errors (an interval for the *spectrum's* fraction, covering quadrature and
probe error; with one probe the probe error is unknown and the interval is the bracket only).
A fraction whose quadrature bracket is wider than ``max_bracket`` is *unresolved* at these
settings: ``summary()`` reports None for it (with the interval), a warning names it, and its
``note`` says why. The same probes' first ``m // 2`` steps give the convergence check
(``half_steps``). ``lambda_max`` is the largest eigenvalue found by Lanczos (:func:`eigsh`); if it
is not positive, ``max |lambda|`` of the computed extreme eigenvalues is used instead.

Relative versus absolute threshold: the relative threshold follows docs/science.md section 2, but it scales with
``lambda_max``, so comparing nets with different ``lambda_max`` (e.g. a plain net's 51 versus a
residual net's 2.1 on digits) compares different absolute cut-offs; the absolute threshold
(default ``abs_eps = 1e-3``, the relative one's value for ``lambda_max = 1``; the mean loss's
Hessian has units of loss / parameter^2) compares nets at one cut-off. Report both; a conclusion
that holds under one only is a statement about the threshold, not about degeneracy.

The sign of eigenvalues inside an (exactly or nearly) degenerate cluster at 0 is rounding, so
``negative_fraction`` (lambda < 0, docs/science.md section 2) brackets the null space's mass on either
side and rarely resolves where there is one; ``significant_negative_fraction`` (disjoint from the
degenerate mass) is the well-defined one.

``per_block=True`` repeats all of it for the diagonal Hessian block of every residual block
(:func:`resgeom_fast.operators.block_hessians`; for ``operator="ggn"`` the GGN restricted to the
block's parameters). SLQ steps are capped at each block's dimension and ``k`` at its dimension
(each capped setting is stated in that spectrum's ``notes``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core import distributed as rdist
from resgeom_fast.core.checks import ArgumentValueError, check_module, check_type
from resgeom_fast import linalg, operators
from resgeom_fast._progress import progress as progress_bar
# the memory plans (a private linalg module until linalg/__init__ exports them)
from resgeom_fast.linalg._memory import check_memory_limit, fmt_bytes, plan_eigsh, plan_slq, plan_trace
from resgeom_fast.analysis._common import Result, check_choice, check_float, check_int
from resgeom_fast.analysis.plotting import (
    as_result_dict, band, figure_axes, get_path, join, lines, scatter_column, vlines,
)

__all__ = ["K_MAX", "MassFraction", "Spectrum", "SpectrumResult", "hessian_spectrum", "plot_density",
           "plot_eigenvalues"]

_WHERE = "hessian_spectrum"
#: ``distributed=`` of :func:`hessian_spectrum` (None: one process)
DISTRIBUTED = ("split", "sharded", "probes")
#: the most extreme eigenvalues :func:`hessian_spectrum` computes (eigsh keeps a Lanczos basis of
#: up to max(300, 20 k) vectors of length P)
K_MAX = 500
#: probe standard errors added on each side of the quadrature bracket
_Z = 3.0
#: the fractions reported, in order: key -> (summary name, description)
FRACTIONS = {
    "degenerate_rel": ("degenerate_fraction_rel", "|lambda| < eps * lambda_max"),
    "degenerate_abs": ("degenerate_fraction_abs", "|lambda| < abs_eps"),
    "negative": ("negative_fraction", "lambda < 0"),
    "significant_negative": ("significant_negative_fraction", "lambda < -eps * lambda_max"),
}


@dataclass
class MassFraction(Result):
    """The fraction of the spectrum in an open interval, with its uncertainty (module doc).

    Attributes:
        name: "degenerate_rel", "degenerate_abs", "negative" or "significant_negative".
        interval: the open interval (a, b) (``-inf`` allowed; ``to_dict`` writes it as None).
        steps: m, the Lanczos steps of the quadrature; probes: the probes averaged.
        value: the Gauss rule's mass, mean over probes (the usual SLQ estimate).
        stderr: standard error of ``value`` over probes (probe error only; NaN with one probe).
        quadrature_lower, quadrature_upper: mean over probes of the rigorous per-probe brackets
            (Chebyshev-Markov-Stieltjes): where ``mean_probes mu_v(I)`` lies.
        lower, upper: the bracket widened by 3 probe standard errors (the largest of the
            bracket ends' and the value's), clipped to [0, 1]: the interval for the fraction of
            the spectrum. One probe: the bracket only (``note`` says so).
        resolved: ``quadrature_upper - quadrature_lower <= max_bracket``.
        half_steps: m // 2; half_value, half_lower, half_upper: value and quadrature bracket of
            the same probes after m // 2 steps (the convergence check).
        note: why the fraction is unresolved or its interval partial (None otherwise).
    """

    name: str
    interval: tuple[float, float]
    steps: int
    probes: int
    value: float
    stderr: float
    quadrature_lower: float
    quadrature_upper: float
    lower: float
    upper: float
    resolved: bool
    half_steps: int
    half_value: float
    half_lower: float
    half_upper: float
    note: Optional[str] = None


@dataclass
class Spectrum(Result):
    """The spectrum of one symmetric curvature operator (the whole Hessian or one block of it).

    Attributes:
        name: "all" for the whole operator, else the residual block's module name.
        dim: P, the operator's dimension (number of parameters it acts on).
        eigenvalues: [k] float64, the extreme eigenvalues in ascending order: floor(k/2) from the
            bottom (most negative) and ceil(k/2) from the top (most positive).
        residuals: [k] float64, true residual norms ``||H x - lambda x||`` of the Ritz pairs.
        converged: every wanted Ritz pair met eigsh's relative tolerance.
        lanczos_steps: Lanczos steps eigsh took.
        trace: estimate of tr(H); trace_stderr: its error, ``sqrt(probe stderr^2 + rounding^2)``
            (:class:`~resgeom_fast.linalg.TraceResult`: the probes' standard error and a
            floating-point rounding floor, which dominates when Hutch++'s sketch spans the whole
            space; NaN with a single probe); trace_method: the method used.
        nodes: [probes, m] float64 SLQ Gauss nodes (Ritz values) per probe.
        weights: [probes, m] float64 Gauss weights per probe (each row sums to 1).
        grid: [g] float64 points of the density; density: [g] the SLQ density (mean over probes);
        density_std: [g] standard deviation of the per-probe densities (the spread band).
        moments: [K + 1] float64 estimates of tr(H^k), k = 0..K; moments_std: their standard errors.
        sigma: Gaussian width of the density; slq_steps: m, Lanczos steps per probe.
        threshold: eps * lambda_max, the relative degeneracy threshold.
        degeneracy_fraction: Gauss-rule mass with |lambda| < threshold (the relative one; its
            interval and resolution in ``fractions["degenerate_rel"]``); degeneracy_stderr: its
            standard error over probes (probe error only).
        negative_fraction: Gauss-rule mass with lambda < 0; negative_stderr: its standard error
            (see the module doc: the degenerate cluster's mass falls on either side of 0 by rounding).
        significant_negative_fraction: Gauss-rule mass with lambda < -threshold;
            significant_negative_stderr: its standard error.
        abs_threshold: abs_eps, the absolute degeneracy threshold; degeneracy_fraction_abs: the
            Gauss-rule mass with |lambda| < abs_threshold; degeneracy_abs_stderr: its standard error.
        fractions: {name: :class:`MassFraction`} for "degenerate_rel", "degenerate_abs",
            "negative", "significant_negative": value, intervals, resolution, convergence check.
        k_used: extreme eigenvalues computed (k, capped at dim for a block; ``notes`` says so).
        notes: settings capped by this operator's dimension, in words.
    """

    name: str
    dim: int
    eigenvalues: Tensor
    residuals: Tensor
    converged: bool
    lanczos_steps: int
    trace: float
    trace_stderr: float
    trace_method: str
    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    density_std: Tensor
    moments: Tensor
    moments_std: Tensor
    sigma: float
    slq_steps: int
    threshold: float
    degeneracy_fraction: float
    degeneracy_stderr: float
    negative_fraction: float
    negative_stderr: float
    significant_negative_fraction: float
    significant_negative_stderr: float
    abs_threshold: float = 1e-3
    degeneracy_fraction_abs: float = math.nan
    degeneracy_abs_stderr: float = math.nan
    fractions: dict[str, MassFraction] = field(default_factory=dict)
    k_used: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lambda_max(self) -> float:
        """Largest computed eigenvalue."""
        return float(self.eigenvalues[-1])

    @property
    def lambda_min(self) -> float:
        """Smallest (most negative) computed eigenvalue."""
        return float(self.eigenvalues[0])

    @property
    def unresolved(self) -> list[str]:
        """Names of the fractions whose quadrature bracket is wider than ``max_bracket``."""
        return [n for n, f in self.fractions.items() if not f.resolved]

    _place = {"lambda_max": "lanczos_steps", "lambda_min": "lambda_max", "unresolved": "fractions"}

    def _extra(self) -> dict[str, Any]:
        return {"lambda_max": self.lambda_max, "lambda_min": self.lambda_min, "unresolved": self.unresolved}

    def summary(self) -> dict[str, Optional[float]]:
        """Headline scalars: extreme eigenvalues, trace, the thresholds and the mass fractions.

        Keys: ``lambda_max``, ``lambda_min``, ``trace``; ``degenerate_threshold_rel`` (eps *
        lambda_max) and ``degenerate_threshold_abs`` (abs_eps); for each fraction ``F`` in
        ``degenerate_fraction_rel``, ``degenerate_fraction_abs``, ``negative_fraction``,
        ``significant_negative_fraction``: ``F`` (None when unresolved at these settings),
        ``F_lower`` and ``F_upper`` (the interval, always numbers); ``degeneracy_fraction`` is the
        old name of ``degenerate_fraction_rel`` (the relative threshold), kept for old reports.
        """
        s: dict[str, Optional[float]] = {
            "lambda_max": self.lambda_max, "lambda_min": self.lambda_min, "trace": self.trace,
            "degenerate_threshold_rel": self.threshold, "degenerate_threshold_abs": self.abs_threshold,
        }
        for key, (sname, _) in FRACTIONS.items():
            f = self.fractions.get(key)
            if f is None:
                continue
            s[sname] = float(f.value) if f.resolved else None
            if not f.resolved:
                s[f"{sname}_reason"] = (f"unresolved at steps={f.steps}: in [{float(f.lower):.3g}, "
                                        f"{float(f.upper):.3g}]; raise steps")
            s[f"{sname}_lower"] = float(f.lower)
            s[f"{sname}_upper"] = float(f.upper)
        if "degenerate_fraction_rel" in s:
            s["degeneracy_fraction"] = s["degenerate_fraction_rel"]
            if "degenerate_fraction_rel_reason" in s:
                s["degeneracy_fraction_reason"] = s["degenerate_fraction_rel_reason"]
        return s


@dataclass
class SpectrumResult(Spectrum):
    """Result of :func:`hessian_spectrum`: the :class:`Spectrum` of the whole operator (its fields
    directly on this object), the settings, and ``blocks``: one :class:`Spectrum` per residual
    block when ``per_block=True`` (else an empty list).

    Attributes (besides those of :class:`Spectrum`):
        operator: "hessian" or "ggn"; batchnorm: "eval" or "train".
        num_samples: samples the loss is averaged over.
        param_names: names of the parameters spanning the vector space, in order.
        eps, abs_eps, max_bracket, k, probes, steps, trace_probes, sigma0, seed: the arguments used.
        hvp: the product method asked for ("auto", "structured", ...); deterministic: the flag.
        hvp_methods: {pass width: method the operator used for passes of that many vectors}
            (from ``op.hvp_choice``; None where "auto" was still timing its candidates -- every
            product is exact either way), for the whole operator.
        products: Hessian-vector products applied (columns), all operators together.
    """

    operator: str = "hessian"
    batchnorm: str = "eval"
    num_samples: int = 0
    param_names: list[str] = field(default_factory=list)
    eps: float = 1e-3
    abs_eps: float = 1e-3
    max_bracket: float = 0.1
    k: int = 5
    probes: int = 10
    steps: int = 100
    trace_probes: int = 99
    sigma0: float = 0.01
    seed: int = 0
    hvp: str = "auto"
    deterministic: bool = False
    hvp_methods: dict[str, Optional[str]] = field(default_factory=dict)
    products: int = 0
    blocks: list[Spectrum] = field(default_factory=list)

    def summary(self) -> dict[str, Optional[float]]:
        """:meth:`Spectrum.summary` of the whole operator; with blocks also
        ``mean_block_degeneracy_fraction`` (relative threshold) and ``mean_block_negative_fraction``:
        means over blocks, None when a block's fraction is unresolved."""
        s = super().summary()
        if self.blocks:
            for key, fname in (("mean_block_degeneracy_fraction", "degenerate_rel"),
                               ("mean_block_negative_fraction", "negative")):
                fr = [b.fractions[fname] for b in self.blocks]
                s[key] = float(sum(f.value for f in fr) / len(fr)) if all(f.resolved for f in fr) else None
        return s

    def block(self, which: Union[int, str]) -> Spectrum:
        """The block spectrum by index or module name."""
        if isinstance(which, bool) or not isinstance(which, (int, str)):
            raise TypeError(f"block: expected an int index or a block name, got {type(which).__name__}")
        if not self.blocks:
            raise ValueError("block: this result has no per-block spectra (run with per_block=True)")
        if isinstance(which, int):
            if not -len(self.blocks) <= which < len(self.blocks):
                raise ValueError(f"block: expected an index in [0, {len(self.blocks) - 1}], got {which}")
            return self.blocks[which]
        for b in self.blocks:
            if b.name == which:
                return b
        raise ValueError(f"block: no block named {which!r}; blocks are {[b.name for b in self.blocks]}")


def _std_err(x: Tensor) -> float:
    p = x.numel()
    return float(x.std(unbiased=True) / math.sqrt(p)) if p > 1 else math.nan


def _fraction(name: str, slq: linalg.SLQResult, a: float, b: float, max_bracket: float) -> MassFraction:
    """One :class:`MassFraction` of the open interval (a, b) from the SLQ run (module doc)."""
    m = slq.steps
    full = linalg.interval_mass(slq.nodes, slq.weights, a, b, slq.exhausted)
    mh = max(1, m // 2)
    hn, hw, hx = slq.quadrature(mh)
    half = linalg.interval_mass(hn, hw, a, b, hx)
    p = full.gauss.numel()
    value, se_value = float(full.gauss.mean()), _std_err(full.gauss)
    qlo, qhi = float(full.lower.mean()), float(full.upper.mean())
    note = None
    if p > 1:
        se = max(se_value, _std_err(full.lower), _std_err(full.upper))
        lower, upper = max(0.0, qlo - _Z * se), min(1.0, qhi + _Z * se)
    else:
        lower, upper = qlo, qhi
        note = "one probe: the interval covers the quadrature only (the probe error is unknown)"
    resolved = qhi - qlo <= max_bracket
    if not resolved:
        note = (f"unresolved: {m} Lanczos steps bracket the mass in [{qlo:.3f}, {qhi:.3f}] (wider than "
                f"max_bracket={max_bracket:g}); the Gauss value {value:.3f} is one point of that range "
                f"(it was {float(half.gauss.mean()):.3f} after {mh} steps); raise steps")
    return MassFraction(
        name=name, interval=(float(a), float(b)), steps=m, probes=p, value=value, stderr=se_value,
        quadrature_lower=qlo, quadrature_upper=qhi, lower=lower, upper=upper, resolved=resolved,
        half_steps=mh, half_value=float(half.gauss.mean()), half_lower=float(half.lower.mean()),
        half_upper=float(half.upper.mean()), note=note,
    )


def _undefined(name: str, slq: linalg.SLQResult, why: str) -> MassFraction:
    nan = math.nan
    return MassFraction(name=name, interval=(nan, nan), steps=slq.steps, probes=int(slq.nodes.shape[-2]),
                        value=nan, stderr=nan, quadrature_lower=nan, quadrature_upper=nan, lower=nan, upper=nan,
                        resolved=False, half_steps=max(1, slq.steps // 2), half_value=nan, half_lower=nan,
                        half_upper=nan, note=why)


class _Counted(linalg.LinearOperator):
    """Wraps a symmetric operator: counts the columns applied (products) and ticks a bar."""

    def __init__(self, op: linalg.LinearOperator, bar: Any) -> None:
        super().__init__(op.shape, op.dtype, op.device, op.batch_shape, symmetric=True)
        self.op, self.bar, self.products = op, bar, 0
        self.widths: set[int] = set()

    def _matmat(self, X: Tensor) -> Tensor:
        Y = self.op.matmat(X)
        k = int(X.shape[-1]) * self.batch_size
        self.products += k
        per_pass = getattr(self.op, "max_vectors_per_pass", None) or max(k, 1)
        if k:
            if k >= per_pass:
                self.widths.add(int(per_pass))
            if k % per_pass:
                self.widths.add(int(k % per_pass))
        self.bar.update(k)
        return Y


def _eig_budget(n: int, k: int, eig_steps: Optional[int]) -> int:
    """Lanczos steps eigsh may take (its max_steps, capped at n)."""
    max_steps = min(n, max(300, 20 * k)) if eig_steps is None else max(eig_steps, k + 1)
    return min(max_steps, n)


def _budget(n: int, k: int, probes: int, steps: int, trace_probes: int, eig_steps: Optional[int]) -> int:
    """Products one spectrum may apply: eigsh's steps and residual check, the trace's columns, SLQ."""
    kk = min(k, n)
    return _eig_budget(n, kk, eig_steps) + kk + trace_probes + probes * min(steps, n)


def _shrink(bar: Any, by: int) -> None:
    """Lower the bar's total by work that turned out unnecessary (eigsh converged early)."""
    if by > 0 and getattr(bar, "total", None):
        bar.total = bar.total - by
        if hasattr(bar, "refresh"):
            bar.refresh()


def _spectrum(name: str, op: linalg.LinearOperator, *, k: int, probes: int, steps: int, trace_probes: int,
              trace_method: str, eps: float, abs_eps: float, max_bracket: float, sigma0: float,
              grid_points: int, seed: int, eig_steps: Optional[int], reorth: str, bar: Any,
              memory_limit: Optional[int] = None, probes_mode: bool = False) -> Spectrum:
    n = op.shape[0]
    kk = min(k, n)
    notes = []
    if kk < k:
        notes.append(f"k={k} capped at this operator's dimension {n}")
    if steps > n:
        notes.append(f"steps={steps} capped at this operator's dimension {n} (the Krylov space is then the "
                     "whole space: the quadrature is exact)")
    cop = op if isinstance(op, _Counted) else _Counted(op, bar)
    bar.set_postfix_str(f"{name}: extreme eigenvalues")
    before = cop.products
    exc: Optional[BaseException] = None
    extreme: Any = None
    try:
        eg = linalg.eigsh(cop, k=kk, which="both", seed=seed,
                          max_steps=None if eig_steps is None else max(eig_steps, kk + 1), memory_limit=memory_limit)
        evals = eg.eigenvalues.detach().double().cpu()
        order = torch.argsort(evals)
        extreme = (evals[order], eg.residuals.detach().double().cpu()[order], bool(eg.converged.all()),
                   int(eg.steps), eg.note)
    except Exception as err:
        if not probes_mode:
            raise
        exc = err
    if probes_mode:
        # eigsh ran replicated on every rank's own operator: rank 0's result for all (an auto-tuned
        # operator may pick another product method on another rank: rounding-level differences)
        rdist.raise_together(_WHERE, exc)
        extreme = rdist.broadcast_object(extreme, fn=_WHERE)
    evals, resid, eig_converged, eig_steps_done, eig_note = extreme
    if eig_note:
        notes.append(f"extreme eigenvalues: {eig_note}")
    _shrink(bar, _eig_budget(n, kk, eig_steps) + kk - (cop.products - before))
    dist_kw: dict[str, Any] = {"distributed": "probes"} if probes_mode else {}
    bar.set_postfix_str(f"{name}: trace")
    tr = linalg.trace(cop, probes=trace_probes, method=trace_method, seed=seed, memory_limit=memory_limit, **dist_kw)
    bar.set_postfix_str(f"{name}: SLQ density")
    slq = linalg.slq_density(cop, probes=probes, steps=min(steps, n), grid_size=grid_points, sigma0=sigma0,
                             num_moments=4, seed=seed, reorth=reorth, memory_limit=memory_limit, **dist_kw)
    mem_notes: list[str] = []
    if tr.memory is not None and tr.memory.groups > 1:
        mem_notes.append(f"memory: the trace ran with {tr.memory.choice} ({fmt_bytes(tr.memory.bytes_needed)} planned "
                     f"against {fmt_bytes(tr.memory.bytes_available or 0)}, {tr.memory.source})")
    mem = slq.memory
    if mem is not None and (mem.groups > 1 or mem.accuracy_note):
        mem_notes.append(f"memory: SLQ ran with {mem.choice} ({fmt_bytes(mem.bytes_needed)} planned against "
                         f"{fmt_bytes(mem.bytes_available or 0)}, {mem.source})"
                         + (f"; {mem.accuracy_note}" if mem.accuracy_note else ""))
    if probes_mode:   # each rank planned its own share: every rank's notes, named, on every rank
        mem_notes = [f"rank {r}: {m}" for r, ms in enumerate(rdist.all_gather_object(mem_notes, fn=_WHERE))
                     for m in ms]
    notes.extend(mem_notes)
    nodes, weights = slq.nodes.detach().double().cpu(), slq.weights.detach().double().cpu()
    lam_max = float(evals[-1])
    if not lam_max > 0:
        lam_max = float(evals.abs().max())
    threshold = eps * lam_max
    inf = math.inf
    intervals = {"degenerate_rel": (-threshold, threshold), "degenerate_abs": (-abs_eps, abs_eps),
                 "negative": (-inf, 0.0), "significant_negative": (-inf, -threshold)}
    fr = {}
    for key, (a, b) in intervals.items():
        if a < b:
            fr[key] = _fraction(key, slq, a, b, max_bracket)
        else:  # lambda_max = 0 (a zero operator): no relative threshold
            fr[key] = _undefined(key, slq, "undefined: lambda_max = 0, so the relative threshold eps * lambda_max is 0")
    return Spectrum(
        name=name, dim=n, eigenvalues=evals, residuals=resid, converged=eig_converged,
        lanczos_steps=eig_steps_done, trace=float(tr.estimate), trace_stderr=float(tr.total_error),
        trace_method=tr.method, nodes=nodes, weights=weights, grid=slq.grid.detach().double().cpu(),
        density=slq.density.detach().double().cpu(), density_std=slq.density_std.detach().double().cpu(),
        moments=slq.moments.detach().double().cpu(), moments_std=slq.moments_std.detach().double().cpu(),
        sigma=float(slq.sigma), slq_steps=int(slq.steps), threshold=float(threshold),
        degeneracy_fraction=fr["degenerate_rel"].value, degeneracy_stderr=fr["degenerate_rel"].stderr,
        negative_fraction=fr["negative"].value, negative_stderr=fr["negative"].stderr,
        significant_negative_fraction=fr["significant_negative"].value,
        significant_negative_stderr=fr["significant_negative"].stderr,
        abs_threshold=float(abs_eps), degeneracy_fraction_abs=fr["degenerate_abs"].value,
        degeneracy_abs_stderr=fr["degenerate_abs"].stderr, fractions=fr, k_used=kk, notes=notes,
    )


def _plan(o: linalg.LinearOperator, k: int, probes: int, steps: int, trace_probes: int, trace_method: str,
          eig_steps: Optional[int], reorth: str, memory_limit: Optional[int], probes_mode: bool) -> None:
    """The memory plans of one operator's eigsh, trace and SLQ (this rank's probes when
    ``probes_mode``), made before any product; raises InsufficientMemoryError."""
    n, b = o.shape[0], o.batch_size
    share = (lambda c: rdist.shard_sizes(c, rdist.world_size())[rdist.rank()]) if probes_mode else (lambda c: c)
    kk = min(k, n)
    plan_eigsh(n, b, _eig_budget(n, kk, eig_steps), kk, o.dtype, o.device, memory_limit, _WHERE)
    plan_slq(n, b, share(probes), min(steps, n), o.dtype, o.device, reorth, memory_limit, _WHERE,
             drawn=b * probes * n if probes_mode else 0)
    sk = min(trace_probes // 3 if trace_method == "hutch++" else 0, n)
    plan_trace(n, b, sk, share(sk), share(trace_probes - 2 * sk), o.dtype, o.device, memory_limit, _WHERE,
               hutchinson=trace_probes - 2 * sk)


def hessian_spectrum(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Any,
    *,
    params: Any = None,
    per_block: bool = False,
    k: int = 5,
    probes: int = 10,
    steps: int = 100,
    trace_probes: int = 99,
    trace_method: str = "hutch++",
    eps: float = 1e-3,
    abs_eps: float = 1e-3,
    max_bracket: float = 0.1,
    sigma0: float = 0.01,
    grid_points: int = 400,
    batchnorm: str = "eval",
    operator: str = "hessian",
    hvp: str = "auto",
    deterministic: bool = False,
    seed: int = 0,
    progress: bool = False,
    eig_steps: Optional[int] = None,
    reorth: str = "full",
    memory_limit: Optional[int] = None,
    distributed: Optional[str] = None,
) -> SpectrumResult:
    """Extreme eigenvalues, trace, SLQ density and degeneracy of the Hessian of a mean loss.

    Args:
        model: an ``nn.Module`` with trainable parameters (its modes and buffers are unchanged).
        loss_fn: ``loss_fn(model(x), y) -> scalar``, the *mean* loss of a batch.
        data: one ``(x, y)`` batch or an iterable of batches (a DataLoader), passed as is to
            :func:`resgeom_fast.operators.hessian` (x on the model's device, in its dtype).
        params: parameter selection of :func:`resgeom_fast.operators.hessian` (None = all
            trainable parameters). ``per_block`` blocks always use each block's own parameters.
        per_block: also compute the spectrum of every residual block's diagonal block.
        k: extreme eigenvalues, 2 <= k <= min(P, K_MAX = 500), P the number of parameters
            (floor(k/2) at the bottom, ceil(k/2) at the top); a larger k is refused. Capped at a
            block's dimension for ``per_block`` (stated in that block's ``notes``).
        probes: SLQ probes (Rademacher, unit length); steps: Lanczos steps per probe, capped at
            the dimension (stated in ``notes``; the quadrature is then exact).
        trace_probes: matmat budget of the trace estimator; trace_method: "hutch++" or "hutchinson".
        eps: relative degeneracy threshold in (0, 1): mass with ``|lambda| < eps * lambda_max``.
        abs_eps: absolute degeneracy threshold (> 0): mass with ``|lambda| < abs_eps`` (module doc;
            default 1e-3, the relative threshold's value for lambda_max = 1).
        max_bracket: a mass fraction whose quadrature bracket is wider than this is reported as
            unresolved (None in ``summary()``, a warning); in (0, 1].
        sigma0: relative Gaussian width of the density, ``sigma = sigma0 (lambda_max - lambda_min)``
            over the SLQ nodes; grid_points: points of the density grid.
        batchnorm: "eval" (running statistics, the default of docs/science.md section 2) or "train" (batch statistics).
        operator: "hessian" or "ggn" (generalised Gauss-Newton ``J^T H_loss J``).
        hvp: the product method, passed to the operators (``hessian``, ``ggn``, ``block_hessians``):
            "auto", "structured", "double_backward" or "forward_over_reverse".
        deterministic: passed to the operators: fix their method choices instead of timing them
            ("auto" picks by timing, so two runs can differ at float32 round-off).
        seed: seed of every random probe / start vector (CPU generators).
        progress: a progress bar over the Hessian-vector products (total known in advance, with
            an ETA; plain lines when stderr is not a terminal).
        eig_steps: at most this many Lanczos steps (Hessian-vector products) for the extreme
            eigenvalues (default: eigsh's, min(P, 300)); ``converged`` tells whether they sufficed.
        reorth: "full" (docs/science.md section 2) or "local" SLQ reorthogonalisation
            (:func:`resgeom_fast.linalg.slq_density`; "local" stores no basis; its ghost nodes
            make the quadrature brackets approximate), or "auto": "full" when one probe's basis
            fits in memory, else "local" (stated in ``notes``).
        memory_limit: bytes the Lanczos runs may allocate (default: the free memory of the
            model's device). Both Lanczos bases (eigsh's, up to 300 vectors of length P, and SLQ's,
            probes x steps vectors) are planned before any product is applied: SLQ runs its probes
            in sequential groups when all of them do not fit (the same quadrature; ``notes`` says
            so); when nothing fits, :class:`~resgeom_fast.linalg._memory.InsufficientMemoryError`
            names the bytes needed and available and the settings that would fit (fewer steps or
            probes, ``params=``, ``reorth``, ``memory_limit``). The trace's sketch (Hutch++,
            ``trace_probes // 3`` vectors) and its column chunks are planned too
            (:func:`~resgeom_fast.linalg._memory.plan_trace`); the model's own activations are not.
        distributed: None (one process), or in an initialised torch.distributed group
            (docs/distributed.md; a collective: every rank calls it with the same model and
            arguments, and every rank returns the same result): ``"split"`` / ``"sharded"``: the
            operators are data-parallel (each rank its share of the data: the full data on every
            rank, or this rank's own share; one all_reduce per product) and eigsh, the trace and
            SLQ run replicated on every rank (each stores the whole Lanczos bases); ``"probes"``:
            every rank builds the single-process operators on the same full ``data`` and the trace
            and SLQ probes are split across the ranks (:func:`resgeom_fast.linalg.slq_density`,
            :func:`resgeom_fast.linalg.trace` with ``distributed="probes"``: each rank stores only
            its probes' basis), the extreme eigenvalues are computed on every rank and rank 0's are
            taken. The numbers equal one process's up to the rounding of the batched products;
            ``products`` then counts the products of all ranks together.

    Returns:
        a :class:`SpectrumResult` (tensors float64 on the CPU); shapes in :class:`Spectrum`.
        Mass fractions with intervals in ``fractions`` (module doc).

    Warns:
        UserWarning naming every unresolved fraction (quadrature bracket wider than max_bracket).
    """
    check_module(_WHERE, "model", model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{_WHERE}: expected a model with trainable parameters (requires_grad=True), got none")
    if not callable(loss_fn):
        raise TypeError(f"{_WHERE}: expected loss_fn callable, got {type(loss_fn).__name__}")
    for flag, value in (("per_block", per_block), ("deterministic", deterministic), ("progress", progress)):
        check_type(_WHERE, flag, value, bool, "a bool")
    check_int(_WHERE, "k", k, 2, hint=" (one eigenvalue from each end at least)")
    if k > K_MAX:
        raise ValueError(f"{_WHERE}: expected k <= K_MAX = {K_MAX} (extreme eigenvalues; eigsh keeps a Lanczos "
                         f"basis of up to max(300, 20 k) vectors), got {k}")
    check_int(_WHERE, "probes", probes, 1)
    check_int(_WHERE, "steps", steps, 1)
    check_int(_WHERE, "trace_probes", trace_probes, 1)
    check_int(_WHERE, "grid_points", grid_points, 2)
    check_int(_WHERE, "seed", seed, 0)
    check_choice(_WHERE, "trace_method", trace_method, ("hutch++", "hutchinson"))
    check_choice(_WHERE, "batchnorm", batchnorm, ("eval", "train"))
    check_choice(_WHERE, "operator", operator, ("hessian", "ggn"))
    check_choice(_WHERE, "reorth", reorth, ("full", "local", "auto"))
    memory_limit = check_memory_limit(_WHERE, memory_limit)
    if distributed is not None:
        check_choice(_WHERE, "distributed", distributed, DISTRIBUTED)
        if not rdist.is_initialized():
            raise ArgumentValueError(
                f"{_WHERE}: expected an initialised torch.distributed process group for distributed={distributed!r} "
                f"(torch.distributed.init_process_group, e.g. under torchrun), got none; pass distributed=None")
    probes_mode = distributed == "probes"
    check_type(_WHERE, "hvp", hvp, str, "a str")
    if eig_steps is not None:
        check_int(_WHERE, "eig_steps", eig_steps, 2)
    eps = check_float(_WHERE, "eps", eps, 0.0, 1.0, open_lo=True)
    abs_eps = check_float(_WHERE, "abs_eps", abs_eps, 0.0, open_lo=True)
    max_bracket = check_float(_WHERE, "max_bracket", max_bracket, 0.0, 1.0, open_lo=True)
    sigma0 = check_float(_WHERE, "sigma0", sigma0, 0.0, open_lo=True)

    op_kw: dict[str, Any] = dict(batchnorm=batchnorm, hvp=hvp)
    if deterministic:
        op_kw["deterministic"] = True
    if distributed in ("split", "sharded"):
        op_kw["distributed"] = distributed
    build = operators.hessian if operator == "hessian" else operators.ggn
    if probes_mode:   # every rank's own operator: the same model on every rank (a collective)
        rdist.check_same_parameters(_WHERE, [t for t in list(model.parameters()) + list(model.buffers())
                                             if t.is_floating_point()])
    try:
        op = build(model, loss_fn, data, params, **op_kw)
    except (ValueError, TypeError) as exc:  # name this function in the message
        raise type(exc)(f"{_WHERE}: {exc}") from exc
    P = op.shape[0]
    if k > P:
        raise ValueError(f"{_WHERE}: expected k <= min(P, K_MAX) = {min(P, K_MAX)} (P = {P} parameters), got {k}")

    blocks_ops: list[tuple[str, linalg.LinearOperator]] = []
    if per_block:
        infos = operators.residual_blocks(model)
        if not infos:
            raise ValueError(f"{_WHERE}: per_block=True needs residual blocks, found none in {type(model).__name__}")
        try:
            if operator == "hessian":
                ops = operators.block_hessians(model, loss_fn, data, infos, **op_kw)
            else:
                ops = [operators.ggn(model, loss_fn, data, b.block, **op_kw) for b in infos]
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{_WHERE}: {exc}") from exc
        blocks_ops = [(b.name, o) for b, o in zip(infos, ops)]

    # plan the memory before any product is applied (a rank whose plan fails stops every rank)
    plan_exc: Optional[BaseException] = None
    try:
        for _, o in [("all", op)] + blocks_ops:
            _plan(o, k, probes, steps, trace_probes, trace_method, eig_steps, reorth, memory_limit, probes_mode)
    except Exception as err:
        if distributed is None:
            raise
        plan_exc = err
    if distributed is not None:
        rdist.raise_together(_WHERE, plan_exc)
    total = sum(_budget(o.shape[0], k, probes, steps, trace_probes, eig_steps)
                for o in [op] + [o for _, o in blocks_ops])
    kw = dict(k=k, probes=probes, steps=steps, trace_probes=trace_probes, trace_method=trace_method, eps=eps,
              abs_eps=abs_eps, max_bracket=max_bracket, sigma0=sigma0, grid_points=grid_points, seed=seed,
              eig_steps=eig_steps, reorth=reorth, memory_limit=memory_limit, probes_mode=probes_mode)
    with progress_bar(total, _WHERE, enabled=progress, unit="products") as bar:
        cop = _Counted(op, bar)
        counted = [_Counted(bop, bar) for _, bop in blocks_ops]
        name = "all"
        try:
            full = _spectrum(name, cop, bar=bar, **kw)
            block_specs = []
            for (name, _), c in zip(blocks_ops, counted):
                block_specs.append(_spectrum(name, c, bar=bar, **kw))
        except linalg.NonFiniteError as exc:  # say which operator (the message says which step)
            raise linalg.NonFiniteError(f"{_WHERE}: the {operator} of {name!r}: {exc}") from exc
    products = cop.products + sum(c.products for c in counted)
    hvp_methods: dict[str, Optional[str]] = {}
    choice = getattr(op, "hvp_choice", None)
    if callable(choice):
        hvp_methods = {str(w): choice(w) for w in sorted(cop.widths)}
    if probes_mode:   # the work of all ranks; rank 0's product methods (every rank returns the same result)
        products = int(sum(rdist.all_gather_object(products, fn=_WHERE)))
        hvp_methods = rdist.broadcast_object(hvp_methods, fn=_WHERE)
    unresolved = [f"{s.name}: {n} in [{s.fractions[n].quadrature_lower:.3f}, {s.fractions[n].quadrature_upper:.3f}]"
                  for s in [full] + block_specs for n in s.unresolved]
    if unresolved:
        warnings.warn(
            f"{_WHERE}: {len(unresolved)} mass fraction(s) not resolved by steps={steps} (quadrature bracket wider "
            f"than max_bracket={max_bracket:g}; summary() reports None for them): " + "; ".join(unresolved)
            + ". Raise steps.", UserWarning, stacklevel=2)
    return SpectrumResult(
        **{f: getattr(full, f) for f in Spectrum.__dataclass_fields__},
        operator=operator, batchnorm=batchnorm, num_samples=int(op.num_samples),
        param_names=list(op.param_names), eps=eps, abs_eps=abs_eps, max_bracket=max_bracket, k=k,
        probes=probes, steps=steps, trace_probes=trace_probes, sigma0=sigma0, seed=seed,
        hvp=str(getattr(op, "hvp", hvp)), deterministic=deterministic, hvp_methods=hvp_methods,
        products=products, blocks=block_specs,
    )


# ----------------------------------------------------------------------------------------- plots
def _block_path(fn: str, d: dict[str, Any], at: str, block: Union[None, int, str]) -> str:
    """Path of the spectrum to draw: ``at`` itself, or the block ``block`` (index or module name)
    of a whole-operator dict (the checks and messages of :meth:`SpectrumResult.block`)."""
    if block is None:
        return at
    if "blocks" not in d:
        raise ValueError(f"{fn}: block={block!r} needs a SpectrumResult with per-block spectra")
    names = [b["name"] for b in d["blocks"]]
    if isinstance(block, bool) or not isinstance(block, (int, str)):
        raise TypeError(f"{fn}: block: expected an int index or a block name, got {type(block).__name__}")
    if not names:
        raise ValueError(f"{fn}: block: this result has no per-block spectra (run with per_block=True)")
    if isinstance(block, int):
        if not -len(names) <= block < len(names):
            raise ValueError(f"{fn}: block: expected an index in [0, {len(names) - 1}], got {block}")
        return join(at, f"blocks.{block % len(names)}")
    if block not in names:
        raise ValueError(f"{fn}: block: no block named {block!r}; blocks are {names}")
    return join(at, f"blocks.{names.index(block)}")


def _fmt_fraction(spec: dict[str, Any], name: str) -> str:
    """A fraction of a spectrum's dict form for a title: its value when resolved, else its interval."""
    f = spec.get("fractions", {}).get(name)
    if f is None:
        return "n/a"
    num = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    return num(f["value"], ".3f") if f["resolved"] else f"in [{num(f['lower'], '.2f')}, {num(f['upper'], '.2f')}] (unresolved)"


_SPECTRUM_KEYS = ("name", "dim", "grid", "density", "density_std", "eigenvalues")


def plot_density(result: Union[Spectrum, dict[str, Any]], ax: Any = None, block: Union[None, int, str] = None, *,
                 at: str = "") -> Any:
    """The SLQ density on its grid (log y-axis), the per-probe spread band (density +- density_std)
    and the extreme eigenvalues (vertical lines; red < 0, blue > 0).

    Args:
        result: a :class:`SpectrumResult` (or one :class:`Spectrum`), its ``to_dict()``, or a
            results dict holding that dict at the path ``at``.
        ax: a matplotlib Axes to draw on (None: a new figure).
        block: None for the whole operator, or a block index / name (per_block results).

    Drawn from the dict form (tagged density line, :mod:`resgeom_fast.analysis.plotting`).

    Returns:
        the matplotlib Figure.
    """
    fn = "plot_density"
    root, at, d = as_result_dict(fn, result, Spectrum, at, _SPECTRUM_KEYS, type_name="SpectrumResult")
    path = _block_path(fn, d, at, block)
    spec = get_path(root, path) if path else d
    fig, ax = figure_axes(ax, (6, 4))
    lines(ax, root, [("SLQ density", join(path, "grid"), join(path, "density"))], marker="",
          styles=[{"color": "k", "lw": 1.2}], legend=False)
    band(ax, root, join(path, "grid"), join(path, "density"), join(path, "density_std"), color="0.6", alpha=0.4,
         label="per-probe spread")
    vlines(ax, root, join(path, "eigenvalues"), label="extreme eigenvalues")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Spectral density ({spec['name']}, P={spec['dim']}): degenerate "
                 f"{_fmt_fraction(spec, 'degenerate_rel')}, negative {_fmt_fraction(spec, 'significant_negative')}",
                 fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_eigenvalues(result: Union[Spectrum, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Extreme eigenvalues of both ends: the whole operator at x = 0 ("all") and, when present,
    block l at x = l + 1; symlog y-axis (red < 0, blue >= 0). ``result``: as in
    :func:`plot_density` (drawn from the dict form).

    Returns:
        the matplotlib Figure.
    """
    root, at, d = as_result_dict("plot_eigenvalues", result, Spectrum, at, ("eigenvalues", "lambda_max"),
                                 type_name="SpectrumResult")
    fig, ax = figure_axes(ax, (6, 4))
    paths = [at] + [join(at, f"blocks.{i}") for i in range(len(d.get("blocks", [])))]
    for x, path in enumerate(paths):
        scatter_column(ax, root, x, join(path, "eigenvalues"))
    ax.set_xticks(range(len(paths)))
    ax.set_xticklabels(["all"] + [str(i) for i in range(len(paths) - 1)])
    ax.set_xlabel("operator (all parameters, then residual block index)")
    ax.set_ylabel("eigenvalue")
    lam_max = d["lambda_max"] if d["lambda_max"] is not None else 0.0
    ax.set_yscale("symlog", linthresh=max(1e-6, 1e-3 * abs(lam_max)))
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.set_title("Extreme Hessian eigenvalues (both ends)", fontsize=9)
    return fig
