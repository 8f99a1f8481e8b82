"""hessian_spectrum's mass fractions (issue 12): intervals that cover the dense truth at every step
count and close as steps grow; relative and absolute thresholds; limits on k and steps; progress
that ticks with products; NaN named; hvp / deterministic passed to the operators."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from resgeom_fast import linalg
from resgeom_fast.analysis import spectrum as spectrum_mod
from resgeom_fast.analysis.spectrum import K_MAX, hessian_spectrum
from resgeom_fast.linalg._util import generator, rademacher

from tests.analysis.test_spectrum import LOSS, small_problem

STEPS = (10, 20, 40, 80, 160)


def _run(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the unresolved-fraction warning (tested below)
        return hessian_spectrum(*args, **kw)


def _dense_truth(ev: torch.Tensor, eps: float, abs_eps: float) -> dict[str, tuple[float, float]]:
    """Dense fractions as [lo, hi]: exact except lambda < 0, where the null space's sign is rounding."""
    thr = eps * float(ev[-1])
    tiny = 1e-12 * float(ev.abs().max())
    frac = lambda mask: float(mask.double().mean())  # noqa: E731
    return {
        "degenerate_rel": (frac(ev.abs() < thr),) * 2,
        "degenerate_abs": (frac(ev.abs() < abs_eps),) * 2,
        "negative": (frac(ev < -tiny), frac(ev < tiny)),
        "significant_negative": (frac(ev < -thr),) * 2,
    }


def test_fractions_converge_with_steps_to_the_dense_value_and_cover_it():
    """MUST SHOW (issue 12): on a net small enough for a dense float64 eigendecomposition
    (P = 213), at 10, 20, 40, 80, 160 steps and P steps, every fraction's reported interval
    [lower, upper] holds the dense value; the quadrature bracket closes as steps grow (to zero
    width at P steps, where the Krylov space is the whole space); the point values converge to
    the dense value; the convergence check reports the run with half the steps."""
    model, x, y, *_, H, ev, U = small_problem()
    n, probes, seed = ev.numel(), 12, 4
    truth = _dense_truth(ev, 1e-3, 1e-3)
    assert 0.25 < truth["degenerate_rel"][0] < 0.5 and 0.1 < truth["degenerate_abs"][0] < 0.3
    widths: dict[str, list[float]] = {k: [] for k in truth}
    values: dict[int, dict[str, float]] = {}
    for m in STEPS + (n,):
        r = _run(model, LOSS, (x, y), k=2, probes=probes, steps=min(m, n), trace_probes=3, seed=seed)
        assert set(r.fractions) == set(truth)
        values[m] = {k: f.value for k, f in r.fractions.items()}
        for key, (lo, hi) in truth.items():
            f = r.fractions[key]
            # the honest interval covers the truth (quadrature bracket and 3 probe standard errors)
            assert f.lower <= hi + 1e-12 and lo - 1e-12 <= f.upper, (m, key, f)
            assert f.lower <= f.quadrature_lower <= f.value <= f.quadrature_upper <= f.upper
            widths[key].append(f.quadrature_upper - f.quadrature_lower)
            assert f.resolved == (f.quadrature_upper - f.quadrature_lower <= 0.1)
            assert (r.summary()[spectrum_mod.FRACTIONS[key][0]] is None) == (not f.resolved)
            # the convergence check is the same probes' run with m // 2 steps
            if m // 2 in values:
                assert f.half_steps == m // 2
                assert f.half_value == pytest.approx(values[m // 2][key], abs=1e-9)
    for key, w in widths.items():
        assert w[0] > 0.5                                      # 10 steps resolve nothing here ...
        assert all(b <= a + 0.02 for a, b in zip(w, w[1:])), (key, w)   # ... the bracket closes ...
        assert w[-1] == 0.0                                    # ... exactly at P steps
    for key in ("degenerate_rel", "significant_negative"):
        assert widths[key][STEPS.index(160)] < 0.1             # resolved at 160 steps already
    # at P steps (the last run): the exact probe masses, within the probe error of the dense fractions
    V = rademacher((probes, n), generator(seed), torch.float64, "cpu")
    C = (V / V.norm(dim=1, keepdim=True) @ U) ** 2
    thr = 1e-3 * float(ev[-1])
    assert r.fractions["degenerate_rel"].value == pytest.approx(float(C[:, ev.abs() < thr].sum(1).mean()), abs=1e-6)
    assert r.fractions["degenerate_abs"].value == pytest.approx(float(C[:, ev.abs() < 1e-3].sum(1).mean()), abs=1e-6)
    for key in ("degenerate_rel", "degenerate_abs", "significant_negative"):
        f = r.fractions[key]
        assert f.resolved and abs(f.value - truth[key][0]) <= 3 * f.stderr + 1e-9


def test_one_step_is_unresolved_not_100_percent_degenerate():
    """Issue 12: steps=1 reported 100% degenerate mass. One node says nothing about where the
    mass lies: the interval is [0, 1], the headline is None, and a warning says so."""
    model, x, y, *_, ev, _U = small_problem()
    with pytest.warns(UserWarning, match=r"hessian_spectrum: 4 mass fraction\(s\) not resolved by steps=1 .*"
                                         r"all: degenerate_rel in \[0.000, 1.000\]"):
        r = hessian_spectrum(model, LOSS, (x, y), k=2, probes=4, steps=1, trace_probes=3)
    s = r.summary()
    for key, (sname, _) in spectrum_mod.FRACTIONS.items():
        f = r.fractions[key]
        assert not f.resolved and f.quadrature_lower == 0.0 and f.quadrature_upper == 1.0
        assert s[sname] is None and s[f"{sname}_lower"] == 0.0 and s[f"{sname}_upper"] == 1.0
        assert "unresolved" in f.note and "raise steps" in f.note
    assert s["degeneracy_fraction"] is None
    assert r.unresolved == list(spectrum_mod.FRACTIONS)


def test_relative_and_absolute_thresholds_are_both_reported():
    """Issue 12: the degeneracy under a relative threshold (eps * lambda_max) and an absolute one
    (abs_eps), both in the result and its summary; with abs_eps = eps * lambda_max they agree."""
    model, x, y, *_, ev, _U = small_problem()
    n = ev.numel()
    r = _run(model, LOSS, (x, y), k=2, probes=6, steps=n, trace_probes=3, eps=1e-3, abs_eps=1e-4)
    s = r.summary()
    keys = {"lambda_max", "lambda_min", "trace", "degenerate_threshold_rel", "degenerate_threshold_abs",
            "degeneracy_fraction"}
    for sname, _ in spectrum_mod.FRACTIONS.values():
        keys |= {sname, f"{sname}_lower", f"{sname}_upper"}
    assert set(s) == keys
    assert s["degenerate_threshold_rel"] == pytest.approx(1e-3 * r.lambda_max)
    assert s["degenerate_threshold_abs"] == 1e-4 and r.abs_threshold == 1e-4
    assert s["degeneracy_fraction"] == s["degenerate_fraction_rel"]        # the old key: the relative one
    f_abs = r.fractions["degenerate_abs"]
    assert f_abs.interval == (-1e-4, 1e-4) and r.degeneracy_fraction_abs == f_abs.value
    # P steps: exact quadrature; the absolute fraction is the probes' mass of |lambda| < 1e-4
    dense = float((ev.abs() < 1e-4).double().mean())
    assert abs(s["degenerate_fraction_abs"] - dense) <= 3 * f_abs.stderr + 1e-9
    same = _run(model, LOSS, (x, y), k=2, probes=6, steps=n, trace_probes=3, eps=1e-3,
                abs_eps=1e-3 * r.lambda_max * (1 + 1e-12))
    assert same.fractions["degenerate_abs"].value == pytest.approx(same.fractions["degenerate_rel"].value, abs=1e-12)
    d = r.to_dict()
    assert d["fractions"]["degenerate_abs"]["interval"] == [-1e-4, 1e-4] and d["abs_eps"] == 1e-4
    with pytest.raises(ValueError, match="hessian_spectrum: expected abs_eps"):
        hessian_spectrum(model, LOSS, (x, y), abs_eps=0.0)
    with pytest.raises(ValueError, match="hessian_spectrum: expected max_bracket"):
        hessian_spectrum(model, LOSS, (x, y), max_bracket=1.5)


def test_k_beyond_the_limit_is_refused_and_steps_beyond_p_are_capped_with_a_note():
    """Issue 12: k=100000 silently became a P-step Lanczos."""
    model, x, y, *_, ev, _U = small_problem()
    n = ev.numel()
    with pytest.raises(ValueError, match=rf"hessian_spectrum: expected k <= K_MAX = {K_MAX} .*got 100000"):
        hessian_spectrum(model, LOSS, (x, y), k=100000)
    with pytest.raises(ValueError, match=rf"hessian_spectrum: expected k <= min\(P, K_MAX\) = {n} \(P = {n} "
                                         rf"parameters\), got {n + 1}"):
        hessian_spectrum(model, LOSS, (x, y), k=n + 1)
    r = _run(model, LOSS, (x, y), k=2, probes=2, steps=10 * n, trace_probes=3)
    assert r.slq_steps == n and r.steps == 10 * n
    assert r.notes == [f"steps={10 * n} capped at this operator's dimension {n} (the Krylov space is then the "
                       "whole space: the quadrature is exact)"]
    assert r.to_dict()["notes"] == r.notes and r.k_used == 2


class _Recorder:
    """A progress bar that records its total and every update."""

    def __init__(self, total, desc, enabled=True, unit="it"):
        self.total, self.desc, self.unit, self.updates, self.postfixes = total, desc, unit, [], []
        self.initial_total = total
        _Recorder.last = self

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix_str(self, s="", refresh=True):
        self.postfixes.append(s)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_progress_ticks_with_every_product(monkeypatch):
    """Issue 12: the bar sat at 100% while a stage ran. It now counts Hessian-vector products (a
    total known in advance: eigsh's budget, the trace's probes, probes x steps), ticks on every
    product pass and ends at the products applied (eigsh's unused budget is taken off)."""
    model, x, y, *_ = small_problem()
    monkeypatch.setattr(spectrum_mod, "progress_bar", _Recorder)
    r = _run(model, LOSS, (x, y), per_block=True, k=4, probes=3, steps=15, trace_probes=6, progress=True)
    bar = _Recorder.last
    assert bar.unit == "products" and bar.desc == "hessian_spectrum"
    n_all, dims = r.dim, [b.dim for b in r.blocks]
    budget = sum(min(max(300, 80), d) + 4 + 6 + 3 * min(15, d) for d in [n_all] + dims)
    assert bar.initial_total == budget
    assert sum(bar.updates) == r.products == bar.total          # every product counted, total trimmed
    slq = 3 * 15 * (1 + len(dims))
    assert len(bar.updates) >= 15 * (1 + len(dims)) and r.products >= slq + 6 * (1 + len(dims))
    assert any("SLQ density" in p for p in bar.postfixes) and any("blocks.1" in p for p in bar.postfixes)


def test_progress_in_a_non_tty_prints_plain_lines(monkeypatch):
    import sys
    model, x, y, *_ = small_problem()
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    r = _run(model, LOSS, (x, y), k=2, probes=2, steps=8, trace_probes=3, progress=True)
    out = buf.getvalue()
    assert "\r" not in out
    assert out.strip().splitlines()[-1].startswith(f"[hessian_spectrum] {r.products}/{r.products} products (100%)")


class _NaNAfter(linalg.LinearOperator):
    """The small net's dense Hessian as an operator that returns NaN from its ``after``-th call."""

    def __init__(self, H, after):
        super().__init__(H.shape, H.dtype, H.device, (), symmetric=True)
        self.H, self.after, self.calls = H, after, 0
        self.num_samples, self.param_names = 30, ["w"]

    def _matmat(self, X):
        self.calls += 1
        Y = self.H @ X
        return Y * float("nan") if self.calls > self.after else Y


def test_non_finite_products_are_named(monkeypatch):
    """Issue 12: non-finite products raise NonFiniteError naming the function, the operator and
    the step (here the 4th product of eigsh's Lanczos run)."""
    model, x, y, *_, H, ev, _U = small_problem()
    monkeypatch.setattr(spectrum_mod.operators, "hessian", lambda *a, **k: _NaNAfter(H, 3))
    with pytest.raises(linalg.NonFiniteError, match=r"hessian_spectrum: the hessian of 'all': eigsh: the operator "
                                                    r"returned non-finite values \(NaN or inf\) at Lanczos step 3"):
        hessian_spectrum(model, LOSS, (x, y), k=2, probes=2, steps=5, trace_probes=3)


@pytest.mark.parametrize("hvp", ["double_backward", "forward_over_reverse"])
def test_hvp_is_passed_to_the_operators_and_recorded(hvp):
    """Issue 12: hessian_spectrum had no hvp=; the method is passed to hessian / block_hessians
    and the result records it (and the method used per pass width)."""
    model, x, y, *_ = small_problem()
    kw = dict(per_block=True, k=2, probes=3, steps=8, trace_probes=6, eig_steps=20)
    r = _run(model, LOSS, (x, y), hvp=hvp, **kw)
    assert r.hvp == hvp and r.to_dict()["hvp"] == hvp
    assert r.hvp_methods and set(r.hvp_methods.values()) == {hvp}
    ref = _run(model, LOSS, (x, y), **kw)                        # "auto": the same exact products
    assert ref.hvp == "auto"
    torch.testing.assert_close(r.eigenvalues, ref.eigenvalues, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(r.blocks[1].nodes, ref.blocks[1].nodes, atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match="hessian_spectrum: .*hvp"):
        hessian_spectrum(model, LOSS, (x, y), hvp="finite_differences")


@pytest.mark.parametrize("deterministic", [False, True])
def test_hvp_and_deterministic_reach_every_operator(monkeypatch, deterministic):
    """hvp= and deterministic= are passed to hessian and block_hessians (and recorded)."""
    model, x, y, *_ = small_problem()
    calls = []
    for fn in ("hessian", "block_hessians"):
        real = getattr(spectrum_mod.operators, fn)

        def spy(*a, _real=real, _fn=fn, **k):
            calls.append((_fn, k.get("hvp"), k.get("deterministic", False)))
            return _real(*a, **k)

        monkeypatch.setattr(spectrum_mod.operators, fn, spy)
    r = _run(model, LOSS, (x, y), per_block=True, k=2, probes=2, steps=4, trace_probes=3, eig_steps=8,
             hvp="double_backward", deterministic=deterministic)
    assert calls == [("hessian", "double_backward", deterministic), ("block_hessians", "double_backward", deterministic)]
    assert r.deterministic is deterministic and r.to_dict()["deterministic"] is deterministic
    with pytest.raises(TypeError, match="hessian_spectrum: expected deterministic a bool"):
        hessian_spectrum(model, LOSS, (x, y), deterministic="yes")


def test_an_uncertified_repeated_extreme_eigenvalue_is_in_the_notes(monkeypatch):
    """eigsh's reason for converged=False (a repeated wanted eigenvalue it cannot certify,
    tests/linalg/test_eigsh_checks.py) reaches the Spectrum's notes and its flag."""
    model, x, y, *_ = small_problem()
    real = linalg.eigsh

    def eigsh(*args, **kw):
        r = real(*args, **kw)
        r.converged = torch.zeros_like(r.converged)
        r.note = "problem 0: the eigenvalue 5 was found 3 times among the wanted ones"
        return r

    monkeypatch.setattr(linalg, "eigsh", eigsh)
    r = _run(model, LOSS, (x, y), k=4, probes=2, steps=10, trace_probes=3)
    assert "extreme eigenvalues: problem 0: the eigenvalue 5 was found 3 times among the wanted ones" in r.notes
    assert r.to_dict()["notes"] == r.notes and not r.converged
