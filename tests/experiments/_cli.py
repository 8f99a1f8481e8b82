"""Shared helpers of the command-line tests (import ``from tests.experiments._cli import ...``)."""
from __future__ import annotations

import sys

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


class UserModule:
    """One importable module file of a test's own (for ``--model module:NAME:factory``): a folder
    under ``tmp_path`` on ``sys.path`` (through ``monkeypatch``), no bytecode written (a rewritten
    file is read afresh). ``write(source)`` saves it and drops any imported copy, as a new process
    would import the file afresh, and returns the module name; ``forget()`` drops it at teardown."""

    def __init__(self, tmp_path, monkeypatch, prefix: str) -> None:
        monkeypatch.setattr(sys, "dont_write_bytecode", True)
        self.name = f"{prefix}_{abs(hash(str(tmp_path))) % 10**8}"
        self.folder = tmp_path / "mods"
        self.folder.mkdir()
        monkeypatch.syspath_prepend(str(self.folder))

    def write(self, source: str) -> str:
        (self.folder / f"{self.name}.py").write_text(source)
        sys.modules.pop(self.name, None)
        return self.name

    def forget(self) -> None:
        sys.modules.pop(self.name, None)
