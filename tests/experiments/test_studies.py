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
    "expansion": NET + ["norm_depths=2,4", "norm_width=16", "path_samples=8", "gc_samples=8", "lams=0.2,0.1",
                  "gc_lams=1,1/L,0.05", "gc_seeds=1", "nf_depth=16"],
    "leaky": ["n=60", "width=32", "depth=6", "lts=1,2", "adam_steps=20", "continue_steps=10", "lbfgs_steps=5"],
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


# --------------------------------------------------------------------------- leaky: the continuation protocol
LEAKY_TINY = ["n=60", "width=32", "depth=6", "adam_steps=20", "continue_steps=10", "lbfgs_steps=5"]


def _mtimes(out):
    steps = os.path.join(out, "steps")
    return {f: os.stat(os.path.join(steps, f)).st_mtime_ns for f in os.listdir(steps)}


def test_leaky_study_is_the_continuation_protocol(tmp_path):
    """The study's stages equal a direct run of the protocol: Adam (cosine) from the default init at
    the first Lt, then with_leak + Adam at the next, each closed by L-BFGS; same losses, weights
    (checkpoint) and Hamiltonian."""
    import glob

    import torch


    from resgeom_fast.analysis.hamiltonian import hamiltonian
    from resgeom_fast.data import teacher
    from resgeom_fast.models import LeakyResNet

    out = str(tmp_path / "leaky")
    rep = run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1,3", "lam=0.01"], progress=False)
    res = json.load(open(rep.results_path))
    x, y = teacher((30, 3, 30), n=60, seed=0, dtype=torch.float64).tensors("train")

    def adam(m, steps, lr):
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            m.loss(x, y).backward()
            opt.step()
            sched.step()

    def lbfgs(m, iters):
        opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=iters, max_eval=iters + iters // 4,
                                tolerance_grad=1e-12, tolerance_change=0, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = m.loss(x, y)
            loss.backward()
            return loss

        opt.step(closure)

    m1 = LeakyResNet(30, 32, 6, 30, 1.0, lam=0.01, seed=0).double()
    adam(m1, 20, 5e-3)
    lbfgs(m1, 5)
    m3 = LeakyResNet(30, 32, 6, 30, 3.0, lam=0.01, seed=0).double()
    m3.load_state_dict(m1.state_dict())
    adam(m3, 10, 2e-3)
    lbfgs(m3, 5)
    assert list(res["models"]) == ["Lt_1", "Lt_3"]
    for name, m, init in (("Lt_1", m1, "default"), ("Lt_3", m3, "weights of Lt_1")):
        st = res["models"][name]
        assert st["train"]["init"] == init
        with torch.no_grad():
            assert st["train"]["final"]["loss"] == pytest.approx(float(m.loss(x, y)), rel=1e-9)
        trace = st["train"]["trace"]
        assert trace["adam_end"] == (20 if name == "Lt_1" else 10)
        assert trace["iteration"] == list(range(1, len(trace["loss"]) + 1))
        assert 5 < len(trace["loss"]) - trace["adam_end"] <= 5 + 5 // 4 + 1
        (ck,) = glob.glob(os.path.join(out, "checkpoints", f"{name}-*", "model.pt"))
        sd = torch.load(ck)
        for i, w in enumerate(m.weights):
            torch.testing.assert_close(sd[f"blocks.{i}.branch.weight"], w.detach(), rtol=1e-9, atol=1e-12)
        h = hamiltonian(m.eval(), x, y, 1e-3)
        assert st["hamiltonian"]["summary"]["k_star_middle"] == pytest.approx(h.summary()["k_star_middle"], rel=1e-6)
        with torch.no_grad():
            _, hs = m(x, return_hidden=True)
        c = st["hamiltonian"]["centred"]
        assert c["layers"] == h.middle
        for row, l in zip(c["singular_values"], c["layers"]):
            torch.testing.assert_close(torch.tensor(row, dtype=torch.float64),
                                       torch.linalg.svdvals(hs[l] - hs[l].mean(0)), rtol=1e-9, atol=1e-12)
    assert res["k_star_vs_leak"]["leaks"] == [1.0, 3.0]
    assert res["k_true"] == 3


def test_leaky_study_resumes_stage_by_stage(tmp_path):
    out = str(tmp_path / "leaky")
    run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1,2"], progress=False)
    first = _mtimes(out)
    assert set(first) == {"train_Lt_1.json", "train_Lt_2.json", "Lt_1_hamiltonian.json", "Lt_2_hamiltonian.json"}
    # a further Lt: the finished stages are loaded, only the new one is trained (from Lt_2's checkpoint)
    rep = run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1,2,3"], progress=False)
    second = _mtimes(out)
    assert {f: second[f] for f in first} == first
    assert set(second) - set(first) == {"train_Lt_3.json", "Lt_3_hamiltonian.json"}
    res = json.load(open(rep.results_path))
    assert res["models"]["Lt_3"]["train"]["init"] == "weights of Lt_2"
    # a new ridge only redoes the analyses; new continuation steps redo the later stages, not the first
    run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1,2,3", "gamma0=2e-3"], progress=False)
    third = _mtimes(out)
    assert all(third[f] == second[f] for f in second if f.startswith("train_"))
    assert all(third[f] != second[f] for f in second if f.endswith("_hamiltonian.json"))
    run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1,2,3", "gamma0=2e-3", "continue_steps=5"], progress=False)
    fourth = _mtimes(out)
    assert fourth["train_Lt_1.json"] == third["train_Lt_1.json"]
    assert fourth["train_Lt_2.json"] != third["train_Lt_2.json"]
    assert fourth["train_Lt_3.json"] != third["train_Lt_3.json"]


@pytest.mark.parametrize("lts, match", [("0,2", "every Lt > 0"), ("2,6", "rho_max"), ("2,2", "distinct")])
def test_leaky_study_rejects_bad_lts(tmp_path, lts, match):
    from resgeom_fast.experiments.config import UsageError

    with pytest.raises(UsageError, match=match):
        run_study("leaky", out=str(tmp_path / "x"), sets=LEAKY_TINY + [f"lts={lts}"], progress=False)


def test_leaky_study_moves_a_damaged_or_replaced_checkpoint_aside_and_retrains(tmp_path):
    import glob

    import torch

    out = str(tmp_path / "leaky")
    rep = run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1"], progress=False)
    want = json.load(open(rep.results_path))["models"]["Lt_1"]["train"]["final"]
    (ck,) = glob.glob(os.path.join(out, "checkpoints", "Lt_1-*", "model.pt"))
    with open(ck, "wb") as fh:  # damaged: not a torch file any more
        fh.write(b"not a checkpoint")
    rep = run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1"], progress=False)
    assert len(glob.glob(ck + ".corrupt-*")) == 1  # unreadable: kept for inspection, never deleted
    assert json.load(open(rep.results_path))["models"]["Lt_1"]["train"]["final"] == want  # retrained, same numbers
    # a valid but different file at the same path is not loaded either
    torch.save({k: v * 0 for k, v in torch.load(ck, weights_only=True).items()}, ck)
    rep = run_study("leaky", out=out, sets=LEAKY_TINY + ["lts=1"], progress=False)
    assert len(glob.glob(ck + ".changed-*")) == 1 and len(glob.glob(ck + ".corrupt-*")) == 1
    assert json.load(open(rep.results_path))["models"]["Lt_1"]["train"]["final"] == want
