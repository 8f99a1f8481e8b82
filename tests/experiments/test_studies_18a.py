"""Issue 18, part A: collapse along training (study `collapse`), geometric complexity along
training per branch scale and deep normalisation-free training (study `expansion`).

The studies' numbers are checked against direct calls of the analyses on copies of the nets taken
by the trainer's callbacks at the same epochs (nets built and trained here without the study's
helpers); the readings are checked on constructed inputs whose verdict is known."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from resgeom_fast.analysis.collapse import collapse
from resgeom_fast.analysis.expansion import geometric_complexity
from resgeom_fast.experiments.commands import run_study
from resgeom_fast.experiments.common import load_data
from resgeom_fast.experiments.config import UsageError, parse_sets, resolve_config
from resgeom_fast.experiments.report import check_figure
from resgeom_fast.experiments.studies import STUDIES
from resgeom_fast.experiments.studies._readings import (
    collapse_training_reading,
    collapse_training_verdict,
    gc_lam_reading,
    nc1_decay_decades,
    nf_training_verdict,
    unimodality_verdict,
)
from resgeom_fast.experiments.studies.expansion import distinct_lams, gc_epochs, lam_value
from resgeom_fast.models import FCResNet
from resgeom_fast.train import train

NET = ["n_train=300", "width=8", "depth=2", "epochs=2", "lr=0.05"]
TRAIN = dict(lr=0.05, momentum=0.9, batch_size=64, seed=0, optimizer="sgd", weight_decay=0.0, schedule="constant",
             progress=False)


def _copies(epochs):
    """A callback that keeps a deep copy of the net after each of ``epochs``, and the dict it fills."""
    kept: dict[int, torch.nn.Module] = {}

    def keep(epoch, model, state):
        kept[epoch] = copy.deepcopy(model)

    return (list(epochs), keep), kept


def _figures_hold_their_numbers(rep, res, names):
    import matplotlib.pyplot as plt

    specs = {s.name: s for s in rep.specs}
    for name in names:
        assert os.path.isfile(os.path.join(rep.out, "figures", f"{name}.png")), name
        fig = specs[name].build(res)
        assert check_figure(fig, res) >= 2, name
        plt.close(fig)


# ------------------------------------------------------------------------------------ collapse
def test_collapse_along_training_equals_direct_collapse_at_each_epoch(tmp_path):
    rep = run_study("collapse", out=str(tmp_path / "c"), progress=False,
                    sets=NET + ["collapse_every=1", "track_epochs=0", "mufm_samples=50", "mufm_steps=3"])
    res = json.load(open(rep.results_path))
    along = res["models"]["residual"]["along_training"]
    assert along["epochs"] == [0, 1, 2] and along["not_measured"] == []
    _figures_hold_their_numbers(rep, res, ["collapse_along_training"])

    # the same net and training, built here: copies after epochs 1 and 2, and the initial net
    ds = load_data("digits", n_train=300, seed=0)
    model = FCResNet(64, 8, 2, 10, skip="identity", norm="batch", seed=0)
    nets = {0: copy.deepcopy(model)}
    cb, kept = _copies([1, 2])
    train(model, ds, 2, callbacks=[cb], **TRAIN)
    nets.update(kept)
    for i, ep in enumerate(along["epochs"]):
        direct = collapse(nets[ep], ds)
        rec = along["per_epoch"][i]
        for metric in ("nc1", "etf_error", "equinorm", "ncc_mismatch"):
            assert rec[metric] == pytest.approx(getattr(direct, metric), rel=1e-9, abs=1e-12), (ep, metric)
        assert along["nc1_by_layer"][i] == pytest.approx(direct.nc1, rel=1e-9)
        assert along["spearman_nc1"][i] == pytest.approx(direct.spearman["nc1"], abs=1e-12)
        assert along["nc1_decay_decades"][i] == pytest.approx(math.log10(direct.nc1[-1] / direct.nc1[0]), rel=1e-9)
    # the last tracked epoch is the trained net of the study's final collapse step
    assert along["nc1_by_layer"][-1] == pytest.approx(res["models"]["residual"]["collapse"]["result"]["nc1"],
                                                      rel=1e-9)
    md = open(rep.report_path).read()
    assert "NC1 per layer along training (digits (n_train 300), fc width 8, depth 2, norm batch" in md
    assert "Claim (NC1 decreases with depth, more strongly as training proceeds): " in md


def test_track_epochs_are_validated():
    opts = STUDIES["collapse"].options
    with pytest.raises(UsageError, match=r"track_epochs: expected epochs in \[0, epochs \(3\)\], got \[0, 4\]"):
        resolve_config(opts, study="collapse", sets=parse_sets(["epochs=3", "collapse_every=1", "track_epochs=0,4"]))
    cfg = resolve_config(opts, study="collapse", sets=parse_sets(["epochs=7", "collapse_every=3", "track_epochs=1"]))
    from resgeom_fast.experiments.studies.collapse import tracked_epochs

    assert tracked_epochs(cfg) == [1, 3, 6]


# ------------------------------------------------------------------------------------ expansion
def test_gc_along_training_and_deep_nf_training_equal_direct_calls(tmp_path):
    rep = run_study("expansion", out=str(tmp_path / "e"), progress=False,
                    sets=NET + ["norm_depths=2,4", "norm_width=16", "path_samples=8", "gc_samples=16",
                                "lams=0.2,0.1", "gc_lams=1,1/L,0.05,0.5", "gc_seeds=2", "gc_every=1",
                                "nf_depth=32"])
    res = json.load(open(rep.results_path))
    g = res["gc_training"]
    assert g["epochs"] == [0, 1, 2] and g["seeds"] == [0, 1] and g["norm"] == "none"
    assert [b["label"] for b in g["by_lam"]] == ["1", "1/L", "0.05"] and g["dropped_lams"] == ["0.5"]
    assert g["final"]["labels"] == ["0.05", "1/L", "1"] and g["final"]["lams"] == [0.05, 0.5, 1.0]
    _figures_hold_their_numbers(rep, res, ["gc_along_training", "nf_deep_training"])

    ds = load_data("digits", n_train=300, seed=0)
    x, y = ds.tensors("test")
    x, y = x[:16], y[:16]
    for b in g["by_lam"][1:]:  # 1/L and 0.05 (lam = 1 also runs in the study; two suffice here)
        per_seed = []
        for s in (0, 1):
            model = FCResNet(64, 8, 2, 10, skip="identity", norm="none", scale=b["label"] if "/" in b["label"]
                             else float(b["label"]), seed=s)
            nets = {0: copy.deepcopy(model)}
            cb, kept = _copies([1, 2])
            train(model, ds, 2, callbacks=[cb], **{**TRAIN, "seed": s})
            nets.update(kept)
            per_seed.append([geometric_complexity(nets[e], (x, y)) for e in (0, 1, 2)])
        for e in range(3):
            direct = [per_seed[s][e].gc for s in (0, 1)]
            assert b["gc"][e] == pytest.approx(direct, rel=1e-9)
            m = sum(direct) / 2
            assert b["gc_mean"][e] == pytest.approx(m, rel=1e-12)
            assert b["gc_se"][e] == pytest.approx(abs(direct[0] - direct[1]) / 2, rel=1e-9)  # std/sqrt(2), n = 2
            assert b["se_over"][e] == "2 seeds"
    assert g["final"]["gc_mean"][0] == g["by_lam"][2]["gc_mean"][-1]

    nf = res["nf_training"]
    hist = nf["train"]
    assert nf["depth"] == 32 and nf["scale"] == "1/L" and nf["lam"] == pytest.approx(1 / 32)
    model = FCResNet(64, 8, 32, 10, skip="identity", norm="none", scale="1/L", seed=0)
    out = train(model, ds, 2, **TRAIN)
    assert nf["train_acc"] == out.final["train_acc"] and nf["test_acc"] == out.final["test_acc"]
    assert hist["train_loss"] == pytest.approx([h["train_loss"] for h in out.history], rel=1e-12)
    assert nf["finite"] is True and nf["wall_s"] > 0
    md = open(rep.report_path).read()
    assert "Claim (GC unimodal in lam, an interior maximum): " in md
    assert "normalisation-free FCResNet, lam = 1/L (= 0.0312), no BatchNorm, depth 32" in md


def test_gc_options_are_validated_and_read():
    opts = STUDIES["expansion"].options
    with pytest.raises(UsageError, match=r"gc_lams: expected a comma list of 1, 1/sqrt\(L\), 1/L or numbers > 0, "
                                         r"got '-0.1'"):
        resolve_config(opts, study="expansion", sets=parse_sets(["gc_lams=1,-0.1,0.2"]))
    with pytest.raises(UsageError, match=r"gc_lams: expected at least three distinct branch scales at depth 2"):
        resolve_config(opts, study="expansion", sets=parse_sets(["depth=2", "gc_lams=1,1/L,0.5"]))
    assert distinct_lams(["1", "1/sqrt(L)", "1/L", "0.25", "0.5"], 4) == (["1", "1/sqrt(L)", "1/L"], ["0.25", "0.5"])
    assert distinct_lams(["0.25", "1/L", "1"], 4) == (["0.25", "1"], ["1/L"])
    assert lam_value("1/sqrt(L)", 16) == 0.25 and lam_value("0.3", 16) == 0.3
    assert gc_epochs({"epochs": 7, "gc_every": 3}) == [0, 3, 6, 7]


# ------------------------------------------------------------------------------------ readings
def test_unimodality_verdict_on_constructed_curves():
    xs = [0.01, 0.1, 0.3, 1.0]
    held, why = unimodality_verdict(xs, [1.0, 3.0, 5.0, 2.0], [0.1] * 4)
    assert held == "held" and "interior maximum at 0.3" in why
    assert unimodality_verdict(xs, [1.0, 3.0, 5.0, 2.0], [3.0] * 4)[0] == "not resolved"   # within the spread
    valley = unimodality_verdict(xs, [4.0, 1.0, 5.0, 2.0], [0.1] * 4)
    assert valley[0] == "not held" and "two modes" in valley[1]
    mono = unimodality_verdict(xs, [1.0, 2.0, 3.0, 4.0], [0.1] * 4)
    assert mono[0] == "not held" and "no interior maximum: GC is largest at the end 1," in mono[1]
    # a rise hidden in the spread: the fall alone does not decide; an end maximum within the spread neither
    assert unimodality_verdict(xs, [4.9, 4.8, 5.0, 2.0], [0.1] * 4)[0] == "not resolved"
    assert unimodality_verdict(xs, [1.0, 2.0, 3.9, 4.0], [0.1] * 4)[0] == "not resolved"
    # a valley within the spread does not count against an interior maximum
    assert unimodality_verdict(xs + [3.0], [1.0, 5.0, 4.9, 5.0, 1.0], [0.1] * 5)[0] == "held"
    assert unimodality_verdict(xs, [1.0, None, 5.0, None], [0.1] * 4) == (
        "not resolved", "fewer than three defined points (2)")
    assert unimodality_verdict(xs, [1.0, 3.0, 5.0, 2.0], [None] * 4)[0] == "not resolved"


def test_gc_lam_reading_states_values_spread_and_verdict():
    gc = {"final": {"labels": ["0.05", "1/L", "1"], "lams": [0.05, 0.125, 1.0], "gc_mean": [1.0, 9.0, 2.0],
                    "gc_se": [0.1, 0.2, 0.1], "diverged": [0, 0, 1], "spread": "the 3 seeds"}}
    text = gc_lam_reading(gc, "digits, depth 8")
    assert text.startswith("GC at the end of training against lam (digits, depth 8; +- one standard error over the "
                           "3 seeds): lam = 0.05 (0.05): 1 +- 0.1")
    assert "lam = 1 (1): 2 +- 0.1 [1 run(s) diverged, left out]" in text
    assert text.endswith("held (interior maximum at 0.125, above 0.05 and 1 by more than 2 standard errors, no "
                         "resolved second mode).")
    gc["final"]["gc_mean"][2] = None
    text = gc_lam_reading(gc, "digits, depth 8")
    assert "lam = 1 (1): n/a +- 0.1" in text
    assert text.endswith("not resolved (fewer than three defined points (2); lam = 1 left out: no run trained "
                         "(diverged), so the verdict covers only the branch scales that trained at this learning "
                         "rate).")


def test_collapse_training_verdict_on_constructed_trends():
    assert nc1_decay_decades([10.0, 1.0, 0.1]) == pytest.approx(-2.0)
    assert nc1_decay_decades([10.0, None]) is None and nc1_decay_decades([0.0, 1.0]) is None
    held = collapse_training_verdict([0, 5, 10], [-0.5, -0.95, -1.0], [-0.2, -1.0, -2.0])
    assert held[0] == "held" and "grew from -0.2 to -2 decades" in held[1]
    weak = collapse_training_verdict([0, 5, 10], [-0.5, -0.8, -0.85], [-0.2, -1.0, -2.0])
    assert weak[0] == "not held" and "not < -0.9" in weak[1]
    shrink = collapse_training_verdict([0, 5, 10], [-1.0, -1.0, -1.0], [-2.0, -1.0, -0.5])
    assert shrink[0] == "not held" and "did not grow" in shrink[1] and "rho(epoch, decades) = 1 is not < 0" in shrink[1]
    assert collapse_training_verdict([5], [-1.0], [-2.0])[0] == "not resolved"
    assert collapse_training_verdict([0, 5], [-1.0, None], [-1.0, None])[0] == "not resolved"
    text = collapse_training_reading({"epochs": [0, 5, 10], "spearman_nc1": [None, -0.95, -1.0],
                                      "spearman_nc1_reason": ["a metric is undefined", "", ""],
                                      "nc1_decay_decades": [None, -1.0, -2.0], "not_measured": [20]}, "cond")
    assert "epoch 0: n/a (a metric is undefined), epoch 5: -0.95, epoch 10: -1" in text
    assert "Claim (NC1 decreases with depth, more strongly as training proceeds): held (" in text
    assert "not measured at epochs [20]" in text


def test_nf_training_verdict_on_constructed_runs():
    ok = {"finite": True, "test_acc": 0.93, "num_classes": 10}
    assert nf_training_verdict(ok, 0.95)[0] == "held"
    assert nf_training_verdict({**ok, "test_acc": 0.8}, 0.95)[0] == "not held"
    assert nf_training_verdict({**ok, "finite": False}, 0.95) == ("not held",
                                                                  "the training loss became non-finite (diverged)")
    chance = nf_training_verdict({**ok, "test_acc": 0.15}, 0.12)
    assert chance[0] == "not held" and "twice chance" in chance[1]
    assert nf_training_verdict({**ok, "test_acc": None}, 0.9)[0] == "not resolved"
