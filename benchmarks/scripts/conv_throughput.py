"""FLOPs of one structured conv product pass and the fraction of this CPU's measured convolution
throughput it achieves (issue 15's "report the FLOP count of one product and our achieved fraction
of this CPU's measured convolution throughput").

For CIFAR ResNet-20 (128 images) and torchvision resnet18 (64 CIFAR-sized images), BatchNorm in
eval mode, one thread: ``op.structured_flops(10)`` (the convolutions and GEMMs one pass of 10
Hessian products performs, live kernel taps only) over the pass's wall time (best of ``--rounds``,
after a warm-up pass), against the CPU's convolution throughput measured here on the passes' own
convolution shapes (forward, input and weight gradients in channels_last; the best of them is
"peak"). PyHessian's ten products are timed in the same rounds, interleaved; the double backward
performs the same convolutions (six per conv layer and vector), so its FLOP rate is the same
count over its time. One more pass of ours runs under torch.profiler: the seconds spent in the
convolution / GEMM kernels against everything else (elementwise passes, layout copies), and the
FLOP rate inside the convolutions alone -- what tells a slow convolution from overhead around it
-- and the ceiling: PyHessian's time over the pass's FLOPs at the best measured rate (the most any
method performing these FLOPs could beat it by here).
The convolution shapes are timed in one heap scope (core/heap.py), as the products run.

Usage: python benchmarks/scripts/conv_throughput.py [--rounds 3] [--models resnet20,resnet18] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from resgeom_fast.core.heap import keep_heap
from resgeom_fast.operators import hessian

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.bench_operators import _conv_model  # noqa: E402  (the conv rows' models and data)

CE = nn.CrossEntropyLoss()


def _best(fn, rounds: int) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def conv_peak(rounds: int) -> dict:
    """GFLOP/s of channels_last convolutions of the shapes the product passes run (one thread),
    inside one heap scope as the products run (a fresh 84 MB output otherwise pays its page
    faults in the timing)."""
    with keep_heap():
        return _conv_peak(rounds)


def _conv_peak(rounds: int) -> dict:
    cl = torch.channels_last
    out = {}
    for N, C, O, H in [(1280, 16, 16, 32), (128, 16, 160, 32), (1280, 32, 32, 16), (640, 64, 64, 8),
                       (640, 128, 128, 4)]:
        x = torch.randn(N, C, H, H).contiguous(memory_format=cl)
        W = torch.randn(O, C, 3, 3).contiguous(memory_format=cl)
        g = torch.randn(N, O, H, H).contiguous(memory_format=cl)
        fl = 2.0 * N * O * C * 9 * H * H
        t_f = _best(lambda: F.conv2d(x, W, None, 1, 1), rounds)
        t_w = _best(lambda: torch.ops.aten.convolution_backward(
            g, x, W, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]), rounds)
        t_i = _best(lambda: torch.ops.aten.convolution_backward(
            g, x, W, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]), rounds)
        out[f"N{N}_C{C}_O{O}_{H}x{H}"] = {"forward": fl / t_f / 1e9, "weight_grad": fl / t_w / 1e9,
                                          "input_grad": fl / t_i / 1e9}
    out["peak"] = max(v for d in out.values() for v in d.values())
    return out


CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::mm", "aten::addmm", "aten::bmm",
            "aten::_mkldnn_matmul", "aten::mkldnn_matmul")


def time_split(fn) -> dict:
    """One call of ``fn`` under torch.profiler (CPU, no shapes): seconds of self time in the
    convolution / GEMM kernels, in everything else (elementwise passes, layout copies, reductions),
    and the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    conv = sum(e.self_cpu_time_total for e in ev if e.key in CONV_OPS) / 1e6
    top = sorted(((e.self_cpu_time_total / 1e6, e.key) for e in ev if e.key not in CONV_OPS), reverse=True)[:6]
    return {"profiled_s": total, "convolution_s": conv, "other_s": total - conv,
            "convolution_share": conv / total if total else float("nan"),
            "other_top": {k: round(t, 4) for t, k in top}}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", default="resnet20,resnet18", help="comma-separated: resnet20, resnet18")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = {}
    sizes = {"resnet20": 128, "resnet18": 64}
    for name in args.models.split(","):
        if name not in sizes:
            raise SystemExit(f"conv_throughput.py: expected --models among {sorted(sizes)}, got {name!r}")
        n = sizes[name]
        m, x, y = _conv_model(name, n=n)
        op = hessian(m, CE, (x, y), hvp="structured")
        ps = [p for p in m.parameters()]
        V = torch.randn(op.shape[0], 10, generator=torch.Generator().manual_seed(7))
        op.matmat(V)
        flops = op.structured_flops(10)
        from pyhessian import hessian as PH            # optional benchmark dependency
        from pyhessian.utils import hessian_vector_product

        m.zero_grad(set_to_none=True)
        ph = PH(m, CE, data=(x, y), cuda=False)
        cols = [[c.reshape(p.shape) for c, p in zip(V[:, j].split([q.numel() for q in ps]), ps)] for j in range(10)]
        ours, peer = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            op.matmat(V)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            for c in cols:
                hessian_vector_product(ph.gradsH, ph.params, c)
            peer.append(time.perf_counter() - t)
        split = time_split(lambda: op.matmat(V))
        rows[name] = {"images": n, "P": op.shape[0], "gflop_per_pass_of_10": flops / 1e9,
                      "ours_s": ours, "pyhessian_s": peer,
                      "ours_gflops": flops / min(ours) / 1e9, "pyhessian_gflops_same_count": flops / min(peer) / 1e9,
                      "ours_profile": split,
                      "ours_gflops_in_convolutions": flops / split["convolution_s"] / 1e9}
        print(name, json.dumps(rows[name]), flush=True)
    peak = conv_peak(args.rounds)
    for r in rows.values():
        r["ours_fraction_of_peak"] = r["ours_gflops"] / peak["peak"]
        r["pyhessian_fraction_of_peak"] = r["pyhessian_gflops_same_count"] / peak["peak"]
        r["ours_convolution_fraction_of_peak"] = r["ours_gflops_in_convolutions"] / peak["peak"]
        # the pass with every FLOP at the best measured convolution rate and nothing else: the
        # most any method performing these FLOPs could beat PyHessian by on this CPU
        r["ideal_s_at_peak"] = r["gflop_per_pass_of_10"] / peak["peak"]
        r["ceiling_ratio_vs_pyhessian"] = min(r["pyhessian_s"]) / r["ideal_s_at_peak"]
        r["ours_ratio_vs_pyhessian"] = min(r["pyhessian_s"]) / min(r["ours_s"])
    rec = {"machine": _cpu_name(), "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__,
           "load_at_start": load, "load_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "models": rows, "conv_throughput_gflops": peak}
    print(json.dumps(rec, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
