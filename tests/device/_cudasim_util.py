"""The simulated CUDA device of ../shared/tools/cudasim.py for tests (issue 17), shared helpers.

The same approach as test_cudasim_linalg.py: cudasim (strict: a device mismatch raises) plus one
patch: a real ``torch.Generator(device="cuda")`` needs a CUDA driver, so inside :func:`sim`,
``torch.Generator`` makes, for device "cuda", a CPU generator that reports cuda:0.
``cudasim`` is None where the tool is absent (it lives outside the repository).
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Iterator
from unittest import mock

import torch
from torch.utils._pytree import tree_map

TOOLS = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "tools"
if (TOOLS / "cudasim.py").is_file():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import cudasim  # noqa: E402
else:  # pragma: no cover - depends on the checkout
    cudasim = None

SKIP_REASON = f"the simulated CUDA device {TOOLS / 'cudasim.py'} is absent (it lives outside the repository)"

_RealGenerator = torch.Generator


class _SimCudaGenerator(_RealGenerator):
    """A CPU generator that reports device cuda:0 (cudasim runs the draw on the CPU data)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


class _GeneratorMeta(type(_RealGenerator)):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealGenerator)


class _PatchedGenerator(_RealGenerator, metaclass=_GeneratorMeta):
    def __new__(cls, device="cpu"):
        if torch.device(device).type == "cuda":
            return _SimCudaGenerator("cpu")
        return _RealGenerator(device)


@contextlib.contextmanager
def sim(check: bool = True) -> Iterator[None]:
    """cudasim's simulated device (strict) with on-device generators; counters reset first.
    With ``check``: on exit, no device mismatch and no CPU tensor created in resgeom_fast."""
    cudasim.reset()
    with mock.patch.object(torch, "Generator", _PatchedGenerator), cudasim.cuda_sim(strict=True):
        yield
    if check:
        assert cudasim.MISMATCHES == [], cudasim.report("device mismatches")
        assert cpu_creations() == {}, cudasim.report("CPU tensors created in resgeom_fast")


def cpu_creations() -> dict:
    """Factory calls without ``device=`` (CPU tensors) made in resgeom_fast, by site."""
    return {k: v for k, v in cudasim.CPU_CREATIONS.items() if "resgeom_fast/" in k[1]}


def host(t: torch.Tensor) -> torch.Tensor:
    """The CPU data of a simulated cuda tensor."""
    assert t.device.type == "cuda", t.device
    return t.elem if isinstance(t, cudasim.Sim) else t


def syncs(where: str = "") -> int:
    """Host syncs counted so far whose resgeom_fast source site contains ``where``."""
    return sum(n for (_, site), n in cudasim.SYNCS.items() if where in site)


# -- for whole runs (tests/device/test_cudasim_demo.py) -------------------------------------------
_real_save = torch.save


def _host_save(obj, f, *args, **kwargs):
    """torch.save with every simulated cuda tensor saved as its CPU data."""
    return _real_save(tree_map(lambda t: t.elem.clone() if isinstance(t, cudasim.Sim) else t, obj), f, *args,
                      **kwargs)


@contextlib.contextmanager
def host_checkpoints() -> Iterator[None]:
    """Checkpoints written inside hold the CPU data of simulated cuda tensors.

    A real CUDA tensor is saved as its bytes (location "cuda:0"), and the trainer's
    ``read_checkpoint`` loads with ``map_location="cpu", weights_only=True``: CPU tensors. cudasim's
    wrapper class would be pickled as a class that ``weights_only`` refuses (the runner then
    reports the checkpoint damaged and retrains): a limitation of the simulation, not of our code."""
    with mock.patch.object(torch, "save", _host_save):
        yield


def _jacobian_marker(f):
    return ("per-sample autograd Jacobian of", f)


def _loop_vmap(marker):
    assert isinstance(marker, tuple) and marker[0] == "per-sample autograd Jacobian of", marker
    f = marker[1]
    return lambda xs: torch.stack([torch.autograd.functional.jacobian(f, xs[i]) for i in range(xs.shape[0])])


@contextlib.contextmanager
def looped_jacobians(module) -> Iterator[None]:
    """``vmap(jacrev(f))`` / ``vmap(jacfwd(f))`` of ``module`` as a loop of per-sample
    ``torch.autograd.functional.jacobian(f, x_i)`` (the same [n, *out, *in] Jacobians).

    Why: under torch.func's transforms, C++ batching rules create tensors "like" their input
    (``at::ones(..., input.options())``, e.g. batch norm's default weight under vmap); a cudasim
    tensor is a wrapper whose C++ device is the CPU, so those tensors come out on the CPU and
    cudasim reports a device mismatch that a real GPU (input.options() on cuda) never has."""
    with mock.patch.multiple(module, vmap=_loop_vmap, jacrev=_jacobian_marker, jacfwd=_jacobian_marker):
        yield
