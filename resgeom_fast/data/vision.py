"""MNIST / FashionMNIST / CIFAR-10 / CIFAR-100 from a local folder through torchvision.

Nothing is ever downloaded (``download=False``): when the files are absent the error lists the
exact paths torchvision reads, so they can be put there by hand.
"""

from __future__ import annotations

import os
import pickle
from typing import Optional, Union

import torch
from torch import Tensor

from resgeom_fast.core.checks import ArgumentValueError

from .dataset import Dataset

__all__ = ["torchvision_dataset", "expected_files", "VISION_DATASETS"]

VISION_DATASETS: tuple[str, ...] = ("mnist", "fashionmnist", "cifar10", "cifar100")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_LAYOUT = {
    "mnist": ("MNIST/raw", _MNIST_FILES, "https://ossci-datasets.s3.amazonaws.com/mnist/ (gunzip the .gz files)"),
    "fashionmnist": ("FashionMNIST/raw", _MNIST_FILES,
                     "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (gunzip the .gz files)"),
    "cifar10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"),
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it into root)"),
    "cifar100": ("cifar-100-python", ("train", "test", "meta"),
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it into root)"),
}
_NUM_CLASSES = {"mnist": 10, "fashionmnist": 10, "cifar10": 10, "cifar100": 100}


def expected_files(name: str, root: Union[str, os.PathLike]) -> list[str]:
    """The files torchvision reads for ``name`` under ``root`` (absolute paths)."""
    if name not in _LAYOUT:
        raise ArgumentValueError(f"name: expected one of {list(VISION_DATASETS)}, got {name!r}")
    folder, files, _ = _LAYOUT[name]
    base = os.path.join(os.path.abspath(os.fspath(root)), folder)
    return [os.path.join(base, f) for f in files]


def _torchvision_class(name: str, verify: bool):
    # torchvision is an optional dependency, needed by this loader only
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    if verify or name not in ("cifar10", "cifar100"):
        return cls  # MNIST-style raw files carry no checksum in torchvision

    class Unverified(cls):  # type: ignore[misc, valid-type]
        """torchvision's CIFAR loader with the md5 checks replaced by existence checks."""

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                data = pickle.load(fh, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unverified.__name__ = cls.__name__
    return Unverified


def _to_tensors(ds, name: str) -> tuple[Tensor, Tensor]:
    if name in ("mnist", "fashionmnist"):
        x = torch.as_tensor(ds.data).unsqueeze(1)  # [N, 1, 28, 28] uint8
    else:
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> [N, 3, 32, 32]
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x, y


def torchvision_dataset(name: str, root: Union[str, os.PathLike], *, image: bool = True, normalize: bool = True,
                        verify: bool = True, n_train: Optional[int] = None, n_test: Optional[int] = None,
                        dtype: torch.dtype = torch.float32) -> Dataset:
    """Load a torchvision data set from ``root`` (never downloads) into an in-memory :class:`Dataset`.

    Args:
        name: "mnist" | "fashionmnist" | "cifar10" | "cifar100".
        root: the folder torchvision's ``root`` argument expects: ``root/MNIST/raw/...``,
            ``root/FashionMNIST/raw/...`` (uncompressed idx files), ``root/cifar-10-batches-py/...``,
            ``root/cifar-100-python/...``; :func:`expected_files` lists them.
        image: True: x [N, C, H, W]; False: flattened [N, C*H*W].
        normalize: pixels scaled to [0, 1] then standardised per channel with train statistics;
            False: only scaled to [0, 1].
        verify: check CIFAR files against torchvision's md5 sums (False: existence only, e.g.
            for small or re-packed files).
        n_train, n_test: keep only the first samples of each split (None: all).
        dtype: floating dtype of x (CIFAR-10 train in float32 takes about 600 MB).

    Returns:
        :class:`Dataset` with int64 labels, ``num_classes`` 10 or 100.

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: files missing; the message lists every expected path.
        RuntimeError: files present but rejected by torchvision (e.g. a checksum mismatch).
    """
    if name not in _LAYOUT:
        raise ArgumentValueError(f"name: expected one of {list(VISION_DATASETS)}, got {name!r}")
    files = expected_files(name, root)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        _, _, source = _LAYOUT[name]
        raise FileNotFoundError(
            f"torchvision_dataset({name!r}): data files not found under root={os.fspath(root)!r} "
            f"(nothing is downloaded). Expected these files:\n  " + "\n  ".join(files)
            + "\nmissing:\n  " + "\n  ".join(missing) + f"\nsource: {source}")
    cls = _torchvision_class(name, verify)
    try:
        train = cls(os.fspath(root), train=True, download=False)
        test = cls(os.fspath(root), train=False, download=False)
    except RuntimeError as err:
        raise RuntimeError(
            f"torchvision_dataset({name!r}): torchvision refused the files under {os.fspath(root)!r} ({err}). "
            "If they are the official files they may be corrupted; pass verify=False to skip the md5 check.") from err
    xtr, ytr = _to_tensors(train, name)
    xte, yte = _to_tensors(test, name)
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    xtr = xtr.to(dtype) / 255.0
    xte = xte.to(dtype) / 255.0
    info: dict = {"root": os.fspath(root), "normalize": normalize}
    if normalize:
        mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
        std = xtr.std(dim=(0, 2, 3), keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        info.update(mean=mean.flatten().tolist(), std=std.flatten().tolist())
    if not image:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return Dataset(xtr, ytr, xte, yte, num_classes=_NUM_CLASSES[name], name=name, info=info)
