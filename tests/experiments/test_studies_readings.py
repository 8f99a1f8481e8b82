"""report.md readings on constructed results: a number is called a finding only against the
control (the plain net) and beyond two standard errors; undefined values read "n/a (reason)"; the
NCC mismatch's rho is not read once the mismatch sits at exactly 0."""
from __future__ import annotations

import math
import statistics

import pytest

from resgeom_fast.experiments import studies
from resgeom_fast.experiments.report import fmt_key, summary_rows

NAMES = ["residual", "plain"]


def _align(lin, eq, sc, summary=None, undefined=None):
    ra1 = {"linearity": lin, "equispacing": eq, "step_cosine": sc}
    if undefined:
        ra1 = {k: None for k in ra1}
        ra1["undefined_reason"] = undefined
    return {"result": {"stages": [{"ra1": ra1}]}, "summary": summary or {}}


def _welch(a, b):
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return (statistics.mean(a) - statistics.mean(b)) / se


def _ra1(models):
    return studies._align_figures(list(models), with_depth=False)[0].reading({"models": models})


def test_ra1_equispacing_as_low_as_the_control_is_not_a_finding():
    lin_r, lin_p = [0.90, 0.92, 0.88, 0.91], [0.40, 0.45, 0.35, 0.42]
    eq = [0.05, 0.07, 0.06, 0.04]                   # identical for both nets: low, but so is the control's
    sc_r, sc_p = [0.50, 0.52, 0.49, 0.51], [0.55, 0.57, 0.54, 0.56]
    text = _ra1({"residual": {"alignment": _align(lin_r, eq, sc_r)}, "plain": {"alignment": _align(lin_p, eq, sc_p)}})
    z = _welch(lin_r, lin_p)
    assert f"residual higher than the plain control by {abs(z):.1f} standard errors (the direction RA1 (straight " \
           "trajectories) predicts)" in text
    assert "equispacing: residual 0.055 +- 0.0065, plain 0.055 +- 0.0065: residual within 2 standard errors of " \
           "the plain control, so no evidence of RA1 (equal steps) (the net without skips shows the same)" in text
    assert "RA1 (equal steps) predicts" not in text
    zs = _welch(sc_r, sc_p)
    assert f"residual lower than the plain control by {abs(zs):.1f} standard errors (against RA1 (aligned steps))" \
        in text
    assert "over the 4 test inputs" in text


def test_ra1_without_a_control_claims_nothing_and_undefined_is_n_a():
    one = "one block: trajectory metrics need >= 2 blocks"
    text = _ra1({"residual": {"alignment": _align([0.9, 0.8], [0.1, 0.1], [0.5, 0.6])},
                 "hyper": {"alignment": _align(None, None, None, undefined=one)}})
    assert "residual not compared (no control net without skips in this study), so not read as RA1 (straight " \
           "trajectories)" in text
    assert f"hyper n/a ({one})" in text
    assert "predicts)" not in text and "against RA1" not in text


def _collapse(nc1, ncc, rho_nc1, rho_ncc, zero_from=None, notes=None):
    return {"result": {"layers": list(range(len(nc1))), "nc1": nc1, "ncc_mismatch": ncc,
                       "spearman_note": notes or {}, "ncc_zero_from": zero_from},
            "summary": {"nc1_first": nc1[0], "nc1_last": nc1[-1], "spearman_nc1": rho_nc1,
                        "spearman_ncc_mismatch": rho_ncc}}


def test_collapse_reading_does_not_read_the_ncc_rho_at_zero_and_compares_with_the_control():
    r = {"models": {
        "residual": {"collapse": _collapse([4.0, 2.0, 1.0, 0.5], [0.3, 0.0, 0.0, 0.0], -1.0, -0.77, zero_from=1)},
        "plain": {"collapse": _collapse([3.0, 2.5, 2.0, 1.0], [0.2, 0.1, 0.1, 0.0], -1.0, None,
                                        notes={"ncc_mismatch": "tied values"})}}}
    text = studies._collapse_figure(NAMES).reading(r)
    assert "residual: NC1 4 -> 0.5, Spearman rho(l, NC1) -1, NCC mismatch exactly 0 from layer 1 on (its rho -0.77 " \
           "is not read" in text
    assert "plain: NC1 3 -> 1, Spearman rho(l, NC1) -1, rho(l, NCC) n/a (tied values)" in text
    assert "it holds for residual, plain, the plain control included, so a decrease with depth is not specific to " \
           "skips here" in text


def test_undefined_values_print_n_a_with_the_reason():
    s = {"max_numerical_rank": None, "max_numerical_rank_reason": "capped at k = 15", "linearity": float("nan"),
         "equispacing": 0.25, "equispacing_reason": "mean over stages [0]", "svd_converged": True}
    assert fmt_key(s, "max_numerical_rank") == "n/a (capped at k = 15)"
    assert fmt_key(s, "linearity") == "n/a (undefined)"
    assert fmt_key(s, "missing") == "n/a (not in this result)"
    assert fmt_key(s, "equispacing") == "0.25 (mean over stages [0])"
    assert summary_rows(s) == [("max_numerical_rank", "n/a (capped at k = 15)"), ("linearity", "n/a (undefined)"),
                               ("equispacing", "0.25 (mean over stages [0])"), ("svd_converged", "yes")]
    # _per_model goes through fmt_key too (a template key the summary lacks is n/a, not a KeyError)
    r = {"models": {"residual": {"alignment": {"summary": s}}}}
    assert studies._per_model(r, ["residual"], "models", "alignment", "rank {max_numerical_rank}, x {nope}") == \
        "residual: rank n/a (capped at k = 15), x n/a (not in this result)"


@pytest.mark.parametrize("a, b, z", [((1.0, 0.0, 3), (1.0, 0.0, 3), 0.0), ((2.0, 0.0, 3), (1.0, 0.0, 3), math.inf),
                                     ((2.0, 0.3, 3), (1.0, 0.4, 3), 2.0)])
def test_contrast_z(a, b, z):
    assert studies._contrast_z(a, b) == pytest.approx(z)
