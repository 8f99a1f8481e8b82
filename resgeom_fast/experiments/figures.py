"""Figure builders of the reports: every plotted number is read from the results dictionary.

Each builder takes the results dict (as loaded from results.json) and the paths of the numbers
it plots, draws them and tags the artists (:func:`resgeom_fast.experiments.report.tag`) so that
:func:`resgeom_fast.experiments.report.check_figure` can compare them with the file.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .report import get_path, tag

__all__ = ["bars", "heatmaps", "lines", "new_figure", "pca_trajectories", "spectra_per_block"]

Series = tuple[str, Optional[str], str]  # (label, x path or None / "index" / "index1", y path)


def _arr(values: Any) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _positive(values: Sequence[float]) -> bool:
    """Whether a log axis can show anything (some finite value > 0)."""
    return any(math.isfinite(v) and v > 0 for v in values)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def lines(ax: Any, results: dict, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
          logy: bool = False, logx: bool = False, marker: str = "o", styles: Optional[Sequence[dict]] = None) -> None:
    """One tagged line per (label, xpath, ypath); xpath None / "index" -> 0..n-1, "index1" -> 1..n."""
    ys: list[float] = []
    xs: list[float] = []
    for i, (label, xpath, ypath) in enumerate(series):
        y = _arr(get_path(results, ypath))
        ys += y
        if xpath in (None, "index"):
            x, xp = list(range(len(y))), "index"
        elif xpath == "index1":
            x, xp = list(range(1, len(y) + 1)), "index1"
        else:
            x, xp = _arr(get_path(results, xpath)), xpath
        kw = dict(marker=marker, ms=3.5, label=label)
        if styles is not None:
            kw.update(styles[i])
        (ln,) = ax.plot(x, y, **kw)
        tag(ln, x=xp, y=ypath)
        xs += list(x)
    if logy and _positive(ys):
        ax.set_yscale("log", nonpositive="mask")
    if logx and _positive(xs):
        ax.set_xscale("log", nonpositive="mask")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if any(s[0] for s in series):
        ax.legend(fontsize=7)


def pca_trajectories(ax: Any, results: dict, pca_path: str, labels_path: Optional[str], title: str) -> None:
    """2-D PCA trajectories [N, L+1, 2] at ``pca_path``, one tagged line per sample, class colours."""
    import matplotlib.pyplot as plt

    pca = get_path(results, pca_path)
    labels = get_path(results, labels_path) if labels_path else None
    cmap = plt.get_cmap("tab10")
    for n in range(len(pca)):
        c = cmap(int(labels[n]) % 10) if labels is not None else "C0"
        (ln,) = ax.plot(_arr(p[0] for p in pca[n]), _arr(p[1] for p in pca[n]), "-", color=c, lw=0.8, alpha=0.7)
        tag(ln, x=f"{pca_path}.{n}.*.0", y=f"{pca_path}.{n}.*.1")
        ax.plot([pca[n][0][0]], [pca[n][0][1]], "o", color=c, ms=2.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")


def spectra_per_block(ax: Any, results: dict, sv_path: str, title: str, num_classes: Optional[int] = None) -> None:
    """Mean singular values [L, k] at ``sv_path``: one tagged line per block (log y)."""
    import matplotlib.pyplot as plt

    sv = get_path(results, sv_path)
    cmap = plt.get_cmap("viridis")
    L = len(sv)
    for l in range(L):
        (ln,) = ax.plot(range(1, len(sv[l]) + 1), _arr(sv[l]), "-o", ms=2.5, color=cmap(l / max(1, L - 1)),
                        label=f"block {l}" if l in (0, L - 1) else None)
        tag(ln, x="index1", y=f"{sv_path}.{l}")
    if num_classes is not None:
        ax.axvline(num_classes, ls="--", color="gray", lw=0.8)
    if _positive([v for row in sv for v in _arr(row)]):
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("r")
    ax.set_ylabel("sigma_r(J_l), mean over samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def heatmaps(axes: Sequence[Any], results: dict, panels: Sequence[tuple[str, str]], fig: Any,
             cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None) -> None:
    """One tagged image per (title, matrix path)."""
    import numpy as np

    for ax, (title, path) in zip(axes, panels):
        z = np.array([_arr(row) for row in get_path(results, path)], dtype=float)
        im = ax.imshow(z, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        tag(im, z=path)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)


def bars(ax: Any, results: dict, groups: Sequence[str], metrics: Sequence[tuple[str, str]], *, title: str = "",
         ylabel: str = "", logy: bool = False) -> None:
    """Grouped bars: for every group g (x position) and metric (label, path template with {g}),
    one tagged bar of height get_path(results, template.format(g=g)); a None / NaN value draws no
    bar and is marked "n/a"."""
    n = len(metrics)
    width = 0.8 / max(n, 1)
    heights: list[float] = []
    for j, (label, template) in enumerate(metrics):
        for i, g in enumerate(groups):
            path = template.format(g=g)
            v = get_path(results, path)
            h = math.nan if v is None else float(v)
            heights.append(h)
            x = i + (j - (n - 1) / 2) * width
            (rect,) = ax.bar([x], [h], width=width, color=f"C{j}", label=label if i == 0 else None)
            tag(rect, h=path)
            if math.isnan(h):  # an undefined value is marked, never drawn as a zero bar
                ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6, rotation=90, color=f"C{j}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), fontsize=8)
    if logy and _positive(heights):
        ax.set_yscale("log", nonpositive="mask")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
