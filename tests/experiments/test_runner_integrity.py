"""The runner never reuses a stale or tampered result and never deletes what it did not write
(issue 12): step keys cover versions and key parts, step files carry a checksum, ``fresh``
deletes only manifest-listed files, one run per folder (lock), stale temporary files are
removed, messages in a log are plain lines."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import resgeom_fast
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.runner import LOCK_NAME, Runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Counter:
    """Step functions that count their calls and return ``len(name) * [1, 2]`` (the truth)."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def fn(self, name):
        def run():
            self.calls[name] = self.calls.get(name, 0) + 1
            return {"value": (torch.tensor([1.0, 2.0]) * len(name)).tolist()}
        return run


# ----------------------------------------------------------------------------- keys
def test_step_key_covers_key_parts_and_versions_and_a_loaded_step_names_them(tmp_path, monkeypatch):
    c = Counter()
    with Runner(str(tmp_path), {"w": 1}, study="t", log=None, key_parts={"checkpoint sha256": "a" * 64}) as r:
        r.step("s", c.fn("s"))
    log = io.StringIO()
    with Runner(str(tmp_path), {"w": 1}, study="t", log=log, key_parts={"checkpoint sha256": "a" * 64}) as r:
        assert r.step("s", c.fn("s")) == {"value": [1.0, 2.0]}
    assert c.calls == {"s": 1}
    text = log.getvalue()
    assert (f"step s: finished earlier, loaded from steps/s.json (keyed on config hash {r.hash[:12]}, checkpoint "
            f"sha256 aaaaaaaaaaaa, resgeom_fast {resgeom_fast.__version__}, torch {torch.__version__})") in text

    log = io.StringIO()
    with Runner(str(tmp_path), {"w": 1}, study="t", log=log, key_parts={"checkpoint sha256": "b" * 64}) as r:
        r.step("s", c.fn("s"))
    assert c.calls == {"s": 2}
    assert "checkpoint sha256: aaaaaaaaaaaa -> bbbbbbbbbbbb), recomputing" in log.getvalue()

    old = resgeom_fast.__version__
    monkeypatch.setattr(resgeom_fast._version, "__version__", "99.0.0")  # the one version string
    log = io.StringIO()
    with Runner(str(tmp_path), {"w": 1}, study="t", log=log, key_parts={"checkpoint sha256": "b" * 64}) as r:
        r.step("s", c.fn("s"))
    assert c.calls == {"s": 3}
    assert f"(resgeom_fast: {old} -> 99.0.0), recomputing" in log.getvalue()


# ----------------------------------------------------------------------------- checksum
def test_tampered_step_file_is_recomputed_with_a_message(tmp_path):
    c = Counter()
    with Runner(str(tmp_path), {}, study="t", log=None) as r:
        r.step("ab", c.fn("ab"))
    path = tmp_path / "steps" / "ab.json"
    stored = json.loads(path.read_text())
    stored["result"]["value"][0] = 999.0          # valid JSON, right format, wrong number
    path.write_text(json.dumps(stored))
    log = io.StringIO()
    with Runner(str(tmp_path), {}, study="t", log=log) as r:
        out = r.step("ab", c.fn("ab"))
    assert out == {"value": [2.0, 4.0]} and c.calls == {"ab": 2}
    assert "step ab: steps/ab.json fails its checksum (edited or damaged since it was written), recomputing" \
        in log.getvalue()
    assert json.loads(path.read_text())["result"] == {"value": [2.0, 4.0]}

    stored = json.loads(path.read_text())        # a step file of the old format (no checksum) is not trusted
    del stored["checksum"]
    stored["format"] = "resgeom-step-1"
    path.write_text(json.dumps(stored))
    log = io.StringIO()
    with Runner(str(tmp_path), {}, study="t", log=log) as r:
        r.step("ab", c.fn("ab"))
    assert c.calls == {"ab": 3} and "written by an older resgeom" in log.getvalue()


# ----------------------------------------------------------------------------- fresh
def test_fresh_deletes_nothing_in_a_folder_without_a_resgeom_manifest(tmp_path):
    user = tmp_path / "checkpoints" / "my_resnet_epoch300.pt"
    user.parent.mkdir()
    user.write_bytes(b"weights")
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "notes.json").write_text("{}")
    log = io.StringIO()
    c = Counter()
    with Runner(str(tmp_path), {}, study="t", log=log, fresh=True) as r:
        r.step("a", c.fn("a"))
    assert user.read_bytes() == b"weights" and (tmp_path / "steps" / "notes.json").exists()
    assert "has no resgeom manifest.json, so nothing is deleted there" in log.getvalue()
    assert c.calls == {"a": 1}


def test_fresh_deletes_exactly_the_files_the_manifest_lists(tmp_path):
    c = Counter()
    with Runner(str(tmp_path), {}, study="t", log=None) as r:
        r.step("a", c.fn("a"))
        ck = r.checkpoint_dir("net", {"w": 1})
        open(os.path.join(ck, "checkpoint.pt"), "wb").write(b"ours")
        r.record_written(str(tmp_path / "report.md"))
        (tmp_path / "report.md").write_text("ours")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {"steps/a.json", "report.md", os.path.relpath(os.path.join(ck, "checkpoint.pt"), tmp_path)} \
        <= set(manifest["written"])
    user = tmp_path / "checkpoints" / "my_resnet_epoch300.pt"
    user.write_bytes(b"user")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("keep")
    manifest["written"].append(f"../{outside.name}")       # a tampered manifest never reaches outside
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    log = io.StringIO()
    with Runner(str(tmp_path), {}, study="t", log=log, fresh=True) as r:
        r.step("a", c.fn("a"))
    assert c.calls == {"a": 2}
    assert user.read_bytes() == b"user" and outside.read_text() == "keep"
    assert not os.path.exists(os.path.join(ck, "checkpoint.pt")) and not (tmp_path / "report.md").exists()
    text = log.getvalue()
    assert "--fresh: deleted 3 file(s) resgeom wrote earlier" in text
    assert "kept 1 file(s) resgeom did not write, e.g. checkpoints/my_resnet_epoch300.pt" in text
    assert "is not a plain path inside" in text


# ----------------------------------------------------------------------------- lock
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_locked_folder_refuses_naming_the_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00+00:00", "command": "resgeom x"}))
        with pytest.raises(UsageError, match=rf"is in use by another resgeom run \(pid {sleeper.pid} on this host"):
            Runner(str(tmp_path), {}, study="t", log=None)
        assert not (tmp_path / "manifest.json").exists()            # nothing was touched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_processes_on_one_out_the_second_exits_2_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with Runner(str(out), {"a": 1}, study="t", log=None):
        proc = subprocess.run([sys.executable, "-m", "resgeom_fast", "run", "alignment", "--out", str(out), "--quiet"],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)
        assert (out / LOCK_NAME).exists()
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert lines == [ln for ln in lines if ln.startswith("resgeom: error: ")] and len(lines) == 1, proc.stderr
    assert f"is in use by another resgeom run (pid {os.getpid()} on this host" in lines[0]
    assert not (out / LOCK_NAME).exists()                         # released when the with block ends


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    import socket

    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    log = io.StringIO()
    with Runner(str(tmp_path), {}, study="t", log=log):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
    assert f"taking over the lock of pid {pid} (started then), which no longer runs" in log.getvalue()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_released_on_an_exception_or_ctrl_c(tmp_path):
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with Runner(str(tmp_path), {}, study="t", log=None) as r:
                r.step("a", lambda: (_ for _ in ()).throw(exc()))
        assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- temp files
def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    with Runner(str(tmp_path), {}, study="t", log=None) as r:
        r.step("a", lambda: 1)
    dead = 4_000_000_000                                    # above any pid_max: no such process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / "steps" / f".a.json.resgeom-tmp-{dead}-x1y2", tmp_path / f".manifest.json.tmp-{dead}"]
        keep = [tmp_path / "steps" / f".b.json.resgeom-tmp-{live.pid}-abc",   # being written by a live process
                tmp_path / "steps" / ".notes.tmp-draft", tmp_path / "my.tmp-1"]
        for p in stale + keep:
            p.write_text("x")
        log = io.StringIO()
        with Runner(str(tmp_path), {}, study="t", log=log):
            pass
        assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in keep)
        assert "removed 2 temporary file(s) left by an interrupted run" in log.getvalue()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- messages in a log
def test_messages_to_a_log_are_plain_lines(tmp_path):
    """Even while a tqdm bar is open on the same (non-terminal) stream, a message is one plain
    line: no carriage-return clearing of the bar in a log file."""
    from tqdm import tqdm

    log = io.StringIO()
    with Runner(str(tmp_path), {}, study="t", log=log) as r:
        bar = tqdm(total=3, file=log)
        start = len(log.getvalue())
        r.message("step a: running")
        assert log.getvalue()[start:] == "[resgeom] step a: running\n"
        bar.close()


def test_empty_out_is_refused():
    with pytest.raises(ValueError, match=r"Runner: expected out a folder path, got '' \(pass '.' for the current"):
        Runner("", {}, study="t", log=None)


def test_torchvision_data_files_enter_the_key_by_content(tmp_path):
    import hashlib

    from resgeom_fast.data import expected_files
    from resgeom_fast.experiments.common import data_key_parts

    files = expected_files("mnist", tmp_path)
    for i, f in enumerate(files):
        os.makedirs(os.path.dirname(f), exist_ok=True)
        open(f, "wb").write(bytes([i]) * 10)
    spec = f"torchvision:mnist:{tmp_path}"
    h = hashlib.sha256()
    for i, f in enumerate(files):
        h.update(f"{os.path.basename(f)}:{hashlib.sha256(bytes([i]) * 10).hexdigest()}\n".encode())
    assert data_key_parts(spec) == {"data files sha256": h.hexdigest()}
    open(files[0], "wb").write(b"other images")                 # same names, other contents
    assert data_key_parts(spec)["data files sha256"] != h.hexdigest()
    assert data_key_parts("digits") == {} and data_key_parts("random-cifar") == {}


def test_fresh_does_not_follow_a_symlinked_folder_out_of_out(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    with Runner(str(out), {}, study="t", log=None) as r:
        r.step("a", lambda: 1)
    elsewhere.mkdir()
    (elsewhere / "a.json").write_text("user data")
    import shutil

    shutil.rmtree(out / "steps")
    os.symlink(elsewhere, out / "steps")                          # steps/ now points outside OUT
    log = io.StringIO()
    with Runner(str(out), {}, study="t", log=log, fresh=True):
        pass
    assert (elsewhere / "a.json").read_text() == "user data"
    assert "manifest entry 'steps/a.json' is not a plain path inside" in log.getvalue()
