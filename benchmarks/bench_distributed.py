"""Data-parallel curvature operators (issue 16): one Hessian product pass and one SLQ run, in one
process and in a gloo group of 1 and 2 processes on this machine.

Run (CPU, a few minutes on 2 cores):

    python -m pytest benchmarks/bench_distributed.py --benchmark-only \
        --benchmark-group-by=group --benchmark-json=benchmarks/results/bench_distributed_cpu.json

How a group is timed: the benchmark process itself is rank 0 of a gloo group (FileStore in a
temporary folder); the other ranks are spawned as ``python -m benchmarks.bench_distributed
RANK WORLD STORE`` and follow rank 0's commands (one ``broadcast_object`` per timed call, which
is included in the timing: ~1 ms). Every rank builds the same operator with
``distributed="split"`` on the same full data and takes its half; pytest-benchmark times rank
0's wall clock of the whole data-parallel call (local products, the all_reduce, waiting for
the slowest rank).

Rows, per group (hvp_k10: one pass of 10 Hessian-vector products; slq: 10 probes x 10 Lanczos
steps): ``single`` (``distributed=None``, no group, PyTorch's default threads: the plain
reference), ``single1t`` (the same on one thread), ``gloo1`` (a group of one process, one
thread: against single1t, the cost of the data-parallel machinery alone), ``gloo2`` (two
processes of one thread each: the same cores as ``single``). Model:
FCResNet(64, 128, 4, 10, norm="batch") (float32, eval mode, structured path) on 512 random
samples. The agreement of gloo2 with single (relative difference of the product) is in
extra_info. Timings are never asserted.

On 2 cores, two processes share the cores that one process used alone (PyTorch's intra-op
threads already used both), so gloo2 is expected to be no faster than single: the ratio
shows the communication and synchronisation cost, not a speed-up. Data parallelism pays where
each rank has its own device.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn

import resgeom_fast  # noqa: F401 -- loads the compiled ops
from resgeom_fast.core import distributed as rdist
from resgeom_fast.linalg import slq_density
from resgeom_fast.models import FCResNet
from resgeom_fast.operators._data import select_params
from resgeom_fast.operators.curvature import CurvatureEngine, HessianOperator

CE = nn.CrossEntropyLoss()
REPO = Path(__file__).resolve().parents[1]
N, K, PROBES, STEPS = 512, 10, 10, 10
TIMEOUT = timedelta(seconds=300)


def _setup(distributed: Optional[str]) -> tuple[HessianOperator, torch.Tensor]:
    """The benchmark's operator (every rank builds the same; ``distributed`` threaded into the
    engine as operators.hessian does) and its 10 vectors."""
    model = FCResNet(64, 128, 4, 10, norm="batch", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g))
    names, tensors = select_params("hessian", model, None)
    engine = CurvatureEngine("hessian", HessianOperator, model, CE, data, names, tensors, "eval", "auto", None,
                             "default", False, "ieee", distributed=distributed)
    H = HessianOperator(engine, list(range(len(names))))
    V = torch.randn(H.shape[0], K, generator=torch.Generator().manual_seed(1))
    return H, V


def _command(H: HessianOperator, V: torch.Tensor, cmd: str) -> Optional[torch.Tensor]:
    if cmd == "product":
        return H.matmat(V)
    if cmd == "slq":
        slq_density(H, probes=PROBES, steps=STEPS, seed=0)
    return None


def follow(rank: int, world: int, store: str) -> None:
    """A rank > 0: join the group, build the operator, run rank 0's commands until "stop"."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        H, V = _setup("split")
        while (cmd := rdist.broadcast_object(None)) != "stop":
            _command(H, V, cmd)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["single", "single1t", "gloo1", "gloo2"])
def group(request):
    """(name, rank 0's operator, vectors, a call(cmd) running cmd on every rank)."""
    name = request.param
    threads = torch.get_num_threads()
    if name.startswith("single"):
        if name == "single1t":
            torch.set_num_threads(1)
        H, V = _setup(None)
        yield name, H, V, lambda cmd: _command(H, V, cmd)
        torch.set_num_threads(threads)
        return
    world = int(name[-1])
    tmp = tempfile.mkdtemp()
    store = f"{tmp}/store"
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_distributed", str(r), str(world), store],
                              cwd=REPO) for r in range(1, world)]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=world, timeout=TIMEOUT)
    try:
        H, V = _setup("split")

        def call(cmd: str) -> Optional[torch.Tensor]:
            rdist.broadcast_object(cmd)
            return _command(H, V, cmd)

        yield name, H, V, call
        rdist.broadcast_object("stop")
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        for p in procs:
            p.wait(timeout=TIMEOUT.total_seconds())


@pytest.fixture(scope="module")
def reference():
    """The single-process product (the agreement recorded in each row's extra_info)."""
    H, V = _setup(None)
    return H.matmat(V)


def test_hvp_k10(benchmark, group, reference):
    name, H, V, call = group
    benchmark.group = "hvp_k10"
    benchmark.name = name
    got = call("product")                       # warm-up ("auto" settles, graphs cached)
    benchmark.pedantic(call, args=("product",), rounds=5, iterations=1)
    benchmark.extra_info.update(world=rdist.world_size(), rank_samples=H.rank_samples, params=H.shape[0],
                                torch=torch.__version__, threads=torch.get_num_threads(),
                                rel_diff_vs_single=float((got - reference).norm() / reference.norm()))


def test_slq(benchmark, group):
    name, H, V, call = group
    benchmark.group = "slq"
    benchmark.name = name
    benchmark.pedantic(call, args=("slq",), rounds=2, iterations=1)
    benchmark.extra_info.update(world=rdist.world_size(), rank_samples=H.rank_samples, params=H.shape[0],
                                torch=torch.__version__, threads=torch.get_num_threads(),
                                probes=PROBES, steps=STEPS)


if __name__ == "__main__":
    follow(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
