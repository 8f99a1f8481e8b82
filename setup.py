"""Build resgeom_fast and its compiled extension resgeom_fast._C.

The C++ CPU kernels always compile. The CUDA kernels compile whenever a CUDA build of torch and a
CUDA toolkit are present (no GPU needs to be visible), unless RESGEOM_FAST_FORCE_CPU=1.

Install for development with ``pip install --no-build-isolation -e .`` (build isolation would
pull a second torch).
"""
from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_home():
    """tools/cuda_home.py, the one description of the CUDA toolkit discovery (also run by the
    Makefile and CMakeLists.txt): ``$CUDA_HOME``, else the toolkit an ``nvcc`` wrapper on PATH
    execs, else nvcc's own folder. torch's own guess would be the wrapper's folder."""
    spec = importlib.util.spec_from_file_location("_resgeom_cuda_home", os.path.join(ROOT, "tools", "cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FORCE_CPU = os.environ.get("RESGEOM_FAST_FORCE_CPU", "0") == "1"
if not FORCE_CPU:
    cuda_home = _load_cuda_home().find_cuda_home()
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
