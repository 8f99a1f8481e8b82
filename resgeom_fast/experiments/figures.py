"""Drawing primitives of the reports' figure builders, re-exported from
:mod:`resgeom_fast.analysis.plotting` (the one plotting path, shared with the analyses' ``plot_*``
helpers): every plotted number is read from the results dictionary by path and its artist is
tagged (:func:`tag`) so that :func:`check_figure` can compare it with the file.
"""
from __future__ import annotations

from resgeom_fast.analysis.plotting import (
    Series,
    bars,
    check_figure,
    get_path,
    heatmaps,
    lines,
    new_figure,
    pca_trajectories,
    spectra_per_block,
    tag,
)

__all__ = ["Series", "bars", "check_figure", "get_path", "heatmaps", "lines", "new_figure", "pca_trajectories",
           "spectra_per_block", "tag"]
