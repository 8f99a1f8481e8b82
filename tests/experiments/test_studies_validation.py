"""Every study checks its whole configuration before any work: `resgeom run` with a setting that
cannot work prints one `resgeom: error:` line (exit 2) without training a net or creating the
output folder; good settings (the defaults, the tiny test settings) pass."""
from __future__ import annotations

import importlib

import pytest

from resgeom_fast.cli import main
from resgeom_fast.experiments.config import UsageError, parse_sets, resolve_config
from resgeom_fast.experiments.studies import STUDIES, demo_config

from tests.experiments.test_studies import TINY  # noqa: E402


@pytest.fixture
def no_training(monkeypatch):
    """Any training (the package trainer or the leaky study's Adam) fails the test."""
    rtrain = importlib.import_module("resgeom_fast.train")
    studies = importlib.import_module("resgeom_fast.experiments.studies.leaky")  # the leaky study's module

    def trained(*a, **k):
        raise AssertionError("a net was trained before the configuration was checked")

    monkeypatch.setattr(rtrain, "train", trained)
    monkeypatch.setattr(studies, "_leaky_adam", trained)


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("resgeom: error: ") and "Traceback" not in err, err
    return lines[0][len("resgeom: error: "):]


def _digits():
    from resgeom_fast.data import digits

    return digits(seed=0)


@pytest.mark.parametrize("sets, expected", [
    # k above the block dimension D = width of an FC net's residual Jacobians
    (["k=100000"], "k: expected an int in [1, 64] (the block dimension D of the residual Jacobians: width = 64), "
                   "got 100000"),
    (["width=16", "k=17"], "k: expected an int in [1, 16]"),
    # conv nets on 8x8 digits: D = width * 8 * 8
    (["model=conv", "width=2", "k=129"], "k: expected an int in [1, 128] (the block dimension D of the residual "
                                         "Jacobians: width * H * W = 128), got 129"),
    (["width=1e9"], "--set: expected width an int >= 1, got 1e9"),
    (["depths=4,8.5"], "--set: expected depths an int >= 1, got 8.5"),
    (["width=100000000"], "width, depth: expected a net that fits in memory: a fc net of width 100000000 and depth 8 "
                          "has at least 1.6e+17 parameters"),
    (["depths=4,100000000000"], "width, depths: expected a net that fits in memory"),
    (["n_train=1348"], "n_train: expected an int <= 1347 (the training samples of digits), got 1348"),
    (["align_samples=451"], "align_samples: expected an int <= 450 (the test samples of digits), got 451"),
    (["seed=4294967296"], "--set: expected seed an int in [0, 4294967295], got 4294967296"),
    (["model=conv", "dataset=gaussian_mixture"], "dataset: gaussian_mixture has no image form; use model=fc"),
    (["dataset=torchvision:cifar10:/nonexistent"], "dataset: cifar10 files not found under '/nonexistent'"),
])
def test_alignment_settings_refused_before_training(tmp_path, capsys, no_training, sets, expected):
    out = tmp_path / "out"
    argv = ["run", "alignment", "--quiet", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert _error(capsys, argv).startswith(expected)
    assert not out.exists()


def test_digits_sizes_used_above_are_the_data_sets():
    ds = _digits()
    assert (ds.x_train.shape[0], ds.x_test.shape[0], tuple(ds.x_train.shape[1:])) == (1347, 450, (64,))


def test_k_at_the_block_dimension_passes_and_runs(tmp_path):
    """k = D is accepted (and residual_alignment takes it); k = D + 1 is refused by the study."""
    from resgeom_fast.experiments.commands import run_study

    st = STUDIES["alignment"]
    sets = ["n_train=200", "width=6", "depth=2", "epochs=1", "align_samples=4", "depths=2", "oversample=1",
            "power_iters=0"]
    with pytest.raises(UsageError, match=r"k: expected an int in \[1, 6\]"):
        resolve_config(st.options, study="alignment", sets=parse_sets(sets + ["k=7"]))
    rep = run_study("alignment", out=str(tmp_path / "a"), sets=sets + ["k=6"], progress=False)
    import json

    res = json.load(open(rep.results_path))
    assert res["models"]["residual"]["alignment"]["result"]["settings"]["k"] == 6


def test_non_utf8_config_refused_before_training(tmp_path, capsys, no_training):
    cfg = tmp_path / "c.json"
    cfg.write_bytes(b'{"width": "\xff"}')
    msg = _error(capsys, ["run", "alignment", "--quiet", "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert msg == f"config {str(cfg)!r}: expected UTF-8 text, got byte 0xff at offset 11 that is not UTF-8 " \
                  "(save the file as UTF-8)"
    assert not (tmp_path / "o").exists()


def _param_counts(width: int, depth: int, archs) -> dict[str, int]:
    """Ground truth: the trainable parameters of the nets the study builds, built for real."""
    from resgeom_fast.experiments.common import build_model

    out = {}
    for a in archs:
        skip = "none" if a.startswith("plain") else "identity"
        m = build_model({"kind": "fc", "in_dim": 64, "width": width, "depth": depth, "num_classes": 10, "skip": skip,
                         "hyper": a == "hyper", "norm": "batch", "seed": 0})
        out[a] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    return out


@pytest.mark.parametrize("name", ["eigs", "lanczos_steps"])
def test_hessian_eigs_and_steps_bounded_by_the_parameter_count(name):
    counts = _param_counts(2, 1, ["plain", "residual"])
    P = min(counts.values())
    st = STUDIES["hessian"]
    base = ["width=2", "depth=1", "archs=plain,residual"]
    cfg = resolve_config(st.options, study="hessian", sets=parse_sets(base + [f"{name}={P}"]))
    assert cfg[name] == P
    with pytest.raises(UsageError, match=rf"{name}: expected an int <= {P} \(the parameters P of the "
                                         rf"(plain|residual) net, the Hessian's dimension\), got {P + 1}"):
        resolve_config(st.options, study="hessian", sets=parse_sets(base + [f"{name}={P + 1}"]))


@pytest.mark.parametrize("study, sets, match", [
    ("hessian", ["hessian_samples=1348"], r"hessian_samples: expected an int <= 1347 \(the training samples"),
    ("hessian", ["n_train=100", "hessian_samples=101"], r"hessian_samples: expected an int <= 100 \(the training "
                                                        r"samples of digits after n_train\)"),
    ("hessian", ["archs=plain,resnet"], r"archs: unknown architecture\(s\) \['resnet'\]"),
    ("hessian", ["eigs=501"], r"--set: expected eigs an int in \[2, 500\], got 501"),
    ("singularities", ["archs="], r"archs: unknown architecture\(s\) \[\]"),
    ("collapse", ["mufm_samples=2000"], r"mufm_samples: expected an int <= 1347"),
    ("collapse", ["epochs=3", "collapse_every=4"], r"collapse_every: expected an int <= epochs \(3\)"),
    ("expansion", ["path_samples=451"], r"path_samples: expected an int <= 450"),
    ("expansion", ["gc_samples=1000"], r"gc_samples: expected an int <= 450"),
    ("expansion", ["lams=0.1,0"], r"lams: expected at least two distinct numbers > 0, got \[0.1, 0.0\]"),
    ("expansion", ["lams=0.1"], r"lams: expected at least two distinct numbers > 0"),
    ("expansion", ["norm_depths=2,100000000000"], r"norm_width, norm_depths: expected a net that fits in memory"),
    ("leaky", ["teacher_dims=30"], r"teacher_dims: expected at least two widths"),
    ("leaky", ["width=20"], r"width: expected >= the teacher's input and output widths 30, 30, got 20"),
    ("leaky", ["width=10000000"], r"width, depth: expected a net that fits in memory"),
    ("leaky", ["lts=0,2"], r"every Lt > 0"),
])
def test_cross_option_checks_of_every_study(study, sets, match, no_training):
    with pytest.raises(UsageError, match=match):
        resolve_config(STUDIES[study].options, study=study, sets=parse_sets(sets))


@pytest.mark.parametrize("study", list(STUDIES))
def test_defaults_and_tiny_settings_pass(study):
    st = STUDIES[study]
    assert st.validate is not None and st.options.validate is st.validate
    resolve_config(st.options, study=study)
    resolve_config(st.options, study=study, sets=parse_sets(TINY[study]))


def test_demo_config_checks_before_work():
    assert demo_config("tiny", 0, "cpu")["deterministic"] is False
    assert demo_config("tiny", 0, "cpu", deterministic=True)["deterministic"] is True
    with pytest.raises(UsageError, match=r"--seed: expected an int in \[0, 4294967295\], got 4294967296"):
        demo_config("tiny", 2**32, "cpu")
    with pytest.raises(UsageError, match=r"--size: expected one of \['tiny', 'default'\], got 'huge'"):
        demo_config("huge", 0, "cpu")


def test_demo_cli_with_a_seed_out_of_range(tmp_path, capsys, no_training):
    msg = _error(capsys, ["demo", "--size", "tiny", "--quiet", "--out", str(tmp_path / "d"), "--seed", str(2**40)])
    assert msg == f"--seed: expected an int in [0, 4294967295], got {2**40}"
    assert not (tmp_path / "d").exists()
