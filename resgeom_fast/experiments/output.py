"""The report folder of a ``resgeom`` command: ``--out`` checked, the :class:`Runner` opened on
it, and the report written into it with every file recorded in the manifest.

Every function raises :class:`~resgeom_fast.experiments.config.UsageError` (one line naming
``--out``) for a folder that cannot be used.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional, Sequence, TextIO

from .config import UsageError
from .report import FigureSpec, Report, write_report
from .runner import Runner

__all__ = ["check_out", "finish_study", "open_runner", "progress_log", "write_study_report"]


def progress_log(progress: bool) -> Optional[TextIO]:
    """Where step messages go: stderr, or nowhere when ``progress`` is off."""
    return sys.stderr if progress else None


def check_out(out: Any) -> str:
    """``out`` if it can be a report folder: a non-empty path that is a folder or can be created
    as one, writable; else a :class:`UsageError` naming ``--out``. (``--out ""`` is refused: pass
    ``--out .`` for the current folder.)"""
    if not isinstance(out, str) or not out.strip():
        raise UsageError(f"--out: expected a folder path, got {out!r} (use --out . for the current folder)")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out: expected a folder, got a file: {out!r}")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"--out: expected a folder, but {probe!r} above {out!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out: cannot write to {probe!r} (permission denied); choose another --out")
    return out


def open_runner(out: str, config: Mapping[str, Any], *, study: str, fresh: bool, progress: bool,
                key_parts: Optional[Mapping[str, Any]] = None) -> Runner:
    """A :class:`Runner` on ``--out`` (checked); file-system errors become one-line UsageErrors."""
    check_out(out)
    try:
        return Runner(out, config, study=study, fresh=fresh, progress=progress, log=progress_log(progress),
                      key_parts=key_parts)
    except OSError as err:
        raise UsageError(f"--out: cannot use {out!r} as the report folder ({type(err).__name__}: "
                         f"{err.strerror or err}{': ' + str(err.filename) if err.filename else ''})") from None


def write_study_report(runner: Runner, title: str, results: Any, figures: Sequence[FigureSpec], **kw: Any) -> Report:
    """:func:`write_report` into the runner's folder; every file it writes is recorded in the
    manifest first (so ``--fresh`` may delete them later, and nothing else). A rank other than 0
    of a multi-process run writes nothing: it returns the paths rank 0 writes (figures not drawn)."""
    if not runner.is_writer:
        return Report(runner.folder, os.path.join(runner.folder, "results.json"),
                      os.path.join(runner.folder, "report.md"), [], list(figures))
    runner.record_written(*[os.path.join(runner.out, f) for f in ("results.json", "report.md")],
                          *[os.path.join(runner.out, "figures", f"{spec.name}.png") for spec in figures])
    rep = write_report(runner.out, title, results, figures, progress=runner.progress, **kw)
    runner.record_written(rep.results_path, rep.report_path, *rep.figures)
    return rep


def finish_study(runner: Runner, title: str, out_obj: Any, config: dict[str, Any], expected: str = "") -> Report:
    """The report of a study's output ``out_obj`` (a StudyOutput: results, figures, summaries,
    intro), with the study's ``expected`` line (its claim, docs/science.md) under the intro."""
    intro = out_obj.intro + (f"\n\nExpected (docs/science.md): {expected}." if expected else "")
    return write_study_report(runner, title, out_obj.results, out_obj.figures, intro=intro,
                              summaries=out_obj.summaries, config=config)
