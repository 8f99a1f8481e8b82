"""Atomic checkpoints with a model fingerprint, so a checkpoint never loads into the wrong model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Any, Iterator, Optional, Union

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointMismatchError",
    "atomic_file",
    "atomic_save",
    "checkpoint_path",
    "check_fingerprint",
    "load_checkpoint",
    "model_fingerprint",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "resgeom_fast.train/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model (or with a different configuration)."""


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


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder (created if missing) for writing; on a clean exit
    flush, fsync and ``os.replace`` it onto ``path``; on an error remove it.

    A reader (or a resumed run) sees either the previous complete file or the new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


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
        FileNotFoundError: no checkpoint there. CheckpointMismatchError: different model.
    """
    path = checkpoint_path(path_or_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointMismatchError(f"load_checkpoint: {path!r} is not a {FORMAT} checkpoint")
    check_fingerprint(ckpt["fingerprint"], model, source=f"checkpoint {path!r}")
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt
