"""Ten structured Hessian products of one conv-row model with the heap scope on or off, in this
process: the median time and glibc's heap statistics after the last product (mallinfo2).

Usage: python benchmarks/scripts/heap_ab.py {user_fc,resnet20,resnet18} {on,off_fresh}
(``off_fresh``: RESGEOM_HEAP=0 before the first product, so glibc's own dynamic thresholds run
untouched). Run each arm in its own process, interleaved; REPS (default 8) timed products after
three warm-ups.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("RESGEOM_BENCH_CONV", "issue")
from benchmarks.bench_operators import _conv_model, _probe  # noqa: E402
from resgeom_fast.core import heap  # noqa: E402
from resgeom_fast.operators import hessian  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("user_fc", "resnet20", "resnet18") or sys.argv[2] not in ("on", "off_fresh"):
        raise SystemExit("usage: heap_ab.py {user_fc,resnet20,resnet18} {on,off_fresh}")
    name, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    libc = heap._glibc()
    m, x, y = _conv_model(name)
    op = hessian(m, nn.CrossEntropyLoss(), (x, y), hvp="structured")
    V = _probe(m, 10)
    os.environ["RESGEOM_HEAP"] = "1" if mode == "on" else "0"
    for _ in range(3):
        op.matmat(V)
    ts = []
    for _ in range(int(os.environ.get("REPS", "8"))):
        t = time.perf_counter()
        op.matmat(V)
        ts.append(time.perf_counter() - t)
    line = f"{name} {mode} median {statistics.median(ts):.4f}"
    if libc is not None:
        mi = libc.mallinfo2()
        line += (f" arena {mi.arena >> 20} MiB fordblks {mi.fordblks >> 20} MiB keepcost {mi.keepcost >> 20} MiB"
                 f" hblkhd {mi.hblkhd >> 20} MiB")
    print(line)


if __name__ == "__main__":
    main()
