"""resgeom_fast: fast geometry of residual networks.

Layers (DESIGN.md): compiled ops (resgeom_fast._C) -> resgeom_fast.ops -> resgeom_fast.linalg ->
resgeom_fast.operators -> models / data / train -> analysis -> the `resgeom` command.
"""
from resgeom_fast import _lib

_lib.load()

from resgeom_fast import linalg, ops  # noqa: E402
from resgeom_fast import operators  # noqa: E402
from resgeom_fast import data, models, train  # noqa: E402
from resgeom_fast import analysis  # noqa: E402
from resgeom_fast._lib import built_with_cuda  # noqa: E402
from resgeom_fast.linalg import NonFiniteError  # noqa: E402
from resgeom_fast.operators import NonRepeatableDataError, fixed_sample  # noqa: E402

from resgeom_fast._version import __version__  # noqa: E402
__all__ = [
    "NonFiniteError", "NonRepeatableDataError", "analysis", "built_with_cuda", "data", "fixed_sample", "linalg",
    "models", "operators", "ops", "train", "__version__",
]
