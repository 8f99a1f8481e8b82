"""Progress reporting shared by every layer (bottom floor: imports only the standard library and tqdm).

:func:`progress` returns a bar that ticks with work done (Hessian-vector products, blocks,
epochs), never with stage starts, and shows an ETA. On a terminal it is a tqdm bar; when the
stream is not a TTY (CI logs, ``> log``) it prints one plain line per update instead of
carriage-return redraws, at most one every ``min_interval`` seconds plus the final line::

    [hessian_spectrum] 40/120 products (33%), 12.1 s elapsed, ETA 24.2 s: slq

Use it as a context manager or call ``close()``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

__all__ = ["progress", "write_line", "PlainProgress", "NullProgress"]


class NullProgress:
    """A disabled bar: every method does nothing."""

    n = 0
    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PlainProgress(NullProgress):
    """One plain line per update (rate limited) for streams that are not terminals."""

    def __init__(self, total: Optional[int], desc: str, unit: str, file: TextIO, initial: int = 0,
                 min_interval: float = 5.0) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = file
        self.n = initial
        self.postfix = ""
        self.min_interval = float(min_interval)
        self._t0 = time.perf_counter()
        self._n0 = initial
        self._last = -float("inf")
        self._closed = False

    def _line(self) -> str:
        el = time.perf_counter() - self._t0
        done = self.n - self._n0
        if self.total:
            pct = f" ({100.0 * self.n / self.total:.0f}%)"
            left = self.total - self.n
            eta = f", ETA {el / done * left:.1f} s" if done > 0 and left > 0 else ""
            count = f"{self.n}/{self.total}"
        else:
            pct, eta, count = "", "", f"{self.n}"
        post = f": {self.postfix}" if self.postfix else ""
        return f"[{self.desc}] {count} {self.unit}{pct}, {el:.1f} s elapsed{eta}{post}"

    def _emit(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last >= self.min_interval:
            self._last = now
            try:
                print(self._line(), file=self.file, flush=True)
            except (OSError, ValueError):  # pragma: no cover - closed stream
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.total is None or self.n < self.total:
                self._emit(force=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def write_line(line: str, file: TextIO) -> None:
    """One message line to ``file`` beside any open bar: through ``tqdm.write`` on a terminal (the
    bar is redrawn below it), a plain flushed line otherwise (no carriage returns in a log)."""
    if _isatty(file):
        try:
            from tqdm.auto import tqdm

            tqdm.write(line, file=file)
            return
        except Exception:  # pragma: no cover - tqdm missing or stream odd
            pass
    print(line, file=file, flush=True)


def progress(total: Optional[int], desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0,
             file: Optional[TextIO] = None, leave: bool = True, min_interval: float = 5.0) -> Any:
    """A progress bar over ``total`` units of work (None: unknown).

    Args:
        total: units of work (products, blocks, epochs); None when unknown (no ETA).
        desc: the name shown first.
        enabled: False gives a bar that does nothing.
        unit: the unit's name ("products", "blocks", "epoch").
        initial: units already done (a resumed run).
        file: the stream (default stderr). A TTY gets a tqdm bar, anything else plain lines.
        leave: keep the tqdm bar on screen when closed.
        min_interval: seconds between two plain lines.

    Returns:
        an object with ``update(n)``, ``set_postfix_str(s)``, ``close()``; a context manager.
    """
    if not enabled:
        return NullProgress()
    stream = sys.stderr if file is None else file
    if _isatty(stream):
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, leave=leave,
                        dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return PlainProgress(total, desc, unit, stream, initial=initial, min_interval=min_interval)
