"""Build resgeom_fast and its compiled extension resgeom_fast._C.

The C++ CPU kernels always compile. The CUDA kernels compile whenever a CUDA build of torch and a
CUDA toolkit are present (no GPU needs to be visible), unless RESGEOM_FAST_FORCE_CPU=1.

Install for development with ``pip install --no-build-isolation -e .`` (build isolation would
pull a second torch).
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import find_packages, setup


def _find_cuda_home() -> str | None:
    """Return the CUDA toolkit folder, seeing through an ``nvcc`` wrapper script on PATH.

    torch guesses CUDA_HOME from ``which nvcc``; on machines where nvcc is a small shell script
    that execs the real compiler, that guess is the wrapper's folder and the link fails.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+)/bin/nvcc", head)
        if match:
            return match.group(1).decode()
    return os.path.dirname(os.path.dirname(real))


FORCE_CPU = os.environ.get("RESGEOM_FAST_FORCE_CPU", "0") == "1"
if not FORCE_CPU:
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
# Default to the GPUs this project targets (A100, H100 + PTX for newer); compiling for every
# architecture torch knows multiplies the build time.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    return (not FORCE_CPU) and torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cpu", "*.cpp")))
    cxx = ["-O3"]
    ldflags = []
    if torch.backends.openmp.is_available():
        # Without -fopenmp, at::parallel_for silently runs on one thread.
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _with_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "resgeom_fast._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=ldflags,
            )
        ]
    return [
        CppExtension(
            "resgeom_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    ]


setup(
    packages=find_packages(include=["resgeom_fast", "resgeom_fast.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
