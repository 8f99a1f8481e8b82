"""Shared helpers of the command-line tests (import ``from tests.experiments._cli import ...``)."""
from __future__ import annotations

from resgeom_fast.cli import main


def one_line_error(capsys, argv, code: int = 2) -> str:
    """Run ``resgeom argv``; assert it exits with ``code`` and prints exactly one line
    ``resgeom: error: ...`` on stderr and no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("resgeom: error: "), err
    assert "Traceback" not in err
    return lines[0]
