"""``resgeom analyze`` on the user's own data (issue 14): ``--data imagefolder:PATH`` (torchvision
ImageFolder, ``--image-size``, ImageNet normalisation unless ``--no-normalize``) and
``--data tensors:FILE.pt`` (a dict {"x", "y"} or a tuple (x, y)); ``--data`` is required.

The tensors analysed are checked against torchvision's own ImageFolder with the same transform at
the documented indices (the first n of ``torch.randperm(N)`` from a generator seeded with
--seed); a changed image that is read re-keys the steps, one that is not read does not.
"""
from __future__ import annotations

import inspect
import json
import os
import textwrap

import numpy as np
import pytest
import torch

from resgeom_fast.cli import main
from resgeom_fast.experiments import commands
from resgeom_fast.experiments.common import data_key_parts, sample_indices
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.studies import analyze as analyze_study
from tests.experiments._cli import UserModule
from tests.experiments._cli import one_line_error as _error

tv = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

FACTORY = textwrap.dedent("""
    from resgeom_fast.models import ConvResNet


    def net():
        return ConvResNet(3, 4, 2, 10, seed=0)
    """)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
pytestmark = pytest.mark.filterwarnings("ignore:residual_alignment. the randomized SVD did not reach:RuntimeWarning")
PLUMBED = "image_size" in inspect.signature(commands.analyze).parameters


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``module:<name>:net``, a tiny ConvResNet (3 channels, 10 classes) of a module written to tmp_path."""
    mod = UserModule(tmp_path, monkeypatch, "ud_tinynet")
    yield f"module:{mod.write(FACTORY)}:net"
    mod.forget()


def _write_folder(root, classes=("cat", "dog"), per_class=12, size=(16, 16), seed=0):
    """``root/<class>/<i>.png``: random RGB PNGs of ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


def _reference(root, indices, transform):
    """x, y of torchvision's ImageFolder at ``indices``: the independent truth."""
    ds = tv.datasets.ImageFolder(str(root), transform=transform)
    xs, ys = zip(*(ds[i] for i in indices))
    return torch.stack(xs), torch.tensor(ys)


def _argv(model, data, out, *extra):
    return ["analyze", "--model", model, "--data", data, "--samples", "4", "--k", "2", "--power-iters", "0",
            "--oversample", "2", "--analyses", "alignment", "--out", str(out), "--quiet", *extra]


@pytest.fixture
def spy(monkeypatch):
    """The inputs and labels residual_alignment is called with."""
    seen = []
    real = analyze_study.alignment_analysis.residual_alignment

    def wrapped(net, x, *a, **k):
        seen.append((x.detach().clone(), a[1].detach().clone() if len(a) > 1 else None))
        return real(net, x, *a, **k)

    monkeypatch.setattr(analyze_study.alignment_analysis, "residual_alignment", wrapped)
    return seen


def test_sample_indices_are_a_seeded_permutation_prefix():
    gen = torch.Generator().manual_seed(3)
    assert sample_indices(24, 5, 3) == torch.randperm(24, generator=gen)[:5].tolist()
    assert sample_indices(24, 8, 3)[:5] == sample_indices(24, 5, 3)          # a larger n extends a smaller one
    assert sorted(sample_indices(24, 99, 3)) == list(range(24))              # capped at the data's size
    assert sample_indices(24, 5, 4) != sample_indices(24, 5, 3)


def test_imagefolder_end_to_end_analyses_torchvisions_imagefolder_tensors(tmp_path, factory, spy, capsys):
    root = _write_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(_argv(factory, f"imagefolder:{root}", out, "--seed", "1")) == 0
    T = tv.transforms
    # n = max(--samples 4, --batch 32) capped at the 24 images; alignment reads the first 4
    want_x, want_y = _reference(root, sample_indices(24, 32, 1),
                                T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    (x, y), = spy
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, want_x[:4]) and torch.equal(y, want_y[:4])
    # the loader itself, called directly, gives the same tensors
    lx, ly = analyze_study.analyze_data(f"imagefolder:{root}", 32, 10, 1, need=4)
    assert torch.equal(lx, want_x) and torch.equal(ly, want_y) and set(ly.tolist()) == {0, 1}
    res = json.load(open(out / "results.json"))
    assert res["config"]["data"] == f"imagefolder:{root}"
    assert res["config"]["image_size"] is None and res["config"]["normalize"] == "imagenet"
    prov = res["provenance"]
    assert prov["data files sha256"] == data_key_parts(f"imagefolder:{root}", samples=32, seed=1)["data files sha256"]
    assert "data file list sha256" in prov


def test_image_size_and_no_normalize_match_torchvision(tmp_path):
    root = _write_folder(tmp_path / "imgs", size=(20, 14), per_class=5)   # not square: resize then crop
    T = tv.transforms
    for size, norm, transform in [
        (8, "none", T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])),
        (10, "imagenet", T.Compose([T.Resize(10), T.CenterCrop(10), T.ToTensor(), T.Normalize(MEAN, STD)])),
    ]:
        x, y = analyze_study.analyze_data(f"imagefolder:{root}", 6, 10, 2, image_size=size, normalize=norm)
        wx, wy = _reference(root, sample_indices(10, 6, 2), transform)
        assert x.shape == (6, 3, size, size)
        assert torch.equal(x, wx) and torch.equal(y, wy)
    x, _ = analyze_study.analyze_data(f"imagefolder:{root}", 6, 10, 2, image_size=8, normalize="none")
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0                  # unnormalised: in [0, 1]


@pytest.mark.skipif(not PLUMBED, reason="cli.main / commands.analyze do not pass --image-size / --normalize to "
                                        "prepare yet (issue 14: see the userdata helper's report)")
def test_image_size_and_no_normalize_from_the_command_line(tmp_path, factory, spy):
    root = _write_folder(tmp_path / "imgs", size=(20, 14), per_class=5)
    out = tmp_path / "out"
    assert main(_argv(factory, f"imagefolder:{root}", out, "--image-size", "8", "--no-normalize")) == 0
    T = tv.transforms
    wx, wy = _reference(root, sample_indices(10, 32, 0), T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()]))
    (x, y), = spy
    assert torch.equal(x, wx[:4]) and torch.equal(y, wy[:4])
    cfg = json.load(open(out / "results.json"))["config"]
    assert cfg["image_size"] == 8 and cfg["normalize"] == "none"


def test_a_changed_image_that_is_read_recomputes_one_not_read_does_not(tmp_path, factory, capsys):
    root = _write_folder(tmp_path / "imgs")
    spec = f"imagefolder:{root}"
    out = tmp_path / "out"
    argv = _argv(factory, spec, out, "--batch", "4")                 # reads 4 of the 24 images
    argv.remove("--quiet")
    assert main(argv) == 0
    first = json.load(open(out / "results.json"))["models"]["model"]["alignment"]["summary"]
    capsys.readouterr()
    files = sorted((p.relative_to(root).as_posix() for p in root.rglob("*.png")))
    read = sample_indices(24, 4, 0)
    unread = next(i for i in range(24) if i not in read)

    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / files[unread])
    assert main(argv) == 0
    assert "step alignment: finished earlier, loaded from steps/alignment.json" in capsys.readouterr().err

    Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / files[read[0]])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "step alignment: what it depends on changed since it was stored (data files sha256:" in err
    assert "recomputing" in err
    second = json.load(open(out / "results.json"))["models"]["model"]["alignment"]["summary"]
    truth_out = tmp_path / "truth"                                    # the truth: a fresh folder
    assert main(_argv(factory, spec, truth_out, "--batch", "4")) == 0
    truth = json.load(open(truth_out / "results.json"))["models"]["model"]["alignment"]["summary"]
    assert second == truth and second != first

    (root / "zebra").mkdir()                                          # a new class re-lists (labels shift)
    Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / "zebra" / "0.png")
    assert main(argv) == 0
    assert "data file list sha256:" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["dict", "tuple", "list"])
def test_tensors_file_dict_and_tuple(tmp_path, factory, spy, form):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 3, 12, 12, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    obj = {"dict": {"x": x, "y": y}, "tuple": (x, y), "list": [x, y]}[form]
    path = tmp_path / "data.pt"
    torch.save(obj, path)
    out = tmp_path / "out"
    assert main(_argv(factory, f"tensors:{path}", out, "--seed", "2")) == 0
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(2))[:4]
    (sx, sy), = spy
    assert torch.equal(sx, x[idx]) and torch.equal(sy, y[idx])
    res = json.load(open(out / "results.json"))
    import hashlib

    assert res["provenance"]["data files sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert res["config"]["image_size"] is None and res["config"]["normalize"] is None


def test_bad_data_is_a_one_line_error(tmp_path, factory, capsys):
    def err(data, *extra):
        return _error(capsys, _argv(factory, data, tmp_path / "out", *extra))

    assert f"--data imagefolder:{tmp_path / 'nope'}: folder not found: " in err(f"imagefolder:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = err(f"imagefolder:{empty}")
    assert f"--data imagefolder:{empty}: no images found (Couldn't find any class folder" in line
    assert "expected one subfolder of images per class" in line
    (empty / "cat").mkdir()
    assert "no images found (Found no valid file for the classes cat" in err(f"imagefolder:{empty}")
    few = _write_folder(tmp_path / "few", per_class=1)
    assert f"--data imagefolder:{few}: 2 images, fewer than the 4 the analyses ask for" in err(f"imagefolder:{few}")
    mixed = _write_folder(tmp_path / "mixed", per_class=3)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(mixed / "cat" / "00.png")
    assert "the images differ in size (9x9 and 16x16); pass --image-size N" in err(f"imagefolder:{mixed}",
                                                                                  "--samples", "6")
    broken = _write_folder(tmp_path / "broken", per_class=3)
    (broken / "dog" / "00.png").write_bytes(b"not a png")
    assert "cannot read image 'dog/00.png' (UnidentifiedImageError" in err(f"imagefolder:{broken}", "--samples", "6")

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert f"--data tensors:{bad}: cannot read {str(bad)!r} (" in err(f"tensors:{bad}")
    torch.save({"inputs": torch.zeros(4, 3, 8, 8), "labels": torch.zeros(4)}, bad)
    assert ('expected a dict {"x": Tensor, "y": Tensor} or a tuple (x, y) of tensors, got a dict with keys '
            "['inputs', 'labels']") in err(f"tensors:{bad}")
    torch.save(torch.zeros(4, 3, 8, 8), bad)
    assert "got a Tensor torch.float32 [4, 3, 8, 8]" in err(f"tensors:{bad}")
    torch.save((torch.zeros(4, 3, 8, 8), torch.zeros(4)), bad)
    assert "expected y integer class labels [4], got torch.float32 [4]" in err(f"tensors:{bad}")
    torch.save((torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)), bad)
    assert "expected x a floating-point tensor [N, ...], got torch.uint8 [4, 3, 8, 8]" in err(f"tensors:{bad}")
    torch.save((torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 12, 3])), bad)
    assert "--num-classes: --data tensors:" in err(f"tensors:{bad}") and "has labels 0..12, expected them in [0, 10)" \
        in err(f"tensors:{bad}")
    assert f"file not found: {str(tmp_path / 'no.pt')!r}" in err(f"tensors:{tmp_path / 'no.pt'}")
    assert "--data: expected digits, random-cifar, torchvision:NAME:ROOT, imagefolder:PATH, tensors:FILE.pt, got " \
           "'mnist'" in err("mnist")
    with pytest.raises(UsageError, match="--image-size: applies to --data imagefolder:PATH only, got --data "
                                         "random-cifar"):
        analyze_study.analyze_data("random-cifar", 4, 10, 0, image_size=8)
    with pytest.raises(UsageError, match="--normalize: applies to --data imagefolder:PATH only"):
        analyze_study.analyze_data(f"tensors:{bad}", 4, 10, 0, normalize="none")
    if PLUMBED:
        assert "--image-size: applies to --data imagefolder:PATH only" in err("random-cifar", "--image-size", "8")

    line = _error(capsys, ["analyze", "--model", factory, "--out", str(tmp_path / "o")])   # no --data
    assert "analyze: the following arguments are required: --data" in line
    assert not os.path.exists(tmp_path / "out")
