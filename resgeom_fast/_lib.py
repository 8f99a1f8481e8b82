"""Loading of the compiled extension resgeom_fast._C (it registers the torch.ops.resgeom_fast ops)."""
from __future__ import annotations

import importlib

import torch

REBUILD_HINT = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make build`); set RESGEOM_FAST_FORCE_CPU=1 to skip the CUDA kernels"
)
OPS = ("lanczos_reorth", "tridiag_eigh", "density_smooth", "orthonormalize", "masked_scale")


def load() -> None:
    """Import resgeom_fast._C, raising ImportError with the rebuild command when missing or stale."""
    try:
        importlib.import_module("resgeom_fast._C")
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        raise ImportError(
            f"resgeom_fast: the compiled extension resgeom_fast._C could not be loaded ({exc}); "
            + REBUILD_HINT
        ) from exc
    missing = [op for op in OPS if not hasattr(torch.ops.resgeom_fast, op)]
    if missing:  # pragma: no cover
        raise ImportError(
            f"resgeom_fast: the compiled extension is stale (ops {missing} are missing); "
            + REBUILD_HINT
        )


def built_with_cuda() -> bool:
    """True when resgeom_fast._C holds CUDA kernels (a GPU need not be visible)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("resgeom_fast::lanczos_reorth", "CUDA")
