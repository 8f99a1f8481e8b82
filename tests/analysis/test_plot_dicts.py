"""The one plotting path: every analysis ``plot_*`` draws from the result's dict form through
resgeom_fast.analysis.plotting, so it accepts the result, its ``to_dict()`` or a whole results
dict (``at=`` path), and every tagged artist holds exactly the numbers of that dict
(:func:`resgeom_fast.analysis.plotting.check_figure`)."""
from __future__ import annotations

import json

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from resgeom_fast import analysis  # noqa: E402
from resgeom_fast.analysis import plotting  # noqa: E402
from resgeom_fast.experiments import figures  # noqa: E402

from ._tiny_results import tiny_results  # noqa: E402

PLOTS = [
    ("plot_trajectories", "alignment", 12), ("plot_singular_values", "alignment", 3),
    ("plot_cross_alignment", "alignment", 4), ("plot_sigma1", "alignment", 1),
    ("plot_trajectories", "alignment_one_block", 12), ("plot_cross_alignment", "alignment_conv", 4),
    ("plot_collapse", "collapse", 5), ("plot_mufm", "mufm", 5), ("plot_singularities", "singularities", 9),
    ("plot_hamiltonian", "hamiltonian", 7), ("plot_layer_spectra", "hamiltonian", 5),
    ("plot_path_orders", "path_expansion", 1), ("plot_density", "spectrum", 1), ("plot_eigenvalues", "spectrum", 0),
]


def _data(fig) -> list:
    out = []
    for ax in fig.axes:
        out += [(ln.get_gid(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines]
        out += [(im.get_gid(), im.get_array().tolist()) for im in ax.images]
        out += [(p.get_gid(), p.get_height()) for p in ax.patches]
    return out


@pytest.mark.parametrize("fn,name,tagged", PLOTS, ids=[f"{f}-{n}" for f, n, _ in PLOTS])
def test_plot_from_result_dict_and_results_path(fn: str, name: str, tagged: int) -> None:
    plot = getattr(analysis, fn)
    r = tiny_results()[name]
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # what results.json holds
    f_obj, f_dict = plot(r), plot(d)
    assert plotting.check_figure(f_obj, d) == tagged and plotting.check_figure(f_dict, d) == tagged
    root = {"models": {"net": {"result": d}}}
    f_root = plot(root, at="models.net.result")
    assert plotting.check_figure(f_root, root) == tagged
    assert [x[1:] for x in _data(f_obj)] == [x[1:] for x in _data(f_dict)] == [x[1:] for x in _data(f_root)]
    gids = [x[0] for x in _data(f_root) if x[0]]
    assert all("models.net.result." in g or "index" in g for g in gids)
    plt.close("all")


def test_output_norms_and_density_blocks() -> None:
    d = json.loads(json.dumps(analysis.output_norm_vs_depth([1, 2], width=8, in_dim=8)))
    assert plotting.check_figure(analysis.plot_output_norms(d), d) == len(d["scales"])
    assert plotting.check_figure(analysis.plot_output_norms({"o": d}, at="o"), {"o": d}) == len(d["scales"])
    sp = tiny_results()["spectrum"]
    sd = sp.to_dict()
    for block in (1, -1, sp.blocks[0].name):
        fig = analysis.plot_density(sp, block=block)
        assert fig.axes[0].lines[0].get_gid().startswith("x=blocks.")
        assert plotting.check_figure(fig, sd) == 1
        assert plotting.check_figure(analysis.plot_density(sd, block=block), sd) == 1
    with pytest.raises(ValueError, match=r"plot_density: block: expected an index in \[0, 2\], got 3"):
        analysis.plot_density(sd, block=3)
    with pytest.raises(ValueError, match="plot_density: block: no block named 'x'"):
        analysis.plot_density(sp, block="x")
    with pytest.raises(TypeError, match="plot_density: block: expected an int index or a block name"):
        analysis.plot_density(sp, block=1.0)
    with pytest.raises(ValueError, match="needs a SpectrumResult with per-block spectra"):
        analysis.plot_density(sp.blocks[0], block=0)
    plt.close("all")


@pytest.mark.parametrize("fn,type_name", [("plot_collapse", "CollapseResult"), ("plot_sigma1", "AlignmentResult"),
                                          ("plot_density", "SpectrumResult"), ("plot_hamiltonian", "HamiltonianResult")])
def test_wrong_result_refused(fn: str, type_name: str) -> None:
    plot = getattr(analysis, fn)
    with pytest.raises(TypeError, match=f"{fn}: expected result an? {type_name} or its to_dict"):
        plot(3)
    with pytest.raises(TypeError, match=type_name):
        plot({"x": 1})
    with pytest.raises(TypeError, match="without the path 'a.b'"):
        plot({"a": {}}, at="a.b")


def test_experiments_figures_reexports_the_primitives() -> None:
    for name in ("bars", "heatmaps", "lines", "new_figure", "pca_trajectories", "spectra_per_block", "tag",
                 "get_path", "check_figure"):
        assert getattr(figures, name) is getattr(plotting, name)
