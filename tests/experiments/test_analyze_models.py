"""``resgeom analyze``'s models and checkpoints (issue 14): ``--model timm:NAME``,
``module:pkg.mod:factory`` importable from the current folder, DDP / Lightning checkpoints and
one-line mismatch messages."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from resgeom_fast.cli import main
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.studies.analyze import load_checkpoint, load_model
from tests.experiments._cli import one_line_error as _error

try:
    import timm
except ImportError:  # the timm tests skip; the others run
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")


@needs_timm
def test_timm_model_is_timms_resnet_with_the_heads_classes():
    net, key = load_model("timm:resnet18", 7)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=7)
    assert type(net) is type(ref)
    assert net.get_classifier().out_features == 7
    assert key == {"timm": timm.__version__}
    assert set(net.state_dict()) == set(ref.state_dict())


@needs_timm
def test_timm_unknown_name_and_missing_timm(capsys, monkeypatch):
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "timm:vit_base_patch16_224"])
    assert "--model: unknown timm model 'vit_base_patch16_224'; allowed: resnet10t," in line
    assert "resnet18" in line
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UsageError, match=r"^--model timm:\.\.\.: timm is not installed \(pip install timm\)$"):
        load_model("timm:resnet18", 10)


def test_unknown_model_scheme_names_timm(capsys):
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "resnet18"])
    assert "--model: expected torchvision:NAME or module:package.module:factory or timm:NAME, got 'resnet18'" in line


@needs_timm
def test_analyze_timm_resnet18_hessian(tmp_path):
    out = str(tmp_path / "an")
    assert main(["analyze", "--data", "random-cifar", "--model", "timm:resnet18", "--analyses", "hessian",
                 "--batch", "2", "--probes", "1", "--steps", "3", "--trace-probes", "3", "--params", "fc",
                 "--out", out, "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["provenance"]["timm"] == timm.__version__
    assert res["models"]["model"]["spectrum"]["result"]["dim"] == 512 * 10 + 10


def test_module_spec_imports_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_user_net_i14.py").write_text(
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(3 * 32 * 32, 10))\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        net, key = load_model("module:my_user_net_i14:build", 10)
    finally:
        sys.modules.pop("my_user_net_i14", None)
    assert isinstance(net, torch.nn.Sequential)
    assert set(key) == {"factory source sha256", "factory module sha256"} and "unavailable" not in key.values()
    assert sys.path == path_before  # the current folder is on sys.path only while importing


def test_module_spec_import_error_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_user_net_i14.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.chdir(tmp_path)
    try:
        line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "module:broken_user_net_i14:build",
                               "--out", str(tmp_path / "o")])
    finally:
        sys.modules.pop("broken_user_net_i14", None)
    assert "--model: cannot import module 'broken_user_net_i14' (RuntimeError: boom)" in line


def _resnet18(num_classes: int = 10) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        net.fc.bias.copy_(torch.linspace(-1, 1, num_classes))
        net.layer1[0].bn1.running_mean.fill_(0.25)
    return net


def _assert_loaded(net: torch.nn.Module, ref: torch.nn.Module) -> None:
    got, want = net.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("wrap", ["plain", "trainer", "ddp", "lightning", "lightning_ddp", "lightning_extra"])
def test_checkpoint_layouts_load(tmp_path, wrap):
    pytest.importorskip("torchvision")
    ref = _resnet18()
    sd = ref.state_dict()
    obj = {
        "plain": sd,
        "trainer": {"model": sd, "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 10},
        "lightning_ddp": {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}},
        # a LightningModule holding a loss with a weight besides the network: keys outside the prefix are ignored
        "lightning_extra": {"state_dict": {**{f"net.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(10)}},
    }[wrap]
    path = tmp_path / "ck.pt"
    torch.save(obj, path)
    torch.manual_seed(2)
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    load_checkpoint(net, str(path), 10)
    _assert_loaded(net, ref)


def test_checkpoint_through_the_cli_ddp(tmp_path):
    pytest.importorskip("torchvision")
    ref = _resnet18()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    out = str(tmp_path / "an")
    assert main(["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint", str(path),
                 "--analyses", "hessian", "--batch", "2", "--probes", "1", "--steps", "3", "--trace-probes", "3",
                 "--params", "fc", "--out", out, "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["config"]["checkpoint"] == str(path)


def test_checkpoint_classifier_mismatch_suggests_num_classes(tmp_path, capsys):
    pytest.importorskip("torchvision")
    path = tmp_path / "c100.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _resnet18(100).state_dict().items()}}, path)
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint",
                           str(path), "--out", str(tmp_path / "o")])
    assert "does not match the model" in line
    assert "(keys read with the prefix 'model.' stripped)" in line
    assert "2 key(s) of another shape, first 'fc.weight': checkpoint [100, 512], model [10, 512]" in line
    assert "pass --num-classes 100" in line
    assert "missing" not in line and "unexpected" not in line


def test_checkpoint_missing_and_unexpected_keys_named(tmp_path, capsys):
    pytest.importorskip("torchvision")
    sd = dict(_resnet18().state_dict())
    del sd["layer2.0.conv1.weight"]
    sd["layer2.0.extra.weight"] = torch.zeros(3)
    sd["layer3.0.conv1.weight"] = torch.zeros(4, 4)
    path = tmp_path / "bad.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint",
                           str(path), "--out", str(tmp_path / "o")])
    assert "does not match the model (keys read with the prefix 'module.' stripped)" in line
    assert "1 missing key(s), first 'layer2.0.conv1.weight'" in line
    assert "1 unexpected key(s), first 'layer2.0.extra.weight'" in line
    assert "first 'layer3.0.conv1.weight': checkpoint [4, 4], model [256, 128, 3, 3]" in line
    assert "--num-classes" not in line


def test_checkpoint_two_matching_prefixes_and_no_state_dict(tmp_path):
    pytest.importorskip("torchvision")
    import torchvision

    sd = _resnet18().state_dict()
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema.{k}": v for k, v in sd.items()}}},
               path)
    net = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(UsageError, match=r"holds the model's keys under several prefixes \['ema\.', 'model\.'\]"):
        load_checkpoint(net, str(path), 10)
    torch.save({"epoch": 3, "model": "resnet18"}, path)
    with pytest.raises(UsageError, match="holds no state dict"):
        load_checkpoint(net, str(path), 10)
    # "model" holding a name (a Lightning hyper-parameter) and the weights under state_dict
    torch.save({"model": "resnet18", "state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    load_checkpoint(net, str(path), 10)
    _assert_loaded(net, _resnet18())
