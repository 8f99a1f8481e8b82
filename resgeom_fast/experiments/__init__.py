"""Runnable studies, resumable steps and report folders (layer 7; the ``resgeom`` command).

- :class:`Runner`: named steps whose results are kept in the output folder (resume, config hash).
- :func:`resolve_config` / :class:`Option`: study options from defaults, JSON / YAML and ``--set``.
- :func:`write_report`: results.json, PNG figures drawn from it, report.md.
- :mod:`.studies`: one module per study (alignment, hessian, singularities, collapse, expansion,
  leaky; demo and analyze with subcommands of their own) and the registries the CLI reads
  (:data:`.studies.STUDIES`, :data:`.studies.COMMANDS`); :mod:`.commands` runs them into a report
  folder (:mod:`.output`).
"""
from .config import Option, UsageError, config_hash, load_config_file, parse_sets, resolve_config
from .report import FigureSpec, Report, check_figure, get_path, write_report
from .runner import Runner

__all__ = [
    "FigureSpec", "Option", "Report", "Runner", "UsageError", "check_figure", "config_hash", "get_path",
    "load_config_file", "parse_sets", "resolve_config", "write_report",
]
