"""Tidy CSV tables of a report's results, for pandas and spreadsheets: one table per analysis,
one row per (model, scope, stage, block, metric).

Columns (:data:`COLUMNS`):

- ``model``: the key of ``results["models"]``; ``analysis``: "alignment" or "hessian";
- ``scope``: "model" (the analysis' summary over the whole model), "stage" (one stage of
  a per-stage alignment result: its summary) or "block" (one residual block);
- ``stage``: the stage's index (empty at model scope); ``block_index`` / ``block``: the block's
  position in the stage (0-based) and its module name (block scope only);
- ``metric``: the summary key (model / stage scope), ``<group>.<field>`` for a block's value in
  results.json (``ra2.self_alignment_mean``, ``svd.iterations``, ...), with ``[j]`` for the j-th
  (0-based) entry of a per-block vector (``ra3.singular_values_mean[0]`` = sigma_1); Hessian
  rows: the summary keys, ``eigenvalues[j]``, ``residuals[j]``, ``dim``;
- ``value``: the number exactly as in results.json (``repr`` of the float: it reads back to the
  same double), a bool as 1 / 0, **empty for None** (undefined or unresolved);
- ``reason``: why a value is None or qualified, where results.json says (the summary's
  ``<metric>_reason``, a stage's ``undefined`` entry); summary entries that are themselves
  reasons or texts are not rows.

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

__all__ = ["COLUMNS", "TABLE_FILES", "alignment_rows", "analysis_tables", "format_value", "hessian_rows",
           "rows_to_csv", "write_tables"]

COLUMNS = ("model", "analysis", "scope", "stage", "block_index", "block", "metric", "value", "reason")

# the key of an analysis in results["models"][model] -> its CSV file name
TABLE_FILES = {"alignment": "alignment.csv", "spectrum": "hessian.csv"}

# per-block fields of an alignment stage ([L] lists, or [L, k] lists of vectors), by group
_BLOCK_FIELDS = {
    "ra2": ("self_alignment_mean", "self_alignment_std", "self_alignment_per_r"),
    "ra3": ("singular_values_mean", "singular_values_std", "rank_mean", "rank_std", "rank_min", "rank_max",
            "rank_le_c", "rank_capped", "gap_ratio_mean", "gap_ratio_std"),
    "ra4": ("sigma1_mean", "sigma1_std"),
    "svd": ("iterations", "converged_fraction", "max_rel_error_bound", "max_error_bound_sigma1"),
}


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
         stage: Any = "", block_index: Any = "", block: str = "") -> dict[str, str]:
    return {"model": model, "analysis": analysis, "scope": scope, "stage": str(stage), "block_index": str(block_index),
            "block": block, "metric": metric, "value": format_value(value), "reason": reason or ""}


def _summary_rows(model: str, analysis: str, scope: str, summary: Mapping[str, Any],
                  undefined: Optional[Mapping[str, Any]] = None, **where: Any) -> list[dict[str, str]]:
    """One row per scalar entry of ``summary`` (``<key>_reason`` entries become the reason column)."""
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
                reason = undefined.get(field)
                reason = reason if isinstance(reason, str) else None
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


_ROWS = {"alignment": alignment_rows, "spectrum": hessian_rows}


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
