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


def test_atomic_file_never_follows_a_symlink_at_a_predictable_temp_name(tmp_path):
    """A symlink planted where the old code put its temp file (``.<name>.tmp-<pid>``) is neither
    followed nor replaced; the target ends as a regular file with the new contents."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    trap = tmp_path / f".out.txt.tmp-{os.getpid()}"
    os.symlink(victim, trap)
    path = tmp_path / "out.txt"
    with atomic_file(path, "w") as fh:
        fh.write("new")
    assert victim.read_text() == "precious" and os.path.islink(trap)
    assert path.read_text() == "new" and not os.path.islink(path)


def test_atomic_file_temp_names_are_exclusive_and_unpredictable(tmp_path, monkeypatch):
    import tempfile

    from resgeom_fast.train.checkpoint import TEMP_MARK, is_temp_name, temp_owner_pid

    made = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    for _ in range(2):
        with atomic_file(tmp_path / "a.json", "w") as fh:
            fh.write("{}")
    assert len(made) == 2 and made[0] != made[1]
    for name in made:
        base = os.path.basename(name)
        assert base.startswith(f".a.json{TEMP_MARK}{os.getpid()}-") and is_temp_name(base)
        assert temp_owner_pid(base) == os.getpid()
    assert not is_temp_name(".a.json.tmp-12") and is_temp_name(".a.json.tmp-12", legacy=True)
    assert not is_temp_name("notes.tmp-draft", legacy=True)


def test_atomic_file_gives_the_permissions_of_a_plain_open(tmp_path):
    mask = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "x.txt", "w") as fh:
            fh.write("x")
        with open(tmp_path / "y.txt", "w") as fh:
            fh.write("y")
    finally:
        os.umask(mask)
    assert os.stat(tmp_path / "x.txt").st_mode & 0o777 == os.stat(tmp_path / "y.txt").st_mode & 0o777 == 0o640


def test_atomic_file_refuses_read_and_append_modes(tmp_path):
    for mode in ("r", "a", "r+"):
        with pytest.raises(ValueError, match="atomic_file: expected a write mode"):
            with atomic_file(tmp_path / "z", mode):
                pass


def test_file_sha256_streams_any_size(tmp_path):
    import hashlib

    from resgeom_fast.train.checkpoint import file_sha256

    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b", chunk=1024) == hashlib.sha256(data).hexdigest()
