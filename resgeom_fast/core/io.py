"""Atomic file writes and JSON conversion, shared by checkpoints, results and reports.

- :func:`atomic_file` -- a context manager giving a temporary file that replaces ``path`` only on
  a clean exit (flush, fsync, ``os.replace``); a failing write leaves the previous file intact.
- :func:`atomic_save` (``torch.save``), :func:`atomic_write_text`, :func:`atomic_write_json` on top.
- :func:`file_sha256` -- the digest of a file of any size.
- :func:`to_jsonable` -- plain JSON-friendly Python from tensors, numpy values and dataclasses
  (non-finite floats become None); :func:`json_checksum` -- the sha256 of canonical JSON.
- :func:`is_temp_name` / :func:`temp_owner_pid` -- recognise the temporary names of
  :func:`atomic_file` (``.<name>.resgeom-tmp-<pid>-<random>``) left behind by killed processes.

This module imports only torch and the standard library (the bottom floor of the package).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from typing import IO, Any, Iterator, Optional, Union

import torch
from torch import Tensor

from resgeom_fast.core.checks import value_error

__all__ = [
    "TEMP_MARK", "atomic_file", "atomic_save", "atomic_write_json", "atomic_write_text", "file_sha256",
    "is_temp_name", "json_checksum", "temp_owner_pid", "to_jsonable",
]

# every temporary file of :func:`atomic_file` is named ``.<target name>.resgeom-tmp-<pid>-<random>``
TEMP_MARK = ".resgeom-tmp-"
_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[A-Za-z0-9_]+$")
# the predictable names of resgeom_fast <= 0.1.0 (``.<target name>.tmp-<pid>``), left behind by killed runs
_LEGACY_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def is_temp_name(name: str, legacy: bool = False) -> bool:
    """Whether the file name ``name`` is one of :func:`atomic_file`'s temporary names
    (``legacy``: also the predictable ``.<name>.tmp-<pid>`` names of resgeom_fast <= 0.1.0)."""
    return bool(_TEMP_RE.match(name) or (legacy and _LEGACY_TEMP_RE.match(name)))


def temp_owner_pid(name: str) -> Optional[int]:
    """The pid recorded in a temporary name of :func:`atomic_file` (None if ``name`` is not one)."""
    m = _TEMP_RE.match(name) or _LEGACY_TEMP_RE.match(name)
    return int(m.group(1)) if m else None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder (created if missing) for writing; on a clean exit
    flush, fsync and ``os.replace`` it onto ``path``; on an error remove it.

    A reader (or a resumed run) sees either the previous complete file or the new one. The
    temporary file is created with ``O_CREAT | O_EXCL`` under an unpredictable name
    (``.<name>.resgeom-tmp-<pid>-<random>``, :func:`tempfile.mkstemp`), so a symlink planted at a
    guessable name is never followed; it gets the permissions a plain ``open`` would give
    (0666 minus the umask). ``mode`` must be a write mode ("w", "wb", "x", ...).

    Raises:
        ArgumentValueError (a ValueError): ``mode`` is not a write mode.
    """
    if "r" in mode or "a" in mode or not any(c in mode for c in "wx"):
        raise value_error("atomic_file", None, "a write mode ('w', 'wb')", repr(mode))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMP_MARK}{os.getpid()}-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        fh = os.fdopen(fd, mode.replace("x", "w"), encoding=encoding)
    except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's contents, read in ``chunk``-byte pieces (any size)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Plain Python for JSON: tensors / numpy arrays -> (nested) lists, non-finite floats -> None.

    Dataclasses use their own ``to_dict`` when they have one, else their fields; dict keys become
    strings; ``torch.dtype`` / ``torch.device`` their names; other numbers ``float(obj)``.

    Raises:
        TypeError: a complex tensor, or an object that is none of these.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        t = obj.detach().cpu()
        if t.is_complex():
            raise TypeError("to_jsonable: complex tensors are not supported")
        if t.dtype == torch.bool:
            return t.tolist()
        if t.is_floating_point():
            return to_jsonable(t.double().tolist())
        return t.tolist()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array / scalar
        return to_jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    try:
        return float(obj)
    except (TypeError, ValueError):
        raise TypeError(f"to_jsonable: cannot convert {type(obj).__name__}") from None


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` (UTF-8) atomically (:func:`atomic_file`)."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: Union[str, os.PathLike], obj: Any) -> None:
    """``to_jsonable(obj)`` as indented, strict JSON (no NaN), written atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def json_checksum(obj: Any) -> str:
    """sha256 hex digest of ``obj``'s canonical JSON (sorted keys, no spaces, ASCII, no NaN).

    ``obj`` must already be JSON-friendly (:func:`to_jsonable`); a value read back from a file
    written by :func:`atomic_write_json` gives the same digest (floats round-trip exactly).
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
