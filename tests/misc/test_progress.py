"""resgeom_fast._progress: bars tick with work, plain lines (no carriage returns) off a terminal."""
from __future__ import annotations

import io

from resgeom_fast._progress import NullProgress, PlainProgress, progress


def test_non_tty_gets_plain_lines_with_eta() -> None:
    buf = io.StringIO()
    bar = progress(4, "hessian_spectrum", unit="products", file=buf, min_interval=0.0)
    assert isinstance(bar, PlainProgress)
    with bar:
        for i in range(4):
            bar.set_postfix_str(f"stage {i}")
            bar.update(1)
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 4  # one line per update; close adds none once the total is reached
    assert lines[0].startswith("[hessian_spectrum] 1/4 products (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("[hessian_spectrum] 4/4 products (100%)") and "ETA" not in lines[-1]
    assert lines[-1].endswith(": stage 3")


def test_plain_lines_are_rate_limited_but_the_last_one_is_printed() -> None:
    buf = io.StringIO()
    with progress(100, "x", file=buf, min_interval=3600.0) as bar:
        for _ in range(100):
            bar.update(1)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 2  # the first update and the final one
    assert lines[-1].startswith("[x] 100/100")


def test_unfinished_bar_reports_on_close_and_unknown_total() -> None:
    buf = io.StringIO()
    bar = progress(None, "y", file=buf, min_interval=3600.0)
    bar.update(3)
    bar.close()
    bar.close()  # idempotent
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 2  # the first update, then close() on an unfinished bar
    assert all(line.startswith("[y] 3 it, ") for line in lines) and "ETA" not in lines[-1]


def test_disabled_bar_is_silent() -> None:
    bar = progress(10, "z", enabled=False)
    assert isinstance(bar, NullProgress)
    bar.update(5)
    bar.close()


def test_write_line_is_a_plain_line_off_a_terminal() -> None:
    from resgeom_fast._progress import write_line

    buf = io.StringIO()
    write_line("[resgeom] step x: running", buf)
    write_line("[resgeom] step x: done", buf)
    assert buf.getvalue() == "[resgeom] step x: running\n[resgeom] step x: done\n"
