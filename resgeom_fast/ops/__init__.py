"""Thin wrappers of the compiled ops (torch.ops.resgeom_fast.*), with fake kernels.

Each op has a plain-PyTorch reference in :mod:`resgeom_fast.ops._reference` that tests and
benchmarks compare to; it is never used as a silent fallback.
"""
from resgeom_fast.ops.density_smooth import density_smooth
from resgeom_fast.ops.lanczos_reorth import lanczos_reorth
from resgeom_fast.ops.masked_scale import masked_scale
from resgeom_fast.ops.orthonormalize import orthonormalize
from resgeom_fast.ops.tridiag_eigh import tridiag_eigh

__all__ = ["density_smooth", "lanczos_reorth", "masked_scale", "orthonormalize", "tridiag_eigh"]
