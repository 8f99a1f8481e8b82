"""`resgeom demo --size tiny`: interrupted (Ctrl-C inside a step), resumed, every promised file,
and every plotted number equal to results.json."""
from __future__ import annotations

import json
import os

import pytest

from resgeom_fast.cli import main
from resgeom_fast.experiments.report import check_figure, get_path

FIGURES = ["ra_trajectories", "ra_singular_values", "ra_cross_alignment", "ra_sigma1_depth", "hessian_density",
           "collapse_depth", "singularities", "path_orders", "training"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the tiny demo, interrupted by a KeyboardInterrupt inside the residual net's collapse
    step, then again to completion; returns (out, state before the resume, train calls of the resume)."""
    import importlib

    col = importlib.import_module("resgeom_fast.analysis.collapse")  # the module (the package exports a function)
    rtrain = importlib.import_module("resgeom_fast.train")

    out = str(tmp_path_factory.mktemp("demo") / "report")
    real_collapse, real_train = col.collapse, rtrain.train

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    trains: list = []
    first: list = []

    def counting(into):
        def counting_train(*a, **k):
            into.append(k.get("checkpoint_dir"))
            return real_train(*a, **k)

        return counting_train

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(col, "collapse", interrupt)
        mp.setattr(rtrain, "train", counting(first))
        code = main(["demo", "--size", "tiny", "--out", out, "--quiet"])
        assert code == 130
        steps = os.path.join(out, "steps")
        before = {f: (os.stat(os.path.join(steps, f)).st_mtime_ns, open(os.path.join(steps, f)).read())
                  for f in os.listdir(steps)}
        mp.setattr(col, "collapse", real_collapse)
        mp.setattr(rtrain, "train", counting(trains))
        assert main(["demo", "--size", "tiny", "--out", out, "--quiet"]) == 0
    finally:
        mp.undo()
    return out, before, trains, first


def test_interrupted_demo_resumes_without_recomputing(demo):
    out, before, trains, _ = demo
    assert set(before) == {"train_residual.json", "residual_alignment.json", "residual_spectrum.json",
                           "residual_singularities.json"}
    for name, (mtime, text) in before.items():
        path = os.path.join(out, "steps", name)
        assert os.stat(path).st_mtime_ns == mtime and open(path).read() == text, name
    # the resumed run trained only the nets that had not been trained: plain and the depth-2 net of
    # the depth scaling (its depth-3 net is the residual net, trained before the interruption)
    assert sorted(os.path.basename(t).split("-")[0] for t in trains) == ["plain", "residual_L2"]
    assert not [f for f in os.listdir(os.path.join(out, "steps")) if "tmp" in f]


def test_demo_trains_each_distinct_configuration_once(demo):
    """The tiny demo's depth scaling (depths 2, 3) contains the residual net itself (depth 3): one
    training and one checkpoint serve both, and RA4 at depth 3 is the residual net's own sigma_1."""
    out, _, trains, first = demo
    runs = [os.path.basename(t) for t in first + trains]
    assert len(runs) == len(set(runs)) == 3  # residual (L = 3), plain, residual_L2
    hashes = [r.rsplit("-", 1)[1] for r in runs]
    assert len(set(hashes)) == 3  # three distinct training configurations
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == sorted(runs)
    res = json.load(open(os.path.join(out, "results.json")))
    per = {d["depth"]: d for d in res["depth_scaling"]["per_depth"]}
    assert sorted(per) == [2, 3]
    # the depth-3 net of RA4 is the residual net: same weights, same inputs, same sketches
    assert per[3]["sigma1_mean"] == res["models"]["residual"]["alignment"]["result"]["stages"][0]["ra4"]["sigma1_mean"]


def test_demo_writes_every_promised_file(demo):
    out = demo[0]
    for f in ["results.json", "report.md", "manifest.json"] + [f"figures/{n}.png" for n in FIGURES]:
        assert os.path.isfile(os.path.join(out, f)), f
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    md = open(os.path.join(out, "report.md")).read()
    for n in FIGURES:
        assert f"(figures/{n}.png)" in md
    assert md.count("Reading: ") == len(FIGURES)
    res = json.load(open(os.path.join(out, "results.json")))
    for model in ("residual", "plain"):
        for analysis in ("alignment", "spectrum", "singularities", "collapse", "paths", "gc"):
            entry = res["models"][model][analysis]
            assert set(entry) == {"result", "summary"}
            assert entry["summary"], (model, analysis)
    assert res["depth_scaling"]["scaling"]["depths"] == [2, 3]


def test_figures_plot_exactly_the_results_json_numbers(demo):
    from resgeom_fast.experiments import studies

    out = demo[0]
    res = json.load(open(os.path.join(out, "results.json")))
    names = ["residual", "plain"]
    specs = studies._align_figures(names) + [studies._density_figure(names), studies._collapse_figure(names),
                                            studies._singularity_figure(names), studies._paths_figure(names),
                                            studies._fig_training(names)]
    assert [s.name for s in specs] == FIGURES
    import matplotlib.pyplot as plt

    for spec in specs:
        fig = spec.build(res)
        assert check_figure(fig, res) >= 1, spec.name
        plt.close(fig)

    # spot checks that do not rely on the tags
    fig = specs[3].build(res)
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == get_path(res, "models.residual.alignment.result.stages.0.ra4.sigma1_mean")
    ax = fig.axes[1]
    assert list(ax.lines[0].get_ydata()) == res["depth_scaling"]["scaling"]["products"]
    plt.close(fig)
    fig = specs[2].build(res)
    img = fig.axes[0].images[0].get_array()
    assert img.tolist() == get_path(res, "models.residual.alignment.result.stages.0.ra2.diag_ratio_mean")
    plt.close(fig)
    fig = specs[4].build(res)
    assert list(fig.axes[0].lines[0].get_ydata()) == res["models"]["residual"]["spectrum"]["result"]["density"]
    plt.close(fig)


def test_check_figure_catches_a_mismatch(demo):
    out = demo[0]
    res = json.load(open(os.path.join(out, "results.json")))
    from resgeom_fast.experiments import studies

    fig = studies._collapse_figure(["residual", "plain"]).build(res)
    res["models"]["residual"]["collapse"]["result"]["nc1"][0] *= 1.5
    with pytest.raises(AssertionError, match="nc1"):
        check_figure(fig, res)
