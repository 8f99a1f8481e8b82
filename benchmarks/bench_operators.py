"""Operators of real models against peers, side by side on one model and one batch.

Run (one run, CPU; a few minutes to ~20 minutes on 2 cores):

    python -m pytest benchmarks/bench_operators.py --benchmark-only \
        --benchmark-group-by=group --benchmark-json=benchmarks/results/bench_operators_cpu.json

Model: resgeom_fast.models.FCResNet(64, 128, 8, 10, norm="batch") (P = 278,154 parameters) in
eval mode on 512 digits (float32). Peers (optional benchmark extras): PyHessian 0.1,
curvlinops-for-pytorch 3.0.1, hessian-eigenthings 1.0.0a5, torch.func. Known peer bugs worked
around: PyHessian's density() calls torch.eig (removed in torch 2; patched to eigh here) and its
trace() stops early by a relative tolerance (run with tol=0 to force all probes).

Groups: hvp_k1 / hvp_k10 (one pass of 1 or 10 Hessian-vector products), top5 (five largest
eigenvalues), trace (Hutch++ / Hutchinson, 100 products), slq (10 probes x 100 Lanczos steps),
jac_svd (top-10 singular values of a residual Jacobian, several samples). Our rows: "ours_auto"
/ "ours" let hvp="auto" and matmul="auto" measure every product method with MKL and with oneDNN
matmuls (resgeom_fast.operators.hessian); "ours_<method>" uses MKL only, "ours_<method>+onednn"
oneDNN only, "ours_structured" the structured (autograd-free) path; SLQ rows "_mkl": MKL only,
"_autograd": forward-over-reverse instead of the structured path. Accuracy goes to each
row's extra_info (errors of eigenvalues / traces against a float64 ground truth computed once by
a long, tight Lanczos run and a 1,000-probe Hutchinson estimate of our operator, both in float64: P is too large for a dense
Hessian). Timings are never asserted.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resgeom_fast  # noqa: F401 -- loads the compiled ops
from resgeom_fast import linalg
from resgeom_fast.operators import ggn, hessian, residual_blocks, residual_jacobians

torch.manual_seed(0)
CE = nn.CrossEntropyLoss()
N_DATA, WIDTH, DEPTH = 512, 128, 8


def _model(dtype=torch.float32):
    from resgeom_fast.models import FCResNet

    m = FCResNet(64, WIDTH, DEPTH, 10, norm="batch", seed=0)
    # a few SGD steps so that the Hessian is not at initialisation
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for _ in range(30):
        opt.zero_grad()
        CE(m(x), y).backward()
        opt.step()
    return m.eval().to(dtype)


def _data(dtype=torch.float32):
    from resgeom_fast.data import digits

    ds = digits()
    return ds.x_train[:N_DATA].to(dtype), ds.y_train[:N_DATA]


@pytest.fixture(scope="module")
def setup():
    m = _model()
    x, y = _data()
    return m, x, y


@pytest.fixture(scope="module")
def truth():
    """float64 ground truth: top-5 eigenvalues (tight Lanczos) and the trace (long Hutch++)."""
    m, (x, y) = _model(torch.float64), _data(torch.float64)
    H = hessian(m, CE, (x, y))
    t0 = time.perf_counter()
    top = linalg.eigsh(H, k=5, which="LA", tol=1e-9, max_steps=400, seed=123).eigenvalues
    gen = torch.Generator().manual_seed(123)
    samples = []
    for _ in range(40):  # Hutchinson, 40 x 25 = 1,000 Rademacher probes in float64
        V = torch.randint(0, 2, (H.shape[0], 25), generator=gen, dtype=torch.float64) * 2 - 1
        samples.append((V * H.matmat(V)).sum(0))
    s = torch.cat(samples)
    return {"top5": top.double(), "trace": float(s.mean()), "trace_stderr": float(s.std() / math.sqrt(s.numel())),
            "seconds": time.perf_counter() - t0}


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _info(benchmark, **kw):
    benchmark.extra_info.update({"device": "cpu", "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), **kw})


# -- HVPs ---------------------------------------------------------------------------------------
IMPLS_HVP = ["ours_auto", "ours_structured", "ours_structured+onednn", "ours_double_backward",
             "ours_forward_over_reverse", "ours_double_backward+onednn", "ours_forward_over_reverse+onednn", "torch_func",
             "pyhessian", "curvlinops", "hessian_eigenthings"]


def _hvp_fn(impl, m, x, y, k):
    ps = _params(m)
    P = sum(p.numel() for p in ps)
    V = torch.randn(P, k)
    if impl.startswith("ours"):
        # ours_<method>[+onednn]: one product method, MKL (default) or oneDNN matmuls; ours_auto measures all
        method, _, backend = impl[5:].partition("+")
        matmul = "onednn" if backend else ("auto" if method == "auto" else "default")
        H = hessian(m, CE, (x, y), hvp=method, matmul=matmul)
        return lambda: H.matmat(V)
    if impl == "torch_func":
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        prim = tuple(p.detach() for p in ps)

        def loss(*q):
            return CE(torch.func.functional_call(m, dict(zip(names, q)), (x,)), y)

        g = torch.func.grad(loss, argnums=tuple(range(len(prim))))
        vs = [v.reshape(k, *p.shape) for v, p in zip(V.t().split([p.numel() for p in ps], 1), ps)]
        return lambda: torch.func.vmap(lambda *t: torch.func.jvp(g, prim, t)[1])(*vs)
    if impl == "pyhessian":
        from pyhessian import hessian as PH
        from pyhessian.utils import hessian_vector_product

        m.zero_grad(set_to_none=True)  # PyHessian sums into p.grad
        ph = PH(m, CE, data=(x, y), cuda=False)
        cols = [[c.reshape(p.shape) for c, p in zip(V[:, j].split([p.numel() for p in ps]), ps)] for j in range(k)]
        return lambda: [hessian_vector_product(ph.gradsH, ph.params, c) for c in cols]
    if impl == "curvlinops":
        from curvlinops import HessianLinearOperator

        H = HessianLinearOperator(m, CE, ps, [(x, y)], check_deterministic=False)
        return lambda: H @ V
    if impl == "hessian_eigenthings":
        import hessian_eigenthings as he

        H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
        return lambda: [H.matvec(V[:, j]) for j in range(k)]
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS_HVP)
@pytest.mark.parametrize("k", [1, 10])
def test_hvp(benchmark, setup, impl, k):
    m, x, y = setup
    benchmark.group = f"hvp_k{k}"
    try:
        fn = _hvp_fn(impl, m, x, y, k)
    except ImportError as exc:
        pytest.skip(f"{impl} not installed: {exc}")
    fn()
    _info(benchmark, impl=impl, k=k)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


# -- top-5 eigenvalues --------------------------------------------------------------------------
def _peer_top5(impl: str, m, ps, x, y):
    """The peer ``impl``'s top-5 eigenvalue call on the batch (x, y) (optional extras)."""
    if impl == "pyhessian":
        from pyhessian import hessian as PH

        def run():
            m.zero_grad(set_to_none=True)  # PyHessian sums into p.grad
            ev, _ = PH(m, CE, data=(x, y), cuda=False).eigenvalues(maxIter=100, tol=1e-4, top_n=5)
            return torch.tensor(ev)
    elif impl == "curvlinops_scipy":
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh as sp_eigsh

        def run():
            H = HessianLinearOperator(m, CE, ps, [(x, y)], check_deterministic=False).to_scipy()
            return torch.tensor(sp_eigsh(H, k=5, which="LA", tol=1e-4, return_eigenvectors=False))
    else:
        import hessian_eigenthings as he

        def run():
            H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
            return torch.as_tensor(he.lanczos(H, k=5, which="LA", tol=1e-4, seed=0).eigenvalues)
    return run


@pytest.mark.parametrize("impl", ["ours", "pyhessian", "curvlinops_scipy", "hessian_eigenthings"])
def test_top5(benchmark, setup, truth, impl):
    m, x, y = setup
    benchmark.group = "top5"
    ps = _params(m)
    if impl == "ours":
        def run():
            return linalg.eigsh(hessian(m, CE, (x, y)), k=5, which="LA", tol=1e-4, seed=0).eigenvalues
    else:
        run = _peer_top5(impl, m, ps, x, y)
    ev = benchmark.pedantic(run, rounds=1, iterations=1)
    got = torch.as_tensor(ev).double().sort(descending=True).values
    err = ((got - truth["top5"]).abs() / truth["top5"].abs()).max().item()
    _info(benchmark, impl=impl, eigenvalues=got.tolist(), truth=truth["top5"].tolist(), max_rel_error=err)


# -- trace --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ours_hutchpp", "ours_hutchinson", "pyhessian_hutchinson",
                                  "curvlinops_hutchpp", "hessian_eigenthings_hutchpp"])
def test_trace(benchmark, setup, truth, impl):
    m, x, y = setup
    benchmark.group = "trace"
    ps = _params(m)
    if impl.startswith("ours"):
        method = "hutch++" if impl.endswith("hutchpp") else "hutchinson"

        def run():
            return float(linalg.trace(hessian(m, CE, (x, y)), probes=99, method=method, seed=0).estimate)
    elif impl == "pyhessian_hutchinson":
        from pyhessian import hessian as PH

        def run():  # tol=0: PyHessian's trace() otherwise stops early
            m.zero_grad(set_to_none=True)  # PyHessian sums into p.grad
            return float(sum(PH(m, CE, data=(x, y), cuda=False).trace(maxIter=99, tol=0.0)) / 99)
    elif impl == "curvlinops_hutchpp":
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.meyer2020hutch import hutchpp_trace

        def run():
            H = HessianLinearOperator(m, CE, ps, [(x, y)], check_deterministic=False)
            return float(hutchpp_trace(H, 99))
    else:
        import hessian_eigenthings as he

        def run():
            H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
            return float(he.trace(H, num_matvecs=99, method="hutch++", seed=0).estimate)
    est = benchmark.pedantic(run, rounds=1, iterations=1)
    _info(benchmark, impl=impl, estimate=est, truth=truth["trace"], truth_stderr=truth["trace_stderr"],
          rel_error=abs(est - truth["trace"]) / abs(truth["trace"]))


# -- SLQ 10 probes x 100 steps ------------------------------------------------------------------
def _patch_pyhessian_eig():
    """PyHessian's density() calls torch.eig (gone in torch 2): a symmetric-T replacement."""
    def eig(T, eigenvectors=True):
        w, v = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), v

    torch.eig = eig  # torch 2 keeps a torch.eig stub that raises


@pytest.mark.parametrize("impl", ["ours", "ours_reorth_local", "ours_reorth_local_mkl", "ours_reorth_local_autograd",
                                  "pyhessian", "curvlinops", "hessian_eigenthings"])
def test_slq(benchmark, setup, truth, impl):
    m, x, y = setup
    benchmark.group = "slq"
    ps = _params(m)
    P = sum(p.numel() for p in ps)
    if impl.startswith("ours"):
        reorth = "local" if impl.startswith("ours_reorth_local") else "full"
        matmul = "default" if impl.endswith("_mkl") else "auto"   # _mkl: oneDNN not among the candidates
        hvp = "forward_over_reverse" if impl.endswith("_autograd") else "auto"   # _autograd: no structured path

        def run():
            r = linalg.slq_density(hessian(m, CE, (x, y), matmul=matmul, hvp=hvp), probes=10, steps=100, seed=0,
                                   reorth=reorth)
            return r.nodes, r.weights
    elif impl == "pyhessian":
        from pyhessian import hessian as PH

        _patch_pyhessian_eig()

        def run():
            m.zero_grad(set_to_none=True)  # PyHessian sums into p.grad
            ev, w = PH(m, CE, data=(x, y), cuda=False).density(iter=100, n_v=10)
            return torch.tensor(ev), torch.tensor(w)
    elif impl == "curvlinops":
        from curvlinops import HessianLinearOperator
        from curvlinops.papyan2020traces.spectrum import fast_lanczos

        def run():  # the quadrature of lanczos_approximate_spectrum (no reorthogonalisation)
            H = HessianLinearOperator(m, CE, ps, [(x, y)], check_deterministic=False)
            nodes, weights = [], []
            for _ in range(10):
                ev, evecs = fast_lanczos(H, 100)
                nodes.append(torch.as_tensor(ev))
                weights.append(torch.as_tensor(evecs)[0] ** 2)
            return torch.stack(nodes), torch.stack(weights)
    else:
        import hessian_eigenthings as he

        def run():
            H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
            r = he.spectral_density(H, num_runs=10, lanczos_steps=100, num_grid_points=1000, seed=0)
            return r.raw_eigenvalues, r.raw_weights
    nodes, weights = benchmark.pedantic(run, rounds=1, iterations=1)
    nodes, weights = torch.as_tensor(nodes).double(), torch.as_tensor(weights).double()
    lam_max = float(nodes.max())
    trace_est = float((nodes * weights).sum(-1).mean() * P)
    _info(benchmark, impl=impl, lambda_max=lam_max, lambda_max_rel_error=abs(lam_max - float(truth["top5"][0])) / float(truth["top5"][0]),
          trace_from_moments=trace_est, trace_rel_error=abs(trace_est - truth["trace"]) / abs(truth["trace"]))


# -- residual Jacobian top-10 SVD ---------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ours_fast", "ours_generic", "torch_func_svd_lowrank", "jacrev_svd"])
def test_jacobian_svd(benchmark, setup, impl):
    m, x, _ = setup
    benchmark.group = "jac_svd"
    xs = x[:32]
    info = residual_blocks(m)[3]
    if impl.startswith("ours"):
        def run():
            op = residual_jacobians(m, xs, blocks=[3], path=impl[5:])[0]
            return linalg.randomized_svd(op, k=10, seed=0).S
    else:
        op = residual_jacobians(m, xs, blocks=[3], path="generic")[0]
        h, branch = op.h, info.branch
        if impl == "torch_func_svd_lowrank":
            def run():
                out = []
                for b in range(h.shape[0]):  # one sample at a time, matvecs through torch.func
                    hb = h[b:b + 1]
                    f = lambda z: branch(z)  # noqa: E731
                    J = torch.func.vmap(lambda v: torch.func.jvp(f, (hb,), (v[None],))[1][0], in_dims=1, out_dims=1)(
                        torch.eye(h.shape[1]))
                    out.append(torch.svd_lowrank(J, q=20, niter=2)[1][:10])
                return torch.stack(out)
        else:
            def run():
                out = []
                for b in range(h.shape[0]):
                    J = torch.func.jacrev(lambda z: branch(z[None])[0])(h[b])
                    out.append(torch.linalg.svdvals(J)[:10])
                return torch.stack(out)
    S = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    exact = torch.stack([torch.linalg.svdvals(J.double())[:10] for J in
                         residual_jacobians(m, xs, blocks=[3], path="generic")[0].to_dense()])
    _info(benchmark, impl=impl, samples=xs.shape[0], max_rel_error=float(((S.double() - exact).abs() / exact).max()))


def _interleaved_slq(rounds: int = 2) -> dict:
    """SLQ (10 probes x 100 steps) of ours (full and local reorthogonalisation; local with MKL
    matmuls only; local with autograd products), PyHessian and hessian-eigenthings, interleaved over
    ``rounds`` rounds so that a shared machine's load hits all alike; also times our 100 Hessian
    matmats alone (the rest of our time is the Lanczos reorthogonalisation)."""
    import datetime

    m, (x, y) = _model(), _data()

    def ours():
        return linalg.slq_density(hessian(m, CE, (x, y)), probes=10, steps=100, seed=0)

    def ours_local():
        return linalg.slq_density(hessian(m, CE, (x, y)), probes=10, steps=100, seed=0, reorth="local")

    def ours_local_mkl():
        return linalg.slq_density(hessian(m, CE, (x, y), matmul="default"), probes=10, steps=100, seed=0,
                                  reorth="local")

    def ours_local_autograd():
        return linalg.slq_density(hessian(m, CE, (x, y), hvp="forward_over_reverse"), probes=10, steps=100,
                                  seed=0, reorth="local")

    def pyhessian():
        from pyhessian import hessian as PH

        _patch_pyhessian_eig()
        m.zero_grad(set_to_none=True)
        return PH(m, CE, data=(x, y), cuda=False).density(iter=100, n_v=10)

    def eigenthings():
        import hessian_eigenthings as he

        H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
        return he.spectral_density(H, num_runs=10, lanczos_steps=100, num_grid_points=1000, seed=0)

    def matmats_only():
        H = hessian(m, CE, (x, y))
        V = torch.randn(H.shape[0], 10)
        for _ in range(100):
            H.matmat(V)
        print("  matmat choice", H.hvp_choice(10), {c: round(min(t), 3) for c, t in H.hvp_timings[10].items()},
              flush=True)

    res: dict = {}
    for _ in range(rounds):
        for name, f in [("ours", ours), ("ours_reorth_local", ours_local), ("ours_reorth_local_mkl", ours_local_mkl),
                        ("ours_reorth_local_autograd", ours_local_autograd), ("pyhessian", pyhessian),
                        ("hessian_eigenthings", eigenthings), ("ours_100_matmats_only", matmats_only)]:
            t0 = time.perf_counter()
            f()
            res.setdefault(name, []).append(time.perf_counter() - t0)
            print(name, round(res[name][-1], 2), flush=True)
    return {"date": datetime.datetime.now().isoformat(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seconds": res}


if __name__ == "__main__" and len(sys.argv) == 1:  # python benchmarks/bench_operators.py: interleaved SLQ
    import json

    print(json.dumps(_interleaved_slq()))


# ================================================================================================
# Conv rows (issue 15): CIFAR ResNet-20, torchvision resnet18, a user-written FC ResNet, and the
# residual-Jacobian SVDs of a ResNet-20 block and resnet50's first Bottleneck at 224x224.
#
# One run, every method of a group timed once per round with the rounds outermost (the tests
# are collected round by round), torch.set_num_threads(CONV_THREADS). Accuracy beside time in
# extra_info, and what the timed call cost the host (page faults, system time: _watched). The
# product rows time the second of two back-to-back calls of each method, every method alike, and
# record the first call of the round beside it (_warm_round: on a VM the first call after other
# rows pays host faults for memory the guest handed back). Sizes: RESGEOM_BENCH_CONV=full (the issue's: ResNet-20 on 128 images, resnet18 on
# 64, SLQ 10 x 100), "issue" (all rows in one run: "full" but SLQ on ResNet-20 with 32 images
# and no resnet18 SLQ), "slq" (SLQ 10 x 100 with ResNet-20 on 32 images) or "reduced" (the default: what a shared 2-core machine runs in ~30 minutes;
# the sizes used are recorded in every row's extra_info). Run:
#
#     RESGEOM_BENCH_CONV=reduced python -m pytest benchmarks/bench_operators.py -k conv \
#         --benchmark-only --benchmark-group-by=group --benchmark-json=OUT.json
#
# and summarise with python benchmarks/bench_operators.py --conv-table OUT.json. Rows too long for
# one process (resnet18's SLQ: ~2 h for its four methods) run one implementation per pytest call
# (-k "conv_slq and resnet18 and ours_auto", ...) with RESGEOM_BENCH_REF_DIR=FOLDER, which keeps
# the float32 reference top-5 on disk so that it is computed once, not once per call.
# ================================================================================================
CONV_THREADS = int(os.environ.get("RESGEOM_BENCH_THREADS", "1"))
CONV_SIZES = {
    "full": {"resnet20_n": 128, "resnet18_n": 64, "fc_n": 512, "slq": (10, 100), "slq_fc": (10, 100),
             "top5_models": ("resnet20", "resnet18", "user_fc"), "slq_models": ("resnet20", "resnet18", "user_fc"),
             "rounds": 3, "jac_r20_n": 16, "jac_r50_n": 4},
    "reduced": {"resnet20_n": 32, "resnet18_n": 8, "fc_n": 512, "slq": (2, 20), "slq_fc": (10, 100),
                "top5_models": ("resnet20", "user_fc"), "slq_models": ("resnet20", "user_fc"),
                "rounds": 2, "jac_r20_n": 16, "jac_r50_n": 4},
    # the SLQ 10 x 100 rows of all three models in one run a session can afford (resnet18 and the
    # FC net at the sizes, ResNet-20 on 32 images: at 128 its four methods take ~95 min)
    "slq": {"resnet20_n": 32, "resnet18_n": 64, "fc_n": 512, "slq": (10, 100), "slq_fc": (10, 100),
            "top5_models": ("resnet20", "resnet18", "user_fc"), "slq_models": ("resnet20", "resnet18", "user_fc"),
            "rounds": 1, "jac_r20_n": 16, "jac_r50_n": 4},
    # every conv row in one run a session can afford (~1 h on 2 cores): the products, GGN and
    # top-5 at the sizes, SLQ 10 x 100 on the FC net and on ResNet-20 with 32 images (its
    # own model and reference; at 128 its four methods take ~95 min); resnet18's SLQ is the "slq"
    # mode's row and benchmarks/scripts/slq_resnet18_2probes.py
    "issue": {"resnet20_n": 128, "resnet18_n": 64, "fc_n": 512, "slq": (10, 100), "slq_fc": (10, 100),
              "top5_models": ("resnet20", "resnet18", "user_fc"), "slq_models": ("resnet20", "user_fc"),
              "slq_n": {"resnet20": 32}, "rounds": 3, "jac_r20_n": 16, "jac_r50_n": 4, "top5_fc_rounds": 7,
              "fc_product_rounds": 11},
    "smoke": {"resnet20_n": 4, "resnet18_n": 2, "fc_n": 64, "slq": (1, 5), "slq_fc": (1, 5), "slq_n": {"resnet20": 3},
              "top5_models": ("resnet20", "user_fc"), "slq_models": ("resnet20", "user_fc"),
              "rounds": 1, "jac_r20_n": 2, "jac_r50_n": 1},
}
CONV_MODE = os.environ.get("RESGEOM_BENCH_CONV", "reduced")
CS = CONV_SIZES[CONV_MODE]
ROUNDS = list(range(CS["rounds"]))
# the FC net's ten products take 0.06-0.2 s a call: more rounds there (the conv nets' rounds stop
# at CS["rounds"]), so that the median of a shared machine's timings is a stable one
PRODUCT_ROUNDS = list(range(max(CS["rounds"], CS.get("fc_product_rounds", 0))))
K10 = 10


class UserFCBlock(nn.Module):
    """h + W2 relu(W1 h + b1) + b2, written by a user (no resgeom_fast class, no mark)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h):
        return h + self.fc2(F.relu(self.fc1(h)))


class UserFCResNet(nn.Module):
    """A user's FC ResNet: Linear(64, 128), 8 UserFCBlocks of width 128, Linear(128, 10); no BN."""

    def __init__(self, width: int = 128, depth: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.body = nn.Sequential(*[UserFCBlock(width) for _ in range(depth)])
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def _conv_model(name: str, dtype=torch.float32, n: Optional[int] = None):
    """(model in eval mode, x, y): BN running statistics from three train-mode passes over x;
    ``n`` images (conv nets) instead of the size mode's."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if name == "user_fc":
        m = UserFCResNet()
        x, y = _data()
        x, y = x[:CS["fc_n"]], y[:CS["fc_n"]]
        opt = torch.optim.SGD(m.parameters(), lr=0.05)   # a few steps: not the Hessian at initialisation
        for _ in range(30):
            opt.zero_grad()
            CE(m(x), y).backward()
            opt.step()
        return m.eval().to(dtype), x.to(dtype), y
    if name == "resnet20":
        from resgeom_fast.models.resnet import StagedResNet

        m = StagedResNet("basic", (3, 3, 3), 10, base_width=16, seed=0)
        n = CS["resnet20_n"] if n is None else n
    elif name == "resnet18":
        import torchvision  # optional benchmark dependency

        m = torchvision.models.resnet18(num_classes=10)
        n = CS["resnet18_n"] if n is None else n
    else:
        raise ValueError(name)
    # CIFAR-sized synthetic images (no data set download on the benchmark machine), random labels
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(x)
    return m.eval().to(dtype), x.to(dtype), y


_CONV_CACHE: dict = {}


def _cached(key, make):
    if key not in _CONV_CACHE:
        _CONV_CACHE[key] = make()
    return _CONV_CACHE[key]


def _P(m) -> int:
    return sum(p.numel() for p in _params(m))


def _probe(m, k: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(_P(m), k, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def _ref_products(name: str, kind: str):
    """float64 torch.func reference of 10 Hessian ("hvp") or GGN ("ggn") products of the model."""
    def make():
        m, x, y = _conv_model(name, torch.float64)
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        prim = tuple(p.detach() for p in _params(m))
        V = _probe(m, K10, torch.float64)
        vs = [v.reshape(K10, *p.shape) for v, p in zip(V.t().split([p.numel() for p in prim], 1), prim)]

        def out(*q):
            return torch.func.functional_call(m, dict(zip(names, q)), (x,))

        cols = []
        for j in range(K10):
            t = tuple(v[j] for v in vs)
            if kind == "hvp":
                g = torch.func.grad(lambda *q: CE(out(*q), y), argnums=tuple(range(len(prim))))
                r = torch.func.jvp(g, prim, t)[1]
            else:
                o, jv = torch.func.jvp(out, prim, t)
                p = o.softmax(-1)
                hjv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / o.shape[0]   # CE's Hessian in the logits
                r = torch.func.vjp(out, *prim)[1](hjv)
            cols.append(torch.cat([c.reshape(-1) for c in r]))
        return torch.stack(cols, 1)
    return _cached(("ref", name, kind), make)


def _mem_available_gib() -> Optional[float]:
    from resgeom_fast.linalg._memory import meminfo_available

    free = meminfo_available()
    return None if free is None else round(free / 2**30, 2)


def _watched(fn, host: dict):
    """``fn`` that also records, in ``host``, what the timed call cost the host besides its
    arithmetic: minor / major page faults of the process during the call (each first touch of a
    fresh page: ~3 us on this VM), the process's RSS and the machine's MemAvailable before it. A
    method's time in a long one-run can differ from the same rows alone (2026-12-03: ours 1.6x
    slower on resnet18 inside the one run); these fields let a later run tell memory effects
    from the machine's load."""
    import resource

    def run():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        host.update(mem_available_gib=_mem_available_gib(), rss_gib=_rss_gib())
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        host.update(minor_faults=r1.ru_minflt - r0.ru_minflt, major_faults=r1.ru_majflt - r0.ru_majflt,
                    cpu_s=round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3),
                    sys_s=round(r1.ru_stime - r0.ru_stime, 3), wall_s=round(wall, 3))
        return out
    return run


def _rss_gib() -> Optional[float]:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)
    except (OSError, ValueError):
        return None


def _rel_err(got, ref) -> float:
    got = torch.as_tensor(got).double().reshape(ref.shape)
    return float((got - ref).norm() / ref.norm())


def _model_key(name: str, n: Optional[int] = None, kind: str = "model") -> tuple:
    """The cache key of ``kind`` ("model", "ref_top5") for ``name`` at the mode's size or ``n`` images."""
    return (kind, name) if n is None else (kind, name, n)


def _conv_info(benchmark, name, impl, n: Optional[int] = None, **kw):
    m, x, _ = _cached(_model_key(name, n), lambda: _conv_model(name, n=n))
    _info(benchmark, impl=impl, model=name, n_images=int(x.shape[0]), P=_P(m), sizes=CONV_MODE,
          threads=torch.get_num_threads(), **kw)


def _product_fn(name: str, impl: str, kind: str):
    """(callable returning [P, 10], what ours chose) for one method of the 10-product rows."""
    m, x, y = _cached(("model", name), lambda: _conv_model(name))
    ps = _params(m)
    V = _probe(m, K10)
    if impl == "ours_auto":
        op = (hessian if kind == "hvp" else ggn)(m, CE, (x, y))
        return (lambda: op.matmat(V)), op
    if impl == "pyhessian":
        from pyhessian import hessian as PH
        from pyhessian.utils import hessian_vector_product

        m.zero_grad(set_to_none=True)   # PyHessian sums into p.grad
        ph = PH(m, CE, data=(x, y), cuda=False)
        cols = [[c.reshape(p.shape) for c, p in zip(V[:, j].split([q.numel() for q in ps]), ps)] for j in range(K10)]

        def run():
            out = [hessian_vector_product(ph.gradsH, ph.params, c) for c in cols]
            return torch.stack([torch.cat([t.reshape(-1) for t in o]) for o in out], 1)
        return run, None
    if impl == "curvlinops":
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        cls = HessianLinearOperator if kind == "hvp" else GGNLinearOperator
        op = cls(m, CE, ps, [(x, y)], check_deterministic=False)
        return (lambda: op @ V), None
    if impl == "hessian_eigenthings":
        import hessian_eigenthings as he

        op = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
        return (lambda: torch.stack([torch.as_tensor(op.matvec(V[:, j])) for j in range(K10)], 1)), None
    raise ValueError(impl)


def _choice(op) -> dict:
    if op is None:
        return {}
    timings = op.hvp_timings
    k = K10 if K10 in timings or not timings else max(timings)   # SLQ / Lanczos: passes of `probes` vectors
    return {"ours_choice": op.hvp_choice(k), "ours_method": op.hvp_method, "ours_k": k,
            "ours_timings": {c: [round(t, 4) for t in ts] for c, ts in timings.get(k, {}).items()}}


_TUNING: dict = {}


def _warm(fn, op) -> None:
    """One warm-up call; for our "auto" operator, calls until it has chosen its method for passes
    of 10 vectors (it times its candidates on the first passes), so that the timed rounds measure
    the method it keeps. The number of passes it spent choosing is recorded (tuning_passes)."""
    fn()
    n = 1
    while op is not None and op.hvp_choice(K10) is None and n < 8:
        fn()
        n += 1
    if op is not None:
        _TUNING[id(op)] = n


def _warm_round(fn, op, rnd: int) -> dict:
    """Before each timed call of a product row, one untimed call of the same method (every
    method alike): the timed call measures the steady state of back-to-back products -- what
    Lanczos, SLQ and power iteration run -- and the first call of the round, which follows other
    methods' rows, is recorded beside it as ``cold_s`` / ``cold_host``. On a VM whose host reclaims
    the memory a guest frees (free page reporting: Firecracker, most clouds), touching it again
    costs a host fault, measured 16-39 us per 4 KiB page on 2026-12-03 against ~2 us for memory
    the guest kept: our resnet18 product right after another took 4.6-5.2 s with 109k faults,
    after a 3 s pause 10.9-14.4 s with 489-495k faults (its heap handed back in between:
    core/heap.py) -- the one run's 1.6x. Round 0's untimed calls are the warm-up of :func:`_warm`
    (ours' tuning), so it records no cold call."""
    if rnd == 0:
        _warm(fn, op)
        return {"cold_s": None, "cold_note": "round 0: the warm-up calls (ours: its tuning) came first"}
    host: dict = {}
    _watched(fn, host)()
    return {"cold_s": host["wall_s"], "cold_host": host}


CONV_MODELS = ["resnet20", "resnet18", "user_fc"]
IMPLS_K10 = ["ours_auto", "pyhessian", "curvlinops", "hessian_eigenthings"]


def _fc_round(name: str, rnd: int, conv_rounds: int) -> None:
    """Skip round ``rnd`` of a conv net past its ``conv_rounds`` (the FC net runs more rounds)."""
    if name != "user_fc" and rnd >= conv_rounds:
        pytest.skip(f"the conv nets run {conv_rounds} round(s); the FC net more")


@pytest.mark.parametrize("impl", IMPLS_K10)
@pytest.mark.parametrize("name", CONV_MODELS)
@pytest.mark.parametrize("rnd", PRODUCT_ROUNDS)
def test_conv_hvp_k10(benchmark, rnd, name, impl):
    _fc_round(name, rnd, CS["rounds"])
    torch.set_num_threads(CONV_THREADS)
    benchmark.group = f"conv_{name}_hvp_k10"
    try:
        fn, op = _cached(("hvp", name, impl), lambda: _product_fn(name, impl, "hvp"))
    except ImportError as exc:
        pytest.skip(f"{impl} not installed: {exc}")
    cold = _warm_round(fn, op, rnd)   # "auto" measures its candidates in round 0, before the timed calls
    host: dict = {}
    out = benchmark.pedantic(_watched(fn, host), rounds=1, iterations=1)
    _conv_info(benchmark, name, impl, round=rnd, rel_error=_rel_err(out, _ref_products(name, "hvp")),
               tuning_passes=_TUNING.get(id(op)), host=host, **cold, **_choice(op))


@pytest.mark.parametrize("impl", ["ours_auto", "curvlinops"])
@pytest.mark.parametrize("name", CONV_MODELS)
@pytest.mark.parametrize("rnd", PRODUCT_ROUNDS)
def test_conv_ggn_k10(benchmark, rnd, name, impl):
    _fc_round(name, rnd, CS["rounds"])
    torch.set_num_threads(CONV_THREADS)
    benchmark.group = f"conv_{name}_ggn_k10"
    try:
        fn, op = _cached(("ggn", name, impl), lambda: _product_fn(name, impl, "ggn"))
    except ImportError as exc:
        pytest.skip(f"{impl} not installed: {exc}")
    cold = _warm_round(fn, op, rnd)
    host: dict = {}
    out = benchmark.pedantic(_watched(fn, host), rounds=1, iterations=1)
    eng = None if op is None else op._engine.structured
    # whether our GGN went through the logits' Jacobians, and its FLOP count per pass
    extra = {} if eng is None else {"ggn_jacobians": bool(getattr(eng, "jac_on", False)),
                                    "ours_gflop_per_pass": (op.structured_flops(K10) or 0) / 1e9}
    _conv_info(benchmark, name, impl, round=rnd, rel_error=_rel_err(out, _ref_products(name, "ggn")),
               tuning_passes=_TUNING.get(id(op)), host=host, **cold, **_choice(op), **extra)


def _ref_top5(name: str, n: Optional[int] = None) -> torch.Tensor:
    """Reference top-5: float64 Lanczos to tol 1e-8 (FC) / float32 to 1e-6 (conv nets: a float64
    run of several hundred products does not fit this session)."""
    def make():
        dtype = torch.float64 if name == "user_fc" else torch.float32
        m, x, y = _conv_model(name, dtype, n=n)
        tol = 1e-8 if dtype == torch.float64 else 1e-6
        # resnet18: a 300-step basis of its 11.2M parameters (14.4 GiB) does not fit beside the
        # benchmark's other state on a 24 GB machine; 200 steps (9.6 GiB) and the convergence flag
        steps = 200 if name == "resnet18" else 300
        r = linalg.eigsh(hessian(m, CE, (x, y)), k=5, which="LA", tol=tol, max_steps=steps, seed=321)
        if not bool(torch.as_tensor(r.converged).all()):
            raise RuntimeError(f"the reference top-5 of {name} did not converge to {tol} in {steps} steps")
        return r.eigenvalues.double().sort(descending=True).values

    def make_or_load():
        # RESGEOM_BENCH_REF_DIR: keep the reference on disk, so that one row per process (the
        # resnet18 SLQ rows, run one implementation at a time) computes it once, not once each
        folder = os.environ.get("RESGEOM_BENCH_REF_DIR")
        if not folder:
            return make()
        images = n if n is not None else CS["fc_n" if name == "user_fc" else f"{name}_n"]
        path = os.path.join(folder, f"ref_top5_{name}_n{images}.pt")
        if os.path.exists(path):
            return torch.load(path)
        ref = make()
        os.makedirs(folder, exist_ok=True)
        torch.save(ref, path + ".tmp")
        os.replace(path + ".tmp", path)
        return ref
    return _cached(_model_key(name, n, "ref_top5"), make_or_load)


def _release_product_rows() -> None:
    """Drop what the product rows cached (operators with their primal passes, PyHessian's retained
    gradient graph, the float64 references): the spectral rows that follow in the same run plan
    their Lanczos bases against the memory left free, and on resnet18 these caches held enough for
    eigsh's plan to refuse ours (2026-12-03). A product row run later recomputes what it needs."""
    import gc

    for key in [k for k in _CONV_CACHE if k[0] in ("hvp", "ggn", "ref")]:
        del _CONV_CACHE[key]
    _TUNING.clear()
    gc.collect()


@pytest.mark.parametrize("impl", ["ours_auto", "pyhessian", "curvlinops_scipy", "hessian_eigenthings"])
@pytest.mark.parametrize("name", list(CS["top5_models"]))
@pytest.mark.parametrize("rnd", list(range(CS.get("top5_fc_rounds", 1))))
def test_conv_top5(benchmark, rnd, name, impl):
    """One round on the conv nets; on the FC net (about a second a call) ``top5_fc_rounds``
    rounds, the methods interleaved: scipy's ARPACK starts from a random vector of its own, and
    its matvec count, so curvlinops + scipy's time, varied 1.26-2.30 s from run to run (2026-12-05)."""
    _fc_round(name, rnd, 1)
    torch.set_num_threads(CONV_THREADS)
    _release_product_rows()
    benchmark.group = f"conv_{name}_top5"
    m, x, y = _cached(("model", name), lambda: _conv_model(name))
    ps = _params(m)
    chosen: dict = {}
    if impl == "ours_auto":
        def run():
            H = hessian(m, CE, (x, y))
            # tol 2e-5 (the peers: 1e-4, in their own criteria): with the convergence test after
            # every step (2026-12-05) ours at 1e-4 stopped at ResNet-20's first step meeting it,
            # 36 steps and 3.1e-7 off the reference against curvlinops + scipy's 5.8e-8; at 2e-5 all
            # three nets end at the float32 floor, ~3e-8 (ResNet-20 39 steps, resnet18 49, FC 24)
            r = linalg.eigsh(H, k=5, which="LA", tol=2e-5, seed=0)
            chosen.update(_choice(H), ours_steps=r.steps, ours_converged=bool(r.converged.all()))
            return r.eigenvalues
    else:
        run = _peer_top5(impl, m, ps, x, y)
    host: dict = {}
    ev = benchmark.pedantic(_watched(run, host), rounds=1, iterations=1)
    got = torch.as_tensor(ev).double().sort(descending=True).values
    ref = _ref_top5(name)
    _conv_info(benchmark, name, impl, round=rnd, eigenvalues=got.tolist(), reference=ref.tolist(),
               max_rel_error=float(((got - ref).abs() / ref.abs()).max()), host=host, **chosen)


@pytest.mark.parametrize("impl", ["ours_auto", "ours_reorth_local", "pyhessian", "curvlinops", "hessian_eigenthings"])
@pytest.mark.parametrize("name", list(CS["slq_models"]))
@pytest.mark.parametrize("rnd", ROUNDS[:1])
def test_conv_slq(benchmark, rnd, name, impl):
    torch.set_num_threads(CONV_THREADS)
    _release_product_rows()
    n = CS.get("slq_n", {}).get(name)      # the "issue" mode's ResNet-20 SLQ: 32 images
    benchmark.group = f"conv_{name}_slq" if n is None else f"conv_{name}_n{n}_slq"
    m, x, y = _cached(_model_key(name, n), lambda: _conv_model(name, n=n))
    ps = _params(m)
    probes, steps = CS["slq_fc"] if name == "user_fc" else CS["slq"]
    chosen: dict = {}
    if impl.startswith("ours"):
        # ours_reorth_local: the three-term recurrence without reorthogonalisation, as curvlinops'
        # fast_lanczos and hessian-eigenthings run it (our default, "full", reorthogonalises every step)
        reorth = "local" if impl == "ours_reorth_local" else "full"

        def run():
            H = hessian(m, CE, (x, y))
            r = linalg.slq_density(H, probes=probes, steps=steps, seed=0, reorth=reorth)
            chosen.update(_choice(H), reorth=reorth)
            return r.nodes, r.weights
    elif impl == "pyhessian":
        from pyhessian import hessian as PH

        _patch_pyhessian_eig()

        def run():
            m.zero_grad(set_to_none=True)
            ev, w = PH(m, CE, data=(x, y), cuda=False).density(iter=steps, n_v=probes)
            return torch.tensor(ev), torch.tensor(w)
    elif impl == "curvlinops":
        from curvlinops import HessianLinearOperator
        from curvlinops.papyan2020traces.spectrum import fast_lanczos

        def run():
            H = HessianLinearOperator(m, CE, ps, [(x, y)], check_deterministic=False)
            nodes, weights = [], []
            for _ in range(probes):
                ev, evecs = fast_lanczos(H, steps)
                nodes.append(torch.as_tensor(ev))
                weights.append(torch.as_tensor(evecs)[0] ** 2)
            return torch.stack(nodes), torch.stack(weights)
    else:
        import hessian_eigenthings as he

        def run():
            H = he.HessianOperator(m, [(x, y)], he.supervised_loss(CE))
            r = he.spectral_density(H, num_runs=probes, lanczos_steps=steps, num_grid_points=1000, seed=0)
            return r.raw_eigenvalues, r.raw_weights
    host: dict = {}
    nodes, weights = benchmark.pedantic(_watched(run, host), rounds=1, iterations=1)
    nodes, weights = torch.as_tensor(nodes).double(), torch.as_tensor(weights).double()
    lam_max = float(nodes.max())
    ref = float(_ref_top5(name, n)[0])
    _conv_info(benchmark, name, impl, n=n, round=rnd, probes=probes, steps=steps, lambda_max=lam_max,
               lambda_max_reference=ref, lambda_max_rel_error=abs(lam_max - ref) / abs(ref), host=host,
               **chosen)


# -- residual-Jacobian top-10 SVDs of conv blocks ------------------------------------------------
def _jac_case(case: str):
    """(model, x, block index) of a Jacobian row: a ResNet-20 block (stage 1, 16 channels at 32x32)
    or resnet50's first Bottleneck at 224x224 (torchvision, random weights, BN eval)."""
    def make():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        if case == "resnet20_block":
            from resgeom_fast.models.resnet import StagedResNet

            m = StagedResNet("basic", (3, 3, 3), 10, base_width=16, seed=0).eval()
            x = torch.randn(CS["jac_r20_n"], 3, 32, 32, generator=gen)
            return m, x, 1
        import torchvision  # optional benchmark dependency

        m = torchvision.models.resnet50().eval()
        x = torch.randn(CS["jac_r50_n"], 3, 224, 224, generator=gen)
        return m, x, 0
    return _cached(("jac", case), make)


def _textbook_rsvd(branch: nn.Module, h: torch.Tensor, k: int = 10, l: int = 20, q: int = 2, seed: int = 0):
    """Plain torch.func (vmap of jvp / vjp over one sample's probe block) and a textbook
    randomized SVD (Halko et al.: Gaussian Omega, q power iterations with torch.linalg.qr, SVD of
    B = Q^T A), one sample at a time, the same l and q as ours. Returns S [N, k], U [N, m, k],
    V [N, n, k]."""
    N, s_in = h.shape[0], tuple(h.shape[1:])
    n = math.prod(s_in)
    omega = torch.randn(n, l, generator=torch.Generator().manual_seed(seed))
    Ss, Us, Vs = [], [], []
    for b in range(N):
        hb = h[b:b + 1]
        out_b, pull = torch.func.vjp(branch, hb)
        s_out = tuple(out_b.shape)

        def A(X):   # [n, c] -> [m, c]
            return torch.func.vmap(lambda v: torch.func.jvp(branch, (hb,), (v.reshape(1, *s_in),))[1].reshape(-1),
                                   in_dims=1, out_dims=1)(X)

        def At(Y):  # [m, c] -> [n, c]
            return torch.func.vmap(lambda u: pull(u.reshape(s_out))[0].reshape(-1), in_dims=1, out_dims=1)(Y)
        Q = torch.linalg.qr(A(omega)).Q
        for _ in range(q):
            Z = torch.linalg.qr(At(Q)).Q
            Q = torch.linalg.qr(A(Z)).Q
        Bt = At(Q)                                   # B^T = A^T Q  [n, l]
        P, S, Wh = torch.linalg.svd(Bt, full_matrices=False)
        Ss.append(S[:k])
        Us.append((Q @ Wh.t())[:, :k])
        Vs.append(P[:, :k])
    return torch.stack(Ss), torch.stack(Us), torch.stack(Vs)


def _residual_rel_bound(op, S, U, V) -> float:
    """max_i r_i / (sqrt(2) s_i), r_i = sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2),
    the a-posteriori bound of linalg.randomized_svd, computed the same way for every method."""
    S, U, V = S.float(), U.float().contiguous(), V.float().contiguous()
    r1 = (op.matmat(V) - U * S.unsqueeze(1)).double().norm(dim=1)
    r2 = (op.rmatmat(U) - V * S.unsqueeze(1)).double().norm(dim=1)
    return float(((r1.square() + r2.square()).sqrt() / math.sqrt(2) / S.double()).max())


@pytest.mark.parametrize("impl", ["ours_auto", "torch_func_textbook_rsvd"])
@pytest.mark.parametrize("case", ["resnet20_block", "resnet50_bottleneck1"])
@pytest.mark.parametrize("rnd", ROUNDS)
def test_conv_jacobian_svd(benchmark, rnd, case, impl):
    torch.set_num_threads(CONV_THREADS)
    benchmark.group = f"conv_jac_svd_{case}"
    m, x, idx = _jac_case(case)
    chosen: dict = {}
    if impl == "ours_auto":
        def run():
            op = residual_jacobians(m, x, blocks=[idx])[0]
            r = linalg.randomized_svd(op, k=10, seed=0)
            chosen.update(path=op.path, fast_source=op.fast_source, reason=op.reason,
                          ours_rel_error_bound=r.max_rel_error_bound)
            return r.S, r.U, r.V
    else:
        def run():
            op = residual_jacobians(m, x, blocks=[idx], path="generic")[0]   # only to capture h
            with _EvalMode(op.info.branch):
                return _textbook_rsvd(op.info.branch, op.h)
    # one warm-up call each (torch.func's first vmap / jvp and our first product pay one-off costs:
    # 2.5 s vs 0.9 s for the textbook on the ResNet-20 block, cold vs warm)
    S, U, V = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)
    fast = _cached(("jac_op", case), lambda: residual_jacobians(m, x, blocks=[idx])[0])
    ref = _cached(("jac_ref", case), lambda: linalg.randomized_svd(fast, k=10, power_iters=8, seed=99).S.double())
    _conv_info_jac(benchmark, case, impl, round=rnd, samples=int(x.shape[0]), shape=list(fast.shape),
                   rel_error_vs_reference=float(((S.double() - ref).abs() / ref).max()),
                   residual_rel_bound=_residual_rel_bound(fast, S, U, V), **chosen)


def _conv_info_jac(benchmark, case, impl, **kw):
    _info(benchmark, impl=impl, model=case, sizes=CONV_MODE, threads=torch.get_num_threads(),
          reference="ours, power_iters=8, another sketch (seed 99)", **kw)


class _EvalMode:
    """Eval mode for the branch while the textbook method runs (as ours does), restored after."""

    def __init__(self, m: nn.Module) -> None:
        self.m, self.modes = m, [(x, x.training) for x in m.modules()]

    def __enter__(self):
        self.m.eval()

    def __exit__(self, *exc):
        for x, t in self.modes:
            x.training = t


def conv_jacobian_products(cases=("resnet20_block", "resnet50_bottleneck1"), k: int = 20, rounds: int = 3) -> str:
    """Markdown table of one product of each Jacobian row's operator at the SVD's block width k:
    ours J V (a block per sample; a sketch shared by the samples), ours J^T U, the convolutions
    they perform alone (Conv2d / conv_transpose2d on [N k, C, H, W] in NCHW and in channels_last,
    the layouts Conv2d can take), and torch.func's vmap(jvp) / vmap(vjp) per sample as the
    textbook row applies them. Methods interleaved round by round (one thread); min over rounds.
    Run: ``python benchmarks/bench_operators.py --conv-jac-products``."""
    import torch.nn.functional as F

    torch.set_num_threads(CONV_THREADS)

    def convs(op, transpose, fmt):
        N, calls = op.h.shape[0], []
        for L in op._program.lins:
            z = torch.randn(N * k, *(L.out_shape if transpose else L.in_shape)).contiguous(memory_format=fmt)
            w = L.weight.contiguous(memory_format=fmt)
            if transpose:
                calls.append(lambda z=z, L=L, w=w: F.conv_transpose2d(z, w, None, L.stride, L.padding,
                                                                      L.output_padding, L.groups, L.dilation))
            else:
                calls.append(lambda z=z, L=L, w=w: F.conv2d(z, w, None, L.stride, L.padding, L.dilation, L.groups))
        return lambda: [c() for c in calls]

    def torch_func(op, transpose):
        branch, h = op.info.branch, op.h
        s_in = tuple(h.shape[1:])

        def run():
            for b in range(h.shape[0]):
                hb = h[b:b + 1]
                if transpose:
                    out_b, pull = torch.func.vjp(branch, hb)
                    torch.func.vmap(lambda u: pull(u.reshape(out_b.shape))[0].reshape(-1), in_dims=1, out_dims=1)(
                        torch.randn(out_b.numel(), k))
                else:
                    torch.func.vmap(lambda v: torch.func.jvp(branch, (hb,), (v.reshape(1, *s_in),))[1].reshape(-1),
                                    in_dims=1, out_dims=1)(torch.randn(hb.numel(), k))
        return run

    lines = ["| case | N x k | product | ours (s) | convs NCHW (s) | convs channels_last (s) | torch.func (s) | "
             "ours / channels_last convs |", "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        m, x, idx = _jac_case(case)
        op = residual_jacobians(m, x, blocks=[idx])[0]
        N, (rows, cols) = op.h.shape[0], op.shape
        gen = torch.Generator().manual_seed(0)
        X, U = torch.randn(N, cols, k, generator=gen), torch.randn(N, rows, k, generator=gen)
        omega = torch.randn(cols, k, generator=gen)
        fns = {("J V", "ours"): lambda: op.matmat(X), ("J V shared", "ours"): lambda: op.matmat_shared(omega),
               ("J^T U", "ours"): lambda: op.rmatmat(U)}
        with _EvalMode(op.info.branch):
            for prod, tr in (("J V", False), ("J^T U", True)):
                fns[(prod, "nchw")] = convs(op, tr, torch.contiguous_format)
                fns[(prod, "cl")] = convs(op, tr, torch.channels_last)
                fns[(prod, "func")] = torch_func(op, tr)
            times: dict = {}
            for f in fns.values():
                f()
            for _ in range(rounds):
                for key, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times.setdefault(key, []).append(time.perf_counter() - t0)
        best = {key: min(v) for key, v in times.items()}
        for prod in ("J V", "J V shared", "J^T U"):
            base = "J V" if prod == "J V shared" else prod
            t, cl = best[(prod, "ours")], best[(base, "cl")]
            lines.append(f"| {case} | {N} x {k} | {prod} | {t:.3f} | {best[(base, 'nchw')]:.3f} | {cl:.3f} | "
                         f"{best[(base, 'func')]:.3f} | {t / cl:.2f}x |")
        lines.append(f"| {case} | | modes (layout {op.layout}) | {op._program.modes} | | | | |")
    return "\n".join(lines)


def conv_table(*paths: str) -> str:
    """Markdown table of a conv run's JSON (or of several, e.g. one per implementation of the
    resnet18 SLQ row): per group and method the median time over rounds, the ratio to ours, the
    accuracy, the minor page faults of the timed call (median, thousands; rows run before
    2026-12-04 did not record them), the untimed first call of each round after round 0 (product
    rows: :func:`_warm_round`) and what ours chose."""
    import json
    import statistics

    benchmarks = [b for path in paths for b in json.load(open(path))["benchmarks"]]
    rows: dict = {}
    for b in benchmarks:
        if not b["group"] or not b["group"].startswith("conv_"):
            continue
        e = b["extra_info"]
        if "impl" not in e:          # a row that failed before recording (its error is in the run's log)
            continue
        rows.setdefault(b["group"], {}).setdefault(e["impl"], []).append((b["stats"]["min"], e))
    lines = ["| group | images | method | time (s, median of rounds) | rounds | ours faster by | accuracy | "
             "page faults (k) | first call of the round (s) | ours chose |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, impls in rows.items():
        ours = statistics.median(t for t, _ in impls.get("ours_auto", [(math.nan, {})]))
        # SLQ groups with our reorth="local" row: each method's ratio to it too
        local = statistics.median(t for t, _ in impls["ours_reorth_local"]) if "ours_reorth_local" in impls else None
        for impl, recs in impls.items():
            t = statistics.median(r[0] for r in recs)
            e = recs[-1][1]
            acc = {k: v for k, v in e.items() if k in ("rel_error", "max_rel_error", "lambda_max_rel_error",
                                                        "rel_error_vs_reference", "residual_rel_bound")}
            acc_s = ", ".join(f"{k}={v:.2e}" for k, v in acc.items())
            ch = e.get("ours_choice") or e.get("ours_method") or e.get("path") or ""
            if e.get("fast_source"):
                ch += f" ({e['fast_source']})"
            if e.get("ggn_jacobians"):
                ch += f" (logit Jacobians, {e['ours_gflop_per_pass']:.1f} GFLOP)"
            faults = [r[1]["host"]["minor_faults"] for r in recs if "minor_faults" in r[1].get("host", {})]
            f_s = f"{statistics.median(faults) / 1e3:.0f}" if faults else ""
            colds = [r[1]["cold_s"] for r in recs if r[1].get("cold_s") is not None]
            c_s = f"{statistics.median(colds):.3f}" if colds else ""
            ratio = f"{t / ours:.2f}x" + (f" ({t / local:.2f}x ours_reorth_local)" if local else "")
            lines.append(f"| {g} | {e.get('n_images', '')} | {impl} | {t:.3f} | {len(recs)} | {ratio} | {acc_s} | "
                         f"{f_s} | {c_s} | {ch} |")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--conv-table":
    print(conv_table(*sys.argv[2:]))
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--conv-jac-products":
    print(conv_jacobian_products())
