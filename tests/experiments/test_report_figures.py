"""The report figures draw through the analyses' plot_* helpers (the one plotting path): every
figure panel that shows one model's result of one analysis calls that analysis' plot_* with
``at=`` the result's path inside the results dictionary, and every figure still holds exactly the
numbers of results.json (check_figure)."""
from __future__ import annotations

import importlib
import json
from typing import Any

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from resgeom_fast.core.io import to_jsonable  # noqa: E402
from resgeom_fast.experiments.commands import run_study  # noqa: E402
from resgeom_fast.experiments.report import check_figure  # noqa: E402
from resgeom_fast.experiments.studies._figures import (  # noqa: E402
    alignment_figures,
    collapse_figure,
    density_figure,
    stage_figures,
)

from tests.analysis._tiny_results import tiny_results  # noqa: E402

# (module, plot_*) of every helper a report figure may call
PLOTS = [("alignment", "plot_trajectories"), ("alignment", "plot_singular_values"),
         ("alignment", "plot_cross_alignment"), ("alignment", "plot_sigma1"), ("spectrum", "plot_density"),
         ("collapse", "plot_collapse"), ("expansion", "plot_output_norms")]


def _step(result: Any) -> dict[str, Any]:
    """What an analysis step stores in results.json: the result's dict form and its summary."""
    return json.loads(json.dumps(to_jsonable({"result": result.to_dict(), "summary": result.summary()})))


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """A results dictionary of the studies' layout (``models.<name>.<analysis>.{result, summary}``)
    from the tiny analysis results; "model" is the layout of ``resgeom analyze``."""
    t = tiny_results()
    return {"models": {"residual": {"alignment": _step(t["alignment"]), "spectrum": _step(t["spectrum"]),
                                    "collapse": _step(t["collapse"])},
                       "conv": {"alignment": _step(t["alignment_conv"]), "spectrum": _step(t["spectrum"]),
                                "collapse": _step(t["collapse"])},
                       "model": {"alignment": _step(t["alignment_conv"]), "spectrum": _step(t["spectrum"])}}}


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Spies on the analyses' plot_* (installed on their modules): (name, at, other keywords) per call."""
    seen: list[tuple[str, str, dict[str, Any]]] = []
    for mod_name, fn in PLOTS:
        mod = importlib.import_module(f"resgeom_fast.analysis.{mod_name}")
        real = getattr(mod, fn)

        def spy(result, ax=None, *args, _real=real, _fn=fn, **kw):
            seen.append((_fn, kw.get("at", ""), {k: v for k, v in kw.items() if k != "at"}))
            return _real(result, ax, *args, **kw)

        monkeypatch.setattr(mod, fn, spy)
    return seen


def _build(spec, results: dict[str, Any]) -> int:
    fig = spec.build(results)
    try:
        return check_figure(fig, results)
    finally:
        plt.close(fig)


def test_alignment_figures_call_the_alignment_plots(results, calls):
    models = ["residual", "conv"]
    specs = {s.name: s for s in alignment_figures(models, with_depth=False)}
    at = {m: f"models.{m}.alignment.result" for m in models}
    for name, fn in [("ra_trajectories", "plot_trajectories"), ("ra_singular_values", "plot_singular_values")]:
        calls.clear()
        assert _build(specs[name], results) >= len(models), name
        assert calls == [(fn, at[m], {}) for m in models], name
    calls.clear()
    n = _build(specs["ra_cross_alignment"], results)
    assert n == 2 * len(models)  # diag ratios (primitives) and one |A_ij| per model (plot_cross_alignment)
    first = {m: tuple(results["models"][m]["alignment"]["result"]["stages"][0]["ra2"]["cross_pairs"][0])
             for m in models}
    assert calls == [("plot_cross_alignment", at[m], {"pairs": [first[m]]}) for m in models]
    calls.clear()
    assert _build(specs["ra_sigma1_depth"], results) == len(models)  # overlays the models: primitives
    assert calls == []


def test_density_and_collapse_figures_call_their_plots(results, calls):
    models = ["residual", "conv"]
    assert _build(density_figure(models), results) >= len(models)
    assert calls == [("plot_density", f"models.{m}.spectrum.result", {}) for m in models]
    calls.clear()
    assert _build(collapse_figure(models), results) >= 4 * len(models)
    assert calls == [("plot_collapse", f"models.{m}.collapse.result", {}) for m in models]


def test_analyze_stage_figures_call_the_alignment_plots(results, calls):
    al = results["models"]["model"]["alignment"]
    base = "models.model.alignment.result"
    n_st = len(al["result"]["stages"])
    sv, sig = stage_figures(al)
    assert _build(sv, results) >= n_st
    assert calls == [("plot_singular_values", base, {"stage": s}) for s in range(n_st)]
    calls.clear()
    assert _build(sig, results) == n_st
    assert calls == [("plot_sigma1", base, {})]


def test_expansion_study_output_norms_panel(tmp_path, calls):
    """The tiny expansion study: its report draws the output-norm panel with plot_output_norms, and
    every figure of the report holds the numbers of results.json."""
    out = str(tmp_path / "expansion")
    rep = run_study("expansion", out=out, progress=False,
                    sets=["n_train=300", "width=8", "depth=2", "epochs=1", "norm_depths=2,4", "norm_width=16",
                          "path_samples=8", "gc_samples=8", "lams=0.2,0.1", "gc_lams=1,1/L,0.05",
                          "gc_seeds=1", "nf_depth=16"])
    assert [c[:2] for c in calls] == [("plot_output_norms", "output_norms")]
    res = json.load(open(rep.results_path))
    for spec in rep.specs:
        assert _build(spec, res) >= 1, spec.name
