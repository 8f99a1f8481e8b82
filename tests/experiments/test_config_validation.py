"""Option types and bounds are strict (an int option never rounds 1e9), a config file that is not
UTF-8 is one UsageError line, and resolve_config runs a study's cross-option check."""
from __future__ import annotations

import json

import pytest

from resgeom_fast.experiments.config import Option, Options, UsageError, load_config_file, resolve_config

OPTIONS = [Option("width", "int", 64, minimum=1), Option("seed", "int", 0, minimum=0, maximum=2**32 - 1),
           Option("depths", "ints", [2]), Option("n_train", "optint", None), Option("lr", "float", 0.1, minimum=0)]


@pytest.mark.parametrize("sets, match", [
    ({"width": "1e9"}, r"--set: expected width an int >= 1, got 1e9$"),
    ({"width": "64.0"}, r"--set: expected width an int >= 1, got 64\.0$"),
    ({"depths": "2,4.0"}, r"--set: expected depths an int, got 4\.0$"),
    ({"n_train": "1e3"}, r"--set: expected n_train an int, got 1e3$"),
    ({"seed": str(2**32)}, rf"--set: expected seed an int in \[0, {2**32 - 1}\], got {2**32}$"),
    ({"seed": "-1"}, r"--set: expected seed an int in \[0, 4294967295\], got -1$"),
])
def test_int_options_take_integer_literals_only(sets, match):
    with pytest.raises(UsageError, match=match):
        resolve_config(OPTIONS, study="s", sets=sets)


def test_int_options_from_files_are_not_rounded_either():
    with pytest.raises(UsageError, match=r"config: expected width an int >= 1, got 1000000000\.0"):
        resolve_config(OPTIONS, study="s", file_values={"width": 1e9})
    cfg = resolve_config(OPTIONS, study="s", file_values={"width": 32, "seed": 2**32 - 1, "lr": 1},
                         sets={"depths": "[1, 2]", "n_train": "100"})
    assert cfg == {"width": 32, "seed": 2**32 - 1, "depths": [1, 2], "n_train": 100, "lr": 1.0}
    assert isinstance(cfg["lr"], float)


def test_non_utf8_config_is_a_usage_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b'{"width": "\xff\xfe"}')
    with pytest.raises(UsageError, match=r"config '.*c\.json': expected UTF-8 text, got byte 0xff at offset 11"):
        load_config_file(str(p))
    y = tmp_path / "c.yaml"
    y.write_bytes(b"width: 8\n# caf\xe9\n")
    with pytest.raises(UsageError, match=r"expected UTF-8 text, got byte 0xe9 at offset 14"):
        load_config_file(str(y))
    p.write_text(json.dumps({"width": 8}), encoding="utf-8")
    assert load_config_file(str(p)) == {"width": 8}


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config_file(str(tmp_path))


def test_resolve_config_runs_the_cross_option_check():
    seen = []

    def check(cfg):
        seen.append(dict(cfg))
        if cfg["width"] < max(cfg["depths"]):
            raise UsageError(f"depths: expected every depth <= width {cfg['width']}, got {cfg['depths']}")

    opts = Options(OPTIONS, validate=check)
    assert resolve_config(opts, study="s", sets={"width": "4", "depths": "2,4"})["width"] == 4
    assert seen == [{"width": 4, "seed": 0, "depths": [2, 4], "n_train": None, "lr": 0.1}]
    with pytest.raises(UsageError, match=r"depths: expected every depth <= width 3, got \[2, 4\]"):
        resolve_config(opts, study="s", sets={"width": "3", "depths": "2,4"})
    # an explicit validate replaces the options' own; None switches the check off
    with pytest.raises(UsageError, match="explicit"):
        resolve_config(opts, study="s", validate=lambda c: (_ for _ in ()).throw(UsageError("explicit")))
    assert resolve_config(opts, study="s", sets={"width": "3", "depths": "2,4"}, validate=None)["width"] == 3
    # a plain list has no check
    assert resolve_config(list(OPTIONS), study="s", sets={"width": "3", "depths": "2,4"})["width"] == 3
