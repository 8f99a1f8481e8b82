"""Report folders: results.json, PNG figures built from it, and report.md.

Figures are drawn from the results dictionary *after* it has been through JSON (the exact data of
results.json), never from live objects, so every plotted number can be checked against the file.
Each data-carrying artist is tagged with a ``gid`` that names where its numbers live in
results.json (:func:`tag`): ``"x=PATH;y=PATH"`` for a Line2D, ``"z=PATH"`` for an image,
``"h=PATH"`` for a bar. PATH is dot-separated keys / list indices; ``x=index`` / ``x=index1``
mean 0..n-1 / 1..n. :func:`check_figure` verifies a figure against the dictionary (the tests use
it on every figure of the demo).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from resgeom_fast import _version
from resgeom_fast._progress import progress as progress_bar
# the tags, paths and check of every plotted number: one copy, on the analyses' plotting path
from resgeom_fast.analysis.plotting import check_figure, get_path, tag
from resgeom_fast.core.io import atomic_file, atomic_write_json, atomic_write_text, to_jsonable

__all__ = ["FigureSpec", "check_figure", "determinism", "fmt", "fmt_key", "get_path", "is_undefined", "summary_rows",
           "tag", "write_report"]


@dataclass
class FigureSpec:
    """One figure of a report.

    Attributes:
        name: file stem (``figures/<name>.png``).
        title: a heading for report.md.
        build: results dict (as loaded from results.json) -> matplotlib Figure.
        reading: results dict -> a one-line reading of the figure (from the summaries).
    """

    name: str
    title: str
    build: Callable[[dict[str, Any]], Any]
    reading: Callable[[dict[str, Any]], str]


@dataclass
class Report:
    """What :func:`write_report` wrote (``specs``: the figure specs, to rebuild a figure from results.json)."""

    out: str
    results_path: str
    report_path: str
    figures: list[str] = field(default_factory=list)
    specs: list[FigureSpec] = field(default_factory=list)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a one-line reading (``n/a`` for None / NaN; ``yes`` / ``no`` for a bool)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "n/a"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


DETERMINISTIC_ANALYSES: tuple[str, ...] = ("hessian_spectrum", "residual_alignment")
"""The analyses with choices made by timing ("auto" Hessian-vector product / Jacobian paths) that
``deterministic=True`` fixes; the others have no timing-based choice."""


def determinism(deterministic: bool) -> dict[str, Any]:
    """What report.md and results.json say about reproducibility under ``config["deterministic"]``."""
    names = ", ".join(DETERMINISTIC_ANALYSES)
    if deterministic:
        text = (f"methods fixed by --deterministic (the analyses with timing-based 'auto' choices, {names}, use a "
                "fixed method): the same command on the same machine gives the same numbers.")
    else:
        text = (f"auto choices by timing ({names} pick their fastest method on this machine): float32 round-off "
                "may differ between runs; use --deterministic to fix the methods.")
    return {"deterministic": deterministic, "fixed_analyses": list(DETERMINISTIC_ANALYSES) if deterministic else [],
            "statement": text}


def is_undefined(value: Any) -> bool:
    """None or NaN: a metric that was not (or could not be) computed."""
    if value is None:
        return True
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt_key(summary: Optional[Mapping[str, Any]], key: str, digits: int = 3, reason: Optional[str] = None) -> str:
    """``summary[key]`` for a reading: the number, or ``n/a (reason)`` when it is None / NaN.

    The reason is ``reason`` when given, else ``summary[key + "_reason"]``; "undefined" when
    neither says more, "not in this result" when the key is absent. A defined value that carries a
    ``_reason`` (e.g. a mean over only some stages) is followed by it in parentheses.
    """
    summary = summary or {}
    why = reason or summary.get(f"{key}_reason")
    if key not in summary:
        return f"n/a ({why or 'not in this result'})"
    value = summary[key]
    if is_undefined(value):
        return f"n/a ({why or 'undefined'})"
    return fmt(value, digits) + (f" ({why})" if why else "")


def summary_rows(summ: Mapping[str, Any], digits: int = 4) -> list[tuple[str, str]]:
    """(metric, text) rows of a summary for report.md: ``<key>_reason`` entries are folded into
    their metric's text ("n/a (reason)" / "value (reason)") instead of rows of their own."""
    rows = []
    for key, value in summ.items():
        if key.endswith("_reason") and key[: -len("_reason")] in summ:
            continue
        rows.append((key, fmt_key(summ, key, digits) if not isinstance(value, str) else value))
    return rows


def _environment() -> dict[str, Any]:
    return {"resgeom_fast": _version.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cuda_available": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_report(out: str, title: str, results: Mapping[str, Any], figures: Sequence[FigureSpec], *,
                 intro: str = "", summaries: Optional[Mapping[str, Mapping[str, Mapping[str, float]]]] = None,
                 config: Optional[Mapping[str, Any]] = None, progress: bool = False) -> Report:
    """Write ``out/results.json``, ``out/figures/<name>.png`` and ``out/report.md``.

    Args:
        out: the report folder.
        title: the report's first heading.
        results: JSON-friendly results; written first, then re-read so figures use the file's data.
        figures: the figures, in report order.
        intro: Markdown paragraph under the title.
        summaries: ``{model: {analysis: summary dict}}`` rendered as tables at the end.
        config: the configuration, rendered as a table; its ``deterministic`` flag (when present)
            is stated under the intro and stored as ``results.json["determinism"]``.
        progress: a bar over the figures (plain lines, at most one a second, when stderr is not a terminal).
    """
    # matplotlib only when a report is drawn, and the Agg backend chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    payload = dict(to_jsonable(results))
    payload.setdefault("environment", _environment())
    if config is not None and "deterministic" in config:
        payload.setdefault("determinism", determinism(bool(config["deterministic"])))
    results_path = os.path.join(out, "results.json")
    atomic_write_json(results_path, payload)
    with open(results_path, encoding="utf-8") as fh:
        data = json.load(fh)

    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    if "determinism" in data:
        lines += [f"Determinism: {data['determinism']['statement']}", ""]
    written: list[str] = []
    with progress_bar(len(figures), "figures", enabled=progress, unit="figures", leave=False, min_interval=1.0) as bar:
        for spec in figures:
            bar.set_postfix_str(spec.name)
            fig = spec.build(data)
            path = os.path.join(out, "figures", f"{spec.name}.png")
            with atomic_file(path, "wb") as fh:
                fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
            lines += [f"## {spec.title}", "", f"![{spec.title}](figures/{spec.name}.png)", "",
                      f"Reading: {spec.reading(data)}", ""]
            bar.update(1)
    if summaries:
        lines += ["## Headline numbers (summary() of every result)", ""]
        for model, analyses in summaries.items():
            lines += [f"### {model}", "", "| analysis | metric | value |", "|---|---|---:|"]
            for analysis, summ in analyses.items():
                for key, text in summary_rows(summ):
                    lines.append(f"| {analysis} | {key} | {text.replace('|', '/')} |")
            lines.append("")
    if config:
        lines += ["## Configuration", "", "| option | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in config.items()]
        lines.append("")
    env = data.get("environment", {})
    lines += [f"_resgeom_fast {env.get('resgeom_fast', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}._", ""]
    report_path = os.path.join(out, "report.md")
    atomic_write_text(report_path, "\n".join(lines))
    return Report(out=out, results_path=results_path, report_path=report_path, figures=written,
                  specs=list(figures))
