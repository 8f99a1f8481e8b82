"""Our top-5 eigenvalues (eigsh k=5, LA, tol 1e-4, seed 0) on a conv row's model and data, with
the Lanczos steps, the matmat calls and what the auto-tuner ran on the residual pass, as JSON.

Run from the tree to measure (its resgeom_fast and benchmarks/ are imported first), e.g. for an
A/B of two commits: ``cd TREE && python benchmarks/scripts/top5_ours.py resnet20`` (record:
benchmarks/results/top5_new_width_ab_cpu_20261203.md).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, "benchmarks")
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")

import torch  # noqa: E402

import bench_operators as B  # noqa: E402
from resgeom_fast import linalg  # noqa: E402
from resgeom_fast.operators import hessian  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1]
    m, x, y = B._conv_model(name)
    H = hessian(m, B.CE, (x, y))
    calls = []
    orig = H._matmat

    def counted(X):
        t0 = time.perf_counter()
        r = orig(X)
        calls.append([X.shape[-1], round(time.perf_counter() - t0, 3)])
        return r
    H._matmat = counted
    t0 = time.perf_counter()
    r = linalg.eigsh(H, k=5, which="LA", tol=1e-4, seed=0)
    print(json.dumps({"model": name, "seconds": round(time.perf_counter() - t0, 2), "steps": r.steps,
                      "calls": len(calls), "residual_pass_s": calls[-1][1], "first_call_s": calls[0][1],
                      "eigenvalues": r.eigenvalues.tolist(),
                      "timings_k5": {c: [round(t, 3) for t in ts] for c, ts in H.hvp_timings.get(5, {}).items()}}),
          flush=True)


if __name__ == "__main__":
    main()
