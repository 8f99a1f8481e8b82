"""SLQ 2 probes x 100 steps on torchvision resnet18 (64 CIFAR-sized images, BN eval), one thread:
ours (hessian + linalg.slq_density, defaults) then PyHessian's density(iter=100, n_v=2), one after
the other in one process (a 10-probe run of both did not fit the session: each probe of either is
the same work, so 10 probes take ~5x).

``--prewarm GIB`` touches that much memory once before either method and frees it (default 0).
On the 2026-12-02 virtual machine a first touch of a page costs ~2.7 us (8.3 GiB took 22 s to
zero the first time, 5 s the third); prewarming 16 GiB (48 s) did not change our time (170.8 s
without, 170.4 s with), so it is off by default. ``RESGEOM_HEAP=0`` in the environment turns off
the package's heap scope (resgeom_fast/core/heap.py) for an A/B run.

Usage: python benchmarks/scripts/slq_resnet18_2probes.py OUT.json [--prewarm GIB] [--ours-only]
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("RESGEOM_BENCH_CONV", "slq")
from benchmarks.bench_operators import CE, _conv_model, _patch_pyhessian_eig  # noqa: E402
from resgeom_fast import linalg  # noqa: E402
from resgeom_fast.operators import hessian  # noqa: E402


def up() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


torch.set_num_threads(1)
prewarm = float(sys.argv[sys.argv.index("--prewarm") + 1]) if "--prewarm" in sys.argv else 0.0
if prewarm > 0:
    t = time.perf_counter()
    buf = torch.empty(int(prewarm * 2**30) // 4)
    buf.zero_()
    del buf
    prewarm_s = time.perf_counter() - t
from pyhessian import hessian as PH  # noqa: E402  (optional benchmark dependency)

m, x, y = _conv_model("resnet18", n=64)
rec = {"load_at_start": up(), "torch": torch.__version__, "model": "torchvision resnet18, 64 images 3x32x32, BN eval, P=11181642",
       "probes": 2, "steps": 100, "prewarm_gib": prewarm,
       "prewarm_s": prewarm_s if prewarm > 0 else 0.0}
t = time.perf_counter()
H = hessian(m, CE, (x, y))
r = linalg.slq_density(H, probes=2, steps=100, seed=0)
rec["ours_s"] = time.perf_counter() - t
rec["ours_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
rec["resgeom_heap"] = os.environ.get("RESGEOM_HEAP", "1")
rec["ours_lambda_max"] = float(torch.as_tensor(r.nodes).max())
rec["ours_notes"] = [str(n) for n in getattr(r, "notes", [])]
rec["ours_choice"] = H.hvp_choice(2)
print(json.dumps(rec), flush=True)
if "--ours-only" in sys.argv:
    json.dump(rec, open(sys.argv[1], "w"), indent=1)
    sys.exit(0)
del H, r
_patch_pyhessian_eig()
t = time.perf_counter()
m.zero_grad(set_to_none=True)
ev, w = PH(m, CE, data=(x, y), cuda=False).density(iter=100, n_v=2)
rec["pyhessian_s"] = time.perf_counter() - t
rec["pyhessian_lambda_max"] = float(max(max(e) for e in ev))
rec["load_at_end"] = up()
rec["ratio_pyhessian_over_ours"] = rec["pyhessian_s"] / rec["ours_s"]
print(json.dumps(rec, indent=1))
json.dump(rec, open(sys.argv[1], "w"), indent=1)
