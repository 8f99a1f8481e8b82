"""The data-parallel cases: small float64 models and data, what each rank computes, and the
spawning of gloo workers (``python -m tests.distributed._worker``).

The same function :func:`compute` runs in every worker (``distributed`` set: data-parallel
operators) and in the test process (``distributed=None``: the single-process ground truth on the
full data), so both compute exactly the same quantities with the same seeds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from resgeom_fast.core import distributed as rdist
from resgeom_fast.linalg import eigsh, randomized_svd, slq_density, trace
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import block_hessians, ggn, hessian
from resgeom_fast.operators.curvature import CurvatureOperator, HessianOperator
from tests.operators._operator_nets import ConvNet, randomise_bn

CE = nn.CrossEntropyLoss()
CASES = ("even", "uneven", "empty", "sharded")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60          # collectives (init_process_group(timeout=)); the join waits a little longer


def operator(kind: str, model: nn.Module, data: Any, distributed: Optional[str], hvp: str = "auto",
             params: Any = None) -> CurvatureOperator:
    """``hessian`` / ``ggn`` through the public constructors, ``distributed`` passed on."""
    make = hessian if kind == "hessian" else ggn
    return make(model, CE, data, params, hvp=hvp, distributed=distributed)


def block_operators(model: nn.Module, data: Any, distributed: Optional[str]) -> list[HessianOperator]:
    """``block_hessians`` (one engine, one operator per block), ``distributed`` passed on."""
    return block_hessians(model, CE, data, distributed=distributed)


def fc_model() -> nn.Module:
    """A float64 FCResNet (the structured path applies), BatchNorm statistics randomised."""
    m = FCResNet(4, 5, 2, 3, seed=0, norm="batch").double()
    randomise_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def conv_model() -> nn.Module:
    return ConvNet(c=2, classes=3, bn=True, seed=0).double().eval()


def _batch(n: int, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def case_data(case: str, world: int, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """(full data, how workers pass it): ``("split", full)`` or ``("sharded", [share of rank r])``.

    even: a map-style TensorDataset of 4 * world samples (split by index, rank::world); uneven:
    one (x, y) batch of 4 * world + 1 samples (contiguous blocks, rank 0 holds one more); empty:
    a DataLoader of world - 1 batches, the last one smaller (batches rank::world: the last rank
    gets none); sharded: the caller's own shares, one batch on each rank but the last, which
    passes an empty list.
    """
    if case == "even":
        full = TensorDataset(*_batch(4 * world, shape, 1))
        return full, ("split", full)
    if case == "uneven":
        full = _batch(4 * world + 1, shape, 2)
        return full, ("split", full)
    if case == "empty":
        full = DataLoader(TensorDataset(*_batch(4 * (world - 1) - 1, shape, 3)), batch_size=4, shuffle=False)
        return full, ("split", full)
    batches = [_batch(3 + 2 * i, shape, 10 + i) for i in range(world - 1)]
    return batches, ("sharded", [[b] for b in batches] + [[]])


def _vectors(P: int, k: int, seed: int) -> Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def compute(case: str, world: int, rank: int, distributed: bool) -> dict[str, Any]:
    """Every checked quantity of ``case``: products (Hessian by each method, GGN, per-block,
    conv net), eigsh both ends, Hutch++, SLQ nodes / weights, randomized SVD.

    ``distributed=False``: the single-process operators on the full data (ground truth).
    """
    out: dict[str, Any] = {}
    for net, model, shape in (("fc", fc_model(), (4,)), ("conv", conv_model(), (1, 6, 6))):
        full, (mode, given) = case_data(case, world, shape)
        if distributed:
            data = given[rank] if mode == "sharded" else given
            dmode: Optional[str] = mode
        else:
            data, dmode = full, None
        methods = (("structured", "double_backward", "forward_over_reverse", "auto") if net == "fc"
                   else ("double_backward", "forward_over_reverse"))
        for hvp in methods:
            H = operator("hessian", model, data, dmode, hvp=hvp)
            V = _vectors(H.shape[0], 3, 0)
            out[f"{net}/hessian/{hvp}"] = H.matmat(V)
            out[f"{net}/num_samples"] = H.num_samples
        G = operator("ggn", model, data, dmode)
        out[f"{net}/ggn"] = G.matmat(_vectors(G.shape[0], 3, 1))
        for i, B in enumerate(block_operators(model, data, dmode)):
            out[f"{net}/block{i}"] = B.matmat(_vectors(B.shape[0], 2, 2 + i))
        if net == "conv":
            # "auto" times the structured conv path against the double backward for 2 vectors
            H = operator("hessian", model, data, dmode)
            V = _vectors(H.shape[0], 2, 5)
            out["conv/auto"] = torch.stack([H.matmat(V) for _ in range(5)])
            out["conv/auto_choice"] = H.hvp_choice(2)
            out["conv/auto_timings"] = H.hvp_timings
            continue
        H = operator("hessian", model, data, dmode)
        for which in ("LA", "SA"):
            r = eigsh(H, k=2, which=which, seed=3)
            out[f"eigsh/{which}/values"] = r.eigenvalues
            out[f"eigsh/{which}/vectors"] = r.eigenvectors
        tr = trace(H, probes=9, method="hutch++", seed=4)
        out["trace"] = tr.estimate
        s = slq_density(H, probes=3, steps=12, seed=5)
        out["slq/nodes"], out["slq/weights"], out["slq/density"] = s.nodes, s.weights, s.density
        sv = randomized_svd(G, 3, seed=6)
        out["svd/S"] = sv.S
        out["svd/U"] = sv.U
    return out


def checks_of_failures(case: str, world: int, rank: int) -> dict[str, Any]:
    """What only the workers check (no single-process counterpart): seed=None draws the same
    numbers on every rank; rank-dependent vectors and a failure on one rank raise on every rank."""
    out: dict[str, Any] = {}
    model = fc_model()
    full, (mode, given) = case_data(case, world, (4,))
    data = given[rank] if mode == "sharded" else given
    H = operator("hessian", model, data, mode)
    out["seed_none/values"] = eigsh(H, k=2, which="LA", seed=None).eigenvalues
    out["seed_none/trace"] = trace(H, probes=6, seed=None).estimate
    V = _vectors(H.shape[0], 2, 7)
    try:
        H.matmat(V + rank)
        out["divergent"] = "no error"
    except Exception as exc:
        out["divergent"] = f"{type(exc).__name__}: {exc}"
    out["after_divergent"] = H.matmat(V)          # the group still works
    # one rank alone (the last one with data) passes float32 inputs: every rank raises (construction)
    bad = data
    if rank == (world - 1 if mode == "split" else world - 2):
        x, y = data[0] if mode == "sharded" else data
        bad = [(x.float(), y)] if mode == "sharded" else (x.float(), y)
    try:
        operator("hessian", model, bad, mode)
        out["one_rank_fails"] = "no error"
    except Exception as exc:
        out["one_rank_fails"] = f"{type(exc).__name__}: {exc}"
    out["after_failure"] = H.matmat(V)
    # the last rank's model differs: every rank refuses to build the operator
    other = fc_model()
    if rank == world - 1:
        with torch.no_grad():
            other.head.weight[0, 0] += 1e-3
    try:
        operator("hessian", other, data, mode)
        out["other_params"] = "no error"
    except Exception as exc:
        out["other_params"] = f"{type(exc).__name__}: {exc}"
    return out


def killed_rank(world: int, rank: int, outdir: Path) -> None:
    """The last rank exits without a word (as a killed process does) once the operator is built;
    the others' next product must raise a RankFailureError naming it. Each survivor writes the
    seconds it took and the error to ``outdir/killed_rank<r>.txt``."""
    rdist.REPORT_GRACE_S = 3.0  # the survivors wait 3 s for the dead rank's report (default 10)
    _, (mode, given) = case_data("uneven", world, (4,))
    H = operator("hessian", fc_model(), given, mode)
    V = _vectors(H.shape[0], 2, 8)
    H.matmat(V)
    if rank == world - 1:
        os._exit(0)             # no clean-up: its connections close as a killed process's do
    t0 = time.monotonic()
    try:
        H.matmat(V)
        msg = "no error"
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
    (outdir / f"killed_rank{rank}.txt").write_text(f"{time.monotonic() - t0:.3f}\n{msg}")


def spawn(world: int, workdir: Path, task: Optional[str] = "operators",
          module: str = "tests.distributed._worker") -> list[dict[str, Any]]:
    """Run the workers of ``world`` ranks (gloo, a FileStore in ``workdir``): ``python -m module
    rank world store workdir [task]`` (``task`` "operators", "analyses", ... of
    :mod:`tests.distributed._worker`; None: no task argument, for a test module that is its own
    worker); return each rank's ``rank{r}.pt``. Fails (naming the rank and its stderr) when a
    worker fails or outlives the timeout."""
    store = workdir / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", module, str(r), str(world), str(store), str(workdir),
                               *([task] if task is not None else [])],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=TIMEOUT_S * 3)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise AssertionError(f"worker {r} of {world} exited with {p.returncode}:\n{logs[r][-4000:]}")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world)]
