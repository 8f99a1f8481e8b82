"""Atomic checkpoints with a model fingerprint, so a checkpoint never loads into the wrong model."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Union

import torch
from torch import nn

# atomic writes live on the bottom floor (core.io); re-exported here, where they were first
from resgeom_fast.core.io import TEMP_MARK, atomic_file, atomic_save, file_sha256, is_temp_name, temp_owner_pid

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "TEMP_MARK",
    "atomic_file",
    "atomic_save",
    "checkpoint_path",
    "check_fingerprint",
    "file_sha256",
    "is_temp_name",
    "load_checkpoint",
    "model_fingerprint",
    "read_checkpoint",
    "temp_owner_pid",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "resgeom_fast.train/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model (or with a different configuration)."""


class CheckpointCorruptError(CheckpointMismatchError):
    """A checkpoint file cannot be read (truncated, damaged, not a torch file); names the file."""


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class name plus the names and shapes of every parameter and buffer, and their sha256.

    Returns:
        ``{"class": "module.Class", "params": [[name, shape], ...], "buffers": [...], "sha256": hex}``.
    """
    cls = type(model)
    params = [[name, list(p.shape)] for name, p in model.named_parameters()]
    buffers = [[name, list(b.shape)] for name, b in model.named_buffers()]
    desc = {"class": f"{cls.__module__}.{cls.__qualname__}", "params": params, "buffers": buffers}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    desc["sha256"] = digest
    return desc


def check_fingerprint(saved: dict[str, Any], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``saved`` matches ``model``'s fingerprint.

    The message names both classes and the first parameter / buffer that differs.
    """
    current = model_fingerprint(model)
    if saved.get("sha256") == current["sha256"]:
        return
    lines = [f"{source} was written for a different model: it holds {saved.get('class')} "
             f"({len(saved.get('params', []))} parameter tensors, fingerprint {str(saved.get('sha256'))[:12]}), "
             f"this model is {current['class']} ({len(current['params'])} parameter tensors, "
             f"fingerprint {current['sha256'][:12]})"]
    for kind in ("params", "buffers"):
        a = {n: s for n, s in saved.get(kind, [])}
        b = {n: s for n, s in current[kind]}
        for name in list(a) + [n for n in b if n not in a]:
            if a.get(name) != b.get(name):
                lines.append(f"first difference in {kind}: {name!r} is {a.get(name)} in the checkpoint, "
                             f"{b.get(name)} in this model")
                break
        else:
            continue
        break
    raise CheckpointMismatchError("; ".join(lines))


def checkpoint_path(path_or_dir: Union[str, os.PathLike]) -> str:
    """``path_or_dir`` itself if it is a file, else ``path_or_dir/checkpoint.pt``."""
    p = os.fspath(path_or_dir)
    return p if os.path.isfile(p) or p.endswith(".pt") else os.path.join(p, CHECKPOINT_NAME)


def load_checkpoint(model: nn.Module, path_or_dir: Union[str, os.PathLike],
                    optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Load a trainer checkpoint into ``model`` (and ``optimizer``) after checking the fingerprint.

    Args:
        model: the model to fill; must match the checkpoint's fingerprint.
        path_or_dir: a checkpoint file or the trainer's ``checkpoint_dir``.
        optimizer: optionally restored too.

    Returns:
        the whole checkpoint dict (``epoch``, ``history``, ``config``, ...).

    Raises:
        FileNotFoundError: no checkpoint there. CheckpointCorruptError: the file cannot be read.
        CheckpointMismatchError: different model.
    """
    path = checkpoint_path(path_or_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path!r}")
    ckpt = read_checkpoint(path, "load_checkpoint")
    check_fingerprint(ckpt["fingerprint"], model, source=f"checkpoint {path!r}")
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def read_checkpoint(path: Union[str, os.PathLike], where: str = "read_checkpoint") -> dict[str, Any]:
    """The dict of a trainer checkpoint file (``torch.load(weights_only=True)`` on the CPU).

    Raises:
        CheckpointCorruptError: the file cannot be unpickled (truncated, damaged, not a torch
            file) or is not a trainer checkpoint; the message names the file and the remedy.
    """
    path = os.fspath(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: torch raises several kinds
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointCorruptError(
            f"{where}: cannot read checkpoint {path!r} ({type(err).__name__}: {first}); the file is damaged or "
            "not a torch checkpoint: move it aside or delete it to recompute") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{where}: {path!r} is not a {FORMAT} checkpoint; move it aside or delete "
                                     "it to recompute")
    return ckpt
