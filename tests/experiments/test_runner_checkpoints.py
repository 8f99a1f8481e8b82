"""Checkpoints in OUT/checkpoints that are damaged or replaced are never used silently and never
end a run in a traceback: the file is named, moved aside (kept) and the net trained again, to
the same weights as an untouched run (issue 12)."""
from __future__ import annotations

import io
import os
import shutil

import pytest
import torch

from resgeom_fast.experiments.common import train_step
from resgeom_fast.experiments.runner import Runner

SPEC = {"kind": "fc", "in_dim": 64, "width": 8, "depth": 2, "num_classes": 10, "skip": "identity",
        "hyper": False, "norm": "batch", "seed": 0}
TK = {"epochs": 3, "lr": 0.05, "momentum": 0.9, "batch_size": 64, "seed": 0, "optimizer": "sgd"}
KEY = {"dataset": "digits"}


@pytest.fixture(scope="module")
def ds():
    from resgeom_fast.data import digits

    return digits(seed=0).flat().subset(200, 50)


@pytest.fixture(scope="module")
def reference(ds, tmp_path_factory):
    """Weights of an untouched, uninterrupted run (the truth)."""
    with Runner(str(tmp_path_factory.mktemp("ref")), {"x": 1}, study="t", progress=False, log=None) as r:
        model, _ = train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, ref):
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def _ckpt(out) -> str:
    (folder,) = os.listdir(os.path.join(out, "checkpoints"))
    return os.path.join(out, "checkpoints", folder, "checkpoint.pt")


def test_corrupt_checkpoint_of_a_finished_step_is_moved_aside_and_retrained(tmp_path, ds, reference):
    out = str(tmp_path)
    with Runner(out, {"x": 1}, study="t", progress=False, log=None) as r:
        train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    ck = _ckpt(out)
    with open(ck, "r+b") as fh:                     # damage it: a truncated torch file
        fh.truncate(100)
    log = io.StringIO()
    with Runner(out, {"x": 1}, study="t", progress=False, log=log) as r:
        model, res = train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    text = log.getvalue()
    assert f"step train_net: checkpoint: cannot read checkpoint {ck!r}" in text
    assert "moved it to checkpoint.pt.corrupt-" in text and "; recomputing" in text
    assert r.computed == ["train_net"] and res["resumed_from"] is None
    _same(model, reference)
    moved = [f for f in os.listdir(os.path.dirname(ck)) if f.startswith("checkpoint.pt.corrupt-")]
    assert len(moved) == 1 and os.path.getsize(os.path.join(os.path.dirname(ck), moved[0])) == 100


def test_corrupt_checkpoint_of_an_interrupted_training_restarts_it(tmp_path, ds, reference):
    out = str(tmp_path)

    def stop_after_2(epoch, model, state):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with Runner(out, {"x": 1}, study="t", progress=False, log=None) as r:
            train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"), callbacks=(stop_after_2,))
    ck = _ckpt(out)
    with open(ck, "wb") as fh:
        fh.write(b"not a torch file")
    log = io.StringIO()
    with Runner(out, {"x": 1}, study="t", progress=False, log=log) as r:
        model, res = train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    assert f"resume: cannot read checkpoint {ck!r}" in log.getvalue()
    assert "training from the start" in log.getvalue()
    assert res["resumed_from"] is None and [h["epoch"] for h in res["history"]] == [1, 2, 3]
    _same(model, reference)


def test_a_replaced_checkpoint_of_a_finished_step_is_not_loaded(tmp_path, ds, reference):
    """A valid checkpoint of another training (same model, seed 1) copied over ours: the step's
    recorded sha256 catches it; the net is trained again."""
    out = str(tmp_path / "out")
    with Runner(out, {"x": 1}, study="t", progress=False, log=None) as r:
        train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    other = str(tmp_path / "other")
    with Runner(other, {"x": 1}, study="t", progress=False, log=None) as r:
        train_step(r, "net", SPEC, ds, KEY, dict(TK, seed=1), torch.device("cpu"))
    shutil.copyfile(_ckpt(other), _ckpt(out))
    log = io.StringIO()
    with Runner(out, {"x": 1}, study="t", progress=False, log=log) as r:
        model, _ = train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    assert "is not the one this step wrote (sha256 differs); moved it to checkpoint.pt.changed-" in log.getvalue()
    _same(model, reference)


def test_fresh_retrains_without_resuming(tmp_path, ds, reference):
    out = str(tmp_path)
    with Runner(out, {"x": 1}, study="t", progress=False, log=None) as r:
        train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    with Runner(out, {"x": 1}, study="t", progress=False, log=None, fresh=True) as r:
        model, res = train_step(r, "net", SPEC, ds, KEY, TK, torch.device("cpu"))
    assert r.computed == ["train_net"] and res["resumed_from"] is None
    _same(model, reference)
