"""Hessian spectra of a loss (SCIENCE.md section 2, Orhan & Pitkow 2018).

:func:`hessian_spectrum` turns the curvature operator of a model's mean loss
(:func:`resgeom_fast.operators.hessian`, or :func:`~resgeom_fast.operators.ggn`) into

- the extreme eigenvalues at both ends (Lanczos with full reorthogonalisation,
  :func:`resgeom_fast.linalg.eigsh` with ``which="both"``), with true residual norms and a
  convergence flag;
- the trace (Hutch++ or Hutchinson, :func:`resgeom_fast.linalg.trace`) and its standard error;
- the spectral density by stochastic Lanczos quadrature (:func:`resgeom_fast.linalg.slq_density`):
  Gauss nodes and weights of every probe, the smoothed density on a grid with its per-probe
  spread, and the spectral moments ``tr(H^k) ~ dim * mean_probes sum_i tau_i theta_i^k``;
- degeneracy: the fraction of spectral mass with ``|lambda| < eps * lambda_max`` and the fraction
  with ``lambda < 0``.

Our reading of "fraction of spectral mass" (SCIENCE.md leaves the estimator open): it is read off
the *quadrature weights*, not the smoothed density -- per probe ``sum_i tau_i 1[theta_i in set]``
(each probe's weights sum to 1), averaged over probes, with the standard error over probes. The
smoothed density would smear the spike at zero over +-sigma and make the fraction depend on
sigma0. The sign of nodes inside an (exactly or nearly) degenerate cluster at 0 is rounding: such
a cluster's mass can land on either side of 0, split among several nodes, so ``negative_fraction``
(lambda < 0, as SCIENCE.md asks) is only meaningful beyond the degenerate mass; we also report
``significant_negative_fraction``, the mass with ``lambda < -eps * lambda_max`` (disjoint from the
degenerate mass). ``lambda_max`` is the largest eigenvalue found by Lanczos (:func:`eigsh`), which is more
accurate than the largest SLQ node; if it is not positive, ``max |lambda|`` of the computed
extreme eigenvalues is used instead.

``per_block=True`` repeats all of it for the diagonal Hessian block of every residual block
(:func:`resgeom_fast.operators.block_hessians`; for ``operator="ggn"`` the GGN restricted to the
block's parameters). SLQ steps are capped at each block's dimension and ``k`` at its dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from resgeom_fast import linalg, operators
from resgeom_fast.analysis._common import Result, check_choice, check_float, check_int, to_jsonable, figure_axes

__all__ = ["Spectrum", "SpectrumResult", "hessian_spectrum", "plot_density", "plot_eigenvalues"]

_WHERE = "hessian_spectrum"


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
        trace: estimate of tr(H); trace_stderr: its standard error (NaN with a single probe,
            0-ish when Hutch++'s sketch spans the whole space); trace_method: the method used.
        nodes: [probes, m] float64 SLQ Gauss nodes (Ritz values) per probe.
        weights: [probes, m] float64 Gauss weights per probe (each row sums to 1).
        grid: [g] float64 points of the density; density: [g] the SLQ density (mean over probes);
        density_std: [g] standard deviation of the per-probe densities (the spread band).
        moments: [K + 1] float64 estimates of tr(H^k), k = 0..K; moments_std: their standard errors.
        sigma: Gaussian width of the density; slq_steps: m, Lanczos steps per probe.
        threshold: eps * lambda_max, the degeneracy threshold.
        degeneracy_fraction: SLQ mass with |lambda| < threshold (quadrature weights, see module doc);
            degeneracy_stderr: its standard error over probes.
        negative_fraction: SLQ mass with lambda < 0; negative_stderr: its standard error (see the
            module doc: the degenerate cluster's mass falls on either side of 0 by rounding).
        significant_negative_fraction: SLQ mass with lambda < -threshold;
            significant_negative_stderr: its standard error.
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

    @property
    def lambda_max(self) -> float:
        """Largest computed eigenvalue."""
        return float(self.eigenvalues[-1])

    @property
    def lambda_min(self) -> float:
        """Smallest (most negative) computed eigenvalue."""
        return float(self.eigenvalues[0])

    def _fields(self) -> dict[str, Any]:
        return {
            "name": self.name, "dim": self.dim,
            "eigenvalues": self.eigenvalues, "residuals": self.residuals, "converged": self.converged,
            "lanczos_steps": self.lanczos_steps, "lambda_max": self.lambda_max, "lambda_min": self.lambda_min,
            "trace": self.trace, "trace_stderr": self.trace_stderr, "trace_method": self.trace_method,
            "nodes": self.nodes, "weights": self.weights, "grid": self.grid, "density": self.density,
            "density_std": self.density_std, "moments": self.moments, "moments_std": self.moments_std,
            "sigma": self.sigma, "slq_steps": self.slq_steps, "threshold": self.threshold,
            "degeneracy_fraction": self.degeneracy_fraction, "degeneracy_stderr": self.degeneracy_stderr,
            "negative_fraction": self.negative_fraction, "negative_stderr": self.negative_stderr,
            "significant_negative_fraction": self.significant_negative_fraction,
            "significant_negative_stderr": self.significant_negative_stderr,
        }

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self._fields())

    def summary(self) -> dict[str, float]:
        """Headline scalars: extreme eigenvalues, trace and the two mass fractions."""
        return {
            "lambda_max": self.lambda_max, "lambda_min": self.lambda_min, "trace": self.trace,
            "degeneracy_fraction": self.degeneracy_fraction, "negative_fraction": self.negative_fraction,
            "significant_negative_fraction": self.significant_negative_fraction,
        }


@dataclass
class SpectrumResult(Spectrum):
    """Result of :func:`hessian_spectrum`: the :class:`Spectrum` of the whole operator (its fields
    directly on this object), the settings, and ``blocks``: one :class:`Spectrum` per residual
    block when ``per_block=True`` (else an empty list).

    Attributes (besides those of :class:`Spectrum`):
        operator: "hessian" or "ggn"; batchnorm: "eval" or "train".
        num_samples: samples the loss is averaged over.
        param_names: names of the parameters spanning the vector space, in order.
        eps, k, probes, steps, trace_probes, sigma0, seed: the arguments used.
    """

    operator: str = "hessian"
    batchnorm: str = "eval"
    num_samples: int = 0
    param_names: list[str] = field(default_factory=list)
    eps: float = 1e-3
    k: int = 5
    probes: int = 10
    steps: int = 100
    trace_probes: int = 99
    sigma0: float = 0.01
    seed: int = 0
    blocks: list[Spectrum] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = self._fields()
        d.update({
            "operator": self.operator, "batchnorm": self.batchnorm, "num_samples": self.num_samples,
            "param_names": list(self.param_names), "eps": self.eps, "k": self.k, "probes": self.probes,
            "steps": self.steps, "trace_probes": self.trace_probes, "sigma0": self.sigma0, "seed": self.seed,
            "blocks": [b.to_dict() for b in self.blocks],
        })
        return to_jsonable(d)

    def summary(self) -> dict[str, float]:
        s = super().summary()
        if self.blocks:
            s["mean_block_degeneracy_fraction"] = float(sum(b.degeneracy_fraction for b in self.blocks) / len(self.blocks))
            s["mean_block_negative_fraction"] = float(sum(b.negative_fraction for b in self.blocks) / len(self.blocks))
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


def _mass(nodes: Tensor, weights: Tensor, mask: Tensor) -> tuple[float, float]:
    """Per-probe ``sum_i tau_i 1[mask]``: mean over probes and its standard error."""
    per_probe = (weights * mask.to(weights.dtype)).sum(-1)  # [probes]
    p = per_probe.numel()
    mean = float(per_probe.mean())
    se = float(per_probe.std(unbiased=True) / math.sqrt(p)) if p > 1 else math.nan
    return mean, se


def _spectrum(name: str, op: linalg.LinearOperator, *, k: int, probes: int, steps: int, trace_probes: int,
              trace_method: str, eps: float, sigma0: float, grid_points: int, seed: int,
              eig_steps: Optional[int], reorth: str, tick: Callable[[str], None]) -> Spectrum:
    n = op.shape[0]
    kk = min(k, n)
    tick(f"{name}: extreme eigenvalues")
    eg = linalg.eigsh(op, k=kk, which="both", seed=seed,
                      max_steps=None if eig_steps is None else max(eig_steps, kk + 1))
    evals = eg.eigenvalues.detach().double().cpu()
    order = torch.argsort(evals)
    evals = evals[order]
    resid = eg.residuals.detach().double().cpu()[order]
    tick(f"{name}: trace")
    tr = linalg.trace(op, probes=trace_probes, method=trace_method, seed=seed)
    tick(f"{name}: SLQ density")
    slq = linalg.slq_density(op, probes=probes, steps=min(steps, n), grid_size=grid_points, sigma0=sigma0,
                             num_moments=4, seed=seed, reorth=reorth)
    nodes, weights = slq.nodes.detach().double().cpu(), slq.weights.detach().double().cpu()
    lam_max = float(evals[-1])
    if not lam_max > 0:
        lam_max = float(evals.abs().max())
    threshold = eps * lam_max
    deg, deg_se = _mass(nodes, weights, nodes.abs() < threshold)
    neg, neg_se = _mass(nodes, weights, nodes < 0)
    sneg, sneg_se = _mass(nodes, weights, nodes < -threshold)
    return Spectrum(
        name=name, dim=n, eigenvalues=evals, residuals=resid, converged=bool(eg.converged.all()),
        lanczos_steps=int(eg.steps), trace=float(tr.estimate), trace_stderr=float(tr.stderr),
        trace_method=tr.method, nodes=nodes, weights=weights, grid=slq.grid.detach().double().cpu(),
        density=slq.density.detach().double().cpu(), density_std=slq.density_std.detach().double().cpu(),
        moments=slq.moments.detach().double().cpu(), moments_std=slq.moments_std.detach().double().cpu(),
        sigma=float(slq.sigma), slq_steps=int(slq.steps), threshold=float(threshold),
        degeneracy_fraction=deg, degeneracy_stderr=deg_se, negative_fraction=neg, negative_stderr=neg_se,
        significant_negative_fraction=sneg, significant_negative_stderr=sneg_se,
    )


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
    sigma0: float = 0.01,
    grid_points: int = 400,
    batchnorm: str = "eval",
    operator: str = "hessian",
    seed: int = 0,
    progress: bool = False,
    eig_steps: Optional[int] = None,
    reorth: str = "full",
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
        k: extreme eigenvalues, >= 2 (floor(k/2) at the bottom, ceil(k/2) at the top); capped at
            each operator's dimension.
        probes: SLQ probes (Rademacher, unit length); steps: Lanczos steps per probe (capped at
            the dimension).
        trace_probes: matmat budget of the trace estimator; trace_method: "hutch++" or "hutchinson".
        eps: relative degeneracy threshold (> 0): mass with ``|lambda| < eps * lambda_max``.
        sigma0: relative Gaussian width of the density, ``sigma = sigma0 (lambda_max - lambda_min)``
            over the SLQ nodes; grid_points: points of the density grid.
        batchnorm: "eval" (running statistics, SCIENCE.md's default) or "train" (batch statistics).
        operator: "hessian" or "ggn" (generalised Gauss-Newton ``J^T H_loss J``).
        seed: seed of every random probe / start vector (CPU generators).
        progress: show a tqdm bar over the stages.
        eig_steps: at most this many Lanczos steps (Hessian-vector products) for the extreme
            eigenvalues (default: eigsh's, min(P, 300)); ``converged`` tells whether they sufficed.
        reorth: "full" (SCIENCE.md) or "local" SLQ reorthogonalisation
            (:func:`resgeom_fast.linalg.slq_density`; "local" stores no basis).

    Returns:
        a :class:`SpectrumResult` (tensors float64 on the CPU); shapes in :class:`Spectrum`.
        Degeneracy and negative fractions come from the SLQ quadrature weights (module doc).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: expected model an nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{_WHERE}: expected a model with trainable parameters (requires_grad=True), got none")
    if not callable(loss_fn):
        raise TypeError(f"{_WHERE}: expected loss_fn callable, got {type(loss_fn).__name__}")
    if not isinstance(per_block, bool):
        raise TypeError(f"{_WHERE}: expected per_block a bool, got {type(per_block).__name__}")
    check_int(_WHERE, "k", k, 2, hint=" (one eigenvalue from each end at least)")
    check_int(_WHERE, "probes", probes, 1)
    check_int(_WHERE, "steps", steps, 1)
    check_int(_WHERE, "trace_probes", trace_probes, 1)
    check_int(_WHERE, "grid_points", grid_points, 2)
    check_int(_WHERE, "seed", seed, 0)
    check_choice(_WHERE, "trace_method", trace_method, ("hutch++", "hutchinson"))
    check_choice(_WHERE, "batchnorm", batchnorm, ("eval", "train"))
    check_choice(_WHERE, "operator", operator, ("hessian", "ggn"))
    check_choice(_WHERE, "reorth", reorth, ("full", "local"))
    if eig_steps is not None:
        check_int(_WHERE, "eig_steps", eig_steps, 2)
    eps = check_float(_WHERE, "eps", eps, 0.0, 1.0, open_lo=True)
    sigma0 = check_float(_WHERE, "sigma0", sigma0, 0.0, open_lo=True)

    build = operators.hessian if operator == "hessian" else operators.ggn
    try:
        op = build(model, loss_fn, data, params, batchnorm=batchnorm)
    except (ValueError, TypeError) as exc:  # name this function in the message
        raise type(exc)(f"{_WHERE}: {exc}") from exc

    blocks_ops: list[tuple[str, linalg.LinearOperator]] = []
    if per_block:
        infos = operators.residual_blocks(model)
        if not infos:
            raise ValueError(f"{_WHERE}: per_block=True needs residual blocks, found none in {type(model).__name__}")
        try:
            if operator == "hessian":
                ops = operators.block_hessians(model, loss_fn, data, infos, batchnorm=batchnorm)
            else:
                ops = [operators.ggn(model, loss_fn, data, b.block, batchnorm=batchnorm) for b in infos]
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{_WHERE}: {exc}") from exc
        blocks_ops = [(b.name, o) for b, o in zip(infos, ops)]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=3 * (1 + len(blocks_ops)), desc=_WHERE)

    def tick(stage: str) -> None:
        if bar is not None:
            bar.set_postfix_str(stage)
            bar.update(1)

    kw = dict(k=k, probes=probes, steps=steps, trace_probes=trace_probes, trace_method=trace_method, eps=eps,
              sigma0=sigma0, grid_points=grid_points, seed=seed, eig_steps=eig_steps, reorth=reorth, tick=tick)
    try:
        full = _spectrum("all", op, **kw)
        block_specs = [_spectrum(name, bop, **kw) for name, bop in blocks_ops]
    finally:
        if bar is not None:
            bar.close()
    return SpectrumResult(
        **{f: getattr(full, f) for f in Spectrum.__dataclass_fields__},
        operator=operator, batchnorm=batchnorm, num_samples=int(op.num_samples),
        param_names=list(op.param_names), eps=eps, k=k, probes=probes, steps=steps,
        trace_probes=trace_probes, sigma0=sigma0, seed=seed, blocks=block_specs,
    )


# ----------------------------------------------------------------------------------------- plots
def _resolve_spec(fn: str, result: SpectrumResult, block: Union[None, int, str]) -> Spectrum:
    if not isinstance(result, Spectrum):
        raise TypeError(f"{fn}: expected result a SpectrumResult, got {type(result).__name__}")
    if block is None:
        return result
    if not isinstance(result, SpectrumResult):
        raise ValueError(f"{fn}: block={block!r} needs a SpectrumResult with per-block spectra")
    try:
        return result.block(block)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{fn}: {exc}") from exc


def plot_density(result: Spectrum, ax: Any = None, block: Union[None, int, str] = None) -> Any:
    """The SLQ density on its grid (log y-axis), the per-probe spread band (density +- density_std)
    and the extreme eigenvalues (vertical lines; red < 0, blue > 0).

    Args:
        result: a :class:`SpectrumResult` (or one :class:`Spectrum`).
        ax: a matplotlib Axes to draw on (None: a new figure).
        block: None for the whole operator, or a block index / name (per_block results).

    Returns:
        the matplotlib Figure.
    """
    spec = _resolve_spec("plot_density", result, block)
    fig, ax = figure_axes(ax, (6, 4))
    grid, dens, std = spec.grid.numpy(), spec.density.numpy(), spec.density_std.numpy()
    ax.plot(grid, dens, color="k", lw=1.2, label="SLQ density")
    if bool(torch.isfinite(spec.density_std).all()):
        ax.fill_between(grid, dens - std, dens + std, color="0.6", alpha=0.4, lw=0, label="per-probe spread")
    for i, lam in enumerate(spec.eigenvalues.tolist()):
        ax.axvline(lam, color="tab:red" if lam < 0 else "tab:blue", ls="--", lw=0.8,
                   label="extreme eigenvalues" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Spectral density ({spec.name}, P={spec.dim}): degenerate {spec.degeneracy_fraction:.3f}, "
                 f"negative {spec.negative_fraction:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_eigenvalues(result: Spectrum, ax: Any = None) -> Any:
    """Extreme eigenvalues of both ends: the whole operator at x = 0 ("all") and, when present,
    block l at x = l + 1; symlog y-axis (red < 0, blue >= 0).

    Returns:
        the matplotlib Figure.
    """
    if not isinstance(result, Spectrum):
        raise TypeError(f"plot_eigenvalues: expected result a SpectrumResult, got {type(result).__name__}")
    fig, ax = figure_axes(ax, (6, 4))
    specs = [result] + list(getattr(result, "blocks", []))
    for x, spec in enumerate(specs):
        ev = spec.eigenvalues.numpy()
        xs = [x] * len(ev)
        colours = ["tab:red" if v < 0 else "tab:blue" for v in ev]
        ax.scatter(xs, ev, c=colours, s=14)
    ax.set_xticks(range(len(specs)))
    ax.set_xticklabels(["all"] + [str(i) for i in range(len(specs) - 1)])
    ax.set_xlabel("operator (all parameters, then residual block index)")
    ax.set_ylabel("eigenvalue")
    ax.set_yscale("symlog", linthresh=max(1e-6, 1e-3 * abs(result.lambda_max)))
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.set_title("Extreme Hessian eigenvalues (both ends)", fontsize=9)
    return fig
