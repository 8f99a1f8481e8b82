"""Data sets that need no network: bundled digits and generated synthetic sets."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_bool, check_int, describe, message

from .dataset import Dataset

__all__ = ["digits", "gaussian_mixture", "teacher"]


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if an int >= ``minimum``: ``"<name>: expected an int >= m, got <value>"`` otherwise."""
    return check_int(None, name, value, minimum=minimum, expected=f"an int >= {minimum}")


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre every feature with its train mean, then divide by one global train std.

    A single scale (rather than one std per pixel) keeps near-constant border pixels from being
    blown up: a pixel that is almost always 0 in the train split would otherwise take values of
    order 100 in the test split.
    """
    mean = train.mean(0, keepdim=True)
    std = (train - mean).pow(2).mean().sqrt().clamp_min(1e-12)
    return (train - mean) / std, (test - mean) / std, mean, std


def digits(seed: int = 0, test_size: float = 0.25, image: bool = False,
           dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), standardised.

    The train/test split is stratified and fixed by ``seed`` (``train_test_split(random_state=
    seed)``); every pixel is standardised with the train split's mean and std (constant pixels
    keep std 1).

    Args:
        seed: split seed.
        test_size: fraction of samples in the test split (0.25: 1,347 train / 450 test).
        image: False: inputs [N, 64] (FC nets); True: [N, 1, 8, 8] (conv nets).
        dtype: floating dtype of the inputs.

    Returns:
        :class:`Dataset` with int64 labels in 0..9 and ``num_classes = 10``.
    """
    # scikit-learn is an optional dependency, needed by this loader only
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_int("seed", seed, 0)
    if not (isinstance(test_size, float) and 0.0 < test_size < 1.0):
        raise ArgumentValueError(f"test_size: expected a float in (0, 1), got {test_size!r}")
    check_bool(None, "image", image, expected="one of [False, True]")
    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    xtr_t, xte_t, mean, std = _standardise(torch.from_numpy(xtr), torch.from_numpy(xte))
    if image:
        xtr_t, xte_t = xtr_t.reshape(-1, 1, 8, 8), xte_t.reshape(-1, 1, 8, 8)
    return Dataset(
        x_train=xtr_t.to(dtype), y_train=torch.from_numpy(ytr), x_test=xte_t.to(dtype), y_test=torch.from_numpy(yte),
        num_classes=10, name="digits", info={"seed": seed, "test_size": test_size, "image": image},
    )


def gaussian_mixture(num_classes: int = 3, dim: int = 2, n: int = 600, separation: float = 3.0,
                     seed: int = 0, n_test: int | None = None, dtype: torch.dtype = torch.float32) -> Dataset:
    """A balanced mixture of isotropic Gaussians, one per class.

    Class means are independent random directions scaled to norm ``separation`` (drawn from a
    generator seeded with ``seed``); samples are mean + N(0, I_dim). Labels are balanced
    (``n // C`` or ``n // C + 1`` per class) and shuffled.

    Args:
        num_classes: C >= 2.
        dim: input dimension.
        n: train samples; ``n_test`` test samples (default ``n``), from the same mixture.
        separation: norm of each class mean (>= 0).
        seed: seeds every random draw.

    Returns:
        :class:`Dataset` with x [n, dim], int64 y, ``num_classes = C``; ``info["means"]`` [C][dim].
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("dim", dim, 1)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    n_test = n if n_test is None else _check_int("n_test", n_test, 1)
    if isinstance(separation, bool) or not isinstance(separation, (int, float)):
        raise ArgumentTypeError(message(None, "separation", "a float >= 0", describe(separation)))
    if not separation >= 0:
        raise ArgumentValueError(message(None, "separation", "a float >= 0", repr(separation)))
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    means = separation * dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def draw(count: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(count) % num_classes
        y = y[torch.randperm(count, generator=gen)]
        x = means[y] + torch.randn(count, dim, generator=gen, dtype=torch.float64)
        return x.to(dtype), y

    xtr, ytr = draw(n)
    xte, yte = draw(n_test)
    return Dataset(xtr, ytr, xte, yte, num_classes=num_classes, name=f"gaussian_mixture-{num_classes}x{dim}",
                   info={"seed": seed, "separation": float(separation), "means": means.tolist()})


def teacher(dims: Sequence[int] = (30, 3, 30), n: int = 1000, seed: int = 0, n_test: int | None = None,
            dtype: torch.dtype = torch.float32) -> Dataset:
    """Leaky-ResNet teacher data (docs/science.md section 4): a random network through a bottleneck.

    x ~ N(0, I_{dims[0]}); y = T(x) with T a random net dims[0] -> dims[1] -> ... -> dims[-1]:
    Linear layers W_i ~ N(0, 1/fan_in) without biases, ReLU after every layer but the last (so
    (30, 3, 30) is y = W_2 ReLU(W_1 x), which factors through R^3: k* = 3). Inputs and targets are
    then demeaned with the train means and each scaled by one scalar so that the train set has
    (1/N) ||X||_F^2 = (1/N) ||Y||_F^2 = 1 (the test split uses the train statistics).

    Args:
        dims: layer widths, at least (d_in, d_out).
        n: train samples; ``n_test`` test samples (default ``n``).
        seed: seeds the teacher and the inputs.

    Returns:
        a regression :class:`Dataset` (``num_classes = None``): x [n, dims[0]], y [n, dims[-1]].
    """
    dims = tuple(dims)
    if len(dims) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ArgumentValueError(f"dims: expected at least two positive ints, got {dims!r}")
    _check_int("n", n, 2)
    _check_int("seed", seed, 0)
    n_test = n if n_test is None else _check_int("n_test", n_test, 1)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(dout, din, generator=gen, dtype=torch.float64) / math.sqrt(din)
               for din, dout in zip(dims[:-1], dims[1:])]
    x = torch.randn(n + n_test, dims[0], generator=gen, dtype=torch.float64)
    h = x
    for i, w in enumerate(weights):
        h = h @ w.T
        if i < len(weights) - 1:
            h = torch.relu(h)
    xtr, xte, ytr, yte = x[:n], x[n:], h[:n], h[n:]
    xm, ym = xtr.mean(0, keepdim=True), ytr.mean(0, keepdim=True)
    xs = (xtr - xm).pow(2).sum(1).mean().sqrt()
    ys = (ytr - ym).pow(2).sum(1).mean().sqrt()
    norm = lambda t, m, s: ((t - m) / s).to(dtype)  # noqa: E731
    return Dataset(norm(xtr, xm, xs), norm(ytr, ym, ys), norm(xte, xm, xs), norm(yte, ym, ys), num_classes=None,
                   name="teacher-" + "-".join(map(str, dims)), info={"seed": seed, "dims": list(dims)})
