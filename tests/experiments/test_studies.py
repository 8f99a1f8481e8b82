"""Every study of `resgeom run` at a tiny size: report files, figures equal to results.json,
and a re-run that loads every step instead of recomputing it."""
from __future__ import annotations

import json
import os

import pytest

from resgeom_fast.experiments.commands import run_study
from resgeom_fast.experiments.report import check_figure
from resgeom_fast.experiments.studies import STUDIES

NET = ["n_train=300", "width=8", "depth=2", "epochs=1"]
TINY = {
    "alignment": NET + ["align_samples=4", "depths=2,3", "k=3", "oversample=2", "power_iters=0"],
    "hessian": NET + ["hessian_samples=64", "eigs=2", "probes=2", "lanczos_steps=6", "trace_probes=3",
                      "archs=plain,residual,hyper"],
    "singularities": NET,
    "collapse": NET + ["collapse_every=1", "mufm_samples=100", "mufm_steps=5"],
    "expansion": NET + ["norm_depths=2,4", "norm_width=16", "path_samples=8", "gc_samples=8", "lams=0.2,0.1"],
    "leaky": ["n_train=100", "width=32", "depth=4", "leaks=1,2", "epochs=2", "batch_size=50"],
}


def test_every_study_has_a_tiny_setting():
    assert set(TINY) == set(STUDIES)


@pytest.mark.parametrize("study", list(TINY))
def test_study_runs_reports_and_resumes(tmp_path, study):
    import matplotlib.pyplot as plt

    out = str(tmp_path / study)
    rep = run_study(study, out=out, sets=TINY[study], progress=False)
    assert os.path.isfile(rep.report_path) and os.path.isfile(rep.results_path)
    assert len(rep.figures) == len(rep.specs) >= 2
    res = json.load(open(rep.results_path))
    assert res["study"] == study
    md = open(rep.report_path).read()
    for spec in rep.specs:
        assert os.path.isfile(os.path.join(out, "figures", f"{spec.name}.png"))
        assert f"(figures/{spec.name}.png)" in md
        fig = spec.build(res)
        assert check_figure(fig, res) >= 1, spec.name
        plt.close(fig)
    steps = os.path.join(out, "steps")
    before = {f: os.stat(os.path.join(steps, f)).st_mtime_ns for f in os.listdir(steps)}
    run_study(study, out=out, sets=TINY[study], progress=False)
    assert before == {f: os.stat(os.path.join(steps, f)).st_mtime_ns for f in os.listdir(steps)}
