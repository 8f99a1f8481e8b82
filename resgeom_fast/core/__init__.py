"""The bottom floor: what every layer of resgeom_fast shares (imports torch and the stdlib only).

- :mod:`resgeom_fast.core.checks` -- argument checks: one message grammar
  (``"<fn>: expected <arg> <expectation>, got <actual>"``), one exception type per fault.
"""
from resgeom_fast.core import checks
from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, NonFiniteError

__all__ = ["ArgumentTypeError", "ArgumentValueError", "NonFiniteError", "checks"]
