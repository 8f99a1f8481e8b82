"""A/B in one process: the Linear layers' tangent sums accumulated by addmm_ (new) vs a separate
add (old: _gemm_layer patched to False), ten Hessian / GGN products of the user FC ResNet, k=1 too.

Run from the repository root:
``python benchmarks/scripts/linear_addmm_ab.py OUT.json`` (one thread; record: benchmarks/results/linear_addmm_ab_cpu_20261205_dd3dd57.json).
"""
import sys
import time
import json
import torch
import os
import statistics
sys.path.insert(0, "benchmarks")
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
import bench_operators as B
from resgeom_fast.operators import hessian, ggn
import resgeom_fast.operators._structured_conv as SC
torch.set_num_threads(1)
new = SC._gemm_layer
old = lambda L, x: False
m, x, y = B._conv_model("user_fc")
res = {}
for kind, make in [("hvp", hessian), ("ggn", ggn)]:
    op = make(m, B.CE, (x, y))
    for k in (10, 1):
        V = B._probe(m, k)
        outs = {}
        for _ in range(3):
            op.matmat(V)
        ts = {"new": [], "old": []}
        for r in range(15):
            for name, f in ([("new", new), ("old", old)] if r % 2 == 0 else [("old", old), ("new", new)]):
                SC._gemm_layer = f
                t = time.perf_counter()
                out = op.matmat(V)
                ts[name].append(time.perf_counter() - t)
                outs[name] = out
        SC._gemm_layer = new
        d = float((outs["new"] - outs["old"]).norm() / outs["old"].norm())
        row = {n: round(statistics.median(v), 4) for n, v in ts.items()}
        row.update(ratio=round(row["old"] / row["new"], 3), rel_diff=d, chose=op.hvp_choice(k))
        res[f"{kind}_k{k}"] = row
        print(kind, k, row, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
