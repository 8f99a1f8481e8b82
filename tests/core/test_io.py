"""resgeom_fast.core.io: atomic writes (a failing write leaves the old file), JSON conversion."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from resgeom_fast.core import io
from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.core.io import (
    atomic_file,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    is_temp_name,
    json_checksum,
    temp_owner_pid,
    to_jsonable,
)


def test_old_import_paths_are_the_same_objects():
    from resgeom_fast import train
    from resgeom_fast.train import checkpoint

    for name in ("atomic_file", "atomic_save", "file_sha256", "is_temp_name", "temp_owner_pid", "TEMP_MARK"):
        assert getattr(checkpoint, name) is getattr(io, name)
    for name in ("atomic_file", "atomic_save", "file_sha256"):
        assert getattr(train, name) is getattr(io, name)


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]


def test_failing_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"a": 1})
    before = p.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(p, "w", encoding="utf-8") as fh:
            fh.write("partial")
            raise RuntimeError("boom")
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.json"]
    # a value JSON refuses (complex tensor) fails before anything is replaced
    with pytest.raises(TypeError, match="complex"):
        atomic_write_json(p, {"z": torch.zeros(2, dtype=torch.complex64)})
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["a.json"]


def test_atomic_file_refuses_read_modes(tmp_path):
    for mode in ("r", "a", "rb", "w+r"):
        with pytest.raises(ArgumentValueError, match=r"^atomic_file: expected a write mode \('w', 'wb'\), got "):
            with atomic_file(tmp_path / "x", mode):
                pass


def test_temp_names(tmp_path):
    names = []
    orig = io.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = orig(*args, **kwargs)
        names.append(os.path.basename(name))
        return fd, name

    io.tempfile.mkstemp, saved = spy, io.tempfile.mkstemp
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        io.tempfile.mkstemp = saved
    assert is_temp_name(names[0]) and temp_owner_pid(names[0]) == os.getpid()
    assert not is_temp_name("f.txt") and temp_owner_pid("f.txt") is None
    assert is_temp_name(".f.txt.tmp-12", legacy=True) and not is_temp_name(".f.txt.tmp-12")


def test_atomic_save_and_sha256(tmp_path):
    p = tmp_path / "t.pt"
    atomic_save({"w": torch.arange(3)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3))
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert file_sha256(p, chunk=7) == file_sha256(p)


@dataclasses.dataclass
class _Plain:
    a: float
    t: torch.Tensor


@dataclasses.dataclass
class _WithToDict:
    a: float

    def to_dict(self):
        return {"doubled": self.a * 2}


def test_to_jsonable():
    assert to_jsonable(None) is None and to_jsonable(True) is True and to_jsonable("s") == "s"
    assert to_jsonable(math.nan) is None and to_jsonable(math.inf) is None and to_jsonable(1.5) == 1.5
    assert to_jsonable(torch.tensor([1.0, float("nan"), float("-inf")])) == [1.0, None, None]
    assert to_jsonable(torch.tensor([[1, 2]])) == [[1, 2]]
    assert to_jsonable(torch.tensor([True, False])) == [True, False]
    x = to_jsonable(torch.tensor(0.1, dtype=torch.float32))
    assert x == float(torch.tensor(0.1, dtype=torch.float32)) and type(x) is float
    assert to_jsonable(np.array([1.0, np.nan])) == [1.0, None]
    assert to_jsonable(np.float32(2.0)) == 2.0 and type(to_jsonable(np.int64(3))) is int
    assert to_jsonable({1: (torch.float64, torch.device("cpu"))}) == {"1": ["torch.float64", "cpu"]}
    assert to_jsonable(_Plain(1.0, torch.ones(2))) == {"a": 1.0, "t": [1.0, 1.0]}
    assert to_jsonable(_WithToDict(2.0)) == {"doubled": 4.0}
    with pytest.raises(TypeError, match="to_jsonable: cannot convert object"):
        to_jsonable(object())


def test_atomic_write_json_and_checksum_round_trip(tmp_path):
    p = tmp_path / "r.json"
    obj = {"b": [0.1, float("nan")], "a": torch.tensor([1.0 / 3.0], dtype=torch.float64)}
    atomic_write_json(p, obj)
    back = json.loads(p.read_text())
    assert back == {"b": [0.1, None], "a": [1.0 / 3.0]}
    assert json_checksum(back) == json_checksum(to_jsonable(obj))
    with pytest.raises(ValueError):
        json_checksum({"x": float("nan")})
