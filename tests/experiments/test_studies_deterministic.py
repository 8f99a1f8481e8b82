"""`deterministic` (the --deterministic flag / `--set deterministic=true`) reaches every analysis
with timing-based choices, is stated in report.md and results.json, and makes two runs of the same
command give the same numbers."""
from __future__ import annotations

import importlib
import json
import os

import pytest

from resgeom_fast.cli import main
from resgeom_fast.experiments.commands import run_study

from tests.experiments.test_studies import TINY  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """(analysis, deterministic keyword) of every residual_alignment / hessian_spectrum call."""
    seen: list = []
    for mod, name in (("resgeom_fast.analysis.alignment", "residual_alignment"),
                      ("resgeom_fast.analysis.spectrum", "hessian_spectrum")):
        m = importlib.import_module(mod)
        real = getattr(m, name)

        def wrapped(*a, _real=real, _name=name, **k):
            seen.append((_name, k.get("deterministic", "not passed")))
            return _real(*a, **k)

        monkeypatch.setattr(m, name, wrapped)
    return seen


@pytest.mark.parametrize("flag", [True, False])
def test_flag_reaches_every_analysis_and_the_report(tmp_path, calls, flag):
    out = str(tmp_path / "a")
    rep = run_study("alignment", out=out, sets=TINY["alignment"] + [f"deterministic={str(flag).lower()}"],
                    progress=False)
    # residual, plain, and the depth scaling's nets at depths 2 and 3
    assert calls == [("residual_alignment", flag)] * 4
    md = open(rep.report_path).read()
    phrase = "methods fixed by --deterministic" if flag else "auto choices by timing"
    assert f"Determinism: {phrase}" in md
    assert json.load(open(rep.results_path))["determinism"]["deterministic"] is flag
    calls.clear()
    run_study("hessian", out=str(tmp_path / "h"), sets=TINY["hessian"], deterministic=flag, progress=False)
    assert calls == [("hessian_spectrum", flag)] * 3


def test_demo_flag(tmp_path, calls):
    out = str(tmp_path / "d")
    assert main(["demo", "--size", "tiny", "--deterministic", "--quiet", "--out", out]) == 0
    assert sorted(set(calls)) == [("hessian_spectrum", True), ("residual_alignment", True)]
    assert len(calls) == 2 + 2 + 2  # alignment and spectrum of both nets, alignment of the depth scaling's nets
    assert "Determinism: methods fixed by --deterministic" in open(os.path.join(out, "report.md")).read()


def test_two_deterministic_runs_give_the_same_numbers(tmp_path):
    sets = TINY["hessian"] + ["archs=residual", "deterministic=true"]
    a = run_study("hessian", out=str(tmp_path / "a"), sets=sets, progress=False)
    b = run_study("hessian", out=str(tmp_path / "b"), sets=sets, progress=False)
    ra, rb = (json.load(open(r.results_path))["models"]["residual"]["spectrum"] for r in (a, b))
    assert ra["summary"] == rb["summary"]
    assert ra["result"]["density"] == rb["result"]["density"]
    assert ra["result"]["eigenvalues"] == rb["result"]["eigenvalues"]


def test_alignment_study_uses_the_adaptive_randomized_svd_by_default(tmp_path, monkeypatch):
    m = importlib.import_module("resgeom_fast.analysis.alignment")
    real, seen = m.residual_alignment, []

    def wrapped(*a, **k):
        seen.append(k.get("power_iters", "not passed"))
        return real(*a, **k)

    monkeypatch.setattr(m, "residual_alignment", wrapped)
    sets = [s for s in TINY["alignment"] if not s.startswith("power_iters=")]
    rep = run_study("alignment", out=str(tmp_path / "a"), sets=sets, progress=False)
    assert seen == [None] * 4
    res = json.load(open(rep.results_path))
    assert res["config"]["power_iters"] is None
    assert res["models"]["residual"]["alignment"]["result"]["settings"]["power_iters"] == "auto"
