"""Study options: defaults, JSON / YAML files, --set overrides and their one-line errors."""
from __future__ import annotations

import json
import sys

import pytest

from resgeom_fast.experiments.config import (
    Option,
    UsageError,
    config_hash,
    load_config_file,
    parse_sets,
    resolve_config,
)

OPTIONS = [
    Option("width", "int", 64, minimum=1),
    Option("lr", "float", 0.05, minimum=0),
    Option("norm", "str", "batch", choices=("batch", "none")),
    Option("depths", "ints", [4, 8]),
    Option("lams", "floats", [0.1]),
    Option("n_train", "optint", None),
    Option("flag", "bool", False),
]


def test_defaults_file_then_sets():
    cfg = resolve_config(OPTIONS, study="s", file_values={"width": 32, "lr": 1, "study": "s"},
                         sets=parse_sets(["width=16", "depths=2,4,8", "lams=[0.5, 0.25]", "n_train=100",
                                          "flag=true", "norm=none"]))
    assert cfg == {"width": 16, "lr": 1.0, "norm": "none", "depths": [2, 4, 8], "lams": [0.5, 0.25],
                   "n_train": 100, "flag": True}
    assert resolve_config(OPTIONS, study="s", sets={"n_train": "null"})["n_train"] is None
    assert isinstance(resolve_config(OPTIONS, study="s", sets={"lr": "1"})["lr"], float)


def test_hash_is_order_free_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.parametrize("sets, match", [
    ({"widht": "3"}, r"unknown option 'widht' for s; allowed: depths, flag, lams, lr, n_train, norm, width"),
    ({"width": "abc"}, r"expected width an int >= 1, got 'abc'"),
    ({"width": "0"}, r"expected width an int >= 1, got 0"),
    ({"width": "2.5"}, r"expected width an int"),
    ({"norm": "layer"}, r"expected norm one of \['batch', 'none'\], got 'layer'"),
    ({"depths": "2,x"}, r"expected depths an int"),
    ({"flag": "maybe"}, r"expected flag true or false"),
    ({"lr": "nan"}, r"expected lr a number"),
])
def test_bad_values(sets, match):
    with pytest.raises(UsageError, match=match):
        resolve_config(OPTIONS, study="s", sets=sets)


def test_bad_set_syntax_and_study_mismatch():
    with pytest.raises(UsageError, match="--set: expected key=value, got 'width'"):
        parse_sets(["width"])
    with pytest.raises(UsageError, match="this file is for study 'other', not 's'"):
        resolve_config(OPTIONS, study="s", file_values={"study": "other"})


def test_config_files(tmp_path, monkeypatch):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"width": 8}))
    assert load_config_file(str(p)) == {"width": 8}
    with pytest.raises(UsageError, match="config file not found"):
        load_config_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{width: 8")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_config_file(str(bad))
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(UsageError, match="expected a mapping"):
        load_config_file(str(lst))
    txt = tmp_path / "c.toml"
    txt.write_text("width = 8")
    with pytest.raises(UsageError, match=r"expected a \.json, \.yaml or \.yml file"):
        load_config_file(str(txt))
    y = tmp_path / "c.yaml"
    y.write_text("width: 8\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(UsageError, match=r"YAML needs PyYAML \(pip install pyyaml\); or write the config as JSON"):
        load_config_file(str(y))


def test_yaml_when_available(tmp_path):
    pytest.importorskip("yaml")
    y = tmp_path / "c.yml"
    y.write_text("width: 8\ndepths: [2, 4]\n")
    assert load_config_file(str(y)) == {"width": 8, "depths": [2, 4]}
