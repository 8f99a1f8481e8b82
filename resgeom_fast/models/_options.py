"""Validation of the options shared by every model family (docs/science.md sections 1-3).

Every bad option raises ``ValueError`` naming the argument and listing the allowed values, e.g.
``skip: expected one of ['identity', 'none', 'orthogonal'], got 'foo'``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_bool
from resgeom_fast.core.checks import check_choice as _check_choice
from resgeom_fast.core.checks import check_int

SKIPS: tuple[str, ...] = ("identity", "none", "orthogonal")
NORMS: tuple[str, ...] = ("batch", "none")
INITS: tuple[str, ...] = ("kaiming", "fixup", "torch")
SCALE_NAMES: tuple[str, ...] = ("1/L", "1/sqrt(L)", "skipinit")

ScaleSpec = Union[float, int, str]


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise an ArgumentValueError (a
    ValueError) that lists them: ``"<name>: expected one of [...], got <value>"``."""
    return _check_choice(None, name, value, allowed)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools refused), else raise
    ArgumentTypeError / ArgumentValueError (both ValueErrors): ``"<name>: expected an int >= m, got <value>"``."""
    return check_int(None, name, value, minimum=minimum, expected=f"an int >= {minimum}")


def check_drop_prob(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number in [0, 1) (a stochastic-depth drop
    probability), else raise ArgumentTypeError / ArgumentValueError (both ValueErrors):
    ``"<name>: expected a float in [0, 1), got <value>"``."""
    expected = "a float in [0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name}: expected {expected}, got {value!r}")
    v = float(value)
    if not (0.0 <= v < 1.0):   # NaN fails too
        raise ArgumentValueError(f"{name}: expected {expected}, got {value!r}")
    return v


def resolve_scale(scale: ScaleSpec, num_blocks: int) -> Union[float, str]:
    """Turn a ``scale`` option into a python float, or the string ``"skipinit"``.

    Args:
        scale: a finite float (or int), ``"1/L"``, ``"1/sqrt(L)"`` or ``"skipinit"``.
        num_blocks: L, the number of residual blocks of the whole network.

    Returns:
        ``1/L`` or ``1/sqrt(L)`` as floats, ``float(scale)`` for numbers, or ``"skipinit"``
        (the caller then creates one learnable scalar per block, initialised to 0).
    """
    if isinstance(scale, bool):
        raise ArgumentTypeError(f"scale: expected a float or one of {list(SCALE_NAMES)}, got {scale!r}")
    if isinstance(scale, (int, float)):
        if not math.isfinite(float(scale)):
            raise ArgumentValueError(f"scale: expected a finite float or one of {list(SCALE_NAMES)}, got {scale!r}")
        return float(scale)
    if scale == "1/L":
        return 1.0 / num_blocks
    if scale == "1/sqrt(L)":
        return 1.0 / math.sqrt(num_blocks)
    if scale == "skipinit":
        return "skipinit"
    raise ArgumentValueError(f"scale: expected a float or one of {list(SCALE_NAMES)}, got {scale!r}")


def check_common(skip: str, norm: str, init: str, hyper: object) -> None:
    """Validate the options every family shares (``scale`` is checked by :func:`resolve_scale`)."""
    check_choice("skip", skip, SKIPS)
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    check_bool(None, "hyper", hyper, expected="one of [False, True]")
