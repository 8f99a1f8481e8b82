"""Issue 18, part C: Leaky ResNets' adaptive against equidistant steps (study `leaky`,
``compare_teachers``), dead units (study `singularities`) and near-zero Hessian mass (study
`hessian`) over seeds under both normalisation settings (``seeds``).

Each option runs at a tiny size and writes its figure (whose plotted numbers are results.json's)
and reading; the per-seed numbers are compared with direct calls of the analyses on the study's
own checkpointed nets; the readings are checked on constructed inputs."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from resgeom_fast.analysis.singularities import singularities
from resgeom_fast.analysis.spectrum import hessian_spectrum
from resgeom_fast.data import teacher
from resgeom_fast.experiments.commands import run_study
from resgeom_fast.experiments.common import build_model, load_data
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.report import check_figure
from resgeom_fast.experiments.studies._readings import leaky_steps_reading, seed_order_reading
from resgeom_fast.experiments.output import open_runner
from resgeom_fast.experiments.studies._shared import net_spec, study_data
from resgeom_fast.experiments.studies.hessian import seed_grid
from resgeom_fast.experiments.studies.leaky import _cap_steps, end_step_ratio, parse_teachers
from resgeom_fast.experiments.studies.singularities import STUDY as SINGULARITIES
from resgeom_fast.models import LeakyResNet
from resgeom_fast.train import load_checkpoint

NET = ["n_train=300", "width=8", "depth=2", "epochs=1"]
LEAKY = ["n=60", "width=32", "depth=8", "lts=1,2", "adam_steps=20", "continue_steps=10", "lbfgs_steps=5",
         "compare_teachers=30-3-30,30-6-3-30", "adapt_every=5"]


def _check_spec(rep, res, name: str, min_values: int) -> str:
    import matplotlib.pyplot as plt

    assert os.path.isfile(os.path.join(rep.out, "figures", f"{name}.png"))
    spec = {s.name: s for s in rep.specs}[name]
    fig = spec.build(res)
    assert check_figure(fig, res) == min_values  # tagged artists, each checked against results.json
    plt.close(fig)
    reading = spec.reading(res)
    assert reading in open(rep.report_path).read()
    return reading


# ------------------------------------------------------------------------------ leaky: adaptive vs equidistant
@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("h9") / "leaky")
    rep = run_study("leaky", out=out, sets=LEAKY, progress=False)
    return rep, json.load(open(rep.results_path))


def test_leaky_comparison_writes_figure_numbers_and_reading(leaky_run):
    rep, res = leaky_run
    cmp = res["step_comparison"]
    assert cmp["teachers"] == ["t30_3_30", "t30_6_3_30"] and cmp["lt"] == 2.0
    for t in cmp["teachers"]:
        eq, ad = cmp[t]["equidistant"], cmp[t]["adaptive"]
        assert eq["rho"] == pytest.approx([1 / 8] * 8, abs=1e-12)
        assert eq["end_step_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert sum(ad["rho"]) == pytest.approx(1.0, abs=1e-9) and max(ad["rho"]) * 2 <= 0.95 + 1e-9
        assert ad["rho"] != pytest.approx(eq["rho"])  # the adaptive updates ran
        assert ad["position"][-1] == pytest.approx(1.0, abs=1e-9)
        assert ad["capped_layers"] == sum(v * 2 >= 0.95 - 1e-9 for v in ad["rho"]) and eq["capped_layers"] == 0
    reading = _check_spec(rep, res, "leaky_adaptive_steps", 4 + 4)  # 4 step lines, 4 loss bars
    assert "teacher 30-3-30" in reading and "teacher 30-6-3-30" in reading and "no seed spread" in reading


def test_leaky_comparison_numbers_equal_direct_evaluation(leaky_run):
    rep, res = leaky_run
    cmp = res["step_comparison"]
    for t, dims in (("t30_3_30", (30, 3, 30)), ("t30_6_3_30", (30, 6, 3, 30))):
        ds = teacher(dims, n=60, seed=0, dtype=torch.float64)
        xt, yt = ds.tensors("test")
        for scheme in ("equidistant", "adaptive"):
            (ck,) = glob.glob(os.path.join(rep.out, "checkpoints", f"cmp_{t}_{scheme}_Lt_2-*", "model.pt"))
            m = LeakyResNet(30, 32, 8, 30, 2.0, scheme, lam=5e-3).double()
            m.load_state_dict(torch.load(ck, weights_only=True))
            got = cmp[t][scheme]
            assert got["rho"] == pytest.approx(m.rho.double().tolist(), abs=0, rel=1e-15)
            assert got["end_step_ratio"] == pytest.approx(end_step_ratio(m.rho.double().tolist()), rel=1e-12)
            with torch.no_grad():
                assert got["test_data_loss"] == pytest.approx(float(m.data_loss(m(xt), yt)), rel=1e-12)


def test_leaky_helpers_on_constructed_inputs():
    assert parse_teachers("30-3-30, 30-6-3-30") == [(30, 3, 30), (30, 6, 3, 30)]
    assert parse_teachers("") == []
    for bad in ("30", "30-x-30", "30-0-30"):
        with pytest.raises(UsageError, match="compare_teachers: expected"):
            parse_teachers(bad)
    # ends (first and last quarter) against the middle half
    assert end_step_ratio([0.1, 0.2, 0.3, 0.4]) == pytest.approx(((0.1 + 0.4) / 2) / ((0.2 + 0.3) / 2))
    assert math.isnan(end_step_ratio([0.5, 0.5]))
    capped = _cap_steps(torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64), 0.4)
    assert capped.tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])
    capped = _cap_steps(torch.tensor([0.45, 0.45, 0.05, 0.05], dtype=torch.float64), 0.3)
    assert capped.tolist() == pytest.approx([0.3, 0.3, 0.2, 0.2]) and float(capped.sum()) == pytest.approx(1.0)


def test_leaky_rejects_bad_comparison_options(tmp_path):
    with pytest.raises(UsageError, match="width: expected >= the input and output widths of every compared teacher"):
        run_study("leaky", out=str(tmp_path / "a"), sets=LEAKY + ["compare_teachers=40-3-40"], progress=False)
    with pytest.raises(UsageError, match=r"lts: expected every Lt <= 0.95 \* depth"):
        run_study("leaky", out=str(tmp_path / "b"), sets=LEAKY + ["lts=1,7.9"], progress=False)


def _leaky_cmp(ratio_a: float, eq_loss: float, ad_loss: float) -> dict:
    return {"teachers": ["t"], "schemes": ["equidistant", "adaptive"], "lt": 12.0,
            "t": {"dims": [30, 3, 30], "equidistant": {"end_step_ratio": 1.0, "test_data_loss": eq_loss},
                  "adaptive": {"end_step_ratio": ratio_a, "test_data_loss": ad_loss}}}


def test_leaky_steps_reading_on_constructed_inputs():
    r = leaky_steps_reading(_leaky_cmp(0.6, 0.10, 0.09), "c")
    assert "more layers near the ends: holds" in r and "adaptive beats equidistant" in r and "-10.0%" in r
    r = leaky_steps_reading(_leaky_cmp(1.3, 0.10, 0.103), "c")
    assert "not more layers near the ends" in r and "adaptive matches equidistant" in r
    r = leaky_steps_reading(_leaky_cmp(0.9, 0.10, 0.2), "c")
    assert "adaptive worse than equidistant" in r
    r = leaky_steps_reading(_leaky_cmp(math.nan, 0.10, None), "c")
    assert "ratio n/a" in r and "test loss n/a" in r


# ------------------------------------------------------------------------------ readings over seeds
def _block(values: dict[str, list]) -> dict:
    return {g: {"per_seed": {"m": v}, "reasons": {"m": None}} for g, v in values.items()}


def test_seed_order_reading_resolves_only_beyond_two_standard_errors():
    blk = _block({"plain": [0.50, 0.52, 0.48], "residual": [0.10, 0.12, 0.11], "hyper": [0.11, 0.09, 0.13]})
    r = seed_order_reading(blk, ["plain", "residual", "hyper"], "m", "dead", [("plain", "residual"),
                                                                             ("residual", "hyper")], "cond")
    assert "plain >= residual holds" in r
    assert "residual >= hyper not resolved" in r
    # reversed: the expected-higher net is lower beyond 2 standard errors
    blk = _block({"plain": [0.1, 0.11, 0.12], "residual": [0.5, 0.51, 0.49]})
    r = seed_order_reading(blk, ["plain", "residual"], "m", "dead", [("plain", "residual")], "cond")
    assert "plain >= residual is reversed" in r
    # equal with no spread (e.g. no dead unit on any seed): no order
    blk = _block({"plain": [0.0, 0.0], "residual": [0.0, 0.0]})
    r = seed_order_reading(blk, ["plain", "residual"], "m", "dead", [("plain", "residual")], "cond")
    assert "plain = residual on every seed (no spread), so no order" in r
    # one seed: no spread, never resolved
    blk = _block({"plain": [0.9], "residual": [0.1]})
    r = seed_order_reading(blk, ["plain", "residual"], "m", "dead", [("plain", "residual")], "cond")
    assert "not resolved (one seed: no spread)" in r
    # undefined values carry their reason
    blk = _block({"plain": [None, None], "residual": [0.1, 0.2]})
    blk["plain"]["reasons"]["m"] = "seed 0: unresolved at steps=6"
    r = seed_order_reading(blk, ["plain", "residual"], "m", "dead", [("plain", "residual")], "cond")
    assert "plain n/a (no finite value; seed 0: unresolved at steps=6)" in r and "not compared (n/a)" in r
    # a mean over some of the seeds says how many were left out and why
    blk = _block({"plain": [0.5, None, 0.6], "residual": [0.1, 0.2, 0.1]})
    blk["plain"]["diverged"] = []
    r = seed_order_reading(blk, ["plain", "residual"], "m", "dead", [("plain", "residual")], "cond")
    assert "plain 0.55 +- 0.05 (1 of 3 seeds without a value, excluded: 1 undefined)" in r


# ------------------------------------------------------------------------------ singularities over seeds
def _load_net(rep, res: dict, name: str, arch: str, norm: str, seed: int):
    cfg = {**res["config"], "seed": seed, "norm": norm}
    ds = load_data("digits", image=False, n_train=300, seed=res["config"]["seed"])
    model = build_model(net_spec(cfg, ds, arch))
    (ck,) = glob.glob(os.path.join(rep.out, "checkpoints", f"{name}_{norm}_s{seed}-*"))
    load_checkpoint(model, ck)
    return model.eval(), ds


@pytest.mark.slow  # 16 tiny nets: ~12 s idle, ~30 s on the loaded 2-core machine
def test_singularities_over_seeds_writes_figure_and_matches_direct_calls(tmp_path):
    rep = run_study("singularities", out=str(tmp_path / "s"),
                    sets=NET + ["archs=plain", "seeds=0,1", "seed_archs=plain,residual"], progress=False)
    res = json.load(open(rep.results_path))
    blk = res["over_seeds"]
    assert blk["norms"] == ["batch", "none"] and blk["seeds"] == [0, 1]
    assert blk["lr"] == {"batch": 0.05, "none": 0.002}  # norm=none nets train with seed_none_lr
    assert blk["groups"] == ["plain", "residual", "plain_biasreg", "residual_biasreg"]
    for norm in blk["norms"]:
        for name, arch in (("plain", "plain"), ("residual_biasreg", "residual")):
            for i, seed in enumerate(blk["seeds"]):
                model, ds = _load_net(rep, res, name, arch, norm, seed)
                direct = singularities(model, ds, eps=1e-3).summary()["dead_fraction_total"]
                assert blk[norm][name]["per_seed"]["dead_fraction_total"][i] == direct
        vals = blk[norm]["plain"]["per_seed"]["dead_fraction_total"]
        assert blk[norm]["plain"]["mean"]["dead_fraction_total"] == pytest.approx(sum(vals) / 2)
        assert blk[norm]["plain"]["se"]["dead_fraction_total"] == pytest.approx(abs(vals[0] - vals[1]) / 2)
    reading = _check_spec(rep, res, "dead_units_seeds", 2 * 4)  # 2 norms x 4 groups
    assert "norm=batch" in reading and "norm=none" in reading and "lr 0.002" in reading
    assert "residual >= residual_biasreg" in reading or "residual = residual_biasreg on every seed" in reading


def test_singularities_rejects_bad_seed_options(tmp_path):
    for sets, match in ((["seeds=0,x"], "seeds: expected a comma list of ints"),
                        (["seeds=0,0"], "seeds: expected distinct seeds"),
                        (["seeds=0", "seed_norms=layer"], "seed_norms: expected"),
                        (["seeds=0", "seed_archs=plain_biasreg"], "seed_archs: expected architectures without"),
                        (["seeds=0", "seed_archs=resnet"], "archs: unknown architecture")):
        with pytest.raises(UsageError, match=match):
            run_study("singularities", out=str(tmp_path / "x"), sets=NET + sets, progress=False)


# ------------------------------------------------------------------------------ hessian over seeds
@pytest.mark.slow  # 6 full-Lanczos spectra: ~20 s idle, ~60 s on the loaded 2-core machine
def test_hessian_over_seeds_writes_figure_and_matches_direct_calls(tmp_path):
    # width 3, depth 2, no norm: P = 283 parameters and Lanczos runs all 283 steps, so the near-zero
    # mass is resolved (a few seconds per spectrum); both norms are exercised by the singularities test
    net = ["n_train=300", "width=3", "depth=2", "epochs=1", "norm=none"]
    rep = run_study("hessian", out=str(tmp_path / "h"),
                    sets=net + ["hessian_samples=64", "eigs=2", "probes=2", "lanczos_steps=283", "trace_probes=3",
                                "archs=plain", "seeds=0,1", "seed_archs=plain,residual", "seed_norms=none"],
                    deterministic=True, progress=False)
    res = json.load(open(rep.results_path))
    blk = res["over_seeds"]
    assert blk["norms"] == ["none"] and blk["groups"] == ["plain", "residual"] and blk["seeds"] == [0, 1]
    for arch, seed in (("plain", 1), ("residual", 0)):
        model, ds = _load_net(rep, res, arch, arch, "none", seed)
        x, y = ds.tensors("train")
        s = hessian_spectrum(model, F.cross_entropy, (x[:64], y[:64]), k=2, probes=2, steps=283, trace_probes=3,
                             seed=seed, deterministic=True).summary()
        for key in ("degenerate_fraction_rel", "degenerate_fraction_abs"):
            assert s[key] is not None and 0 < s[key] < 1
            assert blk["none"][arch]["per_seed"][key][seed] == s[key]
    reading = _check_spec(rep, res, "hessian_mass_seeds", 2 * 2)  # groups x thresholds
    assert "norm=none" in reading and "plain >= residual" in reading and "n/a" not in reading


def test_seed_grid_records_a_diverged_net_as_undefined_with_its_reason(tmp_path):
    cfg = {o.name: o.default for o in SINGULARITIES.options}
    cfg.update(n_train=300, width=8, depth=2, epochs=1, seed_none_lr=1e6)  # lr 1e6: the weights become NaN
    ds, key = study_data(cfg)
    called = []

    def analyse(net, c, model):
        called.append(net)
        return {"summary": {"dead_fraction_total": 0.5}}

    runner = open_runner(str(tmp_path / "g"), cfg, study="singularities", fresh=False, progress=False)
    out = seed_grid(runner, cfg, ds, key, torch.device("cpu"), [("plain", "plain", False)], [0, 1], ["none"],
                    analyse, ["dead_fraction_total"])
    blk = out["none"]["plain"]
    assert called == [] and blk["diverged"] == [0, 1]
    assert blk["per_seed"]["dead_fraction_total"] == [None, None] and blk["mean"]["dead_fraction_total"] is None
    assert blk["reasons"]["dead_fraction_total"] == "seed 0: training diverged (non-finite weights)"
    r = seed_order_reading(out["none"], ["plain"], "dead_fraction_total", "dead", [], "c")
    assert ("plain n/a (no finite value; seed 0: training diverged (non-finite weights)) (2 of 2 seeds without a "
            "value, excluded: 2 diverged)") in r
