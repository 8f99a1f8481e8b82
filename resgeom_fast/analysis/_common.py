"""Helpers shared by the analyses: the :class:`Result` base (generic ``to_dict``), batch
iteration and validation; JSON conversion and atomic writes re-exported from
:mod:`resgeom_fast.core.io`, the batch contract from :mod:`resgeom_fast.core.modules`.

Every analysis returns a dataclass deriving from :class:`Result`: ``to_dict()`` gives plain
JSON-friendly Python (floats, ints, str, bool, None, lists, dicts) and ``to_json(path)`` writes
it atomically. Tensors are kept on the dataclass (CPU) for plotting; ``to_dict`` converts them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Iterator, Optional, Union

import torch
from torch import Tensor

# the same argument checks as the linalg layer (one implementation; re-exported for the analyses)
from resgeom_fast.linalg._util import check_choice, check_int
from resgeom_fast.linalg.operator import NonFiniteError, describe_non_finite
from resgeom_fast.core.checks import check_number, value_error
from resgeom_fast.core.modules import as_batches
# JSON conversion and atomic writes live on the bottom floor (re-exported here: experiments import them)
from resgeom_fast.core.io import atomic_write_json, atomic_write_text, json_checksum, to_jsonable

from .plotting import figure_axes  # re-exported: the plot helpers' axes (moved to plotting.py)

__all__ = [
    "FIRST", "Result", "atomic_write_json", "atomic_write_text", "batches", "check_choice", "check_finite_parameters",
    "check_finite_tensor", "check_float",
    "check_int", "figure_axes", "json_checksum", "json_field", "model_device_dtype", "to_jsonable",
]


FIRST = ""  # a ``_place`` anchor: the derived key goes first in its dict


def json_field(*, group: Optional[str] = None, key: Optional[str] = None, **kwargs: Any) -> Any:
    """A dataclass field with its place in ``Result.to_dict()``: inside the sub-dict ``group``
    (created where the group's first field is declared) and/or under the name ``key``.
    ``kwargs`` go to :func:`dataclasses.field` (default, default_factory, repr, ...)."""
    meta = dict(kwargs.pop("metadata", None) or {})
    meta["json"] = {"group": group, "key": key}
    return dataclasses.field(metadata=meta, **kwargs)


class Result:
    """Base of every analysis result dataclass: a generic ``to_dict()`` and ``to_json(path)``.

    ``to_dict()`` is derived from the dataclass fields, in declaration order, through
    :func:`to_jsonable` (tensors -> lists, NaN -> None, nested results -> their ``to_dict()``).
    A class declares how its JSON form differs from its fields, never lists them again:

    - ``_exclude``: fields kept on the object only (per-sample tensors, optimal weights, ...).
    - :func:`json_field` ``(group=..., key=...)``: a field exported inside a sub-dict / renamed.
    - ``_extra(self)``: derived keys -> values (summaries, properties, constants); a key
      ``"group.name"`` goes into the sub-dict ``group``; a key naming a field replaces its value
      in place (e.g. None for an undefined metric).
    - ``_place``: {derived key: the key it follows in the same dict} (:data:`FIRST`: at the
      front); a derived key not listed there is appended at the end of its dict.
    """

    _exclude: ClassVar[tuple[str, ...]] = ()
    _place: ClassVar[dict[str, str]] = {}

    def _extra(self) -> dict[str, Any]:
        """Derived keys of ``to_dict()`` (none by default)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly Python of the result (see the class docstring for the layout)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in self._exclude:
                continue
            meta = f.metadata.get("json", {})
            group, key = meta.get("group"), meta.get("key") or f.name
            target = out.setdefault(group, {}) if group else out
            target[key] = getattr(self, f.name)
        for path, value in self._extra().items():
            group, _, key = path.rpartition(".")
            target = out.setdefault(group, {}) if group else out
            _insert(target, key, value, self._place.get(path))
        return to_jsonable(out)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write ``to_dict()`` as JSON atomically."""
        atomic_write_json(path, self.to_dict())


def _insert(d: dict[str, Any], key: str, value: Any, after: Optional[str]) -> None:
    """Set ``d[key] = value`` in place when the key exists, else insert it after the key ``after``
    (``FIRST``: at the front; None or an absent key: at the end)."""
    if key in d or after is None or (after != FIRST and after not in d):
        d[key] = value
        return
    items = list(d.items())
    at = 0 if after == FIRST else [k for k, _ in items].index(after) + 1
    items.insert(at, (key, value))
    d.clear()
    d.update(items)


def check_float(where: str, name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                open_lo: bool = False) -> float:
    """A finite real number with optional bounds (``open_lo``: strictly above ``lo``), through
    :func:`resgeom_fast.core.checks.check_number` (ArgumentTypeError / ArgumentValueError, both
    ValueErrors): ``"<where>: expected <name> a finite number, got ..."``, ``"... >= lo"``,
    ``"... > lo"``, ``"... <= hi"``."""
    v = check_number(where, name, value, expected="a finite number")
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise value_error(where, name, f"{'>' if open_lo else '>='} {lo}", repr(value))
    if hi is not None and v > hi:
        raise value_error(where, name, f"<= {hi}", repr(value))
    return v


def model_device_dtype(where: str, model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    raise ValueError(f"{where}: expected a model with floating-point parameters, got none in {type(model).__name__}")


def batches(where: str, data: Any, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None, split: str = "train") -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate ``(x, y)`` batches of ``data``: the one data contract of
    :func:`resgeom_fast.core.modules.as_batches` (an ``(x, y)`` batch, a list of batches, a
    DataLoader, a torch Dataset, or a resgeom_fast Dataset -- its ``split``).

    Floating inputs must already have ``dtype`` and every tensor must be on ``device`` when these
    are given (no silent casts or moves): a clear error names what differs.
    """
    return as_batches(where, data, device=device, dtype=dtype, split=split)


def check_finite_tensor(where: str, t: Tensor, what: str) -> None:
    """Raise :class:`~resgeom_fast.linalg.NonFiniteError` naming ``what`` when ``t`` holds a NaN
    or an inf (counts and the first index from :func:`resgeom_fast.linalg.operator.describe_non_finite`).

    Cheap: one sum (a NaN or inf anywhere makes it non-finite); the elementwise count runs only
    when the sum is not finite (or overflowed).
    """
    if t.numel() == 0 or not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{where}: expected finite {what}, got {describe_non_finite(t)}")


def check_finite_parameters(where: str, model: torch.nn.Module) -> None:
    """Raise :class:`~resgeom_fast.linalg.NonFiniteError` naming the first parameter or floating
    buffer of ``model`` (its qualified name) that holds a NaN or an inf.

    One host read for the whole model (the float64 sum of every tensor's sum: a NaN or inf anywhere
    makes it non-finite); only when it is not finite (or overflowed) are the tensors checked one by
    one, to name the first bad one."""
    tensors = [(kind, name, t) for kind, items in (("parameter", model.named_parameters()),
                                                   ("buffer", model.named_buffers()))
               for name, t in items if t is not None and t.is_floating_point() and t.numel()]
    if len({t.device for _, _, t in tensors}) == 1:  # (a model spread over devices: tensor by tensor)
        total = torch.stack([t.detach().sum().to(torch.float64) for _, _, t in tensors]).sum()
        if bool(torch.isfinite(total)):
            return
    for kind, name, t in tensors:
        check_finite_tensor(where, t.detach(), f"model {kind} {name!r} (shape {list(t.shape)})")
