"""resgeom_fast.core.checks: the exact message of every check and the exception class per fault."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from resgeom_fast.core import checks
from resgeom_fast.core.checks import (
    ArgumentTypeError,
    ArgumentValueError,
    NonFiniteError,
    check_bool,
    check_choice,
    check_int,
    check_module,
    check_number,
    check_tensor,
    check_type,
    describe,
    describe_non_finite,
    message,
    type_error,
    value_error,
)


def raises(cls, text):
    """pytest.raises with the whole message matched literally."""
    return pytest.raises(cls, match="^" + re.escape(text) + "$")


def test_exception_hierarchy():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert issubclass(ArgumentValueError, ValueError) and not issubclass(ArgumentValueError, TypeError)
    assert issubclass(NonFiniteError, ArgumentValueError)


def test_nonfinite_error_is_reexported_where_it_was():
    import resgeom_fast
    from resgeom_fast import linalg
    from resgeom_fast.linalg import operator

    assert operator.NonFiniteError is NonFiniteError
    assert linalg.NonFiniteError is NonFiniteError
    assert resgeom_fast.NonFiniteError is NonFiniteError
    assert operator.describe_non_finite is describe_non_finite


def test_message_grammar():
    assert message("eigsh", "k", "a positive int", "0") == "eigsh: expected k a positive int, got 0"
    assert message(None, "seed", "an int", "1.5") == "seed: expected an int, got 1.5"
    assert message("hessian", None, "data batches (x, y)", "int") == "hessian: expected data batches (x, y), got int"
    assert message(None, None, "x", "y") == "expected x, got y"


def test_type_error_and_value_error_build_exceptions():
    e = type_error("f", "model", "an nn.Module", 3)
    assert isinstance(e, ArgumentTypeError) and str(e) == "f: expected model an nn.Module, got int"
    e = value_error("f", "k", "an int >= 2", "1")
    assert type(e) is ArgumentValueError and str(e) == "f: expected k an int >= 2, got 1"


def test_describe():
    assert describe(3) == "3" and describe("a") == "'a'" and describe(None) == "None" and describe(True) == "True"
    assert describe(torch.zeros(3)) == "Tensor" and describe([1, 2]) == "list"
    assert describe("x" * 200).endswith("...") and len(describe("x" * 200)) == 80


def test_check_type():
    assert check_type("f", "a", [1], (list, tuple), "a list") == [1]
    with raises(ArgumentTypeError, "f: expected a a list, got dict"):
        check_type("f", "a", {}, (list, tuple), "a list")


def test_check_bool():
    assert check_bool("f", "flag", False) is False
    for bad in (1, 0, np.bool_(True), "True", None):
        with pytest.raises(ArgumentTypeError, match=r"^f: expected flag a bool, got "):
            check_bool("f", "flag", bad)
    with raises(ArgumentTypeError, "hyper: expected one of [False, True], got 1"):
        check_bool(None, "hyper", 1, expected="one of [False, True]")


def test_check_int_type_and_range():
    assert check_int("f", "k", 3) == 3
    assert type(check_int("f", "k", np.int64(4))) is int
    with raises(ArgumentTypeError, "f: expected k an int, got True"):
        check_int("f", "k", True)  # bool is not an int
    with raises(ArgumentTypeError, "f: expected k a positive int, got 1.0"):
        check_int("f", "k", 1.0, minimum=1)
    with raises(ArgumentTypeError, "f: expected k a positive int, got '3'"):
        check_int("f", "k", "3", minimum=1)
    with raises(ArgumentTypeError, "f: expected k a positive int, got Tensor"):
        check_int("f", "k", torch.tensor(3), minimum=1)
    with raises(ArgumentValueError, "f: expected k a positive int, got 0"):
        check_int("f", "k", 0, minimum=1)
    with raises(ArgumentValueError, "f: expected k an int >= 2, got 1"):
        check_int("f", "k", 1, minimum=2)
    with raises(ArgumentValueError, "f: expected k an int <= 5, got 6"):
        check_int("f", "k", 6, maximum=5)
    with raises(ArgumentValueError, "f: expected k an int in [0, 5], got -1"):
        check_int("f", "k", -1, minimum=0, maximum=5)
    with raises(ArgumentValueError, "width: expected an int >= 1, got 0"):
        check_int(None, "width", 0, minimum=1, expected="an int >= 1")
    assert check_int("f", "k", 5, minimum=0, maximum=5) == 5


def test_check_int_errors_are_value_errors_for_old_callers():
    for bad in (True, 0, "3"):
        with pytest.raises(ValueError):
            check_int("f", "k", bad, minimum=1)


def test_check_number():
    assert check_number("f", "lr", 1) == 1.0 and type(check_number("f", "lr", 1)) is float
    assert check_number("f", "lr", np.float32(0.5)) == 0.5
    assert check_number("f", "lr", 0.0, nonnegative=True) == 0.0
    with raises(ArgumentTypeError, "f: expected lr a finite float, got True"):
        check_number("f", "lr", True)
    with raises(ArgumentTypeError, "f: expected lr a finite float, got '1'"):
        check_number("f", "lr", "1")
    with raises(ArgumentValueError, "f: expected lr a finite float, got nan"):
        check_number("f", "lr", math.nan)
    with raises(ArgumentValueError, "f: expected lr a finite float > 0, got 0.0"):
        check_number("f", "lr", 0.0, positive=True)
    with raises(ArgumentValueError, "f: expected lr a finite float > 0, got inf"):
        check_number("f", "lr", math.inf, positive=True)
    with raises(ArgumentValueError, "f: expected lr a finite float >= 0, got -1"):
        check_number("f", "lr", -1, nonnegative=True)
    with raises(ArgumentValueError, "beta: expected a float >= 0, got -0.5"):
        check_number(None, "beta", -0.5, nonnegative=True, expected="a float >= 0")


def test_check_choice():
    assert check_choice("f", "which", "both", ("largest", "both")) == "both"
    with raises(ArgumentValueError, "f: expected which one of ['largest', 'both'], got 'x'"):
        check_choice("f", "which", "x", ("largest", "both"))
    with raises(ArgumentValueError, "f: expected which one of ['largest', 'both'], got 3"):
        check_choice("f", "which", 3, ("largest", "both"))
    # True == 1 in python, but a bool is no int choice and an int no bool choice
    with raises(ArgumentValueError, "f: expected n one of [1, 2], got True"):
        check_choice("f", "n", True, (1, 2))
    with raises(ArgumentValueError, "f: expected flag one of [False, True], got 1"):
        check_choice("f", "flag", 1, (False, True))
    assert check_choice("f", "flag", None, (None, "mean")) is None
    with raises(ArgumentValueError, "f: expected x one of [1], got Tensor"):
        check_choice("f", "x", torch.ones(2), (1,))


def test_check_module():
    m = nn.Linear(2, 2)
    assert check_module("f", "model", m) is m
    with raises(ArgumentTypeError, "f: expected model an nn.Module, got function"):
        check_module("f", "model", lambda x: x)


def test_check_tensor():
    x = torch.zeros(2, 3)
    assert check_tensor("f", "x", x, dtypes=(torch.float32, torch.float64), ndim=2) is x
    assert check_tensor("f", "x", x, ndim=(1, 2)) is x
    with raises(ArgumentTypeError, "f: expected x a torch.Tensor, got list"):
        check_tensor("f", "x", [1.0])
    with raises(ArgumentValueError, "f: expected x of dtype torch.float32 or torch.float64, got torch.int64"):
        check_tensor("f", "x", torch.zeros(2, dtype=torch.int64), dtypes=(torch.float32, torch.float64))
    with raises(ArgumentValueError, "f: expected x of dtype torch.float64, got torch.float32"):
        check_tensor("f", "x", x, dtypes=(torch.float64,))
    with raises(ArgumentValueError, "f: expected x with 2 dimensions, got shape (3,)"):
        check_tensor("f", "x", torch.zeros(3), ndim=2)
    with raises(ArgumentValueError, "f: expected x with 3 or 4 dimensions, got shape (2, 3)"):
        check_tensor("f", "x", x, ndim=(3, 4))


def test_describe_non_finite():
    y = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    assert describe_non_finite(y) == "1 NaN and 1 inf values (of 4), the first at index (0, 1)"


def test_all_is_complete():
    for name in checks.__all__:
        assert hasattr(checks, name)
