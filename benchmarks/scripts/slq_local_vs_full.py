"""The FC net's SLQ 10 x 100 with the default full reorthogonalisation and with reorth="local",
same probes (seed 0), float32 products: how far the local run's density, moments and extreme
nodes are from the full run's, against the probe spread itself (density_std / sqrt(probes)).

Run from the repository root:
``python benchmarks/scripts/slq_local_vs_full.py OUT.json`` (one thread; record: benchmarks/results/slq_local_vs_full_fc_cpu_20261205_a74c1b9.json).
"""
import sys
import json
import math
import torch
import os
sys.path.insert(0, "benchmarks")
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
import bench_operators as B
from resgeom_fast import linalg
from resgeom_fast.operators import hessian
torch.set_num_threads(1)
m, x, y = B._conv_model("user_fc")
H = hessian(m, B.CE, (x, y))
full = linalg.slq_density(H, probes=10, steps=100, seed=0)
grid = full.grid
loc = linalg.slq_density(H, probes=10, steps=100, seed=0, reorth="local", grid=grid, sigma=full.sigma)
dx = float(grid[1] - grid[0])
l1 = float((full.density - loc.density).abs().sum() * dx)
se = float((full.density_std.sum() * dx) / math.sqrt(10))
ref = float(B._ref_top5("user_fc")[0])
out = {"l1_density_full_vs_local": l1, "probe_standard_error_l1_scale": se,
       "moments_full": full.moments.tolist(), "moments_local": loc.moments.tolist(),
       "moments_std_full": full.moments_std.tolist(),
       "moment_rel_diff": [abs(a - b) / abs(a) for a, b in zip(full.moments.tolist(), loc.moments.tolist())],
       "lambda_max_full": float(full.nodes.max()), "lambda_max_local": float(loc.nodes.max()),
       "lambda_max_reference": ref, "lambda_min_full": float(full.nodes.min()), "lambda_min_local": float(loc.nodes.min()),
       "orthogonality_full": None if full.orthogonality is None else float(full.orthogonality.max())}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
