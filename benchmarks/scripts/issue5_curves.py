"""Issue 5 "Must show" curves: digits training curves and output norm at init versus depth.

Writes benchmarks/results/issue5_curves.json and issue5_curves.png.

    .venv/bin/python benchmarks/scripts/issue5_curves.py [--epochs 20]

1. FCResNet(64 -> width 128, depth 8) on digits (SGD, lr 0.05, momentum 0.9, batch 64), and the
   same family at depth 32 with skip="none" (plus skip="identity" at depth 32 for reference):
   test accuracy and cumulative wall time per epoch.
2. ||h_L|| / ||h_0|| at initialisation (mean over 64 digits inputs, float64) for depth
   1, 2, 4, ..., 256 and scale 1, 1/sqrt(L), 1/L with norm="none" (and scale 1 with BatchNorm,
   train-mode statistics, for reference).
Timings are wall-clock on whatever machine runs this; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from resgeom_fast.data import digits
from resgeom_fast.models import FCResNet
from resgeom_fast.train import train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")


def training_curve(depth: int, skip: str, epochs: int) -> dict:
    d = digits(seed=0)
    model = FCResNet(64, 128, depth, 10, skip=skip, seed=0)
    wall: list[float] = []
    t0 = time.perf_counter()
    res = train(model, d, epochs, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=64, seed=0, progress=False,
                callbacks=[lambda e, m, s: wall.append(time.perf_counter() - t0)])
    accs = [h["test_acc"] for h in res.history]
    reach = next((i + 1 for i, a in enumerate(accs) if a >= 0.95), None)
    return {
        "depth": depth, "skip": skip, "width": 128,
        "test_acc": accs, "train_acc": [h["train_acc"] for h in res.history],
        "train_loss": [h["train_loss"] for h in res.history], "wall_s": wall,
        "final_test_acc": accs[-1], "best_test_acc": max(accs),
        "first_epoch_at_95": reach, "wall_s_at_95": wall[reach - 1] if reach else None,
        "total_wall_s": wall[-1],
    }


def norm_curves(depths: list[int]) -> dict:
    x = digits(seed=0).x_train[:64].double()
    out: dict = {"depths": depths, "ratio": {}}
    for label, scale, norm in (("1", 1.0, "none"), ("1/sqrt(L)", "1/sqrt(L)", "none"), ("1/L", "1/L", "none"),
                               ("1 (batch norm)", 1.0, "batch")):
        row = []
        for L in depths:
            m = FCResNet(64, 128, L, 10, scale=scale, norm=norm, seed=0).double()
            with torch.no_grad():
                _, hs = m(x, return_hidden=True)
            row.append(float(hs[-1].norm(dim=1).mean() / hs[0].norm(dim=1).mean()))
        out["ratio"][label] = row
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c in result["training"]:
        a.plot(range(1, len(c["test_acc"]) + 1), c["test_acc"], marker="o", ms=3,
               label=f"depth {c['depth']}, skip={c['skip']} ({c['total_wall_s']:.1f}s)")
    a.axhline(0.95, color="gray", ls=":", lw=1)
    a.set_xlabel("epoch")
    a.set_ylabel("test accuracy (digits)")
    a.set_title("FCResNet width 128, SGD lr 0.05")
    a.legend(fontsize=8)
    n = result["norms"]
    for label, row in n["ratio"].items():
        b.loglog(n["depths"], row, marker="o", ms=3, label=f"scale {label}")
    b.set_xlabel("depth L")
    b.set_ylabel("||h_L|| / ||h_0|| at init")
    b.set_title("output norm at initialisation (norm='none' unless noted)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    result = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                 "device": "cpu", "cpu": platform.processor() or platform.machine(),
                 "num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "training": [training_curve(8, "identity", args.epochs), training_curve(32, "none", args.epochs),
                     training_curve(32, "identity", args.epochs)],
        "norms": norm_curves([2 ** k for k in range(9)]),
    }
    with open(os.path.join(RESULTS, "issue5_curves.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(RESULTS, "issue5_curves.png"))
    for c in result["training"]:
        print(f"depth {c['depth']:3d} skip={c['skip']:8s} final {c['final_test_acc']:.4f} best {c['best_test_acc']:.4f} "
              f"95% at epoch {c['first_epoch_at_95']} ({c['wall_s_at_95']}s) total {c['total_wall_s']:.1f}s")
    for label, row in result["norms"]["ratio"].items():
        print(f"scale {label:15s}", " ".join(f"{r:.3g}" for r in row))


if __name__ == "__main__":
    main()
