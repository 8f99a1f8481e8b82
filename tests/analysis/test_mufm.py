"""Tests of resgeom_fast.analysis.mufm: stationarity of the optimum (autograd and the closed-form
first-order conditions), concentration relative to the inputs without exact collapse, wiring of
the metrics, determinism, result/plot, input checks."""
from __future__ import annotations

import functools
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F

from resgeom_fast.analysis.collapse import METRICS, collapse_metrics
from resgeom_fast.analysis.mufm import MUFMResult, mufm, mufm_objective, plot_mufm

from tests.analysis._trained import digits_flat

D64 = torch.float64
LAM_W, LAM_H = 5e-3, 5e-3


def _data(n: int = 200):
    x, y = digits_flat().tensors("train")
    return x[:n], y[:n]


@functools.lru_cache(maxsize=None)
def solved(n: int = 200, depth: int = 3) -> MUFMResult:
    x, y = _data(n)
    return mufm(x, y, depth, lam_W=LAM_W, lam_H=LAM_H, steps=2000)


def test_optimum_is_stationary_autograd() -> None:
    r = solved()
    assert r.converged and r.grad_norm < 1e-6
    x, y = _data()
    hs = [h.clone().requires_grad_(True) for h in r.H]
    w = r.W.clone().requires_grad_(True)
    f = mufm_objective(x.double(), y, hs, w, LAM_W, LAM_H)
    grads = torch.autograd.grad(f, hs + [w])
    gnorm = float(torch.cat([g.flatten() for g in grads]).norm())
    assert gnorm < 1e-6
    assert float(f.detach()) == pytest.approx(r.loss_history[-1], rel=1e-12)
    # the objective as written (mean CE + plain Frobenius penalties), recomputed by hand
    ce = F.cross_entropy(r.H[-1] @ r.W.T, y)
    pen = sum((b - a).square().sum() for a, b in zip([x.double()] + r.H[:-1], r.H))
    by_hand = ce + 0.5 * LAM_W * r.W.square().sum() + 0.5 * LAM_H * pen
    assert float(f.detach()) == pytest.approx(float(by_hand), rel=1e-12)


def test_optimum_first_order_conditions() -> None:
    """grad = 0 means equal increments lam_H (H_l - H_{l-1}) = -(softmax(H_L W^T) - onehot(Y)) W / N
    for every l, and lam_W W = -(softmax - onehot)^T H_L / N."""
    r = solved()
    x, y = _data()
    n = x.shape[0]
    p = torch.softmax(r.H[-1] @ r.W.T, 1) - F.one_hot(y, r.num_classes).double()
    step = -(p @ r.W) / (n * LAM_H)
    scale = float(step.norm())
    assert scale > 1e-3  # the features do move
    for a, b in zip([x.double()] + r.H[:-1], r.H):
        assert float(((b - a) - step).norm()) < 1e-5 * scale
    w_star = -(p.T @ r.H[-1]) / (n * LAM_W)
    assert float((r.W - w_star).norm()) < 1e-6 * float(r.W.norm())


def test_more_concentrated_than_inputs_not_collapsed() -> None:
    r = solved()
    # measured (N = 200, L = 3): NC1 0.857 -> 0.749, ETF error 0.674 -> 0.661, equinorm 0.180 -> 0.170,
    # NCC mismatch 0.085 -> 0.070
    for k in ("nc1", "etf_error", "equinorm"):
        assert getattr(r, k)[-1] < r.input_metrics[k], k
        assert r.spearman[k] < -0.99, k  # decreases layer after layer
    assert r.ncc_mismatch[-1] <= r.input_metrics["ncc_mismatch"]
    assert r.nc1[-1] > 0.5 * r.nc1[0] > 0.1  # not exact collapse
    assert r.nc3 is not None and r.nc3 > 0.1


def test_metrics_are_collapse_metrics_of_the_features() -> None:
    r = solved()
    x, y = _data()
    feats = [x] + r.H
    for l, h in enumerate(feats):
        m = collapse_metrics(h, y, 10, weight=r.W if l == r.depth else None)
        for k in METRICS:
            assert getattr(r, k)[l] == m[k], (k, l)
    assert r.nc3 == collapse_metrics(r.H[-1], y, 10, weight=r.W)["nc3"]
    assert r.input_metrics == collapse_metrics(x, y, 10)
    assert r.layers == [0, 1, 2, 3] and r.width == 64 and r.num_samples == 200


def test_loss_history_monotone() -> None:
    r = solved()
    h = r.loss_history
    assert len(h) == r.steps_run + 1
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:]))
    assert h[-1] < h[0]


def test_deterministic_and_seeded() -> None:
    x, y = _data(60)
    a = mufm(x, y, 2, steps=50)
    b = mufm(x, y, 2, steps=50)
    assert a.to_dict() == b.to_dict()
    assert all(torch.equal(p, q) for p, q in zip(a.H, b.H))
    c = mufm(x, y, 2, steps=1, seed=1)
    assert c.loss_history[0] != a.loss_history[0]  # a different initial W
    assert c.steps_run == 1 and not c.converged


def test_result_json_summary_and_plot() -> None:
    r = solved()
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert "H" not in d and "W" not in d
    s = r.summary()
    assert all(isinstance(v, float) for v in s.values())
    assert s["nc1_ratio"] == pytest.approx(r.nc1[-1] / r.nc1[0])
    fig = plot_mufm(r)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 * len(METRICS) + 1
    for i, k in enumerate(METRICS):
        assert list(lines[2 * i].get_ydata()) == d[k]
        assert list(lines[2 * i].get_xdata()) == d["layers"]
        assert list(lines[2 * i + 1].get_ydata()) == [d["input_metrics"][k]] * 2
    assert list(lines[-1].get_ydata()) == [d["nc3"]]
    import matplotlib.pyplot as plt
    plt.close(fig)


# ----------------------------------------------------------------------------- input checks
def test_x_not_float() -> None:
    x, y = _data(30)
    with pytest.raises(TypeError, match="mufm: expected X a floating Tensor"):
        mufm(x.long(), y, 2)


def test_x_bad_shape() -> None:
    x, y = _data(30)
    with pytest.raises(ValueError, match=r"X of shape \[N, D\]"):
        mufm(x[:, :, None], y, 2)


def test_y_float() -> None:
    x, y = _data(30)
    with pytest.raises(TypeError, match="integer class labels"):
        mufm(x, y.double(), 2)


def test_y_bad_shape() -> None:
    x, y = _data(30)
    with pytest.raises(ValueError, match=r"Y of shape \[30\]"):
        mufm(x, y[:10], 2)


def test_depth_zero() -> None:
    x, y = _data(30)
    with pytest.raises(ValueError, match="depth >= 1"):
        mufm(x, y, 0)


def test_lam_nonpositive() -> None:
    x, y = _data(30)
    with pytest.raises(ValueError, match="lam_H > 0"):
        mufm(x, y, 2, lam_H=0.0)


def test_steps_zero() -> None:
    x, y = _data(30)
    with pytest.raises(ValueError, match="steps >= 1"):
        mufm(x, y, 2, steps=0)


def test_labels_out_of_range() -> None:
    x, y = _data(60)
    with pytest.raises(ValueError, match=r"Y in \[0, 4\]"):
        mufm(x, y, 2, num_classes=5)


def test_class_without_samples() -> None:
    x, y = _data(60)
    with pytest.raises(ValueError, match=r"none of class\(es\) \[10\]"):
        mufm(x, y, 2, num_classes=11)


def test_num_classes_lt_2() -> None:
    x, _ = _data(30)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        mufm(x, torch.zeros(30, dtype=torch.long), 2)


def test_plot_wrong_type() -> None:
    with pytest.raises(TypeError, match="MUFMResult"):
        plot_mufm(None)


def test_nonfinite_x() -> None:
    x, y = _data(30)
    x = x.clone()
    x[0, 0] = math.inf
    with pytest.raises(ValueError, match="finite X"):
        mufm(x, y, 2)


def test_nonfinite_x_is_nonfinite_error() -> None:
    from resgeom_fast.linalg import NonFiniteError

    x, y = _data(30)
    x = x.clone()
    x[2, 3] = math.nan
    with pytest.raises(NonFiniteError, match=r"mufm: expected finite X, got 1 NaN"):
        mufm(x, y, 2)


def test_progress_plain_lines_when_not_a_tty(capsys: pytest.CaptureFixture) -> None:
    """stderr captured (not a TTY): one plain line per update, no tqdm carriage returns, and the
    bar counts L-BFGS iterations. Before: a tqdm bar (carriage returns) in any stream."""
    x, y = _data(30)
    r = mufm(x, y, 1, steps=4, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [l for l in err.splitlines() if l.startswith("[mufm]")]
    assert lines and all("iterations" in l for l in lines)
    assert lines[-1].startswith(f"[mufm] {r.steps_run}/4 iterations")


def test_undefined_spearman_has_a_reason() -> None:
    r = solved()
    for k in METRICS:
        assert (r.spearman[k] is None) == bool(r.spearman_note[k]) or "ties" in r.spearman_note[k], k
    d = r.to_dict()
    assert set(d["spearman_note"]) == set(METRICS) and len(d["nc1_note"]) == r.depth + 1
