"""train.checkpoint.atomic_file / atomic_save: a reader sees the old file or the new one, never part."""
from __future__ import annotations

import os

import pytest
import torch

from resgeom_fast.train import atomic_file, atomic_save


def test_atomic_file_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "out.txt"                 # the folder is created
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write("new")
        assert not path.exists()                        # nothing visible before the replace
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]       # no temporary file left


def test_atomic_file_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
