"""Shared benchmark helpers (import `from benchmarks.helpers import ...`): devices, CUDA-synchronised timing."""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no visible CUDA GPU"))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device: str, rounds: int = 5):
    """Time fn() with pytest-benchmark, synchronising CUDA after each call."""
    def call():
        out = fn()
        sync(device)
        return out
    call()  # warm-up (allocations, lazy init)
    return benchmark.pedantic(call, rounds=rounds, iterations=1)
