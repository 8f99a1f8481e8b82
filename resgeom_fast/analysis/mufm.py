"""MUFM: a multilayer unconstrained feature model of progressive collapse (docs/science.md section 5).

Our reading of "MUFM" (docs/science.md section 5): the features of every layer are free
variables H_1..H_L ([N, D] here, rows are samples; the D x N of the formula transposed), chained
to the inputs H_0 = X, with a linear classifier W [C, D] (no bias) on H_L, and

    f(H, W) = CE(H_L W^T, Y) + (lam_W / 2) ||W||_F^2 + (lam_H / 2) sum_{l=1..L} ||H_l - H_{l-1}||_F^2,

where CE is the *mean* cross-entropy over the N samples and the penalties are plain (unnormalised)
squared Frobenius norms, as in the unconstrained feature model of Zhu et al. (2021). The feature
width D is the input dimension (Type-1: all H_l live in the input space).

f is minimised by full-batch L-BFGS (strong Wolfe line search) in float64 from H_l = X for every l
and W ~ N(0, 0.01^2) drawn from ``seed``: deterministic. The collapse metrics of every H_l (and of
the inputs X = H_0) come from :func:`resgeom_fast.analysis.collapse.collapse_metrics`.

Stationarity gives the structure of the optimum: with G = softmax(H_L W^T) - onehot(Y) (divided by
N), lam_H (H_l - H_{l-1}) = -G W for every l, so the optimum moves every sample by L equal steps
from its input along -G W: the features end up more concentrated than X, but since each step pays
a quadratic price the classes do not collapse exactly (NC1 > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import Tensor
import torch.nn.functional as F



from ._common import Result, check_float, check_int
from ._lbfgs import check_features_labels, check_solver, lbfgs, start_point
from .collapse import METRICS, collapse_metrics, finish_metric_axes, layer_spearman
from .plotting import as_result_dict, figure_axes, join, lines

__all__ = ["MUFMResult", "mufm", "mufm_objective", "plot_mufm"]


def mufm_objective(X: Tensor, Y: Tensor, H: list[Tensor], W: Tensor, lam_W: float, lam_H: float) -> Tensor:
    """f(H, W) above (a scalar tensor, differentiable in H and W).

    Args:
        X: inputs [N, D]; Y: int labels [N]; H: [H_1, ..., H_L], each [N, D]; W: [C, D].
    """
    loss = F.cross_entropy(H[-1] @ W.T, Y)
    loss = loss + 0.5 * lam_W * W.square().sum()
    prev = X
    for h in H:
        loss = loss + 0.5 * lam_H * (h - prev).square().sum()
        prev = h
    return loss


@dataclass(kw_only=True)
class MUFMResult(Result):
    """The MUFM optimum and its collapse metrics.

    Attributes:
        depth: L; layers: [0, 1, ..., L] (0 = the inputs X).
        nc1, etf_error, equinorm, ncc_mismatch: per layer l = 0..L (H_0 = X); NC1, ETF error and
            equinorm are None where undefined (reasons in ``nc1_note``).
        nc1_note: per layer, the ``nc1_note`` of :func:`collapse_metrics` ("" when nothing to say).
        nc3: NC3 of H_L against the optimal W.
        input_metrics: the metrics dict of the inputs X (``collapse_metrics``).
        spearman: Spearman rho(l, metric) over l = 0..L for each metric; None when undefined
            (e.g. a constant NCC mismatch), the reason in ``spearman_note``.
        spearman_note, ncc_zero_from: as in :class:`~resgeom_fast.analysis.collapse.CollapseResult`.
        loss_history: f after each L-BFGS iteration (index 0: at the initial point).
        grad_norm: ||grad f|| (Euclidean, over all H_l and W) at the returned point.
        steps_run: L-BFGS iterations done; converged: stopped by the gradient tolerance.
        lam_W, lam_H, lr, seed, num_classes, num_samples, width: the problem.
        H: the optimal features [H_1..H_L] ([N, D] float64) and W [C, D]: kept for inspection,
            not exported by ``to_dict``.
    """

    depth: int
    layers: list[int]
    nc1: list[Optional[float]]
    etf_error: list[Optional[float]]
    equinorm: list[Optional[float]]
    ncc_mismatch: list[float]
    nc3: Optional[float]
    nc1_note: list[str] = field(default_factory=list)
    input_metrics: dict[str, Any]
    spearman: dict[str, Optional[float]]
    spearman_note: dict[str, str] = field(default_factory=dict)
    ncc_zero_from: Optional[int] = None
    loss_history: list[float]
    grad_norm: float
    steps_run: int
    converged: bool
    lam_W: float
    lam_H: float
    lr: float
    seed: int
    num_classes: int
    num_samples: int
    width: int
    H: list[Tensor] = field(default_factory=list, repr=False, compare=False)
    W: Optional[Tensor] = field(default=None, repr=False, compare=False)

    _exclude = ("H", "W")

    def summary(self) -> dict[str, float]:
        """NC1 of the inputs and of H_L, their ratio, NC3, the final loss and gradient norm
        (undefined values NaN here, null in JSON; reasons in the result)."""
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        first, last = self.nc1[0], self.nc1[-1]
        return {
            "nc1_input": f(first),
            "nc1_last": f(last),
            "nc1_ratio": last / first if first is not None and last is not None and first > 0 else math.nan,
            "etf_error_last": f(self.etf_error[-1]),
            "nc3": f(self.nc3),
            "spearman_nc1": f(self.spearman["nc1"]),
            "loss": self.loss_history[-1],
            "grad_norm": self.grad_norm,
        }


def mufm(X: Tensor, Y: Tensor, depth: int, *, lam_W: float = 5e-3, lam_H: float = 5e-3, steps: int = 2000,
         lr: float = 1.0, num_classes: Optional[int] = None, seed: int = 0, progress: bool = False,
         tol: float = 1e-9) -> MUFMResult:
    """Solve the MUFM (see the module docstring) and measure collapse layer by layer.

    Args:
        X: inputs [N, D] (any floating dtype, CPU or GPU; copied to float64 on the same device).
        Y: int class labels [N] in [0, C) on X's device, every class present.
        depth: L >= 1 free feature layers.
        lam_W, lam_H: weight decay of W and of the layer increments (> 0).
        steps: maximum L-BFGS iterations (>= 1).
        lr: L-BFGS step length scale (1.0 with the strong Wolfe line search).
        num_classes: C >= 2 (default max(Y) + 1).
        seed: seeds the initial W (torch.Generator on CPU).
        progress: show a progress bar over the L-BFGS iterations
            (:func:`resgeom_fast._progress.progress`: tqdm on a terminal, plain lines otherwise).
        tol: stop when the largest absolute gradient entry is <= tol.

    Returns:
        :class:`MUFMResult` (metrics of X = H_0 and of H_1..H_L, loss history, final gradient norm).
    """
    where = "mufm"
    num_classes = check_features_labels(where, X, Y, num_classes)
    check_int(where, "depth", depth, 1)
    lam_W = check_float(where, "lam_W", lam_W, 0.0, open_lo=True)
    lam_H = check_float(where, "lam_H", lam_H, 0.0, open_lo=True)
    lr, tol = check_solver(where, steps, lr, tol, seed, progress)

    x, y, w = start_point(X, Y, num_classes, seed)
    n, d = x.shape
    hs = [x.clone().requires_grad_(True) for _ in range(depth)]
    params = hs + [w]
    run = lbfgs(where, lambda: mufm_objective(x, y, hs, w, lam_W, lam_H), params, steps=steps, tol=tol, lr=lr,
                name="mufm", progress=progress, describe=f"lam_W={lam_W}, lam_H={lam_H}, lr={lr}")
    history, steps_run, converged, grad = run.history, run.steps_run, run.stopped_at_tol, run.grad
    if not converged:
        history.append(run.final)
        converged = float(grad.abs().max()) <= tol
    grad_norm = float(grad.norm())

    # H_0 = X in its own dtype: the rank rule of collapse_metrics uses the features' precision
    # (float32 inputs carry float32 rounding even though the optimisation runs in float64)
    feats = [X.detach()] + [h.detach() for h in hs]
    wd = w.detach()
    per = [collapse_metrics(f, y, num_classes, weight=wd if l == depth else None) for l, f in enumerate(feats)]
    layers = list(range(depth + 1))
    res = {k: [p[k] for p in per] for k in METRICS}
    rho, rho_note, zero_from = layer_spearman(layers, res)
    return MUFMResult(
        depth=depth, layers=layers, nc3=per[-1]["nc3"], input_metrics=per[0], nc1_note=[p["nc1_note"] for p in per],
        spearman=rho, spearman_note=rho_note, ncc_zero_from=zero_from, loss_history=history, grad_norm=grad_norm,
        steps_run=steps_run, converged=converged, lam_W=lam_W, lam_H=lam_H, lr=lr, seed=seed,
        num_classes=num_classes, num_samples=n, width=d, H=[h.detach() for h in hs], W=wd, **res,
    )


def plot_mufm(result: Union[MUFMResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Collapse metrics of the MUFM optimum against the layer (l = 0 is the inputs X), log y-axis;
    the inputs' level of each metric is a dotted horizontal line of the same colour. Drawn from
    the dict form through :mod:`resgeom_fast.analysis.plotting` (tagged artists).

    Args:
        result: a :class:`MUFMResult`, its ``to_dict()``, or a results dict holding that dict at
            the path ``at``; ax: a matplotlib Axes (default: a new figure).

    Returns:
        the matplotlib Figure.
    """
    root, at, d = as_result_dict("plot_mufm", result, MUFMResult, at,
                                 ("layers", "nc3", "input_metrics", "depth", "lam_W", "lam_H", *METRICS))
    fig, ax = figure_axes(ax, (6.0, 4.0))
    names = {"nc1": "NC1", "etf_error": "ETF error", "equinorm": "equinorm", "ncc_mismatch": "NCC mismatch"}
    layers = d["layers"]
    for k in METRICS:
        (line,) = lines(ax, root, [(f"{names[k]} (MUFM)", join(at, "layers"), join(at, k))], styles=[{"ms": 3}],
                        legend=False)   # None (undefined) -> a gap
        x0 = d["input_metrics"][k]
        if x0 is not None:
            ax.plot([layers[0], layers[-1]], [x0, x0], ls=":", color=line.get_color(), label=f"{names[k]} (inputs)")
    finish_metric_axes(ax, root, at, "NC3 (H_L, W)", "layer l (0 = inputs)",
                       f"MUFM optimum (L={d['depth']}, λ_W={d['lam_W']:g}, λ_H={d['lam_H']:g})")
    return fig
