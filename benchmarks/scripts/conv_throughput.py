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

``--models user_fc``: the user-written FC ResNet of the FC rows (512 digits): its pass is GEMMs, so
its "peak" is the best float32 GEMM rate measured on the pass's own GEMM shapes (``gemm_peak``),
and ``torch.utils.flop_counter`` counts PyHessian's ten products (its gradient graph and ten double
backwards) beside ours, since there the two counts need not be equal.

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


def gemm_peak(rounds: int, n: int = 512, w: int = 128, k: int = 10) -> dict:
    """GFLOP/s of float32 GEMMs of the shapes the FC net's product pass runs (one thread): the k
    tangents stacked over samples [k n, w] x [w, w], the k tangent weights stacked over outputs
    [n, w] x [w, k w], and the weight gradients [k w, n] x [n, w]."""
    out = {}
    with keep_heap():
        for name, (a, b, c) in {"stacked_samples": (k * n, w, w), "stacked_outputs": (n, w, k * w),
                                "weight_grad": (k * w, n, w)}.items():
            A, B = torch.randn(a, b), torch.randn(b, c)
            out[name] = 2.0 * a * b * c / _best(lambda: torch.mm(A, B), max(rounds, 20)) / 1e9
    out["peak"] = max(out.values())
    return out


def _counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


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
    ap.add_argument("--models", default="resnet20,resnet18", help="comma-separated: resnet20, resnet18, user_fc")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = {}
    sizes = {"resnet20": 128, "resnet18": 64, "user_fc": 512}
    for name in args.models.split(","):
        if name not in sizes:
            raise SystemExit(f"conv_throughput.py: expected --models among {sorted(sizes)}, got {name!r}")
        n = sizes[name]
        m, x, y = _conv_model(name, n=None if name == "user_fc" else n)
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
        counted = {}
        if name == "user_fc":      # the peer's own count: its gradient graph and ten double backwards
            def peer_pass():
                m.zero_grad(set_to_none=True)
                g = torch.autograd.grad(CE(m(x), y), ps, create_graph=True)
                for c in cols:
                    torch.autograd.grad(g, ps, grad_outputs=c, retain_graph=True)
            counted = {"pyhessian_gflop_counted": _counted_flops(peer_pass) / 1e9,
                       "ours_gflop_counted": _counted_flops(lambda: op.matmat(V)) / 1e9}
        rows[name] = {"images": n, "P": op.shape[0], "gflop_per_pass_of_10": flops / 1e9,
                      "ours_s": ours, "pyhessian_s": peer,
                      "ours_gflops": flops / min(ours) / 1e9, "pyhessian_gflops_same_count": flops / min(peer) / 1e9,
                      "ours_profile": split,
                      "ours_gflops_in_convolutions": flops / split["convolution_s"] / 1e9, **counted}
        print(name, json.dumps(rows[name]), flush=True)
    conv = conv_peak(args.rounds) if any(k != "user_fc" for k in rows) else None
    gemm = gemm_peak(args.rounds) if "user_fc" in rows else None
    for key, r in rows.items():
        peak = gemm if key == "user_fc" else conv
        r["peak_of"] = "float32 GEMMs of the pass's shapes" if key == "user_fc" else "channels_last convolutions"
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
           "models": rows, "conv_throughput_gflops": conv, "gemm_throughput_gflops": gemm}
    print(json.dumps(rec, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
