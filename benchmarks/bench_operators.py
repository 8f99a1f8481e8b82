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
import time

import pytest
import torch
from torch import nn

import resgeom_fast  # noqa: F401 -- loads the compiled ops
from resgeom_fast import linalg
from resgeom_fast.operators import hessian, residual_blocks, residual_jacobians

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
@pytest.mark.parametrize("impl", ["ours", "pyhessian", "curvlinops_scipy", "hessian_eigenthings"])
def test_top5(benchmark, setup, truth, impl):
    m, x, y = setup
    benchmark.group = "top5"
    ps = _params(m)
    if impl == "ours":
        def run():
            return linalg.eigsh(hessian(m, CE, (x, y)), k=5, which="LA", tol=1e-4, seed=0).eigenvalues
    elif impl == "pyhessian":
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


if __name__ == "__main__":  # python benchmarks/bench_operators.py: the interleaved SLQ comparison
    import json

    print(json.dumps(_interleaved_slq()))
