"""The Hamiltonian of leaky ResNets (Jacot & Kaiser 2024; docs/science.md section 4).

A :class:`~resgeom_fast.models.LeakyResNet` maps x to states ``a_0 = E x`` and, for steps
l = 1..L, ``a_l = (1 - rho_l Lt) a_{l-1} + rho_l W_l sigma(a_{l-1})`` with
``sigma(a) = (ReLU(a), 1)``. On a batch X [N, d] the states stacked as columns give
A_l = a_l(X) in R^{w x N} (the model returns rows, [N, w]: A_l is their transpose). Per layer:

- ``K_l = sigma(A_l)^T sigma(A_l)`` [N, N] (sigma includes the constant-1 row, so K_l = ReLU(A_l)^T
  ReLU(A_l) + 1 1^T), ``gamma_l = gamma0 ||K_l||_op``;
- cost of identity ``COI_l = Tr[A_l (K_l + gamma_l I)^{-1} A_l^T]``, potential ``-(Lt/2) COI_l``;
- kinetic energy ``KE = (1/(2 Lt)) Tr[dA (K + gamma I)^{-1} dA^T]`` and ``H = KE - (Lt/2) COI``;
- momenta ``B_l = -(1/lam) dLoss/dA_l`` (autograd, A_l an intermediate variable of the model's
  training loss) and ``H(A, B) = (Lt/2) ||B sigma(A)^T||_F^2 - Lt Tr[B A^T]``;
- stable rank ``||A_l||_*^2 / ||A_l||_F^2`` and the singular values of every A_l;
- bottleneck rank estimate ``k* ~ -(2/Lt) H``.

(K + gamma I)^{-1} is applied by Cholesky solves (an LU solve, ``torch.linalg.solve``, if a
Cholesky factorisation fails; never a pseudo-inverse).

Discretisation (our reading; docs/science.md section 4 writes all quantities "per layer"). The step l is a
forward-Euler step of dA/dt = -Lt A + W(t) sigma(A): ``(A_l - A_{l-1}) / rho_l = -Lt A_{l-1} +
W_l sigma(A_{l-1})``. The velocity therefore belongs to the state the step leaves, and we define
for layers l = 0..L-1

    velocity_l = dA_{l+1} = (A_{l+1} - A_l) / rho_{l+1}          (the paper's dA_{l+1})
    KE_l       = (1/(2 Lt)) Tr[velocity_l (K_l + gamma_l I)^{-1} velocity_l^T]
    H_l        = KE_l - (Lt/2) COI_l
    H(A, B)_l  = (Lt/2) ||B_{l+1} sigma(A_l)^T||_F^2 - Lt Tr[B_{l+1} A_l^T]

(the standard discrete maximum principle pairs the state A_l with the co-state B_{l+1} of the
step's output). With this pairing, at any stationary point of the loss in W_{l+1}
(``W_{l+1} = Lt B_{l+1} sigma(A_l)^T``) and an invertible K_l, KE_l - (Lt/2) COI_l equals
H(A_l, B_{l+1}) exactly as gamma0 -> 0; pairing dA_{l+1} with K_{l+1} would only agree to
O(rho). COI, potential, stable rank and singular values are defined for l = 0..L; velocity, KE,
H, H(A, B) and k* for l = 0..L-1 (the last state has no outgoing step); momenta for l = 0..L
(B_L = (2/(lam N)) P^T (Y - P A_L) is the terminal condition). Away from a stationary point
H(A, B) and KE - (Lt/2) COI differ; their agreement, and the constancy of H across layers, are
checks of how well the net is trained. Autograd's ReLU'(0) = 0 convention applies to the momenta
(e.g. B_0 on the zero-padded coordinates of A_0 = E X).

Precision: X and Y must have the model's dtype (no silent casts). The forward pass and autograd
run in the model's dtype; every statistic (K, solves, traces, SVDs) is computed in float64 from
those states. Use a float64 model for results that are accurate beyond float32 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from resgeom_fast.core.checks import check_type
from ._common import FIRST, Result, check_float, model_device_dtype
from ._common import check_finite_parameters, check_finite_tensor
from .plotting import pyplot, as_result_dict, figure_axes, join, lines, new_figure

__all__ = ["HamiltonianResult", "hamiltonian", "bottleneck_rank", "middle_layers", "plot_hamiltonian",
           "plot_layer_spectra", "stable_rank", "cost_of_identity"]

_WHERE = "hamiltonian"
DEFAULT_TOL = 0.1


# --------------------------------------------------------------------------- small formulas
def _sigma(a: Tensor) -> Tensor:
    """sigma(A) for A [w, N] (columns = samples): [w + 1, N], last row = 1."""
    return torch.cat([torch.relu(a), torch.ones_like(a[:1])], dim=0)


def _factor(k: Tensor, gamma: float) -> tuple[str, Tensor]:
    """Factorise K + gamma I [N, N]: ("chol", L) or ("lu", K + gamma I) when Cholesky fails."""
    m = k + gamma * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return "chol", chol
    return "lu", m


def _solve_right(fact: tuple[str, Tensor], b: Tensor) -> Tensor:
    """B (K + gamma I)^{-1} for B [r, N] (K symmetric, so this is ((K + gamma I)^{-1} B^T)^T)."""
    kind, m = fact
    if kind == "chol":
        return torch.cholesky_solve(b.T, m).T
    return torch.linalg.solve(m, b.T).T


def _quad(fact: tuple[str, Tensor], b: Tensor) -> float:
    """Tr[B (K + gamma I)^{-1} B^T] for B [r, N]."""
    return float((_solve_right(fact, b) * b).sum())


def cost_of_identity(a: Tensor, gamma0: float = 1e-3) -> float:
    """COI = Tr[A (K + gamma I)^{-1} A^T], K = sigma(A)^T sigma(A), gamma = gamma0 ||K||_op.

    Args:
        a: A [w, N] (columns = samples), any floating dtype (computed in float64).
        gamma0: relative ridge, > 0.
    """
    check_float("cost_of_identity", "gamma0", gamma0, lo=0.0, open_lo=True)
    a = a.detach().to(torch.float64)
    s = _sigma(a)
    k = s.T @ s
    gamma = gamma0 * float(torch.linalg.eigvalsh(k)[-1])
    return _quad(_factor(k, gamma), a)


def stable_rank(a: Tensor) -> float:
    """||A||_*^2 / ||A||_F^2 (nuclear-norm stable rank; r for r equal non-zero singular values).

    NaN for A = 0. Computed in float64.
    """
    s = torch.linalg.svdvals(a.detach().to(torch.float64))
    fro2 = float(s.pow(2).sum())
    return float(s.sum()) ** 2 / fro2 if fro2 > 0 else float("nan")


def middle_layers(num_layers: int) -> list[int]:
    """Indices of the "middle layers" among layers 0..num_layers-1: l with L/4 <= l <= 3L/4,
    L = num_layers - 1 (the middle half of the network; all layers when that is empty)."""
    last = num_layers - 1
    idx = [l for l in range(num_layers) if last / 4 <= l <= 3 * last / 4]
    return idx or list(range(num_layers))


# --------------------------------------------------------------------------- result
@dataclass
class HamiltonianResult(Result):
    """Per-layer Hamiltonian quantities of a LeakyResNet on one batch (all float64, CPU).

    Shapes (L = depth, N = samples, w = width, q = min(w, N)):
        rho [L] (steps), time [L+1] (t_l = rho_1 + ... + rho_l, t_0 = 0),
        gamma, k_norm, coi, potential, stable_rank, frobenius [L+1] (layers 0..L),
        rank [L+1] (int64: #singular values > tol * largest), singular_values [L+1, q],
        velocity_norm, kinetic, hamiltonian, k_star [L] (layers 0..L-1; see the module docstring),
        momentum_norm [L+1] and hamiltonian_ab [L] (None when lam == 0: the momenta are undefined).
    ``middle`` lists the layers entering the "middle" summaries (:func:`middle_layers`).
    ``lu_fallbacks`` counts the layers where Cholesky failed and an LU solve was used.
    """

    leak: float
    lam: float
    gamma0: float
    tol: float
    n_samples: int
    width: int
    depth: int
    rho: Tensor
    time: Tensor
    gamma: Tensor
    k_norm: Tensor
    coi: Tensor
    potential: Tensor
    stable_rank: Tensor
    frobenius: Tensor
    rank: Tensor
    singular_values: Tensor
    velocity_norm: Tensor
    kinetic: Tensor
    hamiltonian: Tensor
    k_star: Tensor
    momentum_norm: Optional[Tensor]
    hamiltonian_ab: Optional[Tensor]
    middle: list[int]
    lu_fallbacks: int

    _place = {"analysis": FIRST}

    def _extra(self) -> dict[str, Any]:
        return {"analysis": "hamiltonian", "summary": self.summary()}

    def summary(self) -> dict[str, float]:
        """Headline scalars: median over the middle layers of k* = -(2/Lt) H, COI, stable rank and
        rank; mean H and its relative spread std(H) / |mean(H)| over layers 0..L-1."""
        mid_h = [l for l in self.middle if l < self.depth] or list(range(self.depth))
        h = self.hamiltonian
        h_mean = float(h.mean())
        out = {
            "k_star_middle": float(self.k_star[mid_h].median()),
            "coi_middle": float(self.coi[self.middle].median()),
            "stable_rank_middle": float(self.stable_rank[self.middle].median()),
            "rank_middle": float(self.rank[self.middle].double().median()),
            "hamiltonian_mean": h_mean,
            "hamiltonian_rel_spread": float(h.std(unbiased=False)) / abs(h_mean) if h_mean != 0 else float("nan"),
        }
        if self.hamiltonian_ab is not None:
            out["hamiltonian_ab_mean"] = float(self.hamiltonian_ab.mean())
        return out


# --------------------------------------------------------------------------- analysis
def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module) or not getattr(model, "resgeom_leaky", False):
        raise TypeError(f"{_WHERE}: expected leaky_model a resgeom_fast LeakyResNet, got {type(model).__name__}")
    if not model.leak > 0:
        raise ValueError(f"{_WHERE}: expected leaky_model with leak (Lt) > 0 (KE and k* divide by Lt), "
                         f"got leak={model.leak}")


def hamiltonian(leaky_model: torch.nn.Module, X: Tensor, Y: Tensor, gamma0: float = 1e-3, *,
                tol: Optional[float] = None) -> HamiltonianResult:
    """Cost of identity, kinetic energy, Hamiltonian, momenta and layer spectra of a LeakyResNet.

    Args:
        leaky_model: a :class:`~resgeom_fast.models.LeakyResNet` with ``leak`` (Lt) > 0. Its
            ``lam`` defines the momenta; with lam == 0 they (and H(A, B)) are reported as None.
            It is not modified (no training-mode switch is needed: it has no normalisation).
        X: inputs [N, in_dim], the model's dtype and device.
        Y: targets [N, out_dim], the model's dtype and device (used by the momenta only).
        gamma0: relative ridge of (K + gamma I), gamma_l = gamma0 ||K_l||_op; > 0.
        tol: relative threshold of the per-layer rank (number of singular values of A_l above
            ``tol`` times the largest), in (0, 1); None -> 0.1 (our choice for "large singular
            values"; :func:`bottleneck_rank` recounts with any threshold).

    Returns:
        :class:`HamiltonianResult` (float64 CPU tensors). Layer indexing and the pairing of
        velocity / momentum with states are described in the module docstring.

    Raises:
        TypeError: leaky_model is not a LeakyResNet; X or Y not tensors.
        ValueError: leak == 0, gamma0 <= 0, tol outside (0, 1), X / Y of the wrong shape,
            dtype or device.
        NonFiniteError: a NaN / inf in a model parameter (named), in X or Y, or in a state or
            momentum (overflow; the layer named).
    """
    _check_model(leaky_model)
    gamma0 = check_float(_WHERE, "gamma0", gamma0, lo=0.0, open_lo=True)
    tol = DEFAULT_TOL if tol is None else check_float(_WHERE, "tol", tol, lo=0.0, hi=1.0, open_lo=True)
    device, dtype = model_device_dtype(_WHERE, leaky_model)
    for name, t, dim in (("X", X, leaky_model.in_dim), ("Y", Y, leaky_model.out_dim)):
        check_type(_WHERE, name, t, Tensor, "a tensor")
        if t.dim() != 2 or t.shape[1] != dim:
            raise ValueError(f"{_WHERE}: expected {name} of shape [N, {dim}], got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{_WHERE}: expected {name} of dtype {dtype} (the model's; no silent casts), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{_WHERE}: expected {name} on the model's device {device}, got {t.device}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{_WHERE}: expected Y with {X.shape[0]} rows (as X), got {Y.shape[0]}")
    if X.shape[0] < 1:
        raise ValueError(f"{_WHERE}: expected X with at least one row, got 0")
    check_finite_parameters(_WHERE, leaky_model)
    check_finite_tensor(_WHERE, X.detach(), "X")
    check_finite_tensor(_WHERE, Y.detach(), "Y")

    model = leaky_model
    lt, lam, depth = float(model.leak), float(model.lam), int(model.depth)
    n = int(X.shape[0])

    # Forward with the states as autograd intermediates: a_0 = E x needs x to require grad.
    with torch.enable_grad():
        x = X.detach().clone().requires_grad_(True)
        out, hiddens = model(x, return_hidden=True)
        momenta: Optional[list[Tensor]] = None
        if lam > 0:
            loss = model.data_loss(out, Y.detach()) + model.regularization()
            grads = torch.autograd.grad(loss, hiddens)
            momenta = [(-g / lam).detach().to(torch.float64).T.cpu() for g in grads]  # B_l [w, N]
    for l, h in enumerate(hiddens):
        check_finite_tensor(_WHERE, h.detach(), f"the state A_{l} (parameters and X are finite: the forward pass "
                                                f"overflowed)")
    if momenta is not None:
        for l, b in enumerate(momenta):
            check_finite_tensor(_WHERE, b, f"the momentum B_{l} (overflow in the loss gradient)")
    states = [h.detach().to(torch.float64).T.cpu() for h in hiddens]  # A_l [w, N]
    rho = model.rho.detach().to(torch.float64).cpu()

    gamma, k_norm, coi, srank, fro, svals = [], [], [], [], [], []
    vel_norm, kinetic, h_ab, mom_norm = [], [], [], []
    lu = 0
    for l, a in enumerate(states):
        s = _sigma(a)
        k = s.T @ s
        knorm = float(torch.linalg.matrix_norm(s, ord=2)) ** 2
        g = gamma0 * knorm
        fact = _factor(k, g)
        lu += fact[0] == "lu"
        gamma.append(g)
        k_norm.append(knorm)
        coi.append(_quad(fact, a))
        sv = torch.linalg.svdvals(a)
        svals.append(sv)
        f2 = float(sv.pow(2).sum())
        fro.append(math.sqrt(f2))
        srank.append(float(sv.sum()) ** 2 / f2 if f2 > 0 else float("nan"))
        if momenta is not None:
            mom_norm.append(float(momenta[l].norm()))
        if l < depth:
            vel = (states[l + 1] - a) / float(rho[l])
            vel_norm.append(float(vel.norm()))
            kinetic.append(_quad(fact, vel) / (2.0 * lt))
            if momenta is not None:
                b = momenta[l + 1]
                h_ab.append(0.5 * lt * float((b @ s.T).pow(2).sum()) - lt * float((b * a).sum()))

    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    coi_t, kin_t = f64(coi), f64(kinetic)
    potential = -0.5 * lt * coi_t
    ham = kin_t + potential[:depth]
    sv_t = torch.stack(svals)
    smax = sv_t[:, :1]
    rank = (sv_t > tol * smax).sum(1) * (smax[:, 0] > 0)
    return HamiltonianResult(
        leak=lt, lam=lam, gamma0=gamma0, tol=tol, n_samples=n, width=int(model.width), depth=depth,
        rho=rho, time=torch.cat([rho.new_zeros(1), rho.cumsum(0)]), gamma=f64(gamma), k_norm=f64(k_norm),
        coi=coi_t, potential=potential, stable_rank=f64(srank), frobenius=f64(fro), rank=rank.to(torch.int64),
        singular_values=sv_t, velocity_norm=f64(vel_norm), kinetic=kin_t, hamiltonian=ham,
        k_star=-(2.0 / lt) * ham, momentum_norm=f64(mom_norm) if momenta is not None else None,
        hamiltonian_ab=f64(h_ab) if momenta is not None else None, middle=middle_layers(depth + 1),
        lu_fallbacks=int(lu),
    )


@dataclass
class BottleneckRank(Result):
    """Rank readings of a :class:`HamiltonianResult`.

    ``rank`` [L+1]: #singular values of A_l above ``rel`` times the largest; ``rank_middle``:
    their median over the middle layers (rounded down to an int); ``stable_rank_middle`` and
    ``k_star_middle``: medians over the middle layers of the stable rank and of -(2/Lt) H.
    """

    rel: float
    rank: Tensor
    rank_middle: int
    stable_rank_middle: float
    k_star_middle: float


def bottleneck_rank(result: HamiltonianResult, rel: Optional[float] = None) -> BottleneckRank:
    """Bottleneck rank estimates from a result: counts of large singular values per layer
    (threshold ``rel`` times the largest, default ``result.tol``), their middle-layer median,
    the middle-layer stable rank and k* = -(2/Lt) H (medians over :attr:`HamiltonianResult.middle`).
    """
    if not isinstance(result, HamiltonianResult):
        raise TypeError(f"bottleneck_rank: expected result a HamiltonianResult, got {type(result).__name__}")
    rel = result.tol if rel is None else check_float("bottleneck_rank", "rel", rel, lo=0.0, hi=1.0, open_lo=True)
    sv = result.singular_values
    smax = sv[:, :1]
    rank = ((sv > rel * smax).sum(1) * (smax[:, 0] > 0)).to(torch.int64)
    s = result.summary()
    return BottleneckRank(rel=rel, rank=rank, rank_middle=int(rank[result.middle].double().median()),
                          stable_rank_middle=s["stable_rank_middle"], k_star_middle=s["k_star_middle"])


# --------------------------------------------------------------------------- plots
def plot_hamiltonian(result: Union[HamiltonianResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Energies per layer and the bottleneck estimate k* = -(2/Lt) H.

    ``ax`` None: a figure with two panels, (left) H, KE, -(Lt/2) COI and H(A, B) against the
    layer l, (right) k* = -(2/Lt) H with the stable rank and rank of A_l. One Axes: the energies
    on it and k* on a twin y axis. A sequence of two Axes: the two panels on them.
    ``result``: a :class:`HamiltonianResult`, its ``to_dict()``, or a results dict holding that
    dict at the path ``at``; every plotted series is drawn from the dict form (tagged artists,
    :mod:`resgeom_fast.analysis.plotting`).
    """
    root, at, d = as_result_dict("plot_hamiltonian", result, HamiltonianResult, at,
                                 ("hamiltonian", "kinetic", "potential", "hamiltonian_ab", "k_star", "stable_rank",
                                  "rank", "leak", "lam", "tol"))
    if ax is None:
        fig, (ax_e, ax_k) = new_figure(2, width=5.5, height=4.0)
    elif isinstance(ax, (list, tuple)) or (hasattr(ax, "__len__") and not hasattr(ax, "plot")):
        ax_e, ax_k = ax[0], ax[1]
        fig = ax_e.figure
    else:
        ax_e, ax_k = ax, None
        fig = ax_e.figure
    energies: list[Any] = [("H = KE - (Lt/2) COI", "index", join(at, "hamiltonian")),
                           ("KE", "index", join(at, "kinetic")),
                           ("-(Lt/2) COI", "index", join(at, "potential"))]
    styles: list[dict[str, Any]] = [{"color": "k", "ms": 3}, {"color": "tab:blue", "marker": ""},
                                    {"color": "tab:red", "marker": ""}]
    if d["hamiltonian_ab"] is not None:
        energies.append(("H(A, B)", "index", join(at, "hamiltonian_ab")))
        styles.append({"color": "tab:green", "ls": "--", "marker": ""})
    lines(ax_e, root, energies, styles=styles, legend=False, xlabel="layer l", ylabel="energy",
          title=f"Hamiltonian (Lt = {d['leak']:g}, lam = {d['lam']:g})")
    ax_e.axhline(0.0, color="0.7", lw=0.8)
    if ax_k is None:
        twin = ax_e.twinx()
        lines(twin, root, [("-(2/Lt) H", "index", join(at, "k_star"))], styles=[{"ls": ":", "color": "tab:purple",
                                                                                   "marker": ""}],
              legend=False, ylabel="-(2/Lt) H")
        h1, l1 = ax_e.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax_e.legend(h1 + h2, l1 + l2, fontsize=8)
    else:
        ax_e.legend(fontsize=8)
        lines(ax_k, root, [("k* = -(2/Lt) H", "index", join(at, "k_star")),
                           ("stable rank of A_l", "index", join(at, "stable_rank")),
                           (f"#sv > {d['tol']:g} max", "index", join(at, "rank"))],
              styles=[{"ms": 3, "color": "tab:purple"}, {"color": "tab:orange", "marker": ""},
                      {"marker": "s", "ms": 3, "ls": "none", "color": "0.4"}],
              legend=False, xlabel="layer l", ylabel="rank", title="bottleneck rank estimates")
        ax_k.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_layer_spectra(result: Union[HamiltonianResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Singular values of A_l (descending, log scale), one line per layer l = 0..L coloured by
    depth (viridis). Zero singular values are masked by the log scale. Values are the dict
    form's ``singular_values`` (``result``: as in :func:`plot_hamiltonian`)."""
    root, at, d = as_result_dict("plot_layer_spectra", result, HamiltonianResult, at, ("singular_values",))
    fig, ax = figure_axes(ax, (6, 4))
    num = len(d["singular_values"])
    cmap = pyplot().get_cmap("viridis")
    series = [(f"l = {l}" if l in (0, num // 2, num - 1) else "", "index1", join(at, f"singular_values.{l}"))
              for l in range(num)]
    lines(ax, root, series, marker="", styles=[{"lw": 1, "color": cmap(l / max(num - 1, 1))} for l in range(num)],
          legend=False, xlabel="index i", ylabel="singular value s_i(A_l)", title="spectra of the representations A_l")
    ax.set_yscale("log", nonpositive="mask")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
