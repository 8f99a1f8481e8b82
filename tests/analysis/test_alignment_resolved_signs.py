"""diag_positive counts the signs of resolved triplets only: a rank-1 branch Jacobian with k = 3
has two rounding-level singular pairs whose vectors are arbitrary; the sign of u_r^T J_j v_r for
them is noise and must not enter the fraction (before: values like 0.67 on a case whose only
resolved entry is positive for every sample)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from resgeom_fast.analysis import residual_alignment
from resgeom_fast.operators import mark_residual_block


class _Block(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.branch = nn.Linear(weight.shape[0], weight.shape[0], bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(weight)
        mark_residual_block(self, branch=self.branch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


def test_diag_positive_ignores_unresolved_triplets() -> None:
    D = 6
    a = torch.arange(1.0, D + 1, dtype=torch.float64)
    a = a / a.norm()
    net = nn.Sequential(_Block(torch.outer(a, a)), _Block(0.5 * torch.eye(D, dtype=torch.float64)),
                        nn.Linear(D, 2)).double().eval()
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = residual_alignment(net, x, k=3, num_classes=2)
    (st,) = r.stages
    # block 0 has one resolved triplet (a, 1, a): A_00 = 1 > 0, A_01 = 0.5 a^T a > 0 for every sample
    assert float(st.diag_positive[0, 0]) == 1.0 and float(st.diag_positive[0, 1]) == 1.0
    # block 1 (0.5 I) resolves all three: u^T J_0 v and u^T (0.5 I) v with u = v up to rounding
    assert float(st.diag_positive[1, 1]) == 1.0
