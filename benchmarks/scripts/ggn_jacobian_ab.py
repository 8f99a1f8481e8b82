"""A/B of the GGN's two structured methods in one process: through the logits' Jacobians (the
default where it applies) against the tangents through the graph (``GGN_JACOBIAN`` forced off),
ten GGN products per pass, alternating round by round, on the user FC ResNet (512 digits),
CIFAR ResNet-20 (128 images) and torchvision resnet18 (64 CIFAR-sized images), one thread. Per
net: the first call of each (the Jacobians' one-off cost is in the first), the median of the
timed passes, the FLOP count per pass (``op.structured_flops(10)``), and the relative difference
of the two methods' products.

Run from the repository root:
``python benchmarks/scripts/ggn_jacobian_ab.py OUT.json [ROUNDS_FC ROUNDS_CONV]``
(record: benchmarks/results/ggn_jacobian_ab_cpu_20261205_*.json).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
import bench_operators as B  # noqa: E402

import resgeom_fast.operators._structured_conv as SC  # noqa: E402
from resgeom_fast.operators import ggn  # noqa: E402


def main() -> None:
    out_path = sys.argv[1]
    rounds = {"user_fc": int(sys.argv[2]) if len(sys.argv) > 2 else 15}
    rounds["resnet20"] = rounds["resnet18"] = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(1)
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": 1, "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    for name in ("user_fc", "resnet20", "resnet18"):
        m, x, y = B._conv_model(name)
        V = B._probe(m, B.K10)
        ops, outs, first = {}, {}, {}
        for mode, flag in (("jacobians", True), ("tangents", False)):
            SC.GGN_JACOBIAN = flag
            op = ggn(m, B.CE, (x, y), hvp="structured")
            t = time.perf_counter()
            outs[mode] = op.matmat(V)
            first[mode] = time.perf_counter() - t
            ops[mode] = op
        SC.GGN_JACOBIAN = None
        ts: dict = {"jacobians": [], "tangents": []}
        for r in range(rounds[name]):
            order = ["jacobians", "tangents"] if r % 2 == 0 else ["tangents", "jacobians"]
            for mode in order:
                ops[mode].matmat(V)                      # back-to-back passes, as Lanczos runs them
                t = time.perf_counter()
                ops[mode].matmat(V)
                ts[mode].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in ts.items()}
        row = {"images": int(x.shape[0]), "P": ops["jacobians"].shape[0], "rounds": rounds[name],
               "median_s": med, "times_s": ts, "first_call_s": first,
               "gflop_per_pass": {k: ops[k].structured_flops(10) / 1e9 for k in ops},
               "speedup_jacobians": med["tangents"] / med["jacobians"],
               "rel_diff": float((outs["jacobians"] - outs["tangents"]).norm() / outs["tangents"].norm())}
        res[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    res["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
