"""Shared test helpers (import `from tests.helpers import ...`; torchvision common_utils style): the devices an op test runs on, the CUDA skip reasons, tolerances."""
from __future__ import annotations

import pytest
import torch

import resgeom_fast

HAS_CUDA = torch.cuda.is_available() and resgeom_fast.built_with_cuda()
CUDA_REASON = (
    "no visible CUDA GPU" if not torch.cuda.is_available() else "resgeom_fast._C built without CUDA"
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON))]
DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype) -> dict:
    """Tolerances for comparing an op against its float64 reference in the given dtype."""
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
