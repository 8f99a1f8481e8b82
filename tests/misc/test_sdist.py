"""The source distribution holds everything needed to build resgeom_fast._C (issue 14: it lacked
csrc/ops/*.h, the .cu kernels, tools/cuda_home.py that setup.py imports, and cmake/).

The sdist is built from a copy of the checkout (no build outputs, so nothing is written into the
checkout) without compiling anything; the check is on its file list. Building the extension from
the unpacked sdist is what CI does (see the issue-14 report); it takes minutes, so not here.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# build outputs and caches of a checkout (what .gitignore names), never part of a source distribution
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "build-cmake", "dist", "*.egg-info", "__pycache__",
                                "*.so", "*.pyd", ".pytest_cache", ".benchmarks", ".ruff_cache", "reports", "out")


def _expected() -> set[str]:
    """Paths (relative to the repository) the sdist must hold."""
    want: set[str] = set()
    for pattern in ("csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "cmake/*", "resgeom_fast/**/*.py",
                    "tests/cpp/*"):
        want |= {p.relative_to(REPO).as_posix() for p in REPO.glob(pattern)
                 if p.is_file() and "__pycache__" not in p.parts}
    want |= {"tools/cuda_home.py", "CMakeLists.txt", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in"}
    return want


def _build_sdist(src: Path, dist: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESGEOM_FAST_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if importlib.util.find_spec("build") is not None:
        # --no-isolation: the installed setuptools / torch (no download); -x: "wheel" of
        # build-system.requires is not needed for an sdist
        cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
               "--outdir", str(dist), str(src)]
    else:
        cmd = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)]
    return subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_sdist_holds_every_source_the_build_needs(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no sdist can be built offline")
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(REPO, src, ignore=IGNORE, symlinks=True)
    proc = _build_sdist(src, dist)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    archives = list(dist.glob("resgeom_fast-*.tar.gz"))
    assert len(archives) == 1, list(dist.iterdir())
    with tarfile.open(archives[0]) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    assert len(top) == 1, top                                      # one folder resgeom_fast-<version>/
    files = {n.split("/", 1)[1] for n in names}
    want = _expected()
    assert {"csrc/ops/density_smooth.h", "csrc/ops/cuda/density_smooth_kernel.cu", "tools/cuda_home.py",
            "cmake/resgeom_fastTorchCuda.cmake", "resgeom_fast/__init__.py"} <= want   # the globs found them
    missing = sorted(want - files)
    assert not missing, f"the sdist lacks {len(missing)} file(s): {missing[:20]}"
    assert not [f for f in files if f.endswith((".so", ".pyd", ".pyc"))]              # no build outputs
    # setup.py reads tools/cuda_home.py and globs csrc/: every compiled source it would list is there
    sources = {f for f in files if f.startswith("csrc/") and f.endswith((".cpp", ".cu"))}
    assert sources == {f for f in want if f.startswith("csrc/") and f.endswith((".cpp", ".cu"))}


def test_bench_says_what_it_needs_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """An installed package has no benchmarks/ folder: ``resgeom bench`` (and its --help) name
    the source checkout and the test extra instead of failing obscurely."""
    from resgeom_fast.cli import main
    from resgeom_fast.experiments import commands

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "source checkout" in helptext and "pip install 'resgeom_fast[test]'" in helptext

    assert main(["bench", "--benchmarks", str(tmp_path / "none")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"resgeom: error: bench: benchmarks folder not found at {str(tmp_path / 'none')!r}; ")
    assert "git clone the repository, pip install 'resgeom_fast[test]'" in line and "\n" not in line

    # the default: next to the package (an editable install), else ./benchmarks
    monkeypatch.setattr(commands, "__file__", str(tmp_path / "site" / "resgeom_fast" / "experiments" / "commands.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"not found at {str(tmp_path / 'site' / 'benchmarks')!r} nor {str(tmp_path / 'benchmarks')!r}" in line
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_ops.py").write_text("")
    assert commands._repo_benchmarks(None) == str(tmp_path / "benchmarks")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark"
                        else real(name, *a))
    assert main(["bench", "--quick"]) == 2
    assert "bench: pytest-benchmark not installed (pip install 'resgeom_fast[test]')" in capsys.readouterr().err
