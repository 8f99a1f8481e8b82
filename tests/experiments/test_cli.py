"""The `resgeom` command: one-line errors with exit code 2, --list-options, analyze on
torchvision's resnet18, the bench ratio table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from resgeom_fast.cli import main
from resgeom_fast.experiments.report import check_figure
from tests.experiments._cli import one_line_error as _error

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("argv, expected", [
    (["run", "nope"], "unknown study 'nope'; allowed: alignment, hessian, singularities, collapse, expansion, leaky"),
    (["run", "nope", "--list-options"], "unknown study 'nope'; allowed: alignment"),
    (["run", "alignment", "--set", "widht=3"], "unknown option 'widht' for alignment; allowed: align_samples, "
                                               "batch_size, "),
    (["run", "alignment", "--set", "width=-1"], "expected width an int >= 1, got -1"),
    (["run", "alignment", "--set", "norm=layer"], "expected norm one of ['batch', 'none'], got 'layer'"),
    (["run", "alignment", "--set", "model=mlp"], "expected model one of ['fc', 'conv']"),
    (["run", "alignment", "--set", "width"], "--set: expected key=value, got 'width'"),
    (["run", "hessian", "--config", "/nonexistent/c.json"], "config file not found: '/nonexistent/c.json'"),
    (["run", "hessian", "--set", "archs=plain,resnet", "--set", "epochs=0", "--out", "{tmp}"],
     "archs: unknown architecture(s) ['resnet']; allowed: plain, residual, hyper, orthogonal, plain_biasreg"),
    (["run", "alignment", "--set", "dataset=imagenet", "--out", "{tmp}"],
     "dataset: unknown data set 'imagenet'; allowed: digits | gaussian_mixture | torchvision:NAME:ROOT"),
    (["run", "alignment", "--set", "dataset=torchvision:svhn:/tmp", "--out", "{tmp}"],
     "unknown torchvision data set 'svhn'; allowed: mnist, fashionmnist, cifar10, cifar100"),
    (["run", "alignment", "--set", "dataset=torchvision:mnist:/nonexistent", "--out", "{tmp}"],
     "dataset: mnist files not found under '/nonexistent' (nothing is downloaded)"),
    (["run", "alignment", "--set", "device=tpu"], "device: expected one of ['cpu', 'cuda', 'cuda:N'], got 'tpu'"),
    (["demo", "--size", "huge"], "--size: expected one of ['tiny', 'default'], got 'huge'"),
    (["demo", "--seed", "x"], "--seed: expected an int >= 0, got 'x'"),
    (["frobnicate"], "resgeom: error: argument {demo,run,analyze,bench}: invalid choice: 'frobnicate'"),
    (["run"], "resgeom: error: run: the following arguments are required: study"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["analyze", "--data", "random-cifar", "--model", "torchvision:vgg11"], "--model: unknown torchvision model 'vgg11'; allowed: resnet101,"),
    (["analyze", "--data", "random-cifar", "--model", "resnet18"], "--model: expected torchvision:NAME or module:package.module:factory"),
    (["analyze", "--data", "random-cifar", "--model", "module:no.such.mod:f"], "--model: cannot import module 'no.such.mod'"),
    (["analyze", "--data", "random-cifar", "--model", "module:torch.nn:nothing"], "--model: module 'torch.nn' has no callable 'nothing'"),
    (["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint", "/nonexistent.pt"],
     "--checkpoint: file not found: '/nonexistent.pt'"),
    (["analyze", "--model", "torchvision:resnet18", "--data", "mnist"],
     "--data: expected digits, random-cifar, torchvision:NAME:ROOT, imagefolder:PATH, tensors:FILE.pt, got 'mnist'"),
    (["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--analyses", "alignment,frobnicate"],
     "--analyses: unknown analysis ['frobnicate']; allowed: alignment, hessian, collapse, singularities, expansion, all"),
    (["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--params", "layer9"],
     "--params: no parameter or module named ['layer9']; top-level modules: conv1, bn1, relu, maxpool, layer1,"),
    (["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--samples", "0"], "--samples: expected an int >= 1, got '0'"),
    (["bench", "--benchmarks", "/nonexistent"], "bench: benchmarks folder not found at '/nonexistent'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path / "out")) for a in argv]
    line = _error(capsys, argv)
    assert expected in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(capsys):
    assert "no CUDA GPU is visible; use --device cpu" in _error(capsys, ["demo", "--device", "cuda", "--size", "tiny"])


def test_bad_checkpoint_and_config_contents(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, bad)
    line = _error(capsys, ["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint", str(bad)])
    assert "does not match the model" in line
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"depthh": 3}))
    line = _error(capsys, ["run", "collapse", "--config", str(cfg)])
    assert "config: unknown option 'depthh' for collapse; allowed:" in line
    ycfg = tmp_path / "c.yaml"
    ycfg.write_text("depth: 3\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        line = _error(capsys, ["run", "collapse", "--config", str(ycfg)])
        assert "YAML needs PyYAML (pip install pyyaml); or write the config as JSON" in line


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "resgeom_fast", "run", "nope"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "resgeom: error: unknown study 'nope'; allowed: alignment, hessian, singularities, collapse, expansion, leaky"]


def test_list_options(capsys):
    assert main(["run", "leaky", "--list-options"]) == 0
    out = capsys.readouterr().out
    assert "lts" in out and "teacher_dims" in out and "expected:" in out


def test_analyze_torchvision_resnet18(tmp_path, capsys):
    """Random-weight torchvision resnet18 (num_classes=10) on CIFAR-sized random inputs: residual
    alignment per stage and the Hessian spectrum (restricted to the head and the last BN for speed),
    then a re-run that loads both steps."""
    out = str(tmp_path / "an")
    argv = ["analyze", "--model", "torchvision:resnet18", "--data", "random-cifar", "--samples", "2", "--batch", "4",
            "--k", "2", "--power-iters", "0", "--oversample", "2", "--probes", "2", "--steps", "4", "--trace-probes",
            "3", "--params", "fc,layer4.1.bn2", "--out", out, "--quiet"]
    assert main(argv) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    al = res["models"]["model"]["alignment"]["result"]
    assert al["settings"]["per_stage"] is True
    assert [st["shape"] for st in al["stages"]] == [[64, 8, 8], [128, 4, 4], [256, 2, 2], [512, 1, 1]]
    assert [len(st["block_names"]) for st in al["stages"]] == [2, 1, 1, 1]  # downsampling blocks are skipped
    assert len(al["skipped_blocks"]) == 3
    sp = res["models"]["model"]["spectrum"]["result"]
    assert sp["dim"] == 512 * 10 + 10 + 2 * 512
    assert sp["param_names"] == ["layer4.1.bn2.weight", "layer4.1.bn2.bias", "fc.weight", "fc.bias"]
    assert len(sp["eigenvalues"]) == 2 and len(sp["density"]) > 0
    for name in ("ra_singular_values", "ra_sigma1", "hessian_density"):
        assert os.path.isfile(os.path.join(out, "figures", f"{name}.png"))
    # every plotted number comes from results.json
    from resgeom_fast.experiments.commands import _stage_figures
    from resgeom_fast.experiments.studies import _density_figure
    import matplotlib.pyplot as plt

    for spec in _stage_figures(res["models"]["model"]["alignment"]) + [_density_figure(["model"])]:
        fig = spec.build(res)
        assert check_figure(fig, res) >= 1
        plt.close(fig)
    steps_before = {f: os.stat(os.path.join(out, "steps", f)).st_mtime_ns for f in os.listdir(os.path.join(out, "steps"))}
    assert main(argv) == 0
    assert steps_before == {f: os.stat(os.path.join(out, "steps", f)).st_mtime_ns
                            for f in os.listdir(os.path.join(out, "steps"))}


def test_analyze_loads_a_checkpoint(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        net.fc.bias.fill_(0.5)
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    out = str(tmp_path / "an")
    assert main(["analyze", "--data", "random-cifar", "--model", "torchvision:resnet18", "--checkpoint", str(path), "--analyses", "hessian",
                 "--batch", "2", "--probes", "1", "--steps", "3", "--trace-probes", "3", "--params", "fc",
                 "--out", out, "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["config"]["checkpoint"] == str(path)
    assert res["models"]["model"]["spectrum"]["result"]["dim"] == 5130


def test_bench_ratio_table(tmp_path):
    from resgeom_fast.experiments.commands import ratio_table

    data = {"machine_info": {"cpu": {"brand_raw": "cpu", "count": 2}}, "datetime": "2026-11-23T00:00:00",
            "benchmarks": [{"group": "g", "params": {"impl": "ours"}, "stats": {"mean": 0.001}},
                           {"group": "g", "params": {"impl": "reference"}, "stats": {"mean": 0.004},
                            "extra_info": {"err": 1e-7}}]}
    p = tmp_path / "b.json"
    p.write_text(json.dumps(data))
    table = ratio_table(str(p), os.path.join(REPO, "benchmarks"))
    assert "| g | ours | 1.00 | 1.00 |  |" in table
    assert "| g | reference | 4.00 | 4.00 | err=1e-07 |" in table
