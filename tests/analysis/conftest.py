"""Shared fixtures of the analysis tests: bundled digits and small FCResNets trained on it.

Trained nets are cached for the whole session (one training per configuration): several test
files check the studies' claims on the same nets.
"""
from __future__ import annotations

import functools

import pytest

from resgeom_fast.data import digits
from resgeom_fast.models import FCResNet
from resgeom_fast.train import train


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
    train(model, ds, epochs, lr=0.05, momentum=0.9, batch_size=64, seed=seed, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_data():
    return digits_flat()
