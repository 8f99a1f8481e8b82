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
from resgeom_fast.experiments.studies.analyze import load_model

try:
    import timm
except ImportError:  # the timm tests skip; the others run
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("resgeom: error: "), err
    return lines[0]


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
