"""The float64 full-batch L-BFGS loop shared by the unconstrained-feature / -Jacobian solvers
(:func:`resgeom_fast.analysis.mufm`, :func:`resgeom_fast.analysis.ujm`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from resgeom_fast._progress import progress as progress_bar
from resgeom_fast.linalg import NonFiniteError

__all__ = ["LBFGSRun", "lbfgs"]


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
