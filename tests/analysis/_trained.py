"""Shared nets of the analysis tests: bundled digits and small FCResNets trained on it.

Trained nets are cached for the whole session (one training per configuration): several test
files check the studies' claims on the same nets. (A helper module, not a conftest.py: test
files import it by name, and a second ``conftest`` module would shadow tests/conftest.py.)
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from resgeom_fast.data import digits
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import mark_residual_block
from resgeom_fast.train import train


@contextlib.contextmanager
def one_thread():
    """Train on one thread: the same weights whatever the machine's thread count (reductions on
    several threads round differently, and many SGD steps amplify that into different nets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def digits_flat():
    """scikit-learn digits, inputs flattened to [N, 64], float32."""
    return digits(seed=0).flat()


@functools.lru_cache(maxsize=None)
def trained_fc(skip: str = "identity", width: int = 64, depth: int = 8, epochs: int = 15,
               norm: str = "batch", hyper: bool = False, seed: int = 0) -> FCResNet:
    """An FCResNet trained on digits with SGD (eval mode on return, float32, CPU).

    Do not modify the returned model in place (it is shared); deep-copy it first.
    """
    ds = digits_flat()
    model = FCResNet(64, width, depth, 10, skip=skip, norm=norm, hyper=hyper, seed=seed)
    with one_thread():
        train(model, ds, epochs, lr=0.05, momentum=0.9, batch_size=64, seed=seed, progress=False)
    return model.eval()



# -- constructed linear residual nets (exact answers: the Jacobian of block l is its matrix) ------
class LinBlock(nn.Module):
    """h -> h + A h with a fixed matrix A (marked as a residual block; branch = the Linear)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(A.shape[1], A.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(A)
        mark_residual_block(self, branch=self.lin)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.lin(h)


class LinNet(nn.Module):
    """Identity stem, linear residual blocks with the given matrices, a Linear head with C outputs."""

    def __init__(self, mats: list[torch.Tensor], num_classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinBlock(A) for A in mats)
        self.head = nn.Linear(mats[0].shape[0], num_classes).to(mats[0].dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A d x d float64 orthogonal matrix (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
