"""Tidy CSV tables of a report's results, for pandas and spreadsheets: one table per analysis,
one row per (model, scope, stage, block, layer, metric).

Columns (:data:`COLUMNS`):

- ``model``: the key of ``results["models"]``; ``analysis``: "alignment", "hessian", "collapse",
  "singularities" or "expansion" (files :data:`TABLE_FILES`);
- ``scope``: "model" (the analysis' summary over the whole model), "stage" (one stage of a
  per-stage alignment result: its summary), "block" (one residual block of the alignment),
  "layer" (one analysed representation of collapse, one layer of units of singularities) or
  "run" (one run of consecutive blocks of the path expansion);
- ``stage``: the alignment stage's index, or the expansion run's index (empty elsewhere);
- ``block_index`` / ``block``: alignment: the block's position in the stage (0-based) and its
  module name; collapse: the index (in the model's residual blocks) and name of the block whose
  output h_l is (empty for h_0, the first block's input); singularities: the index of the
  residual block holding the layer (empty outside blocks); expansion: the run's first and last
  block names as ``first..last``;
- ``layer``: collapse: l of h_l (0 = the first block's input); singularities: the layer's name
  as results.json gives it; empty elsewhere;
- ``metric``: the summary key (model / stage / run scope), ``<group>.<field>`` for a block's value in
  results.json (``ra2.self_alignment_mean``, ``svd.iterations``, ...), with ``[j]`` for the j-th
  (0-based) entry of a vector (``ra3.singular_values_mean[0]`` = sigma_1, expansion's
  ``norms_mean[m]`` of path order m); Hessian rows: the summary keys, ``eigenvalues[j]``,
  ``residuals[j]``, ``dim``; collapse / singularities layer rows: the result's per-layer field
  (``nc1``, ``dead_fraction``, ...);
- ``value``: the number exactly as in results.json (``repr`` of the float: it reads back to the
  same double), a bool as 1 / 0, **empty for None** (undefined or unresolved; NaN is None in
  results.json);
- ``reason``: why a value is None or qualified, where results.json says (the summary's
  ``<metric>_reason``, a stage's ``undefined`` entry, collapse's ``nc1_note`` / ``nc3_note`` /
  ``spearman_note``, a singularities layer's reason for the metric, expansion's ``note``);
  summary entries that are themselves reasons or texts are not rows.

The rows are built from the JSON form of the results (:func:`~resgeom_fast.core.io.to_jsonable`),
so every number equals the one in results.json. The raw Hessian fractions of the result (which
may be unresolved) are not written: the summary's, None with a reason when unresolved, are.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterable, Mapping, Optional

from resgeom_fast.core.io import atomic_write_text, to_jsonable

__all__ = ["COLUMNS", "DOCUMENTED_REASONS", "TABLE_FILES", "alignment_rows", "analysis_tables", "collapse_rows",
           "expansion_rows", "format_value", "hessian_rows", "rows_to_csv", "singularities_rows", "write_tables"]

COLUMNS = ("model", "analysis", "scope", "stage", "block_index", "block", "layer", "metric", "value", "reason")

# the key of an analysis in results["models"][model] -> its CSV file name
TABLE_FILES = {"alignment": "alignment.csv", "spectrum": "hessian.csv", "collapse": "collapse.csv",
               "singularities": "singularities.csv", "expansion": "expansion.csv"}

# per-block fields of an alignment stage ([L] lists, or [L, k] lists of vectors), by group
_BLOCK_FIELDS = {
    "ra2": ("self_alignment_mean", "self_alignment_std", "self_alignment_per_r"),
    "ra3": ("singular_values_mean", "singular_values_std", "rank_mean", "rank_std", "rank_min", "rank_max",
            "rank_le_c", "rank_capped", "gap_ratio_mean", "gap_ratio_std"),
    "ra4": ("sigma1_mean", "sigma1_std"),
    "svd": ("iterations", "converged_fraction", "max_rel_error_bound", "max_error_bound_sigma1"),
}


# a per-block field left None for the same cause as a stage quantity whose reason ``undefined`` holds
_SAME_CAUSE = {"rank_le_c": "rank_le_c_fraction"}
# a per-block field None by the analysis' documented rule (AlignmentResult's docstring), when the
# stage's ``undefined`` does not say
DOCUMENTED_REASONS = {"gap_ratio_mean": "sigma_(C+1) / sigma_C is undefined when k <= C (raise k)",
               "gap_ratio_std": "sigma_(C+1) / sigma_C is undefined when k <= C (raise k)"}


def format_value(value: Any) -> str:
    """A JSON scalar as CSV text: None -> "", bool -> "1" / "0", int -> str, float -> repr (round trip)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise TypeError(f"format_value: expected a number, a bool or None, got {type(value).__name__}")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def _row(model: str, analysis: str, scope: str, metric: str, value: Any, reason: Optional[str] = None, *,
         stage: Any = "", block_index: Any = "", block: str = "", layer: Any = "") -> dict[str, str]:
    return {"model": model, "analysis": analysis, "scope": scope, "stage": str(stage), "block_index": str(block_index),
            "block": block, "layer": "" if layer is None else str(layer), "metric": metric,
            "value": format_value(value), "reason": reason or ""}


def _summary_rows(model: str, analysis: str, scope: str, summary: Mapping[str, Any],
                  undefined: Optional[Mapping[str, Any]] = None, **where: Any) -> list[dict[str, str]]:
    """One row per scalar entry of ``summary`` (``<key>_reason`` entries become the reason column,
    else ``undefined[key]``)."""
    rows = []
    undefined = undefined or {}
    for key, value in summary.items():
        if key.endswith("_reason") or not _is_scalar(value):
            continue
        reason = summary.get(f"{key}_reason") or undefined.get(key)
        rows.append(_row(model, analysis, scope, key, value, reason if isinstance(reason, str) else None, **where))
    return rows


def alignment_rows(model: str, entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of one model's alignment entry (``{"result": AlignmentResult.to_dict(), "summary": ...}``):
    the model summary, then per stage its summary and its blocks' values. A result without
    ``stages`` (not per stage) is one stage, index empty."""
    rows = _summary_rows(model, "alignment", "model", entry.get("summary") or {})
    result = entry.get("result") or {}
    stages = result.get("stages")
    if stages is None:
        stages = [dict(result, stage="")]
    for st in stages:
        undefined = st.get("undefined") or {}
        sid = st.get("stage", "")
        rows += _summary_rows(model, "alignment", "stage", st.get("summary") or {}, undefined, stage=sid)
        names = st.get("block_names") or []
        for group, fields in _BLOCK_FIELDS.items():
            values = st.get(group) or {}
            for field in fields:
                if field not in values:
                    continue
                per_block = values[field]
                reason = undefined.get(field) or undefined.get(_SAME_CAUSE.get(field, ""))
                reason = reason if isinstance(reason, str) else DOCUMENTED_REASONS.get(field)
                for b, name in enumerate(names):
                    v = per_block[b] if isinstance(per_block, list) and b < len(per_block) else None
                    where = {"stage": sid, "block_index": b, "block": name}
                    if isinstance(v, list):
                        rows += [_row(model, "alignment", "block", f"{group}.{field}[{j}]", x, reason, **where)
                                 for j, x in enumerate(v) if _is_scalar(x)]
                    elif _is_scalar(v):
                        rows.append(_row(model, "alignment", "block", f"{group}.{field}", v, reason, **where))
    return rows


def hessian_rows(model: str, entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of one model's Hessian entry (``{"result": SpectrumResult.to_dict(), "summary": ...}``):
    the summary (unresolved fractions None with their reason), the eigenvalues with their
    residuals, and the dimension."""
    rows = _summary_rows(model, "hessian", "model", entry.get("summary") or {})
    result = entry.get("result") or {}
    for key in ("eigenvalues", "residuals"):
        rows += [_row(model, "hessian", "model", f"{key}[{j}]", v) for j, v in enumerate(result.get(key) or [])
                 if _is_scalar(v)]
    if _is_scalar(result.get("dim")) and "dim" in result:
        rows.append(_row(model, "hessian", "model", "dim", result["dim"]))
    return rows


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _at(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, list) and i < len(values) else None


# per-layer fields of a collapse result ([n_layers] lists); the metrics whose undefined / limited
# value nc1_note explains
_COLLAPSE_FIELDS = ("widths", "nc1", "etf_error", "equinorm", "ncc_mismatch", "tr_sigma_w", "tr_sigma_b", "rank_sigma_b",
                    "sigma_b_condition", "ill_conditioned")
_NC1_NOTED = ("nc1", "etf_error", "equinorm", "sigma_b_condition")


def collapse_rows(model: str, entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of one model's collapse entry (``{"result": CollapseResult.to_dict(), "summary": ...,
    "block_names": [...]}``): the summary (reasons from ``nc1_note`` / ``nc3_note`` /
    ``spearman_note``), then one row per analysed layer l and per-layer field (the reason of
    nc1 / etf_error / equinorm / sigma_b_condition: that layer's ``nc1_note`` when the value is
    None, and of nc1 whenever the note says something)."""
    result = entry.get("result") or {}
    layers = result.get("layers") or []
    notes = result.get("nc1_note") or []
    spear = result.get("spearman_note") or {}
    undefined = {"nc3": _text(result.get("nc3_note")),
                 "nc1_first": _text(_at(notes, 0)), "nc1_last": _text(_at(notes, len(layers) - 1)),
                 "etf_error_last": _text(_at(notes, len(layers) - 1)),
                 **{f"spearman_{k}": _text(v) for k, v in spear.items()}}
    rows = _summary_rows(model, "collapse", "model", entry.get("summary") or {},
                         {k: v for k, v in undefined.items() if v})
    names = entry.get("block_names") or []
    for i, l in enumerate(layers):
        where = {"layer": l, "block_index": l - 1 if isinstance(l, int) and l >= 1 else "",
                 "block": _at(names, l - 1) or "" if isinstance(l, int) and l >= 1 else ""}
        note = _text(_at(notes, i))
        for field in _COLLAPSE_FIELDS:
            if field not in result:
                continue
            v = _at(result[field], i)
            if not _is_scalar(v):
                continue
            reason = note if field in _NC1_NOTED and (v is None or field == "nc1") else None
            rows.append(_row(model, "collapse", "layer", field, v, reason, **where))
    return rows


_LAYER_TEXT = ("name", "module_name", "weight_name", "weight_reason", "role", "kind", "activation", "dead_rule",
               "dead_units", "weight_norms", "cov_eigenvalues")  # texts and vectors (also when None)
# a layer's metrics of its incoming weight (None without one: ``weight_reason`` says why)
_WEIGHT_METRICS = ("n_in", "small_weight_fraction", "weight_units_used", "weight_cos_max", "weight_cos_mean",
                   "weight_pairs_above")


def _layer_reason(layer: Mapping[str, Any], metric: str) -> Optional[str]:
    """Why a singularities layer's ``metric`` is None, from the layer's own entries: a
    ``<metric>_reason``, its ``weight_reason`` for a weight metric, or (module doc of
    :mod:`resgeom_fast.analysis.singularities`) too few units for a pair cosine / no units."""
    direct = _text(layer.get(f"{metric}_reason"))
    if direct:
        return direct
    if layer.get(metric) is not None:
        return None
    if metric in _WEIGHT_METRICS:
        return _text(layer.get("weight_reason")) or (
            "fewer than 2 incoming weight rows of non-zero norm" if metric.startswith("weight_cos") else None)
    if metric.startswith("act_cos"):
        return f"fewer than 2 non-zero activation columns (act_units_used = {layer.get('act_units_used')})"
    if layer.get("n_units") == 0:
        return "a layer of no units"
    return None


def _means_rows(model: str, prefix: str, means: Mapping[str, Any], empty_reason: str) -> list[dict[str, str]]:
    return [_row(model, "singularities", "model", f"{prefix}.{k}", v, None if v is not None else (
        empty_reason if k not in ("small_weight_fraction", "weight_cos_max", "weight_cos_mean")
        else f"{empty_reason}, or only layers without an incoming weight")) for k, v in means.items() if _is_scalar(v)]


def singularities_rows(model: str, entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of one model's singularities entry (``{"result": SingularityResult.to_dict(),
    "summary": ...}``): the summary, the model-level ``means`` / ``post_means``
    (``means.<metric>``, ``post_means.<metric>``: over the layers that are not "post" / over the
    "post" layers) and counts, then one row per layer and scalar metric of the layer (its vectors
    -- dead unit indices, weight norms, covariance eigenvalues -- and texts are not rows;
    ``layer`` = its name, ``block_index`` the residual block holding it; a weight metric of a layer
    without an incoming weight is empty with the layer's ``weight_reason``)."""
    result = entry.get("result") or {}
    rows = _summary_rows(model, "singularities", "model", entry.get("summary") or {})
    rows += _means_rows(model, "means", result.get("means") or {}, "no layer that is not post has a value")
    rows += _means_rows(model, "post_means", result.get("post_means") or {}, "no post layer has a value")
    rows += [_row(model, "singularities", "model", k, result[k])
             for k in ("eps", "dead_tol", "total_units", "total_dead", "post_total_units", "post_total_dead",
                       "num_samples") if k in result and _is_scalar(result[k])]
    for i, layer in enumerate(result.get("layers") or []):
        if not isinstance(layer, dict):
            continue
        block = layer.get("block")
        where = {"layer": layer.get("name", i), "block_index": block if isinstance(block, int) else ""}
        for key, v in layer.items():
            if key in _LAYER_TEXT or key == "block" or key.endswith("_reason") or not _is_scalar(v):
                continue
            rows.append(_row(model, "singularities", "layer", key, v, _layer_reason(layer, key), **where))
    return rows


# per-run vectors of a path expansion result (one entry per order m) and scalars
_EXPANSION_VECTORS = ("norms_mean", "norms_std", "distribution", "distribution_std")
_EXPANSION_SCALARS = ("mean_order_std", "total_norm_mean", "tail_norm_mean", "input_norm_mean", "max_order",
                      "num_samples", "num_probes", "num_undefined")
_NOTED = ("mean_order", "mode_order", "mean_order_std", "distribution", "distribution_std")


def expansion_rows(model: str, entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows of one model's expansion entry (``{"runs": [{"blocks", "result", "summary"}],
    "summary"}``): ``num_runs`` at model scope, then per run (``stage`` = the run's index) its
    summary, the scalars of the result and one row per path order m of ``norms_mean[m]``,
    ``norms_std[m]``, ``distribution[m]``, ``distribution_std[m]`` (the result's ``note`` is the
    reason of the path-order distribution's rows when it says some samples are undefined)."""
    summary = entry.get("summary") or {}
    rows = [_row(model, "expansion", "model", k, v) for k, v in summary.items()
            if k == "num_runs" and _is_scalar(v)]
    for r, run in enumerate(entry.get("runs") or []):
        names = run.get("blocks") or []
        result = run.get("result") or {}
        note = _text(result.get("note"))
        where = {"stage": r, "block": f"{names[0]}..{names[-1]}" if names else ""}
        for key, v in (run.get("summary") or {}).items():
            if _is_scalar(v) and not key.endswith("_reason"):
                reason = _text((run.get("summary") or {}).get(f"{key}_reason")) or (note if key in _NOTED else None)
                rows.append(_row(model, "expansion", "run", key, v, reason, **where))
        rows += [_row(model, "expansion", "run", k, result[k], note if k in _NOTED else None, **where)
                 for k in _EXPANSION_SCALARS if k in result and _is_scalar(result[k])]
        for key in _EXPANSION_VECTORS:
            for m, v in enumerate(result.get(key) or []):
                if _is_scalar(v):
                    rows.append(_row(model, "expansion", "run", f"{key}[{m}]", v,
                                     note if key in _NOTED else None, **where))
    return rows


_ROWS = {"alignment": alignment_rows, "spectrum": hessian_rows, "collapse": collapse_rows,
         "singularities": singularities_rows, "expansion": expansion_rows}


def analysis_tables(results: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """{file name: rows} for every analysis of :data:`TABLE_FILES` present in ``results["models"]``
    (all models in one table per analysis)."""
    data = to_jsonable(results)
    tables: dict[str, list[dict[str, str]]] = {}
    for model, analyses in (data.get("models") or {}).items():
        for key, fname in TABLE_FILES.items():
            if isinstance(analyses, dict) and isinstance(analyses.get(key), dict):
                tables.setdefault(fname, []).extend(_ROWS[key](str(model), analyses[key]))
    return tables


def rows_to_csv(rows: Iterable[Mapping[str, str]]) -> str:
    """CSV text (header :data:`COLUMNS`, ``\\n`` line ends, minimal quoting)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out: str, results: Mapping[str, Any]) -> list[str]:
    """Write :func:`analysis_tables` of ``results`` into ``out`` atomically; the paths written."""
    paths = []
    for fname, rows in analysis_tables(results).items():
        path = os.path.join(out, fname)
        atomic_write_text(path, rows_to_csv(rows))
        paths.append(path)
    return paths
