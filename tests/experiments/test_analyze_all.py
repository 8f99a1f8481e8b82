"""``resgeom analyze`` runs all five analyses on a user's network and data (issue 14): a folder of
200 small PNGs in 4 classes written here, a checkpoint of a randomly initialised torchvision /
timm resnet18, ``--analyses all`` through ``resgeom_fast.cli.main``; results.json holds the five
analyses with finite numbers, report.md their sections, and the five CSV tables equal
results.json. One number is checked against an independent computation (the last block's
nearest-class-centre mismatch from plain forward hooks on the checkpoint's model, over the
images torchvision's own ImageFolder reads at the documented indices). Then the new flags:
``--blocks``, ``--loss`` (Hessian eigenvalues against a dense float64 Hessian), ``--eigs``,
``--batch-size`` and their one-line errors.
"""
from __future__ import annotations

import csv
import json
import math
import os
import textwrap

import numpy as np
import pytest
import torch

from resgeom_fast import cli
from resgeom_fast.cli import main
from resgeom_fast.experiments import commands
from resgeom_fast.experiments.common import sample_indices
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.studies import analyze as analyze_study
from resgeom_fast.experiments.tables import COLUMNS, TABLE_FILES
from tests.experiments._cli import UserModule
from tests.experiments._cli import one_line_error as _error
from tests.experiments.test_tables import _lookup as _lookup_alignment_hessian
from tests.helpers import randomise_batchnorm

tv = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
try:
    import timm
except ImportError:  # the timm case skips; the others run
    timm = None

pytestmark = [pytest.mark.filterwarnings("ignore:residual_alignment. the randomized SVD did not reach:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:hessian_spectrum. .* not resolved by steps:UserWarning"),
              pytest.mark.filterwarnings("ignore:Tight layout not applied:UserWarning")]

CLASSES = ("ant", "bee", "cat", "dog")
N_IMAGES = 200
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]  # resnet18's blocks (torchvision and timm)
ANALYSIS_KEYS = {"alignment": "alignment", "hessian": "spectrum", "collapse": "collapse",
                 "singularities": "singularities", "expansion": "expansion"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """200 RGB PNGs of 16 x 16 in 4 class subfolders, with a class-dependent colour shift."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(N_IMAGES // len(CLASSES)):
            arr = rng.integers(0, 200, size=(16, 16, 3)).astype(np.int64)
            arr[..., c % 3] += 40 + 10 * c
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _checkpoint(path, family: str):
    """A state dict of a randomly initialised resnet18 with 4 classes (weights unlike --seed's)."""
    torch.manual_seed(1234)
    if family == "torchvision":
        model = tv.models.resnet18(weights=None, num_classes=len(CLASSES))
    else:
        model = timm.create_model("resnet18", pretrained=False, num_classes=len(CLASSES))
    randomise_batchnorm(model, torch.Generator().manual_seed(5), mean=0.1, weight=0.5, bias=0.1)
    torch.save(model.state_dict(), path)
    return model.eval()


def _argv(model: str, ck, root, out, *extra: str) -> list[str]:
    return ["analyze", "--model", model, "--checkpoint", str(ck), "--data", f"imagefolder:{root}",
            "--num-classes", "4", "--analyses", "all", "--samples", "24", "--batch-size", "8", "--k", "2",
            "--power-iters", "1", "--oversample", "2", "--probes", "1", "--steps", "4", "--trace-probes", "3",
            "--params", "layer4.1.bn2,fc", "--out", str(out), "--quiet", *extra]


def _numbers(obj, path=""):
    """(path, value) of every number in a JSON value."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}.{i}")


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and tuple(rows[0]) == COLUMNS
    return rows


def _row(rows, **match) -> dict:
    found = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert len(found) == 1, (match, found[:3])
    return found[0]


def _lookup(res: dict, row: dict):
    """The number of results.json a CSV row of any of the five tables stands for."""
    if row["analysis"] in ("alignment", "hessian"):
        return _lookup_alignment_hessian(res, row)
    entry = res["models"][row["model"]][row["analysis"]]
    metric = row["metric"]
    if row["analysis"] == "collapse":
        if row["scope"] == "model":
            return entry["summary"][metric]
        return entry["result"][metric][entry["result"]["layers"].index(int(row["layer"]))]
    if row["analysis"] == "singularities":
        result = entry["result"]
        if row["scope"] == "layer":
            (layer,) = [l for l in result["layers"] if l["name"] == row["layer"]]
            return layer[metric]
        group, _, key = metric.partition(".")
        if key:
            return result[group][key]
        return entry["summary"][metric] if metric in entry["summary"] else result[metric]
    # expansion
    if row["scope"] == "model":
        return entry["summary"][metric]
    run = entry["runs"][int(row["stage"])]
    assert row["block"] == f"{run['blocks'][0]}..{run['blocks'][-1]}"
    if metric in run["summary"]:
        return run["summary"][metric]
    name, _, m = metric.rstrip("]").partition("[")
    return run["result"][name][int(m)] if m else run["result"][name]


def _ncc_mismatch_last(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, block_type: type) -> float:
    """Independent of the package: the last residual block's output by a plain forward hook, global
    average pooled, nearest class mean (Euclidean) against the label, in float64 numpy."""
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    got = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: got.append(o.detach().double().mean(dim=(2, 3))))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        h.remove()
    f, labels = got[0].numpy(), y.numpy()
    mu = np.stack([f[labels == c].mean(0) for c in range(len(CLASSES))])
    pred = np.argmin(((f[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(pred != labels))


@pytest.mark.slow  # 15-30 s each on the 2-core CI machine (report figures included)
@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_analyze_all_five_on_an_image_folder_and_a_checkpoint(tmp_path, image_folder, family):
    if family == "timm" and timm is None:
        pytest.skip("timm is not installed")
    ck = tmp_path / "ck.pt"
    ref_model = _checkpoint(ck, family)
    out = tmp_path / "out"
    assert main(_argv(f"{family}:resnet18", ck, image_folder, out)) == 0

    res = json.load(open(out / "results.json"))
    assert res["config"]["analyses"] == list(ANALYSIS_KEYS)
    entry = res["models"]["model"]
    assert set(ANALYSIS_KEYS.values()) <= set(entry)
    for key in ANALYSIS_KEYS.values():  # every number finite (JSON holds NaN / inf as null)
        nums = list(_numbers(entry[key]))
        assert nums and all(math.isfinite(v) for _, v in nums), key
    # the headline numbers are defined
    al, sp, co = entry["alignment"], entry["spectrum"], entry["collapse"]
    # stages of equal-shape blocks; the stage-opening blocks change shape: listed as skipped
    assert [st["block_names"] for st in al["result"]["stages"]] == [BLOCKS[:2], BLOCKS[3:4], BLOCKS[5:6], BLOCKS[7:]]
    assert [b["name"] for b in al["result"]["skipped_blocks"]] == [BLOCKS[2], BLOCKS[4], BLOCKS[6]]
    assert len(sp["result"]["eigenvalues"]) == 2 and sp["result"]["dim"] == 512 + 512 + 512 * 4 + 4
    assert co["result"]["layers"] == list(range(9)) and all(v is not None for v in co["result"]["nc1"])
    assert co["result"]["num_samples"] == 24 and sum(co["result"]["class_counts"]) == 24
    sing = entry["singularities"]["result"]
    assert sing["layers"] and sing["num_samples"] == 24
    assert all(layer["dead_fraction"] is not None for layer in sing["layers"])
    runs = entry["expansion"]["runs"]
    assert [r["blocks"] for r in runs] == [BLOCKS]          # the whole stack is one plain run
    ex = runs[0]["result"]
    assert ex["num_blocks"] == 8 and len(ex["norms_mean"]) == 9 and ex["total_norm_mean"] > 0
    assert sum(ex["distribution"]) == pytest.approx(1.0, abs=1e-9)

    # independent: the checkpoint's weights on the images torchvision's ImageFolder reads at the
    # documented indices (the first --samples of the --seed permutation of max(samples, batch))
    T = tv.transforms
    ds = tv.datasets.ImageFolder(str(image_folder), transform=T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    idx = sample_indices(N_IMAGES, 24, 0)
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor([ds[i][1] for i in idx])
    block_type = (tv.models.resnet.BasicBlock if family == "torchvision" else timm.models.resnet.BasicBlock)
    want = _ncc_mismatch_last(ref_model, x, y, block_type)
    assert co["result"]["ncc_mismatch"][-1] == pytest.approx(want, abs=1e-12)
    assert co["summary"]["ncc_mismatch_last"] == pytest.approx(want, abs=1e-12)

    # report.md: a section per analysis and its summary rows
    report = open(out / "report.md").read()
    for title in ("Singular values of the residual Jacobians", "Hessian spectral density",
                  "Collapse metrics against depth", "Singularities per layer", "Path-order decomposition per run"):
        assert f"## {title}" in report, title
    for analysis in ("alignment", "spectrum", "collapse", "singularities", "expansion"):
        assert f"| {analysis} |" in report, analysis
    figures = set(os.listdir(out / "figures"))
    assert {"collapse_depth.png", "singularities.png", "path_orders.png", "hessian_density.png"} <= figures

    # the five CSV tables: parsed, every row's value is results.json's
    tables = {name: _csv_rows(out / name) for name in TABLE_FILES.values()}
    assert float(_row(tables["collapse.csv"], scope="layer", layer=8, metric="ncc_mismatch")["value"]) == \
        co["result"]["ncc_mismatch"][8]
    assert _row(tables["collapse.csv"], scope="layer", layer=8, metric="nc1")["block"] == "layer4.1"
    assert float(_row(tables["hessian.csv"], metric="eigenvalues[1]")["value"]) == sp["result"]["eigenvalues"][1]
    assert float(_row(tables["expansion.csv"], scope="run", stage=0, metric="norms_mean[3]")["value"]) == \
        ex["norms_mean"][3]
    assert float(_row(tables["expansion.csv"], scope="run", stage=0, metric="mean_order")["value"]) == \
        runs[0]["summary"]["mean_order"]
    first = sing["layers"][0]
    assert float(_row(tables["singularities.csv"], scope="layer", layer=first["name"],
                      metric="dead_fraction")["value"]) == first["dead_fraction"]
    assert float(_row(tables["alignment.csv"], scope="block", stage=0, block_index=1,
                      metric="ra4.sigma1_mean")["value"]) == al["result"]["stages"][0]["ra4"]["sigma1_mean"][1]
    for name, rows in tables.items():
        for r in rows:  # every row is results.json's number; an undefined value says why
            want = _lookup(res, r)
            if want is None:
                assert r["value"] == "" and r["reason"], (name, r)
            else:
                assert float(r["value"]) == float(want) and math.isfinite(float(r["value"])), (name, r, want)
    manifest = json.load(open(out / "manifest.json"))
    assert set(TABLE_FILES.values()) <= set(manifest["written"])


# ----------------------------------------------------------------------------- flags
TINY = textwrap.dedent("""
    import torch

    from resgeom_fast.models import ConvResNet


    def net():
        return ConvResNet(3, 4, 2, 10, seed=0)


    def net2():
        return ConvResNet(3, 4, 2, 2, seed=0)


    class LogProbs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ConvResNet(3, 4, 2, 10, seed=0)

        def forward(self, x):
            return torch.log_softmax(self.net(x), dim=1)


    def logprobs():
        return LogProbs()
    """)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """``module:<name>``: a tiny ConvResNet (factory ``net``; ``net2`` with 2 classes) and the same
    net ending in log_softmax (factory ``logprobs``)."""
    mod = UserModule(tmp_path, monkeypatch, "aa_tiny")
    yield f"module:{mod.write(TINY)}"
    mod.forget()


def _kw(model: str, out, **over) -> dict:
    kw = dict(model=model, checkpoint=None, data="random-cifar", samples=4, batch=6, k=2, power_iters=0, oversample=2,
              probes=1, steps=60, trace_probes=3, analyses="hessian", out=str(out), progress=False)
    kw.update(over)
    return kw


def _dense_eigenvalues(model: torch.nn.Module, x, y, loss: str) -> np.ndarray:
    """Eigenvalues of the dense float64 Hessian of the mean loss over the head's parameters
    (torch.func.hessian; the rest of the net is fixed)."""
    model = model.double().eval()
    head = model.head
    with torch.no_grad():
        feats = []
        h = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
        model(x.double())
        h.remove()
    f = feats[0]
    w0, b0 = head.weight.detach(), head.bias.detach()

    def loss_of(theta):
        w, b = theta[:w0.numel()].view_as(w0), theta[w0.numel():]
        z = f @ w.T + b
        if loss == "mse":
            return torch.nn.functional.mse_loss(z, torch.nn.functional.one_hot(y, z.shape[1]).double())
        return torch.nn.functional.cross_entropy(z, y)

    theta = torch.cat([w0.flatten(), b0])
    H = torch.func.hessian(loss_of)(theta)
    return np.linalg.eigvalsh(H.numpy())


@pytest.mark.parametrize("loss", ["ce", "mse", "nll"])
def test_loss_sets_the_hessians_loss(tmp_path, tiny, loss):
    """The extreme eigenvalues over the head (50 parameters, 60 Lanczos steps: exact) against a
    dense float64 Hessian; nll on the log_softmax-ed net equals ce on the logits."""
    factory = f"{tiny}:{'logprobs' if loss == 'nll' else 'net'}"
    params = "net.head" if loss == "nll" else "head"
    rep = commands.analyze(**_kw(factory, tmp_path / loss, loss=loss, params=params, eigs=4))
    res = json.load(open(rep.results_path))
    assert res["config"]["loss"] == loss and res["config"]["eigs"] == 4 and res["config"]["batch"] == 6
    got = np.array(res["models"]["model"]["spectrum"]["result"]["eigenvalues"])
    assert len(got) == 4
    setup = analyze_study.prepare(**{k: v for k, v in _kw(factory, tmp_path / "p").items() if k != "progress"})
    x, y = setup.x[:6], setup.y[:6]
    net = setup.net.net if loss == "nll" else setup.net
    want = _dense_eigenvalues(net, x, y, "ce" if loss == "nll" else loss)
    ends = np.concatenate([want[:2], want[-2:]])
    # float32 products: the near-zero end to 1e-5 of the largest eigenvalue
    assert np.allclose(np.sort(got), ends, rtol=1e-4, atol=1e-5 * abs(want).max()), (got, ends)


def test_nll_on_logits_is_refused(tmp_path, tiny):
    with pytest.raises(UsageError, match=r"^--loss nll: expected the model to output log-probabilities "
                                         r"\(logsumexp of every output row 0\), got logsumexp up to"):
        analyze_study.prepare(**{k: v for k, v in _kw(f"{tiny}:net", tmp_path / "o", loss="nll").items()
                                 if k != "progress"})


def test_blocks_select_alignment_collapse_and_expansion(tmp_path):
    out = tmp_path / "o"
    rep = commands.analyze(**_kw("torchvision:resnet18", out, analyses="alignment,collapse,expansion", samples=20,
                                 num_classes=2, blocks="1-2,layer4.1"))
    res = json.load(open(rep.results_path))
    assert res["config"]["blocks"] == ["layer1.1", "layer2.0", "layer4.1"]
    entry = res["models"]["model"]
    al = entry["alignment"]["result"]
    assert [st["block_names"] for st in al["stages"]] == [["layer1.1"], ["layer4.1"]]
    assert [b["name"] for b in al["skipped_blocks"]] == ["layer2.0"]            # changes shape: no stage
    assert entry["collapse"]["result"]["layers"] == [2, 3, 8]       # h_l = the output of block l - 1
    # expansion: the one plain run of resnet18, restricted to the selection, splits where it skips
    assert [r["blocks"] for r in entry["expansion"]["runs"]] == [["layer1.1", "layer2.0"], ["layer4.1"]]
    assert [r["result"]["num_blocks"] for r in entry["expansion"]["runs"]] == [2, 1]


def test_adding_an_analysis_computes_only_it(tmp_path, tiny):
    out = tmp_path / "o"
    kw = dict(samples=6, num_classes=2, steps=4)
    commands.analyze(**_kw(f"{tiny}:net2", out, analyses="hessian", **kw))
    first = json.load(open(out / "steps" / "hessian.json"))
    commands.analyze(**_kw(f"{tiny}:net2", out, analyses="all", **kw))
    assert json.load(open(out / "steps" / "hessian.json")) == first      # loaded, not recomputed
    res = json.load(open(out / "results.json"))
    assert set(res["models"]["model"]) == {"alignment", "spectrum", "collapse", "singularities", "expansion"}
    # one of the Hessian's own settings re-keys it
    commands.analyze(**_kw(f"{tiny}:net2", out, analyses="all", eigs=3, **kw))
    assert json.load(open(out / "steps" / "hessian.json"))["hash"] != first["hash"]


@pytest.mark.parametrize("kw, expected", [
    (dict(analyses="alignment,frobnicate"),
     "--analyses: unknown analysis ['frobnicate']; allowed: alignment, hessian, collapse, singularities, expansion, all"),
    (dict(analyses=" , "), "--analyses: unknown analysis []; allowed:"),
    (dict(loss="l1"), "--loss: expected one of ['ce', 'mse', 'nll'], got 'l1'"),
    (dict(eigs="1"), "--eigs: expected an int >= 2, got '1'"),
    (dict(eigs="two"), "--eigs: expected an int >= 2, got 'two'"),
    (dict(eigs="51", params="head"), "--eigs: expected an int in [2, 50] (the Hessian spans 50 parameters; at most "
                                     "500), got '51'"),
    (dict(batch="0"), "--batch-size: expected an int >= 1, got '0'"),
    (dict(blocks="7"), "--blocks: expected indices in [0, 1] (ranges A-B with A <= B), got '7'; the model's 2 "
                       "residual blocks are 0:blocks.0, 1:blocks.1"),
    (dict(blocks="1-0"), "--blocks: expected indices in [0, 1] (ranges A-B with A <= B), got '1-0'"),
    (dict(blocks="layer9"), "--blocks: no residual block named 'layer9'; the model's 2 residual blocks are "
                            "0:blocks.0, 1:blocks.1"),
    (dict(blocks=","), "--blocks: expected a comma list of block indices, ranges A-B or names, got ','"),
    (dict(analyses="collapse", samples=3),
     "--samples: collapse needs at least one sample of every class among the 3 analysed inputs (--samples 3), got "),
])
def test_flag_errors_name_the_flag(tmp_path, tiny, kw, expected):
    with pytest.raises(UsageError) as info:
        analyze_study.prepare(**{k: v for k, v in _kw(f"{tiny}:net", tmp_path / "o", **kw).items() if k != "progress"})
    msg = str(info.value)
    assert expected in msg and "\n" not in msg, msg


def test_singularities_failing_is_one_line(tmp_path, capsys, monkeypatch):
    """An analysis that refuses the model (here: singularities made to find no layers) fails its
    step with one line naming it, no traceback, no number; the finished steps are kept."""
    def refuse(net, data, **kw):
        raise ValueError("singularities: found no layers of units in ResNet")

    monkeypatch.setattr(analyze_study.singularities_analysis, "singularities", refuse)
    out = tmp_path / "o"
    line = _error(capsys, ["analyze", "--model", "torchvision:resnet18", "--data", "random-cifar", "--num-classes",
                           "2", "--analyses", "collapse,singularities", "--samples", "8", "--out", str(out),
                           "--quiet"])
    assert line == ("resgeom: error: --analyses singularities: ValueError: singularities: found no layers of units in "
                    "ResNet (finished steps are kept: run again without singularities in --analyses)")
    assert (out / "steps" / "collapse.json").is_file() and not (out / "results.json").exists()


def test_batch_size_and_batch_are_one_flag():
    parser = cli.build_parser()
    base = ["analyze", "--model", "m", "--data", "d"]
    assert parser.parse_args(base + ["--batch-size", "5"]).batch == "5"
    assert parser.parse_args(base + ["--batch", "7"]).batch == "7"
    assert parser.parse_args(base).batch == "32"


# cli.py (not this module's) passes --blocks / --loss / --eigs to commands.analyze only once it
# names them; until then the flags parse but would not reach the analyses
def test_new_flags_reach_the_analyses_from_the_command_line(tmp_path, capsys):
    # without the flags' errors the run stops at once (collapse on one sample: a usage error)
    base = ["analyze", "--model", "torchvision:resnet18", "--data", "random-cifar", "--num-classes", "2",
            "--analyses", "collapse", "--samples", "1", "--out", str(tmp_path / "o")]
    assert "--eigs: expected an int >= 2, got '1'" in _error(capsys, base + ["--eigs", "1"])
    assert "--loss: expected one of ['ce', 'mse', 'nll'], got 'l2'" in _error(capsys, base + ["--loss", "l2"])
    line = _error(capsys, base + ["--blocks", "8"])
    assert "--blocks: expected indices in [0, 7]" in line and "0:layer1.0, 1:layer1.1" in line
