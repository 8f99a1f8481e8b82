"""Call each compiled op of resgeom_fast once on one device and check it against its reference.

The program that ``benchmarks/gpu/validate.py`` runs under ``compute-sanitizer --tool memcheck``
and ``--tool racecheck`` (few, small launches: the sanitizers slow kernels down ~100x). Sizes are
chosen to cross the kernels' block and chunk boundaries (n not a multiple of any block size,
several problems per batch). Exit status 0 when every op matches ``resgeom_fast.ops._reference``
(float64, rtol/atol per dtype), 1 otherwise; one line per op.

    python3 benchmarks/gpu/sanitize_ops.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the checkout's package
    sys.path.insert(0, str(ROOT))

from resgeom_fast import ops  # noqa: E402
from resgeom_fast.ops import _reference as ref  # noqa: E402


def _close(got, want, tol: float) -> float:
    """Largest relative error over the outputs (tuples compared element by element)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    err = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        err = max(err, float((g - w).abs().max() / w.abs().max().clamp_min(1e-300)))
    return err


def cases(device: torch.device, dtype: torch.dtype, n: int) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, op call on device, reference call on the CPU in float64) for each op."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # lanczos_reorth: 3 problems, 7 orthonormal basis rows of length n
    basis = torch.linalg.qr(r(3, n, 7)).Q.transpose(1, 2).contiguous()
    w = r(3, n)
    # lanczos_reorth with 137 chunks of 1024 (more than one segment of 128): the two-stage
    # cross-chunk reduction, and 33 basis rows (a partial column tile)
    basis2 = torch.linalg.qr(r(1, 140_003, 33)).Q.transpose(1, 2).contiguous()
    w2 = r(1, 140_003)
    # orthonormalize: 2 blocks [n, 9] (256-row tiles), 1 block [n, 40] (even k: row stride 41)
    x = r(2, n, 9)
    x2 = r(1, n, 40)
    # tridiag_eigh: 10 problems of 30 steps (an SLQ run: the host path), 40 problems of 16 steps
    # (one warp per problem; couplings >= 0.5: no localised, nearly degenerate eigenvector pairs
    # whose float32 weights would be ill conditioned against the float64 reference)
    d, e = r(10, 30), r(10, 29).abs()
    d2, e2 = r(40, 16), r(40, 15).abs() + 0.5
    # density_smooth
    nodes, weights, grid = r(3, 20), r(3, 20).abs(), torch.linspace(-3, 3, 501, dtype=torch.float64)
    # masked_scale, forward and backward
    v, mask, scale = r(3, 4, 16, 49), torch.rand(3, 16, 49, generator=g) > 0.5, r(16)

    def on(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def masked_scale_backward(fn) -> Callable[[], Tensor]:
        def run() -> Tensor:
            vv = (on(v) if fn is ops.masked_scale else v.clone()).requires_grad_(True)
            out = fn(vv, on(mask) if fn is ops.masked_scale else mask, on(scale) if fn is ops.masked_scale else scale)
            (gv,) = torch.autograd.grad(out, vv, torch.ones_like(out))
            return gv
        return run

    return [
        ("lanczos_reorth", lambda: ops.lanczos_reorth(on(w), on(basis)), lambda: ref.lanczos_reorth(w, basis)),
        ("lanczos_reorth_stages", lambda: ops.lanczos_reorth(on(w2), on(basis2)),
         lambda: ref.lanczos_reorth(w2, basis2)),
        ("orthonormalize", lambda: ops.orthonormalize(on(x)), lambda: ref.orthonormalize(x)),
        ("orthonormalize_k40", lambda: ops.orthonormalize(on(x2)), lambda: ref.orthonormalize(x2)),
        ("tridiag_eigh", lambda: ops.tridiag_eigh(on(d), on(e)), lambda: ref.tridiag_eigh(d, e)),
        ("tridiag_eigh_warps", lambda: ops.tridiag_eigh(on(d2), on(e2)), lambda: ref.tridiag_eigh(d2, e2)),
        ("density_smooth", lambda: ops.density_smooth(on(nodes), on(weights), on(grid), 0.2),
         lambda: ref.density_smooth(nodes, weights, grid, 0.2)),
        ("masked_scale", lambda: ops.masked_scale(on(v), on(mask), on(scale)), lambda: ref.masked_scale(v, mask, scale)),
        ("masked_scale_backward", masked_scale_backward(ops.masked_scale), masked_scale_backward(ref.masked_scale)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=5003, help="vector length (not a multiple of any block size)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no visible CUDA device")
        return 1
    bad = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        for name, run, want in cases(device, dtype, args.n):
            try:
                got = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                err = _close(got, want(), tol)
                ok = err <= tol
                print(f"{name:<24} {str(dtype):<14} max rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
            except Exception as exc:  # report every op, then fail
                ok = False
                print(f"{name:<24} {str(dtype):<14} ERROR {exc.__class__.__name__}: {exc}", flush=True)
            bad += not ok
    print(f"sanitize_ops: {bad} failing call(s) on {device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
