#!/usr/bin/env python3
"""Print the CUDA toolkit folder (one line), or nothing when no toolkit is found.

The one description of the toolkit discovery, used by setup.py (imported), the Makefile
(``$(shell python3 tools/cuda_home.py)``) and CMakeLists.txt (``execute_process``). In order:

1. ``$CUDA_HOME`` when it holds ``bin/nvcc``;
2. the ``nvcc`` on PATH: when it is a small shell script that ``exec``s the real compiler
   (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the toolkit of that compiler; otherwise the
   folder above nvcc's own ``bin/`` (symbolic links resolved);
3. nothing (the caller's own default applies: torch guesses ``/usr/local/cuda``).

torch guesses CUDA_HOME from ``which nvcc``; where nvcc is such a wrapper, that guess is the
wrapper's folder and the link fails, hence this script. Standard library only (it runs before
the virtual environment exists), Python >= 3.9.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping

_EXEC_NVCC = re.compile(rb"^\s*exec\s+[\"']?(/[^\s\"']+)/bin/nvcc\b", re.MULTILINE)


def wrapped_toolkit(nvcc: str) -> str | None:
    """The toolkit that ``nvcc`` (a path) ``exec``s when it is a wrapper script, else None."""
    try:
        with open(os.path.realpath(nvcc), "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    match = _EXEC_NVCC.search(head) if head.startswith(b"#!") else None
    if match and os.path.isfile(os.path.join(match.group(1).decode(), "bin", "nvcc")):
        return match.group(1).decode()
    return None


def find_cuda_home(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the CUDA toolkit folder (see the module docstring), or None."""
    environ = os.environ if environ is None else environ
    home = environ.get("CUDA_HOME", "")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(nvcc):
            return wrapped_toolkit(nvcc) or home
        print(f"cuda_home.py: ignoring CUDA_HOME={home} (no bin/nvcc there)", file=sys.stderr)
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is None:
        return None
    return wrapped_toolkit(nvcc) or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def main() -> int:
    home = find_cuda_home()
    if home:
        print(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
