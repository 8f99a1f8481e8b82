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


# --------------------------------------------------------------------------- Hessian: both thresholds
def _spec_summary(rel, rel_box, abs_, abs_box, lam_max=1.0):
    s = {"lambda_max": lam_max, "lambda_min": -0.1, "degenerate_threshold_rel": 1e-3 * lam_max,
         "degenerate_threshold_abs": 1e-3, "significant_negative_fraction": 0.01,
         "significant_negative_fraction_lower": 0.0, "significant_negative_fraction_upper": 0.02}
    for key, v, box in (("degenerate_fraction_rel", rel, rel_box), ("degenerate_fraction_abs", abs_, abs_box)):
        s[key], s[f"{key}_lower"], s[f"{key}_upper"] = v, box[0], box[1]
    return {"summary": s}


def test_degeneracy_reading_reports_both_thresholds_and_a_reversal():
    # plain: huge lambda_max, so its relative threshold is wide: more mass below it, less below abs_eps
    r = {"models": {"residual": {"spectrum": _spec_summary(0.80, (0.78, 0.83), 0.60, (0.55, 0.65), lam_max=187.0)},
                    "plain": {"spectrum": _spec_summary(0.999, (0.99, 1.0), 0.30, (0.25, 0.35), lam_max=4.85e5)}}}
    text = studies._density_figure(NAMES).reading(r)
    assert "residual: lambda_max 187, lambda_min -0.1, near-zero mass 0.8 [0.78, 0.83] below the relative threshold " \
           "0.187 and 0.6 [0.55, 0.65] below the absolute threshold 0.001" in text
    assert "Plain against residual: under the relative threshold |lambda| < eps * lambda_max plain more degenerate " \
           "than residual; under the absolute threshold |lambda| < abs_eps plain less degenerate than residual " \
           "-- the ordering reverses with the threshold, so 'more degenerate' is no finding on its own" in text
    # the same ordering under both thresholds is said as such
    r["models"]["plain"]["spectrum"] = _spec_summary(0.999, (0.99, 1.0), 0.9, (0.85, 0.95), lam_max=4.85e5)
    assert "-- the same ordering under both thresholds" in studies._density_figure(NAMES).reading(r)
    # unresolved: n/a with the interval, never the raw Gauss-rule number
    r["models"]["plain"]["spectrum"] = _spec_summary(None, (0.0, 0.97), None, (0.0, 0.96), lam_max=2.9)
    text = studies._density_figure(NAMES).reading(r)
    assert "plain: lambda_max 2.9, lambda_min -0.1, near-zero mass n/a (unresolved at these Lanczos steps: in [0, " \
           "0.97]) below the relative threshold 0.0029 and n/a (unresolved at these Lanczos steps: in [0, " \
           "0.96])" in text
    assert "not separated (intervals overlap)" in text and "no ordering holds under both thresholds" in text


def test_hessian_study_order_reading():
    r = {"models": {"plain": {"spectrum": _spec_summary(0.9, (0.85, 0.95), 0.3, (0.25, 0.35))},
                    "residual": {"spectrum": _spec_summary(0.7, (0.65, 0.75), 0.5, (0.3, 0.6))},
                    "hyper": {"spectrum": _spec_summary(0.72, (0.6, 0.8), 0.2, (0.1, 0.28))}}}
    text = studies._degeneracy_order_reading(r, ["plain", "residual", "hyper"])
    assert "relative threshold |lambda| < eps * lambda_max: plain 0.9 [0.85, 0.95], residual 0.7 [0.65, 0.75], " \
           "hyper 0.72 [0.6, 0.8] (plain >= residual holds; residual >= hyper not resolved (intervals overlap))" in text
    assert "absolute threshold |lambda| < abs_eps: plain 0.3 [0.25, 0.35], residual 0.5 [0.3, 0.6], hyper 0.2 " \
           "[0.1, 0.28] (plain >= residual not resolved (intervals overlap); residual >= hyper holds)" in text


# --------------------------------------------------------------------------- RA3 capped, RA4 without the first block
def _align_result(summary, k=12, scaling=None):
    return {"alignment": {"summary": summary, "result": {"settings": {"k": k}, "stages": [{"ra1": {}}]}}}


def test_capped_rank_reads_at_least_k_and_ra4_without_the_first_block():
    capped = {"max_numerical_rank": None, "max_numerical_rank_capped": True, "max_numerical_rank_lower_bound": 12.0,
              "max_numerical_rank_reason": "capped at k = 12", "rank_le_c_fraction": None,
              "rank_le_c_fraction_reason": "capped at k = 12 <= C", "depth_product": 6.7,
              "depth_product_excl_first": 2.1, "first_block_ratio": 14.0}
    free = {"max_numerical_rank": 3.4, "max_numerical_rank_capped": False, "rank_le_c_fraction": 1.0,
            "depth_product": 22.1, "depth_product_excl_first": None,
            "depth_product_excl_first_reason": "one block: no block after the first", "first_block_ratio": None}
    r = {"models": {"residual": _align_result(capped), "plain": _align_result(free)},
         "depth_scaling": {"scaling": {"depths": [4, 8], "products": [8.0, 6.7], "relative_spread": 0.18,
                                       "slope": -1.2, "products_excl_first": [3.0, 2.1],
                                       "relative_spread_excl_first": 0.35, "slope_excl_first": -1.5,
                                       "first_block_ratio": [9.0, 14.0]}}}
    figs = {f.name: f for f in studies._align_figures(NAMES)}
    sv = figs["ra_singular_values"].reading(r)
    assert "residual: max numerical rank >= 12 (capped: the rank reached the k = 12 computed singular values; " \
           "raise k), fraction rank <= C n/a (capped at k = 12 <= C)" in sv
    assert "plain: max numerical rank 3.4, fraction rank <= C 1" in sv
    sig = figs["ra_sigma1_depth"].reading(r)
    assert "residual: L * mean sigma_1 = 6.7, without the first block 2.1 (first block's sigma_1 / mean of the " \
           "others 14)" in sig
    assert "plain: L * mean sigma_1 = 22.1, without the first block n/a (one block: no block after the first)" in sig
    assert "across depths [4, 8]: products L * mean sigma_1 [8, 6.7], relative spread 0.18, log-log slope of mean " \
           "sigma_1 -1.2; without the first block: products [3, 2.1], relative spread 0.35, slope -1.5; first " \
           "block's sigma_1 / mean of the others per depth [9, 14]" in sig


def test_stage_reading_of_a_staged_net():
    one = "one block: trajectory metrics need >= 2 blocks"
    result = {"settings": {"k": 15}, "stages": [
        {"block_names": ["layer1.0", "layer1.1"], "dim": 4096,
         "summary": {"linearity": 0.81, "equispacing": 0.2, "self_alignment": 0.5, "diag_ratio_offdiag": 0.3,
                     "max_numerical_rank": None, "max_numerical_rank_capped": True,
                     "max_numerical_rank_lower_bound": 15.0, "depth_product": 3.0, "depth_product_excl_first": 1.2}},
        {"block_names": ["layer2.1"], "dim": 2048,
         "summary": {"linearity": None, "linearity_reason": one, "equispacing": None, "equispacing_reason": one,
                     "self_alignment": 0.9, "diag_ratio_offdiag": None, "diag_ratio_offdiag_reason": "no pair",
                     "max_numerical_rank": 7.0, "max_numerical_rank_capped": False, "depth_product": 1.1,
                     "depth_product_excl_first": None,
                     "depth_product_excl_first_reason": "one block: no block after the first"}}]}
    text = studies.alignment_stage_reading(result)
    assert text == ("stage 0 (2 blocks, D = 4096): linearity 0.81, equispacing 0.2, self alignment 0.5, off-diagonal "
                    "diag ratio 0.3, max numerical rank >= 15 (capped: the rank reached the k = 15 computed singular "
                    "values; raise k), L * mean sigma_1 3 (without the first block 1.2); stage 1 (1 blocks, D = 2048): "
                    f"linearity n/a ({one}), equispacing n/a ({one}), self alignment 0.9, off-diagonal diag ratio n/a "
                    "(no pair), max numerical rank 7, L * mean sigma_1 1.1 (without the first block n/a (one block: "
                    "no block after the first)).")
