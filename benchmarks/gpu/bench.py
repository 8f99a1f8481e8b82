"""The GPU benchmarks of ``benchmarks/gpu/validate.py``: ours against plain torch.func, each time
with its accuracy beside it.

Run by validate.py as a subprocess (its own time budget); by hand::

    python3 benchmarks/gpu/bench.py --device cuda --sizes mission --rows /tmp/rows.jsonl

Every row is appended to ``--rows`` (JSON lines) as soon as it is measured, so a run killed at
its budget keeps the rows it finished. A row: ``{"bench", "impl", "size", "status", "seconds"
(median of ``repeats`` timed calls after one warm-up, CUDA synchronised before each clock read),
"seconds_min", "repeats", "accuracy" (float or None), "accuracy_metric", "note"}``.

Benchmarks (``SIZES["mission"]``; ``SIZES["tiny"]`` is the CPU dry run's, same code):

- ``hvp_resnet18`` / ``hvp_resnet50``: one ``hessian(model, CE, (x, y)).matmat(V [P, k])`` (k
  Hessian-vector products in one pass) of torchvision ResNets in eval mode (float32), against a
  plain torch.func forward-over-reverse product (vmap over the k columns) under PyTorch's
  default settings (cuDNN may use TF32 there) and the peers PyHessian / curvlinops where
  importable. Accuracy: ||Y - Y64|| / ||Y64|| (Frobenius), Y64 the torch.func product of a
  float64 copy of the model on the same V.
- ``slq_resnet18``: ``linalg.slq_density(H, probes, steps)`` against a plain PyTorch Lanczos
  (torch.func products, full reorthogonalisation by two Gram-Schmidt passes, eigvalsh of each T).
  Accuracy: |lambda_max - lambda_max64| / |lambda_max64|, lambda_max64 the largest Ritz value of
  the plain Lanczos in float64 (its own probes: ours draw theirs; after ``steps`` steps the
  largest Ritz values of different probes agree to ~1e-3 or better when the top eigenvalue is
  separated, so this column bounds gross errors, not rounding).
- ``jac_matmat_resnet50``: the residual-branch Jacobian of one block of a torchvision ResNet-50 at
  224x224 (``residual_jacobians(model, x, blocks=[b])[0].matmat(V [N, D_in, k])``) against
  torch.func.jvp of the block's branch (vmap over k). Accuracy as for the Hessian products, the
  float64 reference being the jvp of a float64 copy of the branch.
- ``jac_svd_resnet50``: ``residual_jacobians`` + ``linalg.randomized_svd(J, k)`` (the operator's
  construction included in the time) against a plain subspace iteration with torch.func jvp /
  vjp products (same sketch size k + 10 and 2 power iterations). Accuracy for both: max over
  samples and triplets of ||J v_i - s_i u_i|| / s_i, J applied in float64.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib
import importlib.metadata
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the checkout's package
    sys.path.insert(0, str(ROOT))

from resgeom_fast import linalg  # noqa: E402
from resgeom_fast.operators import hessian, residual_jacobians  # noqa: E402

CE = nn.CrossEntropyLoss()

# Sizes. "mission": the GPU run (H200: a few seconds per row); ResNet-18 on CIFAR-sized 32x32
# inputs (as `resgeom analyze --model torchvision:resnet18 --data random-cifar`), ResNet-50 on
# ImageNet-sized 224x224 inputs, every parameter (P = 11.2M / 25.6M). "tiny": the CPU dry run (the same
# code on small torchvision ResNets of one block per stage and a few parameters, well under 30 s;
# the tiny ResNet-50 stand-in fixes hvp="double_backward" to skip the auto-tuner's timing calls).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mission": {
        "hvp_resnet18": {"arch": "resnet18", "classes": 10, "batch": 128, "image": 32, "k": 8, "params": None,
                         "repeats": 5},
        "hvp_resnet50": {"arch": "resnet50", "classes": 1000, "batch": 16, "image": 224, "k": 4, "params": None,
                         "repeats": 3},
        "slq_resnet18": {"arch": "resnet18", "classes": 10, "batch": 128, "image": 32, "probes": 4, "steps": 20,
                         "params": None, "repeats": 1},
        "jac_resnet50": {"arch": "resnet50", "classes": 1000, "batch": 2, "image": 224, "block": 4, "k": 8,
                         "topk": 10, "repeats": 3},
    },
    "tiny": {
        "hvp_resnet18": {"arch": "tiny_basic", "classes": 10, "batch": 4, "image": 8, "k": 3,
                         "params": ["layer4.0.bn2", "fc"], "repeats": 1},
        "hvp_resnet50": {"arch": "tiny_bottleneck", "classes": 10, "batch": 2, "image": 16, "k": 2,
                         "params": ["layer4.0.conv3", "fc"], "repeats": 1, "hvp": "double_backward"},
        "slq_resnet18": {"arch": "tiny_basic", "classes": 10, "batch": 4, "image": 8, "probes": 2, "steps": 6,
                         "params": ["fc"], "repeats": 1},
        "jac_resnet50": {"arch": "tiny_bottleneck", "classes": 10, "batch": 2, "image": 16, "block": 0, "k": 3,
                         "topk": 3, "repeats": 1},
    },
}
PEERS = ("pyhessian", "curvlinops")


# -- helpers ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float, float]:
    """(last result, median seconds, min seconds) of ``repeats`` calls after one warm-up call."""
    out = fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times)


@torch.no_grad()
def autotune(H: Any, V: Tensor, device: torch.device, max_calls: int = 10) -> float:
    """Call ``H.matmat(V)`` until hvp="auto" has chosen its method for k = V.shape[1] (its first
    calls time every candidate); return the seconds spent (reported, not in the timings)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(max_calls):
        if H.hvp_choice(V.shape[1]) is not None:
            break
        H.matmat(V)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def rel_diff(a: Tensor, ref: Tensor) -> float:
    a, ref = a.double().reshape(-1), ref.double().reshape(-1)
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


@functools.lru_cache(maxsize=2)
def make_resnet(arch: str, classes: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A torchvision ResNet in eval mode (float32) with weights drawn under ``seed`` (cached: the
    benchmarks never change a model; two share each one)."""
    from torchvision.models import resnet  # optional dependency: checked in main()

    torch.manual_seed(seed)
    if arch == "resnet18":
        m = resnet.resnet18(num_classes=classes)
    elif arch == "resnet50":
        m = resnet.resnet50(num_classes=classes)
    elif arch == "tiny_basic":
        m = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=classes)
    elif arch == "tiny_bottleneck":
        m = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=classes)
    else:
        raise ValueError(f"make_resnet: expected arch one of resnet18, resnet50, tiny_basic, tiny_bottleneck, got {arch!r}")
    # non-trivial BatchNorm statistics (fresh ones are mean 0 / var 1: an identity in eval mode)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return m.eval().to(device)


def batch(cfg: dict, device: torch.device, dtype=torch.float32, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=g, dtype=dtype)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)
    return x.to(device), y.to(device)


def param_names(model: nn.Module, spec: Optional[list[str]]) -> list[str]:
    """Trainable parameter names in model order, restricted to the modules / parameters in spec."""
    return [n for n, p in model.named_parameters() if p.requires_grad
            and (spec is None or any(n == s or n.startswith(s + ".") for s in spec))]


def func_hvp(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """Plain torch.func Hessian products V [P, k] -> H V [P, k] (forward over reverse, vmap over k)."""
    params = dict(model.named_parameters())
    sel = tuple(params[n].detach() for n in names)
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))
    sizes = [p.numel() for p in sel]

    def loss(*q: Tensor) -> Tensor:
        return CE(torch.func.functional_call(model, {**fixed, **dict(zip(names, q))}, (x,)), y)

    g = torch.func.grad(loss, argnums=tuple(range(len(sel))))

    def apply(V: Tensor) -> Tensor:
        k = V.shape[1]
        vs = [v.t().reshape(k, *p.shape) for v, p in zip(V.split(sizes, 0), sel)]
        out = torch.func.vmap(lambda *t: torch.func.jvp(g, sel, t)[1])(*vs)
        return torch.cat([o.reshape(k, -1) for o in out], 1).t()

    return apply


def no_inplace_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` with in-place activations turned off (for torch.func)."""
    m = copy.deepcopy(module).to(dtype)
    for mod in m.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False
    return m.eval()


def branch_jvp(branch: nn.Module, h: Tensor) -> Callable[[Tensor], Tensor]:
    """J V for V [N, D_in, k] -> [N, D_out, k], J the branch's per-sample Jacobian at h (torch.func)."""
    def apply(V: Tensor) -> Tensor:
        N, _, k = V.shape
        T = V.permute(2, 0, 1).reshape(k, *h.shape)
        out = torch.func.vmap(lambda t: torch.func.jvp(branch, (h,), (t,))[1])(T)
        return out.reshape(k, N, -1).permute(1, 2, 0)
    return apply


def branch_vjp(branch: nn.Module, h: Tensor) -> Callable[[Tensor], Tensor]:
    """J^T U for U [N, D_out, k] -> [N, D_in, k] (torch.func.vjp, vmap over k)."""
    out, vjp_fn = torch.func.vjp(branch, h)

    def apply(U: Tensor) -> Tensor:
        N, _, k = U.shape
        T = U.permute(2, 0, 1).reshape(k, *out.shape)
        res = torch.func.vmap(lambda t: vjp_fn(t)[0])(T)
        return res.reshape(k, N, -1).permute(1, 2, 0)
    return apply


def row(bench: str, impl: str, size: str, **kw: Any) -> dict:
    r = {"bench": bench, "impl": impl, "size": size, "status": "ok", "seconds": None, "seconds_min": None,
         "repeats": None, "accuracy": None, "accuracy_metric": "", "note": ""}
    r.update(kw)
    return r


def peer_available(name: str) -> Optional[str]:
    """None when the peer package imports, else the reason ("not installed: ...")."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return f"not installed ({exc.__class__.__name__}: {exc})"
    return None


def peer_version(name: str) -> str:
    """The installed distribution's version of a peer package, or "(version unknown)"."""
    dist = {"curvlinops": "curvlinops-for-pytorch"}.get(name, name)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# -- benchmarks ---------------------------------------------------------------------------------
def bench_hvp(name: str, cfg: dict, device: torch.device, size: str) -> list[dict]:
    model = make_resnet(cfg["arch"], cfg["classes"], device)
    x, y = batch(cfg, device)
    names = param_names(model, cfg["params"])
    metric = "rel. Frobenius diff of H V to float64 torch.func"
    model64 = copy.deepcopy(model).double()
    x64, k, reps = x.double(), cfg["k"], cfg["repeats"]
    H = hessian(model, CE, (x, y), params=names, hvp=cfg.get("hvp", "auto"))
    P = H.shape[0]
    V = torch.randn(P, k, generator=torch.Generator().manual_seed(2)).to(device)
    truth = func_hvp(model64, names, x64, y)(V.double())
    desc = f"{cfg['arch']} N={cfg['batch']} {cfg['image']}x{cfg['image']} P={P} k={k}"
    rows = []
    tune = autotune(H, V, device)
    Y, t, tmin = timed(lambda: H.matmat(V), device, reps)
    rows.append(row(name, "ours", desc, seconds=t, seconds_min=tmin, repeats=reps, accuracy=rel_diff(Y, truth),
                    accuracy_metric=metric, note=f"hvp {H.hvp_choice(k)}; auto-tuning calls before timing {tune:.3g} s"))
    ref = func_hvp(model, names, x, y)
    Y, t, tmin = timed(lambda: ref(V), device, reps)
    rows.append(row(name, "torch_func", desc, seconds=t, seconds_min=tmin, repeats=reps,
                    accuracy=rel_diff(Y, truth), accuracy_metric=metric, note="PyTorch defaults (on CUDA cuDNN may use TF32)"))
    for peer in PEERS:
        why = peer_available(peer)
        if why:
            rows.append(row(name, peer, desc, status="not installed", note=why))
            continue
        try:
            fn = peer_hvp(peer, model, names, x, y, V)
            Y, t, tmin = timed(fn, device, reps)
            how = "hessian_vector_product, one column at a time" if peer == "pyhessian" else "HessianLinearOperator @ V"
            rows.append(row(name, peer, desc, seconds=t, seconds_min=tmin, repeats=reps, accuracy=rel_diff(Y, truth),
                            accuracy_metric=metric, note=f"{peer} {peer_version(peer)}: {how}"))
        except Exception as exc:  # a peer's failure is recorded, never fatal
            rows.append(row(name, peer, desc, status="error", note=f"{exc.__class__.__name__}: {exc}"[:300]))
    return rows


def peer_hvp(peer: str, model: nn.Module, names: list[str], x: Tensor, y: Tensor, V: Tensor) -> Callable[[], Tensor]:
    """Hessian products V [P, k] by a peer package (only called when it imports)."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    sizes = [p.numel() for p in ps]
    if peer == "curvlinops":
        from curvlinops import HessianLinearOperator  # optional peer

        Hc = HessianLinearOperator(model, CE, ps, [(x, y)], check_deterministic=False)
        return lambda: torch.as_tensor(Hc @ V)
    from pyhessian import hessian as PH  # optional peer
    from pyhessian.utils import hessian_vector_product

    for p in model.parameters():
        p.requires_grad_(any(p is q for q in ps))
    model.zero_grad(set_to_none=True)  # PyHessian sums into p.grad
    ph = PH(model, CE, data=(x, y), cuda=x.is_cuda)
    cols = [[c.reshape(p.shape) for c, p in zip(V[:, j].split(sizes), ps)] for j in range(V.shape[1])]

    def run() -> Tensor:
        out = [hessian_vector_product(ph.gradsH, ph.params, c) for c in cols]
        return torch.stack([torch.cat([t.reshape(-1) for t in o]) for o in out], 1)
    return run


def plain_lanczos(apply: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> Tensor:
    """Largest Ritz value per probe of ``steps`` Lanczos steps from the columns of v0 [P, p]
    (full reorthogonalisation, two classical Gram-Schmidt passes; plain PyTorch)."""
    P, p = v0.shape
    Q = torch.empty(steps, P, p, dtype=v0.dtype, device=v0.device)
    q = v0 / torch.linalg.vector_norm(v0, dim=0)
    alphas, betas = [], []
    for j in range(steps):
        Q[j] = q
        w = apply(q)
        alphas.append((q * w).sum(0))
        for _ in range(2):
            w = w - torch.einsum("jnp,jp->np", Q[: j + 1], torch.einsum("jnp,np->jp", Q[: j + 1], w))
        b = torch.linalg.vector_norm(w, dim=0)
        if j < steps - 1:
            betas.append(b)
            q = w / b
    a = torch.stack(alphas, 1).double()
    T = torch.diag_embed(a)
    if betas:
        e = torch.stack(betas, 1).double()
        T = T + torch.diag_embed(e, 1) + torch.diag_embed(e, -1)
    return torch.linalg.eigvalsh(T).amax(-1)


def bench_slq(name: str, cfg: dict, device: torch.device, size: str) -> list[dict]:
    model = make_resnet(cfg["arch"], cfg["classes"], device)
    x, y = batch(cfg, device)
    names = param_names(model, cfg["params"])
    model64 = copy.deepcopy(model).double()
    probes, steps, reps = cfg["probes"], cfg["steps"], cfg["repeats"]
    H = hessian(model, CE, (x, y), params=names)
    P = H.shape[0]
    v0 = (torch.randint(0, 2, (P, probes), generator=torch.Generator().manual_seed(3)) * 2 - 1).float().to(device)
    lam64 = float(plain_lanczos(func_hvp(model64, names, x.double(), y), v0.double(), steps).max())
    metric = "lambda_max rel. diff to float64 plain Lanczos"
    desc = f"{cfg['arch']} N={cfg['batch']} {cfg['image']}x{cfg['image']} P={P} probes={probes} steps={steps}"
    tune = autotune(H, v0, device)
    r, t, tmin = timed(lambda: linalg.slq_density(H, probes=probes, steps=steps, seed=0), device, reps)
    lam = float(r.lambda_max)
    rows = [row(name, "ours", desc, seconds=t, seconds_min=tmin, repeats=reps, accuracy=abs(lam - lam64) / abs(lam64),
                accuracy_metric=metric, note=f"lambda_max {lam:.6g} vs {lam64:.6g}; hvp {H.hvp_choice(probes)}, auto-tuning before "
                     f"timing {tune:.3g} s")]
    ref = func_hvp(model, names, x, y)
    lam_ref, t, tmin = timed(lambda: plain_lanczos(ref, v0, steps), device, reps)
    lam_ref = float(lam_ref.max())
    rows.append(row(name, "torch_func_lanczos", desc, seconds=t, seconds_min=tmin, repeats=reps,
                    accuracy=abs(lam_ref - lam64) / abs(lam64), accuracy_metric=metric,
                    note="plain PyTorch Lanczos, PyTorch defaults (on CUDA cuDNN may use TF32)"))
    for peer in PEERS:
        why = peer_available(peer)
        rows.append(row(name, peer, desc, status="not installed" if why else "not run",
                        note=why or "installed, no SLQ adapter in this script (see benchmarks/bench_operators.py)"))
    return rows


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y).Q


def plain_rsvd(jv: Callable[[Tensor], Tensor], jtu: Callable[[Tensor], Tensor], N: int, D_in: int, k: int,
               dtype: torch.dtype, device: torch.device, oversample: int = 10, power_iters: int = 2
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized subspace iteration (Halko et al. 2011) with plain products: (U, S, V) top k."""
    g = torch.Generator().manual_seed(4)
    omega = torch.randn(N, D_in, k + oversample, generator=g, dtype=dtype).to(device)
    Q = _orth(jv(omega))
    for _ in range(power_iters):
        Q = _orth(jv(_orth(jtu(Q))))
    Bt = jtu(Q)                                        # [N, D_in, l] = (Q^T J)^T
    W, S, Zh = torch.linalg.svd(Bt, full_matrices=False)
    U = Q @ Zh.transpose(-2, -1)
    return U[..., :k], S[..., :k], W[..., :k]


@torch.no_grad()
def svd_residual(jv64: Callable[[Tensor], Tensor], U: Tensor, S: Tensor, V: Tensor) -> float:
    """max_i ||J v_i - s_i u_i|| / s_i over samples and triplets, J applied in float64."""
    R = jv64(V.double()) - U.double() * S.double()[:, None, :]
    return float((torch.linalg.vector_norm(R, dim=1) / S.double()).max())


def bench_jac(name: str, cfg: dict, device: torch.device, size: str) -> list[dict]:
    model = make_resnet(cfg["arch"], cfg["classes"], device)
    x, _ = batch(cfg, device)
    b, k, topk, reps = cfg["block"], cfg["k"], cfg["topk"], cfg["repeats"]
    J = residual_jacobians(model, x, blocks=[b])[0]
    h = J.h.detach()
    branch32 = no_inplace_copy(J.info.branch, torch.float32)
    branch64 = no_inplace_copy(J.info.branch, torch.float64)
    jv64 = branch_jvp(branch64, h.double())
    N, D_out, D_in = h.shape[0], J.shape[0], J.shape[1]
    desc = f"{cfg['arch']} block {b} ({J.info.name}) N={N} {cfg['image']}x{cfg['image']} {D_out}x{D_in}"
    V = torch.randn(N, D_in, k, generator=torch.Generator().manual_seed(5)).to(device)
    truth = jv64(V.double())
    metric = "rel. Frobenius diff of J V to float64 torch.func.jvp"
    rows = []
    Y, t, tmin = timed(lambda: J.matmat(V), device, reps)
    rows.append(row("jac_matmat_" + name[4:], "ours", desc + f" k={k}", seconds=t, seconds_min=tmin, repeats=reps,
                    accuracy=rel_diff(Y, truth), accuracy_metric=metric, note=f"path {J.path}"))
    jv32 = branch_jvp(branch32, h)
    Y, t, tmin = timed(lambda: jv32(V), device, reps)
    rows.append(row("jac_matmat_" + name[4:], "torch_func", desc + f" k={k}", seconds=t, seconds_min=tmin,
                    repeats=reps, accuracy=rel_diff(Y, truth), accuracy_metric=metric,
                    note="PyTorch defaults (on CUDA cuDNN may use TF32)"))
    del truth, Y
    metric = "max_i norm(J v_i - s_i u_i) / s_i (float64 J)"

    def ours() -> Any:
        op = residual_jacobians(model, x, blocks=[b])[0]
        return linalg.randomized_svd(op, k=topk, seed=0)

    R, t, tmin = timed(ours, device, reps)
    rows.append(row("jac_svd_" + name[4:], "ours", desc + f" top-{topk}", seconds=t, seconds_min=tmin, repeats=reps,
                    accuracy=svd_residual(jv64, R.U, R.S, R.V), accuracy_metric=metric,
                    note=f"max rel_error_bound {float(R.rel_error_bound.max()):.3g}, converged "
                         f"{bool(R.converged.all())}, {R.matvecs} matvecs"))
    jt32 = branch_vjp(branch32, h)
    (U, S, W), t, tmin = timed(lambda: plain_rsvd(jv32, jt32, N, D_in, topk, torch.float32, device), device, reps)
    rows.append(row("jac_svd_" + name[4:], "torch_func_subspace", desc + f" top-{topk}", seconds=t, seconds_min=tmin,
                    repeats=reps, accuracy=svd_residual(jv64, U, S, W), accuracy_metric=metric,
                    note="plain subspace iteration, q=2, PyTorch defaults (on CUDA cuDNN may use TF32)"))
    return rows


BENCHES: list[tuple[str, Callable[[str, dict, torch.device, str], list[dict]]]] = [
    ("hvp_resnet18", bench_hvp), ("jac_resnet50", bench_jac), ("slq_resnet18", bench_slq), ("hvp_resnet50", bench_hvp),
]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="mission")
    ap.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    ap.add_argument("--deadline", type=float, default=math.inf,
                    help="time.time() after which no further benchmark starts (rows: 'skipped')")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # the dry run shares a small machine
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    device = torch.device(args.device)
    rows_path = Path(args.rows)

    def emit(rows: list[dict]) -> None:
        with rows_path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
                print(f"{r['bench']:<22} {r['impl']:<20} {r['status']:<13} "
                      f"t={r['seconds'] if r['seconds'] is None else round(r['seconds'], 5)} "
                      f"acc={r['accuracy']} {r['note']}", flush=True)

    try:
        import torchvision  # noqa: F401 -- optional dependency: every benchmark uses its ResNets
    except ImportError as exc:
        emit([row(n, "all", args.sizes, status="skipped", note=f"torchvision not installed: {exc}")
              for n, _ in BENCHES])
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        emit([row(n, "all", args.sizes, status="skipped", note="no visible CUDA device") for n, _ in BENCHES])
        return 0
    failed = False
    for name, fn in BENCHES:
        if args.only is not None and name not in args.only:
            continue
        if time.time() > args.deadline:
            emit([row(name, "all", args.sizes, status="skipped", note="stage budget spent")])
            continue
        try:
            emit(fn(name, SIZES[args.sizes][name], device, args.sizes))
        except Exception as exc:  # one benchmark's failure is recorded; the others still run
            failed = True
            emit([row(name, "all", args.sizes, status="error", note=f"{exc.__class__.__name__}: {exc}"[:500])])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
