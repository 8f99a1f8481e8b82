"""UJM: the Unconstrained Jacobians Model of Residual Alignment (docs/science.md section 1).

Our reading of Li & Papyan's model (docs/science.md section 1 gives the objective but no
constants; we follow :mod:`resgeom_fast.analysis.mufm`'s conventions). The residual Jacobians of a
linearised residual stack are the free variables: J_1..J_L, each [D, D], act on the inputs
H_0 = X ([N, D], rows are samples) through

    h_l = (I + J_l) h_{l-1}        (rows: H_l = H_{l-1} (I + J_l)^T),   h_L = prod_l (I + J_l) h_0,

with a linear classifier W [C, D] (no bias) on h_L, and the objective

    f(J, W) = CE(H_L W^T, Y) + (lam_W / 2) ||W||_F^2 + (lam_J / 2) sum_{l=1..L} ||J_l||_F^2,

where CE is the *mean* cross-entropy over the N samples and the penalties are plain (unnormalised)
squared Frobenius norms (the weight decay of an SGD step on a mean loss, ``weight_decay = lam``).
The same J_l act on every sample: the model's Jacobians are input-independent, unlike a trained
net's J_l(x).

f is minimised by full-batch L-BFGS (strong Wolfe line search) in float64 from J_l = 0 for every l
and W ~ N(0, 0.01^2) drawn from ``seed``: deterministic.

First-order conditions (what the tests check). With G = (softmax(H_L W^T) - onehot(Y)) / N [N, C]
and P_l = (I + J_L) ... (I + J_{l+1}) (P_L = I), a stationary point satisfies

    lam_W W = -G^T H_L,        lam_J J_l = -P_l^T W^T G^T H_{l-1}     (l = 1..L).

Every row of G sums to 0, so G^T H has rank <= C - 1: at every stationary point rank(J_l) <= C - 1
(RA3's "rank <= C" with one to spare) and rank(W) <= C - 1.

Measured at the optimum (float64, a dense SVD J_l = U_l S_l V_l^T of each Jacobian):

- RA3: ``singular_values`` [L, D]; ``numerical_rank_l = #{r : s_r > tau s_1}`` (tau = 1e-2, the
  trained nets' rule); ``rank_le_c``; ``gap_ratio_l = s_C / s_{C-1}`` (1-based: the first singular
  value beyond the bound C - 1 over the last within it; ~0 where rank J_l <= C - 1 exactly, which
  the numerical rank at tau may not show when s_{C-1} < tau s_1);
- RA2: ``self_alignment_l = mean_{r <= rank_l} |u_{l,r}^T v_{l,r}|`` -- over the numerical rank,
  not over r <= C as for trained nets: beyond the rank the singular vectors of an exactly
  rank-deficient J_l are an arbitrary basis of its null space, so |u^T v| there is no property of
  the optimum; ``diag_ratio_ij = ||diag A_ij||^2 / ||A_ij||_F^2`` with ``A_ij = U_i^T J_j V_i``
  restricted to the rank_i top vectors of J_i, and ``diag_positive_ij`` the fraction of positive
  diagonal entries; ``symmetry_l = ||J_l - J_l^T||_F / ||J_l||_F`` (0 = symmetric);
- RA4: ``sigma1`` [L] and ``depth_product = L * mean_l sigma1``;
- RA1: :func:`~resgeom_fast.analysis.alignment.trajectory_metrics` of the trajectories
  (h_0, ..., h_L) of every input (the model is linear, so these follow from the J_l).

A metric of a layer whose J_l is 0 (rank 0) is undefined: None, with the reason in ``undefined``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor


from ._common import Result, check_float, check_int
from ._lbfgs import check_features_labels, check_solver, lbfgs, start_point
from .alignment import diag_ratio, numerical_rank, trajectory_metrics
from .plotting import as_result_dict, figure_axes, join, lines

__all__ = ["UJMResult", "plot_ujm", "ujm", "ujm_forward", "ujm_objective"]

_ZERO_J = "J_l = 0 at the optimum (rank 0): its singular vectors are undefined"


def ujm_forward(X: Tensor, J: list[Tensor]) -> list[Tensor]:
    """[H_0 = X, H_1, ..., H_L] with H_l = H_{l-1} (I + J_l)^T (each [N, D]; differentiable in J).

    Args:
        X: inputs [N, D]; J: [J_1, ..., J_L], each [D, D].
    """
    hs = [X]
    for j in J:
        hs.append(hs[-1] + hs[-1] @ j.T)
    return hs


def ujm_objective(X: Tensor, Y: Tensor, J: list[Tensor], W: Tensor, lam_W: float, lam_J: float) -> Tensor:
    """f(J, W) of the module docstring (a scalar tensor, differentiable in J and W).

    Args:
        X: inputs [N, D]; Y: int labels [N]; J: [J_1, ..., J_L], each [D, D]; W: [C, D].
    """
    h = ujm_forward(X, J)[-1]
    loss = F.cross_entropy(h @ W.T, Y)
    loss = loss + 0.5 * lam_W * W.square().sum()
    for j in J:
        loss = loss + 0.5 * lam_J * j.square().sum()
    return loss


@dataclass(kw_only=True)
class UJMResult(Result):
    """The UJM optimum and its Residual Alignment metrics (float64 CPU tensors; JSON: lists).

    Attributes:
        depth: L; width: D; num_classes: C; num_samples: N; lam_W, lam_J, tau, lr, seed: the problem.
        singular_values: [L, D] descending singular values of every J_l.
        sigma1: [L]; depth_product: L * mean_l sigma1; sigma1_spread: std_l / mean_l of sigma1
            (population std; 0 = equal top singular values across depth; None when all are 0).
        numerical_rank: [L] (int); rank_le_c: every numerical rank <= C; rank_bound: C - 1, the
            bound every stationary point obeys; gap_ratio: [L] s_C / s_{C-1} (None where C > D or
            s_{C-1} = 0).
        self_alignment: [L] mean over r <= numerical_rank_l of |u_r^T v_r| (None where rank 0).
        diag_ratio: [L, L] diag ratio of A_ij = U_i^T J_j V_i (top numerical_rank_i vectors of
            J_i; None where rank_i = 0); diag_positive: [L, L] fraction of positive diag A_ij.
        symmetry: [L] ||J_l - J_l^T||_F / ||J_l||_F (None where J_l = 0).
        linearity, equispacing, step_cosine: means over the N inputs of the RA1 metrics of the
            trajectories (None where undefined: one layer has no step cosine).
        train_accuracy: fraction of the N inputs that W h_L classifies correctly.
        loss_history: f after each L-BFGS iteration (index 0: at the initial point).
        grad_norm: ||grad f|| (Euclidean, over all J_l and W) at the returned point; grad_max: its
            largest absolute entry; steps_run: L-BFGS iterations done; converged: grad_max <= tol.
        undefined: {metric: reason} for metrics that are None.
        J: the optimal Jacobians [J_1..J_L] ([D, D] float64) and W [C, D]: kept for inspection,
            not exported by ``to_dict``.
    """

    depth: int
    width: int
    num_classes: int
    num_samples: int
    lam_W: float
    lam_J: float
    tau: float
    singular_values: Tensor
    sigma1: Tensor
    depth_product: float
    sigma1_spread: Optional[float]
    numerical_rank: list[int]
    rank_le_c: bool
    rank_bound: int
    gap_ratio: list[Optional[float]]
    self_alignment: list[Optional[float]]
    diag_ratio: Tensor
    diag_positive: Tensor
    symmetry: list[Optional[float]]
    linearity: Optional[float]
    equispacing: Optional[float]
    step_cosine: Optional[float]
    train_accuracy: float
    loss_history: list[float]
    grad_norm: float
    grad_max: float
    steps_run: int
    converged: bool
    tol: float
    lr: float
    seed: int
    undefined: dict[str, str] = field(default_factory=dict)
    J: list[Tensor] = field(default_factory=list, repr=False, compare=False)
    W: Optional[Tensor] = field(default=None, repr=False, compare=False)

    _exclude = ("J", "W")

    def _offdiag(self, M: Tensor) -> Optional[float]:
        L = self.depth
        if L < 2:
            return None
        vals = M[~torch.eye(L, dtype=torch.bool)]
        vals = vals[~torch.isnan(vals)]
        return float(vals.mean()) if vals.numel() else None

    @property
    def diag_ratio_offdiag(self) -> Optional[float]:
        """Mean of ``diag_ratio`` over pairs i != j with a defined value (None for L = 1 or none defined)."""
        return self._offdiag(self.diag_ratio)

    @property
    def diag_positive_offdiag(self) -> Optional[float]:
        """Mean of ``diag_positive`` over pairs i != j (None for L = 1 or none defined)."""
        return self._offdiag(self.diag_positive)

    def summary(self) -> dict[str, Any]:
        """Headline values; an undefined one is None (NaN-free) with ``<key>_reason``.

        Keys: self_alignment (mean over layers with rank > 0), diag_ratio_offdiag,
        diag_positive_offdiag, symmetry_max, max_numerical_rank, rank_le_c, rank_bound,
        depth_product, sigma1_spread, linearity, equispacing, step_cosine, train_accuracy, loss,
        grad_norm, converged.
        """
        sa = [v for v in self.self_alignment if v is not None]
        sym = [v for v in self.symmetry if v is not None]
        gaps = [v for v in self.gap_ratio if v is not None]
        out: dict[str, Any] = {
            "self_alignment": sum(sa) / len(sa) if sa else None,
            "diag_ratio_offdiag": self.diag_ratio_offdiag,
            "diag_positive_offdiag": self.diag_positive_offdiag,
            "symmetry_max": max(sym) if sym else None,
            "max_numerical_rank": float(max(self.numerical_rank)),
            "rank_le_c": self.rank_le_c,
            "rank_bound": float(self.rank_bound),
            "gap_ratio_max": max(gaps) if gaps else None,
            "depth_product": self.depth_product,
            "sigma1_spread": self.sigma1_spread,
            "linearity": self.linearity,
            "equispacing": self.equispacing,
            "step_cosine": self.step_cosine,
            "train_accuracy": self.train_accuracy,
            "loss": self.loss_history[-1],
            "grad_norm": self.grad_norm,
            "converged": self.converged,
        }
        reasons = dict(self.undefined)
        if self.depth < 2:
            reasons.setdefault("diag_ratio_offdiag", "one layer: no pair i != j")
            reasons.setdefault("diag_positive_offdiag", "one layer: no pair i != j")
        elif out["diag_ratio_offdiag"] is None:
            reasons.setdefault("diag_ratio_offdiag", _ZERO_J + " in every layer")
            reasons.setdefault("diag_positive_offdiag", _ZERO_J + " in every layer")
        if not sa:
            reasons.setdefault("self_alignment", _ZERO_J + " in every layer")
        if not sym:
            reasons.setdefault("symmetry_max", "every J_l = 0")
        if not gaps:
            reasons.setdefault("gap_ratio_max", self.undefined.get("gap_ratio", "undefined in every layer"))
        for key, why in reasons.items():
            if key in out and out[key] is None:
                out[f"{key}_reason"] = why
        return out

    def _extra(self) -> dict[str, Any]:
        return {"analysis": "ujm", "diag_ratio_offdiag": self.diag_ratio_offdiag,
                "diag_positive_offdiag": self.diag_positive_offdiag, "summary": self.summary()}


def _metrics(x: Tensor, y: Tensor, js: list[Tensor], w: Tensor, C: int, tau: float) -> dict[str, Any]:
    """The RA metrics of the optimum (module docstring), on float64 CPU tensors."""
    L = len(js)
    und: dict[str, str] = {}
    U, S, Vh = torch.linalg.svd(torch.stack(js))                       # [L, D, D], [L, D], [L, D, D]
    V = Vh.transpose(-1, -2)
    ranks = numerical_rank(S, tau).tolist()                              # 0 where sigma_1 = 0
    self_al: list[Optional[float]] = []
    sym: list[Optional[float]] = []
    dr = torch.full((L, L), math.nan, dtype=torch.float64)
    pos = torch.full((L, L), math.nan, dtype=torch.float64)
    for i in range(L):
        r = ranks[i]
        nrm = float(js[i].norm())
        sym.append(float((js[i] - js[i].T).norm()) / nrm if nrm > 0 else None)
        if r == 0:
            self_al.append(None)
            und[f"self_alignment[{i}]"] = _ZERO_J
            continue
        Ui, Vi = U[i, :, :r], V[i, :, :r]
        self_al.append(float((Ui * Vi).sum(0).abs().mean()))
        A = torch.stack([Ui.T @ js[j] @ Vi for j in range(L)])          # [L, r, r]
        dr[i] = diag_ratio(A)
        pos[i] = (A.diagonal(dim1=-2, dim2=-1) > 0).double().mean(-1)
    if any(v is None for v in sym):
        und["symmetry"] = "J_l = 0 in some layer: its symmetry ratio is undefined"
    D = S.shape[1]
    gaps: list[Optional[float]] = []
    for i in range(L):
        if C > D or float(S[i, C - 2]) == 0.0:
            gaps.append(None)
        else:
            gaps.append(float(S[i, C - 1] / S[i, C - 2]))
    if any(g is None for g in gaps):
        und["gap_ratio"] = (f"C = {C} > D = {D}: no C-th singular value" if C > D
                            else "s_{C-1} = 0 in some layer (rank < C - 1)")
    s1 = S[:, 0]
    mean_s1 = float(s1.mean())
    spread = float(s1.std(unbiased=False)) / mean_s1 if mean_s1 > 0 else None
    if spread is None:
        und["sigma1_spread"] = "every J_l = 0"
    hs = ujm_forward(x, js)
    ra1 = trajectory_metrics(torch.stack(hs, dim=1))                    # [N] each
    ra1_means: dict[str, Optional[float]] = {}
    for key, v in ra1.items():
        v = v[~torch.isnan(v)]
        ra1_means[key] = float(v.mean()) if v.numel() else None
        if ra1_means[key] is None:
            und[key] = ("one layer: a two-point trajectory has no step cosine" if key == "step_cosine" and L == 1
                        else "undefined for every input (all steps 0)")
    acc = float(((hs[-1] @ w.T).argmax(1) == y).double().mean())
    return {"singular_values": S, "sigma1": s1, "depth_product": float(L * mean_s1), "sigma1_spread": spread,
            "numerical_rank": [int(r) for r in ranks], "rank_le_c": all(r <= C for r in ranks),
            "rank_bound": C - 1, "gap_ratio": gaps, "self_alignment": self_al, "diag_ratio": dr, "diag_positive": pos,
            "symmetry": sym, "train_accuracy": acc, "undefined": und, **ra1_means}


def ujm(X: Tensor, Y: Tensor, depth: int, *, lam_W: float = 5e-3, lam_J: float = 5e-3, steps: int = 2000,
        lr: float = 1.0, num_classes: Optional[int] = None, tau: float = 1e-2, seed: int = 0,
        progress: bool = False, tol: float = 1e-9) -> UJMResult:
    """Solve the UJM (module docstring) and measure RA1-RA4 of its optimum.

    Args:
        X: inputs h_0 [N, D] (any floating dtype, CPU or GPU; copied to float64 on the same device).
        Y: int class labels [N] in [0, C) on X's device, every class present.
        depth: L >= 1 Jacobians.
        lam_W, lam_J: weight decay of W and of the Jacobians (> 0).
        steps: maximum L-BFGS iterations (>= 1).
        lr: L-BFGS step length scale (1.0 with the strong Wolfe line search).
        num_classes: C >= 2 (default max(Y) + 1).
        tau: numerical-rank threshold in (0, 1] (rank = #{s_r > tau s_1}).
        seed: seeds the initial W (torch.Generator on CPU).
        progress: a progress bar over the L-BFGS iterations.
        tol: converged when the largest absolute gradient entry is <= tol.

    Returns:
        :class:`UJMResult` (metrics, loss history, final gradient norm, convergence flag).
    """
    where = "ujm"
    C = check_features_labels(where, X, Y, num_classes)
    check_int(where, "depth", depth, 1)
    lam_W = check_float(where, "lam_W", lam_W, 0.0, open_lo=True)
    lam_J = check_float(where, "lam_J", lam_J, 0.0, open_lo=True)
    tau = check_float(where, "tau", tau, 0.0, 1.0, open_lo=True)
    lr, tol = check_solver(where, steps, lr, tol, seed, progress)

    x, y, w = start_point(X, Y, C, seed)
    n, d = x.shape
    js = [torch.zeros(d, d, dtype=torch.float64, device=x.device, requires_grad=True) for _ in range(depth)]
    params = js + [w]
    run = lbfgs(where, lambda: ujm_objective(x, y, js, w, lam_W, lam_J), params, steps=steps, tol=tol, lr=lr,
                name="ujm", progress=progress, describe=f"lam_W={lam_W}, lam_J={lam_J}, lr={lr}")
    history, steps_run, grad = run.history, run.steps_run, run.grad
    if run.final != history[-1]:
        history.append(run.final)
    grad_max = float(grad.abs().max())
    jd = [j.detach().cpu() for j in js]
    wd = w.detach().cpu()
    m = _metrics(x.cpu(), y.cpu(), jd, wd, C, tau)
    return UJMResult(depth=depth, width=d, num_classes=C, num_samples=n, lam_W=lam_W, lam_J=lam_J, tau=tau,
                     loss_history=history, grad_norm=float(grad.norm()), grad_max=grad_max, steps_run=steps_run,
                     converged=grad_max <= tol, tol=tol, lr=lr, seed=seed, J=jd, W=wd, **m)


def plot_ujm(result: Union[UJMResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Singular values of every J_l of the UJM optimum against their index r (log y), a dashed
    vertical line at r = C (RA3's bound). Drawn from the dict form (tagged artists).

    Args:
        result: a :class:`UJMResult`, its ``to_dict()``, or a results dict holding that dict at the
            path ``at``; ax: a matplotlib Axes (default: a new figure).

    Returns:
        the matplotlib Figure.
    """
    root, at, d = as_result_dict("plot_ujm", result, UJMResult, at,
                                 ("singular_values", "depth", "num_classes", "lam_W", "lam_J", "numerical_rank"))
    fig, ax = figure_axes(ax, (6.0, 4.0))
    L = d["depth"]
    lines(ax, root, [(f"J_{l + 1} (rank {d['numerical_rank'][l]})", "index1", join(at, f"singular_values.{l}"))
                     for l in range(L)],
          title=f"UJM optimum (L={L}, λ_W={d['lam_W']:g}, λ_J={d['lam_J']:g})", xlabel="index r",
          ylabel="singular value s_r(J_l)", logy=True, styles=[{"ms": 2.5}] * L, legend=L <= 10)
    ax.axvline(d["num_classes"], ls="--", color="gray", lw=0.8)
    return fig
