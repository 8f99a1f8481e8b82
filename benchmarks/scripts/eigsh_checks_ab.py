"""A/B in one process: eigsh's default CPU check schedule vs checks every 10 steps (the old default),
top-5 at tol 1e-4 on the benchmark nets, the operator built inside each call as in the bench row.

Run from the repository root:
``python benchmarks/scripts/eigsh_checks_ab.py OUT.json`` (one thread; record: benchmarks/results/eigsh_checks_ab_cpu_20261205_33ec85e.json).
"""
import sys
import time
import json
import torch
import os
sys.path.insert(0, "benchmarks")
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
import bench_operators as B
from resgeom_fast import linalg
from resgeom_fast.operators import hessian
torch.set_num_threads(1)
out = []
for name, rounds in [("user_fc", 5), ("resnet20", 1)]:
    m, x, y = B._conv_model(name)
    ref = B._ref_top5(name)
    for rnd in range(rounds):
        for ce in ([10, None] if rnd % 2 == 0 else [None, 10]):
            H = hessian(m, B.CE, (x, y))
            t = time.perf_counter()
            r = linalg.eigsh(H, k=5, which="LA", tol=1e-4, seed=0, check_every=ce)
            dt = time.perf_counter() - t
            ev = r.eigenvalues.double().sort(descending=True).values
            err = float(((ev - ref).abs() / ref.abs()).max())
            row = dict(model=name, round=rnd, check_every=ce, steps=r.steps, seconds=round(dt, 3),
                       max_rel_error=err, converged=bool(r.converged.all()), max_residual=float(r.residuals.max()))
            print(row, flush=True)
            out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
