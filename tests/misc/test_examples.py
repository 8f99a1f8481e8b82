"""The examples stay current: each runs on a small size and its printed numbers match ground truth."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_spectral_demo_runs_and_matches_dense_eigh(tmp_path, monkeypatch):
    out = tmp_path / "spectral"
    monkeypatch.setattr(sys, "argv", ["spectral_demo.py", "--out", str(out), "--dim", "200"])
    runpy.run_path(str(EXAMPLES / "spectral_demo.py"), run_name="__main__")
    results = json.loads((out / "results.json").read_text())
    assert (out / "density.png").stat().st_size > 0
    assert [r["name"] for r in results] == ["digits feature covariance", "Wishart G G^T / d"]
    for r in results:
        # eigsh(which="both", k=4): the two smallest and two largest, against dense float64 eigvalsh
        assert r["eigsh_both"] == pytest.approx(r["exact_extremes"], abs=1e-6 * max(map(abs, r["exact_extremes"])))
        # Hutch++ within 4 of its own standard errors of the exact trace
        assert abs(r["trace_hutchpp"] - r["trace_exact"]) <= 4 * r["trace_stderr"] + 1e-9
        # SLQ's zeroth moment (quadrature weights summed, scaled to the dimension) is exact
        assert r["slq_moments"][0] == pytest.approx(r["dim"], rel=1e-9)
        assert r["exact_moments"][0] == r["dim"]
