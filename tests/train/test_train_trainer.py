"""The trainer: accuracy on digits, determinism, exact resume, logs, checkpoints, callbacks."""

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from resgeom_fast.data import digits, gaussian_mixture, teacher
from resgeom_fast.models import BiasReg, ConvResNet, FCResNet, LeakyResNet
from resgeom_fast.train import CheckpointMismatchError, load_checkpoint, model_fingerprint, train


@pytest.fixture(scope="module")
def small_digits():
    return digits().subset(400, 200)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


class _Kill(RuntimeError):
    pass


def test_fcresnet_reaches_95_percent_on_digits():
    d = digits()
    m = FCResNet(64, 128, 8, 10, seed=0)
    r = train(m, d, 10, optimizer="sgd", lr=0.05, batch_size=64, seed=0, progress=False)
    assert r.final["test_acc"] >= 0.95
    assert len(r.history) == 10 and r.history[0]["lr"] == 0.05


def test_deterministic_and_global_rng_untouched(small_digits):
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        m = FCResNet(64, 16, 2, 10)
        runs.append((m, train(m, small_digits, 2, lr=0.05, seed=3, progress=False)))
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(runs[0][0], runs[1][0])
    assert runs[0][1].history[-1]["train_loss"] == runs[1][1].history[-1]["train_loss"]
    m = FCResNet(64, 16, 2, 10)
    train(m, small_digits, 2, lr=0.05, seed=4, progress=False)
    assert not _same_weights(runs[0][0], m)


@pytest.mark.parametrize("kill", ["callback", "mid_epoch"])
def test_killed_and_resumed_run_equals_uninterrupted(small_digits, tmp_path, kill):
    cfg = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine", batch_size=32, seed=5,
               progress=False)
    ref = FCResNet(64, 16, 3, 10, skip="orthogonal")
    ref_res = train(ref, small_digits, 4, checkpoint_dir=tmp_path / "ref", **cfg)

    m = FCResNet(64, 16, 3, 10, skip="orthogonal")
    ck = tmp_path / "run"
    if kill == "callback":
        def die(epoch, model, state):
            raise _Kill("simulated kill")
        with pytest.raises(_Kill):
            train(m, small_digits, 4, checkpoint_dir=ck, callbacks=[([2], die)], **cfg)
        assert load_checkpoint(FCResNet(64, 16, 3, 10, skip="orthogonal"), ck)["epoch"] == 1
    else:
        calls = {"n": 0}

        def dying_loss(out, y):
            calls["n"] += 1
            if calls["n"] == 30:  # epoch 3, batch 4 (12 batches per epoch)
                raise _Kill("simulated kill")
            return torch.nn.functional.cross_entropy(out, y)
        with pytest.raises(_Kill):
            train(m, small_digits, 4, checkpoint_dir=ck, loss_fn=dying_loss, **cfg)
        assert load_checkpoint(FCResNet(64, 16, 3, 10, skip="orthogonal"), ck)["epoch"] == 2

    fresh = FCResNet(64, 16, 3, 10, skip="orthogonal", seed=99)  # different init: everything comes from the checkpoint
    if kill == "mid_epoch":  # the resumed run must repeat the configuration, a callable loss included
        cfg["loss_fn"] = lambda out, y: torch.nn.functional.cross_entropy(out, y)
    res = train(fresh, small_digits, 4, checkpoint_dir=ck, resume=True, **cfg)
    assert res.resumed_from in (1, 2)
    assert _same_weights(fresh, ref)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref_res.history]
    lines = [json.loads(l) for l in open(ck / "log.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert not [f for f in os.listdir(ck) if ".tmp" in f]


def test_log_lines_and_checkpoint_contents(small_digits, tmp_path):
    m = FCResNet(64, 8, 2, 10)
    train(m, small_digits, 3, lr=0.05, checkpoint_dir=tmp_path, progress=False)
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert len(lines) == 3
    for key in ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time"):
        assert key in lines[0]
    assert lines[-1]["step"] == 3 * (400 // 128)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["fingerprint"] == model_fingerprint(m)
    assert {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(ck)


def test_checkpoint_from_different_model_is_refused(small_digits, tmp_path):
    train(FCResNet(64, 8, 2, 10), small_digits, 1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"different model.*FCResNet.*FCResNet.*first difference"):
        train(FCResNet(64, 8, 3, 10), small_digits, 2, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"ConvResNet"):
        load_checkpoint(ConvResNet(1, 8, 2, 10), tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"lr=0.1.*lr=0.05"):
        train(FCResNet(64, 8, 2, 10), small_digits, 2, lr=0.05, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(FCResNet(64, 8, 2, 10), tmp_path / "nothing")


def test_callbacks_forms_and_isolation(small_digits):
    seen = []

    class Probe:
        epochs = 2

        def on_epoch_end(self, epoch, model, state):
            seen.append(("obj", epoch, state.record["epoch"]))
            torch.randn(100)  # uses the global RNG: must not change training

    def at(epoch, model, state):
        seen.append(("list", epoch))
        return {"norm": sum(p.detach().norm().item() for p in model.parameters())}

    m1, m2 = FCResNet(64, 8, 2, 10), FCResNet(64, 8, 2, 10)
    r = train(m1, small_digits, 4, lr=0.05, callbacks=[Probe(), ([0, 3], at), lambda e, m, s: seen.append(("all", e))],
              progress=False)
    train(m2, small_digits, 4, lr=0.05, progress=False)
    assert _same_weights(m1, m2)
    assert ("list", 0) in seen and ("list", 3) in seen and ("list", 1) not in seen
    assert [s for s in seen if s[0] == "obj"] == [("obj", 2, 2), ("obj", 4, 4)]
    assert [s[1] for s in seen if s[0] == "all"] == [1, 2, 3, 4]
    assert "norm" in r.history[2]["callbacks"]["at"]


def test_accepted_data_forms():
    g = gaussian_mixture(num_classes=3, dim=4, n=90, n_test=30, separation=4.0)
    m = FCResNet(4, 8, 2, 3)
    r = train(m, (g.x_train, g.y_train), 2, lr=0.05, progress=False)
    assert r.final["test_acc"] is None and r.final["train_acc"] is not None
    r = train(m, (g.x_train, g.y_train, g.x_test, g.y_test), 1, lr=0.05, progress=False)
    assert r.final["test_acc"] is not None
    gen = torch.Generator().manual_seed(0)
    loaders = (DataLoader(TensorDataset(g.x_train, g.y_train), batch_size=16, shuffle=True, generator=gen),
               g.loader("test"))
    r = train(m, loaders, 2, lr=0.05, progress=False)
    assert r.final["test_acc"] > 0.5
    with pytest.raises(ValueError, match=r"data: expected a resgeom_fast.data.Dataset"):
        train(m, "digits", 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="rmsprop"), r"optimizer: expected one of \['sgd', 'adam', 'adamw'\], got 'rmsprop'"),
        (dict(schedule="linear"), r"schedule: expected one of \['constant', 'cosine', 'multistep'\]"),
        (dict(loss_fn="hinge"), r"loss_fn: expected one of \['cross_entropy', 'mse'\]"),
        (dict(lr=-1.0), r"lr: expected a finite float >= 0"),
        (dict(resume=True), r"resume: needs checkpoint_dir"),
        (dict(callbacks=[3]), r"callbacks\[0\]: expected a callable"),
    ],
)
def test_trainer_errors(kwargs, match):
    g = gaussian_mixture(n=10, n_test=5)
    with pytest.raises(ValueError, match=match):
        train(FCResNet(2, 4, 1, 3), g, 1, progress=False, **kwargs)


def test_biasreg_pulls_relu_biases_towards_b0():
    g = gaussian_mixture(num_classes=3, dim=4, n=60, n_test=10)
    m = FCResNet(4, 8, 2, 3, norm="none", skip="none")
    train(m, g, 50, lr=0.05, momentum=0.0, regularizers=[BiasReg(beta=1.0, b0=0.5)], progress=False)
    b = m.blocks[0].branch[0].bias
    assert (b - 0.5).abs().mean() < 0.1


@pytest.mark.parametrize("steps", ["equidistant", "irregular", "adaptive"])
def test_leaky_resnet_trains_on_teacher(steps):
    t = teacher(dims=(30, 3, 30), n=200, seed=0)
    m = LeakyResNet(30, 40, 8, 30, leak=2.0, steps=steps, lam=1e-3, adapt_every=5, seed=0)
    before = m.loss(t.x_train, t.y_train).item()
    r = train(m, t, 10, optimizer="adam", lr=3e-2, batch_size=50, progress=False)
    after = m.loss(t.x_train, t.y_train).item()
    assert after < 0.5 * before
    assert r.final["test_loss"] < 0.6 * r.history[0]["test_loss"]
    assert r.final["train_reg"] > 0 and r.final["train_acc"] is None
    rho = m.rho.double()
    assert rho.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (rho * m.leak).max().item() < 1.0
    if steps == "adaptive":
        assert not torch.allclose(rho, torch.full_like(rho, 1 / 8))  # the trainer adapted the steps
    else:
        assert torch.equal(m.rho, LeakyResNet(30, 40, 8, 30, leak=2.0, steps=steps).rho)


def test_corrupt_checkpoint_names_the_file_and_the_remedy(small_digits, tmp_path):
    from resgeom_fast.train.checkpoint import CheckpointCorruptError

    train(FCResNet(64, 8, 2, 10), small_digits, 1, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    with open(path, "r+b") as fh:
        fh.truncate(64)
    m = FCResNet(64, 8, 2, 10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointCorruptError, match=rf"resume: cannot read checkpoint '{path}' \(.*\); the file is "
                                                     r"damaged or not a torch checkpoint: move it aside or delete it"):
        train(m, small_digits, 2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # untouched
    with pytest.raises(CheckpointCorruptError, match=rf"load_checkpoint: cannot read checkpoint '{path}'"):
        load_checkpoint(m, tmp_path)
    assert issubclass(CheckpointCorruptError, CheckpointMismatchError)


def test_progress_in_a_log_is_plain_lines_without_carriage_returns(small_digits, capsys):
    """stderr is not a terminal under capsys (as in CI or ``> log``): one plain line per epoch
    (rate limited; the last always), never a carriage-return redraw."""
    train(FCResNet(64, 8, 2, 10), small_digits, 3, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("[train] ") for ln in lines)
    assert lines[-1].startswith("[train] 3/3 epoch (100%)") and "loss=" in lines[-1]
