"""The ``resgeom`` command never reports a stale number and never ends in a traceback (issue 12):
analyze re-keys its steps on the checkpoint's contents and the factory's source, ``--out`` is
checked before any work, a model that cannot take the data is a one-line error, any unexpected
exception is one line naming where its traceback went, ``--deterministic`` reaches the config."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from resgeom_fast.cli import main
from tests.experiments._cli import UserModule
from tests.experiments._cli import one_line_error as _error

FACTORY = textwrap.dedent("""
    from resgeom_fast.models import ConvResNet


    def net():
        return ConvResNet(3, 4, {depth}, 10, seed=0)
    """)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A module ``h1_tinynet_<n>`` with a factory ``net`` of a tiny ConvResNet (depth settable)."""
    mod = UserModule(tmp_path, monkeypatch, "h1_tinynet")
    yield lambda depth: f"module:{mod.write(FACTORY.format(depth=depth))}:net"
    mod.forget()


def _argv(spec, out, *extra):
    return ["analyze", "--model", spec, "--data", "random-cifar", "--samples", "2", "--k", "2", "--power-iters", "0",
            "--oversample", "2", "--analyses", "alignment", "--out", str(out), *extra]


def _alignment(out) -> dict:
    return json.load(open(os.path.join(out, "results.json")))["models"]["model"]["alignment"]


def _save_weights(factory_spec, path, seed):
    import importlib

    mod = importlib.import_module(factory_spec.split(":")[1])
    net = mod.net()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    torch.save(net.state_dict(), path)


def test_analyze_recomputes_when_the_checkpoint_contents_change(tmp_path, factory, capsys):
    spec = factory(2)
    ck = tmp_path / "ck.pt"
    _save_weights(spec, ck, 1)
    out = tmp_path / "A"
    assert main(_argv(spec, out, "--checkpoint", str(ck))) == 0
    first = _alignment(out)["summary"]["linearity"]
    capsys.readouterr()

    _save_weights(spec, ck, 2)                              # same path, other weights
    assert main(_argv(spec, out, "--checkpoint", str(ck))) == 0
    err = capsys.readouterr().err
    second = _alignment(out)["summary"]["linearity"]
    # the truth: a run into an empty folder with the new checkpoint
    assert main(_argv(spec, tmp_path / "truth", "--checkpoint", str(ck), "--quiet")) == 0
    truth = _alignment(tmp_path / "truth")["summary"]["linearity"]
    assert second == truth and second != first
    assert "step alignment: what it depends on changed since it was stored (checkpoint sha256:" in err
    res = json.load(open(out / "results.json"))
    import hashlib

    assert res["provenance"]["checkpoint sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()

    assert main(_argv(spec, out, "--checkpoint", str(ck))) == 0   # unchanged: loaded, and says on what
    err = capsys.readouterr().err
    assert "step alignment: finished earlier, loaded from steps/alignment.json (keyed on config hash " in err
    assert "checkpoint sha256 " + res["provenance"]["checkpoint sha256"][:12] in err
    assert "factory source sha256 " in err and "resgeom_fast " in err


def test_analyze_recomputes_when_the_factory_code_changes(tmp_path, factory, capsys):
    out = tmp_path / "B"
    assert main(_argv(factory(2), out, "--quiet")) == 0
    assert [len(st["block_names"]) for st in _alignment(out)["result"]["stages"]] == [2]
    assert main(_argv(factory(3), out)) == 0                # the factory now builds 3 blocks
    assert [len(st["block_names"]) for st in _alignment(out)["result"]["stages"]] == [3]
    assert "factory source sha256: " in capsys.readouterr().err


def test_deterministic_flag_enters_the_configuration(tmp_path, factory, monkeypatch):
    spec = factory(2)
    assert main(_argv(spec, tmp_path / "d", "--quiet", "--deterministic")) == 0
    cfg = json.load(open(tmp_path / "d" / "results.json"))["config"]
    assert cfg["deterministic"] is True
    assert main(_argv(spec, tmp_path / "n", "--quiet")) == 0
    assert json.load(open(tmp_path / "n" / "results.json"))["config"]["deterministic"] is False

    from resgeom_fast.experiments import commands

    seen = {}

    class Rep:
        report_path = "r.md"

    def fake(name):
        def f(*a, **k):
            seen[name] = k["deterministic"]
            return Rep()
        return f

    monkeypatch.setattr(commands, "demo", fake("demo"))
    monkeypatch.setattr(commands, "run_study", fake("run"))
    assert main(["demo", "--deterministic", "--out", str(tmp_path / "x")]) == 0
    assert main(["run", "alignment", "--out", str(tmp_path / "y")]) == 0
    assert seen == {"demo": True, "run": False}


def test_run_study_puts_deterministic_into_the_config(tmp_path, monkeypatch):
    from resgeom_fast.experiments import commands, studies

    seen = []

    def fake_run(runner, cfg):
        seen.append(cfg["deterministic"])
        return studies.StudyOutput(results={"study": "alignment"}, figures=[])

    monkeypatch.setattr(studies.STUDIES["alignment"], "run", fake_run)
    commands.run_study("alignment", out=str(tmp_path / "a"), progress=False, deterministic=True)
    commands.run_study("alignment", out=str(tmp_path / "b"), progress=False)
    assert seen == [True, False]
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    assert manifest["config"]["deterministic"] is True
    assert {"results.json", "report.md"} <= set(manifest["written"])   # the report's files are recorded


# ----------------------------------------------------------------------------- one-line errors
def test_torchvision_resnet_on_digits_is_a_one_line_error(capsys, tmp_path):
    line = _error(capsys, ["analyze", "--model", "torchvision:resnet18", "--data", "digits", "--out", str(tmp_path)])
    assert "--model torchvision:resnet18: cannot take --data digits inputs of shape [1, 8, 8]" in line
    assert "--data digits has 1-channel 8x8 images, torchvision ResNets expect 3 channels" in line


def test_num_classes_must_match_the_model(capsys, tmp_path, factory):
    line = _error(capsys, _argv(factory(2), tmp_path / "o", "--num-classes", "7"))
    assert "--num-classes: expected the model's output [N, 7] logits (--num-classes 7), got [1, 10]" in line


def test_bad_out_is_a_one_line_error(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    base = ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--out"]
    assert "--out: expected a folder, got a file: " in _error(capsys, base + [str(f)])
    assert "above" in _error(capsys, base + [str(f / "sub")]) and "is a file" in _error(capsys, base + [str(f / "s")])
    assert "--out: expected a folder path, got '' (use --out . for the current folder)" in _error(capsys, base + [""])
    assert "--out: expected a folder path, got ''" in _error(capsys, ["run", "alignment", "--out", ""])
    assert "--out: expected a folder path, got ''" in _error(capsys, ["demo", "--size", "tiny", "--out", ""])
    assert "--power-iters: expected auto or an int >= 0, got 'x'" in _error(capsys, base[:-1] + ["--power-iters", "x"])
    assert f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_out_is_a_one_line_error(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--out",
                               str(ro / "x")])
        assert f"--out: cannot write to {str(ro)!r} (permission denied)" in line
    finally:
        ro.chmod(0o755)


def test_an_unexpected_exception_is_one_line_naming_the_traceback_file(capsys, tmp_path, monkeypatch):
    from resgeom_fast.experiments import commands

    def boom(**kw):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(commands, "analyze", boom)
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--out",
                           str(tmp_path / "new")], code=1)
    assert line.startswith("resgeom: error: unexpected RuntimeError: kaput (traceback written to ")
    path = line.split("(traceback written to ")[1].rstrip(")")
    text = open(path).read()
    assert "Traceback (most recent call last)" in text and "RuntimeError: kaput" in text
    assert not (tmp_path / "new").exists()                      # not a report folder: a temporary file
    os.remove(path)

    (tmp_path / "rep").mkdir()                                    # a resgeom folder: OUT/error.log
    (tmp_path / "rep" / "manifest.json").write_text(json.dumps({"config_hash": "x"}))
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--out",
                           str(tmp_path / "rep")], code=1)
    assert line.endswith(f"(traceback written to {tmp_path / 'rep' / 'error.log'})")


def test_ctrl_c_or_a_crash_inside_a_run_releases_the_folder(capsys, tmp_path, factory, monkeypatch):
    from resgeom_fast.experiments import commands
    from resgeom_fast.experiments.runner import LOCK_NAME

    spec = factory(2)
    for exc, code in ((KeyboardInterrupt, 130), (RuntimeError, 1)):
        def stop(*a, **k):
            assert (tmp_path / "o" / LOCK_NAME).exists()            # held while the run works
            raise exc("stop")

        monkeypatch.setattr(commands, "_analyze_steps", stop)
        assert main(_argv(spec, tmp_path / "o", "--quiet")) == code
        assert not (tmp_path / "o" / LOCK_NAME).exists()
    capsys.readouterr()


def test_deterministic_reaches_both_analyses_and_power_iters_defaults_to_adaptive(tmp_path, factory):
    spec = factory(2)
    argv = ["analyze", "--model", spec, "--data", "random-cifar", "--samples", "2", "--k", "2", "--batch", "4",
            "--probes", "1", "--steps", "4", "--trace-probes", "3", "--quiet", "--deterministic",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    res = json.load(open(tmp_path / "o" / "results.json"))
    al = res["models"]["model"]["alignment"]["result"]["settings"]
    assert al["deterministic"] is True and al["power_iters"] == "auto"
    assert res["models"]["model"]["spectrum"]["result"]["deterministic"] is True
    assert res["config"]["power_iters"] == "auto"


UNSEEDED = textwrap.dedent("""
    import torch

    from resgeom_fast.models import ConvResNet


    def net():
        m = ConvResNet(3, 4, 2, 10, seed=0)
        with torch.no_grad():  # weights drawn from the global RNG, as torchvision's constructors do
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))
        return m
    """)


def test_analyze_without_a_checkpoint_is_reproducible_from_its_seed(tmp_path, monkeypatch, capsys):
    """The model's initial weights come from --seed: two runs with the same seed print the same
    numbers (before issue 13 they came from the global RNG: same key, other weights), another seed
    gives other weights, and the caller's global RNG is left untouched."""
    mod = UserModule(tmp_path, monkeypatch, "unseeded_net")
    spec = f"module:{mod.write(UNSEEDED)}:net"
    state = torch.random.get_rng_state()
    runs = {}
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(_argv(spec, tmp_path / out, "--seed", seed)) == 0, capsys.readouterr().err
        runs[out] = _alignment(tmp_path / out)["result"]["stages"][0]["ra4"]["sigma1_mean"]
    assert torch.equal(torch.random.get_rng_state(), state)
    mod.forget()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
