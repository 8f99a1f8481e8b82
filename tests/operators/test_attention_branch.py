"""A marked block whose branch is an ``nn.MultiheadAttention``: the generic residual-Jacobian
products (vmap of jvp / vjp) run with the math attention kernel and MHA's fast path off, so they
work (the fused kernels have no forward-mode AD) and equal the dense jacrev Jacobian."""
from __future__ import annotations

import torch
from torch import nn

from resgeom_fast.operators import mark_residual_block, residual_jacobians


class _Branch(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, h, h, need_weights=False)[0]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = _Branch(nn.MultiheadAttention(8, 2, batch_first=True))
        self.block = nn.Identity()
        mark_residual_block(self, branch=self.branch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


def test_attention_branch_products_match_jacrev() -> None:
    torch.manual_seed(0)
    net = _Net().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    op = residual_jacobians(net, x)[0]
    V = torch.randn(2, 24, 3, dtype=torch.float64)
    with torch.no_grad():   # MHA's native fast path would be taken here, were it not switched off
        Y, U = op.matmat(V), op.rmatmat(V)
    for b in range(2):
        J = torch.func.jacrev(net.branch)(x[b:b + 1]).reshape(24, 24)
        torch.testing.assert_close(Y[b], J @ V[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(U[b], J.T @ V[b], rtol=1e-12, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()   # restored
