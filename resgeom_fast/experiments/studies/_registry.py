"""What a study is and where the ``resgeom`` command finds it.

- :class:`Study` / :class:`StudyOutput`: one ``resgeom run NAME`` study and what its ``run`` returns.
- :data:`STUDIES`, :func:`register`, :func:`get_study`: the studies of ``resgeom run`` by name,
  in registration order (the order of ``resgeom run --help`` and of the CLI's error messages).
- :class:`Command`, :data:`COMMANDS`, :func:`register_command`: studies with a subcommand and
  flags of their own (``resgeom demo``, ``resgeom analyze``); the CLI adds their flags from here.

A new study is one module in this package that builds a :class:`Study` and calls
:func:`register` on it; ``studies/__init__.py`` imports the module (alignment.py is the pattern).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from resgeom_fast.core.checks import check_type, value_error

from ..config import Option, Options, UsageError
from ..report import FigureSpec
from ..runner import Runner

__all__ = ["COMMANDS", "STUDIES", "Command", "Study", "StudyOutput", "get_study", "register", "register_command"]


@dataclass
class StudyOutput:
    """What a study's ``run`` returns: the results dictionary (written as results.json), the
    figures drawn from it, the summaries for report.md (``{model: {analysis: summary}}``) and
    the report's intro paragraph."""

    results: dict[str, Any]
    figures: list[FigureSpec]
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    intro: str = ""


@dataclass
class Study:
    """One runnable study.

    Attributes:
        name, title, expected: its name, a title and the claim it checks (its "expects" line in docs/science.md).
        options: its options; stored as an :class:`~resgeom_fast.experiments.config.Options`
            that carries ``validate``, so :func:`~resgeom_fast.experiments.config.resolve_config`
            runs the cross-option check before any work.
        run: ``run(runner, config) -> StudyOutput``.
        validate: ``validate(config)`` raises :class:`UsageError` for a configuration that cannot
            work (None: the options' own checks only).
    """

    name: str
    title: str
    expected: str
    options: list[Option]
    run: Callable[[Runner, dict[str, Any]], StudyOutput]
    validate: Optional[Callable[[dict[str, Any]], None]] = None

    def __post_init__(self) -> None:
        self.options = Options(self.options, validate=self.validate)


@dataclass(frozen=True)
class Command:
    """A study with a ``resgeom`` subcommand of its own (its own flags instead of ``--set``).

    Attributes:
        name: the subcommand.
        help: its line in ``resgeom --help``.
        add_arguments: ``add_arguments(parser)`` adds the subcommand's flags.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


STUDIES: dict[str, Study] = {}
COMMANDS: dict[str, Command] = {}


def _add(fn: str, arg: str, item: Any, cls: type, expected: str, registry: dict[str, Any]) -> Any:
    """Put ``item`` (a ``cls``) into ``registry`` under ``item.name``; studies and commands share
    one name space (an ArgumentValueError for a name already taken in either)."""
    check_type(fn, arg, item, cls, expected)
    if item.name in STUDIES or item.name in COMMANDS:
        raise value_error(fn, arg, "a new name", f"{item.name!r} (already registered)")
    registry[item.name] = item
    return item


def register(study: Study) -> Study:
    """Add ``study`` to :data:`STUDIES` under ``study.name`` and return it (an
    ArgumentValueError for a name already taken)."""
    return _add("register", "study", study, Study, "a Study", STUDIES)


def register_command(command: Command) -> Command:
    """Add ``command`` to :data:`COMMANDS` under ``command.name`` and return it."""
    return _add("register_command", "command", command, Command, "a Command", COMMANDS)


def get_study(name: str) -> Study:
    """The registered study ``name``; a :class:`UsageError` naming the allowed ones otherwise."""
    if name not in STUDIES:
        raise UsageError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    return STUDIES[name]
