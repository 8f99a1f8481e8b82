"""The float64 full-batch L-BFGS loop shared by the unconstrained-feature / -Jacobian solvers
(:func:`resgeom_fast.analysis.mufm`, :func:`resgeom_fast.analysis.ujm`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from resgeom_fast._progress import progress as progress_bar
from resgeom_fast.linalg import NonFiniteError

from resgeom_fast.core.checks import check_type

from ._common import check_finite_tensor, check_float, check_int

__all__ = ["LBFGSRun", "check_features_labels", "check_solver", "lbfgs", "start_point"]


@dataclass
class LBFGSRun:
    """What :func:`lbfgs` did.

    Attributes:
        history: the objective at the start of every step() (the first entry: the initial point).
        steps_run: L-BFGS iterations taken.
        stopped_at_tol: step() took no iteration: the largest gradient entry was <= tol.
        final: the objective at the returned point (evaluated once more after the loop).
        grad: [P] float64, the gradient at the returned point, all parameters flattened.
    """

    history: list[float]
    steps_run: int
    stopped_at_tol: bool
    final: float
    grad: Tensor


def lbfgs(where: str, objective: Callable[[], Tensor], params: Sequence[Tensor], *, steps: int, tol: float,
          lr: float, name: str, progress: bool, describe: str) -> LBFGSRun:
    """Minimise ``objective()`` over ``params`` with torch's L-BFGS (strong Wolfe line search,
    history 20, one iteration per step() so that progress is shown and the budget is exact).

    Stops when an iteration is not taken (the largest gradient entry <= ``tol``), after ``steps``
    iterations, or when the objective repeats three times (no progress possible in float64).

    Raises:
        NonFiniteError: the objective became NaN / inf (``describe``, e.g. the settings, is named).
    """
    opt = torch.optim.LBFGS(list(params), lr=lr, max_iter=1, max_eval=26, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=tol, tolerance_change=0.0)
    state = opt.state[params[0]]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    bar = progress_bar(steps, name, enabled=progress, unit="iterations")
    # every step() evaluates f at the current point first and returns it; it takes no iteration
    # (state["n_iter"] unchanged) when the largest gradient entry is <= tol
    history: list[float] = []
    steps_run, at_tol = 0, False
    while True:
        history.append(float(opt.step(closure).detach()))
        if not math.isfinite(history[-1]):
            bar.close()
            raise NonFiniteError(f"{where}: the objective became {history[-1]} after {steps_run} L-BFGS "
                                 f"iterations ({describe}); no result was produced")
        if state.get("n_iter", 0) == steps_run:
            at_tol = True
            break
        steps_run += 1
        bar.set_postfix_str(f"loss={history[-1]:.6g}")  # before update: a plain line shows this step's loss
        bar.update(1)
        if steps_run >= steps or (len(history) > 2 and history[-1] == history[-2] == history[-3]):
            break  # budget spent, or no progress possible in float64
    bar.close()
    final = closure()
    grad = torch.cat([p.grad.flatten() for p in params])
    return LBFGSRun(history, steps_run, at_tol, float(final.detach()), grad)


def check_features_labels(where: str, X: Any, Y: Any, num_classes: Optional[int]) -> int:
    """The checks of :func:`~resgeom_fast.analysis.mufm` / :func:`~resgeom_fast.analysis.ujm` on the
    features X [N, D] (floating, finite) and integer labels Y [N] (every class of C present);
    returns C (``num_classes``, or max(Y) + 1)."""
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"{where}: expected X a floating Tensor [N, D], got "
                        f"{type(X).__name__ if not isinstance(X, Tensor) else X.dtype}")
    if X.dim() != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"{where}: expected X of shape [N, D] with N >= 2, D >= 1, got {tuple(X.shape)}")
    if not isinstance(Y, Tensor) or Y.is_floating_point() or Y.dtype == torch.bool or Y.is_complex():
        raise TypeError(f"{where}: expected Y a Tensor of integer class labels [N], got "
                        f"{type(Y).__name__ if not isinstance(Y, Tensor) else Y.dtype}")
    if Y.shape != (X.shape[0],):
        raise ValueError(f"{where}: expected Y of shape [{X.shape[0]}], got {tuple(Y.shape)}")
    if Y.device != X.device:
        raise ValueError(f"{where}: expected Y on X's device {X.device}, got {Y.device}")
    if int(Y.min()) < 0:
        raise ValueError(f"{where}: expected Y >= 0, got {int(Y.min())}")
    if num_classes is None:
        num_classes = int(Y.max()) + 1
        check_int(where, "num_classes", num_classes, 2, hint=" (inferred as max(Y) + 1)")
    else:
        check_int(where, "num_classes", num_classes, 2)
    if int(Y.max()) >= num_classes:
        raise ValueError(f"{where}: expected Y in [0, {num_classes - 1}], got {int(Y.max())}")
    counts = torch.bincount(Y.long(), minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"{where}: expected at least one sample of every class, got none of class(es) {empty}")
    check_finite_tensor(where, X.detach(), "X")
    return num_classes


def check_solver(where: str, steps: Any, lr: Any, tol: Any, seed: Any, progress: Any) -> tuple[float, float]:
    """The solver settings shared by mufm and ujm (steps, seed ints; lr, tol > 0; progress a
    bool); returns (lr, tol) as floats."""
    check_int(where, "steps", steps, 1)
    lr = check_float(where, "lr", lr, 0.0, open_lo=True)
    tol = check_float(where, "tol", tol, 0.0, open_lo=True)
    check_int(where, "seed", seed, 0)
    check_type(where, "progress", progress, bool, "a bool")
    return lr, tol


def start_point(X: Tensor, Y: Tensor, num_classes: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """x = X in float64, y = Y as int64, and the classifier's starting point W [C, D] ~ N(0, 0.01^2)
    drawn in float64 from ``seed`` (on the CPU, then moved: the same W on every device)."""
    x = X.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(num_classes, x.shape[1], generator=gen, dtype=torch.float64)).to(x.device)
    return x, Y.long(), w.requires_grad_(True)
