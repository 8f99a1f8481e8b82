"""Data sets that need no network (layer 5: torch, numpy, scikit-learn, torchvision only).

- :func:`digits`: scikit-learn's bundled 8x8 digits, the default everywhere.
- :func:`gaussian_mixture`, :func:`teacher`: generated synthetic sets.
- :func:`torchvision_dataset`: MNIST / FashionMNIST / CIFAR from a local folder (download=False).

All return a frozen :class:`Dataset` (x_train, y_train, x_test, y_test, num_classes, name, info)
with a ``.loader(split, batch_size, shuffle, seed)`` helper.
"""

from .dataset import SPLITS, Dataset
from .synthetic import digits, gaussian_mixture, teacher
from .vision import VISION_DATASETS, expected_files, torchvision_dataset

__all__ = [
    "Dataset",
    "SPLITS",
    "VISION_DATASETS",
    "digits",
    "expected_files",
    "gaussian_mixture",
    "teacher",
    "torchvision_dataset",
]
