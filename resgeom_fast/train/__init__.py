"""A deterministic trainer with atomic checkpoints and exact resume (layer 5: torch, tqdm only).

- :func:`train` -- train a model on a :class:`resgeom_fast.data.Dataset`, tensors or loaders.
- :func:`load_checkpoint` -- load a trainer checkpoint into a matching model.
- :func:`model_fingerprint` -- class name + parameter / buffer names and shapes.
"""

from .checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    atomic_file,
    atomic_save,
    file_sha256,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint,
)
from .trainer import LOSSES, OPTIMIZERS, SCHEDULES, TrainResult, TrainState, train

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainResult",
    "TrainState",
    "atomic_file",
    "atomic_save",
    "file_sha256",
    "load_checkpoint",
    "model_fingerprint",
    "read_checkpoint",
    "train",
]
