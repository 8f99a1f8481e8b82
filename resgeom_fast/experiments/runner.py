"""Resumable steps: each finished step's result is kept in the output folder.

Layout of an output folder ``OUT``::

    OUT/manifest.json              what ran there last (study, config, key parts) and every file
                                   resgeom wrote there ("written", paths relative to OUT)
    OUT/.resgeom.lock              held while a run works in OUT (pid, host, start time)
    OUT/steps/<name>.json          one finished step: {"format", "name", "hash", "key", "seconds",
                                   "checksum", "result"}
    OUT/checkpoints/<name>-<hash>/ trainer checkpoints (checkpoint.pt, log.jsonl)

A step is a function returning JSON-friendly data (dicts, lists, numbers; tensors and result
dataclasses are converted by :func:`~resgeom_fast.core.io.to_jsonable`). Its file is
written atomically only after the function returns, so a Ctrl-C (KeyboardInterrupt) or a crash
inside a step leaves the folder as it was before that step; a re-run with the same key loads the
finished steps instead of recomputing them, and training resumes from the last epoch checkpoint.

What a step is keyed on. Its key is the hash of (a) the configuration it depends on (the whole
configuration unless the study names a subset), (b) the versions of resgeom_fast and torch and
(c) the run's ``key_parts``: whatever else the results depend on that the configuration names only
by reference, e.g. the sha256 of a ``--checkpoint`` file's contents and of a model factory's
source. When any of them differs the step is recomputed and a message names what changed; a
loaded step says what it was keyed on. Each step file also stores the sha256 of its canonical
result JSON (:func:`~resgeom_fast.core.io.json_checksum`): a file edited or damaged
since it was written fails the check and is recomputed with a message (this catches edits and
damage, it is no protection against someone who recomputes the checksum). Checkpoint folders
carry the hash of the training configuration in their name, so a changed model or optimiser never
resumes from the wrong weights.

One run per folder. A run holds ``OUT/.resgeom.lock`` (created with ``O_EXCL``; it records pid,
host and start time) until it ends, including by Ctrl-C or an exception; a second run on the same
folder refuses with a :class:`~resgeom_fast.experiments.config.UsageError` naming the first's pid.
A lock left by a process that no longer runs on this host is taken over with a message. The lock
is per process: several :class:`Runner` objects of one process may share a folder (sequential use
in a script or a test); it is released when the last one is closed or collected, or at exit.

``fresh`` deletes only the files the folder's manifest lists as written by resgeom (never anything
else, e.g. a user's own ``checkpoints/*.pt``; a folder without a resgeom manifest loses nothing)
and recomputes every step. Temporary files of :func:`~resgeom_fast.core.io.atomic_file`
left in OUT by a killed run are removed when a run starts.

Under torch.distributed (the ``resgeom`` command launched by torchrun or srun, or any initialised
process group of more than one process; ``distributed=False`` opts out) every rank creates its
Runner with the same configuration and calls the same steps in the same order, and rank 0 alone
touches OUT: it holds the lock, writes the manifest, the step files and the checkpoints, and
decides for every step whether it is loaded or computed (ONE broadcast): a loaded step hands rank
0's stored result to every rank; a computed step runs ``fn`` on every rank (the analyses' own
collectives split the work when they are given ``distributed=``), a failure on any rank is
raised on every rank, and rank 0's result is broadcast, so every rank returns the same result.
:meth:`Runner.on_rank0` runs work on rank 0 alone (training: the others wait without a
collective timeout, then take what rank 0 broadcasts). The other ranks' ``out`` is a private
temporary folder, removed when they close: whatever the code around the steps writes there
(their copy of the report) never reaches OUT. Their messages and progress bars are off.
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import uuid
import weakref
from typing import Any, Callable, Mapping, Optional, TextIO, TypeVar

import torch
import torch.distributed as dist

from resgeom_fast import _version
from resgeom_fast._progress import write_line
from resgeom_fast.core import distributed as rdist
from resgeom_fast.core.checks import check_bool, value_error
from resgeom_fast.core.io import atomic_write_json, is_temp_name, json_checksum, temp_owner_pid, to_jsonable
from resgeom_fast.train.checkpoint import CHECKPOINT_NAME

from .config import UsageError, config_hash

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "RANK0_POLL_S", "Runner", "STEP_FORMAT"]

T = TypeVar("T")

STEP_FORMAT = "resgeom-step-2"
MANIFEST_FORMAT = "resgeom-manifest-2"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".resgeom.lock"
# files a trainer / study writes into a checkpoint folder handed out by Runner.checkpoint_dir
CHECKPOINT_FILES = (CHECKPOINT_NAME, "log.jsonl", "model.pt")
RANK0_POLL_S = 0.2
"""Seconds between two looks of a waiting rank at the group's store (:meth:`Runner.on_rank0`)."""


def _short(value: Any) -> str:
    """A key part for a message: long hex digests cut to 12 characters."""
    text = str(value)
    if len(text) >= 16 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text


def describe_key(parts: Mapping[str, Any]) -> str:
    """``"config hash 1a2b3c4d5e6f, checkpoint sha256 ab12cd34ef56, resgeom_fast 0.1.0, torch 2.5.1"``."""
    return ", ".join(f"{k} {_short(v)}" for k, v in parts.items())


def _key_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = [k for k in list(new) + [k for k in old if k not in new] if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed)


# ------------------------------------------------------------------------------------- lock
_HELD: dict[str, list[Any]] = {}  # absolute folder -> [count, token] of the locks this process holds


def _proc_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    """Whether ``pid`` runs on this host (and is the same process when its start time is known)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (OverflowError: beyond any pid)
        return False
    except OSError:  # PermissionError: it exists under another user
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # a zombie: it has exited
    except (OSError, IndexError):
        pass
    now = _proc_start(pid)
    return not (start is not None and now is not None and now != start)  # else the pid was reused


def _lock_info(token: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500], "token": token}


def _read_lock(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create_lock(path: str, token: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_lock_info(token), fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _acquire(out: str, message: Callable[[str], None]) -> None:
    """Take ``out``'s lock for this process (re-entrant within the process)."""
    if out in _HELD:
        _HELD[out][0] += 1
        return
    path = os.path.join(out, LOCK_NAME)
    token = uuid.uuid4().hex
    for _ in range(3):
        if _create_lock(path, token):
            _HELD[out] = [1, token]
            return
        info = _read_lock(path)
        if info is None:
            continue  # released meanwhile: try again
        pid, host = info.get("pid"), info.get("host")
        same_host = host == socket.gethostname()
        if same_host and isinstance(pid, int) and (pid == os.getpid() or not _pid_alive(pid, info.get("proc_start"))):
            # a lock of a run that no longer exists (or of an earlier process that had our pid)
            message(f"{out}: taking over the lock of pid {pid} (started {info.get('started', '?')}), "
                    "which no longer runs")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        if not info:
            raise UsageError(f"--out {out}: its lock file {path} is unreadable; if no other resgeom run uses this "
                             "folder, delete that file")
        where = "this host" if same_host else f"host {host!r} (cannot check from here)"
        raise UsageError(f"--out {out} is in use by another resgeom run (pid {pid} on {where}, started "
                         f"{info.get('started', '?')}: {info.get('command', '')!s}); wait for it to end or use "
                         f"another --out; if that run is gone, delete {path}")
    raise UsageError(f"--out {out}: could not take the lock {path} (other runs keep taking it)")


def _release(out: str) -> None:
    held = _HELD.get(out)
    if held is None:
        return
    held[0] -= 1
    if held[0] > 0:
        return
    del _HELD[out]
    path = os.path.join(out, LOCK_NAME)
    info = _read_lock(path)
    if info and info.get("token") == held[1]:
        try:
            os.remove(path)
        except OSError:
            pass


# ------------------------------------------------------------------------------------- runner
class Runner:
    """Runs named steps in ``out``, skipping those already finished with the same key.

    Args:
        out: the output folder (created). An empty string is refused (pass "." for the current
            folder).
        config: the full configuration (JSON-friendly); it is the default dependency of a step.
        study: a name recorded in the manifest.
        fresh: recompute every step, after deleting the files the folder's manifest lists as
            written by resgeom (nothing else is ever deleted).
        progress: show progress bars (training, long analyses).
        log: where messages go (default stderr); ``None`` silences them.
        key_parts: what every step depends on besides the configuration, ``{label: value}``
            (e.g. ``{"checkpoint sha256": "ab12..."}``); the versions of resgeom_fast and torch
            are added. They enter every step's key and are named when a step is loaded.
        distributed: None (default): work as one run of several processes when a torch.distributed
            process group of more than one process is initialised (module docstring); False:
            this process works alone on ``out`` even inside a group (e.g. one folder per rank).
            Creating a distributed Runner is a collective: rank 0 opens the folder, and every
            rank raises when that fails or when the ranks' configurations or key parts differ.

    Attributes:
        computed, loaded: names of the steps computed / loaded from disk in this run (on every
            rank: rank 0's decisions).
        key_parts: the key parts (with the versions).
        rank, world: this process's rank and the number of processes (0 and 1 when alone).
        distributed: whether the Runner works with the other ranks of the group.
        is_writer: whether this process writes the folder (rank 0, or alone).
        folder: the report folder ``out`` as given (absolute) on every rank; :attr:`out` is where
            this process writes: the folder on rank 0, a private temporary folder on the others.

    A Runner holds the folder's lock until :meth:`close` (or the end of a ``with`` block, or
    its collection, or the process's exit).
    """

    def __init__(self, out: str, config: Mapping[str, Any], *, study: str, fresh: bool = False,
                 progress: bool = True, log: Optional[TextIO] = sys.stderr,
                 key_parts: Optional[Mapping[str, Any]] = None, distributed: Optional[bool] = None) -> None:
        out = os.fspath(out)
        if not isinstance(out, str) or not out.strip():
            raise value_error("Runner", "out", "a folder path", f"{out!r} (pass '.' for the current folder)")
        if distributed is not None:
            check_bool("Runner", "distributed", distributed)
        self.folder = os.path.abspath(out)
        self.out = self.folder
        self.config = dict(config)
        self.study = study
        self.fresh = bool(fresh)
        self.distributed = rdist.world_size() > 1 and distributed is not False
        self.rank, self.world = (rdist.rank(), rdist.world_size()) if self.distributed else (0, 1)
        self.is_writer = self.rank == 0
        self.progress = progress and self.is_writer
        self._log = log if self.is_writer else None
        self.computed: list[str] = []
        self.loaded: list[str] = []
        self.hash = config_hash(self.config)
        self.key_parts: dict[str, Any] = {**dict(key_parts or {}), "resgeom_fast": _version.__version__,
                                          "torch": torch.__version__}
        self._written: set[str] = set()
        self._finalizer = weakref.finalize(self, _nothing)   # replaced once there is something to release
        self._alone = False         # True while rank 0 runs on_rank0 work: its steps are its own
        self._token = ""            # names this run's keys in the group's store (the same on every rank)
        self._waits = 0             # on_rank0 calls so far (the same count on every rank)
        if not self.distributed:
            self._open_folder()
            return
        err: Optional[BaseException] = None
        if self.is_writer:
            try:
                self._open_folder()
            except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
                err = exc
        else:
            self._open_scratch()
        self._agree(err)

    def _open_folder(self) -> None:
        """Take the folder's lock, read its manifest, clean up, write the manifest (the writer)."""
        os.makedirs(self.out, exist_ok=True)
        _acquire(self.out, self.message)
        self._finalizer = weakref.finalize(self, _release, self.out)
        try:
            old = self._read_manifest()
            if old is not None and isinstance(old.get("written"), list):
                self._written = {p for p in old["written"] if isinstance(p, str)}
            self._remove_stale_temp_files(legacy=old is not None)
            if self.fresh:
                self._fresh(old)
            elif old is not None:
                self._say_what_changed(old)
            self._write_manifest()
        except BaseException:
            self.close()
            raise

    def _open_scratch(self) -> None:
        """A rank other than 0: its ``out`` is a private temporary folder, removed at close."""
        self.out = tempfile.mkdtemp(prefix=f"resgeom-rank{self.rank}-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.out, True)

    def _agree(self, err: Optional[BaseException]) -> None:
        """Collective (ONE all_gather_object): every rank raises rank 0's failure to open the
        folder, or a UsageError when the ranks' configurations or key parts differ; else the
        ranks share rank 0's run token."""
        mine = (rdist.portable(err) if err is not None else None, uuid.uuid4().hex, self.hash, self.key_parts)
        try:
            gathered = rdist.all_gather_object(mine, fn="Runner")
            rdist.raise_first("Runner", [g[0] for g in gathered], err)
            self._token = gathered[0][1]
            differ = []
            for r, (_, _, h, parts) in enumerate(gathered):
                if h != gathered[0][2]:
                    differ.append(f"rank {r}: configuration hash {h[:12]} (rank 0: {gathered[0][2][:12]})")
                elif parts != gathered[0][3]:
                    differ.append(f"rank {r}: {_key_diff(gathered[0][3], parts)}")
            if differ:
                raise UsageError(f"--out {self.folder}: the ranks of this run differ from rank 0 in what the steps "
                                 f"depend on ({'; '.join(differ[:4])}): give every rank the same command, "
                                 "configuration and files")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the folder's lock (idempotent); on a rank other than 0, remove its private
        temporary folder."""
        self._finalizer()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ messages
    def message(self, text: str) -> None:
        """One line to the log stream: through tqdm on a terminal (kept clear of bars), a plain
        line otherwise (no carriage returns in a log file)."""
        if self._log is None:
            return
        write_line(f"[resgeom] {text}", self._log)

    # ------------------------------------------------------------------ manifest / written files
    def _read_manifest(self) -> Optional[dict[str, Any]]:
        path = os.path.join(self.out, MANIFEST_NAME)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            self.message(f"{path}: unreadable manifest; it is rewritten")
            return {}
        if not isinstance(old, dict) or "config_hash" not in old:
            return None  # not a resgeom manifest
        return old

    def _write_manifest(self) -> None:
        if not self.is_writer:
            return
        atomic_write_json(os.path.join(self.out, MANIFEST_NAME), {
            "format": MANIFEST_FORMAT, "study": self.study, "config": self.config, "config_hash": self.hash,
            "key": self.key_parts, "written": sorted(self._written)})

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(os.fspath(path)), self.out)
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
            raise value_error("Runner.record_written", None, f"a path inside {self.out}", repr(path))
        return rel.replace(os.sep, "/")

    def record_written(self, *paths: str) -> None:
        """Note files resgeom wrote (or is about to write) in ``out``: the manifest lists them, and
        ``fresh`` deletes exactly these. Call it for every file written into ``out`` outside
        :meth:`step` (reports, figures, checkpoints)."""
        new = {self._rel(p) for p in paths} - self._written
        if new:
            self._written |= new
            self._write_manifest()

    @property
    def written(self) -> list[str]:
        """The files resgeom wrote in ``out`` (relative paths, as in the manifest)."""
        return sorted(self._written)

    def _say_what_changed(self, old: Mapping[str, Any]) -> None:
        if old.get("config_hash") not in (None, self.hash):
            old_cfg = old.get("config", {}) or {}
            changed = sorted(k for k in set(old_cfg) | set(self.config) if old_cfg.get(k) != self.config.get(k))
            what = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:6])
            self.message(f"configuration differs from the earlier run in {self.out} ({what}); "
                         "steps that depend on it are recomputed")
        old_key = old.get("key")
        if isinstance(old_key, dict) and old_key != self.key_parts:
            self.message(f"inputs differ from the earlier run in {self.out} ({_key_diff(old_key, self.key_parts)}); "
                         "steps keyed on them are recomputed")

    def _fresh(self, old: Optional[Mapping[str, Any]]) -> None:
        if old is None or not isinstance(old.get("written"), list):
            why = "has no resgeom manifest.json" if old is None else "has a manifest that lists no written files"
            self.message(f"--fresh: {self.out} {why}, so nothing is deleted there (resgeom deletes only files it "
                         "recorded as its own); every step is recomputed")
            self._written = set()
            return
        removed, dirs = [], set()
        for rel in sorted(self._written):
            path = os.path.normpath(os.path.join(self.out, rel))
            try:
                inside = self._rel(path) == rel.replace(os.sep, "/")
            except ValueError:
                inside = False
            # the folder holding it, with symlinks resolved, must lie inside OUT too
            real_out, parent = os.path.realpath(self.out), os.path.realpath(os.path.dirname(path))
            inside = inside and (parent == real_out or parent.startswith(real_out + os.sep))
            if not inside:
                self.message(f"--fresh: manifest entry {rel!r} is not a plain path inside {self.out}; not deleted")
                continue
            if os.path.islink(path) or os.path.isfile(path):
                os.remove(path)
                removed.append(rel)
                dirs.add(os.path.dirname(path))
        for d in sorted(dirs, key=len, reverse=True):  # folders emptied by the removal (deepest first)
            while d != self.out and d.startswith(self.out + os.sep):
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)
        self._written = set()
        kept = []
        for sub in ("steps", "checkpoints"):
            for root, _, files in os.walk(os.path.join(self.out, sub)):
                kept += [os.path.relpath(os.path.join(root, f), self.out) for f in files]
        self.message(f"--fresh: deleted {len(removed)} file(s) resgeom wrote earlier in {self.out} (as listed in "
                     "its manifest); every step is recomputed"
                     + (f"; kept {len(kept)} file(s) resgeom did not write, e.g. {sorted(kept)[0]}" if kept else ""))

    def _remove_stale_temp_files(self, legacy: bool) -> None:
        """Delete temporary files of atomic_file left by killed runs (only resgeom's own names; the
        predictable legacy names only in a folder with a resgeom manifest)."""
        folders = [self.out] + [os.path.join(self.out, s) for s in ("steps", "figures")]
        ck = os.path.join(self.out, "checkpoints")
        if os.path.isdir(ck):
            folders += [os.path.join(ck, d) for d in sorted(os.listdir(ck)) if os.path.isdir(os.path.join(ck, d))]
        stale = []
        for folder in folders:
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if not is_temp_name(name, legacy=legacy):
                    continue
                pid = temp_owner_pid(name)
                if pid == os.getpid() or _pid_alive(pid, None):
                    continue  # being written right now
                path = os.path.join(folder, name)
                if os.path.islink(path) or os.path.isfile(path):
                    os.remove(path)
                    stale.append(os.path.relpath(path, self.out))
        if stale:
            self.message(f"removed {len(stale)} temporary file(s) left by an interrupted run, e.g. {stale[0]}")

    # ------------------------------------------------------------------ steps
    def step_path(self, name: str) -> str:
        _check_name(name)
        return os.path.join(self.out, "steps", f"{name}.json")

    def dep_hash(self, deps: Optional[Mapping[str, Any]]) -> str:
        """The configuration hash of ``deps`` (the whole configuration when None)."""
        return self.hash if deps is None else config_hash(deps)

    def step_key(self, deps: Optional[Mapping[str, Any]] = None) -> tuple[str, dict[str, Any]]:
        """(key hash, key parts) of a step depending on ``deps``: the configuration hash plus
        :attr:`key_parts` (file and source hashes, library versions)."""
        parts = {"config hash": self.dep_hash(deps), **self.key_parts}
        return config_hash(parts), parts

    def is_done(self, name: str, deps: Optional[Mapping[str, Any]] = None) -> bool:
        """Whether ``name`` finished earlier with the same key (and passes its checksum). On a rank
        other than 0 (which does not read the folder): False."""
        stored = self._read(name, quiet=True)
        return stored is not None and stored.get("hash") == self.step_key(deps)[0]

    def stored(self, name: str, deps: Optional[Mapping[str, Any]] = None) -> Any:
        """The stored result of ``name`` when it finished earlier with the same key and passes its
        checksum (as :meth:`step` would load it), else None. Nothing is computed. On a rank other
        than 0 (which does not read the folder): None; :meth:`step` gives every rank rank 0's."""
        stored = self._read(name, quiet=True)
        return stored["result"] if stored is not None and stored.get("hash") == self.step_key(deps)[0] else None

    def invalidate(self, name: str, reason: str) -> None:
        """Forget step ``name`` (its file is removed), with a message giving ``reason``."""
        path = self.step_path(name)
        if os.path.isfile(path):
            os.remove(path)
        self.message(f"step {name}: {reason}; recomputing")

    def _read(self, name: str, quiet: bool = False) -> Optional[dict[str, Any]]:
        path = self.step_path(name)
        if not self.is_writer or (self.fresh and name not in self.computed) or not os.path.isfile(path):
            return None
        say = (lambda text: None) if quiet else self.message
        try:
            with open(path, encoding="utf-8") as fh:
                stored = json.load(fh)
        except (OSError, ValueError):
            say(f"step {name}: unreadable result file steps/{name}.json, recomputing")
            return None
        if not isinstance(stored, dict) or not str(stored.get("format", "")).startswith("resgeom-step-"):
            say(f"step {name}: steps/{name}.json is not a resgeom step file, recomputing")
            return None
        if stored.get("format") != STEP_FORMAT:
            say(f"step {name}: steps/{name}.json was written by an older resgeom (format {stored.get('format')}, "
                "no checksum), recomputing")
            return None
        try:
            ok = "result" in stored and json_checksum(stored["result"]) == stored.get("checksum")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            say(f"step {name}: steps/{name}.json fails its checksum (edited or damaged since it was written), "
                "recomputing")
            return None
        return stored

    def step(self, name: str, fn: Callable[[], Any], *, deps: Optional[Mapping[str, Any]] = None) -> Any:
        """The result of step ``name``: loaded when it finished before with the same key (``deps``,
        default the whole configuration, plus :attr:`key_parts`) and passes its checksum, else
        ``fn()`` converted to JSON-friendly data and written atomically to ``steps/<name>.json``.
        Either way the JSON-friendly form is returned.

        Distributed (module docstring): a collective. Rank 0 decides load or compute (ONE
        broadcast); a computed step runs ``fn`` on every rank, raises on every rank when it failed
        on any (ONE all_gather_object), and returns rank 0's result on every rank (ONE broadcast,
        which also carries a failure to write the step file). Inside :meth:`on_rank0` work, rank
        0's steps are its own (no collective).
        """
        if not self.distributed or self._alone:
            return self._step_alone(name, fn, deps)
        key, parts = self.step_key(deps)
        stored = self._load(name, key, parts) if self.is_writer else None
        decision = rdist.broadcast_object(None if stored is None else (stored[0],), fn=f"step {name}")
        if decision is not None:
            self.loaded.append(name)
            return decision[0]
        self.message(f"step {name}: running on {self.world} ranks")
        t0 = time.perf_counter()
        err: Optional[BaseException] = None
        result: Any = None
        try:
            result = to_jsonable(fn())
        except Exception as exc:  # noqa: BLE001 - raised on every rank just below
            err = exc
        rdist.raise_together(f"step {name}", err)
        werr: Optional[BaseException] = None
        if self.is_writer:
            try:
                self._store(name, key, parts, result, time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                werr = exc
        shared = rdist.broadcast_object((rdist.portable(werr) if werr is not None else None, result)
                                        if self.is_writer else None, fn=f"step {name}")
        if werr is not None:
            raise werr
        if shared[0] is not None:
            shared[0].add_note(f"step {name}: raised on rank 0 of {self.world} (writing the step file)")
            raise shared[0]
        self.computed.append(name)
        return result if self.is_writer else shared[1]

    def _load(self, name: str, key: str, parts: Mapping[str, Any]) -> Optional[tuple[Any]]:
        """``(result,)`` of step ``name`` stored with ``key`` (with the message), else None (with
        a message naming what changed when a stored result has another key)."""
        stored = self._read(name)
        if stored is None:
            return None
        if stored.get("hash") == key:
            self.message(f"step {name}: finished earlier, loaded from steps/{name}.json "
                         f"(keyed on {describe_key(parts)})")
            return (stored["result"],)
        old = stored.get("key") if isinstance(stored.get("key"), dict) else {}
        self.message(f"step {name}: what it depends on changed since it was stored ({_key_diff(old, parts)}), "
                     "recomputing")
        return None

    def _store(self, name: str, key: str, parts: Mapping[str, Any], result: Any, seconds: float) -> None:
        """Write step ``name``'s file (atomically), recorded in the manifest first."""
        path = self.step_path(name)
        self.record_written(path)
        atomic_write_json(path, {"format": STEP_FORMAT, "name": name, "hash": key, "key": parts,
                                 "seconds": seconds, "checksum": json_checksum(result), "result": result})
        self.message(f"step {name}: done in {seconds:.1f} s")

    def _step_alone(self, name: str, fn: Callable[[], Any], deps: Optional[Mapping[str, Any]]) -> Any:
        """:meth:`step` of a process working alone (or rank 0 inside :meth:`on_rank0`)."""
        key, parts = self.step_key(deps)
        stored = self._load(name, key, parts)
        if stored is not None:
            self.loaded.append(name)
            return stored[0]
        self.message(f"step {name}: running")
        t0 = time.perf_counter()
        result = to_jsonable(fn())
        self._store(name, key, parts, result, time.perf_counter() - t0)
        self.computed.append(name)
        return result

    def on_rank0(self, what: str, fn: Callable[[], T]) -> Optional[T]:
        """Run ``fn`` on rank 0 alone; the other ranks wait for it to finish and return None.

        For work the other ranks need not repeat (training a net with its checkpoints): rank 0's
        steps inside ``fn`` are its own (no collective); afterwards the caller shares what the
        others need (e.g. the weights, through :func:`resgeom_fast.core.distributed.broadcast_object`).
        The others wait in the group's store, not in a collective, so long work does not hit the
        group's timeout; they raise when ``fn`` raised on rank 0 (a copy, noted
        ``"<what>: raised on rank 0 of world"``) and a :class:`RankFailureError` when the store
        cannot be reached (under srun, the store lives on rank 0: rank 0 died). Every rank must
        call it, in the same order as the other collectives. Without distribution: ``fn()``.
        """
        if not self.distributed or self._alone:
            return fn()
        self._waits += 1
        key = f"resgeom_fast/runner/{self._token}/rank0/{self._waits}"
        if self.is_writer:
            self._alone = True
            try:
                result = fn()
            except BaseException as exc:
                _post(key, rdist.portable(exc if isinstance(exc, Exception)
                                          else RuntimeError(f"{what}: {type(exc).__name__} on rank 0")))
                raise
            finally:
                self._alone = False
            _post(key, None)
            return result
        err = _wait_for_rank0(what, key, self.rank, self.world)
        if err is not None:
            err.add_note(f"{what}: raised on rank 0 of {self.world}")
            raise err
        return None

    def checkpoint_dir(self, name: str, deps: Mapping[str, Any]) -> str:
        """``OUT/checkpoints/<name>-<hash of deps>`` (created): a trainer's ``checkpoint_dir``.

        The files a trainer or study writes there (:data:`CHECKPOINT_FILES`) are recorded as
        resgeom's unless a file of that name was already there and not resgeom's.
        """
        _check_name(name)
        path = os.path.join(self.out, "checkpoints", f"{name}-{config_hash(deps)[:10]}")
        os.makedirs(path, exist_ok=True)
        mine = [os.path.join(path, f) for f in CHECKPOINT_FILES]
        self.record_written(*[p for p in mine if not os.path.lexists(p) or self._rel(p) in self._written])
        return path


def _nothing() -> None:
    """What closing a Runner does before it holds anything."""


def _store_of_group() -> Any:
    """The key-value store of the default process group (the one of ``init_process_group``)."""
    return dist.distributed_c10d._get_default_store()


def _post(key: str, err: Optional[BaseException]) -> None:
    """Rank 0: say in the group's store that its :meth:`Runner.on_rank0` work ended (``err``: how
    it failed). A store that cannot be reached is not reported here: the next collective fails."""
    try:
        _store_of_group().set(key, pickle.dumps(err))
    except Exception:  # noqa: BLE001 - the store is gone; the other ranks find out themselves
        pass


def _wait_for_rank0(what: str, key: str, rank: int, world: int) -> Optional[BaseException]:
    """A rank other than 0: wait until rank 0 posts ``key``; return its failure (or None)."""
    while True:
        try:
            store = _store_of_group()
            if store.check([key]):
                return pickle.loads(store.get(key))
        except Exception as exc:  # noqa: BLE001 - a store that cannot be reached: rank 0 is gone
            raise rdist.RankFailureError(
                f"{what}: rank {rank} of {world} lost the group's store while waiting for rank 0 (under srun or "
                f"MASTER_ADDR/MASTER_PORT the store lives on rank 0: rank 0 died or was stopped); "
                f"torch.distributed: {type(exc).__name__}: {exc}") from exc
        time.sleep(RANK0_POLL_S)


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise value_error("Runner", None, "a step name without path separators", repr(name))
