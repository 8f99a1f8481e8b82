"""One small instance of every analysis result (seconds on one CPU thread), for the tests of the
results' dict form (tests/analysis/test_result_dicts.py) and their plots."""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from resgeom_fast.analysis import (
    bottleneck_rank, collapse, geometric_complexity, hamiltonian, hessian_spectrum, mufm, path_expansion,
    residual_alignment, second_order_expansion, singularities,
)
from resgeom_fast.models import ConvResNet, FCResNet, LeakyResNet


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def tiny_results() -> dict[str, Any]:
    """{name: result} of every analysis on tiny float64 CPU cases (deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {}
        fc = FCResNet(4, 5, 3, 3, seed=0).double().eval()
        x = torch.randn(12, 4, generator=_gen(0), dtype=torch.float64)
        y = torch.arange(12) % 3
        out["alignment"] = residual_alignment(fc, x, k=4, y=y, seed=0)
        conv = ConvResNet(1, 3, 3, 5, seed=0).double().eval()
        xc = torch.randn(4, 1, 4, 4, generator=_gen(1), dtype=torch.float64)
        out["alignment_conv"] = residual_alignment(conv, xc, k=6, y=torch.tensor([0, 1, 2, 1]))
        one = FCResNet(4, 5, 1, 3, seed=0).double().eval()
        out["alignment_one_block"] = residual_alignment(one, x, k=5, y=y)
        out["collapse"] = collapse(fc, (x, y))
        with warnings.catch_warnings():  # unresolved fractions at 6 Lanczos steps: wanted here (None + reasons)
            warnings.simplefilter("ignore", UserWarning)
            out["spectrum"] = hessian_spectrum(fc, nn.functional.cross_entropy, (x, y), per_block=True, k=2,
                                               probes=2, steps=6, trace_probes=4, seed=0)
        out["singularities"] = singularities(fc, (x, y))
        plain = FCResNet(4, 5, 3, 3, norm="none", seed=0).double().eval()
        out["path_expansion"] = path_expansion(plain, x[:5], num_probes=2)
        out["second_order_expansion"] = second_order_expansion(
            FCResNet(4, 5, 3, 3, norm="none", scale=0.1, seed=0).double().eval(), x[:5])
        out["geometric_complexity"] = geometric_complexity(fc, (x, y))
        lk = LeakyResNet(3, 5, 4, 2, 2.0, "irregular", lam=0.1, seed=3).double()
        X = torch.randn(7, 3, generator=_gen(2), dtype=torch.float64)
        Y = torch.randn(7, 2, generator=_gen(3), dtype=torch.float64)
        out["hamiltonian"] = hamiltonian(lk, X, Y)
        out["bottleneck_rank"] = bottleneck_rank(out["hamiltonian"])
        out["mufm"] = mufm(x, y, 2, steps=5)
        return out
    finally:
        torch.set_num_threads(threads)
