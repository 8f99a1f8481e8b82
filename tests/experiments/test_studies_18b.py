"""Issue 18, part B: Residual Alignment's counterfactuals in study `alignment` (extras) and the
stochastic-depth model option.

Stochastic depth is checked on constructed nets: in eval mode a net with p equals the same net
(same seed, same weights) whose branch scales are multiplied by 1 - p; in train mode every block
output is exactly the skip (dropped) or exactly skip + branch (kept). The study's experiments run
at a tiny size and their numbers are compared with direct calls: the UJM on the stem output of the
study's own checkpointed net, the stochastic-depth net retrained here with the trainer."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from resgeom_fast.analysis.ujm import ujm
from resgeom_fast.experiments.commands import run_study
from resgeom_fast.experiments.common import load_data
from resgeom_fast.experiments.config import UsageError, parse_sets, resolve_config
from resgeom_fast.experiments.report import check_figure
from resgeom_fast.experiments.studies import STUDIES
from resgeom_fast.experiments.studies.alignment import class_subset, parse_extras
from resgeom_fast.models import ConvResNet, FCResNet, StochasticDepth, resnet18
from resgeom_fast.train import load_checkpoint, train

D64 = torch.float64
NET = ["n_train=300", "width=8", "depth=2", "epochs=1"]
TINY = NET + ["align_samples=4", "depths=2,3", "k=3", "oversample=2", "power_iters=0", "ujm_samples=40",
              "ujm_steps=40", "stochastic_depths=0,0.5", "class_counts=2,10", "weight_decays=0.0005,0.05"]
TRAIN = dict(lr=0.05, momentum=0.9, batch_size=64, seed=0, optimizer="sgd", weight_decay=0.05, schedule="cosine",
             progress=False)


# ------------------------------------------------------------------------------ stochastic depth
def _scaled_copy(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    for b in model.blocks:
        b.scale = b.scale * factor
    return model


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_stochastic_depth_eval_equals_the_scaled_net(p):
    x = torch.randn(16, 12, dtype=D64, generator=torch.Generator().manual_seed(0))
    sd = FCResNet(12, 6, 3, 4, stochastic_depth=p, seed=5).double().eval()
    ref = _scaled_copy(FCResNet(12, 6, 3, 4, seed=5).double().eval(), 1 - p)
    # same weights and state dict (StochasticDepth holds nothing)
    assert sd.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(sd.state_dict().values(), ref.state_dict().values()))
    torch.testing.assert_close(sd(x), ref(x), rtol=1e-14, atol=1e-14)
    _, hs = sd(x, return_hidden=True)
    _, hr = ref(x, return_hidden=True)
    assert all(torch.allclose(a, b, rtol=1e-14, atol=1e-14) for a, b in zip(hs, hr))
    # conv nets too
    xi = torch.randn(2, 1, 5, 5, dtype=D64, generator=torch.Generator().manual_seed(1))
    csd = ConvResNet(1, 3, 2, 3, stochastic_depth=p, seed=2).double().eval()
    cref = _scaled_copy(ConvResNet(1, 3, 2, 3, seed=2).double().eval(), 1 - p)
    torch.testing.assert_close(csd(xi), cref(xi), rtol=1e-13, atol=1e-13)


def test_stochastic_depth_train_mode_drops_to_exactly_the_skip():
    p = 0.5
    net = FCResNet(12, 6, 2, 3, stochastic_depth=p, seed=1).double().train()
    block = net.blocks[0]
    h = torch.randn(8, 6, dtype=D64, generator=torch.Generator().manual_seed(2))
    layers = list(block.branch)
    assert isinstance(layers[-1], StochasticDepth)
    full = torch.nn.Sequential(*layers[:-1])          # the branch without the drop (train-mode BN)
    kept_ref = h + full(h)
    torch.manual_seed(0)
    outs = [block(h) for _ in range(40)]
    dropped = [torch.equal(o, h) for o in outs]
    kept = [torch.allclose(o, kept_ref, rtol=0, atol=1e-15) for o in outs]
    assert all(d != k for d, k in zip(dropped, kept))    # every output is exactly one of the two
    assert 5 <= sum(dropped) <= 35                        # both happen (p = 0.5, 40 draws)
    # the draws come from the global RNG: the same seed gives the same drops
    torch.manual_seed(0)
    assert [torch.equal(block(h), h) for _ in range(40)] == dropped
    # a dropped block passes no gradient to its branch, a kept one does
    net.zero_grad()
    torch.manual_seed(0)
    out = block(h.clone().requires_grad_(True))
    out.sum().backward()
    w = layers[0].weight.grad
    assert (float(w.abs().sum()) == 0.0) == dropped[0]


def test_stochastic_depth_state_dict_compatible_both_ways():
    for make in (lambda p: FCResNet(10, 4, 3, 2, stochastic_depth=p, seed=0),
                 lambda p: ConvResNet(1, 3, 2, 2, stochastic_depth=p, seed=0),
                 lambda p: resnet18(3, base_width=4, in_channels=1, stochastic_depth=p, seed=0)):
        a, b = make(0.0), make(0.4)
        b.load_state_dict(a.state_dict(), strict=True)
        a.load_state_dict(b.state_dict(), strict=True)
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    # off by default: no StochasticDepth module anywhere
    assert not any(isinstance(m, StochasticDepth) for m in FCResNet(10, 4, 3, 2).modules())
    r = resnet18(3, base_width=4, in_channels=1, stochastic_depth=0.2)
    assert all(isinstance(b.branch.drop, StochasticDepth) for b in r.blocks)


@pytest.mark.parametrize("value, exc, msg", [
    (1.0, ValueError, r"stochastic_depth: expected a float in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"stochastic_depth: expected a float in \[0, 1\), got -0.1"),
    (float("nan"), ValueError, r"stochastic_depth: expected a float in \[0, 1\), got nan"),
    ("0.2", TypeError, r"stochastic_depth: expected a float in \[0, 1\), got '0.2'"),
    (True, TypeError, r"stochastic_depth: expected a float in \[0, 1\), got True"),
])
def test_stochastic_depth_refused(value, exc, msg):
    for make in (lambda: FCResNet(4, 4, 1, 2, stochastic_depth=value),
                 lambda: ConvResNet(1, 2, 1, 2, stochastic_depth=value),
                 lambda: resnet18(2, base_width=4, stochastic_depth=value)):
        with pytest.raises(exc, match=msg):
            make()
    with pytest.raises(exc, match=msg.replace("stochastic_depth", "p")):
        StochasticDepth(value)


# ------------------------------------------------------------------------------------ the study
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("al18b") / "alignment")
    rep = run_study("alignment", out=out, sets=TINY + ["extras=all"], progress=False)
    return rep, json.load(open(rep.results_path))


def test_every_extra_writes_its_figure_numbers_and_reading(tiny_run):
    import matplotlib.pyplot as plt

    rep, res = tiny_run
    md = open(rep.report_path).read()
    specs = {s.name: s for s in rep.specs}
    for name, entry in (("ujm_comparison", "ujm"), ("ra_stochastic_depth", "stochastic_depth"),
                        ("ra_classes", "classes"), ("ra_weight_decay", "weight_decay")):
        assert entry in res, entry
        assert os.path.isfile(os.path.join(rep.out, "figures", f"{name}.png"))
        fig = specs[name].build(res)
        assert check_figure(fig, res) >= 3, name
        plt.close(fig)
        reading = specs[name].reading(res)
        assert reading in md and "width 8, depth 2" in reading   # the conditions are stated
    assert res["stochastic_depth"]["p"] == [0.0, 0.5]
    assert res["classes"]["num_classes"] == [2, 10]
    assert res["weight_decay"]["weight_decay"] == [0.0005, 0.05]
    # the entries that equal the study's own residual net are that net's numbers
    s = res["models"]["residual"]["alignment"]["summary"]
    for entry, i in (("stochastic_depth", 0), ("classes", 1), ("weight_decay", 1)):
        assert res[entry]["runs"][i]["name"] == "residual"
        assert res[entry]["linearity"][i] == s["linearity"]
        assert res[entry]["test_acc"][i] == res["models"]["residual"]["train"]["final"]["test_acc"]
    # the comparison holds the trained nets' summaries and the UJM's
    cmp = res["ujm_comparison"]
    assert cmp["groups"] == ["ujm", "residual", "plain"]
    assert cmp["residual"]["self_alignment"] == s["self_alignment"]
    assert cmp["ujm"]["depth_product"] == res["ujm"]["summary"]["depth_product"]
    sc = res["ujm_depth_scaling"]       # the UJM at each of `depths` (the study's depth: its own solve)
    assert sc["depths"] == [2, 3] and sc["depth_product"][0] == res["ujm"]["summary"]["depth_product"]
    assert len(sc["depth_product"]) == 2 and sc["relative_spread"] is not None
    # a C-class net is trained and aligned on C classes
    c2 = res["classes"]["runs"][0]
    assert c2["name"] == "residual_C2" and c2["alignment"]["result"]["settings"]["num_classes"] == 2
    # classes_equal_steps (default): the C-class net takes at least the study net's SGD steps
    y = load_data("digits", n_train=300, seed=0).tensors("train")[1]
    n2 = int((y < 2).sum())
    assert res["classes"]["train_samples"] == [n2, 300]
    full_steps = 300 // 64
    per_epoch = n2 // 64 if n2 > 64 else 1
    assert res["classes"]["epochs"] == [math.ceil(full_steps / per_epoch), 1]
    assert res["classes"]["sgd_steps"][1] == full_steps
    assert full_steps <= res["classes"]["sgd_steps"][0] < full_steps + max(1, n2 // 64)


def test_ujm_entry_equals_a_direct_call_on_the_checkpointed_net(tiny_run):
    rep, res = tiny_run
    ds = load_data("digits", n_train=300, seed=0)
    net = FCResNet(64, 8, 2, 10, seed=0)
    (ck,) = glob.glob(os.path.join(rep.out, "checkpoints", "residual-*"))
    load_checkpoint(net, ck)
    net.eval()
    x, y = ds.tensors("train")
    with torch.no_grad():
        h0 = net.stem(x[:40])
    direct = ujm(h0, y[:40], 2, lam_W=0.05, lam_J=0.05, steps=40, tol=1e-8, num_classes=10, seed=0)
    got = res["ujm"]["result"]
    assert got["loss_history"] == direct.loss_history
    assert got["numerical_rank"] == direct.numerical_rank
    assert got["summary"] == json.loads(json.dumps(direct.summary(), allow_nan=False))
    assert "NOT converged" in [s for s in rep.specs if s.name == "ujm_comparison"][0].reading(res)


def test_stochastic_depth_net_equals_a_direct_training(tiny_run):
    """The study's p = 0.5 net is FCResNet(stochastic_depth=0.5) trained by the trainer with the
    study's settings: the same test accuracy and the same weights."""
    rep, res = tiny_run
    ds = load_data("digits", n_train=300, seed=0)
    net = FCResNet(64, 8, 2, 10, seed=0, stochastic_depth=0.5)
    out = train(net, ds, 1, **TRAIN)
    run = res["stochastic_depth"]["runs"][1]
    assert run["name"] == "residual_sd0.5"
    assert run["train"]["final"]["test_acc"] == out.final["test_acc"]
    stored = FCResNet(64, 8, 2, 10, seed=0, stochastic_depth=0.5)
    (ck,) = glob.glob(os.path.join(rep.out, "checkpoints", "residual_sd0.5-*"))
    load_checkpoint(stored, ck)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), stored.state_dict().values()))
    # and it differs from the p = 0 net (the option reached the model)
    assert run["train"]["final"]["train_loss"] != res["models"]["residual"]["train"]["final"]["train_loss"]


def test_class_subset_keeps_the_first_classes():
    ds = load_data("digits", n_train=300, seed=0)
    sub = class_subset(ds, 3)
    assert sub.num_classes == 3
    for split in ("train", "test"):
        x, y = ds.tensors(split)
        xs, ys = sub.tensors(split)
        assert torch.equal(ys, y[y < 3]) and torch.equal(xs, x[y < 3]) and set(ys.tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------------ validation
def _resolve(sets):
    return resolve_config(STUDIES["alignment"].options, study="alignment", sets=parse_sets(sets))


def test_extras_parsing():
    assert parse_extras({"extras": "none"}) == []
    assert parse_extras({"extras": "all"}) == ["ujm", "stochastic_depth", "classes", "weight_decay"]
    assert parse_extras({"extras": "weight_decay, ujm"}) == ["ujm", "weight_decay"]
    assert _resolve(NET)["extras"] == "none"     # off by default: the study is unchanged


@pytest.mark.parametrize("sets, msg", [
    (["extras=ujm,foo"], r"extras: expected a comma list of ujm, stochastic_depth, classes, weight_decay"),
    (["extras=classes", "class_counts=2,11"], r"class_counts: expected ints in \[2, 10\]"),
    (["extras=ujm", "model=conv"], "extras: expected model=fc for ujm"),
    (["extras=ujm", "weight_decay=0"], "ujm_lam: expected a value > 0 when weight_decay is 0"),
    (["extras=ujm", "ujm_samples=301"], r"ujm_samples: expected an int <= 300"),
    (["stochastic_depths=0.2,0.99"], r"expected stochastic_depths a number in \[0, 0.95\], got 0.99"),
])
def test_bad_extras_refused_before_work(sets, msg):
    with pytest.raises(UsageError, match=msg):
        _resolve(NET + sets)


def test_sweep_trend_reads_ra1_changes_against_their_standard_errors():
    from resgeom_fast.experiments.studies.alignment import _trend

    e = {"x": [0.05, 0.0005], "linearity": [0.9, 0.5], "linearity_se": [0.01, 0.01], "linearity_n": [64, 64],
         "test_acc": [0.98, 0.97]}
    # sorted by x: 0.5 at 0.0005 -> 0.9 at 0.05, z = 0.4 / sqrt(2) / 0.01
    assert _trend(e, "linearity", "x") == ("linearity 0.5 at 5.00e-04 -> 0.9 at 0.05 (28.3 standard errors over "
                                           "the test inputs)")
    e["linearity_se"] = [0.5, 0.5]
    assert "within 2 standard errors over the test inputs: no change read" in _trend(e, "linearity", "x")
    assert _trend(e, "test_acc", "x") == "test_acc 0.97 at 5.00e-04 -> 0.98 at 0.05"     # no error bar: no verdict
    e["linearity"] = [None, 0.5]
    assert _trend(e, "linearity", "x") == "linearity: n/a (fewer than two defined values)"
