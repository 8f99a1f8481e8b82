"""Tests of resgeom_fast.analysis.ujm: the objective's gradient against central finite differences
(float64), a constructed case whose optimum is known (collapsed inputs: every J_l = j* e e^T,
W = a* [-e; e], (a*, j*) from an independent Newton solve of the reduced two-variable problem,
checked over a grid of starts), the closed-form first-order conditions at a generic optimum,
the metrics on known Jacobians, result / plot, input checks."""
from __future__ import annotations

import functools
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F

from resgeom_fast.analysis import UJMResult, plot_ujm, ujm, ujm_objective
from resgeom_fast.analysis.ujm import _metrics, ujm_forward
from resgeom_fast.linalg import NonFiniteError

D64 = torch.float64


def _generic(n: int = 15, d: int = 4, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    means = 2.0 * torch.randn(c, d, generator=g, dtype=D64)
    x = means[y] + torch.randn(n, d, generator=g, dtype=D64)
    return x, y


@functools.lru_cache(maxsize=None)
def solved_generic(depth: int = 3) -> UJMResult:
    x, y = _generic()
    return ujm(x, y, depth, lam_W=0.1, lam_J=0.1, steps=3000, tol=1e-8)


# -------------------------------------------------------------------------------- gradient
def test_gradient_matches_central_finite_differences() -> None:
    x, y = _generic(n=8, d=3, c=3, seed=1)
    g = torch.Generator().manual_seed(2)
    J = [0.3 * torch.randn(3, 3, generator=g, dtype=D64) for _ in range(2)]
    W = torch.randn(3, 3, generator=g, dtype=D64)
    params = [t.clone().requires_grad_(True) for t in J + [W]]
    lam_W, lam_J = 0.07, 0.11
    f = ujm_objective(x, y, params[:2], params[2], lam_W, lam_J)
    grads = torch.autograd.grad(f, params)
    eps = 1e-6
    for k, (p, gr) in enumerate(zip(params, grads)):
        fd = torch.empty_like(p)
        for idx in range(p.numel()):
            base = [t.detach().clone() for t in params]
            plus, minus = [t.clone() for t in base], [t.clone() for t in base]
            plus[k].view(-1)[idx] += eps
            minus[k].view(-1)[idx] -= eps
            fp = float(ujm_objective(x, y, plus[:2], plus[2], lam_W, lam_J))
            fm = float(ujm_objective(x, y, minus[:2], minus[2], lam_W, lam_J))
            fd.view(-1)[idx] = (fp - fm) / (2 * eps)
        assert torch.allclose(gr, fd, rtol=1e-6, atol=1e-8), (gr, fd)


def test_objective_by_hand() -> None:
    x, y = _generic(n=6, d=2, c=2)
    J = [torch.tensor([[0.1, 0.2], [0.0, -0.3]], dtype=D64), torch.tensor([[0.5, 0.0], [0.1, 0.2]], dtype=D64)]
    W = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=D64)
    h = x @ (torch.eye(2, dtype=D64) + J[0]).T @ (torch.eye(2, dtype=D64) + J[1]).T
    want = F.cross_entropy(h @ W.T, y) + 0.5 * 0.3 * W.square().sum() + 0.5 * 0.2 * sum(j.square().sum() for j in J)
    assert float(ujm_objective(x, y, J, W, 0.3, 0.2)) == pytest.approx(float(want), rel=1e-14)


# ------------------------------------------------------------------- known optimum (constructed)
def _reduced(a: torch.Tensor, j: torch.Tensor, L: int, lam_W: float, lam_J: float) -> torch.Tensor:
    """f at J_l = j e e^T (every l), W = a [-e; e] on X = [-e; e], Y = [0, 1]."""
    return F.softplus(-2 * a * (1 + j) ** L) + lam_W * a ** 2 + 0.5 * L * lam_J * j ** 2


def _newton_reduced(L: int, lam_W: float, lam_J: float) -> tuple[float, float, float]:
    """(a*, j*, f*): Newton on the two variables (exact Hessian) from a grid of starts; the lowest
    stationary point."""
    best = None
    for a0 in (0.3, 1.0, 3.0):
        for j0 in (-0.3, 0.0, 0.5, 1.0):
            z = torch.tensor([a0, j0], dtype=D64)
            for _ in range(40):
                fn = lambda v: _reduced(v[0], v[1], L, lam_W, lam_J)  # noqa: E731
                g = torch.autograd.functional.jacobian(fn, z)
                H = torch.autograd.functional.hessian(fn, z)
                step = torch.linalg.solve(H, g)
                if not torch.isfinite(step).all():
                    break
                z = z - step
                if float(g.abs().max()) < 1e-14:
                    break
            g = torch.autograd.functional.jacobian(lambda v: _reduced(v[0], v[1], L, lam_W, lam_J), z)
            if not torch.isfinite(z).all() or float(g.abs().max()) > 1e-10 or float(z[1]) <= -1:
                continue
            f = float(_reduced(z[0], z[1], L, lam_W, lam_J))
            if best is None or f < best[2]:
                best = (float(z[0]), float(z[1]), f)
    assert best is not None
    return best


def test_known_optimum_collapsed_inputs() -> None:
    L, lam_W, lam_J = 3, 0.1, 0.1
    e = torch.tensor([0.6, 0.8], dtype=D64)
    x = torch.stack([-e, e])
    y = torch.tensor([0, 1])
    a, j, f = _newton_reduced(L, lam_W, lam_J)
    assert a > 0 and j > 0
    r = ujm(x, y, L, lam_W=lam_W, lam_J=lam_J, steps=2000, tol=1e-8)
    assert r.converged and r.grad_norm < 1e-7
    assert r.loss_history[-1] == pytest.approx(f, rel=1e-10)
    ee = torch.outer(e, e)
    for J in r.J:
        assert torch.allclose(J, j * ee, atol=1e-7)
    assert torch.allclose(r.W, a * torch.stack([-e, e]), atol=1e-7)
    # the metrics of a known optimum: rank 1 = C - 1, aligned, symmetric, equal sigma_1 = j
    assert r.numerical_rank == [1, 1, 1] and r.rank_le_c and r.rank_bound == 1
    assert all(g < 1e-6 for g in r.gap_ratio)          # s_2 / s_1: rank 1 exactly
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in r.self_alignment)
    assert r.diag_ratio_offdiag == pytest.approx(1.0, abs=1e-12)
    assert r.diag_positive_offdiag == 1.0
    assert torch.allclose(r.sigma1, torch.full((L,), j, dtype=D64), atol=1e-7)
    assert r.depth_product == pytest.approx(L * j, rel=1e-6)
    assert r.summary()["symmetry_max"] < 1e-6
    assert r.train_accuracy == 1.0
    # the trajectory of each input is a straight line through 0 (linearity 1, aligned steps)
    assert r.linearity == pytest.approx(1.0, abs=1e-12) and r.step_cosine == pytest.approx(1.0, abs=1e-12)
    # equispacing: the steps grow as (1 + j)^l: std / mean of j (1 + j)^(l-1), l = 1..L
    steps = torch.tensor([j * (1 + j) ** k for k in range(L)], dtype=D64)
    assert r.equispacing == pytest.approx(float(steps.std(unbiased=False) / steps.mean()), rel=1e-6)


def test_known_optimum_other_seeds_and_starts_agree() -> None:
    """Nonconvex objective: several initial W reach the same optimal value."""
    x, y = _generic(n=9, d=2, c=3, seed=3)
    vals = [ujm(x, y, 2, lam_W=0.1, lam_J=0.1, seed=s, steps=3000).loss_history[-1] for s in (0, 1)]
    assert max(vals) - min(vals) < 1e-9 * max(1.0, abs(vals[0]))


# --------------------------------------------------------------- first-order conditions (generic)
def test_generic_optimum_first_order_conditions_and_rank_bound() -> None:
    """lam_W W = -G^T H_L and lam_J J_l = -P_l^T W^T G^T H_{l-1}, G = (softmax - onehot) / N;
    hence rank J_l <= C - 1."""
    r = solved_generic()
    x, y = _generic()
    assert r.converged and r.grad_max <= 1e-8
    hs = ujm_forward(x, r.J)
    n, C = x.shape[0], r.num_classes
    G = (torch.softmax(hs[-1] @ r.W.T, 1) - F.one_hot(y, C).double()) / n
    assert torch.allclose(r.lam_W * r.W, -G.T @ hs[-1], atol=1e-8)
    eye = torch.eye(x.shape[1], dtype=D64)
    for l in range(r.depth):
        P = eye.clone()
        for k in range(r.depth - 1, l, -1):
            P = P @ (eye + r.J[k])
        assert torch.allclose(r.lam_J * r.J[l], -P.T @ r.W.T @ G.T @ hs[l], atol=1e-8)
    assert max(r.numerical_rank) <= C - 1
    assert r.summary()["gap_ratio_max"] < 1e-6          # s_C / s_{C-1}: rank <= C - 1 exactly
    assert all(int(torch.linalg.matrix_rank(J, rtol=1e-6)) <= C - 1 for J in r.J)
    # the summary's headline numbers are those of the per-layer fields
    s = r.summary()
    assert s["max_numerical_rank"] == max(r.numerical_rank)
    assert s["depth_product"] == pytest.approx(r.depth * float(r.sigma1.mean()))
    assert s["loss"] == r.loss_history[-1]


def test_loss_history_monotone_and_deterministic() -> None:
    r = solved_generic()
    h = r.loss_history
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:]))
    x, y = _generic(n=6, d=2, c=2)
    r1, r2 = (ujm(x, y, 2, lam_W=0.2, lam_J=0.2, steps=50) for _ in range(2))
    assert r2.loss_history == r1.loss_history and all(torch.equal(a, b) for a, b in zip(r1.J, r2.J))


# ------------------------------------------------------------------------ metrics on known J
def test_metrics_on_constructed_jacobians() -> None:
    """J_1 = diag(2, 1, 0), J_2 = a non-symmetric rank-1 matrix u v^T with u . v = 0, J_3 = 0."""
    J1 = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=D64))
    u, v = torch.tensor([1.0, 0.0, 0.0], dtype=D64), torch.tensor([0.0, 1.0, 0.0], dtype=D64)
    J2 = torch.outer(u, v)
    J3 = torch.zeros(3, 3, dtype=D64)
    x = torch.randn(4, 3, dtype=D64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    m = _metrics(x, y, [J1, J2, J3], torch.zeros(2, 3, dtype=D64), 2, 1e-2)
    assert m["numerical_rank"] == [2, 1, 0] and m["rank_le_c"] is True
    assert m["self_alignment"][0] == pytest.approx(1.0) and m["self_alignment"][1] == pytest.approx(0.0)
    assert m["self_alignment"][2] is None and "self_alignment[2]" in m["undefined"]
    assert m["symmetry"][0] == 0.0 and m["symmetry"][1] == pytest.approx(math.sqrt(2)) and m["symmetry"][2] is None
    assert m["sigma1"].tolist() == [2.0, 1.0, 0.0]
    assert m["gap_ratio"][0] == pytest.approx(0.5) and m["gap_ratio"][1] == 0.0 and m["gap_ratio"][2] is None
    assert "rank < C - 1" in m["undefined"]["gap_ratio"]
    assert m["depth_product"] == pytest.approx(3.0)
    # A_12 = U_1^T J_2 V_1 (U_1 = V_1 = [e1, e2]): [[0, 1], [0, 0]] -> diag ratio 0
    assert float(m["diag_ratio"][0, 1]) == 0.0
    # A_21 = u^T J_1 v = 0 -> diag ratio undefined (NaN, null in JSON)
    assert math.isnan(float(m["diag_ratio"][1, 0]))
    assert torch.isnan(m["diag_ratio"][2]).all()


def test_zero_jacobians_are_undefined_with_reasons() -> None:
    """Inputs X = 0: the loss does not depend on J, so the optimum is J_l = 0 exactly (W -> 0):
    the alignment metrics are None with a reason, never a number."""
    x = torch.zeros(4, 3, dtype=D64)
    r = ujm(x, torch.tensor([0, 1, 0, 1]), 2, lam_W=0.1, lam_J=0.1, steps=200)
    s = r.summary()
    assert all(float(J.abs().max()) == 0.0 for J in r.J)
    assert r.numerical_rank == [0, 0] and r.self_alignment == [None, None] and r.symmetry == [None, None]
    assert s["self_alignment"] is None and "rank 0" in s["self_alignment_reason"]
    assert s["diag_ratio_offdiag"] is None and s["diag_ratio_offdiag_reason"]
    assert s["sigma1_spread"] is None and s["sigma1_spread_reason"] == "every J_l = 0"
    assert s["symmetry_max"] is None and s["symmetry_max_reason"]
    assert s["gap_ratio_max"] is None and s["gap_ratio_max_reason"]
    json.dumps(r.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------- result / plot
def test_result_json_summary_and_plot(tmp_path) -> None:
    r = solved_generic()
    d = r.to_dict()
    assert "J" not in d and "W" not in d and d["analysis"] == "ujm"
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["singular_values"] == r.singular_values.tolist()
    assert d["summary"] == json.loads(json.dumps(r.summary(), allow_nan=False))
    from resgeom_fast.analysis.plotting import check_figure
    fig = plot_ujm(r)
    assert len(fig.axes[0].lines) == r.depth + 1   # one per J_l and the line at r = C
    assert check_figure(fig, d) >= r.depth
    fig2 = plot_ujm({"ujm": d}, at="ujm")
    assert check_figure(fig2, {"ujm": d}) >= r.depth
    r.to_json(tmp_path / "ujm.json")
    assert json.loads((tmp_path / "ujm.json").read_text())["depth"] == 3


def test_plot_wrong_type() -> None:
    with pytest.raises(TypeError, match="plot_ujm: expected result an? UJMResult or its to_dict"):
        plot_ujm({"depth": 1})


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"X": [[1.0]]}, TypeError, "ujm: expected X a floating Tensor"),
    ({"X": torch.zeros(4, dtype=D64)}, ValueError, r"ujm: expected X of shape \[N, D\]"),
    ({"Y": torch.zeros(4)}, TypeError, "ujm: expected Y a Tensor of integer class labels"),
    ({"Y": torch.tensor([0, 1, 0])}, ValueError, r"ujm: expected Y of shape \[4\]"),
    ({"Y": torch.tensor([0, 1, 0, -1])}, ValueError, "ujm: expected Y >= 0"),
    ({"Y": torch.tensor([0, 0, 0, 0])}, ValueError,
     r"ujm: expected num_classes >= 2 \(inferred as max\(Y\) \+ 1\), got 1"),
    ({"num_classes": 3}, ValueError,
     r"ujm: expected at least one sample of every class, got none of class\(es\) \[2\]"),
    ({"Y": torch.tensor([0, 1, 2, 0]), "num_classes": 2}, ValueError, r"ujm: expected Y in \[0, 1\]"),
    ({"depth": 0}, ValueError, "ujm: expected depth >= 1, got 0"),
    ({"lam_W": 0.0}, ValueError, "ujm: expected lam_W > 0.0"),
    ({"lam_J": -1.0}, ValueError, "ujm: expected lam_J > 0.0"),
    ({"steps": 0}, ValueError, "ujm: expected steps >= 1, got 0"),
    ({"tau": 2.0}, ValueError, "ujm: expected tau <= 1.0"),
    ({"seed": -1}, ValueError, "ujm: expected seed >= 0, got -1"),
    ({"progress": 1}, TypeError, "ujm: expected progress a bool"),
])
def test_bad_input(kwargs, exc, msg) -> None:
    args = {"X": torch.randn(4, 2, dtype=D64), "Y": torch.tensor([0, 1, 0, 1]), "depth": 2}
    args.update(kwargs)
    X, Y, depth = args.pop("X"), args.pop("Y"), args.pop("depth")
    with pytest.raises(exc, match=msg):
        ujm(X, Y, depth, **args)


def test_nonfinite_x() -> None:
    x = torch.randn(4, 2, dtype=D64)
    x[1, 0] = math.nan
    with pytest.raises(NonFiniteError, match="ujm: expected finite X"):
        ujm(x, torch.tensor([0, 1, 0, 1]), 2)
