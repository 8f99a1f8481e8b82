"""The readings of the studies' figures: one line of text per figure for report.md.

A reading states the condition under which a number holds and, where the study has one, compares
it with the control (the plain net: the same architecture without skips); see the note above
:data:`CONTRAST_Z`. Every function takes the results dictionary as read back from results.json
(``r``), the model names and the dotted ``root`` under which each model's results sit.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..report import fmt, fmt_key, get_path, is_undefined

__all__ = ["CONTRAST_Z", "CONTROL", "EXPECTED_DEGENERACY_ORDER", "RA1_METRICS", "THRESHOLDS", "alignment_stage_reading",
           "collapse_reading", "compare_fraction", "contrast_z", "degeneracy_order_reading", "depth_scaling_text",
           "fraction_text", "list_text", "per_model", "ra1_reading", "rank_text", "sample_stats", "spectrum_reading",
           "summary_of", "versus_control"]


def summary_of(block: dict[str, Any]) -> dict[str, float]:
    """The ``summary`` of an analysis step's result ({} when absent)."""
    return block.get("summary", {})


class _Formatted(dict):
    """``str.format_map`` source: every key of a summary through :func:`fmt_key` (``n/a (reason)``
    for None / NaN and for keys the summary lacks)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__()
        self.summary = summary

    def __missing__(self, key: str) -> str:
        return fmt_key(self.summary, key)


def per_model(r: dict, models: list[str], root: str, what: str, template: str) -> str:
    """``"m1: ...; m2: ..."``: ``template`` formatted (``str.format_map``, values through
    :func:`fmt_key`) with each model's ``summary`` of the result at ``root.m.what``."""
    parts = []
    for m in models:
        s = summary_of(get_path(r, f"{root}.{m}.{what}"))
        parts.append(f"{m}: " + template.format_map(_Formatted(s)))
    return "; ".join(parts)


# A reading states the condition under which a number holds and, where the study has one, compares
# it with the control (the plain net: the same architecture without skips). A difference is read
# as a finding only when it exceeds CONTRAST_Z standard errors (Welch: the two nets' per-input
# values are independent samples of the same test inputs' size); otherwise the reading says that
# the control shows the same, so the number is no evidence of the claim. Undefined values are
# printed "n/a (reason)".
CONTRAST_Z = 2.0
CONTROL = "plain"


def sample_stats(values: Any) -> Optional[tuple[float, float, int]]:
    """(mean, standard error of the mean, n) of the finite entries of ``values``; None when there are none."""
    if not isinstance(values, list):
        return None
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    var = sum((v - mean) ** 2 for v in xs) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n) if n > 1 else math.nan, n


def contrast_z(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """Welch's z of mean(a) - mean(b) (inf when both have zero spread and differ, NaN when unknown)."""
    diff = a[0] - b[0]
    se = math.sqrt(a[1] ** 2 + b[1] ** 2) if not (math.isnan(a[1]) or math.isnan(b[1])) else math.nan
    if math.isnan(se):
        return math.nan
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def versus_control(label: str, stats: dict[str, Any], models: list[str], sign: int, claim: str) -> str:
    """``"label: residual 0.81 +- 0.01, plain 0.42 +- 0.03: residual higher than the plain control
    by 12 standard errors (the direction CLAIM predicts)"``. ``stats[m]``: :func:`sample_stats` or a reason
    string (undefined); ``sign``: +1 when the claim predicts a higher value than the control."""
    def val(m: str) -> str:
        st = stats[m]
        return f"n/a ({st})" if isinstance(st, str) else f"{fmt(st[0])} +- {fmt(st[1], 2)}"

    text = f"{label}: " + ", ".join(f"{m} {val(m)}" for m in models)
    control = CONTROL if CONTROL in models else None
    verdicts = []
    for m in models:
        if m == control or isinstance(stats[m], str):
            continue
        if control is None:
            verdicts.append(f"{m} not compared (no control net without skips in this study), so not read as {claim}")
            continue
        if isinstance(stats[control], str):
            verdicts.append(f"{m} not compared (the control is n/a)")
            continue
        z = contrast_z(stats[m], stats[control])
        if math.isnan(z) or abs(z) < CONTRAST_Z:
            verdicts.append(f"{m} within {CONTRAST_Z:g} standard errors of the plain control, so no evidence of "
                            f"{claim} (the net without skips shows the same)")
        else:
            side = "higher" if z > 0 else "lower"
            how = f"the direction {claim} predicts" if z * sign > 0 else f"against {claim}"
            by = "beyond any spread" if math.isinf(z) else f"by {abs(z):.1f} standard errors"
            verdicts.append(f"{m} {side} than the plain control {by} ({how})")
    return text + (": " + "; ".join(verdicts) if verdicts else "")


def fraction_text(s: dict[str, Any], key: str, digits: int = 3) -> str:
    """A mass fraction of a spectrum summary with its interval: ``"0.81 [0.79, 0.83]"``; when
    unresolved ``"n/a (unresolved at these Lanczos steps: in [0, 0.96])"``; absent keys n/a."""
    lo, hi = s.get(f"{key}_lower"), s.get(f"{key}_upper")
    box = f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else None
    if key not in s:
        return "n/a (not in this result)"
    if is_undefined(s[key]):
        return f"n/a (unresolved at these Lanczos steps: in {box})" if box else fmt_key(s, key)
    return f"{fmt(s[key], digits)} {box}" if box else fmt(s[key], digits)


def compare_fraction(sa: dict[str, Any], sb: dict[str, Any], key: str) -> Optional[int]:
    """+1 when a's fraction is above b's beyond both intervals, -1 below, 0 when the intervals
    overlap, None when an interval is missing."""
    try:
        alo, ahi, blo, bhi = (float(x[f"{key}_{e}"]) for x, e in ((sa, "lower"), (sa, "upper"), (sb, "lower"),
                                                                   (sb, "upper")))
    except (KeyError, TypeError, ValueError):
        return None
    if any(math.isnan(v) for v in (alo, ahi, blo, bhi)):
        return None
    return 1 if alo > bhi else (-1 if ahi < blo else 0)


THRESHOLDS = (("degenerate_fraction_rel", "relative threshold |lambda| < eps * lambda_max"),
              ("degenerate_fraction_abs", "absolute threshold |lambda| < abs_eps"))


def spectrum_reading(r: dict, models: list[str], root: str) -> str:
    """Per model the extreme eigenvalues and the near-zero mass under both thresholds (with their
    intervals); then the plain net against each other net under each threshold, and whether the
    ordering depends on the threshold (the relative one scales with each net's own lambda_max)."""
    summ = {m: summary_of(get_path(r, f"{root}.{m}.spectrum")) for m in models}
    parts = []
    for m in models:
        s = summ[m]
        parts.append(f"{m}: lambda_max {fmt_key(s, 'lambda_max')}, lambda_min {fmt_key(s, 'lambda_min')}, near-zero "
                     f"mass {fraction_text(s, 'degenerate_fraction_rel')} below the relative threshold "
                     f"{fmt_key(s, 'degenerate_threshold_rel')} and {fraction_text(s, 'degenerate_fraction_abs')} "
                     f"below the absolute threshold {fmt_key(s, 'degenerate_threshold_abs')}, negative mass "
                     f"(lambda < -eps lambda_max) {fraction_text(s, 'significant_negative_fraction')}")
    text = "; ".join(parts)
    if CONTROL in models and len(models) > 1:
        for m in models:
            if m == CONTROL:
                continue
            words = {1: f"plain more degenerate than {m}", -1: f"plain less degenerate than {m}",
                     0: "not separated (intervals overlap)", None: "not compared (no interval)"}
            verdicts = [compare_fraction(summ[CONTROL], summ[m], key) for key, _ in THRESHOLDS]
            said = f"Plain against {m}: " + "; ".join(f"under the {label} {words[v]}"
                                                      for (key, label), v in zip(THRESHOLDS, verdicts))
            if verdicts[0] in (1, -1) and verdicts[1] in (1, -1) and verdicts[0] != verdicts[1]:
                said += (" -- the ordering reverses with the threshold, so 'more degenerate' is no finding on its own "
                         "(the relative threshold scales with each net's lambda_max)")
            elif verdicts[0] == verdicts[1] and verdicts[0] in (1, -1):
                said += " -- the same ordering under both thresholds"
            else:
                said += " -- no ordering holds under both thresholds"
            text += f". {said}"
    return text + " (intervals: the quadrature bracket widened by 3 probe standard errors)."


# docs/science.md section 2: near-zero Hessian mass plain >= residual >= hyper-residual
EXPECTED_DEGENERACY_ORDER = ("plain", "residual", "hyper")


def degeneracy_order_reading(r: dict, archs: list[str], root: str = "models") -> str:
    """The near-zero mass of every net under both thresholds, and per neighbouring pair of
    EXPECTED_DEGENERACY_ORDER present: whether the expected ordering holds (intervals separated
    in that direction), is reversed, or is not resolved (intervals overlap)."""
    summ = {a: summary_of(get_path(r, f"{root}.{a}.spectrum")) for a in archs}
    order = [a for a in EXPECTED_DEGENERACY_ORDER if a in archs]
    pairs = list(zip(order, order[1:]))
    parts = []
    for key, label in THRESHOLDS:
        vals = ", ".join(f"{a} {fraction_text(summ[a], key)}" for a in archs)
        verdicts = []
        for hi, lo in pairs:
            v = compare_fraction(summ[hi], summ[lo], key)
            verdicts.append(f"{hi} >= {lo} " + {1: "holds", -1: "is reversed", 0: "not resolved (intervals overlap)",
                                                None: "not compared (no interval)"}[v])
        parts.append(f"{label}: {vals}" + (f" ({'; '.join(verdicts)})" if verdicts else ""))
    return ("; ".join(parts) + ". Expected (docs/science.md section 2): plain >= residual >= hyper-residual; an ordering is read "
            "only where the intervals separate, and only as far as it holds under both thresholds.")


def rank_text(s: dict[str, Any], k: Any) -> str:
    """The max numerical rank of an alignment summary; ``">= r (capped at k = ...)"`` when the rank
    reached the k computed singular values (the true rank may be larger)."""
    if s.get("max_numerical_rank_capped"):
        bound = s.get("max_numerical_rank_lower_bound")
        return (f">= {fmt(bound if bound is not None else k)} (capped: the rank reached the k = {k} computed singular "
                "values; raise k)")
    return fmt_key(s, "max_numerical_rank")


def list_text(values: Any) -> str:
    """``"[1.23, 4.56]"`` (values through :func:`fmt`); "n/a" for None."""
    return "n/a" if values is None else "[" + ", ".join(fmt(v) for v in values) + "]"


def depth_scaling_text(s: dict[str, Any]) -> str:
    """RA4 across depths, with and without each net's first block (the first block's sigma_1 is
    often several times the others' and dominates L * mean sigma_1)."""
    why = s.get("excl_first_reason")
    txt = (f"across depths {s['depths']}: products L * mean sigma_1 {list_text(s.get('products'))}, relative spread "
           f"{fmt_key(s, 'relative_spread')}, log-log slope of mean sigma_1 {fmt_key(s, 'slope')}")
    if "products_excl_first" in s:
        txt += (f"; without the first block: products {list_text(s.get('products_excl_first'))}"
                + (f" ({why})" if why and s.get("products_excl_first") is None else "")
                + f", relative spread {fmt_key(s, 'relative_spread_excl_first', reason=why)}, slope "
                  f"{fmt_key(s, 'slope_excl_first', reason=why)}")
        if s.get("first_block_ratio") is not None:
            txt += f"; first block's sigma_1 / mean of the others per depth {list_text(s['first_block_ratio'])}"
    else:
        txt += "; without the first block: n/a (not in this result)"
    return txt + " (RA4: slope -1 and a nearly constant product; read it where it holds without the first block too)"


def alignment_stage_reading(result: dict[str, Any]) -> str:
    """One line per stage of a :func:`residual_alignment` result dict (``result.to_dict()``) for
    a report: what was measured per stage (blocks, D), RA1 / RA2 / RA3 / RA4 values with undefined
    ones as ``n/a (reason)`` (one-block stages), the rank as ``>= k`` when capped, and RA4 with and
    without the first block."""
    k = (result.get("settings") or {}).get("k")
    out = []
    for i, st in enumerate(result.get("stages", [])):
        s = st.get("summary") or {}
        out.append(f"stage {i} ({len(st.get('block_names', []))} blocks, D = {st.get('dim')}): linearity "
                   f"{fmt_key(s, 'linearity')}, equispacing {fmt_key(s, 'equispacing')}, self alignment "
                   f"{fmt_key(s, 'self_alignment')}, off-diagonal diag ratio {fmt_key(s, 'diag_ratio_offdiag')}, "
                   f"max numerical rank {rank_text(s, k)}, L * mean sigma_1 {fmt_key(s, 'depth_product')} "
                   f"(without the first block {fmt_key(s, 'depth_product_excl_first')})")
    return "; ".join(out) + "."


RA1_METRICS: tuple[tuple[str, int, str], ...] = (
    ("linearity", +1, "RA1 (straight trajectories)"),
    ("equispacing", -1, "RA1 (equal steps)"),
    ("step_cosine", +1, "RA1 (aligned steps)"),
)


def ra1_reading(r: dict, models: list[str], root: str) -> str:
    """RA1 per metric, each model against the plain control (stage 0, per-input values)."""
    parts = []
    n = None
    for key, sign, claim in RA1_METRICS:
        stats: dict[str, Any] = {}
        for m in models:
            ra1 = get_path(r, f"{root}.{m}.alignment.result.stages.0.ra1")
            st = sample_stats(ra1.get(key))
            stats[m] = st if st is not None else (ra1.get("undefined_reason") or summary_of(get_path(
                r, f"{root}.{m}.alignment")).get(f"{key}_reason") or "undefined")
            if st is not None:
                n = st[2]
        parts.append(versus_control(key, stats, models, sign, claim))
    return ("; ".join(parts) + f" (mean +- one standard error over the {n if n is not None else 'n/a'} test inputs; "
            "with skips RA1 predicts linearity and step cosine near 1 and equispacing near 0; a difference from the "
            f"plain control is read only beyond {CONTRAST_Z:g} standard errors, and a difference in RA1's direction "
            "is not by itself the near-1 / near-0 level RA1 describes).")


def collapse_reading(r: dict, models: list[str], root: str) -> str:
    """NC1 across depth and the Spearman rhos per model; the NCC rho is not read when the mismatch
    sits at exactly 0 (ties at the floor), undefined rhos are n/a with the analysis' reason."""
    out = []
    verdict = {}
    for m in models:
        res = get_path(r, f"{root}.{m}.collapse.result")
        s = summary_of(get_path(r, f"{root}.{m}.collapse"))
        notes = res.get("spearman_note") or {}
        rho_nc1 = s.get("spearman_nc1")
        nc1 = fmt_key(s, "spearman_nc1", reason=notes.get("nc1") or None)
        zero_from = res.get("ncc_zero_from")
        rho_ncc = s.get("spearman_ncc_mismatch")
        if zero_from is not None:
            ncc = (f"NCC mismatch exactly 0 from layer {zero_from} on (its rho "
                   f"{fmt(rho_ncc)} is not read: ties at 0 pull rho towards 0 although the mismatch never rises)")
        else:
            ncc = "rho(l, NCC) " + fmt_key(s, "spearman_ncc_mismatch", reason=notes.get("ncc_mismatch") or None)
        out.append(f"{m}: NC1 {fmt_key(s, 'nc1_first')} -> {fmt_key(s, 'nc1_last')}, Spearman rho(l, NC1) {nc1}, {ncc}")
        verdict[m] = None if is_undefined(rho_nc1) else bool(rho_nc1 < -0.9)
    held = [m for m, v in verdict.items() if v]
    text = "; ".join(out)
    tail = (" (expected on a trained ResNet: NC1 decreases with depth, rho < -0.9; it holds for "
            + (", ".join(held) if held else "none of the nets"))
    if CONTROL in models and any(verdict.get(m) for m in models if m != CONTROL):
        if verdict.get(CONTROL):
            tail += ", the plain control included, so a decrease with depth is not specific to skips here"
        elif verdict.get(CONTROL) is False:
            tail += "; the plain control does not show it"
    return text + tail + ")."
