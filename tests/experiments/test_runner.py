"""The runner: finished steps are kept, an interrupted run resumes without recomputing them,
a changed configuration is never silently reused, training resumes from its checkpoint."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch

from resgeom_fast.experiments.common import train_step
from resgeom_fast.experiments.runner import Runner


class Counter:
    """Step functions that count their calls; ``fail`` raises KeyboardInterrupt inside a step."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.fail: set[str] = set()

    def fn(self, name):
        def run():
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail:
                raise KeyboardInterrupt
            return {"name": name, "value": torch.tensor([1.0, 2.0]) * len(name)}
        return run


def _pipeline(runner: Runner, c: Counter, names=("a", "b", "c", "d")):
    return {n: runner.step(n, c.fn(n)) for n in names}


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    cfg = {"width": 8, "seed": 0}
    c = Counter()
    c.fail = {"c"}
    with pytest.raises(KeyboardInterrupt):
        _pipeline(Runner(str(tmp_path), cfg, study="t", log=None), c)
    assert c.calls == {"a": 1, "b": 1, "c": 1}
    assert sorted(os.listdir(tmp_path / "steps")) == ["a.json", "b.json"]  # nothing half-written
    assert not [f for f in os.listdir(tmp_path / "steps") if "tmp" in f]

    c.fail = set()
    r2 = Runner(str(tmp_path), cfg, study="t", log=None)
    out = _pipeline(r2, c)
    assert c.calls == {"a": 1, "b": 1, "c": 2, "d": 1}  # a and b not recomputed
    assert r2.loaded == ["a", "b"] and r2.computed == ["c", "d"]
    assert out["a"] == {"name": "a", "value": [1.0, 2.0]}  # JSON-friendly either way
    assert out["d"] == {"name": "d", "value": [1.0, 2.0]}

    r3 = Runner(str(tmp_path), cfg, study="t", log=None)
    assert _pipeline(r3, c) == out
    assert r3.computed == [] and c.calls == {"a": 1, "b": 1, "c": 2, "d": 1}


def test_config_change_recomputes_with_a_message(tmp_path):
    c = Counter()
    _pipeline(Runner(str(tmp_path), {"width": 8}, study="t", log=None), c, ("a",))
    log = io.StringIO()
    r = Runner(str(tmp_path), {"width": 16}, study="t", log=log)
    _pipeline(r, c, ("a",))
    assert c.calls == {"a": 2} and r.computed == ["a"]
    text = log.getvalue()
    assert "configuration differs" in text and "width: 8 -> 16" in text
    assert (f"step a: what it depends on changed since it was stored (config hash: {r.dep_hash({'width': 8})[:12]} -> "
            f"{r.hash[:12]}), recomputing") in text
    stored = json.load(open(tmp_path / "steps" / "a.json"))
    assert stored["key"]["config hash"] == r.hash and stored["hash"] == r.step_key()[0]


def test_step_deps_limit_what_invalidates_a_step(tmp_path):
    c = Counter()
    r = Runner(str(tmp_path), {"width": 8, "probes": 2}, study="t", log=None)
    r.step("train", c.fn("train"), deps={"width": 8})
    r.step("eig", c.fn("eig"))
    r = Runner(str(tmp_path), {"width": 8, "probes": 4}, study="t", log=None)
    r.step("train", c.fn("train"), deps={"width": 8})
    r.step("eig", c.fn("eig"))
    assert c.calls == {"train": 1, "eig": 2}


def test_fresh_discards_earlier_steps(tmp_path):
    c = Counter()
    _pipeline(Runner(str(tmp_path), {}, study="t", log=None), c, ("a",))
    _pipeline(Runner(str(tmp_path), {}, study="t", log=None, fresh=True), c, ("a",))
    assert c.calls == {"a": 2}


def test_bad_step_name(tmp_path):
    r = Runner(str(tmp_path), {}, study="t", log=None)
    with pytest.raises(ValueError, match="step name"):
        r.step("../x", lambda: 1)


def _tiny_data():
    from resgeom_fast.data import digits

    return digits(seed=0).flat().subset(200, 50)


def test_training_interrupted_resumes_from_checkpoint_and_is_not_repeated(tmp_path, monkeypatch):
    import importlib

    rtrain = importlib.import_module("resgeom_fast.train")

    ds = _tiny_data()
    spec = {"kind": "fc", "in_dim": 64, "width": 8, "depth": 2, "num_classes": 10, "skip": "identity",
            "hyper": False, "norm": "batch", "seed": 0}
    tk = {"epochs": 3, "lr": 0.05, "momentum": 0.9, "batch_size": 64, "seed": 0, "optimizer": "sgd"}
    key = {"dataset": "digits"}

    def stop_after_2(epoch, model, state):
        if epoch == 2:
            raise KeyboardInterrupt

    runner = Runner(str(tmp_path), {"x": 1}, study="t", progress=False, log=None)
    with pytest.raises(KeyboardInterrupt):
        train_step(runner, "net", spec, ds, key, tk, torch.device("cpu"), callbacks=(stop_after_2,))
    assert not os.path.exists(runner.step_path("train_net"))

    calls = []
    real = rtrain.train

    def counting(*a, **k):
        calls.append(k.get("resume"))
        return real(*a, **k)

    monkeypatch.setattr(rtrain, "train", counting)
    runner = Runner(str(tmp_path), {"x": 1}, study="t", progress=False, log=None)
    model, out = train_step(runner, "net", spec, ds, key, tk, torch.device("cpu"))
    assert calls == [True]
    assert out["resumed_from"] == 1  # the checkpoint of epoch 1 (epoch 2 was interrupted before its checkpoint)
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]

    # the same, uninterrupted, gives bit-identical weights
    ref_runner = Runner(str(tmp_path / "ref"), {"x": 1}, study="t", progress=False, log=None)
    ref, _ = train_step(ref_runner, "net", spec, ds, key, tk, torch.device("cpu"))
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n

    # finished: a re-run loads the weights without training
    runner = Runner(str(tmp_path), {"x": 1}, study="t", progress=False, log=None)
    again, out2 = train_step(runner, "net", spec, ds, key, tk, torch.device("cpu"))
    assert calls == [True, True]  # only the reference run above trained
    assert runner.loaded == ["train_net"] and out2 == out
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n

    # another width: another checkpoint folder, never the stale weights
    spec2 = dict(spec, width=12)
    runner = Runner(str(tmp_path), {"x": 1}, study="t", progress=False, log=None)
    m2, out3 = train_step(runner, "net", spec2, ds, key, tk, torch.device("cpu"))
    assert out3["resumed_from"] is None and m2.width == 12
    assert len(os.listdir(tmp_path / "checkpoints")) == 2
