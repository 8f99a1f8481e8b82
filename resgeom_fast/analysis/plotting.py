"""The one plotting path: figures drawn from a result's dict form (``Result.to_dict()``, or the
results.json a report wrote), every data-carrying artist tagged with where its numbers live.

Each drawing primitive takes the results dict and dot-separated paths into it (:func:`get_path`),
draws the numbers found there and tags the artist (:func:`tag`): ``"x=PATH;y=PATH"`` for a
Line2D, ``"z=PATH"`` for an image, ``"h=PATH"`` for a bar (``x=index`` / ``x=index1``: 0..n-1 /
1..n). :func:`check_figure` compares a tagged figure with the dict it was drawn from. The
analyses' ``plot_*`` helpers and the reports' figure builders (resgeom_fast.experiments) both
draw through these primitives, so every plotted number is a number of the result's dict.

matplotlib is an optional, heavy dependency: it is imported inside the functions that draw
(``pyplot``), never at import of this module (the analyses import it without matplotlib).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from resgeom_fast.core.checks import ArgumentTypeError, type_error

__all__ = [
    "Series", "as_result_dict", "band", "bars", "check_figure", "errorbars", "figure_axes", "get_path", "heatmaps",
    "join", "lines", "new_figure", "pca_trajectories", "point", "pyplot", "scatter_column", "spectra_per_block", "tag", "vlines",
]

Series = tuple[str, Optional[str], str]  # (label, x path or None / "index" / "index1", y path)


def pyplot() -> Any:
    """matplotlib.pyplot, imported lazily (an optional dependency; the Agg backend unless one is set)."""
    import matplotlib  # optional dependency: imported only when a figure is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# -- paths into the results dict -------------------------------------------------------------------
def get_path(results: Mapping[str, Any], path: str) -> Any:
    """``results["a"]["b"][3]`` for ``path = "a.b.3"``; a ``*`` maps the rest over a list
    (``"pca.0.*.1"`` is ``[row[1] for row in results["pca"][0]]``)."""
    return _walk(results, path.split("."))


def _walk(node: Any, parts: list[str]) -> Any:
    for i, part in enumerate(parts):
        if part == "*":
            return [_walk(item, parts[i + 1:]) for item in node]
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node[part]
    return node


def tag(artist: Any, **paths: str) -> Any:
    """Tag ``artist`` with where its data lives (``tag(line, x="index", y="a.b")``); returns it."""
    artist.set_gid(";".join(f"{k}={v}" for k, v in paths.items()))
    return artist


def join(prefix: str, path: str) -> str:
    """``prefix.path`` (just ``path`` when ``prefix`` is empty)."""
    return f"{prefix}.{path}" if prefix else path


def as_result_dict(where: str, result: Any, result_type: type, at: str = "", required: Sequence[str] = (),
                   type_name: Optional[str] = None) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """What a ``plot_*`` helper draws from: ``(root, prefix, d)``.

    ``result`` is a ``result_type`` instance (then ``root = d = result.to_dict()``, prefix "") or
    a dict: its ``to_dict()`` form, or a whole results dict in which that form sits at the path
    ``at`` (``root`` the whole dict, ``prefix = at``; the figure's tags then name paths of
    ``root``, so :func:`check_figure` can check the figure against results.json). A dict
    without the ``required`` keys is refused with TypeError naming ``type_name`` (default: the
    name of ``result_type``).
    """
    name = type_name or result_type.__name__
    art = "an" if name[0] in "AEIOU" else "a"
    if isinstance(result, result_type):
        d = result.to_dict()
        return d, "", d
    if isinstance(result, Mapping):
        try:
            d = get_path(result, at) if at else result
        except (KeyError, IndexError, ValueError, TypeError):
            raise ArgumentTypeError(f"{where}: expected result {art} {name} or its to_dict() form, got a dict without "
                            f"the path {at!r}") from None
        missing = [k for k in required if not isinstance(d, Mapping) or k not in d]
        if missing:
            raise ArgumentTypeError(f"{where}: expected result {art} {name} or its to_dict() form, got a dict without "
                            f"{missing}")
        return dict(result), at, dict(d)
    raise type_error(where, "result", f"{art} {name} or its to_dict() form", result)


def _arr(values: Any) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _positive(values: Sequence[float]) -> bool:
    """Whether a log axis can show anything (some finite value > 0)."""
    return any(math.isfinite(v) and v > 0 for v in values)


# -- figures and axes ------------------------------------------------------------------------------
def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.8) -> tuple[Any, list[Any]]:
    """A figure of ``nrows x ncols`` panels of ``width x height`` inches: ``(fig, [axes, row-major])``."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def figure_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``(figure, axes)`` of a plot helper: a new figure of ``figsize`` when ``ax`` is None, else
    ``ax`` and its figure."""
    if ax is None:
        return pyplot().subplots(figsize=figsize)
    return ax.figure, ax


# -- drawing primitives ----------------------------------------------------------------------------
def lines(ax: Any, results: dict, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
          logy: bool = False, logx: bool = False, marker: str = "o", styles: Optional[Sequence[dict]] = None,
          legend: bool = True) -> list[Any]:
    """One tagged line per (label, xpath, ypath); xpath None / "index" -> 0..n-1, "index1" -> 1..n.

    ``styles[i]``: keyword arguments of ``ax.plot`` for series i (colour, line style, label=None
    ...). None values (undefined numbers) are gaps. Returns the lines.
    """
    ys: list[float] = []
    xs: list[float] = []
    drawn = []
    for i, (label, xpath, ypath) in enumerate(series):
        y = _arr(get_path(results, ypath))
        ys += y
        if xpath in (None, "index"):
            x, xp = list(range(len(y))), "index"
        elif xpath == "index1":
            x, xp = list(range(1, len(y) + 1)), "index1"
        else:
            x, xp = _arr(get_path(results, xpath)), xpath
        kw: dict[str, Any] = dict(marker=marker, ms=3.5, label=label)
        if styles is not None:
            kw.update(styles[i])
        (ln,) = ax.plot(x, y, **kw)
        tag(ln, x=xp, y=ypath)
        drawn.append(ln)
        xs += list(x)
    if logy and _positive(ys):
        ax.set_yscale("log", nonpositive="mask")
    if logx and _positive(xs):
        ax.set_xscale("log", nonpositive="mask")
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if legend and any(s[0] for s in series):
        ax.legend(fontsize=7)
    return drawn


def point(ax: Any, results: dict, xpath: str, ypath: str, **style: Any) -> Any:
    """One tagged marker at the scalars (get_path(xpath), get_path(ypath)) (a list index may be
    negative: ``"layers.-1"``); returns the line."""
    x, y = get_path(results, xpath), get_path(results, ypath)
    kw: dict[str, Any] = dict(marker="o", ls="none")
    kw.update(style)
    (ln,) = ax.plot(_arr([x]), _arr([y]), **kw)
    return tag(ln, x=xpath, y=ypath)


def band(ax: Any, results: dict, xpath: str, ypath: str, errpath: str, **style: Any) -> Optional[Any]:
    """A filled band y +- err (no tag: a PolyCollection; the centre line is drawn by :func:`lines`).
    Nothing is drawn when some err value is undefined / not finite."""
    x, y, err = _arr(get_path(results, xpath)), _arr(get_path(results, ypath)), _arr(get_path(results, errpath))
    if not all(math.isfinite(e) for e in err):
        return None
    kw: dict[str, Any] = dict(alpha=0.25, lw=0)
    kw.update(style)
    return ax.fill_between(x, [a - e for a, e in zip(y, err)], [a + e for a, e in zip(y, err)], **kw)


def errorbars(ax: Any, results: dict, xpath: str, ypath: str, errpath: str, **style: Any) -> Any:
    """Error bars y +- err only (``fmt="none"``; untagged: the tagged line is drawn by :func:`lines`)."""
    x, y, err = _arr(get_path(results, xpath)), _arr(get_path(results, ypath)), _arr(get_path(results, errpath))
    kw: dict[str, Any] = dict(fmt="none", capsize=2)
    kw.update(style)
    return ax.errorbar(x, y, yerr=err, **kw)


def vlines(ax: Any, results: dict, path: str, *, label: Optional[str] = None, **style: Any) -> list[Any]:
    """A vertical line at every value of the list at ``path`` (red < 0, blue >= 0 unless ``color``
    is given; the first one carries ``label``). Untagged (their y data are axes fractions)."""
    out = []
    for i, v in enumerate(_arr(get_path(results, path))):
        kw: dict[str, Any] = dict(color="tab:red" if v < 0 else "tab:blue", ls="--", lw=0.8,
                                  label=label if i == 0 else None)
        kw.update(style)
        out.append(ax.axvline(v, **kw))
    return out


def scatter_column(ax: Any, results: dict, x: float, path: str, **style: Any) -> Any:
    """The values at ``path`` as points at abscissa ``x`` (red < 0, blue >= 0); a PathCollection
    (untagged: :func:`check_figure` reads lines, images and bars)."""
    ys = _arr(get_path(results, path))
    kw: dict[str, Any] = dict(c=["tab:red" if v < 0 else "tab:blue" for v in ys], s=14)
    kw.update(style)
    return ax.scatter([x] * len(ys), ys, **kw)


def pca_trajectories(ax: Any, results: dict, pca_path: str, labels_path: Optional[str], title: str,
                     cmap: str = "tab10") -> None:
    """2-D PCA trajectories [N, L+1, 2] at ``pca_path``, one tagged line per sample, class colours."""
    plt = pyplot()
    pca = get_path(results, pca_path)
    labels = get_path(results, labels_path) if labels_path else None
    colours = plt.get_cmap(cmap)
    for n in range(len(pca)):
        c = colours(int(labels[n]) % colours.N) if labels is not None else "C0"
        (ln,) = ax.plot(_arr(p[0] for p in pca[n]), _arr(p[1] for p in pca[n]), "-", color=c, lw=0.8, alpha=0.7)
        tag(ln, x=f"{pca_path}.{n}.*.0", y=f"{pca_path}.{n}.*.1")
        ax.plot([pca[n][0][0]], [pca[n][0][1]], "o", color=c, ms=2.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")


def spectra_per_block(ax: Any, results: dict, sv_path: str, title: str, num_classes: Optional[int] = None,
                      block_labels: Optional[Sequence[str]] = None) -> None:
    """Mean singular values [L, k] at ``sv_path``: one tagged line per block (log y); a dashed line
    at r = ``num_classes``. ``block_labels``: legend entry per block (default: "block l" for the
    first and last)."""
    plt = pyplot()
    sv = get_path(results, sv_path)
    cmap = plt.get_cmap("viridis")
    L = len(sv)
    for l in range(L):
        label = block_labels[l] if block_labels is not None else (f"block {l}" if l in (0, L - 1) else None)
        (ln,) = ax.plot(range(1, len(sv[l]) + 1), _arr(sv[l]), "-o", ms=2.5, color=cmap(l / max(1, L - 1)),
                        label=label)
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

    for ax, (title, path) in zip(axes, panels):
        z = np.array([_arr(row) for row in get_path(results, path)], dtype=float)
        im = ax.imshow(z, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        tag(im, z=path)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)


def bars(ax: Any, results: dict, groups: Sequence[str], metrics: Sequence[tuple[str, str]], *, title: str = "",
         ylabel: str = "", logy: bool = False, colors: Optional[Sequence[str]] = None,
         ticklabels: Optional[Sequence[str]] = None) -> None:
    """Grouped bars: for every group g (x position) and metric (label, path template with {g}),
    one tagged bar of height get_path(results, template.format(g=g)); a None / NaN value draws no
    bar and is marked "n/a". ``colors[j]``: colour of metric j (default C0, C1, ...);
    ``ticklabels``: x tick labels (default the groups)."""
    n = len(metrics)
    width = 0.8 / max(n, 1)
    heights: list[float] = []
    for j, (label, template) in enumerate(metrics):
        colour = colors[j] if colors is not None else f"C{j}"
        for i, g in enumerate(groups):
            path = template.format(g=g)
            v = get_path(results, path)
            h = math.nan if v is None else float(v)
            heights.append(h)
            x = i + (j - (n - 1) / 2) * width
            (rect,) = ax.bar([x], [h], width=width, color=colour, label=label if i == 0 else None)
            tag(rect, h=path)
            if math.isnan(h):  # an undefined value is marked, never drawn as a zero bar
                ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6, rotation=90, color=colour)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(ticklabels if ticklabels is not None else groups), fontsize=8)
    if logy and _positive(heights):
        ax.set_yscale("log", nonpositive="mask")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


# -- checking --------------------------------------------------------------------------------------
def _floats(values: Any) -> list[float]:

    arr = np.asarray([math.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))], dtype=float)
    return arr.tolist()


def _same(a: Sequence[float], b: Sequence[float], rtol: float = 1e-9) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if math.isnan(u) and math.isnan(v):
            continue
        if not math.isclose(u, v, rel_tol=rtol, abs_tol=1e-12):
            return False
    return True


def check_figure(fig: Any, results: Mapping[str, Any]) -> int:
    """Compare every tagged artist of ``fig`` with ``results``; returns how many were checked.

    Raises AssertionError naming the artist whose data differ from the dictionary.
    """

    checked = 0
    for ax in fig.axes:
        artists = list(ax.lines) + list(ax.images) + list(ax.patches)
        for art in artists:
            gid = art.get_gid()
            if not gid:
                continue
            paths = dict(part.split("=", 1) for part in gid.split(";"))
            if "y" in paths:
                xd, yd = _floats(art.get_xdata()), _floats(art.get_ydata())
                want_y = _floats(get_path(results, paths["y"]))
                assert _same(yd, want_y), f"{gid}: y data {yd[:5]}... differ from results {want_y[:5]}..."
                xp = paths.get("x", "index")
                if xp in ("index", "index1"):
                    want_x = [float(i + (xp == "index1")) for i in range(len(want_y))]
                else:
                    want_x = _floats(get_path(results, xp))
                assert _same(xd, want_x), f"{gid}: x data {xd[:5]}... differ from results {want_x[:5]}..."
            elif "z" in paths:
                z = np.ma.filled(np.ma.asarray(art.get_array()).astype(float), np.nan)
                want = _floats(get_path(results, paths["z"]))
                assert _same(_floats(z), want), f"{gid}: image data differ from results"
            elif "h" in paths:
                want_h = _floats([get_path(results, paths["h"])])[0]
                got = float(art.get_height())
                assert _same([got], [want_h]), f"{gid}: bar height {got} differs from results {want_h}"
            else:
                raise AssertionError(f"unknown tag {gid!r}")
            checked += 1
    return checked
