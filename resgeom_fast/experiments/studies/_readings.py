"""The readings of the studies' figures: one line of text per figure for report.md.

A reading states the condition under which a number holds and, where the study has one, compares
it with the control (the plain net: the same architecture without skips); see the note above
:data:`CONTRAST_Z`. Every function takes the results dictionary as read back from results.json
(``r``), the model names and the dotted ``root`` under which each model's results sit.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from resgeom_fast.analysis.collapse import spearman_with_reason

from ..report import fmt, fmt_key, get_path, is_undefined

__all__ = ["CONTRAST_Z", "CONTROL", "EXPECTED_DEGENERACY_ORDER", "RA1_METRICS", "THRESHOLDS", "alignment_stage_reading",
           "collapse_reading", "compare_fraction", "contrast_z", "degeneracy_order_reading", "depth_scaling_text",
           "fraction_text", "list_text", "per_model", "ra1_reading", "rank_text", "sample_stats", "spectrum_reading",
           "summary_of", "versus_control",
           # issue 18
           "COLLAPSE_RHO", "VERDICTS", "collapse_training_reading", "collapse_training_verdict", "gc_lam_reading",
           "nc1_decay_decades", "net_conditions", "nf_training_reading", "nf_training_verdict", "unimodality_verdict"]


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


# ------------------------------------------------------------------------------------------------
# issue 18: collapse along training, geometric complexity against the branch scale, deep
# normalisation-free training. Each reading ends in a verdict: "held", "not held" or
# "not resolved", with the conditions of the measurement.
VERDICTS: tuple[str, ...] = ("held", "not held", "not resolved")
COLLAPSE_RHO = -0.9  # docs/science.md section 5: collapse holds for a net when rho(layer, NC1) < -0.9


def nc1_decay_decades(nc1: Any) -> Optional[float]:
    """log10(NC1(h_L) / NC1(h_0)) of a per-layer NC1 list: the decades by which NC1 falls from the
    first to the last layer (negative: a decrease); None when either end is undefined or not > 0."""
    if not isinstance(nc1, list) or len(nc1) < 2:
        return None
    a, b = nc1[0], nc1[-1]
    if is_undefined(a) or is_undefined(b) or not (float(a) > 0 and float(b) > 0):
        return None
    return math.log10(float(b) / float(a))


def collapse_training_verdict(epochs: list[int], rho: list[Optional[float]],
                              decades: list[Optional[float]]) -> tuple[str, str]:
    """(verdict, why) of the claim "NC1 decreases with depth, more strongly as training proceeds".

    ``rho[i]``: Spearman rho(layer, NC1) at ``epochs[i]``; ``decades[i]``: :func:`nc1_decay_decades`.
    Held when, at the last tracked epoch, rho < -0.9 (:data:`COLLAPSE_RHO`), the decrease over
    depth is larger (more decades) than at the first tracked epoch, and rho(epoch, decades) < 0
    over the tracked epochs. Not resolved with fewer than two epochs where both are defined, or
    when the last epoch's rho is undefined. There is one net (one seed): the ordering over epochs
    carries no uncertainty.
    """
    pts = [(e, r, d) for e, r, d in zip(epochs, rho, decades) if not is_undefined(r) and not is_undefined(d)]
    if len(pts) < 2:
        return "not resolved", f"fewer than two tracked epochs with a defined NC1 trend ({len(pts)})"
    if is_undefined(rho[-1]) or is_undefined(decades[-1]):
        return "not resolved", f"rho(l, NC1) or the decay is undefined at the last tracked epoch {epochs[-1]}"
    trend, why = spearman_with_reason([p[0] for p in pts], [p[2] for p in pts])
    fails = []
    if not rho[-1] < COLLAPSE_RHO:
        fails.append(f"rho(l, NC1) at epoch {epochs[-1]} is {fmt(rho[-1])}, not < {COLLAPSE_RHO:g}")
    if not pts[-1][2] < pts[0][2]:
        fails.append(f"the decrease over depth did not grow: {fmt(pts[0][2])} decades at epoch {pts[0][0]}, "
                     f"{fmt(pts[-1][2])} at epoch {pts[-1][0]}")
    if trend is None:
        fails.append(f"rho(epoch, decades) undefined ({why})")
    elif not trend < 0:
        fails.append(f"rho(epoch, decades) = {fmt(trend)} is not < 0")
    if fails:
        return "not held", "; ".join(fails)
    return "held", (f"rho(l, NC1) {fmt(rho[-1])} < {COLLAPSE_RHO:g} at epoch {epochs[-1]}, the decrease over depth "
                    f"grew from {fmt(pts[0][2])} to {fmt(pts[-1][2])} decades, rho(epoch, decades) {fmt(trend)}")


def collapse_training_reading(along: dict[str, Any], conditions: str) -> str:
    """The reading of NC1 per layer along training: rho(layer, NC1) and the decades of decrease
    from h_0 to h_L per tracked epoch, then the verdict of :func:`collapse_training_verdict`.
    ``along``: ``epochs``, ``spearman_nc1`` (with ``spearman_nc1_reason``), ``nc1_decay_decades``."""
    epochs = along.get("epochs") or []
    rho = along.get("spearman_nc1") or []
    dec = along.get("nc1_decay_decades") or []
    reasons = along.get("spearman_nc1_reason") or [""] * len(epochs)
    per = ", ".join(f"epoch {e}: " + (fmt(r) if not is_undefined(r) else f"n/a ({why or 'undefined'})")
                    for e, r, why in zip(epochs, rho, reasons))
    decs = ", ".join(f"epoch {e}: {fmt(d)}" for e, d in zip(epochs, dec))
    verdict, why = collapse_training_verdict(list(epochs), list(rho), list(dec))
    if along.get("not_measured"):
        why += (f"; not measured at epochs {along['not_measured']} (a stored training step that tracked other "
                "epochs: rerun with --fresh)")
    return (f"NC1 per layer along training ({conditions}): Spearman rho(l, NC1) by epoch ({per or 'none tracked'}); "
            f"log10 NC1(h_L) / NC1(h_0) by epoch ({decs or 'none'}). Claim (NC1 decreases with depth, more strongly "
            f"as training proceeds): {verdict} ({why}; one seed, so the ordering over epochs has no error bar).")


def unimodality_verdict(xs: list[float], means: list[Optional[float]], ses: list[Optional[float]],
                        z: float = CONTRAST_Z) -> tuple[str, str]:
    """(verdict, why): is y(x) unimodal with an interior maximum, read only where differences exceed
    ``z`` standard errors (Welch z of two means, :func:`contrast_z`)?

    ``xs`` ascending; undefined means are left out. A resolved valley (a point resolved below a
    point on each side) is "not held" (two modes); a resolved interior peak (a point resolved above
    a point on each side) without a resolved valley is "held"; the largest value at an end of the
    range, resolved above every interior point, is "not held in this range" (no interior maximum
    there); anything else is "not resolved". An undefined standard error resolves nothing.
    """
    pts = [(x, float(m), math.nan if is_undefined(s) else float(s))
           for x, m, s in zip(xs, means, ses) if not is_undefined(m)]
    if len(pts) < 3:
        return "not resolved", f"fewer than three defined points ({len(pts)})"

    def above(i: int, j: int) -> bool:  # point i resolved above point j
        zz = contrast_z((pts[i][1], pts[i][2], 2), (pts[j][1], pts[j][2], 2))
        return not math.isnan(zz) and zz > z

    n = len(pts)
    for j in range(1, n - 1):
        lo = [i for i in range(j) if above(i, j)]
        hi = [k for k in range(j + 1, n) if above(k, j)]
        if lo and hi:
            return "not held", (f"two modes: at {fmt(pts[j][0])} it is below {fmt(pts[lo[0]][0])} and "
                                f"{fmt(pts[hi[0]][0])} by more than {z:g} standard errors")
    for j in sorted(range(1, n - 1), key=lambda i: -pts[i][1]):  # the highest resolved interior peak
        lo = [i for i in range(j) if above(j, i)]
        hi = [k for k in range(j + 1, n) if above(j, k)]
        if lo and hi:
            return "held", (f"interior maximum at {fmt(pts[j][0])}, above {fmt(pts[lo[0]][0])} and "
                            f"{fmt(pts[hi[0]][0])} by more than {z:g} standard errors, no resolved second mode")
    top = max(range(n), key=lambda i: pts[i][1])
    if top in (0, n - 1) and all(above(top, i) for i in range(1, n - 1)):
        return "not held", (f"in this range [{fmt(pts[0][0])}, {fmt(pts[-1][0])}] no interior maximum: GC is largest at "
                            f"the end {fmt(pts[top][0])}, above every interior point by more than {z:g} standard "
                            "errors (a wider range may show the other side)")
    return "not resolved", (f"no resolved interior maximum, second mode or end maximum: the differences that decide "
                            f"them are within {z:g} standard errors")


def gc_lam_reading(gc: dict[str, Any], conditions: str) -> str:
    """The reading of geometric complexity against the branch scale lam at the end of training:
    GC +- its standard error per lam (over seeds, or over test samples with one seed), diverged
    runs, and the verdict of :func:`unimodality_verdict` on the lams in ascending order.
    ``gc["final"]``: ``lams``, ``labels``, ``gc_mean``, ``gc_se``, ``spread``, ``diverged``."""
    f = gc.get("final") or {}
    lams, labels = f.get("lams") or [], f.get("labels") or []
    means, ses = f.get("gc_mean") or [], f.get("gc_se") or []
    div = f.get("diverged") or [0] * len(lams)
    vals = ", ".join(f"lam = {lab} ({fmt(lam)}): {fmt(m)} +- {fmt(s, 2)}" + (f" [{d} run(s) diverged, left out]"
                                                                             if d else "")
                     for lab, lam, m, s, d in zip(labels, lams, means, ses, div))
    verdict, why = unimodality_verdict(list(lams), list(means), list(ses))
    gone = [lab for lab, m in zip(labels, means) if is_undefined(m)]
    if gone:
        why += (f"; lam = {', '.join(gone)} left out: no run trained (diverged), so the verdict covers only the "
                "branch scales that trained at this learning rate")
    return (f"GC at the end of training against lam ({conditions}; +- one standard error over "
            f"{f.get('spread', 'n/a')}): {vals or 'none'}. Claim (GC unimodal in lam, an interior maximum): "
            f"{verdict} ({why}).")


def nf_training_verdict(nf: dict[str, Any], reference_acc: Optional[float], margin: float = 0.05) -> tuple[str, str]:
    """(verdict, why) of "a normalisation-free net with scaled branches trains at this depth":
    held when the loss stayed finite, the test accuracy is above twice chance (2 / ``num_classes``)
    and within ``margin`` of
    ``reference_acc`` (the study's shallow BatchNorm residual net) or above it; not held when
    training diverged or fell short; not resolved without an accuracy to compare."""
    acc, ref = nf.get("test_acc"), reference_acc
    if not nf.get("finite", False):
        return "not held", "the training loss became non-finite (diverged)"
    if is_undefined(acc) or is_undefined(ref):
        return "not resolved", "no test accuracy to compare"
    classes = nf.get("num_classes")
    if classes and float(acc) <= 2.0 / classes:
        return "not held", f"test accuracy {fmt(acc)} is not above twice chance (2 / {classes} = {fmt(2.0 / classes)})"
    if float(acc) >= float(ref) - margin:
        return "held", f"test accuracy {fmt(acc)} within {margin:g} of (or above) the reference {fmt(ref)}"
    return "not held", f"test accuracy {fmt(acc)} more than {margin:g} below the reference {fmt(ref)}"


def nf_training_reading(nf: dict[str, Any], reference_acc: Optional[float], conditions: str) -> str:
    """Depth, train / test accuracy and wall time of the deep normalisation-free net, and the verdict."""
    verdict, why = nf_training_verdict(nf, reference_acc)
    return (f"normalisation-free FCResNet, lam = {nf.get('scale')} (= {fmt(nf.get('lam'))}), no BatchNorm, depth "
            f"{nf.get('depth')} ({conditions}): train accuracy {fmt(nf.get('train_acc'))}, test accuracy "
            f"{fmt(nf.get('test_acc'))}, final train loss {fmt(nf.get('train_loss'))}, wall time "
            f"{fmt(nf.get('wall_s'))} s for {nf.get('epochs')} epochs on {nf.get('device')} (training and evaluation, "
            f"this machine's load). Claim (trains without normalisation at this depth, test accuracy within 0.05 of "
            f"the BatchNorm residual net of depth {nf.get('reference_depth')}): {verdict} ({why})"
            + ("; with lam = 1/L each branch adds O(1/L) and the stack tends to a depth-independent limit (output "
               "norm at init bounded), so matching a shallow net shows trainability, not a benefit of depth"
               if nf.get("scale") == "1/L" else "") + ".")


def net_conditions(cfg: dict[str, Any], *, depth: Optional[int] = None, norm: Optional[str] = None,
                   epochs: Optional[int] = None, seeds: Optional[int] = None) -> str:
    """The conditions of a trained net for a reading: ``"digits, fc width 64, depth 8, norm batch,
    SGD lr 0.05 (constant), weight decay 0, batch 64, 15 epochs, seed 0"`` (keyword arguments
    override the configuration's depth / norm / epochs; ``seeds`` names that many seeds)."""
    seed = cfg.get("seed", 0)
    seed_text = f"seeds {seed}..{seed + seeds - 1}" if seeds and seeds > 1 else f"seed {seed}"
    n_train = cfg.get("n_train")
    return (f"{cfg.get('dataset', 'digits')}{'' if n_train is None else f' (n_train {n_train})'}, "
            f"{cfg.get('model', 'fc')} width {cfg.get('width')}, depth {cfg.get('depth') if depth is None else depth}, "
            f"norm {cfg.get('norm', 'batch') if norm is None else norm}, SGD lr {fmt(cfg.get('lr'))} "
            f"({cfg.get('schedule', 'constant')}), weight decay {fmt(cfg.get('weight_decay', 0.0))}, batch "
            f"{cfg.get('batch_size')}, {cfg.get('epochs') if epochs is None else epochs} epochs, {seed_text}")


# =============================================================================== issue 18, part C
LEAKY_MATCH_RTOL = 0.05  # adaptive "matches" equidistant when its test loss is within 5 % (one net per point)


def leaky_steps_reading(cmp: dict[str, Any], conditions: str) -> str:
    """Adaptive against equidistant steps per teacher: the end-to-middle step ratio of the adaptive
    steps (< 1: more layers near the ends) and the two test losses, with a verdict per claim (one net
    per scheme and teacher: no seed spread, so "matches" means within LEAKY_MATCH_RTOL)."""
    parts = []
    for t in cmp["teachers"]:
        b = cmp[t]
        eq, ad = b["equidistant"], b["adaptive"]
        ratio = ad.get("end_step_ratio")
        if is_undefined(ratio):
            ends = "end-to-middle step ratio n/a (fewer than 4 layers)"
        else:
            ends = (f"adaptive end-to-middle step ratio {fmt(ratio)} ("
                    + ("more layers near the ends: holds" if ratio < 1 else "not more layers near the ends") + ")")
            if ad.get("capped_layers"):
                ends += (f", {ad['capped_layers']} of {len(ad.get('rho', []))} adaptive steps held at the cap "
                         "rho_l Lt = 0.95")
        le, la = eq.get("test_data_loss"), ad.get("test_data_loss")
        if is_undefined(le) or is_undefined(la):
            loss = "test loss n/a"
        else:
            rel = (la - le) / abs(le) if le else math.inf
            verdict = ("adaptive beats equidistant" if rel < -LEAKY_MATCH_RTOL else
                       "adaptive matches equidistant" if rel <= LEAKY_MATCH_RTOL else "adaptive worse than equidistant")
            loss = (f"test loss equidistant {fmt(le)}, adaptive {fmt(la)} ({rel:+.1%}: {verdict}, "
                    f"match = within {LEAKY_MATCH_RTOL:.0%})")
        parts.append(f"teacher {'-'.join(str(d) for d in b['dims'])}: {ends}; {loss}")
    return ("; ".join(parts) + f". At Lt = {fmt(cmp['lt'])} after the continuation ({conditions}); one net per "
            "scheme and teacher, so no seed spread. Claim (Jacot & Kaiser): adaptive steps place more layers near "
            "the ends and match or beat equidistant steps.")


def seed_stats(values: Any) -> Any:
    """:func:`sample_stats` of per-seed values, or the reason it is undefined (a string)."""
    st = sample_stats(values)
    return "no finite value" if st is None else st


def seed_order_reading(block: dict[str, Any], groups: list[str], metric: str, label: str,
                       pairs: list[tuple[str, str]], conditions: str) -> str:
    """Mean +- standard error over seeds of ``metric`` per group (``block[g]["per_seed"][metric]``)
    and, per expected pair (hi, lo) meaning "hi >= lo", whether it holds, is reversed (both beyond
    CONTRAST_Z standard errors of the difference) or is not resolved."""
    stats = {g: seed_stats(block[g]["per_seed"][metric]) for g in groups}
    for g in groups:
        why = (block[g].get("reasons") or {}).get(metric)
        if isinstance(stats[g], str) and why:
            stats[g] = f"{stats[g]}; {why}"

    def val(g: str) -> str:
        st = stats[g]
        vals = block[g]["per_seed"][metric]
        div = len(block[g].get("diverged") or [])
        missing = sum(v is None or not math.isfinite(float(v)) for v in vals)
        kinds = ([f"{div} diverged"] if div else []) + ([f"{missing - div} undefined"] if missing > div else [])
        note = f" ({missing} of {len(vals)} seeds without a value, excluded: {', '.join(kinds)})" if missing else ""
        return (f"n/a ({st})" if isinstance(st, str) else f"{fmt(st[0])} +- {fmt(st[1], 2)}") + note

    verdicts = []
    for hi, lo in pairs:
        if hi not in stats or lo not in stats:
            continue
        if isinstance(stats[hi], str) or isinstance(stats[lo], str):
            verdicts.append(f"{hi} >= {lo} not compared (n/a)")
            continue
        z = contrast_z(stats[hi], stats[lo])
        if stats[hi][0] == stats[lo][0] and stats[hi][1] == 0 and stats[lo][1] == 0:
            verdicts.append(f"{hi} = {lo} on every seed (no spread), so no order")
        elif math.isnan(z):
            verdicts.append(f"{hi} >= {lo} not resolved (one seed: no spread)")
        elif abs(z) < CONTRAST_Z:
            verdicts.append(f"{hi} >= {lo} not resolved (|z| {abs(z):.1f} < {CONTRAST_Z:g})")
        else:
            by = "beyond any spread" if math.isinf(z) else f"z {z:+.1f}"
            verdicts.append(f"{hi} >= {lo} {'holds' if z > 0 else 'is reversed'} ({by})")
    return (f"{label} ({conditions}): " + ", ".join(f"{g} {val(g)}" for g in groups)
            + (f"; {'; '.join(verdicts)}" if verdicts else "")
            + f" (mean +- standard error over seeds; an order is read only beyond {CONTRAST_Z:g} standard errors)")
