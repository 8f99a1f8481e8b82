"""The data container every loader of this package returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_int, describe, message

__all__ = ["Dataset", "SPLITS"]

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory train/test data set.

    Attributes:
        x_train: inputs [N_train, ...] (float).
        y_train: targets [N_train] (int64 class labels) or [N_train, d_out] (float, regression).
        x_test, y_test: the same for the test split.
        num_classes: C for classification, None for regression.
        name: a short name ("digits", "teacher-30-3-30", ...).
        info: free-form metadata (seed, normalisation statistics, ...), JSON-friendly.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: Optional[int]
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in SPLITS:
            x, y = self.tensors(split)
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise ArgumentTypeError(f"x_{split}, y_{split}: expected tensors, got {type(x).__name__}, {type(y).__name__}")
            if x.shape[0] != y.shape[0]:
                raise ArgumentValueError(f"y_{split}: expected {x.shape[0]} rows (as x_{split}), got {y.shape[0]}")
        if self.num_classes is not None and self.y_train.dtype != torch.int64:
            raise ArgumentValueError(f"y_train: expected int64 labels for a classification set, got {self.y_train.dtype}")

    @property
    def task(self) -> str:
        """"classification" (num_classes set) or "regression"."""
        return "regression" if self.num_classes is None else "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (64,) or (1, 8, 8)."""
        return tuple(self.x_train.shape[1:])

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``split`` ("train" or "test")."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ArgumentValueError(message(None, "split", f"one of {list(SPLITS)}", describe(split)))

    def loader(self, split: str = "train", batch_size: int = 128, shuffle: Optional[bool] = None,
               seed: int = 0, drop_last: bool = False) -> DataLoader:
        """A DataLoader over ``split``; shuffling (default: train only) uses its own generator.

        Two loaders built with the same ``seed`` yield the same batches in the same order; the
        global RNG is not used.
        """
        x, y = self.tensors(split)
        check_int(None, "batch_size", batch_size, minimum=1, expected="an int >= 1")
        if shuffle is None:
            shuffle = split == "train"
        gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen,
                          drop_last=drop_last)

    def flat(self) -> "Dataset":
        """The same data with inputs flattened to [N, prod(input_shape)] (for FC nets)."""
        return replace(self, x_train=self.x_train.flatten(1), x_test=self.x_test.flatten(1))

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "Dataset":
        """Inputs (and float targets) moved / cast; integer labels keep their dtype."""
        def conv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return replace(self, x_train=conv(self.x_train), y_train=conv(self.y_train),
                       x_test=conv(self.x_test), y_test=conv(self.y_test))

    def subset(self, n_train: Optional[int] = None, n_test: Optional[int] = None) -> "Dataset":
        """The first ``n_train`` / ``n_test`` samples of each split (None keeps all)."""
        return replace(self, x_train=self.x_train[:n_train], y_train=self.y_train[:n_train],
                       x_test=self.x_test[:n_test], y_test=self.y_test[:n_test])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, task={self.task}, num_classes={self.num_classes}, "
                f"train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)})")
