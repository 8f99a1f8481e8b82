"""Resumable steps: each finished step's result is kept in the output folder.

Layout of an output folder ``OUT``::

    OUT/manifest.json              what ran there last (study, config, config hash)
    OUT/steps/<name>.json          one finished step: {"name", "hash", "seconds", "result"}
    OUT/checkpoints/<name>-<hash>/ trainer checkpoints (checkpoint.pt, log.jsonl)

A step is a function returning JSON-friendly data (dicts, lists, numbers; tensors and result
dataclasses are converted by :func:`~resgeom_fast.analysis._common.to_jsonable`). Its file is
written atomically only after the function returns, so a Ctrl-C (KeyboardInterrupt) or a crash
inside a step leaves the folder as it was before that step; a re-run with the same configuration
loads the finished steps instead of recomputing them, and training resumes from the last epoch
checkpoint. Every step file stores the hash of the configuration it depends on (the whole
configuration unless the study names a subset); when that hash differs the step is recomputed and
a message says so: stale results are never reused silently. Checkpoint folders carry the hash of
the training configuration in their name, so a changed model or optimiser never resumes from the
wrong weights.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO

from resgeom_fast.analysis._common import atomic_write_json, to_jsonable

from .config import config_hash

__all__ = ["Runner", "STEP_FORMAT"]

STEP_FORMAT = "resgeom-step-1"


class Runner:
    """Runs named steps in ``out``, skipping those already finished with the same configuration.

    Args:
        out: the output folder (created).
        config: the full configuration (JSON-friendly); it is the default dependency of a step.
        study: a name recorded in the manifest.
        fresh: delete earlier steps and checkpoints in ``out`` first.
        progress: show tqdm bars (training, long analyses) and the step bar.
        log: where messages go (default stderr); ``None`` silences them.

    Attributes:
        computed, loaded: names of the steps computed / loaded from disk in this run.
    """

    def __init__(self, out: str, config: Mapping[str, Any], *, study: str, fresh: bool = False,
                 progress: bool = True, log: Optional[TextIO] = sys.stderr) -> None:
        self.out = os.path.abspath(os.fspath(out))
        self.config = dict(config)
        self.study = study
        self.progress = progress
        self._log = log
        self.computed: list[str] = []
        self.loaded: list[str] = []
        self.hash = config_hash(self.config)
        if fresh:
            for sub in ("steps", "checkpoints"):
                shutil.rmtree(os.path.join(self.out, sub), ignore_errors=True)
        os.makedirs(os.path.join(self.out, "steps"), exist_ok=True)
        manifest = os.path.join(self.out, "manifest.json")
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as fh:
                    old = json.load(fh)
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("config_hash") not in (None, self.hash):
                old_cfg = old.get("config", {}) or {}
                changed = sorted(k for k in set(old_cfg) | set(self.config) if old_cfg.get(k) != self.config.get(k))
                what = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:6])
                self.message(f"configuration differs from the earlier run in {self.out} ({what}); "
                             "steps that depend on it are recomputed")
        atomic_write_json(manifest, {"study": study, "config": self.config, "config_hash": self.hash})

    # ------------------------------------------------------------------ messages
    def message(self, text: str) -> None:
        """One line to the log stream (kept clear of tqdm bars)."""
        if self._log is None:
            return
        try:
            from tqdm.auto import tqdm

            tqdm.write(f"[resgeom] {text}", file=self._log)
        except Exception:  # pragma: no cover - tqdm missing or stream odd
            print(f"[resgeom] {text}", file=self._log)

    # ------------------------------------------------------------------ steps
    def step_path(self, name: str) -> str:
        _check_name(name)
        return os.path.join(self.out, "steps", f"{name}.json")

    def dep_hash(self, deps: Optional[Mapping[str, Any]]) -> str:
        return self.hash if deps is None else config_hash(deps)

    def is_done(self, name: str, deps: Optional[Mapping[str, Any]] = None) -> bool:
        """Whether ``name`` finished earlier with the same dependencies."""
        stored = self._read(name)
        return stored is not None and stored.get("hash") == self.dep_hash(deps)

    def _read(self, name: str) -> Optional[dict[str, Any]]:
        path = self.step_path(name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                stored = json.load(fh)
        except (OSError, json.JSONDecodeError):
            self.message(f"step {name}: unreadable result file, recomputing")
            return None
        if not isinstance(stored, dict) or stored.get("format") != STEP_FORMAT:
            return None
        return stored

    def step(self, name: str, fn: Callable[[], Any], *, deps: Optional[Mapping[str, Any]] = None) -> Any:
        """The result of step ``name``: loaded when it finished before with the same ``deps``
        (default: the whole configuration), else ``fn()`` converted to JSON-friendly data and
        written atomically to ``steps/<name>.json``. Either way the JSON-friendly form is returned.
        """
        key = self.dep_hash(deps)
        stored = self._read(name)
        if stored is not None:
            if stored.get("hash") == key:
                self.loaded.append(name)
                self.message(f"step {name}: finished earlier, loaded from steps/{name}.json")
                return stored["result"]
            self.message(f"step {name}: its configuration changed since it was stored, recomputing")
        self.message(f"step {name}: running")
        t0 = time.perf_counter()
        result = to_jsonable(fn())
        seconds = time.perf_counter() - t0
        atomic_write_json(self.step_path(name), {"format": STEP_FORMAT, "name": name, "hash": key,
                                                 "seconds": seconds, "result": result})
        self.computed.append(name)
        self.message(f"step {name}: done in {seconds:.1f} s")
        return result

    def checkpoint_dir(self, name: str, deps: Mapping[str, Any]) -> str:
        """``OUT/checkpoints/<name>-<hash of deps>`` (created): a trainer's ``checkpoint_dir``."""
        _check_name(name)
        path = os.path.join(self.out, "checkpoints", f"{name}-{config_hash(deps)[:10]}")
        os.makedirs(path, exist_ok=True)
        return path


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"Runner: expected a step name without path separators, got {name!r}")
