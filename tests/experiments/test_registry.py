"""The studies' registry: one module per study registers itself; the CLI and the commands read
the registry (no hard-coded list of studies)."""
from __future__ import annotations

import contextlib
import io

import pytest

from resgeom_fast.cli import build_parser, main
from resgeom_fast.experiments import commands, studies
from resgeom_fast.experiments.config import Option, UsageError
from resgeom_fast.experiments.studies import COMMANDS, STUDIES, Study, StudyOutput, get_study, register


def test_every_study_has_its_module_and_is_registered_in_order():
    assert list(STUDIES) == ["alignment", "hessian", "singularities", "collapse", "expansion", "leaky"]
    assert studies.STUDY_NAMES == tuple(STUDIES)
    for name, st in STUDIES.items():
        assert st.name == name
        assert st.run.__module__ == f"resgeom_fast.experiments.studies.{name}"
        assert getattr(studies, name).STUDY is st
    assert sorted(COMMANDS) == ["analyze", "demo"]
    assert {c.add_arguments.__module__ for c in COMMANDS.values()} == {
        "resgeom_fast.experiments.studies.analyze", "resgeom_fast.experiments.studies.demo"}


def test_get_study_and_register_refuse_bad_input():
    assert get_study("hessian") is STUDIES["hessian"]
    with pytest.raises(UsageError, match=r"unknown study 'nope'; allowed: alignment, hessian, singularities"):
        get_study("nope")
    with pytest.raises(TypeError, match="register: expected study a Study, got str"):
        register("alignment")
    with pytest.raises(ValueError, match=r"register: expected study a new name, got 'alignment' \(already"):
        register(Study("alignment", "t", "e", [], lambda runner, cfg: None))
    with pytest.raises(ValueError, match=r"got 'demo' \(already registered\)"):
        register(Study("demo", "t", "e", [], lambda runner, cfg: None))


def test_old_names_stay_importable():
    from resgeom_fast.experiments.commands import _analyze_steps, _stage_figures, check_out, ratio_table  # noqa: F401
    from resgeom_fast.experiments.studies import (  # noqa: F401
        DEMO_SIZES, DataInfo, _align_figures, _collapse_figure, _contrast_z, _degeneracy_order_reading,
        _density_figure, _fig_training, _leaky_adam, _paths_figure, _per_model, _singularity_figure,
        alignment_stage_reading, data_info, demo_config, validate_alignment, validate_collapse, validate_demo,
        validate_expansion, validate_hessian, validate_leaky, validate_singularities,
    )

    assert _density_figure is studies.density_figure and _stage_figures is studies.stage_figures


@pytest.fixture
def toy_study(monkeypatch):
    """A registered study that trains nothing (removed again after the test)."""
    def run(runner, cfg):
        return StudyOutput(results={"study": "toy", "value": cfg["value"]}, figures=[], intro="A toy.")

    st = Study("toy", "a toy study", "nothing", [Option("value", "int", 3, "a number", minimum=0)], run)
    monkeypatch.setitem(STUDIES, "toy", st)
    return st


def test_the_cli_and_the_commands_read_the_registry(toy_study, tmp_path, capsys):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert "one of: alignment, hessian, singularities, collapse, expansion, leaky, toy" in " ".join(buf.getvalue().split())
    assert commands.describe_options("toy").splitlines()[0] == "toy: a toy study"
    out = str(tmp_path / "toy")
    assert main(["run", "toy", "--set", "value=5", "--out", out, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}/report.md"
    assert "Expected (docs/science.md): nothing." in open(f"{out}/report.md").read()
