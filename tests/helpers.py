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


def randomise_batchnorm(model: torch.nn.Module, gen: torch.Generator, *, mean: float = 0.2, var: float = 1.0,
                        weight: float = 1.0, bias: float = 0.2, dtype: torch.dtype = torch.float32,
                        layer_scale: bool = False) -> torch.nn.Module:
    """Random BatchNorm running statistics and affine parameters (a fresh net's are 0 / 1, so in
    eval mode every BatchNorm is the identity and the blocks look alike), drawn from ``gen`` in
    ``dtype``, module by module: running_mean ~ mean * N(0, 1), running_var ~ 0.5 + var * U(0, 1),
    weight ~ 0.5 + weight * U(0, 1), bias ~ bias * N(0, 1); with ``layer_scale`` a ConvNeXt
    CNBlock's layer scale ~ 0.2 + U(0, 1) (torchvision starts it at 1e-6). Returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                shape = m.running_mean.shape
                m.running_mean.copy_(mean * torch.randn(shape, generator=gen, dtype=dtype))
                m.running_var.copy_(0.5 + var * torch.rand(shape, generator=gen, dtype=dtype))
                m.weight.copy_(0.5 + weight * torch.rand(shape, generator=gen, dtype=dtype))
                m.bias.copy_(bias * torch.randn(shape, generator=gen, dtype=dtype))
            if layer_scale and type(m).__name__ == "CNBlock":
                m.layer_scale.copy_(0.2 + torch.rand(m.layer_scale.shape, generator=gen, dtype=dtype))
    return model
