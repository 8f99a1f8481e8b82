"""Study configurations: typed options with defaults, JSON / YAML files, ``key=value`` overrides.

A configuration is a flat ``dict[str, value]``. Every study declares its options as
:class:`Option` s (name, type, default, help, allowed values); :func:`resolve_config` starts from
the defaults, applies a file (JSON always, YAML when PyYAML is importable) and then the
``--set key=value`` overrides, checking every key and value, and then runs the study's
cross-option validator (:class:`Options`, e.g. ``k`` against the block dimension the data and
the width allow, or whether the nets fit in memory) -- all before any work starts. Bad input
raises :class:`UsageError`, whose one-line message the ``resgeom`` command prints (exit code 2).

Types: "int", "float", "str", "bool", "ints" / "floats" (lists; ``--set depths=2,4,8`` or
``--set depths=[2,4,8]``), "optint" (an int or ``null`` / ``none``). An int option takes integer
literals only: ``1e9`` or ``64.0`` are refused ("expected width an int"), never rounded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = ["Option", "Options", "UsageError", "config_hash", "int_flag", "load_config_file", "parse_sets",
           "resolve_config"]

TYPES: tuple[str, ...] = ("int", "float", "str", "bool", "ints", "floats", "optint")


class UsageError(Exception):
    """Bad input from the user (unknown name, bad key or value, missing file): a one-line message."""


@dataclass(frozen=True)
class Option:
    """One configuration option of a study.

    Attributes:
        name: the key (``--set name=value``).
        type: one of :data:`TYPES`.
        default: the default value (already of that type).
        help: one line for ``resgeom run STUDY --help``-style listings.
        choices: allowed values for "str" options (None: any string).
        minimum: lower bound for numbers (and every list element), None for none.
        maximum: upper bound for numbers (and every list element), None for none.
    """

    name: str
    type: str
    default: Any
    help: str = ""
    choices: Optional[tuple[str, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (from JSON / YAML or a ``--set`` string) checked and converted to ``type``."""
        kind = self.type
        if kind in ("ints", "floats"):
            if isinstance(value, str):
                text = value.strip().strip("[]")
                items: list[Any] = [_scalar(t.strip()) for t in text.split(",") if t.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                items = [value]
            if not items:
                raise UsageError(f"{where}: expected {self.name} a non-empty list of {kind[:-1]}s, got {value!r}")
            return [self._one(kind[:-1], v, where) for v in items]
        if kind == "optint":
            if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
                return None
            return self._one("int", value, where)
        return self._one(kind, value, where)

    def _one(self, kind: str, value: Any, where: str) -> Any:
        raw = value
        if isinstance(value, str) and kind != "str":
            value = _scalar(value.strip())
        shown = repr(value)
        if isinstance(raw, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            shown = raw.strip()  # a number as the user wrote it ("1e9", not 1000000000.0)
        bad = f"{where}: expected {self.name} {_describe(kind, self.choices, self.minimum, self.maximum)}, got {shown}"
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off"):
                return value.lower() in ("yes", "on")
            raise UsageError(bad)
        if kind == "str":
            if not isinstance(value, str):
                raise UsageError(bad)
            if self.choices is not None and value not in self.choices:
                raise UsageError(bad)
            return value
        if isinstance(value, bool):
            raise UsageError(bad)
        if kind == "int":
            if not isinstance(value, int):  # 1e9 / 64.0 are floats: refused, never rounded
                raise UsageError(bad)
        elif kind == "float":
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(bad)
            value = float(value)
        if self.minimum is not None and value < self.minimum:
            raise UsageError(bad)
        if self.maximum is not None and value > self.maximum:
            raise UsageError(bad)
        return value


class Options(list):
    """A study's option list plus its cross-option check.

    ``validate(config)`` runs in :func:`resolve_config` after every value has been coerced, before
    any work starts, and raises :class:`UsageError` for combinations that cannot work (``k`` above
    the block dimension, more samples than the data holds, a net too large for the memory).
    """

    def __init__(self, options: Iterable[Option] = (),
                 validate: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        super().__init__(options)
        self.validate = validate


def _scalar(text: str) -> Any:
    """A ``--set`` token as JSON when it parses (numbers, true/false, null, lists), else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _describe(kind: str, choices: Optional[Sequence[str]], minimum: Optional[float],
              maximum: Optional[float] = None) -> str:
    if choices is not None:
        return f"one of {list(choices)}"
    text = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
    if minimum is not None and maximum is not None:
        text += f" in [{minimum:g}, {maximum:g}]" if kind != "int" else f" in [{int(minimum)}, {int(maximum)}]"
    elif minimum is not None:
        text += f" >= {minimum:g}"
    elif maximum is not None:
        text += f" <= {maximum:g}" if kind != "int" else f" <= {int(maximum)}"
    return text


def load_config_file(path: str) -> dict[str, Any]:
    """A flat mapping from a ``.json`` file, or ``.yaml`` / ``.yml`` when PyYAML is installed."""
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise UsageError(f"config {path!r}: cannot read the file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"config {path!r}: expected UTF-8 text, got byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start} that is not UTF-8 (save the file as UTF-8)") from None
    if ext in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-not-found]
        except ImportError:
            raise UsageError(f"config {path!r}: YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"config {path!r}: not valid YAML ({str(err).splitlines()[0]})") from None
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"config {path!r}: not valid JSON ({err})") from None
    else:
        raise UsageError(f"config {path!r}: expected a .json, .yaml or .yml file, got {ext or 'no extension'!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path!r}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def int_flag(name: str, value: Any, minimum: int) -> int:
    """The int of a command-line flag ``name`` (e.g. "--seed"): ``value`` as written (a str or an
    int), at least ``minimum``; else a :class:`UsageError` "<name>: expected an int >= <minimum>"."""
    try:
        v = int(str(value))
    except ValueError:
        raise UsageError(f"{name}: expected an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise UsageError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return v


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values stay strings; options coerce them)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set: expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


_FROM_OPTIONS: Any = object()


def resolve_config(options: Sequence[Option], *, study: str, file_values: Optional[Mapping[str, Any]] = None,
                   sets: Optional[Mapping[str, Any]] = None,
                   validate: Optional[Callable[[dict[str, Any]], None]] = _FROM_OPTIONS) -> dict[str, Any]:
    """Defaults, then ``file_values``, then ``sets``; every key checked against ``options``; then
    the cross-option check.

    A file may carry ``"study": NAME``; it must then equal ``study``. ``validate(config)`` (default:
    ``options.validate`` when ``options`` is an :class:`Options`; None: no check) raises
    :class:`UsageError` for combinations that cannot work; it runs here, before any training.
    """
    by_name = {o.name: o for o in options}
    config = {o.name: o.default for o in options}
    for source, values in (("config", file_values or {}), ("--set", sets or {})):
        for key, value in values.items():
            if key == "study" and source == "config":
                if value != study:
                    raise UsageError(f"config: this file is for study {value!r}, not {study!r}")
                continue
            if key not in by_name:
                raise UsageError(f"{source}: unknown option {key!r} for {study}; allowed: {', '.join(sorted(by_name))}")
            config[key] = by_name[key].coerce(value, source)
    check = getattr(options, "validate", None) if validate is _FROM_OPTIONS else validate
    if check is not None:
        check(config)
    return config


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-friendly mapping (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
