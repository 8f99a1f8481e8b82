"""Argument checks: one message grammar, one exception type per fault.

Every message reads ``"<fn>: expected <arg> <expectation>, got <actual>"`` (HOUSE_STYLE), e.g.
``"eigsh: expected k a positive int, got 0"``. Two shorter forms exist for callers whose
messages have always named only one of the two: without ``fn`` the argument leads
(``"seed: expected an int, got 1.5"``, the model constructors' form), without ``arg`` the
function does (``"hessian: expected data batches (x, y), got int"``).

Faults and their exception types:

* :class:`ArgumentTypeError` -- the argument has the wrong type. It is a ``TypeError`` and also a
  ``ValueError``, so callers that caught either before keep catching it.
* :class:`ArgumentValueError` -- the right type with a wrong value: out of range, not one of the
  choices, wrong shape / dtype / device.
* :class:`NonFiniteError` -- NaN or inf values (in an argument, or produced from one by an
  algorithm, which then stops instead of returning them).

The ``check_*`` helpers return the checked value so a call reads
``k = check_int("eigsh", "k", k, minimum=1)``. Each takes ``expected=`` to override the
expectation words where a caller's message has long been pinned by its users.

This module imports only torch and the standard library (the bottom floor of the package).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ArgumentTypeError", "ArgumentValueError", "NonFiniteError", "check_bool", "check_choice",
    "check_int", "check_module", "check_number", "check_tensor", "check_type", "describe",
    "describe_non_finite", "message", "type_error", "value_error",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError`` for callers that caught that)."""


class ArgumentValueError(ValueError):
    """An argument of the right type and a wrong value (range, choice, shape, dtype, device)."""


class NonFiniteError(ArgumentValueError):
    """NaN or infinite values: in an argument, or produced by an operator from one; the
    algorithm stopped instead of returning them."""


def message(fn: Optional[str], arg: Optional[str], expected: str, got: str) -> str:
    """The one message grammar.

    ``message("eigsh", "k", "a positive int", "0")`` -> ``"eigsh: expected k a positive int, got 0"``;
    ``fn=None`` -> ``"k: expected a positive int, got 0"``;
    ``arg=None`` -> ``"eigsh: expected a positive int, got 0"``.
    """
    if not fn:
        if not arg:
            return f"expected {expected}, got {got}"
        return f"{arg}: expected {expected}, got {got}"
    if not arg:
        return f"{fn}: expected {expected}, got {got}"
    return f"{fn}: expected {arg} {expected}, got {got}"


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def describe(value: Any, limit: int = 80) -> str:
    """How a message names a bad value: ``repr`` for scalars, strings and None (cut at ``limit``
    characters), else the type's name (a tensor or a module is named, not printed)."""
    if isinstance(value, _SCALARS) or isinstance(value, numbers.Number):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return type(value).__name__


def type_error(fn: Optional[str], arg: Optional[str], expected: str, value: Any) -> ArgumentTypeError:
    """An :class:`ArgumentTypeError` whose ``got`` is ``type(value).__name__`` (to ``raise``)."""
    return ArgumentTypeError(message(fn, arg, expected, type(value).__name__))


def value_error(fn: Optional[str], arg: Optional[str], expected: str, got: str) -> ArgumentValueError:
    """An :class:`ArgumentValueError` with the ``got`` text given (to ``raise``)."""
    return ArgumentValueError(message(fn, arg, expected, got))


def check_type(fn: Optional[str], arg: Optional[str], value: Any,
               types: Union[type, tuple[type, ...]], expected: str) -> Any:
    """``value`` if it is an instance of ``types``; else :class:`ArgumentTypeError` naming its type."""
    if not isinstance(value, types):
        raise type_error(fn, arg, expected, value)
    return value


def check_bool(fn: Optional[str], arg: Optional[str], value: Any, *, expected: str = "a bool") -> bool:
    """``value`` if it is a bool (ints 0 / 1 and numpy bools are refused)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(message(fn, arg, expected, describe(value)))
    return value


def _int_words(minimum: Optional[int], maximum: Optional[int]) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive int"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


def check_int(fn: Optional[str], arg: Optional[str], value: Any, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, expected: Optional[str] = None) -> int:
    """``value`` as an int if it is an integer (python or numpy; bools refused) in
    ``[minimum, maximum]`` (either bound may be None).

    Raises:
        ArgumentTypeError: not an integer (a bool, a float, a string ...).
        ArgumentValueError: out of range.
    The default expectation is ``"an int"``, ``"a positive int"`` (``minimum=1``),
    ``"an int >= m"``, ``"an int <= M"`` or ``"an int in [m, M]"``; ``got`` is the value's repr.
    """
    words = expected if expected is not None else _int_words(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(message(fn, arg, words, describe(value)))
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ArgumentValueError(message(fn, arg, words, repr(value)))
    return value


def check_number(fn: Optional[str], arg: Optional[str], value: Any, *, positive: bool = False,
                 nonnegative: bool = False, expected: Optional[str] = None) -> float:
    """``float(value)`` if it is a finite real number (int, float or numpy scalar; bools refused),
    ``> 0`` with ``positive``, ``>= 0`` with ``nonnegative``.

    Raises:
        ArgumentTypeError: not a real number.
        ArgumentValueError: NaN / inf, or the sign is wrong.
    The default expectation is ``"a finite float"``, ``"a finite float > 0"`` or
    ``"a finite float >= 0"``.
    """
    if expected is not None:
        words = expected
    elif positive:
        words = "a finite float > 0"
    elif nonnegative:
        words = "a finite float >= 0"
    else:
        words = "a finite float"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(message(fn, arg, words, describe(value)))
    v = float(value)
    if not math.isfinite(v) or (positive and not v > 0) or (nonnegative and not v >= 0):
        raise ArgumentValueError(message(fn, arg, words, describe(value)))
    return v


def _same_choice(value: Any, choice: Any) -> bool:
    # True == 1 in python; a bool matches only a bool choice and vice versa.
    if isinstance(value, bool) != isinstance(choice, bool):
        return False
    try:
        return bool(value == choice)
    except Exception:  # an object whose == raises or is ambiguous (a tensor) is no choice
        return False


def check_choice(fn: Optional[str], arg: Optional[str], value: Any, choices: Sequence[Any], *,
                 expected: Optional[str] = None) -> Any:
    """``value`` if it equals one of ``choices`` (bools match only bools); else
    :class:`ArgumentValueError` ``"... expected <arg> one of [...], got <repr>"``."""
    if not any(_same_choice(value, c) for c in choices):
        words = expected if expected is not None else f"one of {list(choices)}"
        raise ArgumentValueError(message(fn, arg, words, describe(value)))
    return value


def check_module(fn: Optional[str], arg: Optional[str], value: Any, *,
                 expected: str = "an nn.Module") -> nn.Module:
    """``value`` if it is an ``nn.Module``; else :class:`ArgumentTypeError` naming its type."""
    return check_type(fn, arg, value, nn.Module, expected)


def _dtype_words(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(fn: Optional[str], arg: Optional[str], value: Any, *,
                 dtypes: Optional[Sequence[torch.dtype]] = None,
                 ndim: Optional[Union[int, Sequence[int]]] = None) -> Tensor:
    """``value`` if it is a ``torch.Tensor`` with a dtype in ``dtypes`` and ``ndim`` dimensions
    (an int or several allowed counts; None: any).

    Raises:
        ArgumentTypeError: not a tensor (``"... expected x a torch.Tensor, got list"``).
        ArgumentValueError: wrong dtype (``"... expected x of dtype torch.float32 or
            torch.float64, got torch.int64"``) or number of dimensions (``"... expected x with 2
            dimensions, got shape (3,)"``).
    """
    if not isinstance(value, Tensor):
        raise type_error(fn, arg, "a torch.Tensor", value)
    if dtypes is not None and value.dtype not in tuple(dtypes):
        raise value_error(fn, arg, f"of dtype {_dtype_words(tuple(dtypes))}", str(value.dtype))
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            counts = " or ".join(str(n) for n in allowed)
            raise value_error(fn, arg, f"with {counts} dimensions", f"shape {tuple(value.shape)}")
    return value


def describe_non_finite(Y: Tensor) -> str:
    """``"3 NaN and 1 inf values (of 400), the first at index (2, 5)"`` for a tensor with some."""
    nan = torch.isnan(Y)
    inf = torch.isinf(Y)
    bad = (nan | inf).nonzero()
    first = tuple(int(i) for i in bad[0]) if bad.shape[0] else ()
    return (f"{int(nan.sum())} NaN and {int(inf.sum())} inf values (of {Y.numel()}), "
            f"the first at index {first}")
