"""report.py: the figure bar is the package's progress helper (plain lines in a non-TTY, no
carriage returns), fmt prints undefined values as n/a, and the report states the determinism."""
from __future__ import annotations

import json
import math
import os

import pytest

from resgeom_fast.experiments.report import FigureSpec, check_figure, fmt, tag, write_report


def _specs(n: int) -> list[FigureSpec]:
    def build(r):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        (ln,) = ax.plot(r["x"], r["y"])
        tag(ln, x="x", y="y")
        return fig

    return [FigureSpec(f"f{i}", f"figure {i}", build, lambda r: f"y ends at {fmt(r['y'][-1])}") for i in range(n)]


def test_figure_bar_prints_plain_lines_when_not_a_tty(tmp_path, capsys):
    rep = write_report(str(tmp_path / "r"), "t", {"x": [0, 1], "y": [1.0, 2.0]}, _specs(3), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("[figures] ") for ln in lines), err
    assert lines[-1].startswith("[figures] 3/3 figures (100%)")
    assert len(rep.figures) == 3
    # quiet: nothing at all
    write_report(str(tmp_path / "q"), "t", {"x": [0, 1], "y": [1.0, 2.0]}, _specs(2), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, text", [(None, "n/a"), (math.nan, "n/a"), (0.5, "0.5"), (0, "0"),
                                         (12345.0, "1.23e+04"), ("n/a (no data)", "n/a (no data)")])
def test_fmt(value, text):
    assert fmt(value) == text


@pytest.mark.parametrize("flag, phrase", [
    (True, "Determinism: methods fixed by --deterministic (the analyses with timing-based 'auto' choices, "
           "hessian_spectrum, residual_alignment, use a fixed method)"),
    (False, "Determinism: auto choices by timing (hessian_spectrum, residual_alignment pick their fastest method on "
            "this machine): float32 round-off may differ between runs; use --deterministic to fix the methods."),
])
def test_report_states_the_determinism(tmp_path, flag, phrase):
    rep = write_report(str(tmp_path / "r"), "t", {"x": [0, 1], "y": [1.0, 2.0]}, _specs(1),
                       config={"deterministic": flag, "seed": 0})
    md = open(rep.report_path).read()
    assert phrase in md
    res = json.load(open(rep.results_path))
    assert res["determinism"]["deterministic"] is flag
    assert res["determinism"]["fixed_analyses"] == (["hessian_spectrum", "residual_alignment"] if flag else [])
    import matplotlib.pyplot as plt

    fig = rep.specs[0].build(res)
    assert check_figure(fig, res) == 1
    plt.close(fig)
    # no flag in the configuration (a caller outside the studies): nothing claimed
    rep = write_report(str(tmp_path / "n"), "t", {"x": [0, 1], "y": [1.0, 2.0]}, _specs(1), config={"seed": 0})
    assert "Determinism" not in open(rep.report_path).read()
    assert "determinism" not in json.load(open(rep.results_path))
    assert os.path.isfile(os.path.join(str(tmp_path / "n"), "figures", "f0.png"))
